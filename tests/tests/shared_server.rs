//! Issue 19's acceptance scenario: with `trusted-users = root st-alice` and
//! `allowed-users = root st-alice st-bob st-mallory`, mallory attacks the daemon every way a
//! local user can at once — a read lock on the database's WAL index, a trickled upload, a
//! SetOptions flood, as many connections as she can open, a slow-loris handshake — while bob
//! adds, queries and builds. Bob's work completes without error (nothing asserts on time;
//! the wall times are printed), eve is refused at connect, and afterwards the store verifies
//! clean and every audit line of bob's work is there. Needs root.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use stockade_tests::raw::RawConn;
use stockade_tests::sec::{audit_line, stockade_with, AuditCollector};
use stockade_tests::{busybox_derivation, ensure_user, skip_unless_root, Daemon, User};

/// Run by mallory: open the WAL index and take a shared lock on SQLite's write-lock byte,
/// say what happened, and hold it until stdin closes.
const HOLD_LOCK: &str = r#"
import fcntl, os, sys
try:
    fd = os.open(sys.argv[1] + "/db.sqlite-shm", os.O_RDONLY)
    fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, 120)
    print("locked", flush=True)
except OSError as e:
    print("refused", e.errno, flush=True)
sys.stdin.read()
"#;

fn hold_db_lock(d: &Daemon, mallory: &User) -> (Child, String) {
    let db = d.host_path("/nix/var/nix/db");
    let mut child = Command::new("runuser")
        .args(["-u", &mallory.name, "--", "python3", "-c", HOLD_LOCK])
        .arg(&db)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("runuser python3");
    let mut line = String::new();
    let out = child.stdout.take().expect("stdout");
    BufReader::new(out).read_line(&mut line).expect("read");
    (child, line.trim().to_string())
}

/// The issue's configuration: alice trusted, bob and mallory allowed, eve not; audit lines to
/// `audit`.
fn start_shared(audit: &AuditCollector) -> Daemon {
    stockade_with(&format!("audit-socket = {}\n", audit.path().display()))
        .conf_line("trusted-users = root st-alice")
        .conf_line("allowed-users = root st-alice st-bob st-mallory")
        .conf_line("sandbox = true")
        .start()
        .expect("stockade")
}

/// Bob's work: an add, queries, a build. Panics on any error; returns the wall time.
fn bobs_work(d: &Daemon, bob: &User, round: &str) -> std::time::Duration {
    let started = Instant::now();
    let f = d.write_work_file(
        &format!("bob-{round}.txt"),
        format!("bob {round}\n").as_bytes(),
    );
    std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let p = d.run_as_ok(bob, ["nix-store", "--add", f.to_str().unwrap()]);
    d.run_as_ok(bob, ["nix-store", "-q", "--hash", &p]);
    d.run_as_ok(bob, ["nix-store", "--verify-path", &p]);
    let bb = d.add_busybox();
    let expr = busybox_derivation(&bb, &format!("bob-{round}"), "echo built > $out");
    d.run_as_ok(bob, ["nix-build", "--no-out-link", "-E", &expr]);
    started.elapsed()
}

