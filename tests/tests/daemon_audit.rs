//! Audit lines (SECURITY.md §4.9, A65, A67), collected on a datagram socket named by
//! `audit-socket` in stockade.conf (the master and the store-writer both send there):
//! accepted and refused connections with conn= and uid=, an add with its path and NAR hash, a
//! refused add, and client-chosen text with newlines and escape sequences that cannot split or
//! forge a line.
//!
//! Needs root (namespaces, useradd); fails loudly in CI without it.

use std::time::Duration;

use stockade_common::store_path::StoreDir;
use stockade_tests::raw::{export_stream, flat_nar, info_for, input_addressed_path, RawConn};
use stockade_tests::sec::{audit_line, stockade_with, AuditCollector};
use stockade_tests::{ensure_user, skip_unless_root, Daemon};

const WAIT: Duration = Duration::from_secs(20);

fn start(audit: &AuditCollector) -> Daemon {
    stockade_with(&format!("audit-socket = {}\n", audit.path().display()))
        .conf_line("trusted-users = root st-alice")
        .conf_line("allowed-users = root st-alice st-bob")
        .start()
        .expect("stockade")
}

/// The value of `key=` in an audit line (unquoted values only).
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split(' ')
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// Every datagram is one line that starts with `conn=<n> uid=<n|->`.
fn assert_well_formed(lines: &[String]) {
    for dg in lines {
        let l = audit_line(dg);
        assert!(
            !l.contains('\n') && !l.contains('\r') && !l.contains('\x1b'),
            "raw control characters in an audit line: {l:?}"
        );
        let mut words = l.split(' ');
        let conn = words.next().and_then(|w| w.strip_prefix("conn="));
        let uid = words.next().and_then(|w| w.strip_prefix("uid="));
        assert!(
            conn.is_some_and(|c| c == "-" || c.parse::<u64>().is_ok())
                && uid.is_some_and(|u| u == "-" || u.parse::<u32>().is_ok()),
            "an audit line that does not start with conn= uid=: {l:?}"
        );
    }
}

#[test]
fn connections_adds_and_refusals_are_audited() {
    skip_unless_root!();
    let bob = ensure_user("st-bob").unwrap();
    let eve = ensure_user("st-eve").unwrap();
    let audit = AuditCollector::new();
    let d = start(&audit);
    let sd = StoreDir::new("/nix/store").unwrap();

    // A refused connection.
    let f = d.write_work_file("eve.txt", b"eve\n");
    let out = d
        .cmd("nix-store")
        .args(["--add", f.to_str().unwrap()])
        .as_user(&eve)
        .output();
    assert!(!out.success(), "{out}");
    let refused = audit
        .wait_for(WAIT, |l| {
            audit_line(l).contains(" refused ") && l.contains(&format!(" uid={} ", eve.uid))
        })
        .unwrap_or_else(|| panic!("no refusal line for st-eve: {:#?}", audit.lines()));
    let refused = audit_line(&refused);
    assert!(refused.starts_with("conn="), "{refused}");
    assert!(refused.contains("user=st-eve"), "{refused}");
    assert!(
        refused.contains("user 'st-eve' is not allowed to connect to the Nix daemon"),
        "{refused}"
    );
    // A1: refused before a broker exists, without a byte to the client.
    assert!(!refused.contains("broker-pid="), "{refused}");
    assert!(
        !audit
            .lines()
            .iter()
            .any(|l| l.contains(" accepted ") && l.contains(&format!(" uid={} ", eve.uid))),
        "{:#?}",
        audit.lines()
    );
    let mut raw = RawConn::connect_as(&d, &eve).expect("connect as st-eve");
    raw.send_u64(stockade_common::worker::WORKER_MAGIC_1)
        .unwrap();
    raw.flush_lossy();
    let h = raw.read_to_hangup();
    assert!(h.closed && h.bytes.is_empty(), "{h:?}");

    // An accepted connection and an add.
    let f = d.write_work_file("bob.txt", b"bob\n");
    let path = d.run_as_ok(&bob, ["nix-store", "--add", f.to_str().unwrap()]);
    let hash = d.run_ok(["nix-store", "-q", "--hash", &path]);
    let accepted = audit
        .wait_for(WAIT, |l| {
            audit_line(l).contains(" accepted ") && l.contains(&format!(" uid={} ", bob.uid))
        })
        .unwrap_or_else(|| panic!("no accepted line for st-bob: {:#?}", audit.lines()));
    let accepted = audit_line(&accepted).to_string();
    let conn = field(&accepted, "conn").expect("conn=").to_string();
    assert!(accepted.contains("trusted=no"), "{accepted}");
    assert!(accepted.contains("user=st-bob"), "{accepted}");
    let added = audit
        .wait_for(WAIT, |l| l.contains("outcome=added") && l.contains(&path))
        .unwrap_or_else(|| panic!("no add line for {path}: {:#?}", audit.lines()));
    let added = audit_line(&added);
    assert_eq!(field(added, "conn"), Some(conn.as_str()), "{added}");
    assert_eq!(
        field(added, "uid"),
        Some(bob.uid.to_string().as_str()),
        "{added}"
    );
    assert_eq!(field(added, "path"), Some(path.as_str()), "{added}");
    assert_eq!(field(added, "narHash"), Some(hash.as_str()), "{added}");
    assert_eq!(field(added, "evidence"), Some("ca"), "{added}");
    let closed = audit.wait_for(WAIT, |l| {
        audit_line(l).starts_with(&format!("conn={conn} ")) && l.contains(" closed ")
    });
    assert!(closed.is_some(), "no closed line for conn {conn}");

    // A refused add: an unsigned input-addressed path from an untrusted client.
    let evil = input_addressed_path(&sd, "audit-evil", "evil");
    let nar = flat_nar(b"unsigned\n");
    let info = info_for(&evil, &sd, &nar);
    let export = d.write_work_file("evil.export", &export_stream(&info, &sd, &nar));
    let out = d
        .cmd("sh")
        .args([
            "-c",
            "nix-store --import < \"$1\"",
            "sh",
            export.to_str().unwrap(),
        ])
        .as_user(&bob)
        .output();
    assert!(!out.success(), "{out}");
    let refusal = audit
        .wait_for(WAIT, |l| l.contains("outcome=refused") && l.contains(&evil))
        .unwrap_or_else(|| panic!("no refusal line for {evil}: {:#?}", audit.lines()));
    let refusal = audit_line(&refusal);
    assert_eq!(
        field(refusal, "uid"),
        Some(bob.uid.to_string().as_str()),
        "{refusal}"
    );
    assert!(refusal.contains("lacks a valid signature"), "{refusal}");

    assert_well_formed(&audit.lines());
}

