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

/// Python run as root: a child takes the brokers' uid and group, as a compromised broker runs,
/// opens the WAL index and holds a shared lock on its write-lock byte; the parent then adds
/// `$2` through the daemon and reports how the holder ended (it never lets go by itself).
const BROKER_HOLDS_LOCK: &str = r#"
import fcntl, os, signal, subprocess, sys
db, f, uid, gid = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    os.setgroups([gid]); os.setgid(gid); os.setuid(uid)
    fd = os.open(db + "/db.sqlite-shm", os.O_RDONLY)
    fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, 120)
    os.write(w, b"x")
    while True:
        signal.pause()
os.close(w)
if os.read(r, 1) != b"x":
    print("no-lock", flush=True)
    sys.exit(0)
print("holder", pid, flush=True)
res = subprocess.run(["nix-store", "--add", f], capture_output=True, text=True)
print("add-status", res.returncode, flush=True)
if res.returncode != 0:
    os.kill(pid, signal.SIGKILL)
_, status = os.waitpid(pid, 0)
print("holder-signal", os.WTERMSIG(status) if os.WIFSIGNALED(status) else -1)
print(res.stdout, end="")
print(res.stderr, end="", file=sys.stderr)
"#;

/// A compromised broker may open the database (brokers read it directly) and so may hold
/// SQLite's write lock. The store-writer reports the holder to the master, which ends it
/// because it runs under a broker uid: the add waiting for the lock completes, and the
/// master's audit line names the process it killed.
#[test]
fn a_broker_holding_the_lock_is_ended() {
    skip_unless_root!();
    let audit = AuditCollector::new();
    let range = stockade_tests::sec::private_broker_uids();
    let first: u32 = range
        .trim()
        .rsplit(' ')
        .next()
        .and_then(|r| r.split('-').next())
        .and_then(|f| f.parse().ok())
        .expect("broker-uid-range line");
    let d = Daemon::builder(stockade_tests::DaemonKind::Stockade)
        .stockade_conf(&format!(
            "{range}audit-socket = {}\n",
            audit.path().display()
        ))
        .start()
        .expect("stockade");
    let first_file = d.write_work_file("first.txt", b"first\n");
    d.run_ok(["nix-store", "--add", first_file.to_str().unwrap()]);
    let f = d.write_work_file("second.txt", b"second\n");
    // A broker uid that no connection holds now, and the brokers' database group.
    let (uid, gid) = (first + 200, first - 2);
    let out = d
        .cmd("python3")
        .args([
            "-c",
            BROKER_HOLDS_LOCK,
            "/nix/var/nix/db",
            f.to_str().unwrap(),
            &uid.to_string(),
            &gid.to_string(),
        ])
        .output();
    let text = out.stdout_str();
    let holder = text
        .lines()
        .find_map(|l| l.strip_prefix("holder "))
        .unwrap_or_else(|| panic!("the stand-in broker could not take the lock: {out}"))
        .to_string();
    assert!(
        text.contains("add-status 0"),
        "the add failed while a broker held the lock: {out}"
    );
    assert!(text.contains("holder-signal 9"), "{out}");
    let line = audit
        .wait_for(Duration::from_secs(10), |l| l.contains(" database-held "))
        .expect("no audit line for the held database");
    assert!(line.contains(&format!("holder-pid={holder}")), "{line}");
    assert!(line.contains("outcome=killed"), "{line}");
}
