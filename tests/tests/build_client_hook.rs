//! A54: a `post-build-hook` set by the client (`nix-build --option post-build-hook …`). From a
//! trusted user (alice) nix-daemon runs it, as root, for the builds of that connection;
//! Stockade runs it too, with the same lines shown to the client, but as the build's
//! unprivileged uid, and audits the override as a warning. Another connection (bob's) does not
//! run it, and an untrusted user's (mallory's) is ignored and audited as ignored. Needs root;
//! runs nix-daemon once for the reference.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use stockade_tests::sec::{audit_line, stockade_with, AuditCollector};
use stockade_tests::{
    busybox_derivation, ensure_user, nix_string, skip_unless_root, Daemon, DaemonKind, User,
};

const TRUSTED: &str = "trusted-users = root st-alice";

/// A hook that says what it sees and records who ran it for which derivation.
fn write_hook(dir: &Path) -> String {
    let hook = dir.join("hook.sh");
    fs::write(
        &hook,
        format!(
            "#!/bin/sh\necho \"hook for $DRV_PATH\"\n\
             echo \"uid=$(id -u) drv=$DRV_PATH\" >> {}/report\n",
            dir.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).unwrap();
    hook.display().to_string()
}

/// What one user's build showed: the client's lines about the hook (drv replaced), success,
/// and the drv path.
struct Built {
    lines: Vec<String>,
    drv: String,
    stderr: String,
}

fn build(d: &Daemon, user: &User, name: &str, hook: Option<&str>) -> Built {
    let bb = d.add_busybox();
    let expr = busybox_derivation(&bb, name, "echo built > $out");
    let drv = d.run_as_ok(user, ["nix-instantiate", "-E", &expr]);
    let mut c = d
        .cmd("nix-build")
        .as_user(user)
        .args(["--no-out-link", "-E", &expr]);
    if let Some(h) = hook {
        c = c.args(["--option", "post-build-hook", h]);
    }
    let out = c.output();
    let stderr = out.stderr_str();
    assert!(out.success(), "{name}: {stderr}");
    let lines = stderr
        .lines()
        .filter(|l| l.contains("post-build-hook") || l.contains("hook.sh"))
        .map(|l| l.replace(&drv, "<drv>"))
        .collect();
    Built { lines, drv, stderr }
}

/// The report lines of the hook, emptied for the next daemon.
fn take_report(dir: &Path) -> Vec<String> {
    let p = dir.join("report");
    let r = fs::read_to_string(&p).unwrap_or_default();
    let _ = fs::remove_file(&p);
    r.lines().map(str::to_string).collect()
}

/// The audit datagram of `uid`'s connection with `what`.
fn audited(audit: &AuditCollector, uid: u32, what: &str) -> String {
    let uid = format!(" uid={uid} ");
    audit
        .wait_for(Duration::from_secs(10), |l| {
            l.contains(&uid) && l.contains(what)
        })
        .unwrap_or_else(|| panic!("no audit line with {what} for{uid}: {:#?}", audit.lines()))
}

/// The value of `name=` in an audit line.
fn field<'a>(line: &'a str, name: &str) -> &'a str {
    audit_line(line)
        .split(' ')
        .find_map(|w| w.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
        .unwrap_or_default()
        .trim_matches('"')
}

