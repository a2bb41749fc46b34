//! A28: a collection raced by an untrusted user, made deterministic. The store-writer is built
//! with the test-only feature `test-gc-pause` (tests/src/gcpause.rs): bob's collection stops at
//! a point the test arms; meanwhile mallory takes temp roots, makes a permanent root, adds a
//! path; then the collection goes on. Nothing she holds, or added, or rooted may be deleted,
//! and the store verifies clean. Temp roots live as long as her connection: once it is closed
//! the next collection deletes what only they held.
//!
//! Needs root; fails loudly in CI without it.

use stockade_tests::gcpause::{self, AFTER_ROOTS, BEFORE_DELETE, BETWEEN_ROOTS};
use stockade_tests::raw::RawConn;
use stockade_tests::{ensure_user, skip_unless_root, Daemon, User};

fn valid(d: &Daemon, p: &str) -> bool {
    d.cmd("nix-store")
        .args(["--check-validity", p])
        .output()
        .success()
        && d.host_path(p).exists()
}

/// A new unrooted path of `tag` (added by root: nobody holds it).
fn garbage(d: &Daemon, tag: &str) -> String {
    let f = d.write_work_file(&format!("{tag}.txt"), format!("{tag}\n").as_bytes());
    d.run_ok(["nix-store", "--add", f.to_str().unwrap()])
}

/// Bob's `nix-store --gc`, asserted to succeed.
fn collect(d: &Daemon, bob: &User) {
    let o = d.cmd("nix-store").arg("--gc").as_user(bob).output();
    assert!(o.success(), "{o}");
}

fn verify_clean(d: &Daemon) {
    let v = d
        .cmd("nix-store")
        .args(["--verify", "--check-contents"])
        .output();
    assert!(v.success() && !v.stderr_str().contains("error"), "{v}");
}

/// Mallory's AddTempRoot, made while bob's collection has read every root (and the database),
/// still holds its path: the collector hears of it (the store-writer's own sessions tell it
/// directly, `note_temp_root`). It holds the path for later collections too, until her
/// connection closes.
#[test]
fn a28_a_temp_root_taken_mid_collection_holds_its_path_while_her_connection_lives() {
    skip_unless_root!();
    let bob = ensure_user("st-bob").unwrap();
    let mallory = ensure_user("st-mallory").unwrap();
    let libexec = gcpause::libexec();
    let d = gcpause::stockade(libexec.path()).start().expect("stockade");
    let held = garbage(&d, "a28-held");
    let other = garbage(&d, "a28-other");
    gcpause::arm(&d, AFTER_ROOTS);
    let conn = std::thread::scope(|s| {
        let gc = s.spawn(|| d.cmd("nix-store").arg("--gc").as_user(&bob).output());
        gcpause::wait_paused(&d, AFTER_ROOTS, &gc);
        let mut conn = RawConn::session(&d, Some(&mallory));
        conn.add_temp_root(&held)
            .unwrap()
            .expect("mallory's temp root");
        gcpause::release(&d, AFTER_ROOTS);
        let o = gc.join().unwrap();
        assert!(o.success(), "{o}");
        assert!(
            !o.stderr_str().contains(&format!("deleting '{held}'")),
            "{o}"
        );
        conn
    });
    assert!(valid(&d, &held), "{held}, held by mallory, was deleted");
    assert!(!valid(&d, &other), "{other}, held by no one, survived");
    // Her connection lives: a later collection keeps it too.
    collect(&d, &bob);
    assert!(
        valid(&d, &held),
        "{held} was deleted while her connection lives"
    );
    verify_clean(&d);
    // Closed, it holds nothing.
    drop(conn);
    gcpause::wait_unrooted(&d, &held);
    collect(&d, &bob);
    assert!(!valid(&d, &held), "{held} outlived her connection");
    verify_clean(&d);
}

