//! Adds are not synced one by one: each registration is recorded in the database's
//! `StockadeUnsynced` table in the same transaction, and a background syncer clears it after a
//! `syncfs` (store-writer/src/durable.rs). These tests stop the store-writer hard before its
//! syncer ran (held with `STOCKADE_TEST_HOLD_SYNC`, honoured by debug builds only), do to the
//! store what a power cut does to contents that never reached the disk, and start the daemon
//! again: the damaged path must no longer be valid, the intact ones must be, and the audit
//! must say what was undone. Nix 2.8 must keep working on a database with the extra table.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use stockade_tests::sec::{instance_processes, stockade_with, AuditCollector};
use stockade_tests::{skip_unless_root, Daemon};

fn db_path(d: &Daemon) -> PathBuf {
    d.base_dir().join("nix/var/nix/db/db.sqlite")
}

/// The paths in `StockadeUnsynced`, read from the host (the daemon keeps running).
fn unsynced(d: &Daemon) -> Vec<String> {
    let conn = rusqlite::Connection::open(db_path(d)).expect("opening db.sqlite");
    conn.busy_timeout(Duration::from_secs(30)).unwrap();
    let mut st = conn
        .prepare("select path from StockadeUnsynced order by seq")
        .expect("StockadeUnsynced exists");
    let rows = st.query_map([], |r| r.get::<_, String>(0)).unwrap();
    rows.map(Result::unwrap).collect()
}

fn add(d: &Daemon, name: &str, contents: &str) -> String {
    let f = d.write_work_file(name, contents.as_bytes());
    d.run_ok(["nix-store", "--add", f.to_str().unwrap()])
}

fn valid(d: &Daemon, p: &str) -> bool {
    d.cmd("nix-store")
        .args(["--check-validity", p])
        .output()
        .success()
}

/// Kills the store-writer with SIGKILL (no last sync) and waits for the master to give up.
fn kill_store_writer(d: &mut Daemon) {
    let writers = instance_processes(d, "stockade-store-writer");
    assert_eq!(writers.len(), 1, "one store-writer: {writers:?}");
    kill(Pid::from_raw(writers[0].pid), Signal::SIGKILL).unwrap();
    let status = d.wait_exit(Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| !s.success()),
        "the master did not exit after its store-writer died: {status:?}"
    );
}

fn truncate(p: &Path) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(p, b"").unwrap();
}

/// Runs `nix-store args` on the store directly, as root, without a daemon (Nix 2.8's own
/// database code).
fn local(d: &Daemon, args: &[&str]) -> String {
    let out = d
        .cmd("nix-store")
        .args(args)
        .env("NIX_REMOTE", "local")
        .timeout(Duration::from_secs(120))
        .output();
    assert!(out.success(), "nix-store {args:?}: {out}");
    out.stdout_str().trim().to_string()
}

fn held_stockade(audit: &AuditCollector) -> Daemon {
    stockade_with(&format!("audit-socket = {}\n", audit.path().display()))
        .env("STOCKADE_TEST_HOLD_SYNC", "1")
        .start()
        .expect("stockade")
}

/// Asserts the syncer really was held (a release build ignores the knob).
fn expect_unsynced(d: &Daemon, paths: &[&String]) {
    let rows = unsynced(d);
    for p in paths {
        assert!(
            rows.contains(p),
            "{p} is not in StockadeUnsynced ({rows:?}); was the syncer held (debug build)?"
        );
    }
}

#[test]
fn a_path_damaged_by_an_unclean_stop_is_deregistered_at_the_next_start() {
    skip_unless_root!();
    let audit = AuditCollector::new();
    let mut d = held_stockade(&audit);
    let damaged = add(&d, "damaged.txt", "lost in the power cut\n");
    let intact = add(&d, "intact.txt", "reached the disk\n");
    let dir = d.write_work_file("tree/sub/file", b"in a tree\n");
    let tree = d.run_ok([
        "nix-store",
        "--add",
        dir.parent().unwrap().parent().unwrap().to_str().unwrap(),
    ]);
    expect_unsynced(&d, &[&damaged, &intact, &tree]);

    kill_store_writer(&mut d);
    truncate(&d.host_path(&damaged));
    d.start_again().expect("the daemon starts again");

    assert!(!valid(&d, &damaged), "{damaged} is still valid");
    assert!(valid(&d, &intact), "{intact} was dropped");
    assert!(valid(&d, &tree), "{tree} was dropped");
    let line = audit.wait_for(Duration::from_secs(30), |l| {
        l.contains("op=recover") && l.contains("outcome=invalidated") && l.contains(&damaged)
    });
    assert!(
        line.is_some(),
        "no audit line for {damaged}: {:?}",
        audit.lines()
    );
    assert!(
        audit
            .wait_for(Duration::from_secs(30), |l| l.contains("op=recover")
                && l.contains("outcome=finished")
                && l.contains("checked=3")
                && l.contains("invalidated=1"))
            .is_some(),
        "no summary line: {:?}",
        audit.lines()
    );
    assert!(unsynced(&d).is_empty(), "the table was not emptied");
    // The store is consistent, and the path can be added again.
    let check = d
        .cmd("nix-store")
        .args(["--verify", "--check-contents"])
        .output();
    assert!(check.success(), "{check}");
    assert_eq!(add(&d, "damaged.txt", "lost in the power cut\n"), damaged);
    assert!(valid(&d, &damaged));
}

