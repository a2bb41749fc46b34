//! Garbage-collector roots in Nix's on-disk forms, so that a real Nix GC sees them:
//!
//! - temporary roots: `<state>/temproots/<name>`, NUL-terminated store paths, write-locked
//!   (`flock`) by their owner for as long as they count. Nix 2.8's GC reads the owner's pid with
//!   `std::stoi(name)`, which stops at the first non-digit, and decides liveness only by trying
//!   the lock. One store-writer serves many connections, so each connection gets its own file
//!   named `<store-writer pid>-<conn id>`: the GC parses the pid, finds the file locked, and
//!   each file is dropped with its connection. `flock` locks belong to the open file, so the
//!   files lock independently inside one process;
//! - indirect roots: `gcroots/auto/<b32(sha1(link))>` → `link`;
//! - FindRoots: the symlinks under `gcroots/` and `profiles/` as Nix's `findRoots` reads them,
//!   plus the runtime and temporary roots, collected in nix-daemon's order into a map that
//!   iterates as its `std::unordered_map` does (see [`crate::cxx_order`]): clients print the
//!   roots in an order that depends on the order they receive them in.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::dir::Type;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg, OFlag};
use nix::sys::stat::{Mode, SFlag};

use stockade_common::base32;
use stockade_common::hash::{Hash, HashAlgo};
use stockade_common::store_path::{StoreDir, StorePath};

use crate::cxx_order::{store_path_hash, string_hash, CxxMap, CxxSet};
use crate::store::Store;
use crate::sys;

/// Most temporary roots one connection may hold (A29).
pub const MAX_TEMP_ROOTS: usize = 1 << 18;
/// Longest link name accepted for an indirect root (`PATH_MAX` - 1).
const MAX_LINK_LEN: usize = 4095;
/// Bounds on the FindRoots walk: users own `gcroots/per-user/<name>` and can fill it.
const MAX_ROOT_DEPTH: usize = 64;
const MAX_ROOT_ENTRIES: usize = 1 << 20;
/// What the link name of a root is replaced with for untrusted clients.
pub const CENSORED: &str = "{censored}";

/// Nix's `lvlInfo`, at which it reports what it finds wrong with roots.
const INFO: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum RootError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("too many temporary roots on this connection (at most {MAX_TEMP_ROOTS})")]
    TooMany,
    #[error("{0}")]
    Budget(#[from] crate::rootbudget::BudgetHit),
    #[error("a garbage collector is running and cannot be told about a temporary root: {0}")]
    GcUnreachable(String),
    #[error("invalid root link '{0}'")]
    BadLink(String),
    #[error("creating a garbage collector root ({0}) in the Nix store is forbidden (are you running nix-build inside the store?)")]
    InStore(String),
    #[error("cannot create symlink '{0}'; already exists")]
    Exists(String),
    #[error("Stockade creates permanent roots only below '{state}' (asked for '{link}'); create the symlink yourself and register it with an indirect root instead")]
    OutsideState { link: String, state: String },
}

impl From<Errno> for RootError {
    fn from(e: Errno) -> Self {
        RootError::Io(e.into())
    }
}

/// One connection's temporary roots file.
pub struct TempRoots {
    dir: PathBuf,
    name: String,
    file: Option<Flock<File>>,
    /// `gc.lock`, opened at the first root and kept open (as Nix keeps its `fdGCLock`); each
    /// root takes and drops a shared lock on it. Its own open file: `flock` locks belong to
    /// the open file, so another connection's unlock cannot drop this one's lock.
    gc_lock: Option<File>,
    roots: HashSet<StorePath>,
    closed: bool,
    /// An untrusted connection's roots, counted against its budgets.
    charge: Option<crate::rootbudget::Charge>,
}

/// `gc.lock` while a root is added: share-locked (no collector runs), or only open (a running
/// collector was told about the root).
enum GcHold {
    Shared(Flock<File>),
    Open(File),
}

impl TempRoots {
    pub fn new(state_dir: &Path, conn_id: u64) -> TempRoots {
        TempRoots {
            dir: state_dir.join("temproots"),
            name: format!("{}-{conn_id}", std::process::id()),
            file: None,
            gc_lock: None,
            roots: HashSet::new(),
            closed: false,
            charge: None,
        }
    }

