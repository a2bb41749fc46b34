//! The store and state directories removed and made again, empty, under a running daemon, as
//! Nix's functional tests do between tests (`clearStore`: `rm -rf` of each, then `mkdir`).
//!
//! nix-daemon opens the store anew for every connection, so the next client works on the new
//! store. Stockade must do the same for a daemon run by an ordinary user (a new store-writer,
//! one audit line), with the same results for the client; a root Stockade exits with one clear
//! line and status 1 for its supervisor to restart it (master/src/restart.rs says why).
//!
//! The directories are made again rather than left absent because that is what Nix's harness
//! does, and what nix-daemon 2.8 needs: with the state directory absent, its per-connection
//! store ("auto") cannot write there, finds the daemon socket and connects to itself, so every
//! client fails. The daemon socket lives outside the state directory, as in Nix's harness.
//!
//! Needs root (namespaces, useradd); fails loudly in CI without it.

use std::os::unix::fs::{lchown, MetadataExt, PermissionsExt};
use std::time::Duration;

use stockade_tests::fsutil::remove_tree;
use stockade_tests::raw::RawConn;
use stockade_tests::sec::{audit_line, builder, instance_processes, stockade_with, AuditCollector};
use stockade_tests::{ensure_user, skip_unless_root, Daemon, DaemonKind, Layout, User};

const WAIT: Duration = Duration::from_secs(60);

/// `rm -rf` the store and the state directory and make them again, empty, owned by `owner`
/// (the harness's user when None).
fn replace_store(d: &Daemon, owner: Option<&User>) {
    let nix = d.base_dir().join("nix");
    for dir in [nix.join("store"), nix.join("var/nix")] {
        remove_tree(&dir).unwrap_or_else(|e| panic!("removing {}: {e}", dir.display()));
        assert!(!dir.exists());
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        if let Some(u) = owner {
            lchown(&dir, Some(u.uid), Some(u.gid)).unwrap();
        }
    }
}

/// What a client sees, with the store directory (which differs between instances) cut off.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    /// A derivation built on the new store: its output's contents.
    built: String,
    /// `nix-store --add` of a new file: the name part of its store path.
    added: String,
    /// `nix-store -q --hash` of it.
    hash: String,
    /// `nix-store -q --hash` of the path added before the replacement succeeds.
    old_hash_ok: bool,
    /// `nix-store --check-validity --print-invalid` of that path prints it.
    old_invalid: bool,
    /// `nix-store --verify` and `--verify --check-contents`: exit status and stdout.
    verify: (bool, String),
    check_contents: (bool, String),
}

/// The name part of a store path (`<hash>-<name>` → `<name>`), checking its shape.
fn name_of(store: &str, path: &str) -> String {
    let base = path
        .strip_prefix(store)
        .and_then(|r| r.strip_prefix('/'))
        .unwrap_or_else(|| panic!("{path} is not in {store}"));
    let (hash, name) = base.split_at(32.min(base.len()));
    assert_eq!(hash.len(), 32, "{path}");
    name.to_string()
}

