//! The walk over one valid path's tree, on directory descriptors, and the hashing of each
//! regular file (through the descriptor it is linked by later) and symlink.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;

use nix::dir::{Dir, Type};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::{FileStat, Mode, SFlag};
use stockade_common::hash::{Encoding, Hash, HashAlgo, HashingWriter};
use stockade_common::nar::NarWriter;

use super::link::Hashed;
use super::{OptimiseError, Stats, LVL_DEBUG, LVL_TALKATIVE, LVL_WARN};
use crate::store::Store;
use crate::sys;

/// Read size for file contents.
const CHUNK: usize = 256 * 1024;

/// One optimisation: where it logs, what it found, the `.links` directory it works in.
pub struct Optimiser<'a> {
    pub(super) store: &'a Store,
    /// `<store>/.links`, opened below the store's descriptor.
    pub(super) links: OwnedFd,
    /// Its path, for messages.
    pub(super) links_path: String,
    /// Inodes of the `.links` entries when the run began (Nix's inode hash): a directory entry
    /// with one of them is linked already and skipped unread.
    pub(super) known: HashSet<u64>,
    log: &'a mut dyn FnMut(u32, String),
    /// Lines above this level are not even formatted.
    max_level: u32,
    pub stats: Stats,
    /// Also check the contents of a `.links` entry before linking to it (Nix's repair flag).
    pub(super) repair: bool,
    /// Directories must be made writable for a replacement (learnt at the first refusal).
    pub(super) toggle_dirs: bool,
    /// For the names of temporary links.
    pub(super) pid: u32,
    buf: Vec<u8>,
}

/// A directory being walked: its entries still to visit, last first.
struct Frame {
    fd: OwnedFd,
    path: String,
    pending: Vec<(OsString, Option<Type>)>,
}