/// A65: text a client chooses (a GC root link, SetOptions names and values) with newlines,
/// carriage returns, ANSI escapes and fake fields stays inside one escaped field of one line,
/// in the audit lines and in the daemon's own log.
#[test]
fn client_text_cannot_split_or_forge_lines() {
    skip_unless_root!();
    let bob = ensure_user("st-bob").unwrap();
    let audit = AuditCollector::new();
    let d = start(&audit);
    let forged = "conn=0 uid=0 accepted pid=1 user=root trusted=yes";
    let evil = format!("/tmp/x\n{forged}\r\x1b[2K\x1b[1Aok \u{202e}drow");

    let mut c = RawConn::connect_as(&d, &bob).expect("connect");
    c.handshake().expect("handshake");
    let name = format!("sandbox\n{forged}");
    let resp = c
        .set_options(&[(&name, &evil), ("substituters", &evil)])
        .expect("SetOptions");
    assert!(resp.is_ok(), "{resp:?}");
    let resp = c
        .add_indirect_root(evil.as_bytes())
        .expect("AddIndirectRoot");
    assert!(resp.is_ok(), "{resp:?}");
    drop(c);

    let line = audit
        .wait_for(WAIT, |l| l.contains("op=addIndirectRoot"))
        .unwrap_or_else(|| panic!("no addIndirectRoot line: {:#?}", audit.lines()));
    let line = audit_line(&line);
    assert!(line.contains("\\n"), "newline not escaped: {line:?}");
    assert!(line.contains("\\x1b"), "ESC not escaped: {line:?}");
    // The forged text is inside the quoted link= value, not a field of its own.
    let link_at = line.find(" link=\"").expect("quoted link= field");
    assert!(line.find(forged).is_some_and(|i| i > link_at), "{line:?}");
    // Wait for the master's line for the end of this connection, so everything is in.
    let _ = audit.wait_for(WAIT, |l| {
        l.contains(" closed ") && l.contains(&format!(" uid={} ", bob.uid))
    });
    let lines = audit.lines();
    assert_well_formed(&lines);
    for dg in &lines {
        assert!(
            !audit_line(dg).starts_with(forged),
            "a forged audit line: {dg:?}"
        );
    }
    // The daemon's own log (stdout/stderr) has no forged or raw-escaped line either.
    for l in d.log().lines() {
        assert!(
            !l.starts_with("conn=0 uid=0 accepted pid=1"),
            "forged log line: {l:?}"
        );
        assert!(
            !l.contains("\x1b[2K") && !l.contains("\x1b[1A"),
            "raw escape in the log: {l:?}"
        );
    }
}

