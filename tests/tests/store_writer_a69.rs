//! A69: the database stalled by a read lock. Under Nix's layout any local account can open the
//! world-readable `db.sqlite-shm` and hold a shared lock on SQLite's WAL write-lock byte, which
//! stalls every store write. Stockade keeps the database directory closed to everyone but the
//! store owner and its brokers, and never waits on a busy database with its write connection
//! held: a write that cannot get the lock fails with a clear error and an audit line.

use std::time::Duration;

use stockade_tests::sec::{stockade_with, AuditCollector};
use stockade_tests::{ensure_user, skip_unless_root, Daemon, RunOutput, User};

/// Python run by the attacker: open the WAL index read-only, take a shared lock on the
/// write-lock byte (offset 120), report, then add `$1` through the daemon while holding it.
const HOLD_LOCK_AND_ADD: &str = r#"
import fcntl, os, subprocess, sys
try:
    fd = os.open(sys.argv[1] + "/db.sqlite-shm", os.O_RDONLY)
    fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, 120)
    print("locked", flush=True)
except OSError as e:
    print("refused", e.errno, flush=True)
r = subprocess.run(["nix-store", "--add", sys.argv[2]], capture_output=True, text=True)
print("add-status", r.returncode)
print(r.stdout, end="")
print(r.stderr, end="", file=sys.stderr)
"#;

fn hold_lock_and_add(d: &Daemon, user: Option<&User>, file: &str) -> RunOutput {
    let db = d.host_path("/nix/var/nix/db");
    let db = if d.layout() == stockade_tests::Layout::MountNamespace {
        "/nix/var/nix/db".to_string()
    } else {
        db.display().to_string()
    };
    let mut c = d.cmd("python3").args(["-c", HOLD_LOCK_AND_ADD, &db, file]);
    if let Some(u) = user {
        c = c.as_user(u);
    }
    c.output()
}

/// Another local account, with no connection at all, cannot take SQLite's locks: it cannot
/// even open the database's files, and its own add (through the daemon) works.
#[test]
fn another_user_cannot_lock_the_database() {
    skip_unless_root!();
    let alice = ensure_user("st-alice").unwrap();
    let d = stockade_with("").start().expect("stockade");
    let first = d.write_work_file("first.txt", b"first\n");
    d.run_ok(["nix-store", "--add", first.to_str().unwrap()]);
    let f = d.write_work_file("alice.txt", b"alice's\n");
    std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out = hold_lock_and_add(&d, Some(&alice), f.to_str().unwrap());
    let text = out.stdout_str();
    assert!(
        text.contains("add-status 0"),
        "the add failed while the user held the lock: {out}"
    );
    assert!(
        text.starts_with("refused 13"),
        "the user could open the WAL index: {out}"
    );
}

/// A process that may open the database (root) and holds the write lock makes a write fail
/// after the retry deadline with a clear error naming it, and an audit line; queries carry
/// on meanwhile, and the daemon serves adds again once the lock is gone.
#[test]
fn a_locked_database_gives_a_clear_error_and_an_audit_line() {
    skip_unless_root!();
    let audit = AuditCollector::new();
    let d = stockade_with(&format!("audit-socket = {}\n", audit.path().display()))
        .start()
        .expect("stockade");
    let first = d.write_work_file("first.txt", b"first\n");
    let p = d.run_ok(["nix-store", "--add", first.to_str().unwrap()]);
    let f = d.write_work_file("second.txt", b"second\n");
    let out = hold_lock_and_add(&d, None, f.to_str().unwrap());
    assert!(out.stdout_str().starts_with("locked"), "{out}");
    assert!(!out.stdout_str().contains("add-status 0"), "{out}");
    let err = out.stderr_str();
    assert!(
        err.contains("the Nix database is locked by another process"),
        "{out}"
    );
    let line = audit
        .wait_for(Duration::from_secs(10), |l| {
            l.contains("op=database") && l.contains("outcome=busy")
        })
        .expect("no audit line for the busy database");
    assert!(line.contains("holders="), "{line}");
    d.run_ok(["nix-store", "-q", "--hash", &p]);
    d.run_ok(["nix-store", "--add", f.to_str().unwrap()]);
}
