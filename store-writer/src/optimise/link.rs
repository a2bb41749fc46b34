//! Linking one hashed file: making it the `.links` entry of its hash, or replacing it by a hard
//! link to the entry there, with Nix's handling of a corrupted entry (wrong size), of an inode
//! that is the entry already, of `EMLINK`, and of read-only directories.
//!
//! What a concurrent change can do. Store files are read-only with mtime 1, so only root or
//! the store owner can change one; a `write` or `truncate` sets its mtime to the current time,
//! a chmod or rename its change time. A file is hashed through one descriptor, its status taken
//! before and after (when only the change time moved, as another run's link or a write that put
//! the mtime back does, it is hashed again). The link is then made by name and checked against
//! that descriptor: the new `.links` entry, or the inode that an atomic exchange moved out of the
//! file's place, must be the very inode hashed, with the size, mode and mtime it had before the
//! hash (a file whose mtime is too recent for a write to move it is hashed again instead).
//! Otherwise the link is undone (the new entry removed, the exchange swapped back) and the file
//! is left as it is. So no `.links` entry is made from, and no file is replaced on behalf of,
//! contents other than those hashed, for any change made before that check, short of a write
//! that also puts the mtime back between the hash and the link. A writer that keeps the file
//! open and writes after the check changes an inode that is now shared, as it could change any
//! linked file later (so with Nix); so may a write through a shared mapping dirtied before the
//! run, which need not move the mtime. All `.links` changes of this process are serialised,
//! so no thread links to an entry that another is about to take back.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, RenameFlags};
use nix::sys::stat::{FileStat, Mode};
use nix::sys::time::TimeSpec;
use nix::unistd::UnlinkatFlags;
use stockade_common::hash::{Hash, HashAlgo, HashingWriter};

use super::walk::{racy, same_state};
use super::{OptimiseError, Optimiser, LVL_DEBUG, LVL_ERROR, LVL_INFO, LVL_TALKATIVE};
use crate::canon::MTIME;
use crate::sys;

/// Serialises this process's changes to `.links` (concurrent runs, auto-optimised adds, the
/// collector's removal of entries nothing links to).
static LINKS: Mutex<()> = Mutex::new(());

/// Holds [`LINKS`]: no other thread of this process adds or removes `.links` entries meanwhile.
pub fn links_lock() -> std::sync::MutexGuard<'static, ()> {
    LINKS.lock().unwrap_or_else(|e| e.into_inner())
}

/// How often an entry that a collector removed between two steps is made anew.
const ATTEMPTS: usize = 3;

/// Numbers the temporary links of this process.
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A file or symlink, hashed.
pub(super) struct Hashed<'f> {
    /// Its directory, and whether that is the store directory itself.
    pub dir: BorrowedFd<'f>,
    pub in_store_dir: bool,
    pub name: &'f OsStr,
    pub path: &'f str,
    /// The descriptor it was hashed through (`O_PATH` for a symlink).
    pub file: &'f File,
    /// Its status before the hash.
    pub st: FileStat,
    pub hash: Hash,
    pub symlink: bool,
}

enum Step {
    Done,
    /// The entry appeared or vanished meanwhile: look again.
    Again,
}