#[test]
fn bob_is_served_while_mallory_attacks() {
    skip_unless_root!();
    // st-alice is trusted in the configuration; she need only exist.
    ensure_user("st-alice").unwrap();
    let bob = ensure_user("st-bob").unwrap();
    let mallory = ensure_user("st-mallory").unwrap();
    let eve = ensure_user("st-eve").unwrap();
    let audit = AuditCollector::new();
    let d = start_shared(&audit);

    let idle = bobs_work(&d, &bob, "idle");

    // Eve is refused at connect.
    let f = d.write_work_file("eve.txt", b"eve\n");
    let refused = d
        .cmd("nix-store")
        .args(["--add", f.to_str().unwrap()])
        .as_user(&eve)
        .output();
    assert!(!refused.success(), "eve was served: {refused}");

    // Mallory, all at once.
    let (mut lock, lock_said) = hold_db_lock(&d, &mallory);
    let mut trickle = RawConn::session(&d, Some(&mallory));
    // AddToStore (op 7) of a flat file, whose data then stops coming.
    trickle.send_u64(7).unwrap();
    trickle.send_str("trickled").unwrap();
    trickle.send_str("fixed:sha256").unwrap();
    trickle.send_strs(std::iter::empty::<&str>()).unwrap();
    trickle.send_u64(0).unwrap();
    trickle.send_frames(&[b'm'; 1 << 16]).unwrap();
    let mut flood = RawConn::session(&d, Some(&mallory));
    for call in 0..100 {
        let names: Vec<String> = (0..50).map(|i| format!("m-{call}-{i}")).collect();
        let pairs: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "x")).collect();
        assert!(flood.set_options(&pairs).unwrap().is_ok());
    }
    // Slow loris: connected, one byte of the handshake, then nothing.
    let mut loris = RawConn::connect_as(&d, &mallory).unwrap();
    loris.send(&[0x63]).unwrap();
    loris.flush().unwrap();
    // As many connections as she can get (the per-uid limit ends it well before 500).
    let mut held = Vec::new();
    let mut refused_conns = 0;
    for _ in 0..500 {
        match RawConn::connect_as(&d, &mallory) {
            Ok(mut c) => match c.handshake() {
                Ok(_) => held.push(c),
                Err(_) => refused_conns += 1,
            },
            Err(_) => refused_conns += 1,
        }
    }
    assert!(refused_conns > 0, "mallory opened 500 connections");

    let active = bobs_work(&d, &bob, "active");
    eprintln!(
        "bob's add, queries and build: {:.0} ms with mallory idle, {:.0} ms with mallory active \
         (lock: {lock_said}; connections held {}, refused {refused_conns})",
        idle.as_secs_f64() * 1000.0,
        active.as_secs_f64() * 1000.0,
        held.len()
    );

    // Mallory stops.
    drop(held);
    drop(loris);
    drop(flood);
    drop(trickle);
    if let Some(mut stdin) = lock.stdin.take() {
        let _ = stdin.write_all(b"");
    }
    let _ = lock.kill();
    let _ = lock.wait();

    d.run_ok(["nix-store", "--verify", "--check-contents"]);
    let uid = format!(" uid={} ", bob.uid);
    for what in ["bob-idle.txt", "bob-active.txt"] {
        audit
            .wait_for(std::time::Duration::from_secs(20), |l| {
                l.contains(&uid) && l.contains("outcome=added") && l.contains(what)
            })
            .unwrap_or_else(|| panic!("no audit line for bob's add of {what}"));
    }
    for round in ["bob-idle", "bob-active"] {
        audit
            .wait_for(std::time::Duration::from_secs(20), |l| {
                l.contains(&uid) && l.contains("op=build") && l.contains(round)
            })
            .unwrap_or_else(|| panic!("no audit line for bob's build {round}"));
    }
    audit
        .wait_for(std::time::Duration::from_secs(20), |l| {
            audit_line(l).contains(" refused ") && l.contains(&format!(" uid={} ", eve.uid))
        })
        .unwrap_or_else(|| panic!("no audit line for eve's refusal"));
}