    /// Counts this connection's roots against `charge` (an untrusted client's budgets).
    pub fn with_charge(mut self, charge: Option<crate::rootbudget::Charge>) -> TempRoots {
        self.charge = charge;
        self
    }

    /// The roots of one build of the builder-helper: `<pid>-build-<id>` (Nix's collector
    /// reads the pid up to the first non-digit, as for connections).
    pub fn for_build(state_dir: &Path, build: u64) -> TempRoots {
        let mut roots = TempRoots::new(state_dir, 0);
        roots.name = format!("{}-build-{build}", std::process::id());
        roots
    }

    /// The file's name in `temproots/`.
    pub fn file_name(&self) -> &str {
        &self.name
    }

    pub fn contains(&self, p: &StorePath) -> bool {
        self.roots.contains(p)
    }

    /// Creates and write-locks the file. Like Nix: if a GC got in between creating and
    /// locking (it unlinks unlocked files and writes `d` into them), start again.
    fn open(&mut self) -> Result<&mut Flock<File>, RootError> {
        if self.closed {
            return Err(RootError::Io(std::io::Error::other(
                "the connection has ended",
            )));
        }
        if self.file.is_none() {
            let dir = sys::open(
                self.dir.as_path(),
                OFlag::O_RDONLY | OFlag::O_DIRECTORY,
                Mode::empty(),
            )?;
            let mut tries = 0;
            let locked = loop {
                tries += 1;
                let fd = match sys::openat(
                    dir.as_fd(),
                    self.name.as_str(),
                    OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW,
                    Mode::from_bits_truncate(0o600),
                ) {
                    Ok(fd) => fd,
                    Err(Errno::EEXIST) if tries < 10 => {
                        // Stale: a previous process with our pid cannot still be alive.
                        let _ = nix::unistd::unlinkat(
                            Some(dir.as_raw_fd()),
                            self.name.as_str(),
                            nix::unistd::UnlinkatFlags::NoRemoveDir,
                        );
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                let locked = Flock::lock(File::from(fd), FlockArg::LockExclusive)
                    .map_err(|(_, e)| RootError::from(e))?;
                if locked.metadata()?.len() == 0 {
                    break locked;
                }
                if tries >= 10 {
                    return Err(RootError::Io(std::io::Error::other(
                        "the garbage collector keeps deleting our temporary roots file",
                    )));
                }
            };
            self.file = Some(locked);
        }
        self.file
            .as_mut()
            .ok_or_else(|| RootError::Io(std::io::Error::other("temporary roots file")))
    }

    fn append(&mut self, line: &str) -> Result<(), RootError> {
        let f = self.open()?;
        f.write_all(line.as_bytes())?;
        Ok(())
    }
}

impl TempRoots {
    /// The connection ended: remove the file (its roots stop counting) and refuse new ones.
    pub fn close(&mut self) {
        self.closed = true;
        self.remove();
    }

    fn remove(&mut self) {
        if self.file.is_some() {
            // Unlink while still holding the lock, so no GC ever sees the file unlocked.
            let _ = std::fs::remove_file(self.dir.join(&self.name));
            self.file = None;
        }
        self.gc_lock = None;
        self.roots.clear();
        if let Some(c) = self.charge.as_mut() {
            c.release();
        }
    }
}

impl Drop for TempRoots {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Adds `path` to `roots` the way Nix's `addTempRoot` does: under a shared GC lock when no GC
/// runs, otherwise by telling the running GC through its socket first. A root that cannot reach
/// a running collector is an error, never silently missed (the collector would delete the path).
pub fn add_temp_root(
    store: &Store,
    roots: &mut TempRoots,
    path: &StorePath,
) -> Result<(), RootError> {
    if roots.contains(path) {
        return Ok(());
    }
    if roots.roots.len() >= MAX_TEMP_ROOTS {
        return Err(RootError::TooMany);
    }
    if let Some(c) = roots.charge.as_ref() {
        c.check()?;
    }
    roots.open()?;
    let full = store.full(path);
    let mut unlocked = match roots.gc_lock.take() {
        Some(f) => f,
        None => store.open_gc_lock()?,
    };
    let mut pause = Duration::from_millis(5);
    let deadline = std::time::Instant::now() + GC_REACH_DEADLINE;
    let hold = loop {
        match Flock::lock(unlocked, FlockArg::LockSharedNonblock) {
            Ok(l) => break GcHold::Shared(l),
            Err((f, Errno::EWOULDBLOCK)) => unlocked = f,
            Err((_, e)) => return Err(e.into()),
        }
        // Before A70 the root then went to the file only, which the collector has read.
        if cfg!(feature = "without-a70") {
            break GcHold::Open(unlocked);
        }
        // Our own collector: told directly. If it does not hold the lock yet, whoever does
        // is told through its socket too.
        if store.gc.note_temp_root(path.hash_part()) == Some(true) {
            break GcHold::Open(unlocked);
        }
        // A collector holds the lock: tell it. If it is just starting (no socket yet) or just
        // ending (its socket refuses), look at the lock again.
        match tell_running_gc(store, &full) {
            Ok(()) => break GcHold::Open(unlocked),
            Err(e) if std::time::Instant::now() >= deadline => {
                return Err(RootError::GcUnreachable(e.to_string()))
            }
            Err(_) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(200));
            }
        }
    };
    // Written while the shared lock is held, as in Nix: a collector starting now waits for it
    // and then reads the file.
    let written = roots.append(&format!("{full}\0"));
    roots.gc_lock = match hold {
        GcHold::Shared(l) => l.unlock().ok(),
        GcHold::Open(f) => Some(f),
    };
    written?;
    roots.roots.insert(path.clone());
    if let Some(c) = roots.charge.as_mut() {
        c.count();
    }
    Ok(())
}

/// Audits an untrusted client's temp-root budget hit (issue 19: every limit hit is audited).
pub fn audit_budget(
    store: &Store,
    client: &stockade_common::ipc::msg::ClientIdentity,
    hit: &crate::rootbudget::BudgetHit,
) {
    let limit = match hit {
        crate::rootbudget::BudgetHit::Connection(_) => "untrusted-temp-roots",
        crate::rootbudget::BudgetHit::Uid(_) => "untrusted-temp-roots-per-uid",
    };
    store.audit.client_event(
        crate::audit::Severity::Warning,
        client,
        &[
            ("op", "addTempRoot"),
            ("outcome", "limit"),
            ("limit", limit),
        ],
    );
}

/// How long a temp root keeps trying to reach a running collector.
const GC_REACH_DEADLINE: Duration = Duration::from_secs(30);

/// A collector is running: send it `<path>\n` on its socket and wait for its `1`.
fn tell_running_gc(store: &Store, full: &str) -> std::io::Result<()> {
    let mut s = store.connect_gc()?;
    s.set_read_timeout(Some(Duration::from_secs(600)))?;
    s.set_write_timeout(Some(Duration::from_secs(60)))?;
    s.write_all(format!("{full}\n").as_bytes())?;
    let mut ack = [0u8; 1];
    match s.read(&mut ack)? {
        1 if ack == *b"1" => Ok(()),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "the collector did not acknowledge the root",
        )),
    }
}