impl Optimiser<'_> {
    pub(super) fn link(&mut self, n: &Hashed<'_>) -> Result<(), OptimiseError> {
        let b32 = n.hash.to_base32();
        let link_path = format!("{}/{b32}", self.links_path);
        let _serial = LINKS.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..ATTEMPTS {
            match sys::lstat_at(self.links.as_fd(), b32.as_str()) {
                Ok(entry) if self.corrupted(n, &b32, &entry) => {
                    self.warn(|| format!("removing corrupted link '{link_path}'"));
                    self.warn(|| {
                        "There may be more corrupted paths.\nYou should run \
                         `nix-store --verify --check-contents --repair` to fix them all"
                            .to_string()
                    });
                    let _ = unlink(self.links.as_fd(), &b32);
                }
                Ok(entry) => match self.replace(n, &b32, &link_path, &entry)? {
                    Step::Done => return Ok(()),
                    Step::Again => continue,
                },
                Err(Errno::ENOENT) => {}
                Err(e) => return Err(OptimiseError::sys("getting status of", &link_path)(e)),
            }
            if let Step::Done = self.create(n, &b32, &link_path)? {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Whether the entry cannot hold `n`'s contents: another size or, when repairing,
    /// another hash.
    fn corrupted(&self, n: &Hashed<'_>, b32: &str, entry: &FileStat) -> bool {
        if entry.st_size != n.st.st_size {
            return true;
        }
        if !self.repair {
            return false;
        }
        let mut h = HashingWriter::sink(HashAlgo::Sha256);
        match stockade_common::nar::dump_at(self.links.as_fd(), OsStr::new(b32), &mut h) {
            Ok(_) => h.finish().0 != n.hash,
            Err(_) => true,
        }
    }

    /// `n` becomes the entry of its hash.
    fn create(
        &mut self,
        n: &Hashed<'_>,
        b32: &str,
        link_path: &str,
    ) -> Result<Step, OptimiseError> {
        let links = self.links.as_fd();
        match linkat(n.dir, n.name, links, OsStr::new(b32)) {
            Ok(()) => {}
            Err(Errno::EEXIST) => return Ok(Step::Again),
            // On ext4 the directory index may be full: this content is not deduplicated.
            Err(Errno::ENOSPC) => {
                let path = n.path;
                self.say(LVL_INFO, || {
                    format!(
                        "cannot link '{link_path}' to '{path}': {}",
                        Errno::ENOSPC.desc()
                    )
                });
                return Ok(Step::Done);
            }
            Err(errno) => {
                return Err(OptimiseError::Link {
                    to: link_path.to_string(),
                    from: n.path.to_string(),
                    errno,
                })
            }
        }
        if is_inode(self.links.as_fd(), OsStr::new(b32), &n.st) && self.unchanged(n)? {
            self.known.insert(n.st.st_ino);
            return Ok(Step::Done);
        }
        // Made from another inode (renamed over the file meanwhile) or from changed contents:
        // the entry was made just now, under the lock, so it is ours to take back.
        if let Err(e) = unlink(self.links.as_fd(), b32) {
            self.say(LVL_ERROR, || {
                format!("unable to unlink '{link_path}': {}", e.desc())
            });
        }
        self.changed(n.path);
        Ok(Step::Done)
    }

    /// Replaces `n` by a hard link to `entry`, its hash's entry, through a temporary link in
    /// the store directory and an atomic exchange.
    fn replace(
        &mut self,
        n: &Hashed<'_>,
        b32: &str,
        link_path: &str,
        entry: &FileStat,
    ) -> Result<Step, OptimiseError> {
        let path = n.path;
        if entry.st_ino == n.st.st_ino && entry.st_dev == n.st.st_dev {
            self.already_linked_to(path, link_path);
            return Ok(Step::Done);
        }
        self.say(LVL_TALKATIVE, || {
            format!("linking '{path}' to '{link_path}'")
        });
        let st = self.store;
        let store = st.store_fd();
        let n_tmp = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = format!(".tmp-link-{}-{n_tmp}", self.pid);
        let tmp_name = OsStr::new(&tmp);
        let tmp_path = format!("{}/{tmp}", st.cfg.real_store_dir);
        match linkat(self.links.as_fd(), OsStr::new(b32), store, tmp_name) {
            Ok(()) => {}
            // Too many links to one inode (empty files, most often): keep this copy.
            Err(Errno::EMLINK) => {
                if n.st.st_size != 0 {
                    self.say(LVL_INFO, || {
                        format!("'{link_path}' has maximum number of links")
                    });
                }
                return Ok(Step::Done);
            }
            Err(Errno::ENOENT) => return Ok(Step::Again),
            Err(errno) => {
                return Err(OptimiseError::Link {
                    to: tmp_path,
                    from: link_path.to_string(),
                    errno,
                })
            }
        }
        // Still the entry that was looked at (not one made anew meanwhile by another process).
        if !is_inode(store, tmp_name, entry) {
            self.remove_tmp(&tmp, &tmp_path);
            return Ok(Step::Again);
        }
        let exchange = |flags| {
            nix::fcntl::renameat2(
                Some(store.as_raw_fd()),
                tmp_name,
                Some(n.dir.as_raw_fd()),
                n.name,
                flags,
            )
        };
        let rename_err = |errno| OptimiseError::Rename {
            from: tmp_path.clone(),
            to: path.to_string(),
            errno,
        };
        let mut dir = (!n.in_store_dir).then(|| DirGuard {
            dir: n.dir,
            path: dir_of(path),
            writable: false,
        });
        if let Some(d) = dir.as_mut().filter(|_| self.toggle_dirs) {
            d.make_writable()?;
        }
        let mut swapped = exchange(RenameFlags::RENAME_EXCHANGE);
        // Without CAP_DAC_OVERRIDE even the owner needs write permission on the directory.
        if let (Err(Errno::EACCES), Some(d)) = (swapped, dir.as_mut()) {
            if !d.writable {
                d.make_writable()?;
                self.toggle_dirs = true;
                swapped = exchange(RenameFlags::RENAME_EXCHANGE);
            }
        }
        let moved = match swapped {
            // What was swapped out must be the inode hashed, unchanged; else swap it back.
            Ok(()) => {
                if is_inode(store, tmp_name, &n.st) && self.unchanged(n)? {
                    Ok(())
                } else if is_inode(store, tmp_name, entry) {
                    // The name held the entry already: another run linked it meanwhile.
                    self.remove_tmp(&tmp, &tmp_path);
                    self.already_linked_to(path, link_path);
                    return Ok(Step::Done);
                } else {
                    exchange(RenameFlags::RENAME_EXCHANGE).map_err(rename_err)?;
                    self.remove_tmp(&tmp, &tmp_path);
                    self.changed(path);
                    return Ok(Step::Done);
                }
            }
            // A file system without exchange: check first, then rename over it.
            Err(Errno::EINVAL) => {
                if is_inode(n.dir, n.name, &n.st) && self.unchanged(n)? {
                    nix::fcntl::renameat(
                        Some(store.as_raw_fd()),
                        tmp_name,
                        Some(n.dir.as_raw_fd()),
                        n.name,
                    )
                } else {
                    self.remove_tmp(&tmp, &tmp_path);
                    if is_inode(n.dir, n.name, entry) {
                        self.already_linked_to(path, link_path);
                    } else {
                        self.changed(path);
                    }
                    return Ok(Step::Done);
                }
            }
            Err(e) => Err(e),
        };
        match moved {
            // After an exchange the old file is the temporary name; after a rename it is gone.
            Ok(()) => self.remove_tmp(&tmp, &tmp_path),
            Err(e) => {
                self.remove_tmp(&tmp, &tmp_path);
                // Some file systems count the link the rename makes before the one it drops.
                if e == Errno::EMLINK {
                    self.say(LVL_DEBUG, || {
                        format!("'{link_path}' has reached maximum number of links")
                    });
                    return Ok(Step::Done);
                }
                return Err(rename_err(e));
            }
        }
        self.stats.files_linked += 1;
        self.stats.bytes_freed += u64::try_from(n.st.st_size).unwrap_or(0);
        Ok(Step::Done)
    }

    fn already_linked_to(&mut self, path: &str, link_path: &str) {
        self.say(LVL_DEBUG, || {
            format!("'{path}' is already linked to '{link_path}'")
        });
    }

    /// Whether the inode behind `n.file` still holds what was hashed: the same status (a
    /// symlink's target cannot change), and for a file whose mtime cannot show a write, the
    /// same hash once more.
    fn unchanged(&mut self, n: &Hashed<'_>) -> Result<bool, OptimiseError> {
        if n.symlink {
            return Ok(true);
        }
        let now =
            sys::fstat(n.file.as_fd()).map_err(OptimiseError::sys("getting status of", n.path))?;
        if !same_state(&n.st, &now, false) {
            return Ok(false);
        }
        if !racy(&n.st) {
            return Ok(true);
        }
        Ok(self.hash_file(n.file, &n.st, n.path)? == Some(n.hash))
    }

    fn remove_tmp(&mut self, tmp: &str, tmp_path: &str) {
        if unlink(self.store.store_fd(), tmp).is_err() {
            self.say(LVL_ERROR, || format!("unable to unlink '{tmp_path}'"));
        }
    }
}

/// The directory of a replacement: its mtime, which the rename moves, is made 1 again when
/// dropped, and its mode 0555 again if it had to be made writable, as Nix does around each
/// link.
struct DirGuard<'d> {
    dir: BorrowedFd<'d>,
    /// For messages.
    path: &'d str,
    writable: bool,
}

impl DirGuard<'_> {
    fn make_writable(&mut self) -> Result<(), OptimiseError> {
        let st =
            sys::fstat(self.dir).map_err(OptimiseError::sys("getting status of", self.path))?;
        if st.st_mode & 0o200 == 0 {
            let mode = Mode::from_bits_truncate((st.st_mode & 0o777) | 0o200);
            nix::sys::stat::fchmod(self.dir.as_raw_fd(), mode)
                .map_err(OptimiseError::sys("changing writability of", self.path))?;
        }
        self.writable = true;
        Ok(())
    }
}

