//! The optimiser on a real store directory (a temporary one): what it links, what it leaves
//! alone, Nix's messages, and files changed between their hash and their link.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::fcntl::OFlag;
use nix::sys::stat::{Mode, UtimensatFlags};
use nix::sys::time::TimeSpec;
use stockade_common::ipc::msg::StoreWriterConfig;

use super::link::Hashed;
use super::*;
use crate::canon::{canonicalise, Owner};
use crate::sys;

struct Env {
    _dir: tempfile::TempDir,
    store: Arc<Store>,
    real: PathBuf,
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let cfg = StoreWriterConfig {
        store_dir: "/nix/store".into(),
        real_store_dir: root.join("store").display().to_string(),
        state_dir: root.join("var/nix").display().to_string(),
        log_dir: root.join("var/log/nix").display().to_string(),
        require_sigs: true,
        trusted_public_keys: Vec::new(),
        use_sqlite_wal: true,
        fsync_metadata: false,
        compress_build_log: false,
        as_root: false,
        audit_socket: None,
        db_group: None,
        secret_key_files: Vec::new(),
        lockdown: Default::default(),
        untrusted_max_nar_size: 0,
        untrusted_bytes_per_hour: 0,
        store_floors: stockade_common::floor::Floors::NONE,
        auto_optimise_store: false,
        untrusted_temp_roots: 0,
        untrusted_temp_roots_per_uid: 0,
        gc: Default::default(),
        runtime_roots_from_master: false,
    };
    let store = crate::control::start(cfg).unwrap();
    Env {
        real: root.join("store"),
        _dir: dir,
        store,
    }
}

/// A node of a test tree.
enum N<'a> {
    File(&'a str, &'a [u8]),
    Exe(&'a str, &'a [u8]),
    Link(&'a str, &'a str),
}

