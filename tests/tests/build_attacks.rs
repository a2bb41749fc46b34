//! Builders that attack the daemon around them, through a real `nix-build` against Stockade:
//! a channel tarball with members that aim outside the output (V11), a builder trying to
//! mount, unmount, pivot its root, remount the store writable or make a user namespace (A47),
//! and builders that ignore SIGTERM, close their output and outlive their own shell (A51).
//! Needs root; fails loudly in CI without it.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use stockade_tests::sec::{assert_unchanged, snapshot, store_files};
use stockade_tests::{busybox_derivation, nix_string, skip_unless_root, Daemon, DaemonKind};

fn start(extra: &[&str]) -> Daemon {
    let mut b = Daemon::builder(DaemonKind::Stockade).conf_line("sandbox = true");
    for l in extra {
        b = b.conf_line(l);
    }
    b.start().expect("stockade")
}

// ---- V11: builtin:unpack-channel with hostile members --------------------------------------

/// One tar member.
enum Member<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8]),
    Symlink(&'a str, &'a str),
}

/// A plain ustar archive of `members`, names taken as given (`..`, absolute names and all).
fn tarball(members: &[Member<'_>]) -> Vec<u8> {
    fn field(h: &mut [u8], at: usize, len: usize, v: &[u8]) {
        assert!(v.len() <= len, "tar field too long: {v:?}");
        h[at..at + v.len()].copy_from_slice(v);
    }
    fn octal(h: &mut [u8], at: usize, len: usize, n: u64) {
        field(h, at, len, format!("{n:0w$o}\0", w = len - 1).as_bytes());
    }
    let mut out = Vec::new();
    for m in members {
        let (name, kind, mode, data, link): (&str, u8, u64, &[u8], &str) = match *m {
            Member::Dir(n) => (n, b'5', 0o755, b"", ""),
            Member::File(n, d) => (n, b'0', 0o644, d, ""),
            Member::Symlink(n, t) => (n, b'2', 0o777, b"", t),
        };
        let mut h = [0u8; 512];
        field(&mut h, 0, 100, name.as_bytes());
        octal(&mut h, 100, 8, mode);
        octal(&mut h, 108, 8, 0);
        octal(&mut h, 116, 8, 0);
        octal(&mut h, 124, 12, data.len() as u64);
        octal(&mut h, 136, 12, 1);
        h[156] = kind;
        field(&mut h, 157, 100, link.as_bytes());
        field(&mut h, 257, 8, b"ustar\x0000");
        h[148..156].fill(b' ');
        let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
        field(&mut h, 148, 8, format!("{sum:06o}\0 ").as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(512), 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

/// The derivation `nix-channel --update` builds (Nix's `unpack-channel.nix`) for `src`.
fn channel_expr(src: &str, name: &str) -> String {
    format!(
        "derivation {{ name = {name}; channelName = \"mychan\"; \
         src = builtins.storePath {src}; builder = \"builtin:unpack-channel\"; \
         system = \"builtin\"; preferLocalBuild = true; }}",
        name = nix_string(name),
        src = nix_string(src),
    )
}

/// V11 (CVE-2026-44029): members named `../…`, `/…` or below a symlink member never reach
/// the host. Each tarball fails its build with the unpacker's refusal, the store is as it was,
/// and none of the canaries (the test's own directory, reached by each route, and the store)
/// exists. A tarball without such members unpacks, so the route itself works. With the
/// unpacker's checks off (`without-v11`) the sandbox still stops the writes, but the refusal is
/// not the unpacker's and the test fails.
#[test]
fn v11_hostile_channel_members_are_refused_and_nothing_escapes() {
    skip_unless_root!();
    let d = start(&[]);
    let canaries = tempfile::Builder::new()
        .prefix("stockade-v11-")
        .tempdir()
        .expect("canary dir");
    // Writable by anyone: an escape must not fail for want of permission.
    fs::set_permissions(canaries.path(), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::create_dir(canaries.path().join("linkdir")).unwrap();
    fs::set_permissions(
        canaries.path().join("linkdir"),
        fs::Permissions::from_mode(0o777),
    )
    .unwrap();
    let c = canaries.path().display().to_string();
    let up = "../".repeat(16);
    let dotdot = format!("mychan/{up}{}/dotdot-canary", c.trim_start_matches('/'));
    let absolute = format!("{c}/abs-canary");
    let linkdir = format!("{c}/linkdir");
    let cases: Vec<(&str, Vec<Member<'_>>, &str)> = vec![
        (
            "dotdot",
            vec![Member::Dir("mychan/"), Member::File(&dotdot, b"escaped\n")],
            "Path contains '..'",
        ),
        (
            "sibling",
            vec![
                Member::Dir("mychan/"),
                Member::File("../sibling-canary", b"escaped\n"),
            ],
            "Path contains '..'",
        ),
        (
            "absolute",
            vec![
                Member::Dir("mychan/"),
                Member::File(&absolute, b"escaped\n"),
            ],
            "Path is absolute",
        ),
        (
            "through-symlink",
            vec![
                Member::Dir("mychan/"),
                Member::Symlink("mychan/link", &linkdir),
                Member::File("mychan/link/through-canary", b"escaped\n"),
            ],
            "Cannot extract through symlink",
        ),
        (
            "into-the-store",
            vec![
                Member::Dir("mychan/"),
                Member::Symlink("mychan/store", "/nix/store"),
                Member::File("mychan/store/store-canary", b"escaped\n"),
            ],
            "Cannot extract through symlink",
        ),
    ];
    for (name, members, refusal) in &cases {
        let tar = d.write_work_file(&format!("{name}.tar"), &tarball(members));
        let src = d.run_ok(["nix-store", "--add", tar.to_str().unwrap()]);
        let expr = channel_expr(&src, &format!("channel-{name}"));
        d.run_ok(["nix-instantiate", "-E", &expr]);
        let before = snapshot(&d);
        let out = d
            .cmd("nix-build")
            .args(["--no-out-link", "-E", &expr])
            .fails();
        let err = out.stderr_str();
        assert!(err.contains(refusal), "{name}: {err}");
        assert_unchanged(&d, &before, name);
    }
    for canary in [
        canaries.path().join("dotdot-canary"),
        canaries.path().join("abs-canary"),
        canaries.path().join("linkdir/through-canary"),
        d.host_path("/nix/store/sibling-canary"),
        d.host_path("/nix/store/store-canary"),
    ] {
        assert!(!canary.exists(), "{} was written", canary.display());
    }
    let left = fs::read_dir(canaries.path().join("linkdir"))
        .unwrap()
        .count();
    assert_eq!(left, 0, "something was written through the symlink");
    // Nothing anywhere under the instance (state, builds directory, store) holds a canary.
    let found = d.run_ok([
        "sh",
        "-c",
        &format!(
            "find {} /nix /tmp -name '*-canary' 2>/dev/null || true",
            d.base_dir().display()
        ),
    ]);
    assert_eq!(found, "", "canaries written somewhere");

    // The control: an honest channel unpacks under its name.
    let tar = d.write_work_file(
        "honest.tar",
        &tarball(&[
            Member::Dir("nixexprs/"),
            Member::File("nixexprs/default.nix", b"{ }\n"),
        ]),
    );
    let src = d.run_ok(["nix-store", "--add", tar.to_str().unwrap()]);
    let out = d.build_ok(&channel_expr(&src, "channel-honest"));
    let unpacked = d.host_path(&format!("{out}/mychan/default.nix"));
    assert_eq!(fs::read(&unpacked).unwrap_or_default(), b"{ }\n");
}

// ---- A47: mounts, pivot_root, user namespaces ----------------------------------------------

/// Each attempt prints `<what>: ok` or `<what>: refused`.
const MOUNTS: &str = r#"
exec > $out 2>&1
try() { what=$1; shift; if "$@" 2>/dev/null; then echo "$what: ok"; else echo "$what: refused"; fi; }
before=$(busybox wc -l < /proc/self/mountinfo)
busybox mkdir -p /build/mnt /build/new/old
try mount-tmpfs busybox mount -t tmpfs none /build/mnt
try mount-bind busybox mount --bind /build /build/mnt
try remount-store busybox mount -o remount,rw /nix/store
try remount-input busybox mount -o remount,rw,bind $BB
try remount-root busybox mount -o remount,rw /
try umount-store busybox umount /nix/store
try umount-proc busybox umount -l /proc
try pivot-root busybox pivot_root /build/new /build/new/old
try chroot busybox chroot /build /bin/true
try unshare-user busybox unshare -U true
try unshare-mount busybox unshare -m true
try unshare-user-remount busybox unshare -Urm sh -c 'busybox mount -o remount,rw /nix/store && busybox touch /nix/store/userns-canary'
# The builder's view of the store is its own (its outputs go there): no refusal expected,
# only that nothing reaches the host's store.
busybox touch /nix/store/a47-canary 2>/dev/null
try write-input busybox touch $BB/a47-canary
after=$(busybox wc -l < /proc/self/mountinfo)
[ "$before" = "$after" ] && echo "mounts: unchanged" || echo "mounts: $before -> $after"
"#;

/// A47: every way to change the mounts or regain capabilities fails inside the build, the
/// builder's mount table stays as it was, and the store is unchanged but for the output.
#[test]
fn a47_mount_pivot_root_and_user_namespaces_are_refused() {
    skip_unless_root!();
    let d = start(&[]);
    let bb = d.add_busybox();
    let expr = busybox_derivation(&bb, "a47-mounts", MOUNTS).replacen(
        "args = [",
        &format!("BB = builtins.storePath {}; args = [", nix_string(&bb)),
        1,
    );
    d.run_ok(["nix-instantiate", "-E", &expr]);
    let before = store_files(&d);
    let out = d.build_ok(&expr);
    let report = fs::read_to_string(d.host_path(&out)).expect("the report");
    eprintln!("the builder reported:\n{report}");
    for what in [
        "mount-tmpfs",
        "mount-bind",
        "remount-store",
        "remount-input",
        "remount-root",
        "umount-store",
        "umount-proc",
        "pivot-root",
        "chroot",
        "unshare-user",
        "unshare-mount",
        "unshare-user-remount",
        "write-input",
    ] {
        let line = format!("{what}: refused");
        assert!(
            report.lines().any(|l| l == line),
            "{line:?} missing:\n{report}"
        );
    }
    assert!(report.contains("mounts: unchanged"), "{report}");
    // The store holds what it held, and the output.
    let out_name = out.trim_start_matches("/nix/store/");
    let mut after = store_files(&d);
    after.retain(|k, _| k != out_name && !k.starts_with(&format!("{out_name}/")));
    assert_eq!(before, after, "the store changed beyond the output");
    for canary in ["userns-canary", "a47-canary"] {
        assert!(!d.host_path(&format!("/nix/store/{canary}")).exists());
    }
    assert!(!d.host_path(&format!("{bb}/a47-canary")).exists());
}

// ---- A51: builders that will not stop ------------------------------------------------------

/// A marker in every command line of the build's processes, for finding leftovers; each test
/// appends its build's name, so that the two A51 tests, which may run at once, never count
/// each other's.
const SPIN_MARKER: &str = "a51-spin-marker";

/// The pids of processes whose uid (real, effective or saved) is `uid`, or whose command line
/// holds `marker`.
fn build_processes(uid: u32, marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in fs::read_dir("/proc").expect("/proc").filter_map(|e| e.ok()) {
        let pid = e.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let status = fs::read_to_string(e.path().join("status")).unwrap_or_default();
        let by_uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .is_some_and(|ids| ids.split_whitespace().take(3).any(|i| i == uid.to_string()));
        let cmdline = fs::read(e.path().join("cmdline")).unwrap_or_default();
        let by_marker = String::from_utf8_lossy(&cmdline).contains(marker);
        if by_uid || by_marker {
            found.push(format!("{pid}: {}", String::from_utf8_lossy(&cmdline)));
        }
    }
    found
}

/// The build uid of `name`'s build, from its `build-end` audit line.
fn build_uid(d: &Daemon, name: &str) -> u32 {
    let log = d.log();
    log.lines()
        .find(|l| l.contains(" build-end ") && l.contains(name))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|f| f.strip_prefix("build-uid="))
        })
        .and_then(|u| u.parse().ok())
        .unwrap_or_else(|| panic!("no build-end line with a build uid for {name}:\n{log}"))
}

/// Builds `script` as `name` with `options`; fails; returns the client's stderr once no process
/// of the build is left (checked, not waited for: the daemon reports only after the kill).
fn run_stubborn(d: &Daemon, bb: &str, name: &str, script: &str, options: &[&str]) -> String {
    let expr = busybox_derivation(bb, name, script);
    let out = d
        .cmd("nix-build")
        .args(["--no-out-link", "-E", &expr])
        .args(options)
        .fails();
    let err = out.stderr_str();
    let uid = build_uid(d, name);
    assert_ne!(uid, 0);
    let left = build_processes(uid, &format!("{SPIN_MARKER}-{name}"));
    assert!(
        left.is_empty(),
        "{name}: processes of the build (uid {uid}) are left:\n{left:#?}"
    );
    err
}

/// A51: a builder that ignores SIGTERM, starts a child in a session of its own that ignores it
/// too, and spins is killed at `timeout` with Nix's message; nothing of it is left.
#[test]
fn a51_a_builder_ignoring_sigterm_is_killed_at_the_timeout() {
    skip_unless_root!();
    let d = start(&[]);
    let bb = d.add_busybox();
    let script = format!(
        "trap '' TERM HUP INT; echo spinning; \
         busybox setsid sh -c \"trap '' TERM HUP; while :; do busybox sleep 1; done\" \
         {SPIN_MARKER}-a51-sigterm < /dev/null > /dev/null 2>&1 & \
         while :; do :; done; echo > $out"
    );
    let err = run_stubborn(
        &d,
        &bb,
        "a51-sigterm",
        &script,
        &["--option", "timeout", "2"],
    );
    assert!(err.contains("spinning"), "{err}");
    let line = err
        .lines()
        .find(|l| l.contains("timed out after"))
        .unwrap_or_else(|| panic!("no timeout message: {err}"));
    assert!(line.ends_with("timed out after 2 seconds"), "{line}");
}

/// A51: a builder that closes its stdout and stderr, leaves a child in a session of its own,
/// and waits in silence is killed at `max-silent-time` with Nix's message (its log closed:
/// the daemon cannot wait for the end of the log); nothing of it is left.
#[test]
fn a51_a_builder_that_closes_its_output_is_killed_when_silent() {
    skip_unless_root!();
    let d = start(&[]);
    let bb = d.add_busybox();
    let script = format!(
        "echo going silent; exec >&- 2>&-; trap '' TERM HUP INT; \
         busybox setsid sh -c \"trap '' TERM HUP; while :; do busybox sleep 1; done\" \
         {SPIN_MARKER}-a51-silent & \
         while :; do busybox sleep 1; done; echo > $out"
    );
    let err = run_stubborn(
        &d,
        &bb,
        "a51-silent",
        &script,
        &["--option", "max-silent-time", "2"],
    );
    assert!(err.contains("going silent"), "{err}");
    assert!(
        err.contains("timed out after 2 seconds of silence"),
        "{err}"
    );
    // Another build still runs: the build slot and the uid came back.
    d.build_ok(&busybox_derivation(&bb, "a51-after", "echo fine > $out"));
}