impl Drop for DirGuard<'_> {
    fn drop(&mut self) {
        // Best effort, as Nix: the replacement itself is done either way.
        let fd = self.dir.as_raw_fd();
        if self.writable {
            let _ = nix::sys::stat::fchmod(fd, Mode::from_bits_truncate(0o555));
        }
        let _ = nix::sys::stat::futimens(fd, &TimeSpec::UTIME_OMIT, &TimeSpec::new(MTIME, 0));
    }
}

fn linkat(
    from_dir: BorrowedFd<'_>,
    from: &OsStr,
    to_dir: BorrowedFd<'_>,
    to: &OsStr,
) -> nix::Result<()> {
    nix::unistd::linkat(
        Some(from_dir.as_raw_fd()),
        from,
        Some(to_dir.as_raw_fd()),
        to,
        AtFlags::empty(),
    )
}

fn unlink(dir: BorrowedFd<'_>, name: &str) -> nix::Result<()> {
    match nix::unistd::unlinkat(Some(dir.as_raw_fd()), name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether `name` below `dir` is the inode `st` describes.
fn is_inode(dir: BorrowedFd<'_>, name: &OsStr, st: &FileStat) -> bool {
    sys::lstat_at(dir, name).is_ok_and(|now| now.st_ino == st.st_ino && now.st_dev == st.st_dev)
}

/// `path` without its last component.
fn dir_of(path: &str) -> &str {
    path.rsplit_once('/').map_or(path, |(dir, _)| dir)
}
