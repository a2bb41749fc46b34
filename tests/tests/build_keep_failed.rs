//! `keep-failed` asked for by an untrusted user (SECURITY.md V14, A55), through a real
//! `nix-build --keep-failed` as `mallory`. Her builder opens its build directory to everyone,
//! leaves world-writable entries, a symlink to a canary and tries to hard-link it (the canary
//! is bound into the sandbox with `extra-sandbox-paths`, as an administrator might expose a
//! file). The kept directory must be readable, owned by nobody of hers, writable by nobody
//! else, and the canary untouched. Needs root; fails loudly in CI without it.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use stockade_tests::builddir::{expr, owned_by, BUILDS_DIR};
use stockade_tests::sec::stockade_with;
use stockade_tests::{ensure_user, skip_unless_root, Daemon, User};

const SHADOW: &[u8] = b"root:$6$canary:19000:0:99999:7:::\n";

struct Kept {
    d: Daemon,
    mallory: User,
    /// The kept directory as the daemon names it, and on the host.
    logical: String,
    host: PathBuf,
    canary: PathBuf,
    log: String,
    _canary_dir: tempfile::TempDir,
}

fn keep_mallorys_build(name: &str) -> Kept {
    let mallory = ensure_user("st-mallory").unwrap();
    // The canary lives in a directory of its own so that only it is bound into the sandbox.
    let canary_dir = tempfile::Builder::new()
        .prefix("stockade-canary-")
        .tempdir()
        .unwrap();
    let dir = canary_dir.path();
    let canary = dir.join("shadow");
    fs::write(&canary, SHADOW).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&canary, fs::Permissions::from_mode(0o600)).unwrap();
    let d = stockade_with("")
        .conf_line("sandbox = true")
        .conf_line(&format!("extra-sandbox-paths = {}", dir.display()))
        .start()
        .unwrap();
    let bb = d.add_busybox();
    let c = canary.display();
    let script = format!(
        "cd $NIX_BUILD_TOP; busybox chmod 0777 .; busybox mkdir open; busybox chmod 0777 open; \
         echo data > file; busybox chmod 0666 file; \
         busybox ln {c} shadow 2>/dev/null && echo 'hard link: made' || echo 'hard link: refused'; \
         busybox ln -s {c} shadow-link; busybox ln -s {c} open/shadow-link; exit 1"
    );
    let out = d
        .cmd("nix-build")
        .args(["--no-out-link", "--keep-failed", "-E"])
        .arg(expr(&bb, name, &script, ""))
        .as_user(&mallory)
        .fails();
    let log = out.stderr_str();
    let logical = log
        .split("keeping build directory '")
        .nth(1)
        .and_then(|r| r.split('\'').next())
        .unwrap_or_else(|| panic!("no kept directory: {out}"))
        .to_string();
    assert!(logical.starts_with(BUILDS_DIR), "{logical}");
    let host = d.host_path(&logical);
    Kept {
        d,
        mallory,
        logical,
        host,
        canary,
        log,
        _canary_dir: canary_dir,
    }
}

fn all_entries(root: &Path) -> Vec<(PathBuf, fs::Metadata)> {
    let mut out = Vec::new();
    for e in fs::read_dir(root).unwrap().flatten() {
        let md = fs::symlink_metadata(e.path()).unwrap();
        if md.is_dir() {
            out.extend(all_entries(&e.path()));
        }
        out.push((e.path(), md));
    }
    out
}

/// CVE-2021-27851 (guix): with `--keep-failed`, a hard link to `/etc/shadow` in the build
/// directory was chowned to the user. Here the builder cannot make the link (the kernel
/// refuses links across mounts) and the kept directory is handed to nobody: nothing in it is
/// mallory's, and the canary keeps its owner, mode, link count and contents, although a
/// symlink to it sits in the kept tree. With the kept tree sealed by name
/// (`without-nofollow-keep`) the symlink is followed and the canary changes owner.
#[test]
fn v14_a_kept_build_directory_never_hands_a_host_file_to_the_user() {
    skip_unless_root!();
    let k = keep_mallorys_build("v14-kept");
    assert!(k.log.contains("hard link: refused"), "{}", k.log);
    let mallorys = owned_by(k.mallory.uid, &k.host, Path::new("/nonexistent"), 16);
    assert!(mallorys.is_empty(), "mallory owns {mallorys:?}");
    let top = k.host.parent().unwrap();
    for p in [top, k.host.as_path()] {
        assert_ne!(
            fs::metadata(p).unwrap().uid(),
            k.mallory.uid,
            "{}",
            p.display()
        );
    }
    let md = fs::metadata(&k.canary).unwrap();
    assert_eq!(
        (md.uid(), md.gid(), md.mode() & 0o7777, md.nlink()),
        (0, 0, 0o600, 1),
        "the canary changed"
    );
    assert_eq!(fs::read(&k.canary).unwrap(), SHADOW);
    // Nor can mallory link it in now (protected_hardlinks; the kept tree is read-only).
    let ln = format!("ln {} {}/open/shadow", k.canary.display(), k.logical);
    let linked = k.d.cmd("sh").args(["-c", &ln]).as_user(&k.mallory).output();
    assert!(!linked.success(), "{linked}");
}

/// A55: an untrusted user may ask for `keep-failed`; the kept directory is readable but
/// read-only for everyone but its owner, the build user, which no process runs as any more:
/// the builder's world-writable file and directory lose their group and other write bits,
/// so neither mallory nor anyone else can change them or add to them. With the kept tree
/// left as the builder made it (`without-read-only-kept-dir`) she can.
#[test]
fn a55_an_untrusted_kept_build_directory_is_read_only() {
    skip_unless_root!();
    let k = keep_mallorys_build("a55-kept");
    for (p, md) in all_entries(&k.host) {
        if !md.file_type().is_symlink() {
            assert_eq!(md.mode() & 0o022, 0, "{} is {:o}", p.display(), md.mode());
        }
    }
    for p in [k.host.parent().unwrap(), k.host.as_path()] {
        assert_eq!(fs::metadata(p).unwrap().mode() & 0o7777, 0o755);
    }
    let kd = &k.logical;
    let probe = format!(
        "cat {kd}/file >/dev/null && echo 'read file'; \
         (echo x >> {kd}/file) 2>/dev/null && echo 'wrote file'; \
         touch {kd}/new 2>/dev/null && echo 'made new'; \
         touch {kd}/open/new 2>/dev/null && echo 'made open/new'; \
         rm -f {kd}/file 2>/dev/null; [ -e {kd}/file ] || echo 'removed file'; echo end"
    );
    let seen =
        k.d.cmd("sh")
            .args(["-c", &probe])
            .as_user(&k.mallory)
            .output();
    assert_eq!(seen.stdout_str().trim(), "read file\nend", "{seen}");
    assert_eq!(fs::read(k.host.join("file")).unwrap(), b"data\n");
}
