//! Attacks on build directories and build uids through a real `nix-build` (SECURITY.md V3, V5,
//! V7, V9, A46). Each V test is shown to fail with its defence switched off
//! (scripts/defences.txt). Needs root; fails loudly in CI without it.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use stockade_tests::builddir::{
    add_swapper, build_uid, expr, owned_by, pids_of_uid, wait_for_entry, BUILDS_DIR,
};
use stockade_tests::fsutil::tree_fingerprint;
use stockade_tests::sec::stockade_with;
use stockade_tests::{ensure_user, skip_unless_root, Daemon};

fn start(extra_stockade_conf: &str) -> Daemon {
    stockade_with(extra_stockade_conf)
        .conf_line("sandbox = true")
        .start()
        .expect("stockade")
}

/// A canary directory of the test's own (root's, `0644` files), outside everything the daemon
/// owns.
fn canary(d: &Daemon, name: &str) -> std::path::PathBuf {
    for f in ["precious-a", "precious-b", "inner/precious-c"] {
        d.write_work_file(&format!("{name}/{f}"), b"precious\n");
    }
    d.work_dir().join(name)
}

/// Lets a builder waiting on the fifo at `.0` go on, also when the test panics first.
struct Release(std::path::PathBuf);

impl Drop for Release {
    fn drop(&mut self) {
        use std::os::unix::fs::OpenOptionsExt;
        let f = fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(&self.0);
        if let Ok(mut f) = f {
            let _ = std::io::Write::write_all(&mut f, b"go\n");
        }
    }
}

/// CVE-2024-38531: the builder opens its build directory to everyone (`chmod 0777`) and
/// waits; `mallory` must reach nothing in it, neither by the daemon's name for it nor through
/// the builder's `/proc/<pid>/cwd` and `/proc/<pid>/root`. The helper's top directory
/// (`0700`) stands in the way of the first; the kernel's ptrace check of the second.
#[test]
fn v3_a_world_reachable_build_dir_cannot_be_hijacked() {
    skip_unless_root!();
    let mallory = ensure_user("st-mallory").unwrap();
    let d = start("");
    let bb = d.add_busybox();
    let name = "v3-opened";
    let script = "busybox chmod 0777 $NIX_BUILD_TOP; cd $NIX_BUILD_TOP; echo secret > payload; \
                  busybox chmod 0666 payload; busybox mkfifo go; busybox chmod 0666 go; \
                  busybox cat go; exit 1";
    let e = expr(&bb, name, script, "");
    let builds = d.host_path(BUILDS_DIR);
    std::thread::scope(|s| {
        let build = s.spawn(|| {
            d.cmd("nix-build")
                .args(["--no-out-link", "-E", &e])
                .output()
        });
        let top = wait_for_entry(&builds, &format!("nix-build-{name}.drv-"), "build/go");
        let _release = Release(top.join("build/go"));
        let uid = build_uid(&d, name);
        let pid = *pids_of_uid(uid)
            .first()
            .expect("a process of the build uid");
        let logged = format!(
            "{BUILDS_DIR}/{}/build",
            top.file_name().unwrap().to_string_lossy()
        );
        let probe = format!(
            "for at in {logged} /proc/{pid}/cwd /proc/{pid}/root/build; do \
               ls $at >/dev/null 2>&1 && echo \"listed $at\"; \
               cat $at/payload >/dev/null 2>&1 && echo \"read $at\"; \
               (echo hijacked > $at/payload) 2>/dev/null && echo \"wrote $at\"; \
               touch $at/planted 2>/dev/null && echo \"planted $at\"; \
             done; echo end"
        );
        let seen = d.cmd("sh").args(["-c", &probe]).as_user(&mallory).output();
        let payload = fs::read_to_string(top.join("build/payload")).unwrap();
        let planted = top.join("build/planted").exists();
        drop(_release);
        let built = build.join().unwrap();
        assert!(!built.success(), "{built}");
        assert_eq!(
            seen.stdout_str().trim(),
            "end",
            "mallory reached it: {seen}"
        );
        assert_eq!(payload, "secret\n");
        assert!(!planted, "mallory planted a file in the build directory");
    });
}