/// Mallory holds a temp root on a path; bob's collection reads one kind of roots; she makes a
/// permanent (indirect) root for the path and closes her connection, dropping the temp root;
/// the collection reads the other kind. Read temp roots first, the path is kept by one or the
/// other; in Nix's order (permanent first, `without-a28`) it is held by neither when each is
/// read, and deleted.
#[test]
fn a28_a_root_made_between_the_collectors_root_scans_is_not_missed() {
    skip_unless_root!();
    let bob = ensure_user("st-bob").unwrap();
    let mallory = ensure_user("st-mallory").unwrap();
    let libexec = gcpause::libexec();
    let d = gcpause::stockade(libexec.path()).start().expect("stockade");
    let kept = garbage(&d, "a28-rooted");
    let links = d.work_dir().join("a28-links");
    std::fs::create_dir_all(&links).unwrap();
    std::os::unix::fs::chown(&links, Some(mallory.uid), Some(mallory.gid)).unwrap();
    let link = links.join("result");
    let mut conn = RawConn::session(&d, Some(&mallory));
    conn.add_temp_root(&kept)
        .unwrap()
        .expect("mallory's temp root");
    gcpause::arm(&d, BETWEEN_ROOTS);
    std::thread::scope(|s| {
        let gc = s.spawn(|| d.cmd("nix-store").arg("--gc").as_user(&bob).output());
        gcpause::wait_paused(&d, BETWEEN_ROOTS, &gc);
        std::os::unix::fs::symlink(&kept, &link).unwrap();
        std::os::unix::fs::lchown(&link, Some(mallory.uid), Some(mallory.gid)).unwrap();
        let r = conn
            .add_indirect_root(link.to_str().unwrap().as_bytes())
            .unwrap();
        assert!(r.is_ok(), "{}", r.error("AddIndirectRoot"));
        drop(conn);
        gcpause::wait_unrooted(&d, &kept);
        gcpause::release(&d, BETWEEN_ROOTS);
        let o = gc.join().unwrap();
        assert!(o.success(), "{o}");
    });
    assert!(
        valid(&d, &kept),
        "{kept}, rooted by mallory during the collection, was deleted"
    );
    verify_clean(&d);
}

/// Mallory adds a path that refers to garbage the collection has already decided to delete
/// (paused before it invalidates them), and a path of her own: the garbage she now refers to
/// is kept (its deletion is refused in the database: a referrer exists), and her new path is
/// kept while her connection holds it.
#[test]
fn a28_a_path_added_mid_collection_keeps_the_garbage_it_refers_to() {
    skip_unless_root!();
    let bob = ensure_user("st-bob").unwrap();
    let mallory = ensure_user("st-mallory").unwrap();
    let libexec = gcpause::libexec();
    let d = gcpause::stockade(libexec.path()).start().expect("stockade");
    let referred = garbage(&d, "a28-referred");
    let other = garbage(&d, "a28-doomed");
    gcpause::arm(&d, BEFORE_DELETE);
    let (conn, added) = std::thread::scope(|s| {
        let gc = s.spawn(|| d.cmd("nix-store").arg("--gc").as_user(&bob).output());
        gcpause::wait_paused(&d, BEFORE_DELETE, &gc);
        let mut conn = RawConn::session(&d, Some(&mallory));
        let (r, added) = conn
            .add_to_store(
                "a28-referrer",
                "text:sha256",
                &[referred.as_str()],
                referred.as_bytes(),
            )
            .unwrap();
        assert!(r.is_ok(), "{}", r.error("AddToStore"));
        gcpause::release(&d, BEFORE_DELETE);
        let o = gc.join().unwrap();
        assert!(o.success(), "{o}");
        (conn, added.expect("the added path"))
    });
    assert!(
        valid(&d, &added),
        "{added}, just added by mallory, was deleted"
    );
    assert!(
        valid(&d, &referred),
        "{referred}, referred to by {added}, was deleted"
    );
    assert!(!valid(&d, &other), "{other}, held by no one, survived");
    verify_clean(&d);
    drop(conn);
    gcpause::wait_unrooted(&d, &added);
    collect(&d, &bob);
    assert!(!valid(&d, &added) && !valid(&d, &referred));
    verify_clean(&d);
}