impl Env {
    /// Makes the canonical tree `base` (a directory holding `nodes`) in the store.
    fn put(&self, base: &str, nodes: &[N<'_>]) -> PathBuf {
        let root = self.real.join(base);
        for n in nodes {
            let (name, data, mode) = match n {
                N::File(name, data) => (name, Some(*data), 0o444),
                N::Exe(name, data) => (name, Some(*data), 0o555),
                N::Link(name, target) => {
                    let p = root.join(name);
                    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                    std::os::unix::fs::symlink(target, p).unwrap();
                    continue;
                }
            };
            let p = root.join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, data.unwrap()).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        self.canon(base);
        root
    }

    fn canon(&self, base: &str) {
        let owner = Owner {
            uid: nix::unistd::geteuid(),
            gid: nix::unistd::getegid(),
            chown: false,
        };
        canonicalise(self.store.store_fd(), OsStr::new(base), &owner, base).unwrap();
    }

    /// Optimises `bases` in one run; returns its stats and log lines.
    fn optimise(&self, bases: &[&str], repair: bool) -> (Stats, Vec<(u32, String)>) {
        let mut lines = Vec::new();
        let mut log = |l: u32, t: String| lines.push((l, t));
        let mut opt = Optimiser::new(&self.store, &mut log, 7, repair).unwrap();
        opt.load_known().unwrap();
        for b in bases {
            opt.path(b).unwrap();
        }
        let stats = opt.stats;
        drop(opt);
        (stats, lines)
    }

    fn links(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.real.join(".links"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// Store entries named `.tmp-link-*` (none may be left).
    fn temporaries(&self) -> usize {
        std::fs::read_dir(&self.real)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(".tmp-link-")
            })
            .count()
    }
}

fn ino(p: &Path) -> u64 {
    std::fs::symlink_metadata(p).unwrap().ino()
}

fn has_line(lines: &[(u32, String)], level: u32, text: &str) -> bool {
    lines.iter().any(|(l, t)| *l == level && t == text)
}

const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a";
const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-b";

#[test]
fn duplicates_become_one_inode_and_directories_stay_canonical() {
    let e = env();
    let shared = b"the same bytes in three places\n";
    let a = e.put(
        A,
        &[
            N::File("x", shared),
            N::File("sub/deep/y", shared),
            N::File("own", b"only here"),
            N::Exe("bin/run", shared),
            N::Link("l", "/nix/store/somewhere"),
        ],
    );
    let b = e.put(
        B,
        &[N::File("z", shared), N::Link("l2", "/nix/store/somewhere")],
    );
    let (stats, lines) = e.optimise(&[A, B], false);
    // x, sub/deep/y, z share one inode; bin/run is executable (another NAR), so apart.
    let inodes = [
        ino(&a.join("x")),
        ino(&a.join("sub/deep/y")),
        ino(&b.join("z")),
    ];
    assert!(inodes.iter().all(|&i| i == inodes[0]), "{inodes:?}");
    assert_ne!(ino(&a.join("bin/run")), inodes[0]);
    // The symlinks with the same target share one inode too.
    assert_eq!(ino(&a.join("l")), ino(&b.join("l2")));
    assert_eq!(std::fs::read(a.join("sub/deep/y")).unwrap(), shared);
    // Two of the three copies and one of the two symlinks were replaced.
    let target_len = "/nix/store/somewhere".len() as u64;
    assert_eq!(stats.files_linked, 3);
    assert_eq!(stats.bytes_freed, 2 * shared.len() as u64 + target_len);
    assert_eq!(stats.changed, 0);
    // Entries: shared, own, run, the symlink.
    assert_eq!(e.links().len(), 4);
    assert_eq!(e.temporaries(), 0);
    // Every directory that got a link is read-only again with mtime 1.
    for d in [a.join("sub/deep"), a.clone(), b.clone()] {
        let md = std::fs::symlink_metadata(&d).unwrap();
        assert_eq!(md.permissions().mode() & 0o7777, 0o555, "{}", d.display());
        assert_eq!(md.mtime(), 1, "{}", d.display());
    }
    let y = format!("{}/sub/deep/y", a.display());
    assert!(
        lines
            .iter()
            .any(|(l, t)| *l == LVL_TALKATIVE && t.starts_with(&format!("linking '{y}' to '"))),
        "{lines:?}"
    );

    // A second run skips every linked inode unread and links nothing.
    let (again, lines) = e.optimise(&[A, B], false);
    assert_eq!(again, Stats::default());
    assert!(
        has_line(&lines, LVL_DEBUG, "'x' is already linked"),
        "{lines:?}"
    );
}

#[test]
fn writable_files_are_skipped_and_corrupted_entries_replaced() {
    let e = env();
    let a = e.put(A, &[N::File("w", b"writable"), N::File("f", b"contents")]);
    std::fs::set_permissions(a.join("w"), std::fs::Permissions::from_mode(0o644)).unwrap();
    // An entry for f's hash of another size: corrupted.
    let b32 = {
        let nar = stockade_common::nar::write_flat_nar(Vec::new(), false, b"contents").unwrap();
        stockade_common::hash::Hash::sha256(&nar).to_base32()
    };
    let entry = e.real.join(".links").join(&b32);
    std::fs::write(&entry, b"garbage of another size").unwrap();
    let (stats, lines) = e.optimise(&[A], false);
    let w = format!("{}/w", a.display());
    let warn = |s: &str| format!("\x1b[35;1mwarning:\x1b[0m {s}");
    assert!(
        has_line(
            &lines,
            LVL_WARN,
            &warn(&format!("skipping suspicious writable file '{w}'"))
        ),
        "{lines:?}"
    );
    let link_path = format!("{}/.links/{b32}", e.real.display());
    assert!(
        has_line(
            &lines,
            LVL_WARN,
            &warn(&format!("removing corrupted link '{link_path}'"))
        ),
        "{lines:?}"
    );
    // The entry is f's own inode now.
    assert_eq!(ino(&entry), ino(&a.join("f")));
    assert_eq!(std::fs::read(&entry).unwrap(), b"contents");
    assert_eq!(stats.files_linked, 0);
    assert!(!e.links().iter().any(|n| n.len() != 52));
}

/// `base/name` opened and described as the walk has it before hashing.
struct Opened {
    dir: std::os::fd::OwnedFd,
    file: File,
    st: nix::sys::stat::FileStat,
    path: String,
}

fn open(e: &Env, base: &str, name: &str) -> Opened {
    let dir = sys::open_dir_at(e.store.store_fd(), base).unwrap();
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW;
    let file = File::from(sys::openat(dir.as_fd(), name, flags, Mode::empty()).unwrap());
    let st = sys::fstat(file.as_fd()).unwrap();
    let path = format!("{}/{base}/{name}", e.real.display());
    Opened {
        dir,
        file,
        st,
        path,
    }
}

/// Hashes `o`, lets `change` run, then links it, as if the change came between the two.
fn link_after(e: &Env, o: &Opened, change: impl FnOnce()) -> Stats {
    let mut log = |_: u32, _: String| {};
    let mut opt = Optimiser::new(&e.store, &mut log, 7, false).unwrap();
    let hash = opt.hash_file(&o.file, &o.st, &o.path).unwrap().unwrap();
    change();
    let name = Path::new(&o.path).file_name().unwrap();
    opt.link(&Hashed {
        dir: o.dir.as_fd(),
        in_store_dir: false,
        name,
        path: &o.path,
        file: &o.file,
        st: o.st,
        hash,
        symlink: false,
    })
    .unwrap();
    opt.stats
}

/// Rewrites a store file in place (same inode, same size, other bytes), as root could; with
/// `keep_mtime` its mtime is put back afterwards.
fn rewrite(p: &Path, data: &[u8], keep_mtime: bool) {
    let old = std::fs::symlink_metadata(p).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(p)
        .and_then(|mut f| std::io::Write::write_all(&mut f, data))
        .unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o444)).unwrap();
    if keep_mtime {
        let mtime = TimeSpec::new(old.mtime(), old.mtime_nsec());
        nix::sys::stat::utimensat(
            None,
            p,
            &TimeSpec::UTIME_OMIT,
            &mtime,
            UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
    }
    assert_eq!(ino(p), old.ino());
}