/// Issue 19's first "done means": who may do what. Mallory (untrusted) adds sources and
/// builds, but cannot import unsigned paths, repair, or set `post-build-hook`, `sandbox`,
/// `build-users-group` or an untrusted substituter; alice (trusted) imports unsigned paths;
/// the audit names each by uid with each decision.
#[test]
fn who_may_do_what() {
    use stockade_common::store_path::StoreDir;
    use stockade_tests::raw::{export_stream, flat_nar, info_for, input_addressed_path};
    skip_unless_root!();
    let alice = ensure_user("st-alice").unwrap();
    let mallory = ensure_user("st-mallory").unwrap();
    let audit = AuditCollector::new();
    let d = start_shared(&audit);
    let sd = StoreDir::new("/nix/store").unwrap();
    let wait = std::time::Duration::from_secs(20);

    // Sources and builds: yes.
    let f = d.write_work_file("mallory.txt", b"mallory\n");
    std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let src = d.run_as_ok(&mallory, ["nix-store", "--add", f.to_str().unwrap()]);
    let bb = d.add_busybox();
    let built = d.run_as_ok(
        &mallory,
        [
            "nix-build",
            "--no-out-link",
            "-E",
            &busybox_derivation(&bb, "mallory-build", "echo ok > $out"),
        ],
    );

    // An unsigned import: no for mallory, yes for alice.
    let nar = flat_nar(b"unsigned\n");
    let path = input_addressed_path(&sd, "unsigned", "unsigned");
    let stream = export_stream(&info_for(&path, &sd, &nar), &sd, &nar);
    let out = d
        .cmd("nix-store")
        .arg("--import")
        .stdin(stream.clone())
        .as_user(&mallory)
        .output();
    assert!(!out.success(), "mallory imported an unsigned path: {out}");
    assert!(
        out.stderr_str().contains("lacks a valid signature"),
        "{out}"
    );
    let out = d
        .cmd("nix-store")
        .arg("--import")
        .stdin(stream)
        .as_user(&alice)
        .output();
    assert!(out.success(), "alice could not import: {out}");

    // Repair, and the settings that would loosen the sandbox or run a program: no.
    let mut c = RawConn::session(&d, Some(&mallory));
    let resp = c
        .set_options(&[
            ("post-build-hook", "/tmp/evil"),
            ("sandbox", "false"),
            ("build-users-group", ""),
            ("substituters", "https://evil.example/"),
        ])
        .unwrap();
    assert!(resp.is_ok(), "{resp:?}");
    // Refused before any work starts: as nix-daemon, the connection ends after it.
    let resp = c.build_paths(&[&src], 1).unwrap();
    assert!(resp.error("repair").contains("repairing is not allowed"));
    drop(c);
    // The daemon still sandboxes mallory's builds and runs no hook of hers.
    let out = d.run_as_ok(
        &mallory,
        [
            "nix-build",
            "--no-out-link",
            "--option",
            "sandbox",
            "false",
            "-E",
            &busybox_derivation(&bb, "mallory-probe", "ls /etc > $out"),
        ],
    );
    let seen = std::fs::read_to_string(d.host_path(&out)).unwrap();
    assert!(
        !seen.contains("nix") && !seen.contains("ssl"),
        "mallory's build saw the host's /etc: {seen}"
    );
    let _ = built;

    // The audit: each decision, each by uid.
    let m = format!(" uid={} ", mallory.uid);
    let a = format!(" uid={} ", alice.uid);
    let line = |pred: &dyn Fn(&str) -> bool, what: &str| {
        audit
            .wait_for(wait, |l| pred(audit_line(l)))
            .unwrap_or_else(|| panic!("no audit line: {what}: {:#?}", audit.lines()))
    };
    line(
        &|l| l.contains(&m) && l.contains("outcome=added"),
        "mallory's add",
    );
    line(
        &|l| l.contains(&m) && l.contains("op=build"),
        "mallory's build",
    );
    line(
        &|l| l.contains(&m) && l.contains("outcome=refused") && l.contains("signature"),
        "mallory's unsigned import refused",
    );
    line(
        &|l| l.contains(&a) && l.contains("outcome=added"),
        "alice's import",
    );
    line(
        &|l| l.contains(&m) && l.contains("outcome=denied") && l.contains("repair"),
        "mallory's repair denied",
    );
    let s = line(
        &|l| l.contains(&m) && l.contains("op=setOptions") && l.contains("post-build-hook"),
        "mallory's overrides",
    );
    for name in ["post-build-hook", "sandbox", "build-users-group"] {
        let ignored = audit_line(&s)
            .split(' ')
            .find_map(|w| w.strip_prefix("ignored="))
            .unwrap_or_default()
            .trim_matches('"')
            .to_string();
        assert!(
            ignored.split(',').any(|n| n == name),
            "{name} not ignored: {s}"
        );
    }
}

/// Issue 19's add budgets: an untrusted user's single add is bounded
/// (`untrusted-max-nar-size`) and so is what her uid adds in an hour
/// (`untrusted-bytes-per-hour`, over all her connections); a path that is valid already costs
/// nothing; another untrusted user and a trusted one are not held back by her use.
#[test]
fn an_untrusted_user_cannot_fill_the_disk() {
    skip_unless_root!();
    let alice = ensure_user("st-alice").unwrap();
    let bob = ensure_user("st-bob").unwrap();
    let mallory = ensure_user("st-mallory").unwrap();
    let d = stockade_with("untrusted-max-nar-size = 1M\nuntrusted-bytes-per-hour = 3M\n")
        .conf_line("trusted-users = root st-alice")
        .start()
        .expect("stockade");
    let file = |name: &str, size: usize| {
        let data: Vec<u8> = name.bytes().cycle().take(size).collect();
        let f = d.write_work_file(name, &data);
        std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        f.to_str().unwrap().to_string()
    };
    let add = |user: &User, f: &str| d.cmd("nix-store").args(["--add", f]).as_user(user).output();
    let big = file("big", 2 << 20);
    let out = add(&mallory, &big);
    assert!(!out.success(), "a 2 MiB add went through: {out}");
    assert!(out.stderr_str().contains("untrusted-max-nar-size"), "{out}");
    let mut mine = Vec::new();
    for i in 0..3 {
        let f = file(&format!("m{i}"), 900 << 10);
        let out = add(&mallory, &f);
        assert!(out.success(), "add {i}: {out}");
        mine.push(f);
    }
    let out = add(&mallory, &file("m3", 900 << 10));
    assert!(!out.success(), "a fourth 900 KiB add went through: {out}");
    assert!(
        out.stderr_str().contains("untrusted-bytes-per-hour"),
        "{out}"
    );
    // Adding what is valid already costs nothing.
    let out = add(&mallory, &mine[0]);
    assert!(out.success(), "re-adding a valid path: {out}");
    // Others are not held back.
    assert!(add(&bob, &file("b0", 900 << 10)).success());
    assert!(add(&alice, &big).success());
    d.run_ok(["nix-store", "--verify", "--check-contents"]);
}