/// CVE-2025-46415: a builder leaves a process that keeps exchanging directories of its build
/// directory with symlinks to a canary outside while the build ends and the directory is
/// deleted. The pid namespace ends the swapper with the builder, and the deletion works from
/// directory descriptors; with both off (`without-pidns`, `without-fd-delete`) the deletion
/// by name walks into the canary. Bounded: 20 rounds of 256 pairs each.
#[test]
fn v5_build_dir_deletion_raced_with_symlink_swaps_deletes_nothing_outside() {
    skip_unless_root!();
    let d = start("");
    let bb = d.add_busybox();
    let sw = add_swapper(&d);
    let canary = canary(&d, "v5-canary");
    let before = tree_fingerprint(&canary).unwrap();
    let builds = d.host_path(BUILDS_DIR);
    let mut left = Vec::new();
    for round in 0..20 {
        let script = format!(
            "cd $NIX_BUILD_TOP && $SW/bin/swapper {} 256 && exit 1",
            canary.display()
        );
        let extra = format!("SW = builtins.storePath \"{sw}\"; round = \"{round}\";");
        let out = d
            .cmd("nix-build")
            .args([
                "--no-out-link",
                "-E",
                &expr(&bb, "v5-swap", &script, &extra),
            ])
            .fails();
        assert!(out.stderr_str().contains("swapper: swapping"), "{out}");
        assert_eq!(
            tree_fingerprint(&canary).unwrap_or_default(),
            before,
            "round {round}: the canary outside the build directory changed"
        );
        left.extend(
            fs::read_dir(&builds)
                .unwrap()
                .flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with("nix-build-v5-swap")
                })
                .map(|e| e.path()),
        );
    }
    assert!(left.is_empty(), "{left:?} left behind");
}

/// CVE-2025-52991: build directories used to be made under a predictable name in `/tmp`.
/// `mallory` pre-creates likely names, with a planted file, in the builds directory (which she
/// must not be able to write) and in `/tmp` (Nix's old place); the build must start in a
/// fresh directory of its own. (Stockade has no `build-dir` setting, so there is no start
/// check to test.)
#[test]
fn v7_pre_created_build_directories_are_not_used() {
    skip_unless_root!();
    let mallory = ensure_user("st-mallory").unwrap();
    let d = start("");
    let bb = d.add_busybox();
    let name = format!("v7-{}", std::process::id());
    let mut plant = String::new();
    for at in [BUILDS_DIR, "/tmp"] {
        for n in 0..4 {
            let top = format!("{at}/nix-build-{name}.drv-{n}");
            plant += &format!(
                "mkdir {top} 2>/dev/null && mkdir {top}/build {top}/store && \
                 echo planted > {top}/build/planted && chmod -R 0777 {top} && \
                 echo \"made {top}\"; "
            );
        }
    }
    let made = d.cmd("sh").args(["-c", &plant]).as_user(&mallory).output();
    let script = "cd $NIX_BUILD_TOP; exec > $out; busybox ls -A; \
                  [ -e planted ] && echo found planted; busybox stat -c '%u %a' .";
    let out = d.build_ok(&expr(&bb, &name, script, ""));
    let report = fs::read_to_string(d.host_path(&out)).unwrap();
    let rm = format!("rm -rf /tmp/nix-build-{name}.drv-*");
    d.cmd("sh").args(["-c", &rm]).as_user(&mallory).ok();
    eprintln!("mallory: {made}\nthe builder saw:\n{report}");
    assert!(!report.contains("planted"), "{report}");
    // Its own directory, owned by the build user (1000 inside) and private.
    assert!(report.trim_end().ends_with("1000 700"), "{report}");
    assert!(
        !made.stdout_str().contains(BUILDS_DIR),
        "mallory made entries in the builds directory: {made}"
    );
    let ours: Vec<_> = fs::read_dir(d.host_path(BUILDS_DIR))
        .unwrap()
        .flatten()
        .filter(|e| e.metadata().is_ok_and(|m| m.uid() == mallory.uid))
        .collect();
    assert!(ours.is_empty(), "{ours:?}");
}

