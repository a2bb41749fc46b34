//! A43: filling the store's file system. The instance's `/nix` is a small tmpfs of its own
//! (40 MiB, 4096 inodes) with `store-free-space-floor = 16M` and
//! `store-free-inodes-floor = 1024`: an untrusted build that fills it, with bytes or with
//! empty files, is stopped with the floor's message, audited, and its directories removed, so
//! that another untrusted user's add and build then succeed; an untrusted add that would go
//! below the floor is refused (audited) while a trusted user's same add is not. Needs root.

use std::path::Path;
use std::time::Duration;

use stockade_common::floor::FsFree;
use stockade_tests::sec::{stockade_with, AuditCollector};
use stockade_tests::{busybox_derivation, ensure_user, skip_unless_root, Daemon, User};

const FLOOR: u64 = 16 << 20;
const INODE_FLOOR: u64 = 1024;
/// Long enough that the test never waits for it with the floor in force; a filling build
/// that is not stopped sleeps this long, then succeeds with what it wrote.
const FILLER_SLEEP: u32 = 60;
const BUILD_TIMEOUT: Duration = Duration::from_secs(240);

fn start(audit: &AuditCollector) -> Daemon {
    stockade_with(&format!(
        "audit-socket = {}\nstore-free-space-floor = 16M\nstore-free-inodes-floor = {INODE_FLOOR}\n",
        audit.path().display()
    ))
    .nix_tmpfs("40m", 4096)
    .conf_line("trusted-users = root st-alice")
    .conf_line("sandbox = true")
    .start()
    .expect("stockade")
}

fn free(d: &Daemon) -> FsFree {
    FsFree::of_path(&d.host_path("/nix/store")).expect("statvfs of the instance's /nix")
}

fn build(d: &Daemon, user: &User, bb: &str, name: &str, script: &str) -> stockade_tests::RunOutput {
    let expr = busybox_derivation(bb, name, script);
    d.cmd("nix-build")
        .args(["--no-out-link", "-E", &expr])
        .as_user(user)
        .timeout(BUILD_TIMEOUT)
        .output()
}

fn work_file(d: &Daemon, name: &str, size: usize) -> String {
    let data: Vec<u8> = name.bytes().cycle().take(size).collect();
    let f = d.write_work_file(name, &data);
    std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    f.to_str().unwrap().to_string()
}

/// Bob (untrusted) adds a file and builds: both must succeed.
fn bob_adds_and_builds(d: &Daemon, bob: &User, bb: &str, tag: &str) {
    let f = work_file(d, &format!("bob-{tag}"), 1 << 20);
    let out = d.cmd("nix-store").args(["--add", &f]).as_user(bob).output();
    assert!(out.success(), "bob's add after {tag}: {out}");
    let out = build(
        d,
        bob,
        bb,
        &format!("a43-bob-{tag}"),
        "busybox echo bob > $out",
    );
    assert!(out.success(), "bob's build after {tag}: {out}");
}

fn no_build_dirs_left(d: &Daemon) {
    let builds = d.host_path("/nix/var/nix/builds");
    let left: Vec<String> = std::fs::read_dir(&builds)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("nix-build-"))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "build directories left: {left:?}");
}