/// A29 and issue 19's temp-root budgets: an untrusted connection holds at most
/// `untrusted-temp-roots`, an untrusted uid at most `untrusted-temp-roots-per-uid` over all its
/// connections; a hit is refused in words naming the setting and audited; a closed
/// connection gives its roots back; another untrusted user and a trusted one are not held back.
#[test]
fn a29_an_untrusted_user_cannot_hold_unbounded_temp_roots() {
    skip_unless_root!();
    let alice = ensure_user("st-alice").unwrap();
    let bob = ensure_user("st-bob").unwrap();
    let mallory = ensure_user("st-mallory").unwrap();
    let audit = AuditCollector::new();
    let d = stockade_with(&format!(
        "audit-socket = {}\nuntrusted-temp-roots = 20\nuntrusted-temp-roots-per-uid = 30\n",
        audit.path().display()
    ))
    .conf_line("trusted-users = root st-alice")
    .start()
    .expect("stockade");
    let files = |tag: &str, n: usize| -> Vec<String> {
        (0..n)
            .map(|i| {
                let f = d.write_work_file(&format!("{tag}/{i}"), format!("{tag} {i}\n").as_bytes());
                std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o644))
                    .unwrap();
                f.to_str().unwrap().to_string()
            })
            .collect()
    };
    let add = |user: &User, f: &[String]| {
        d.cmd("nix-store")
            .arg("--add")
            .args(f)
            .as_user(user)
            .output()
    };
    // One connection: the 21st add needs a 21st root.
    let out = add(&mallory, &files("m", 25));
    assert!(!out.success(), "25 roots on one connection: {out}");
    assert!(out.stderr_str().contains("untrusted-temp-roots"), "{out}");
    assert_eq!(out.stdout_str().lines().count(), 20, "{out}");
    // Over her connections: 20 held on one, so the second gets 10.
    let held = files("h", 20);
    let held_paths = d
        .cmd("nix-store")
        .arg("--add")
        .args(&held)
        .output()
        .stdout_str()
        .lines()
        .map(str::to_string)
        .collect::<Vec<_>>();
    let mut conn = RawConn::session(&d, Some(&mallory));
    for p in &held_paths {
        conn.add_temp_root(p)
            .unwrap()
            .expect("a root within the budget");
    }
    let out = add(&mallory, &files("n", 12));
    assert!(!out.success(), "30 roots over two connections: {out}");
    assert!(
        out.stderr_str().contains("untrusted-temp-roots-per-uid"),
        "{out}"
    );
    assert_eq!(out.stdout_str().lines().count(), 10, "{out}");
    // Others are not held back meanwhile.
    assert!(add(&bob, &files("b", 20)).success());
    assert!(add(&alice, &files("a", 40)).success());
    // A closed connection gives its roots back (once the store-writer hears it is gone: the
    // teardown is asynchronous, so the add is tried until it fits, at most 50 times).
    drop(conn);
    let again = files("again", 15);
    let out = (0..50)
        .map(|_| add(&mallory, &again))
        .find(|o| o.success())
        .expect("mallory's roots were given back once her connection closed");
    assert_eq!(out.stdout_str().lines().count(), 15);
    for limit in ["untrusted-temp-roots", "untrusted-temp-roots-per-uid"] {
        assert!(
            audit.lines().iter().any(|l| {
                let l = audit_line(l);
                let want = format!("limit={limit}");
                l.contains("op=addTempRoot") && l.split(' ').any(|f| f == want)
            }),
            "no audit line for {limit}: {:#?}",
            audit.lines()
        );
    }
}
