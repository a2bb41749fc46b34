//! The parts of SECURITY.md's build entries that the other build tests leave out, through a
//! real `nix-build` against Stockade, mostly as the untrusted `mallory`: a failing build's
//! output (V8), symlinks at every temporary name of a fixed output's copy (V2), mallory
//! polling the store while a builder tries setuid bits (V15), hard links from `$out` (A39), a
//! mount over `$out` (A41), `builtin:fetchurl` of a closure path (A48) and `__noChroot` under
//! `sandbox = relaxed` (A49). Needs root; fails loudly in CI without it.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use stockade_tests::builddir::{build_uid, expr, owned_by, wait_for_entry, BUILDS_DIR};
use stockade_tests::sec::{stockade_with, store_files, wait_staging_gone, STAGING_CLEANUP};
use stockade_tests::{ensure_user, nix_string, skip_unless_root, Daemon, User};

fn start(sandbox: &str) -> Daemon {
    stockade_with("")
        .conf_line(&format!("sandbox = {sandbox}"))
        .start()
        .expect("stockade")
}

fn mallory() -> User {
    ensure_user("st-mallory").expect("user st-mallory")
}

/// The output path `nix-instantiate` gives `e`'s derivation (as root, before any build).
fn out_path(d: &Daemon, e: &str) -> String {
    let drv = d.run_ok(["nix-instantiate", "-E", e]);
    d.run_ok(["nix-store", "-q", "--outputs", &drv])
}

/// `root` (unless `below`) and the entries below it (not following symlinks) that are
/// writable by group or others, or setuid or setgid.
fn loose_entries(root: &Path, below: bool) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(md) = fs::symlink_metadata(root) else {
        return out;
    };
    if !below && !md.file_type().is_symlink() && md.mode() & 0o6022 != 0 {
        out.push(format!("{} {:o}", root.display(), md.mode()));
    }
    if md.is_dir() {
        for e in fs::read_dir(root).into_iter().flatten().flatten() {
            out.extend(loose_entries(&e.path(), false));
        }
    }
    out
}

