//! The real Nix 2.8 client against Stockade (the real broker and store-writer next to the
//! `stockade` binary), side by side with the real nix-daemon: the same session must print the
//! same, admission and trust must behave the same. Uses the shared harness (`tests/`), which
//! runs each daemon in a private mount namespace over a throw-away `/nix`.

use stockade_tests::{ensure_user, skip_unless_root, Daemon, DaemonKind, RunOutput};

fn start(kind: DaemonKind, conf: &[&str]) -> Daemon {
    let mut b = Daemon::builder(kind);
    for l in conf {
        b = b.conf_line(l);
    }
    b.start().unwrap_or_else(|e| panic!("{e}"))
}

/// The same session, as root (trusted) and as st-alice (untrusted); what it prints.
fn session(d: &Daemon) -> Vec<String> {
    let alice = ensure_user("st-alice").expect("user");
    let f = d.write_work_file("hello.txt", b"hello\n");
    let dir = d.write_work_file("tree/a/b.txt", b"b\n");
    let tree = dir.parent().and_then(|p| p.parent()).expect("tree");
    let mut out = Vec::new();
    let p = d.run_ok(["nix-store", "--add", f.to_str().expect("utf8")]);
    out.push(p.clone());
    let t = d.run_as_ok(&alice, ["nix-store", "--add", tree.to_str().expect("utf8")]);
    out.push(t.clone());
    let fixed = d.run_as_ok(
        &alice,
        [
            "nix-store",
            "--add-fixed",
            "sha256",
            f.to_str().expect("utf8"),
        ],
    );
    out.push(fixed.clone());
    for flags in [
        vec!["-q", "--hash"],
        vec!["-q", "--size"],
        vec!["-q", "--references"],
        vec!["-q", "--referrers"],
        vec!["-q", "--deriver"],
        vec!["--check-validity"],
    ] {
        let mut argv = vec!["nix-store"];
        argv.extend(flags);
        argv.push(&p);
        argv.push(&t);
        out.push(d.run_as_ok(&alice, argv.clone()));
    }
    out.push(d.run_ok(["sh", "-c", &format!("nix-store --dump {t} | sha256sum")]));
    let v = d
        .cmd("nix-store")
        .args(["--verify", "--check-contents"])
        .output();
    out.push(format!("verify ok={}", v.success()));
    out
}

#[test]
fn nix_store_session_prints_the_same_as_nix_daemon() {
    skip_unless_root!();
    let conf = ["trusted-users = root"];
    let nix = session(&start(DaemonKind::Nix, &conf));
    let stockade = session(&start(DaemonKind::Stockade, &conf));
    assert_eq!(stockade, nix);
}

/// The client's error up to the part that depends on timing: both daemons close a refused
/// connection without a byte, and whether the client then fails writing its greeting ("Broken
/// pipe") or reading the answer ("Connection reset by peer") depends on whether the greeting
/// arrived before the close.
fn client_error(o: &RunOutput) -> String {
    let e = o.stderr_str();
    e.split(": error: ").next().unwrap_or("").trim().to_string()
}

#[test]
fn a_user_not_allowed_is_refused_like_nix_daemon_refuses() {
    skip_unless_root!();
    let eve = ensure_user("st-eve").expect("user");
    let alice = ensure_user("st-alice").expect("user");
    let conf = ["allowed-users = st-alice"];
    let mut seen = Vec::new();
    for kind in [DaemonKind::Nix, DaemonKind::Stockade] {
        let d = start(kind, &conf);
        let f = d.write_work_file("e.txt", b"eve\n");
        let o = d
            .cmd("nix-store")
            .args(["--add", f.to_str().expect("utf8")])
            .as_user(&eve)
            .fails();
        seen.push(client_error(&o));
        assert!(
            o.stderr_str().contains("Broken pipe")
                || o.stderr_str().contains("Connection reset by peer")
                || o.stderr_str().contains("unexpected end-of-file"),
            "{o}"
        );
        // alice still gets in.
        d.run_as_ok(&alice, ["nix-store", "--add", f.to_str().expect("utf8")]);
        assert!(
            d.log()
                .contains("user 'st-eve' is not allowed to connect to the Nix daemon"),
            "{}",
            d.log()
        );
    }
    assert_eq!(seen[1], seen[0]);
}

#[test]
fn only_trusted_clients_import_unsigned_paths() {
    skip_unless_root!();
    let alice = ensure_user("st-alice").expect("user");
    for kind in [DaemonKind::Nix, DaemonKind::Stockade] {
        let name = kind.name();
        let conf = ["trusted-users = root", "require-sigs = true"];
        let exporter = start(kind.clone(), &conf);
        let f = exporter.write_work_file("x.txt", b"exported\n");
        let p = exporter.run_ok(["nix-store", "--add", f.to_str().expect("utf8")]);
        let export = exporter.run_ok(["sh", "-c", &format!("nix-store --export {p} | base64 -w0")]);
        drop(exporter);
        // A fresh store to import into.
        let d = start(kind, &conf);
        let nar = d.write_work_file("x.nar.b64", export.as_bytes());
        let import = format!("base64 -d < {} | nix-store --import", nar.display());
        let o = d.cmd("sh").args(["-c", &import]).as_user(&alice).fails();
        assert!(
            o.stderr_str().contains("lacks a valid signature"),
            "{name}: {o}"
        );
        // root is trusted: the same import works.
        assert_eq!(d.run_ok(["sh", "-c", &import]), p, "{name}");
    }
}

/// Stockade only: trust decided by the master reaches the store-writer — a trusted non-root
/// user may import unsigned paths, root through the untrusted socket may not, and neither may
/// anyone when the daemon runs with --force-untrusted.
#[test]
fn trust_decided_by_the_master_reaches_the_store_writer() {
    skip_unless_root!();
    let alice = ensure_user("st-alice").expect("user");
    let conf = ["trusted-users = root st-alice", "require-sigs = true"];
    let exporter = start(DaemonKind::Stockade, &conf);
    let f = exporter.write_work_file("y.txt", b"exported too\n");
    let p = exporter.run_ok(["nix-store", "--add", f.to_str().expect("utf8")]);
    let export = exporter.run_ok(["sh", "-c", &format!("nix-store --export {p} | base64 -w0")]);
    drop(exporter);

    let d = start(DaemonKind::Stockade, &conf);
    let nar = d.write_work_file("y.nar.b64", export.as_bytes());
    let untrusted = format!(
        "base64 -d < {} | nix-store --store unix:///nix/var/nix/daemon-socket/untrusted --import",
        nar.display()
    );
    let o = d.cmd("sh").args(["-c", &untrusted]).fails();
    assert!(o.stderr_str().contains("lacks a valid signature"), "{o}");
    let import = format!("base64 -d < {} | nix-store --import", nar.display());
    assert_eq!(d.run_as_ok(&alice, ["sh", "-c", &import]), p);
    drop(d);

    let d = Daemon::builder(DaemonKind::Stockade)
        .conf_line("require-sigs = true")
        .arg("--force-untrusted")
        .start()
        .unwrap_or_else(|e| panic!("{e}"));
    let nar = d.write_work_file("y.nar.b64", export.as_bytes());
    let import = format!("base64 -d < {} | nix-store --import", nar.display());
    let o = d.cmd("sh").args(["-c", &import]).fails();
    assert!(o.stderr_str().contains("lacks a valid signature"), "{o}");
}
