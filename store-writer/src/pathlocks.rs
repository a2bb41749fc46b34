//! Store path locks as Nix takes them (`<store>/<hash>-<name>.lock`, `flock` exclusive), so
//! that whoever else writes this store (another thread here, a real Nix, a build) cannot
//! install or remove a path while we do (A75). Paths are locked in sorted order, as Nix's
//! `PathLocks` does, so two lockers of overlapping sets cannot deadlock. A lock file is deleted
//! when released; a waiter that then wins a deleted file's lock sees the byte written into it
//! before the unlink and tries again with a fresh file, as in Nix.

use std::collections::BTreeSet;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg, OFlag};
use nix::sys::stat::Mode;
use nix::unistd::UnlinkatFlags;

use stockade_common::store_path::StorePath;

use crate::sys;

/// Held locks on a set of store paths; released (and their lock files deleted) on drop.
pub struct PathGuard<'a> {
    store_fd: BorrowedFd<'a>,
    held: Vec<Held>,
}

/// One held lock: its file's name, the locked descriptor, and the file's device and inode.
struct Held {
    name: String,
    lock: Flock<OwnedFd>,
    id: (u64, u64),
}

/// Locks `paths` (sorted, each once), waiting for other holders.
pub fn lock<'a>(
    store_fd: BorrowedFd<'a>,
    paths: impl IntoIterator<Item = StorePath>,
) -> nix::Result<PathGuard<'a>> {
    let names: BTreeSet<String> = paths
        .into_iter()
        .map(|p| format!("{}.lock", p.base_name()))
        .collect();
    let mut guard = PathGuard {
        store_fd,
        held: Vec::with_capacity(names.len()),
    };
    for name in names {
        let (lock, id) = lock_one(store_fd, &name)?;
        guard.held.push(Held { name, lock, id });
    }
    Ok(guard)
}

fn lock_one(store_fd: BorrowedFd<'_>, name: &str) -> nix::Result<(Flock<OwnedFd>, (u64, u64))> {
    loop {
        let fd = sys::openat(
            store_fd,
            name,
            OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_NOFOLLOW,
            Mode::from_bits_truncate(0o600),
        )?;
        let lock = Flock::lock(fd, FlockArg::LockExclusive).map_err(|(_, e)| e)?;
        // A released lock file has one byte in it and no name any more: try a fresh one.
        let st = sys::fstat(lock.as_fd())?;
        if st.st_size == 0 {
            return Ok((lock, (st.st_dev, st.st_ino)));
        }
    }
}

impl<'a> PathGuard<'a> {
    /// Keeps the locks held past this guard, for [`Pending::release`] after the reply has
    /// gone: the client then does not wait for the lock files' removal.
    pub fn defer(mut self) -> Pending {
        Pending {
            held: std::mem::take(&mut self.held),
        }
    }
}

impl Drop for PathGuard<'_> {
    fn drop(&mut self) {
        release(self.store_fd, self.held.drain(..));
    }
}

/// Locks still held after their guard, released by [`Pending::release`]. Dropped instead,
/// the locks go with their descriptors and the (empty) lock files stay behind, as a Nix killed
/// while holding them leaves them: harmless, a later locker takes the same file.
pub struct Pending {
    held: Vec<Held>,
}

impl Pending {
    pub fn release(mut self, store_fd: BorrowedFd<'_>) {
        release(store_fd, self.held.drain(..));
    }
}

fn release(store_fd: BorrowedFd<'_>, held: impl Iterator<Item = Held>) {
    for Held { name, lock, id } in held {
        // Unlink only the file we hold (its name could have been replaced meanwhile).
        let ours = sys::lstat_at(store_fd, name.as_str())
            .is_ok_and(|named| (named.st_dev, named.st_ino) == id);
        if ours {
            match nix::unistd::unlinkat(
                Some(store_fd.as_raw_fd()),
                name.as_str(),
                UnlinkatFlags::NoRemoveDir,
            ) {
                Ok(()) | Err(Errno::ENOENT) => {}
                Err(e) => log::warn!("cannot remove lock file {name}: {e}"),
            }
        }
        // Tell a waiter that this file is stale; the lock goes with the descriptor.
        let _ = nix::unistd::write(lock.as_fd(), b"d");
    }
}