/// The build directories of `name`'s builds, once there are `want` of them (a finished
/// build's is removed just after its client hears the result), or a panic after a while.
fn build_tops(d: &Daemon, name: &str, want: usize) -> Vec<PathBuf> {
    let builds = d.host_path(BUILDS_DIR);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let tops: Vec<PathBuf> = fs::read_dir(&builds)
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("nix-build-{name}"))
            })
            .map(|e| e.path())
            .collect();
        if tops.len() == want {
            return tops;
        }
        assert!(Instant::now() < deadline, "{name}: {tops:?}, not {want}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---- V8: a failing build's output ------------------------------------------------------------

/// V8 (CVE-2025-52992): mallory's builder writes `$out/x`, a world-writable file and
/// directory and tries a setuid one, then fails, with and without `keep-failed`. Afterwards
/// the output path does not exist, no staging directory (the helper's or the store-writer's)
/// is left, nothing in the store or the builds directory belongs to the build uid or mallory,
/// is group/world-writable or setuid, and mallory can write nowhere there.
#[test]
fn v8_a_failing_builds_output_leaves_nothing_modifiable() {
    skip_unless_root!();
    let mallory = mallory();
    let d = start("true");
    let bb = d.add_busybox();
    let script = "busybox mkdir $out; echo x > $out/x; echo open > $out/open; \
                  busybox chmod 0666 $out/open; busybox mkdir $out/dir; \
                  busybox chmod 0777 $out/dir $out; echo s > $out/s; \
                  busybox chmod 4755 $out/s 2>/dev/null; echo v8-wrote; exit 1";
    for keep in [false, true] {
        let name = format!("v8-failing-{keep}");
        let e = expr(&bb, &name, script, "");
        let out = out_path(&d, &e);
        let mut cmd = d.cmd("nix-build").args(["--no-out-link", "-E", &e]);
        if keep {
            cmd = cmd.arg("--keep-failed");
        }
        let run = cmd.as_user(&mallory).fails();
        assert!(run.stderr_str().contains("v8-wrote"), "{run}");
        assert_eq!(
            run.stderr_str().contains("keeping build directory"),
            keep,
            "{run}"
        );
        assert!(!d.host_path(&out).exists(), "{out} exists after a failure");
        assert_eq!(wait_staging_gone(&d, STAGING_CLEANUP), Vec::<String>::new());
        let uid = build_uid(&d, &name);
        // Only a kept build directory stays, and without its staging directory.
        let tops = build_tops(&d, &name, usize::from(keep));
        for top in &tops {
            assert!(!top.join("store").exists(), "{} kept", top.display());
        }
        let store = d.host_path(&d.store_dir());
        for who in [uid, mallory.uid] {
            let owned = owned_by(who, &store, Path::new("/nonexistent"), 8);
            assert!(owned.is_empty(), "uid {who} owns {owned:?}");
        }
        let loose = loose_entries(&store, true);
        assert!(loose.is_empty(), "{loose:?}");
        for top in &tops {
            let loose = loose_entries(top, true);
            assert!(loose.is_empty(), "{loose:?}");
        }
        // Mallory's own view: nothing she may write, nothing named after the output.
        let probe = format!(
            "find {s} {BUILDS_DIR} -writable 2>/dev/null; \
             touch {out} {out}/x 2>/dev/null && echo 'touched {out}'; \
             ls -d {s}/*-{name}* 2>/dev/null | grep -v '\\.drv$'; echo end",
            s = d.store_dir()
        );
        let seen = d.cmd("sh").args(["-c", &probe]).as_user(&mallory).output();
        assert_eq!(seen.stdout_str().trim(), "end", "{name}: {seen}");
    }
}

// ---- V2: symlinks at the temporary names of a fixed output's copy ---------------------------

/// A canary file of root's (`0644`) and a fingerprint of it: contents, owner, mode, links,
/// inode, modification time.
fn canary(d: &Daemon, rel: &str, text: &[u8]) -> (PathBuf, String) {
    let p = d.write_work_file(rel, text);
    (p.clone(), fingerprint(&p))
}

fn fingerprint(p: &Path) -> String {
    let md = fs::symlink_metadata(p).expect("canary");
    let data = fs::read(p).unwrap_or_default();
    format!(
        "{:?} {} {} {:o} {} {} {}",
        data,
        md.uid(),
        md.gid(),
        md.mode(),
        md.nlink(),
        md.ino(),
        md.mtime_nsec() + md.mtime() * 1_000_000_000
    )
}

/// V2 (CVE-2026-39860): a fixed-output builder plants symlinks to a canary at every name a
/// copy of its output might write through (`$out.tmp`, `$out.lock`, `$out.chroot`, `.tmp`,
/// `tmp`, a store-writer staging name, in its store directory and its build directory),
/// writes its right output and exits 0. The output is registered with its contents, the
/// canary is untouched, and none of those names reached the store; mallory cannot plant them
/// in the host's store either. (Stockade's copy writes
/// only in the store-writer's own staging directory; builtin:fetchurl writes `$out` alone,
/// with `O_EXCL|O_NOFOLLOW`.) Then the CVE's own shape, `$out` itself a symlink to the canary
/// with the canary's hash, is refused as not a regular file and no store path holds the
/// canary's contents; with the planted link followed (`without-nofollow`) the refusal is the
/// store-writer's Landlock's (`Permission denied`) instead.
#[test]
fn v2_symlinks_at_the_copys_temporary_names_touch_nothing() {
    skip_unless_root!();
    let mallory = mallory();
    let d = start("true");
    let bb = d.add_busybox();
    let (canary, before) = canary(&d, "v2/canary", b"v2 canary contents\n");
    let hash_of = |text: &[u8]| {
        let f = d.write_work_file("v2/hashme", text);
        d.run_ok([
            "nix-hash",
            "--type",
            "sha256",
            "--flat",
            f.to_str().unwrap(),
        ])
    };
    let c = canary.display();
    let mut plant = String::new();
    for name in [
        "$out.tmp",
        "$out.lock",
        "$out.chroot",
        "$out.check",
        "$(busybox dirname $out)/.tmp",
        "$(busybox dirname $out)/tmp",
        "$(busybox dirname $out)/tmp-stockade-1-0",
        "$(busybox dirname $out)/.stockade-tmp-1-0",
        "$NIX_BUILD_TOP/.tmp",
        "$NIX_BUILD_TOP/$(busybox basename $out).tmp",
    ] {
        plant += &format!("busybox ln -s {c} \"{name}\" && echo \"planted {name}\"; ");
    }
    let script = format!("{plant} echo fod-output > $out");
    let extra = format!(
        "outputHashMode = \"flat\"; outputHashAlgo = \"sha256\"; outputHash = \"{}\";",
        hash_of(b"fod-output\n")
    );
    let e = expr(&bb, "v2-planted", &script, &extra);
    // Mallory cannot plant such names in the host's store herself.
    let out = out_path(&d, &e);
    let host_plant = format!(
        "for n in {out}.tmp {out}.lock {s}/.tmp {s}/tmp; do \
           ln -s {c} $n 2>/dev/null && echo \"planted $n\"; done; echo end",
        s = d.store_dir()
    );
    let planted = d
        .cmd("sh")
        .args(["-c", &host_plant])
        .as_user(&mallory)
        .output();
    assert_eq!(planted.stdout_str().trim(), "end", "{planted}");
    let run = d
        .cmd("nix-build")
        .args(["--no-out-link", "-E", &e])
        .as_user(&mallory)
        .output();
    assert!(run.success(), "{run}");
    assert_eq!(run.stderr_str().matches("planted ").count(), 10, "{run}");
    assert_eq!(run.stdout_str().trim(), out);
    assert_eq!(fs::read(d.host_path(&out)).unwrap(), b"fod-output\n");
    assert_eq!(fingerprint(&canary), before, "the canary changed");
    let store = store_files(&d);
    let stray: Vec<_> = store
        .keys()
        .filter(|k| k.ends_with(".tmp") || k.ends_with(".chroot") || *k == "tmp")
        .collect();
    assert!(stray.is_empty(), "{stray:?}");

    // `$out` itself a link to the canary, with the canary's hash.
    let extra = format!(
        "outputHashMode = \"flat\"; outputHashAlgo = \"sha256\"; outputHash = \"{}\";",
        hash_of(b"v2 canary contents\n")
    );
    let e = expr(
        &bb,
        "v2-out-link",
        &format!("busybox ln -s {c} $out"),
        &extra,
    );
    let run = d
        .cmd("nix-build")
        .args(["--no-out-link", "-E", &e])
        .as_user(&mallory)
        .output();
    assert!(!run.success(), "the linked output was registered: {run}");
    // Refused as a symlink, not followed (and then stopped by the store-writer's Landlock).
    assert!(
        run.stderr_str()
            .contains("should be a non-executable regular file"),
        "{run}"
    );
    assert_eq!(fingerprint(&canary), before, "the canary changed");
    let leaked = d.run_ok([
        "sh",
        "-c",
        "grep -rl 'v2 canary contents' /nix/store 2>/dev/null || true",
    ]);
    assert_eq!(leaked, "", "the canary reached the store");
}

// ---- V15: setuid bits while mallory watches ----------------------------------------------------

/// Lets a builder waiting on the fifo at `.0` go on, also when the test panics first.
struct Release(PathBuf);

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

/// Stops mallory's poller (by its stop file), also when the test panics first.
struct Stop(PathBuf);

impl Drop for Stop {
    fn drop(&mut self) {
        let _ = fs::write(&self.0, b"");
    }
}

/// The number of polling rounds mallory's poller has finished.
fn rounds(count: &Path) -> u64 {
    fs::read_to_string(count)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until mallory's poller has finished two more rounds than now.
fn two_more_rounds(count: &Path) {
    let from = rounds(count);
    let deadline = Instant::now() + Duration::from_secs(60);
    while rounds(count) < from + 2 {
        assert!(Instant::now() < deadline, "the poller stopped at {from}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// V15 (CVE-2024-52867, guix): a builder makes files and a directory in `$out`, tries
/// `chmod 6755`, `u+s`, `g+s` on them and waits (on a fifo) while mallory, as her own uid,
/// searches the store for setuid/setgid entries over and over: during the build, during
/// registration and after it. She finds none, the registered output has no such bit, and the
/// builder's `chmod`s all failed (the seccomp filter; with it off, `without-seccomp`, they
/// succeed inside and the store-writer clears the bits in its private staging directory).
#[test]
fn v15_mallory_never_sees_a_setid_file_in_the_store() {
    skip_unless_root!();
    let mallory = mallory();
    let d = start("true");
    let bb = d.add_busybox();
    let poll_dir = d.work_dir().join("v15-poll");
    fs::create_dir(&poll_dir).unwrap();
    std::os::unix::fs::chown(&poll_dir, Some(mallory.uid), Some(mallory.gid)).unwrap();
    let (count, stop) = (poll_dir.join("count"), poll_dir.join("stop"));
    let poller = format!(
        "n=0; while [ ! -e {stop} ]; do find {s} -perm /6000 -print 2>/dev/null; \
         n=$((n+1)); echo $n > {count}.new; mv {count}.new {count}; done",
        s = d.store_dir(),
        stop = stop.display(),
        count = count.display()
    );
    let name = "v15-setid";
    let script = "busybox mkdir $out $out/d; for f in a b c; do echo $f > $out/$f; done; \
                  busybox cp $BB/bin/busybox $out/sh; \
                  for t in 6755:a u+s:b g+s:c 6755:sh 2755:d; do \
                    busybox chmod ${t%%:*} $out/${t#*:} 2>/dev/null && echo \"set $t\"; done; \
                  busybox mkfifo $NIX_BUILD_TOP/go; busybox cat $NIX_BUILD_TOP/go; \
                  busybox ls -l $out";
    let e = expr(&bb, name, script, "BB = bb;");
    let builds = d.host_path(BUILDS_DIR);
    let (seen, built) = std::thread::scope(|s| {
        let stopper = Stop(stop.clone());
        let watch = s.spawn(|| d.cmd("sh").args(["-c", &poller]).as_user(&mallory).output());
        let built = {
            let build = s.spawn(|| {
                d.cmd("nix-build")
                    .args(["--no-out-link", "-E", &e])
                    .output()
            });
            let top = wait_for_entry(&builds, &format!("nix-build-{name}.drv-"), "build/go");
            let release = Release(top.join("build/go"));
            two_more_rounds(&count);
            drop(release);
            build.join().unwrap()
        };
        two_more_rounds(&count);
        drop(stopper);
        (watch.join().unwrap(), built)
    });
    assert!(built.success(), "{built}");
    assert_eq!(
        seen.stdout_str().trim(),
        "",
        "mallory saw setid files: {seen}"
    );
    let out = d.host_path(built.stdout_str().trim());
    let loose = loose_entries(&out, false);
    assert!(loose.is_empty(), "{loose:?}");
    assert!(out.join("sh").exists());
    // Last, so that with the seccomp filter off (`without-seccomp`) the checks above still
    // show the store's side (bits cleared in private before the rename) held.
    let set = built
        .stderr_str()
        .lines()
        .any(|l| l.trim_start().starts_with("set "));
    assert!(!set, "the builder set a setid bit: {built}");
}

// ---- A39: hard links from `$out` -------------------------------------------------------------

/// A39: the builder runs `ln` from `$out` to a host file nothing made visible (it fails: the
/// file is not there) and to a file of an input in its closure (busybox). If the second
/// succeeds, the registered output holds a file of its own (another inode than the input's);
/// the input keeps its inode, link count, mode and contents either way.
#[test]
fn a39_hard_links_to_host_files_and_inputs_leave_both_alone() {
    skip_unless_root!();
    let mallory = mallory();
    let d = start("true");
    let bb = d.add_busybox();
    let (host, host_before) = canary(&d, "a39/host-file", b"a39 host file\n");
    let input = d.host_path(&format!("{bb}/bin/busybox"));
    let input_before = fingerprint(&input);
    let script = format!(
        "busybox mkdir $out; exec > $out/report 2>&1; \
         busybox ln {host} $out/host && echo 'host: linked' || echo 'host: refused'; \
         busybox ln $BB/bin/busybox $out/input && echo 'input: linked' || echo 'input: refused'",
        host = host.display()
    );
    let out = d
        .cmd("nix-build")
        .args([
            "--no-out-link",
            "-E",
            &expr(&bb, "a39-links", &script, "BB = bb;"),
        ])
        .as_user(&mallory)
        .ok();
    let out = d.host_path(out.trim());
    let report = fs::read_to_string(out.join("report")).unwrap();
    eprintln!("the builder reported:\n{report}");
    assert!(report.contains("host: refused"), "{report}");
    assert!(!out.join("host").exists());
    if report.contains("input: linked") {
        let (o, i) = (
            fs::metadata(out.join("input")).unwrap(),
            fs::metadata(&input).unwrap(),
        );
        assert_ne!((o.dev(), o.ino()), (i.dev(), i.ino()), "the input's inode");
    } else {
        assert!(report.contains("input: refused"), "{report}");
    }
    assert_eq!(fingerprint(&input), input_before, "the input changed");
    assert_eq!(fingerprint(&host), host_before, "the host file changed");
}

// ---- A41: a mount over `$out` ----------------------------------------------------------------

/// A41: the builder writes `$out/f`, then tries to mount a tmpfs and a bind of its build
/// directory over `$out` and over the store directory, writing `mounted` into what the mount
/// would show. Each mount fails with `ENOSYS` ("Function not implemented"): the seccomp filter
/// stops it before the kernel's capability check (which would say `EPERM`). The registered
/// output is the one written before.
#[test]
fn a41_a_mount_over_the_output_is_refused_by_seccomp() {
    skip_unless_root!();
    let mallory = mallory();
    let d = start("true");
    let bb = d.add_busybox();
    let script = "busybox mkdir $out; echo real > $out/f; exec 2>$NIX_BUILD_TOP/err; \
                  S=$(busybox dirname $out); \
                  for t in \"-t tmpfs none $out\" \"--bind $NIX_BUILD_TOP $out\" \
                           \"-t tmpfs none $S\" \"--bind $NIX_BUILD_TOP $S\"; do \
                    busybox mount $t && echo mounted > $out/f && echo \"mounted: $t\" >&2; done; \
                  busybox cat $NIX_BUILD_TOP/err > $out/report";
    let out = d
        .cmd("nix-build")
        .args(["--no-out-link", "-E", &expr(&bb, "a41-mount", script, "")])
        .as_user(&mallory)
        .ok();
    let out = d.host_path(out.trim());
    let report = fs::read_to_string(out.join("report")).unwrap();
    eprintln!("the builder reported:\n{report}");
    assert!(!report.contains("mounted"), "{report}");
    assert_eq!(
        report.matches("Function not implemented").count(),
        4,
        "{report}"
    );
    assert_eq!(fs::read(out.join("f")).unwrap(), b"real\n");
}

// ---- A48: builtin:fetchurl writes only its output ---------------------------------------------

/// A48: `builtin:fetchurl` of a `file://` URL naming a file of its closure (busybox) writes
/// that file's contents at `$out` and nothing else: the store gains the output alone, and no
/// build directory is left.
#[test]
fn a48_builtin_fetchurl_writes_only_its_output() {
    skip_unless_root!();
    let mallory = mallory();
    let d = start("true");
    let bb = d.add_busybox();
    let file = format!("{bb}/bin/busybox");
    let hash = d.run_ok([
        "nix-hash",
        "--type",
        "sha256",
        "--flat",
        d.host_path(&file).to_str().unwrap(),
    ]);
    let e = format!(
        "derivation {{ name = \"a48-fetched\"; builder = \"builtin:fetchurl\"; \
         system = \"builtin\"; url = \"file://${{builtins.storePath {bb}}}/bin/busybox\"; \
         outputHashMode = \"flat\"; outputHashAlgo = \"sha256\"; outputHash = \"{hash}\"; \
         executable = false; unpack = false; }}",
        bb = nix_string(&bb)
    );
    d.run_ok(["nix-instantiate", "-E", &e]);
    let before = store_files(&d);
    let out = d
        .cmd("nix-build")
        .args(["--no-out-link", "-E", &e])
        .as_user(&mallory)
        .ok();
    let out = out.trim();
    assert_eq!(
        fs::read(d.host_path(out)).unwrap(),
        fs::read(d.host_path(&file)).unwrap()
    );
    let name = out.trim_start_matches("/nix/store/");
    let mut after = store_files(&d);
    assert!(after.remove(name).is_some(), "{name} missing");
    assert_eq!(before, after, "the store changed beyond the output");
    build_tops(&d, "", 0);
}

// ---- A49: `__noChroot` under `sandbox = relaxed` ----------------------------------------------

/// A49: under `sandbox = relaxed`, mallory's `__noChroot = true` build is built, and still as
/// an unprivileged build uid (not root, not mallory), with no capabilities, `no_new_privs`, a
/// seccomp filter, its own user, pid, network and UTS namespaces, and the store's other paths
/// out of sight: a root daemon's builds are always confined.
#[test]
fn a49_no_chroot_under_relaxed_is_still_confined() {
    skip_unless_root!();
    let mallory = mallory();
    let d = start("relaxed");
    let bb = d.add_busybox();
    let script = "exec > $out 2>&1; \
                  busybox grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status; \
                  echo \"uid: $(busybox id -u)\"; \
                  echo \"host: $(busybox hostname)\"; \
                  echo \"ifaces: $(busybox awk -F: 'NR>2 { gsub(/ /, \"\", $1); print $1 }' \
                    /proc/net/dev | busybox tr '\\n' ' ')\"; \
                  echo \"procs: $(busybox ls /proc | busybox grep -c '^[0-9]')\"; \
                  echo \"uidmap: $(busybox cat /proc/self/uid_map | busybox tr -s ' ')\"; \
                  busybox ls /nix/store | busybox grep -q a49-marker && echo 'store: whole'; \
                  echo end";
    let marker = d.write_work_file("a49-marker", b"x\n");
    d.run_ok(["nix-store", "--add", marker.to_str().unwrap()]);
    let e = expr(&bb, "a49-nochroot", script, "__noChroot = true;");
    let out = d
        .cmd("nix-build")
        .args(["--no-out-link", "-E", &e])
        .as_user(&mallory)
        .ok();
    let report = fs::read_to_string(d.host_path(out.trim())).unwrap();
    eprintln!("the builder reported:\n{report}");
    for line in [
        "CapEff:\t0000000000000000",
        "CapBnd:\t0000000000000000",
        "NoNewPrivs:\t1",
        "Seccomp:\t2",
        "host: localhost",
        "ifaces: lo \n",
    ] {
        assert!(report.contains(line), "{line:?} missing:\n{report}");
    }
    let uid = build_uid(&d, "a49-nochroot");
    assert!(uid != 0 && uid != mallory.uid, "build uid {uid}");
    let field = |k: &str| {
        report
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or_else(|| panic!("no {k} in {report}"))
            .trim()
            .to_string()
    };
    // A user namespace mapping one uid (the build uid), and a pid namespace of its own.
    assert_eq!(field("uidmap: "), format!("1000 {uid} 1"));
    let procs: u32 = field("procs: ").parse().unwrap();
    assert!(procs < 10, "{procs} processes in view");
    assert!(!report.contains("store: whole"), "{report}");
    assert!(report.trim_end().ends_with("end"), "{report}");
}