/// CVE-2025-52993: a race in chowning the build tree made files outside it owned by the build
/// uid. The builder leaves symlinks to a canary (a file and a directory) and a swapper
/// exchanging directories with symlinks, then fails with `keep-failed`, so the helper both
/// deletes (staging) and seals (the kept directory) a tree shaped by the builder. Afterwards
/// nothing in the test's directories or `/tmp` is owned by the build uid except the kept
/// directory's own contents, and the canary keeps its owner and mode.
#[test]
fn v9_symlink_swaps_never_make_outside_files_the_build_uids() {
    skip_unless_root!();
    let d = start("");
    let bb = d.add_busybox();
    let sw = add_swapper(&d);
    let canary = canary(&d, "v9-canary");
    let file = canary.join("precious-a");
    let before = tree_fingerprint(&canary).unwrap();
    let script = format!(
        "cd $NIX_BUILD_TOP; busybox ln -s {c}/precious-a link; busybox ln -s {c} dirlink; \
         busybox mkdir sub; busybox ln -s {c}/precious-a sub/link; busybox chmod 0777 sub; \
         $SW/bin/swapper {c} 64; exit 1",
        c = canary.display()
    );
    let extra = format!("SW = builtins.storePath \"{sw}\";");
    let out = d
        .cmd("nix-build")
        .args(["--no-out-link", "--keep-failed", "-E"])
        .arg(expr(&bb, "v9-swap", &script, &extra))
        .fails();
    assert!(
        out.stderr_str().contains("keeping build directory"),
        "{out}"
    );
    let uid = build_uid(&d, "v9-swap");
    let builds = d.host_path(BUILDS_DIR);
    let mut outside = owned_by(uid, d.base_dir(), &builds, 12);
    outside.extend(owned_by(uid, Path::new("/tmp"), &builds, 4));
    assert!(outside.is_empty(), "owned by build uid {uid}: {outside:?}");
    let md = fs::metadata(&file).unwrap();
    assert_eq!((md.uid(), md.mode() & 0o7777), (0, 0o644));
    assert_eq!(tree_fingerprint(&canary).unwrap(), before);
}

/// A46: one build uid, so `bob`'s build must reuse the uid of `mallory`'s, which left a
/// detached process and files behind (kept with `keep-failed`). Before the uid is given out
/// again no process of it is left, and `bob`'s builder finds nothing of mallory's. Two
/// defences stand in the way (the builder's pid namespace, the cgroup killed before the uid
/// is released), so no single switch makes this fail.
#[test]
fn a46_a_build_uid_reused_across_users_inherits_nothing() {
    skip_unless_root!();
    let mallory = ensure_user("st-mallory").unwrap();
    let bob = ensure_user("st-bob").unwrap();
    let uid = 873_000_000 + std::process::id() % 60_000;
    let d = start(&format!("build-uid-range = {uid}-{uid}\n"));
    let bb = d.add_busybox();
    let leave = "cd $NIX_BUILD_TOP; echo m4ll0ry > left-behind; \
                 (echo m4ll0ry > /tmp/left-behind) 2>/dev/null; \
                 busybox setsid busybox sh -c 'busybox sleep 1000' </dev/null >/dev/null 2>&1 & \
                 busybox nohup busybox sleep 1001 </dev/null >/dev/null 2>&1 & exit 1";
    d.cmd("nix-build")
        .args(["--no-out-link", "--keep-failed", "-E"])
        .arg(expr(&bb, "a46-mallory", leave, ""))
        .as_user(&mallory)
        .fails();
    assert_eq!(build_uid(&d, "a46-mallory"), uid);
    let left = pids_of_uid(uid);
    assert!(
        left.is_empty(),
        "processes of build uid {uid} left: {left:?}"
    );
    // Nothing of this text may appear in what it finds (`ps` shows names, not arguments).
    let look = "exec > $out 2>&1; busybox ps -o pid,comm; \
                busybox find / -path /proc -prune -o -name 'left-*' -print; \
                busybox grep -rl m4ll0r[y] /build /tmp 2>/dev/null; echo end";
    let out = d
        .cmd("nix-build")
        .args(["--no-out-link", "-E", &expr(&bb, "a46-bob", look, "")])
        .as_user(&bob)
        .ok();
    assert_eq!(build_uid(&d, "a46-bob"), uid, "the uid was not reused");
    let report = fs::read_to_string(d.host_path(out.trim())).unwrap();
    eprintln!("bob's builder saw:\n{report}");
    assert!(!report.contains("sleep"), "{report}");
    assert!(!report.contains("left-behind"), "{report}");
    assert!(!report.contains("m4ll0ry"), "{report}");
    assert!(report.trim_end().ends_with("end"), "{report}");
}