fn with_writable_dir(dir: &Path, f: impl FnOnce()) {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    f();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o555)).unwrap();
}

#[test]
fn a_file_written_after_its_hash_does_not_become_an_entry() {
    let e = env();
    let a = e.put(A, &[N::File("f", b"original")]);
    let o = open(&e, A, "f");
    let stats = link_after(&e, &o, || rewrite(&a.join("f"), b"modified", false));
    assert_eq!((stats.changed, stats.files_linked), (1, 0));
    assert!(e.links().is_empty(), "{:?}", e.links());
    assert_eq!(std::fs::read(a.join("f")).unwrap(), b"modified");
}

#[test]
fn a_file_written_after_its_hash_is_not_replaced() {
    let e = env();
    let a = e.put(A, &[N::File("f", b"original")]);
    let b = e.put(B, &[N::File("g", b"original")]);
    e.optimise(&[A], false);
    let entry = e.links().pop().unwrap();
    let o = open(&e, B, "g");
    // Same size, so the entry passes Nix's size check: the exchange happens and is undone.
    let stats = link_after(&e, &o, || rewrite(&b.join("g"), b"modified", false));
    assert_eq!((stats.changed, stats.files_linked), (1, 0));
    assert_eq!(std::fs::read(b.join("g")).unwrap(), b"modified");
    assert_eq!(
        ino(&b.join("g")),
        o.st.st_ino,
        "the file's own inode is back"
    );
    let entry = e.real.join(".links").join(entry);
    assert_eq!(std::fs::read(&entry).unwrap(), b"original");
    assert_eq!(ino(&entry), ino(&a.join("f")));
    assert_eq!(e.temporaries(), 0);
    let md = std::fs::symlink_metadata(&b).unwrap();
    assert_eq!((md.permissions().mode() & 0o7777, md.mtime()), (0o555, 1));
}