/// `gcroots/auto/<b32(sha1(link))>` → `link`, replaced atomically. The link itself is never
/// looked at: it may be any path, including one the client does not own (as in nix-daemon).
pub fn add_indirect_root(store: &Store, link: &str) -> Result<String, RootError> {
    let link = canon_path(link).ok_or_else(|| RootError::BadLink(link.to_string()))?;
    if link.len() > MAX_LINK_LEN {
        return Err(RootError::BadLink(link));
    }
    let hash = base32::encode(Hash::of(HashAlgo::Sha1, link.as_bytes()).digest());
    let auto = sys::open(
        store.state_dir.join("gcroots/auto").as_path(),
        OFlag::O_RDONLY | OFlag::O_DIRECTORY,
        Mode::empty(),
    )?;
    let tmp = format!("{hash}.tmp-{}", store.unique_suffix());
    nix::unistd::symlinkat(link.as_str(), Some(auto.as_raw_fd()), tmp.as_str())?;
    if let Err(e) = nix::fcntl::renameat(
        Some(auto.as_raw_fd()),
        tmp.as_str(),
        Some(auto.as_raw_fd()),
        hash.as_str(),
    ) {
        let _ = nix::unistd::unlinkat(
            Some(auto.as_raw_fd()),
            tmp.as_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
        return Err(e.into());
    }
    Ok(link)
}

/// Nix's `addPermRoot` (trusted clients only): the symlink `link` → `path`, replacing only a
/// symlink into the store, registered as an indirect root; `path` becomes a temporary root
/// first. Unlike nix-daemon, which makes the link as root wherever the client asks, the
/// store-writer makes it only below the state directory (`gcroots/` is the usual place),
/// walking there without following symlinks: a privileged process creating links at
/// client-chosen paths is what Stockade avoids (and Landlock would refuse them anyway).
pub fn add_perm_root(
    store: &Store,
    roots: &mut TempRoots,
    path: &StorePath,
    link: &str,
) -> Result<String, RootError> {
    let link = canon_path(link).ok_or_else(|| RootError::BadLink(link.to_string()))?;
    if link.len() > MAX_LINK_LEN {
        return Err(RootError::BadLink(link));
    }
    let store_dir = store.store_dir.as_str();
    if link == store_dir || link.starts_with(&format!("{store_dir}/")) {
        return Err(RootError::InStore(link));
    }
    let state = store.state_dir.to_string_lossy().into_owned();
    let Some(rel) = link.strip_prefix(&format!("{state}/")) else {
        return Err(RootError::OutsideState { link, state });
    };
    let (parents, name) = rel.rsplit_once('/').unwrap_or(("", rel));
    add_temp_root(store, roots, path)?;
    let mut dir = sys::open(
        store.state_dir.as_path(),
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
        Mode::empty(),
    )?;
    for part in parents.split('/').filter(|p| !p.is_empty()) {
        dir = sys::open_dir_at(dir.as_fd(), part)?;
    }
    match sys::lstat_at(dir.as_fd(), name) {
        Ok(st) => {
            let into_store = sys::file_type(&st) == SFlag::S_IFLNK
                && nix::fcntl::readlinkat(Some(dir.as_raw_fd()), name)
                    .is_ok_and(|t| t.as_bytes().starts_with(format!("{store_dir}/").as_bytes()));
            if !into_store {
                return Err(RootError::Exists(link));
            }
        }
        Err(Errno::ENOENT) => {}
        Err(e) => return Err(e.into()),
    }
    let tmp = format!(".{name}.tmp-{}", store.unique_suffix());
    nix::unistd::symlinkat(
        store.full(path).as_str(),
        Some(dir.as_raw_fd()),
        tmp.as_str(),
    )?;
    // The link belongs to the store owner, as nix-daemon's would.
    let _ = nix::unistd::fchownat(
        Some(dir.as_raw_fd()),
        tmp.as_str(),
        Some(store.euid),
        Some(store.egid),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    );
    if let Err(e) = nix::fcntl::renameat(
        Some(dir.as_raw_fd()),
        tmp.as_str(),
        Some(dir.as_raw_fd()),
        name,
    ) {
        let _ = nix::unistd::unlinkat(
            Some(dir.as_raw_fd()),
            tmp.as_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
        return Err(e.into());
    }
    add_indirect_root(store, &link)
}

/// Lexically canonical absolute path (`//`, `.` and `..` resolved without touching the file
/// system), as Nix's `canonPath`; `None` for relative paths or NULs.
pub fn canon_path(p: &str) -> Option<String> {
    if !p.starts_with('/') || p.contains('\0') {
        return None;
    }
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    Some(format!("/{}", parts.join("/")))
}

/// Store path → link names, as nix-daemon's `Roots` (`std::unordered_map<StorePath,
/// std::unordered_set<std::string>>`) holds them, iterating in the same order.
pub type Roots = CxxMap<StorePath, CxxSet<String>>;

pub fn new_roots() -> Roots {
    CxxMap::new(|p: &StorePath| store_path_hash(p.base_name()))
}

fn new_links() -> CxxSet<String> {
    CxxSet::new(|s: &String| string_hash(s.as_bytes()))
}

/// `roots[path].emplace(link)`.
fn add_root(roots: &mut Roots, path: StorePath, link: String) {
    roots.entry_or_insert_with(path, new_links).insert(link);
}

/// The roots Nix's `findRoots(censor)` reports, found in its order (`gcroots/`, `profiles/`,
/// runtime roots, temporary roots), so that [`Roots::iter`] gives nix-daemon's order.
/// Nix's notices (stale links removed, invalid roots skipped) go to `log` at its info level.
pub fn find_roots(
    store: &Store,
    is_valid: &mut dyn FnMut(&StorePath) -> bool,
    censor: bool,
    log: &mut dyn FnMut(u32, String),
) -> Roots {
    let mut roots = find_roots_no_temp(store, is_valid, censor, log);
    find_temp_roots(store, &mut roots, censor, log);
    roots
}

/// Nix's `findRootsNoTemp`: the permanent and runtime roots, without the temporary ones
/// (which a collector reads under its lock and then receives through its socket).
pub fn find_roots_no_temp(
    store: &Store,
    is_valid: &mut dyn FnMut(&StorePath) -> bool,
    censor: bool,
    log: &mut dyn FnMut(u32, String),
) -> Roots {
    let mut roots = new_roots();
    let mut walker = Walker {
        store_dir: &store.store_dir,
        auto_dir: store.state_dir.join("gcroots/auto"),
        roots: &mut roots,
        is_valid: &mut *is_valid,
        entries: 0,
        log,
    };
    walker.walk(&store.state_dir.join("gcroots"));
    walker.walk(&store.state_dir.join("profiles"));
    find_runtime_roots(&store.store_dir, is_valid, censor, &mut roots);
    roots
}

/// Store paths that running processes use, as Nix's findRuntimeRoots finds them and in its
/// order: the absolute targets of `/proc/<pid>/{exe,cwd,fd/*}`, the files of
/// `/proc/<pid>/maps` lines, store paths named in `/proc/<pid>/environ`, and a few kernel
/// settings. The master's roots-reader reads them, as it may read every process; without one
/// the store-writer reads what it can itself ([`crate::roots_runtime`]).
fn find_runtime_roots(
    store_dir: &StoreDir,
    is_valid: &mut dyn FnMut(&StorePath) -> bool,
    censor: bool,
    roots: &mut Roots,
) {
    // Nix's UncheckedRoots: target → links, an unordered_map of unordered_sets, filled in the
    // order the pairs were found.
    let mut unchecked: CxxMap<String, CxxSet<String>> =
        CxxMap::new(|s: &String| string_hash(s.as_bytes()));
    for (target, link) in crate::roots_runtime::runtime_pairs(store_dir) {
        unchecked
            .entry_or_insert_with(target, new_links)
            .insert(link);
    }
    for (target, links) in unchecked.iter() {
        let Ok((path, _)) = store_dir.parse_prefix(target) else {
            continue;
        };
        if !is_valid(&path) {
            continue;
        }
        let entry = roots.entry_or_insert_with(path, new_links);
        if censor {
            entry.insert(CENSORED.to_string());
        } else {
            for l in links.keys() {
                entry.insert(l.clone());
            }
        }
    }
}

struct Walker<'a> {
    store_dir: &'a StoreDir,
    auto_dir: PathBuf,
    roots: &'a mut Roots,
    is_valid: &'a mut dyn FnMut(&StorePath) -> bool,
    entries: usize,
    log: &'a mut dyn FnMut(u32, String),
}

impl Walker<'_> {
    /// Depth-first over `top` as Nix's `findRoots` goes (each directory read whole, then its
    /// entries in that order, a subdirectory walked where it comes), never following a
    /// symlink to a directory; unreadable parts are skipped as Nix skips
    /// EACCES/ENOENT/ENOTDIR.
    fn walk(&mut self, top: &Path) {
        let Ok(fd) = sys::open(
            top,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
            Mode::empty(),
        ) else {
            return;
        };
        self.walk_dir(fd, top, 0);
    }

    /// One directory of [`Walker::walk`]; false when the walk must stop (too many entries).
    fn walk_dir(&mut self, dir: OwnedFd, path: &Path, depth: usize) -> bool {
        let Ok(entries) = sys::read_dir(dir.as_fd()) else {
            return true;
        };
        for (name, ty) in entries {
            self.entries += 1;
            if self.entries > MAX_ROOT_ENTRIES {
                log::warn!("FindRoots: more than {MAX_ROOT_ENTRIES} entries, stopping");
                return false;
            }
            let child = path.join(&name);
            let ty = match ty {
                Some(t) => Some(t),
                None => sys::lstat_at(dir.as_fd(), name.as_os_str())
                    .ok()
                    .map(|st| type_of(&st)),
            };
            match ty {
                Some(Type::Directory) if depth < MAX_ROOT_DEPTH => {
                    if let Ok(sub) = sys::open_dir_at(dir.as_fd(), name.as_os_str()) {
                        if !self.walk_dir(sub, &child, depth + 1) {
                            return false;
                        }
                    }
                }
                Some(Type::Symlink) => self.link(dir.as_fd(), &name, &child),
                Some(Type::File) => {
                    let base = name.to_string_lossy();
                    if let Ok(sp) = StorePath::from_base_name(&base) {
                        if (self.is_valid)(&sp) {
                            self.add(sp, &child);
                        }
                    }
                }
                _ => {}
            }
        }
        true
    }

    fn link(&mut self, dir: BorrowedFd<'_>, name: &OsString, path: &Path) {
        let Ok(target) = nix::fcntl::readlinkat(Some(dir.as_raw_fd()), name.as_os_str()) else {
            return;
        };
        let target = target.to_string_lossy().into_owned();
        if self.in_store(&target) {
            self.found(path, &target);
            return;
        }
        // An indirect root: a link to a link into the store. Only link metadata is read
        // (lstat, readlink); nothing is opened through it.
        let parent = path
            .parent()
            .map_or("/".into(), |p| p.to_string_lossy().into_owned());
        let abs = if target.starts_with('/') {
            canon_path(&target)
        } else {
            canon_path(&format!("{parent}/{target}"))
        };
        let Some(abs) = abs else { return };
        match std::fs::symlink_metadata(&abs) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if path.starts_with(&self.auto_dir) {
                    (self.log)(
                        INFO,
                        format!("removing stale link from '{}' to '{abs}'", path.display()),
                    );
                    let _ = nix::unistd::unlinkat(
                        Some(dir.as_raw_fd()),
                        name.as_os_str(),
                        nix::unistd::UnlinkatFlags::NoRemoveDir,
                    );
                }
            }
            Err(_) => {}
            Ok(md) if md.file_type().is_symlink() => {
                if let Ok(t2) = std::fs::read_link(&abs) {
                    let t2 = t2.to_string_lossy().into_owned();
                    if self.in_store(&t2) {
                        self.found(Path::new(&abs), &t2);
                    }
                }
            }
            Ok(_) => {}
        }
    }

    fn in_store(&self, target: &str) -> bool {
        target
            .strip_prefix(self.store_dir.as_str())
            .is_some_and(|r| r.starts_with('/'))
    }

    fn found(&mut self, link: &Path, target: &str) {
        if let Ok((sp, _)) = self.store_dir.parse_prefix(target) {
            if (self.is_valid)(&sp) {
                self.add(sp, link);
            } else {
                (self.log)(
                    INFO,
                    format!(
                        "skipping invalid root from '{}' to '{target}'",
                        link.display()
                    ),
                );
            }
        }
    }

    fn add(&mut self, sp: StorePath, link: &Path) {
        add_root(self.roots, sp, link.to_string_lossy().into_owned());
    }
}