/// A clean stop syncs: nothing is left to check at the next start.
#[test]
fn a_clean_stop_leaves_nothing_to_check() {
    skip_unless_root!();
    let audit = AuditCollector::new();
    let mut d = held_stockade(&audit);
    let p = add(&d, "a.txt", "a\n");
    expect_unsynced(&d, &[&p]);
    kill(Pid::from_raw(d.pid()), Signal::SIGTERM).unwrap();
    let status = d.wait_exit(Duration::from_secs(60));
    assert!(status.is_some(), "the daemon did not stop");
    // Read while no daemon runs: the database is closed, so open it read-write (WAL).
    assert!(unsynced(&d).is_empty(), "rows left after a clean stop");
    d.start_again().expect("the daemon starts again");
    assert!(valid(&d, &p));
}

/// Nix 2.8 itself (local store, no daemon in between) works on a database that has Stockade's
/// table with rows in it: it adds, verifies and deletes, including a path that is listed; Stockade's next start takes the collected path for gone, not damaged.
#[test]
fn nix_works_on_a_database_with_the_table() {
    skip_unless_root!();
    let audit = AuditCollector::new();
    let mut d = held_stockade(&audit);
    let p = add(&d, "collected.txt", "collected by Nix\n");
    expect_unsynced(&d, &[&p]);
    let f = d.write_work_file("by-nix.txt", b"added by Nix\n");
    let by_nix = local(&d, &["--add", f.to_str().unwrap()]);
    local(&d, &["--verify", "--check-contents"]);
    local(&d, &["--delete", &p]);
    assert!(!d.host_path(&p).exists());
    assert!(!valid(&d, &p));

    kill_store_writer(&mut d);
    d.start_again().expect("the daemon starts again");
    assert!(
        audit
            .wait_for(Duration::from_secs(30), |l| l.contains("op=recover")
                && l.contains("outcome=finished")
                && l.contains("checked=0")
                && l.contains("invalidated=0"))
            .is_some(),
        "{:?}",
        audit.lines()
    );
    assert!(unsynced(&d).is_empty());
    local(&d, &["--verify", "--check-contents"]);
    assert!(valid(&d, &by_nix));
}

/// Issue 20: a collection killed half-way (the store-writer stopped hard after its first batch
/// of deletions; the next batch may be invalidated and half removed) leaves a store in which
/// every registered path is whole and every root valid. The collector stalls there on
/// `STOCKADE_TEST_GC_STALL` (debug builds only).
#[test]
fn a_collection_killed_half_way_leaves_a_valid_store() {
    skip_unless_root!();
    let audit = AuditCollector::new();
    let mut d = stockade_with(&format!("audit-socket = {}\n", audit.path().display()))
        .env("STOCKADE_TEST_GC_STALL", "1")
        .start()
        .expect("stockade");
    let add_many = |what: &str, n: usize| -> Vec<String> {
        let mut out = Vec::new();
        let files: Vec<PathBuf> = (0..n)
            .map(|i| d.write_work_file(&format!("{what}/{i}"), format!("{what} {i}\n").as_bytes()))
            .collect();
        for chunk in files.chunks(500) {
            let o = d.cmd("nix-store").arg("--add").args(chunk).output();
            assert!(o.success(), "{o}");
            out.extend(o.stdout_str().lines().map(str::to_string));
        }
        out
    };
    let live = add_many("live", 40);
    let garbage = add_many("garbage", 1500);
    let roots = d.host_path("/nix/var/nix/gcroots");
    for (i, p) in live.iter().enumerate() {
        std::os::unix::fs::symlink(p, roots.join(format!("live-{i}"))).unwrap();
    }
    std::thread::scope(|s| {
        let gc = s.spawn(|| d.cmd("nix-store").arg("--gc").output());
        audit
            .wait_for(Duration::from_secs(120), |l| l.contains("op=gcDelete"))
            .expect("the collection deleted its first batch");
        let writers = instance_processes(&d, "stockade-store-writer");
        assert_eq!(writers.len(), 1, "one store-writer: {writers:?}");
        kill(Pid::from_raw(writers[0].pid), Signal::SIGKILL).unwrap();
        let o = gc.join().unwrap();
        assert!(!o.success(), "the collection was cut short: {o}");
    });
    let status = d.wait_exit(Duration::from_secs(60));
    assert!(status.is_some_and(|s| !s.success()), "{status:?}");
    d.start_again().expect("the daemon starts again");
    let v = d
        .cmd("nix-store")
        .args(["--verify", "--check-contents"])
        .output();
    assert!(v.success() && !v.stderr_str().contains("error"), "{v}");
    for p in &live {
        assert!(valid(&d, p), "root {p} lost");
    }
    // Stopped half-way: some garbage still registered, some no longer registered but still on
    // disk (invalidated, then the store-writer died before removing it).
    let o = d
        .cmd("nix-store")
        .args(["--check-validity", "--print-invalid"])
        .args(&garbage)
        .output();
    assert!(o.success(), "{o}");
    let invalid: std::collections::HashSet<String> =
        o.stdout_str().lines().map(str::to_string).collect();
    let left = garbage.len() - invalid.len();
    let stranded = invalid.iter().filter(|p| d.host_path(p).exists()).count();
    assert!(
        left > 0 && stranded > 0,
        "not stopped half-way: {left} registered, {stranded} unregistered on disk, of {}",
        garbage.len()
    );
}