#[test]
fn a_file_renamed_over_after_its_hash_does_not_become_an_entry() {
    let e = env();
    let a = e.put(A, &[N::File("f", b"original")]);
    let o = open(&e, A, "f");
    let stats = link_after(&e, &o, || {
        with_writable_dir(&a, || {
            std::fs::write(a.join("new"), b"replaced").unwrap();
            std::fs::rename(a.join("new"), a.join("f")).unwrap();
        })
    });
    assert_eq!((stats.changed, stats.files_linked), (1, 0));
    assert!(e.links().is_empty(), "{:?}", e.links());
    assert_eq!(std::fs::read(a.join("f")).unwrap(), b"replaced");
}

/// A file whose mtime is recent: a write within the timestamp granularity, or one that puts
/// the mtime back, leaves its status as it was, so its contents are hashed again.
#[test]
fn a_recent_file_is_hashed_again_after_its_link() {
    let e = env();
    let a = e.put(A, &[N::File("f", b"original")]);
    let now = TimeSpec::from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap(),
    );
    nix::sys::stat::utimensat(
        None,
        &a.join("f"),
        &TimeSpec::UTIME_OMIT,
        &now,
        UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
    let o = open(&e, A, "f");
    let stats = link_after(&e, &o, || rewrite(&a.join("f"), b"modified", true));
    assert_eq!((stats.changed, stats.files_linked), (1, 0));
    assert!(e.links().is_empty(), "{:?}", e.links());

    // Unchanged, the same recent file is linked.
    let stats = link_after(&e, &open(&e, A, "f"), || {});
    assert_eq!(stats.changed, 0);
    assert_eq!(e.links().len(), 1);
}

/// Two runs at once over the same duplicates: every copy ends up on one inode, each replaced
/// once, nothing left behind.
#[test]
fn concurrent_runs_link_each_copy_once() {
    let e = env();
    let bases: Vec<String> = (0..24).map(|i| format!("{i:032}-p")).collect();
    for b in &bases {
        e.put(
            b,
            &[N::File("same", b"shared"), N::File("sub/same", b"shared")],
        );
    }
    let names: Vec<&str> = bases.iter().map(String::as_str).collect();
    let totals = std::thread::scope(|s| {
        let runs: Vec<_> = (0..2)
            .map(|k| {
                let mut order = names.clone();
                if k == 1 {
                    order.reverse();
                }
                let e = &e;
                s.spawn(move || e.optimise(&order, false).0)
            })
            .collect();
        runs.into_iter()
            .map(|r| r.join().unwrap())
            .fold((0, 0), |(l, c), s| (l + s.files_linked, c + s.changed))
    });
    assert_eq!(totals, (2 * 24 - 1, 0));
    let first = ino(&e.real.join(&bases[0]).join("same"));
    for b in &bases {
        assert_eq!(ino(&e.real.join(b).join("same")), first);
        assert_eq!(ino(&e.real.join(b).join("sub/same")), first);
    }
    assert_eq!(e.links().len(), 1);
    assert_eq!(e.temporaries(), 0);
}

#[test]
fn a_top_level_file_is_linked_in_the_store_directory() {
    let e = env();
    for base in [A, B] {
        let p = e.real.join(base);
        std::fs::write(&p, b"flat").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o444)).unwrap();
        e.canon(base);
    }
    let (stats, lines) = e.optimise(&[A, B], false);
    assert_eq!(stats.files_linked, 1);
    assert_eq!(ino(&e.real.join(A)), ino(&e.real.join(B)));
    // Linked already: a second run says so (top-level entries are not filtered by listing).
    let (again, lines2) = e.optimise(&[A, B], false);
    assert_eq!(again, Stats::default());
    let a = format!("{}/{A}", e.real.display());
    assert!(
        has_line(
            &lines2,
            LVL_DEBUG,
            &format!("'{a}' is already linked, with 1 other file(s)")
        ),
        "{lines:?}\n{lines2:?}"
    );
}

#[test]
fn show_bytes_is_nix_format() {
    assert_eq!(show_bytes(0), "0.00 MiB");
    assert_eq!(show_bytes(131_072), "0.12 MiB");
    assert_eq!(show_bytes(393_216), "0.38 MiB");
    assert_eq!(show_bytes(3 << 20), "3.00 MiB");
    assert_eq!(show_bytes(47_186), "0.05 MiB");
}