fn type_of(st: &nix::sys::stat::FileStat) -> Type {
    match sys::file_type(st) {
        SFlag::S_IFDIR => Type::Directory,
        SFlag::S_IFLNK => Type::Symlink,
        SFlag::S_IFREG => Type::File,
        SFlag::S_IFIFO => Type::Fifo,
        SFlag::S_IFSOCK => Type::Socket,
        SFlag::S_IFCHR => Type::CharacterDevice,
        _ => Type::BlockDevice,
    }
}

/// Reads every temporary roots file as Nix's GC does: a file whose lock can be taken belongs
/// to a dead process and is removed (with the `d` marker Nix writes).
pub fn find_temp_roots(
    store: &Store,
    roots: &mut Roots,
    censor: bool,
    log: &mut dyn FnMut(u32, String),
) {
    let dir_path = store.state_dir.join("temproots");
    let Ok(dir) = sys::open(
        dir_path.as_path(),
        OFlag::O_RDONLY | OFlag::O_DIRECTORY,
        Mode::empty(),
    ) else {
        return;
    };
    let Ok(entries) = sys::read_dir(dir.as_fd()) else {
        return;
    };
    for (name, _) in entries {
        let bytes = name.as_bytes();
        if bytes.first() == Some(&b'.') {
            continue;
        }
        let digits: String = bytes
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .map(|&b| b as char)
            .collect();
        let Ok(pid) = digits.parse::<i32>() else {
            continue;
        };
        let Ok(fd) = sys::openat(
            dir.as_fd(),
            name.as_os_str(),
            OFlag::O_RDWR | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK,
            Mode::empty(),
        ) else {
            continue;
        };
        let mut file = match Flock::lock(File::from(fd), FlockArg::LockExclusiveNonblock) {
            Ok(mut stale) => {
                log(
                    INFO,
                    format!(
                        "removing stale temporary roots file '{}'",
                        dir_path.join(&name).display()
                    ),
                );
                let _ = nix::unistd::unlinkat(
                    Some(dir.as_raw_fd()),
                    name.as_os_str(),
                    nix::unistd::UnlinkatFlags::NoRemoveDir,
                );
                let _ = stale.write_all(b"d");
                continue;
            }
            Err((f, _)) => f,
        };
        if !file.metadata().is_ok_and(|m| m.is_file()) {
            continue;
        }
        let mut contents = Vec::new();
        let limit = (MAX_TEMP_ROOTS as u64) * 512;
        if (&mut file).take(limit).read_to_end(&mut contents).is_err() {
            continue;
        }
        let label = if censor {
            CENSORED.to_string()
        } else {
            format!("{{temp:{pid}}}")
        };
        for entry in contents.split(|&b| b == 0) {
            let Ok(s) = std::str::from_utf8(entry) else {
                continue;
            };
            if let Ok(sp) = store.store_dir.parse(s) {
                add_root(roots, sp, label.clone());
            }
        }
    }
}