#[test]
fn a54_a_trusted_clients_post_build_hook_runs_unprivileged_for_its_connection_only() {
    skip_unless_root!();
    let alice = ensure_user("st-alice").unwrap();
    let bob = ensure_user("st-bob").unwrap();
    let mallory = ensure_user("st-mallory").unwrap();
    let dir = tempfile::Builder::new()
        .prefix("stockade-a54-")
        .tempdir()
        .expect("temp dir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o1777)).unwrap();
    let hook = write_hook(dir.path());

    // The reference: nix-daemon runs alice's hook (as root).
    let nix = Daemon::builder(DaemonKind::Nix)
        .conf_line("sandbox = true")
        .conf_line(TRUSTED)
        .start()
        .expect("nix-daemon");
    let want = build(&nix, &alice, "a54-alice", Some(&hook));
    let nix_report = take_report(dir.path());
    drop(nix);
    assert!(
        nix_report.iter().any(|l| l.starts_with("uid=0 ")),
        "nix-daemon ran alice's hook as root: {nix_report:?}"
    );

    let audit = AuditCollector::new();
    let d = stockade_with(&format!("audit-socket = {}\n", audit.path().display()))
        .conf_line("sandbox = true")
        .conf_line(TRUSTED)
        .start()
        .expect("stockade");

    // Alice's hook runs for her build, shown as nix-daemon shows it, as an unprivileged uid.
    let a = build(&d, &alice, "a54-alice", Some(&hook));
    eprintln!("what alice saw of the hook: {:#?}", a.lines);
    assert_eq!(a.lines, want.lines, "{}", a.stderr);
    assert!(
        a.lines
            .iter()
            .any(|l| l == "post-build-hook: hook for <drv>"),
        "{}",
        a.stderr
    );
    let report = take_report(dir.path());
    assert_eq!(report.len(), 1, "{report:?}");
    let uid: u32 = report[0]
        .strip_prefix("uid=")
        .and_then(|r| r.split(' ').next())
        .and_then(|u| u.parse().ok())
        .unwrap_or_else(|| panic!("{report:?}"));
    assert_ne!(uid, 0, "alice's hook ran as root");
    assert_ne!(uid, alice.uid, "alice's hook ran as alice");
    assert!(report[0].ends_with(&format!("drv={}", a.drv)), "{report:?}");
    let ran = audited(&audit, alice.uid, " post-build-hook ");
    assert_eq!(field(&ran, "from"), "client", "{ran}");
    assert_eq!(field(&ran, "hook-uid"), uid.to_string(), "{ran}");
    // Her override is allowed, and said in a warning (syslog severity 4, facility daemon).
    let set = audited(&audit, alice.uid, "op=setOptions");
    assert!(
        field(&set, "allowed")
            .split(',')
            .any(|n| n == "post-build-hook"),
        "{set}"
    );
    assert!(
        field(&set, "restricted")
            .split(',')
            .any(|n| n == "post-build-hook"),
        "{set}"
    );
    assert!(set.starts_with("<28>"), "not a warning: {set}");

    // Bob's build, on a connection of his own, runs no hook.
    let b = build(&d, &bob, "a54-bob", None);
    assert_eq!(b.lines, Vec::<String>::new(), "{}", b.stderr);
    assert_eq!(take_report(dir.path()), Vec::<String>::new());

    // Mallory's hook is ignored, and audited as ignored.
    let m = build(&d, &mallory, "a54-mallory", Some(&hook));
    assert_eq!(m.lines, Vec::<String>::new(), "{}", m.stderr);
    assert_eq!(take_report(dir.path()), Vec::<String>::new());
    let set = audited(&audit, mallory.uid, "op=setOptions");
    assert!(
        field(&set, "ignored")
            .split(',')
            .any(|n| n == "post-build-hook"),
        "{set}"
    );
    assert!(!field(&set, "allowed").contains("post-build-hook"), "{set}");
    let hooks = audit.lines();
    assert_eq!(
        hooks
            .iter()
            .filter(|l| l.contains(" post-build-hook ") && l.contains("from="))
            .count(),
        1,
        "{hooks:#?}"
    );
}

/// A54 with two connections building at once: alice (trusted) builds with `--option sandbox
/// false` and her hook; while her build runs (its fixed-output builder waits on the test's
/// HTTP server), bob (untrusted) builds on his own connection. Her settings are allowed and
/// audited as a warning, and stay hers: bob's builder is confined (the host's directories are
/// not there; audited `sandboxed=true`), and her hook does not run for his build, only for
/// hers. (A root Stockade confines her build too: stricter than nix-daemon.)
#[test]
fn a54_a_trusted_clients_sandbox_off_and_hook_do_not_reach_a_concurrent_build() {
    skip_unless_root!();
    let alice = ensure_user("st-alice").unwrap();
    let bob = ensure_user("st-bob").unwrap();
    let dir = tempfile::Builder::new()
        .prefix("stockade-a54c-")
        .tempdir()
        .expect("temp dir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o1777)).unwrap();
    let hook = write_hook(dir.path());
    let audit = AuditCollector::new();
    let d = stockade_with(&format!("audit-socket = {}\n", audit.path().display()))
        .conf_line("sandbox = true")
        .conf_line("max-jobs = 2")
        .conf_line(TRUSTED)
        .start()
        .expect("stockade");
    let bb = d.add_busybox();

    // Alice's fixed-output build fetches from the test, which answers only once bob is done.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let payload = format!("a54 concurrent {}\n", std::process::id());
    let file = d.write_work_file("a54-payload", payload.as_bytes());
    let hash = d.run_ok([
        "nix-hash",
        "--type",
        "sha256",
        "--flat",
        file.to_str().unwrap(),
    ]);
    let fetch = format!("wget -q -O $out http://127.0.0.1:{port}/a54");
    let alice_expr = format!(
        "let bb = builtins.storePath {bbs}; in derivation {{ name = \"a54-alice-fetch\"; \
         system = builtins.currentSystem; builder = \"${{bb}}/bin/sh\"; PATH = \"${{bb}}/bin\"; \
         args = [ \"-c\" {script} ]; outputHashMode = \"flat\"; outputHashAlgo = \"sha256\"; \
         outputHash = \"{hash}\"; }}",
        bbs = nix_string(&bb),
        script = nix_string(&fetch),
    );
    let alice_drv = d.run_as_ok(&alice, ["nix-instantiate", "-E", &alice_expr]);
    // Bob's builder says which host paths it sees.
    let host = dir.path().display().to_string();
    let probe = format!(
        "for p in {host} {hook} /etc/shadow /root /nix/var/nix/db; do \
         if [ -e $p ]; then echo visible $p; fi; done > $out; echo probed >> $out"
    );
    let bob_expr = busybox_derivation(&bb, "a54-bob-probe", &probe);
    let bob_drv = d.run_as_ok(&bob, ["nix-instantiate", "-E", &bob_expr]);

    std::thread::scope(|s| {
        let a = s.spawn(|| {
            d.cmd("nix-build")
                .as_user(&alice)
                .args(["--no-out-link", "--option", "sandbox", "false"])
                .args(["--option", "post-build-hook", &hook, "-E", &alice_expr])
                .output()
        });
        // Her builder is running once it asks the test.
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        let (mut conn, _) = loop {
            match listener.accept() {
                Ok(c) => break c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("accept: {e}"),
            }
            assert!(!a.is_finished(), "alice's build ended without fetching");
            assert!(Instant::now() < deadline, "alice's builder never fetched");
            std::thread::sleep(Duration::from_millis(10));
        };
        conn.set_nonblocking(false).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut request = String::new();
        BufReader::new(conn.try_clone().unwrap())
            .read_line(&mut request)
            .unwrap();
        assert!(request.starts_with("GET /a54 "), "{request:?}");

        // Meanwhile, bob's build: confined, and no hook.
        let b = d
            .cmd("nix-build")
            .as_user(&bob)
            .args(["--no-out-link", "-E", &bob_expr])
            .output();
        assert!(b.success(), "{b}");
        assert!(!a.is_finished(), "alice's build did not wait for the test");
        let out = b.stdout_str().trim().to_string();
        let seen = fs::read_to_string(d.host_path(&out)).unwrap();
        assert_eq!(seen, "probed\n", "bob's builder saw host paths");
        assert!(
            !b.stderr_str().contains("post-build-hook") && !b.stderr_str().contains("hook.sh"),
            "{b}"
        );
        assert_eq!(take_report(dir.path()), Vec::<String>::new());

        // Now alice's build ends, and her hook runs for it.
        conn.write_all(
            format!(
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{payload}",
                payload.len()
            )
            .as_bytes(),
        )
        .unwrap();
        drop(conn);
        let a = a.join().unwrap();
        assert!(a.success(), "{a}");
        assert!(a.stderr_str().contains("post-build-hook: hook for"), "{a}");
    });
    let report = take_report(dir.path());
    assert_eq!(report.len(), 1, "{report:?}");
    assert!(
        report[0].ends_with(&format!("drv={alice_drv}")),
        "{report:?}"
    );
    assert!(!report[0].starts_with("uid=0 "), "{report:?}");

    // Her overrides are allowed and said in a warning; bob set none.
    let set = audited(&audit, alice.uid, "op=setOptions");
    for name in ["sandbox", "post-build-hook"] {
        assert!(
            field(&set, "allowed").split(',').any(|n| n == name),
            "{set}"
        );
        assert!(
            field(&set, "restricted").split(',').any(|n| n == name),
            "{set}"
        );
    }
    assert!(set.starts_with("<28>"), "not a warning: {set}");
    let lines = audit.lines();
    let bob_uid = format!(" uid={} ", bob.uid);
    assert!(
        !lines.iter().any(|l| l.contains(&bob_uid)
            && l.contains("op=setOptions")
            && field(l, "allowed").contains("sandbox")),
        "{lines:#?}"
    );
    // Each build's start says whether it is confined.
    for drv in [&bob_drv, &alice_drv] {
        let start = audit
            .wait_for(Duration::from_secs(10), |l| {
                l.contains("build-start") && l.contains(drv.as_str())
            })
            .unwrap_or_else(|| panic!("no build-start for {drv}: {lines:#?}"));
        assert_eq!(field(&start, "sandboxed"), "true", "{start}");
    }
    let hooks: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains(" post-build-hook ") && l.contains("from="))
        .collect();
    assert_eq!(hooks.len(), 1, "{hooks:#?}");
    assert!(
        hooks[0].contains(&format!(" uid={} ", alice.uid)),
        "{hooks:#?}"
    );
}