impl<'a> Optimiser<'a> {
    pub fn new(
        store: &'a Store,
        log: &'a mut dyn FnMut(u32, String),
        max_level: u32,
        repair: bool,
    ) -> Result<Optimiser<'a>, OptimiseError> {
        let links_path = format!("{}/.links", store.cfg.real_store_dir);
        let links = sys::open_dir_at(store.store_fd(), ".links")
            .map_err(OptimiseError::sys("opening directory", &links_path))?;
        Ok(Optimiser {
            store,
            links,
            links_path,
            known: HashSet::new(),
            log,
            max_level,
            stats: Stats::default(),
            repair,
            toggle_dirs: false,
            pid: std::process::id(),
            buf: Vec::new(),
        })
    }

    /// Sends the line `text` makes when `level` is wanted.
    pub fn say(&mut self, level: u32, text: impl FnOnce() -> String) {
        if level <= self.max_level {
            (self.log)(level, text());
        }
    }

    /// Nix's `warn`.
    pub(super) fn warn(&mut self, text: impl FnOnce() -> String) {
        self.say(LVL_WARN, || format!("\x1b[35;1mwarning:\x1b[0m {}", text()));
    }

    /// Reads the inodes of every `.links` entry (`.` and `..` included, as Nix counts them).
    pub fn load_known(&mut self) -> Result<(), OptimiseError> {
        self.say(LVL_DEBUG, || "loading hash inodes in memory".into());
        let entries = list(self.links.as_fd())
            .map_err(OptimiseError::sys("reading directory", &self.links_path))?;
        self.known.extend(entries.iter().map(|e| e.1));
        let n = self.known.len();
        self.say(LVL_TALKATIVE, || format!("loaded {n} hash inodes"));
        Ok(())
    }

    /// Optimises the store entry `base` (a valid path) and everything below it.
    pub fn path(&mut self, base: &str) -> Result<(), OptimiseError> {
        let store = self.store;
        let path = format!("{}/{base}", store.cfg.real_store_dir);
        let name = OsStr::new(base);
        let st = sys::lstat_at(store.store_fd(), name)
            .map_err(OptimiseError::sys("getting status of", &path))?;
        match sys::file_type(&st) {
            SFlag::S_IFDIR => self.tree(name, path),
            SFlag::S_IFREG => self.regular(store.store_fd(), true, name, &path),
            SFlag::S_IFLNK => self.symlink(store.store_fd(), true, name, &path),
            _ => Ok(()),
        }
    }

    /// A directory tree, depth first, in the order of the directory listings (as Nix).
    fn tree(&mut self, name: &OsStr, path: String) -> Result<(), OptimiseError> {
        let fd = sys::open_dir_at(self.store.store_fd(), name)
            .map_err(OptimiseError::sys("opening directory", &path))?;
        let first = self.frame(fd, path)?;
        let mut stack = vec![first];
        while let Some(top) = stack.last_mut() {
            let Some((name, ty)) = top.pending.pop() else {
                stack.pop();
                continue;
            };
            let child = format!("{}/{}", top.path, name.to_string_lossy());
            let ty = match ty {
                Some(t) => t,
                None => {
                    let st = sys::lstat_at(top.fd.as_fd(), name.as_os_str())
                        .map_err(OptimiseError::sys("getting status of", &child))?;
                    type_of(&st)
                }
            };
            match ty {
                Type::Directory => {
                    let fd = sys::open_dir_at(top.fd.as_fd(), name.as_os_str())
                        .map_err(OptimiseError::sys("opening directory", &child))?;
                    let frame = self.frame(fd, child)?;
                    stack.push(frame);
                }
                Type::File => self.regular(top.fd.as_fd(), false, &name, &child)?,
                Type::Symlink => self.symlink(top.fd.as_fd(), false, &name, &child)?,
                _ => {}
            }
        }
        Ok(())
    }

    /// A directory's entries to visit: all but those whose inode is a `.links` entry.
    fn frame(&mut self, fd: OwnedFd, path: String) -> Result<Frame, OptimiseError> {
        let entries = list(fd.as_fd()).map_err(OptimiseError::sys("reading directory", &path))?;
        let mut pending = Vec::with_capacity(entries.len());
        for (name, ino, ty) in entries {
            if name.as_bytes() == b"." || name.as_bytes() == b".." {
                continue;
            }
            if self.known.contains(&ino) {
                self.say(LVL_DEBUG, || {
                    format!("'{}' is already linked", name.to_string_lossy())
                });
                continue;
            }
            pending.push((name, ty));
        }
        pending.reverse();
        Ok(Frame { fd, path, pending })
    }

    /// A regular file: opened once, hashed through that descriptor, its status taken before
    /// and after, then linked (link.rs checks the link against the same descriptor).
    fn regular(
        &mut self,
        dir: BorrowedFd<'_>,
        in_store_dir: bool,
        name: &OsStr,
        path: &str,
    ) -> Result<(), OptimiseError> {
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY;
        let fd = match sys::openat(dir, name, flags, Mode::empty()) {
            Ok(fd) => fd,
            // Replaced by a symlink since it was listed.
            Err(Errno::ELOOP) => {
                self.changed(path);
                return Ok(());
            }
            Err(e) => return Err(OptimiseError::sys("opening file", path)(e)),
        };
        let file = File::from(fd);
        let st = self.status(&file, path)?;
        if sys::file_type(&st) != SFlag::S_IFREG {
            self.changed(path);
            return Ok(());
        }
        // Something wrote to the store (Nix's "SNAFU" case): leave it alone.
        if st.st_mode & 0o200 != 0 {
            self.warn(|| format!("skipping suspicious writable file '{path}'"));
            return Ok(());
        }
        if self.already_linked(&st, path) {
            return Ok(());
        }
        let Some(hash) = self.hash_file(&file, &st, path)? else {
            self.changed(path);
            return Ok(());
        };
        let after = self.status(&file, path)?;
        if !same_state(&st, &after, false) {
            self.changed(path);
            return Ok(());
        }
        // Only the change time moved: another run linked this inode meanwhile, or a chmod was
        // made and undone, or a write put the mtime back. The contents tell.
        if !same_state(&st, &after, true) && self.hash_file(&file, &st, path)? != Some(hash) {
            self.changed(path);
            return Ok(());
        }
        self.hashed(Hashed {
            dir,
            in_store_dir,
            name,
            path,
            file: &file,
            st,
            hash,
            symlink: false,
        })
    }

    /// A symlink, held by an `O_PATH` descriptor: its status and target come from that one
    /// inode (a symlink's target never changes in place).
    fn symlink(
        &mut self,
        dir: BorrowedFd<'_>,
        in_store_dir: bool,
        name: &OsStr,
        path: &str,
    ) -> Result<(), OptimiseError> {
        let fd = sys::openat(dir, name, OFlag::O_PATH | OFlag::O_NOFOLLOW, Mode::empty())
            .map_err(OptimiseError::sys("getting status of", path))?;
        let file = File::from(fd);
        let st = self.status(&file, path)?;
        if sys::file_type(&st) != SFlag::S_IFLNK {
            self.changed(path);
            return Ok(());
        }
        if self.already_linked(&st, path) {
            return Ok(());
        }
        let target = nix::fcntl::readlinkat(Some(file.as_raw_fd()), "")
            .map_err(OptimiseError::sys("reading symbolic link", path))?;
        let hash = nar_hash(path, |nar| nar.symlink(target.as_bytes()))?;
        self.hashed(Hashed {
            dir,
            in_store_dir,
            name,
            path,
            file: &file,
            st,
            hash,
            symlink: true,
        })
    }

    fn hashed(&mut self, node: Hashed<'_>) -> Result<(), OptimiseError> {
        let path = node.path;
        let hash = node.hash;
        self.say(LVL_DEBUG, || {
            format!("'{path}' has hash '{}'", hash.to_typed(Encoding::Base32))
        });
        self.link(&node)
    }

    /// A file with other links whose inode is a `.links` entry already (a top-level file;
    /// inside a directory the listing skipped it).
    fn already_linked(&mut self, st: &FileStat, path: &str) -> bool {
        if st.st_nlink > 1 && self.known.contains(&st.st_ino) {
            let others = st.st_nlink - 2;
            self.say(LVL_DEBUG, || {
                format!("'{path}' is already linked, with {others} other file(s)")
            });
            return true;
        }
        false
    }

    fn status(&self, file: &File, path: &str) -> Result<FileStat, OptimiseError> {
        sys::fstat(file.as_fd()).map_err(OptimiseError::sys("getting status of", path))
    }

    /// A file left alone because it changed under us.
    pub(super) fn changed(&mut self, path: &str) {
        self.stats.changed += 1;
        self.warn(|| format!("not linking '{path}': it changed while it was being optimised"));
    }

    /// The sha256 of the NAR of the regular file `file` as `st` describes it (executable bit,
    /// size), read through the descriptor. `None` when it holds fewer bytes than `st` says.
    pub(super) fn hash_file(
        &mut self,
        file: &File,
        st: &FileStat,
        path: &str,
    ) -> Result<Option<Hash>, OptimiseError> {
        let size = u64::try_from(st.st_size).unwrap_or(0);
        let executable = st.st_mode & 0o100 != 0;
        if self.buf.is_empty() {
            self.buf = vec![0u8; CHUNK];
        }
        let buf = &mut self.buf;
        let mut short = false;
        let hash = nar_hash(path, |nar| {
            nar.regular(executable, size)?;
            let mut offset = 0u64;
            while offset < size {
                let want = usize::try_from(size - offset)
                    .unwrap_or(usize::MAX)
                    .min(buf.len());
                let chunk = buf.get_mut(..want).unwrap_or_default();
                let n = match file.read_at(chunk, offset) {
                    Ok(0) => {
                        short = true;
                        return Ok(());
                    }
                    Ok(n) => n.min(want),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                nar.contents(chunk.get(..n).unwrap_or_default())?;
                offset += n as u64;
            }
            Ok(())
        });
        match hash {
            _ if short => Ok(None),
            Ok(h) => Ok(Some(h)),
            Err(e) => Err(e),
        }
    }
}