/// `profiles/per-user/<name>` and `gcroots/per-user/<name>`, mode 0755, owned by the client
/// (V16), as nix-daemon makes them for each connection. Created fd-relatively below the
/// root-owned `per-user` directories, never through a symlink.
pub fn create_user_dirs(store: &Store, user: &str, uid: u32) -> std::io::Result<()> {
    if user.is_empty() || user.contains('/') || user == "." || user == ".." {
        return Err(std::io::Error::other("invalid user name"));
    }
    for base in ["profiles/per-user", "gcroots/per-user"] {
        let parent = sys::open(
            store.state_dir.join(base).as_path(),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
            Mode::empty(),
        )?;
        match nix::sys::stat::mkdirat(
            Some(parent.as_raw_fd()),
            user,
            Mode::from_bits_truncate(0o755),
        ) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(e.into()),
        }
        #[cfg(feature = "without-v16")]
        {
            // The defence off: by path, through whatever is there.
            let p = store.state_dir.join(base).join(user);
            std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
            std::os::unix::fs::chown(&p, Some(uid), Some(store.egid.as_raw()))?;
            continue;
        }
        #[allow(unreachable_code)]
        let fd = sys::open_dir_at(parent.as_fd(), user)?;
        nix::sys::stat::fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(0o755))?;
        if store.cfg.as_root {
            nix::unistd::fchown(
                fd.as_raw_fd(),
                Some(nix::unistd::Uid::from_raw(uid)),
                Some(store.egid),
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_paths() {
        assert_eq!(canon_path("/a//b/./c/../d").as_deref(), Some("/a/b/d"));
        assert_eq!(canon_path("/../..").as_deref(), Some("/"));
        assert_eq!(
            canon_path("/home/u/result/").as_deref(),
            Some("/home/u/result")
        );
        assert_eq!(canon_path("rel/x"), None);
        assert_eq!(canon_path("/a\0b"), None);
    }
}
