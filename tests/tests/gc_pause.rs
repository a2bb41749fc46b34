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
use stockade_tests::{ensure_user, skip_unless_root, Daemon, RunOutput, User};

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

/// Bob's `nix-store --gc`, to run paused.
fn gc<'a>(d: &'a Daemon, bob: &'a User) -> impl FnOnce() -> RunOutput + Send + 'a {
    move || d.cmd("nix-store").arg("--gc").as_user(bob).output()
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
    let (o, conn) = gcpause::while_paused(&d, AFTER_ROOTS, gc(&d, &bob), || {
        let mut conn = RawConn::session(&d, Some(&mallory));
        conn.add_temp_root(&held)
            .unwrap()
            .expect("mallory's temp root");
        conn
    });
    assert!(o.success(), "{o}");
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
    let (o, ()) = gcpause::while_paused(&d, BETWEEN_ROOTS, gc(&d, &bob), || {
        std::os::unix::fs::symlink(&kept, &link).unwrap();
        std::os::unix::fs::lchown(&link, Some(mallory.uid), Some(mallory.gid)).unwrap();
        let r = conn
            .add_indirect_root(link.to_str().unwrap().as_bytes())
            .unwrap();
        assert!(r.is_ok(), "{}", r.error("AddIndirectRoot"));
        drop(conn);
        gcpause::wait_unrooted(&d, &kept);
    });
    assert!(o.success(), "{o}");
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
    let (o, (conn, added)) = gcpause::while_paused(&d, BEFORE_DELETE, gc(&d, &bob), || {
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
        (conn, added.expect("the added path"))
    });
    assert!(o.success(), "{o}");
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

/// Mallory builds while bob's collection has read every root: her build's output, registered
/// and rooted by her out-link after the collector read the roots, survives (the collector
/// heard of its temp root; and a path registered after it read the database counts as alive).
/// Her build's input, which nothing roots, was held while the build ran.
#[test]
fn a28_a_build_finished_mid_collection_keeps_its_output() {
    skip_unless_root!();
    let bob = ensure_user("st-bob").unwrap();
    let mallory = ensure_user("st-mallory").unwrap();
    let libexec = gcpause::libexec();
    let d = gcpause::stockade(libexec.path())
        .conf_line("sandbox = true")
        .start()
        .expect("stockade");
    let bb = d.add_busybox();
    let expr = stockade_tests::busybox_derivation(&bb, "a28-built", "echo a28 built > $out");
    let links = d.work_dir().join("a28-build-links");
    std::fs::create_dir_all(&links).unwrap();
    std::os::unix::fs::chown(&links, Some(mallory.uid), Some(mallory.gid)).unwrap();
    let link = links.join("result").display().to_string();
    let (o, b) = gcpause::while_paused(&d, AFTER_ROOTS, gc(&d, &bob), || {
        d.cmd("nix-build")
            .as_user(&mallory)
            .args(["--out-link", &link, "-E", &expr])
            .output()
    });
    assert!(o.success(), "{o}");
    assert!(b.success(), "{b}");
    let out = b.stdout_str().trim().to_string();
    assert!(valid(&d, &out), "{out}, built by mallory, was deleted");
    assert_eq!(
        std::fs::read_to_string(d.host_path(&out)).unwrap(),
        "a28 built\n"
    );
    verify_clean(&d);
    // Rooted by her out-link, it outlives her connection.
    collect(&d, &bob);
    assert!(
        valid(&d, &out),
        "{out}, rooted by her out-link, was deleted"
    );
}