/// Starts `kind` as `owner` over a redirected store, adds a file, replaces the store and
/// returns what the next clients see, the daemon (still running), and what an add on a
/// connection opened before the replacement got (its error, or the path added).
fn scenario(kind: DaemonKind, owner: &User, audit: &AuditCollector) -> (Seen, Daemon, String) {
    let b = match kind {
        DaemonKind::Stockade => {
            stockade_with(&format!("audit-socket = {}\n", audit.path().display()))
        }
        other => builder(other),
    };
    let d = b
        .layout(Layout::Redirected)
        .run_as(owner)
        .socket_outside_state()
        .start()
        .expect("daemon");
    let store = d.store_dir();
    let first = d.write_work_file("first.txt", b"before the store was replaced\n");
    let old = d.run_as_ok(owner, ["nix-store", "--add", first.to_str().unwrap()]);
    assert_eq!(name_of(&store, &old), "-first.txt");
    // A connection open across the replacement.
    let mut open = RawConn::connect_as(&d, owner).expect("connect");
    open.handshake().expect("handshake");

    replace_store(&d, Some(owner));

    let second = d.write_work_file("second.txt", b"after the store was replaced\n");
    let new = d.run_as_ok(owner, ["nix-store", "--add", second.to_str().unwrap()]);
    let meta = std::fs::symlink_metadata(d.host_path(&new)).expect("the new path on disk");
    assert_eq!(meta.uid(), owner.uid, "{new}");
    let hash = d.run_as_ok(owner, ["nix-store", "-q", "--hash", &new]);
    let old_hash_ok = d
        .cmd("nix-store")
        .args(["-q", "--hash", &old])
        .as_user(owner)
        .output()
        .success();
    let invalid = d.run_as_ok(
        owner,
        ["nix-store", "--check-validity", "--print-invalid", &old],
    );
    let run = |args: &[&str]| {
        let o = d.cmd("nix-store").args(args).as_user(owner).output();
        assert!(o.success(), "{o}\n--- daemon log ---\n{}", d.log_tail(40));
        (o.success(), o.stdout_str())
    };
    // A build on the new store (the builder-helper's channel follows the new store-writer).
    // Busybox added by the owner (a daemon run by an ordinary user refuses root's per-user
    // directories).
    let bb_dir = d.work_dir().join("bb/busybox");
    std::fs::create_dir_all(bb_dir.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", bb_dir.join("bin/busybox")).expect("busybox-static");
    std::os::unix::fs::symlink("busybox", bb_dir.join("bin/sh")).unwrap();
    for dir in [d.work_dir().join("bb"), bb_dir.clone(), bb_dir.join("bin")] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let bb = d.run_as_ok(owner, ["nix-store", "--add", bb_dir.to_str().unwrap()]);
    let expr = stockade_tests::busybox_derivation(&bb, "after", "echo built after > $out");
    let out = d
        .cmd("nix-build")
        .args(["--no-out-link", "-E", &expr])
        .as_user(owner)
        .output();
    assert!(
        out.success(),
        "{out}\n--- daemon log ---\n{}",
        d.log_tail(40)
    );
    let built = std::fs::read_to_string(d.host_path(out.stdout_str().trim())).unwrap_or_default();
    let seen = Seen {
        built,
        added: name_of(&store, &new),
        hash,
        old_hash_ok,
        old_invalid: invalid == old,
        verify: run(&["--verify"]),
        check_contents: run(&["--verify", "--check-contents"]),
    };
    let late = match open.add_to_store("late.txt", "text:sha256", &[], b"late\n") {
        Ok((_, Some(path))) => path,
        Ok((resp, None)) => resp.error("an add on the open connection"),
        Err(e) => format!("connection error: {e}"),
    };
    (seen, d, late)
}

/// The value of `key=` in an audit line (unquoted values only).
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split(' ')
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// Log lines of the master about the replaced store.
fn replaced_lines(d: &Daemon) -> Vec<String> {
    d.log()
        .lines()
        .filter(|l| l.contains("store directories were replaced"))
        .map(str::to_string)
        .collect()
}

#[test]
fn ordinary_user_daemon_serves_the_new_store_like_nix_daemon() {
    skip_unless_root!();
    let owner = ensure_user("st-alice").unwrap();
    let audit = AuditCollector::new();

    let (nix, nix_daemon, _) = scenario(DaemonKind::Nix, &owner, &audit);
    drop(nix_daemon);
    let (ours, d, late) = scenario(DaemonKind::Stockade, &owner, &audit);
    assert_eq!(ours, nix, "Stockade (left) and nix-daemon (right) differ");
    assert_eq!(nix.added, "-second.txt");
    assert_eq!(nix.built, "built after\n");
    assert!(nix.hash.starts_with("sha256:"), "{nix:?}");
    assert!(!nix.old_hash_ok && nix.old_invalid, "{nix:?}");

    // A connection opened before the replacement has lost its store-writer and says so
    // (nix-daemon's per-connection process goes on with the old database, in the new store
    // directory).
    assert!(
        late.contains("the store-writer serving this connection has stopped")
            && late.contains("the store was replaced"),
        "{late}"
    );

    // One log line and one audit line, naming the old and new directories and store-writers.
    let lines = replaced_lines(&d);
    assert_eq!(lines.len(), 1, "{lines:#?}\n{}", d.log());
    assert!(
        lines[0].contains("restarted the store-writer on the new ones"),
        "{}",
        lines[0]
    );
    let line = audit
        .wait_for(WAIT, |l| audit_line(l).contains(" store-replaced "))
        .unwrap_or_else(|| panic!("no store-replaced audit line: {:#?}", audit.lines()));
    let line = audit_line(&line);
    assert!(
        line.starts_with(&format!("conn=0 uid={} ", owner.uid)),
        "{line}"
    );
    assert_eq!(field(line, "action"), Some("restarted"), "{line}");
    for dir in ["store", "state", "db"] {
        let old = field(line, &format!("{dir}-old")).unwrap_or_default();
        let new = field(line, &format!("{dir}-new")).unwrap_or_default();
        assert!(!old.is_empty() && old != "gone" && new != "gone", "{line}");
        assert_ne!(old, new, "{dir} in {line}");
    }
    let (old_pid, new_pid) = (field(line, "old-pid"), field(line, "new-pid"));
    assert!(
        old_pid.is_some() && new_pid.is_some() && old_pid != new_pid,
        "{line}"
    );
    assert_eq!(
        audit
            .lines()
            .iter()
            .filter(|l| audit_line(l).contains(" store-replaced "))
            .count(),
        1
    );
    // The old store-writer is gone; the new one runs as the owner.
    let writers: Vec<_> = instance_processes(&d, "stockade-store-writer");
    assert_eq!(writers.len(), 1, "{writers:?}");
    assert_eq!(Some(writers[0].pid.to_string().as_str()), new_pid);
    assert!(writers[0].uids.iter().all(|u| *u == owner.uid));
}

#[test]
fn root_daemon_exits_for_its_supervisor() {
    skip_unless_root!();
    let audit = AuditCollector::new();
    let mut d = stockade_with(&format!("audit-socket = {}\n", audit.path().display()))
        .socket_outside_state()
        .start()
        .expect("stockade");
    let first = d.write_work_file("first.txt", b"before the store was replaced\n");
    d.run_ok(["nix-store", "--add", first.to_str().unwrap()]);

    replace_store(&d, None);

    let second = d.write_work_file("second.txt", b"after the store was replaced\n");
    let out = d
        .cmd("nix-store")
        .args(["--add", second.to_str().unwrap()])
        .fails();
    let status = d
        .wait_exit(WAIT)
        .unwrap_or_else(|| panic!("the daemon did not exit: {out}\n{}", d.log()));
    assert_eq!(status.code(), Some(1), "{status}\n{}", d.log());

    let lines = replaced_lines(&d);
    assert_eq!(lines.len(), 1, "{lines:#?}\n{}", d.log());
    for part in [
        "exiting with status 1 for the supervisor to restart the daemon",
        "CAP_CHOWN",
        "db ",
        "-> gone",
    ] {
        assert!(lines[0].contains(part), "{part:?} not in {}", lines[0]);
    }
    let line = audit
        .wait_for(WAIT, |l| audit_line(l).contains(" store-replaced "))
        .unwrap_or_else(|| panic!("no store-replaced audit line: {:#?}", audit.lines()));
    let line = audit_line(&line);
    assert!(line.starts_with("conn=0 uid=0 store-replaced "), "{line}");
    assert_eq!(field(line, "action"), Some("exit"), "{line}");
    assert_eq!(field(line, "db-new"), Some("gone"), "{line}");
    assert_ne!(field(line, "store-old"), field(line, "store-new"), "{line}");
    let missing = field(line, "missing").unwrap_or_default();
    for cap in [
        "CAP_CHOWN",
        "CAP_FOWNER",
        "CAP_DAC_OVERRIDE",
        "CAP_DAC_READ_SEARCH",
    ] {
        assert!(missing.split(',').any(|c| c == cap), "{cap} in {line}");
    }
    // The old store-writer had exited (and released the state directory) before the master.
    let left = instance_processes(&d, "stockade-store-writer");
    assert!(left.is_empty(), "{left:?}");
    // Nothing was written to the new, empty store.
    let store = d.base_dir().join("nix/store");
    assert_eq!(std::fs::read_dir(&store).unwrap().count(), 0);
    assert!(!d.base_dir().join("nix/var/nix/db").exists());
}