/// A67: denials decided by the broker, and every SetOptions override with whether it was
/// allowed, reach the audit destination, not only the daemon's standard error.
#[test]
fn broker_denials_and_overrides_are_audited() {
    skip_unless_root!();
    let bob = ensure_user("st-bob").unwrap();
    let audit = AuditCollector::new();
    let d = start(&audit);
    let f = d.write_work_file("bob.txt", b"bob\n");
    let path = d.run_as_ok(&bob, ["nix-store", "--add", f.to_str().unwrap()]);
    let mut c = RawConn::connect_as(&d, &bob).expect("connect");
    c.handshake().expect("handshake");
    assert!(c
        .set_options(&[("sandbox", "false"), ("post-build-hook", "/tmp/x")])
        .unwrap()
        .is_ok());
    let resp = c.add_signatures(&path, &["k:c2ln"]).unwrap();
    assert!(resp.error("AddSignatures").contains("not privileged"));
    let resp = c.build_paths(&[&path], 1).unwrap();
    assert!(resp.error("repair").contains("repairing is not allowed"));
    // Overrides are summed up in one line when the connection ends (A73).
    drop(c);
    let uid = format!(" uid={} ", bob.uid);
    for what in ["addSignatures", "repair", "sandbox", "post-build-hook"] {
        let l = audit.wait_for(WAIT, |l| l.contains(&uid) && l.contains(what));
        assert!(
            l.is_some(),
            "no audit line about {what}: {:#?}",
            audit.lines()
        );
    }
}

/// A73/A74: a client flooding SetOptions (200 calls of 50 names each) yields one summary line
/// for its connection, not 10,000; brokers write no audit line themselves (they hold no
/// syslog socket: the store-writer writes their events under the master's identity of the
/// connection); another user's add is still audited.
#[test]
fn a_setoptions_flood_is_one_line_and_brokers_write_none() {
    skip_unless_root!();
    let bob = ensure_user("st-bob").unwrap();
    let audit = AuditCollector::new();
    let d = start(&audit);
    let mut c = RawConn::connect_as(&d, &bob).expect("connect");
    c.handshake().expect("handshake");
    for call in 0..200 {
        let names: Vec<String> = (0..50).map(|i| format!("flood-{call}-{i}")).collect();
        let pairs: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "x")).collect();
        assert!(c.set_options(&pairs).unwrap().is_ok());
    }
    drop(c);
    let uid = format!(" uid={} ", bob.uid);
    let line = audit
        .wait_for(WAIT, |l| l.contains(&uid) && l.contains("op=setOptions"))
        .unwrap_or_else(|| panic!("no setOptions summary: {:#?}", audit.lines()));
    let line = audit_line(&line).to_string();
    assert_eq!(field(&line, "calls"), Some("200"), "{line}");
    assert_eq!(field(&line, "tried"), Some("10000"), "{line}");
    assert!(field(&line, "unnamed").is_some(), "{line}");
    // Another user's add still comes through after the flood.
    let f = d.write_work_file("after.txt", b"after the flood\n");
    let path = d.run_ok(["nix-store", "--add", f.to_str().unwrap()]);
    audit
        .wait_for(WAIT, |l| l.contains("outcome=added") && l.contains(&path))
        .unwrap_or_else(|| panic!("the add after the flood was not audited"));
    let lines = audit.lines();
    let summaries = lines
        .iter()
        .filter(|l| l.contains(&uid) && l.contains("op=setOptions"))
        .count();
    assert_eq!(summaries, 1, "{lines:#?}");
    assert!(
        lines.len() < 100,
        "{} audit lines for one flooding connection",
        lines.len()
    );
    assert!(
        !lines.iter().any(|l| l.contains("stockade-broker[")),
        "a broker wrote an audit line itself: {lines:#?}"
    );
}

/// A76: `STOCKADE_SECCOMP_LOG=1` in the daemon's environment no longer turns the services'
/// allow-lists into logging; only `--debug-seccomp-log` does, and both the master's and the
/// store-writer's start-up lines say which.
#[test]
fn seccomp_log_mode_comes_from_the_command_line_only() {
    skip_unless_root!();
    for (debug, want) in [(false, "on"), (true, "log")] {
        let audit = AuditCollector::new();
        let mut b = stockade_with(&format!("audit-socket = {}\n", audit.path().display()))
            .env("STOCKADE_SECCOMP_LOG", "1");
        if debug {
            b = b.arg("--debug-seccomp-log");
        }
        let _d = b.start().expect("stockade");
        let master = audit
            .wait_for(WAIT, |l| {
                l.contains(" start ") && l.contains(" mode=daemon ")
            })
            .expect("the master's start line");
        let master = audit_line(&master);
        assert_eq!(field(master, "seccomp"), Some(want), "{master}");
        assert_eq!(field(master, "confinement"), Some("required"), "{master}");
        // The store-writer reports what the kernel enforces on it.
        let writer = audit
            .wait_for(WAIT, |l| l.contains("op=start") && l.contains("landlock="))
            .expect("the store-writer's start line");
        assert!(
            writer.contains(&format!(" seccomp={want} ")),
            "debug={debug}: {writer}"
        );
    }
}