/// The sha256 of the single-node NAR `write` produces.
fn nar_hash(
    path: &str,
    write: impl FnOnce(&mut NarWriter<HashingWriter<io::Sink>>) -> io::Result<()>,
) -> Result<Hash, OptimiseError> {
    let err = |source| OptimiseError::Hash {
        path: path.to_string(),
        source,
    };
    let mut nar = NarWriter::new(HashingWriter::sink(HashAlgo::Sha256)).map_err(err)?;
    write(&mut nar).map_err(err)?;
    let (hash, _, _) = nar.finish().map_err(err)?.finish();
    Ok(hash)
}

/// Whether `now` is the inode `then` described with, as far as its status shows, the same
/// contents: inode, size, mode, and mtime (any write sets it to the current time); with
/// `ctime`, also the change time (a chmod, a rename, a write that put the mtime back). A link
/// changes the change time, so it is only compared across a hash.
pub(super) fn same_state(then: &FileStat, now: &FileStat, ctime: bool) -> bool {
    then.st_ino == now.st_ino
        && then.st_dev == now.st_dev
        && then.st_size == now.st_size
        && then.st_mode == now.st_mode
        && then.st_mtime == now.st_mtime
        && then.st_mtime_nsec == now.st_mtime_nsec
        && (!ctime || (then.st_ctime == now.st_ctime && then.st_ctime_nsec == now.st_ctime_nsec))
}

/// Whether a write made now could leave `st`'s mtime as it is: the mtime is within the
/// file system's timestamp granularity of the present. Never so for canonical store files
/// (mtime 1).
pub(super) fn racy(st: &FileStat) -> bool {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(i64::MAX, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    st.st_mtime >= now.saturating_sub(2)
}

fn type_of(st: &FileStat) -> Type {
    match sys::file_type(st) {
        SFlag::S_IFDIR => Type::Directory,
        SFlag::S_IFREG => Type::File,
        SFlag::S_IFLNK => Type::Symlink,
        _ => Type::Fifo,
    }
}

/// A directory's entries with their inode numbers and (where the file system says) types, in
/// listing order, `.` and `..` included.
fn list(dir: BorrowedFd<'_>) -> nix::Result<Vec<(OsString, u64, Option<Type>)>> {
    let mut d = Dir::openat(
        Some(dir.as_raw_fd()),
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut out = Vec::new();
    for entry in d.iter() {
        let entry = entry?;
        let name = OsStr::from_bytes(entry.file_name().to_bytes()).to_os_string();
        out.push((name, entry.ino(), entry.file_type()));
    }
    Ok(out)
}
