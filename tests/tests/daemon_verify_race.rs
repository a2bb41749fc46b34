//! A71: VerifyStore racing adds. An untrusted user loops `nix-store --verify` while other
//! clients add 1,000 distinct paths at once. A verify lists the store directory before the
//! database, so a path added between the two listings looks "disappeared"; it must not be
//! de-registered. Afterwards every added path is valid, no verify dropped anything, and the
//! audit holds a start and an end line for every verify run, some of them during the adds.
//!
//! Needs root (namespaces, useradd); fails loudly in CI without it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use stockade_tests::sec::{audit_line, stockade_with, AuditCollector};
use stockade_tests::{ensure_user, skip_unless_root, Daemon, User};

/// Paths added while the verifies run.
const PATHS: usize = 1000;
/// Concurrent `nix-store --add` clients, each adding its share of the paths in one call.
const ADDERS: usize = 8;
/// Concurrent `nix-store --verify` loops of the attacker.
const VERIFIERS: usize = 2;
/// How long an audit line may take to arrive (a bound for a hang, not a synchronisation).
const WAIT: Duration = Duration::from_secs(60);

/// Loops `nix-store --verify` until `$STOP` exists; prints `<runs> <failed runs>`.
const VERIFY_LOOP: &str = "runs=0; failed=0
    while [ ! -e \"$STOP\" ]; do
        nix-store --verify || failed=$((failed + 1))
        runs=$((runs + 1))
    done
    echo \"$runs $failed\"";

/// The value of `key=` in an audit line (unquoted values only).
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split(' ')
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// `st-alice`'s verify lines with `outcome=<outcome>`, in the order they arrived.
fn verify_lines(lines: &[String], alice: &User, outcome: &str) -> Vec<String> {
    lines
        .iter()
        .map(|l| audit_line(l).to_string())
        .filter(|l| {
            field(l, "uid") == Some(alice.uid.to_string().as_str())
                && field(l, "op") == Some("verifyStore")
                && field(l, "outcome") == Some(outcome)
        })
        .collect()
}

fn start(audit: &AuditCollector) -> Daemon {
    // st-alice, the attacker, is not trusted: any user may verify the store.
    stockade_with(&format!("audit-socket = {}\n", audit.path().display()))
        .conf_line("trusted-users = root")
        .start()
        .expect("stockade")
}

#[test]
fn verify_never_drops_paths_being_added() {
    skip_unless_root!();
    let alice = ensure_user("st-alice").unwrap();
    let bob = ensure_user("st-bob").unwrap();
    let audit = AuditCollector::new();
    let d = start(&audit);
    // Homes are created on first use, which is racy from several threads: one by one first.
    d.run_as_ok(&alice, ["true"]);
    d.run_as_ok(&bob, ["true"]);

    let files: Vec<PathBuf> = (0..PATHS)
        .map(|i| d.write_work_file(&format!("race/r{i}.txt"), format!("race {i}\n").as_bytes()))
        .collect();
    let stop = d.work_dir().join("stop");

    let (adds, verifies) = std::thread::scope(|s| {
        let verifiers: Vec<_> = (0..VERIFIERS)
            .map(|_| {
                let (d, alice, stop) = (&d, &alice, &stop);
                s.spawn(move || {
                    d.cmd("sh")
                        .args(["-c", VERIFY_LOOP])
                        .env("STOP", stop)
                        .as_user(alice)
                        .output()
                })
            })
            .collect();
        // The adds begin once a verify has begun, so they run while the verifies loop.
        let begun = audit.wait_for(WAIT, |l| {
            verify_lines(&[l.to_string()], &alice, "started").len() == 1
        });
        let adders: Vec<_> = files
            .chunks(PATHS.div_ceil(ADDERS))
            .enumerate()
            .map(|(i, chunk)| {
                let (d, bob) = (&d, &bob);
                s.spawn(move || {
                    let mut c = d.cmd("nix-store").arg("--add").args(chunk);
                    // Half the adders are root (trusted), half st-bob (untrusted).
                    if i % 2 == 1 {
                        c = c.as_user(bob);
                    }
                    c.output()
                })
            })
            .collect();
        let adds: Vec<_> = adders
            .into_iter()
            .map(|h| h.join().expect("adder thread"))
            .collect();
        // Stops the loops (also when no verify began, so that the test ends and says so).
        std::fs::write(&stop, b"").expect("stop file");
        let verifies: Vec<_> = verifiers
            .into_iter()
            .map(|h| h.join().expect("verifier thread"))
            .collect();
        assert!(begun.is_some(), "no verify began: {:#?}", audit.lines());
        (adds, verifies)
    });

    let mut added = BTreeSet::new();
    for (i, out) in adds.iter().enumerate() {
        assert!(out.success(), "adder {i} failed: {out}\n{}", d.log_tail(30));
        added.extend(out.stdout_str().lines().map(str::to_string));
    }
    assert_eq!(added.len(), PATHS, "distinct paths added");

    // The attack: paths the verifies de-registered while they were being added.
    let added: Vec<String> = added.into_iter().collect();
    let invalid = d
        .cmd("nix-store")
        .args(["--check-validity", "--print-invalid"])
        .args(&added)
        .ok();
    let vanished = invalid.lines().count();
    assert_eq!(
        vanished,
        0,
        "{vanished} of {PATHS} added paths vanished:\n{invalid}\n{}",
        d.log_tail(20)
    );

    let mut runs = 0;
    for (i, out) in verifies.iter().enumerate() {
        assert!(out.success(), "verify loop {i}: {out}");
        let stdout = out.stdout_str();
        let (r, failed) = stdout
            .trim()
            .split_once(' ')
            .and_then(|(r, f)| Some((r.parse::<usize>().ok()?, f.parse::<usize>().ok()?)))
            .unwrap_or_else(|| panic!("verify loop {i}: no counts: {out}"));
        assert_eq!(
            failed, 0,
            "verify loop {i}: {failed} of {r} runs failed: {out}"
        );
        assert!(
            !out.stderr_str().contains("disappeared"),
            "verify loop {i} saw paths disappear: {out}"
        );
        runs += r;
    }
    // One more run after the adds: it sees every path, and nothing to drop.
    let last = d.cmd("nix-store").arg("--verify").as_user(&alice).output();
    assert!(last.success(), "{last}");
    assert!(!last.stderr_str().contains("disappeared"), "{last}");
    runs += 1;

    // Every run is audited when it starts and when it ends, and nothing was de-registered.
    let finished = audit
        .wait_for_count(WAIT, runs, |l| {
            verify_lines(&[l.to_string()], &alice, "finished").len() == 1
        })
        .unwrap_or_else(|| panic!("fewer than {runs} verify end lines: {:#?}", audit.lines()));
    let lines = audit.lines();
    let started = verify_lines(&lines, &alice, "started");
    assert_eq!(started.len(), runs, "verify start lines: {started:#?}");
    assert_eq!(finished.len(), runs, "verify end lines: {finished:#?}");
    for l in &finished {
        let l = audit_line(l);
        assert_eq!(field(l, "checkContents"), Some("no"), "{l}");
        assert_eq!(field(l, "errors"), Some("0"), "{l}");
        assert_eq!(field(l, "invalidated"), Some("0"), "{l}");
        assert!(field(l, "paths").is_some(), "{l}");
    }
    let last_end = finished.last().map(|l| audit_line(l)).unwrap_or_default();
    assert_eq!(
        field(last_end, "paths"),
        Some(PATHS.to_string().as_str()),
        "{last_end}"
    );
    let dropped: Vec<&String> = lines
        .iter()
        .filter(|l| field(audit_line(l), "outcome") == Some("invalidated"))
        .collect();
    assert!(dropped.is_empty(), "de-registrations: {dropped:#?}");

    // The attack happened: some verify ran from start to end between the first and the last
    // add (the store-writer writes these lines in the order it does the work).
    let add_lines: Vec<usize> = (0..lines.len())
        .filter(|&i| field(audit_line(&lines[i]), "outcome") == Some("added"))
        .collect();
    let (first_add, last_add) = match (add_lines.first(), add_lines.last()) {
        (Some(&f), Some(&l)) => (f, l),
        _ => panic!("no add lines: {lines:#?}"),
    };
    let mut span: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (i, l) in lines.iter().enumerate() {
        let l = audit_line(l);
        if field(l, "op") != Some("verifyStore") {
            continue;
        }
        let conn = field(l, "conn").unwrap_or_default().to_string();
        let e = span.entry(conn).or_insert((i, i));
        e.1 = i;
    }
    let during = span
        .values()
        .filter(|&&(s, e)| s > first_add && e < last_add)
        .count();
    assert!(
        during > 0,
        "no verify ran during the adds ({runs} runs): {lines:#?}"
    );
    eprintln!("{runs} verify runs, {during} of them between the first and the last add");

    // A path that really disappeared is still dropped, as by Nix, and that is audited too.
    let gone = &added[0];
    std::fs::remove_file(d.host_path(gone)).expect("removing a store path");
    let out = d.cmd("nix-store").arg("--verify").as_user(&alice).output();
    assert!(out.success(), "{out}");
    assert!(
        out.stderr_str().contains(&format!(
            "path '{gone}' disappeared, removing from database..."
        )),
        "{out}"
    );
    let dropped = audit
        .wait_for(WAIT, |l| {
            let l = audit_line(l);
            field(l, "outcome") == Some("invalidated") && field(l, "path") == Some(gone)
        })
        .unwrap_or_else(|| panic!("no invalidated line for {gone}: {:#?}", audit.lines()));
    let dropped = audit_line(&dropped);
    assert_eq!(field(dropped, "op"), Some("verifyStore"), "{dropped}");
    assert_eq!(
        field(dropped, "uid"),
        Some(alice.uid.to_string().as_str()),
        "{dropped}"
    );
    let end = audit
        .wait_for(WAIT, |l| {
            let l = audit_line(l);
            field(l, "outcome") == Some("finished") && field(l, "invalidated") == Some("1")
        })
        .unwrap_or_else(|| panic!("no end line with invalidated=1: {:#?}", audit.lines()));
    assert_eq!(
        field(audit_line(&end), "paths"),
        Some(PATHS.to_string().as_str())
    );
}