#[test]
fn a43_a_build_that_fills_the_store_is_stopped_and_others_go_on() {
    skip_unless_root!();
    let bob = ensure_user("st-bob").unwrap();
    let mallory = ensure_user("st-mallory").unwrap();
    let audit = AuditCollector::new();
    let d = start(&audit);
    let bb = d.add_busybox();
    assert!(free(&d).bytes_free > FLOOR + (8 << 20), "{:?}", free(&d));

    // Bytes: write until the disk is full, then stay, writing no log (a log line the full
    // file system refuses would end the build by itself).
    let script = format!(
        "busybox dd if=/dev/zero of=$out bs=65536 2>/dev/null; exec busybox sleep {FILLER_SLEEP}"
    );
    let out = build(&d, &mallory, &bb, "a43-fill-bytes", &script);
    assert!(!out.success(), "the filling build succeeded: {out}");
    let err = out.stderr_str();
    assert!(
        err.contains("was stopped: the store's file system has")
            && err.contains("store-free-space-floor"),
        "{out}"
    );
    let line = audit
        .wait_for(Duration::from_secs(30), |l| {
            l.contains("limit=store-free-space-floor") && l.contains("a43-fill-bytes")
        })
        .expect("the stop is audited");
    assert!(line.contains("floor=16777216"), "{line}");
    // Its directories are gone, and the space with them.
    no_build_dirs_left(&d);
    assert!(free(&d).bytes_free > FLOOR + (8 << 20), "{:?}", free(&d));
    bob_adds_and_builds(&d, &bob, &bb, "bytes");

    // Inodes: empty files until none is left (a builtin's redirection: no process per file).
    let script = format!(
        "busybox mkdir $out; i=0; while echo -n > $out/f$i; do i=$((i+1)); done 2>/dev/null; \
         busybox echo made $i; exec busybox sleep {FILLER_SLEEP}"
    );
    let out = build(&d, &mallory, &bb, "a43-fill-inodes", &script);
    assert!(!out.success(), "the inode-filling build succeeded: {out}");
    let err = out.stderr_str();
    assert!(
        err.contains("was stopped: the store's file system has")
            && err.contains("inodes free")
            && err.contains("store-free-inodes-floor"),
        "{out}"
    );
    audit
        .wait_for(Duration::from_secs(30), |l| {
            l.contains("limit=store-free-inodes-floor") && l.contains("a43-fill-inodes")
        })
        .expect("the stop is audited");
    no_build_dirs_left(&d);
    assert!(free(&d).inodes_free > INODE_FLOOR + 1000, "{:?}", free(&d));
    bob_adds_and_builds(&d, &bob, &bb, "inodes");

    let out = d
        .cmd("nix-store")
        .args(["--verify", "--check-contents"])
        .output();
    assert!(out.success(), "{out}");
    assert!(!out.stderr_str().contains("modified"), "{out}");
}

#[test]
fn a43_an_untrusted_add_that_would_cross_the_floor_is_refused() {
    skip_unless_root!();
    let alice = ensure_user("st-alice").unwrap();
    let mallory = ensure_user("st-mallory").unwrap();
    let audit = AuditCollector::new();
    let d = start(&audit);
    // Leaves 4 MiB less than the floor once added; small enough to arrive in memory.
    let room = free(&d).bytes_free;
    assert!(room > FLOOR + (8 << 20), "{:?}", free(&d));
    let size = usize::try_from(room - FLOOR + (4 << 20)).unwrap();
    let f = work_file(&d, "a43-big", size);
    let add = |user: &User| {
        d.cmd("nix-store")
            .args(["--add", &f])
            .as_user(user)
            .output()
    };
    let out = add(&mallory);
    assert!(
        !out.success(),
        "mallory's add past the floor went through: {out}"
    );
    assert!(
        out.stderr_str().contains("store-free-space-floor")
            && out.stderr_str().contains("kept for trusted users"),
        "{out}"
    );
    audit
        .wait_for(Duration::from_secs(30), |l| {
            l.contains("outcome=limit") && l.contains("limit=store-free-space-floor")
        })
        .expect("the refusal is audited");
    assert!(
        free(&d).bytes_free >= room - (1 << 20),
        "the refused add left its data"
    );
    // A trusted user may use the room the floor keeps.
    let out = add(&alice);
    assert!(out.success(), "alice's add: {out}");
    assert!(free(&d).bytes_free < FLOOR, "{:?}", free(&d));
    // Below the floor now: any untrusted add is refused, even a small one.
    let small = work_file(&d, "a43-small", 1000);
    let out = d
        .cmd("nix-store")
        .args(["--add", &small])
        .as_user(&mallory)
        .output();
    assert!(!out.success(), "a small add below the floor: {out}");
    assert!(out.stderr_str().contains("store-free-space-floor"), "{out}");
    d.run_ok(["nix-store", "--verify", "--check-contents"]);
    assert!(Path::new(&d.host_path("/nix/store")).is_dir());
}
