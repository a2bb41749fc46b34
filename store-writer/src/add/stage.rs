//! Staging: where an add's data lands before it is installed. A staging directory is private
//! (0700) and lives inside the real store directory (same file system, so the final rename is
//! atomic). It is named `tmp-stockade-<pid>-<n>` and `flock`ed exclusively for its whole life,
//! as Nix (2.20 and later) names and locks its own `tmp-*` directories in the store: a Nix
//! garbage collector and Stockade's own start-up cleanup remove only those they can lock (A75).
//! One directory may hold several nodes (the paths of one batch), each named by the caller.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg, OFlag};
use nix::sys::stat::{Mode, SFlag};

use stockade_common::content_address::{ContentAddress, ContentAddressMethod};
use stockade_common::hash::{Encoding, Hash, HashAlgo};
use stockade_common::nar::{self, Limits, NarErrorKind, NarReader, Restored};
use stockade_common::narinfo::PathInfo;
use stockade_common::store_path::FileIngestion;

use crate::canon::{self, CanonFinish, Owner, Seal};
use crate::error::{hl, ReqError};
use crate::hashing::{hash_modulo_reader, CaHasher, ModuloHasher, Tee};
use crate::store::Store;
use crate::sys;

/// Prefix of staging directories. Nix's collector skips a `tmp-*` directory it cannot lock.
pub const STAGING_PREFIX: &str = "tmp-stockade-";
/// What staging directories were called before they were locked; never locked, so removable.
const LEGACY_PREFIX: &str = ".stockade-tmp-";
/// Buffer between a pipe and the NAR parser (which reads token by token).
pub const BUF: usize = 256 * 1024;

/// Idle staging directories kept for reuse (creating and deleting one per add churns inodes
/// and costs a dozen system calls).
const POOL_MAX: usize = 16;

/// A staging directory: its name in the store and its descriptor, locked exclusively for as
/// long as it exists (also while it waits in the pool).
pub struct StagingDir {
    name: String,
    dir: Flock<OwnedFd>,
    /// Device and inode of `dir` (those of an open descriptor never change).
    id: (u64, u64),
}

impl StagingDir {
    fn new(name: String, dir: Flock<OwnedFd>) -> nix::Result<StagingDir> {
        let held = sys::fstat(dir.as_fd())?;
        Ok(StagingDir {
            name,
            dir,
            id: (held.st_dev, held.st_ino),
        })
    }

    /// Whether the name in the store still leads to the directory we hold.
    fn still_ours(&self, store_fd: BorrowedFd<'_>) -> bool {
        sys::lstat_at(store_fd, self.name.as_str())
            .is_ok_and(|named| (named.st_dev, named.st_ino) == self.id)
    }
}

/// A locked private directory in the store holding staged nodes, for one add or one batch.
/// On drop its contents are deleted and the directory goes back to the store's pool.
pub struct Staging {
    store: Arc<Store>,
    inner: Option<StagingDir>,
    /// Every node staged here has been moved into the store: the directory is empty, so it
    /// goes back to the pool without being listed.
    emptied: std::cell::Cell<bool>,
}

impl Staging {
    pub fn new(store: &Arc<Store>) -> Result<Staging, ReqError> {
        let at = store.store_fd();
        let pooled = {
            let mut pool = store.staging_pool.lock().unwrap_or_else(|e| e.into_inner());
            std::iter::from_fn(|| pool.pop()).find(|d| d.still_ours(at))
        };
        let inner = match pooled {
            Some(d) => d,
            None => create(at, store)?,
        };
        Ok(Staging {
            store: store.clone(),
            inner: Some(inner),
            emptied: std::cell::Cell::new(false),
        })
    }

    /// Says that every node staged here has been renamed into the store (and nothing else was
    /// ever created in it).
    pub fn set_emptied(&self) {
        self.emptied.set(true);
    }
    /// The directory's descriptor (gone only once `drop` has begun).
    pub fn fd(&self) -> Result<BorrowedFd<'_>, ReqError> {
        self.inner
            .as_ref()
            .map(|d| d.dir.as_fd())
            .ok_or_else(|| ReqError::failed("the staging directory is gone"))
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn create_file(&self, node: &str) -> Result<File, ReqError> {
        let fd = sys::openat(
            self.fd()?,
            node,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW,
            Mode::from_bits_truncate(0o444),
        )?;
        Ok(File::from(fd))
    }

    /// Opens a staged node for reading; it must be a regular file.
    pub fn open_file(&self, node: &str) -> Result<(File, u64), ReqError> {
        let fd = sys::openat(
            self.fd()?,
            node,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::ELOOP | Errno::EISDIR => ReqError::failed("regular file expected"),
            e => e.into(),
        })?;
        let st = sys::fstat(fd.as_fd())?;
        if sys::file_type(&st) != SFlag::S_IFREG {
            return Err(ReqError::failed("regular file expected"));
        }
        Ok((File::from(fd), u64::try_from(st.st_size).unwrap_or(0)))
    }

    fn owner(&self) -> Owner {
        let s = &self.store;
        Owner {
            uid: s.euid,
            gid: s.egid,
            chown: s.cfg.as_root,
        }
    }

    /// Gives a regular file written into this directory the store's metadata.
    pub fn finish_file(&self, f: &File) -> Result<(), ReqError> {
        let owner = self.owner();
        nar::Finish::file(&mut CanonFinish::new(&owner), f.as_fd())?;
        Ok(())
    }

    /// Restores the NAR of `reader` as `node`, each node canonical as it is completed. The
    /// outer error: no staging directory; the inner one: the archive's.
    pub fn restore<R: Read>(
        &self,
        reader: &mut NarReader<R>,
        node: &str,
    ) -> Result<Result<Restored, stockade_common::nar::NarError>, ReqError> {
        let owner = self.owner();
        let dir = self.fd()?;
        Ok(nar::restore_with(
            reader,
            dir,
            OsStr::new(node),
            &mut CanonFinish::new(&owner),
        ))
    }

    /// Seals a staged node, complete and canonical, that should hold what `made` says was
    /// written: a tree that lost or gained anything since is refused (A75).
    pub fn seal(&self, node: &str, display: &str, made: Restored) -> Result<Seal, ReqError> {
        let (seal, nodes) = canon::seal_and_count(self.fd()?, OsStr::new(node), display)
            .map_err(|e| ReqError::failed(e.to_string()))?;
        if !cfg!(feature = "without-a75") && nodes != made.nodes {
            return Err(changed(display));
        }
        Ok(seal)
    }

    /// Checks that a staged node is still exactly as it was sealed (A75).
    pub fn check_seal(&self, node: &str, display: &str, seal: &Seal) -> Result<(), ReqError> {
        if cfg!(feature = "without-a75") {
            return Ok(());
        }
        match canon::seal_of(self.fd()?, OsStr::new(node), display) {
            Ok(now) if now == *seal => Ok(()),
            _ => Err(changed(display)),
        }
    }

    /// NAR hash and size of a staged node, read back from disk.
    pub fn nar_hash(&self, node: &str) -> Result<(Hash, u64), ReqError> {
        let mut h = nar::HashingWriter::sink(HashAlgo::Sha256);
        nar::dump_at(self.fd()?, OsStr::new(node), &mut h)
            .map_err(|e| ReqError::failed(e.to_string()))?;
        let (hash, size, _) = h.finish();
        Ok((hash, size))
    }

    /// Writes `data` as the regular file `node`, canonical.
    pub fn write_file(&self, node: &str, data: &[u8]) -> Result<Restored, ReqError> {
        let mut f = self.create_file(node)?;
        f.write_all(data)?;
        self.finish_file(&f)?;
        Ok(Restored {
            nodes: 1,
            bytes: data.len() as u64,
        })
    }

    /// Restores the NAR in `data` (already validated) as `node`.
    pub fn restore_bytes(&self, node: &str, data: &[u8]) -> Result<Restored, ReqError> {
        let mut reader = NarReader::new(data);
        let made = self
            .restore(&mut reader, node)?
            .map_err(|e| ReqError::failed(e.to_string()))?;
        reader
            .finish_at_eof()
            .map_err(|e| ReqError::failed(e.to_string()))?;
        Ok(made)
    }
}

/// Makes a new staging directory: created, opened, locked, and checked to be the one named.
fn create(at: BorrowedFd<'_>, store: &Store) -> Result<StagingDir, ReqError> {
    loop {
        let name = format!("{STAGING_PREFIX}{}", store.unique_suffix());
        match nix::sys::stat::mkdirat(
            Some(at.as_raw_fd()),
            name.as_str(),
            Mode::from_bits_truncate(0o700),
        ) {
            Ok(()) => {}
            Err(Errno::EEXIST) => continue,
            Err(e) => {
                return Err(ReqError::failed(format!(
                    "creating a staging directory: {e}"
                )))
            }
        }
        let fd = match sys::open_dir_at(at, name.as_str()) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => continue,
            Err(e) => return Err(e.into()),
        };
        // Nobody else can hold the lock of a directory this new unless a cleanup found it
        // between mkdir and here; then it may be gone: take another name.
        let dir = match Flock::lock(fd, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((_, Errno::EWOULDBLOCK)) => continue,
            Err((_, e)) => return Err(e.into()),
        };
        let made = StagingDir::new(name, dir)?;
        if !made.still_ours(at) {
            continue;
        }
        nix::sys::stat::fchmod(made.dir.as_raw_fd(), Mode::from_bits_truncate(0o700))?;
        return Ok(made);
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let Some(d) = self.inner.take() else { return };
        let at = self.store.store_fd();
        // Still locked while its contents go, so no cleanup elsewhere races with this one.
        let emptied = if self.emptied.get() {
            Ok(())
        } else {
            sys::read_dir(d.dir.as_fd())
                .map_err(std::io::Error::from)
                .and_then(|entries| {
                    entries
                        .iter()
                        .try_for_each(|(entry, _)| sys::remove_tree(d.dir.as_fd(), entry))
                })
        };
        if emptied.is_ok() {
            let mut pool = self
                .store
                .staging_pool
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if pool.len() < POOL_MAX {
                pool.push(d);
                return;
            }
        }
        if let Err(e) = sys::remove_tree(at, OsStr::new(&d.name)) {
            log::warn!("cannot remove staging directory {}: {e}", d.name);
        }
    }
}

/// Removes staging directories nobody holds: those of a store-writer that died. A live
/// writer's (this one's, or one a misconfigured second instance runs) are locked and kept.
pub fn remove_stale(store_fd: BorrowedFd<'_>) {
    let Ok(entries) = sys::read_dir(store_fd) else {
        return;
    };
    for (name, _) in entries {
        let bytes = name.as_bytes();
        let legacy = bytes.starts_with(LEGACY_PREFIX.as_bytes());
        if !legacy && !bytes.starts_with(STAGING_PREFIX.as_bytes()) {
            continue;
        }
        let Ok(fd) = sys::open_dir_at(store_fd, name.as_os_str()) else {
            continue;
        };
        let held = if cfg!(feature = "without-a75") {
            None
        } else {
            match Flock::lock(fd, FlockArg::LockExclusiveNonblock) {
                Ok(l) => Some(l),
                Err((_, Errno::EWOULDBLOCK)) => {
                    log::info!("staging directory {name:?} is in use; left alone");
                    continue;
                }
                Err((_, e)) => {
                    log::warn!("cannot lock staging directory {name:?}: {e}");
                    continue;
                }
            }
        };
        if let Err(e) = sys::remove_tree(store_fd, &name) {
            log::warn!("cannot remove stale staging directory {name:?}: {e}");
        }
        drop(held);
    }
}

/// Restores the NAR from `input` as `node` while hashing it, then checks the NAR hash, size
/// and content address against `info`.
pub fn nar(
    staging: &Staging,
    node: &str,
    info: &PathInfo,
    input: impl Read,
) -> Result<Restored, ReqError> {
    let full = staging.store.full(&info.path);
    let ca_hasher = match &info.ca {
        Some(ContentAddress {
            method: ContentAddressMethod::Fixed(FileIngestion::Recursive),
            hash,
        }) => Some(CaHasher::Modulo(ModuloHasher::new(
            hash.algo(),
            info.path.hash_part(),
        ))),
        _ => None,
    };
    let tee = Tee::new(BufReader::with_capacity(BUF, input), ca_hasher);
    let limits = Limits {
        max_nar_size: info.nar_size,
        ..Limits::default()
    };
    let mut reader = NarReader::with_limits(tee, limits);
    let res = staging
        .restore(&mut reader, node)?
        .and_then(|made| reader.finish_at_eof().map(|()| made));
    let made = res.map_err(|e| match e.kind() {
        NarErrorKind::TooLarge(_) => ReqError::failed(format!(
            "size mismatch importing path '{}';\n  specified: {}\n  got:       {}",
            hl(&full),
            hl(info.nar_size),
            hl(format!("more than {}", info.nar_size))
        )),
        _ => ReqError::failed(format!("importing path '{}': {e}", hl(&full))),
    })?;
    let (nar_hash, nar_size, ca_tee) = reader.into_inner().finish();
    check_nar(&full, info, &nar_hash, nar_size)?;
    if let Some(ca) = &info.ca {
        let got = match ca.method {
            ContentAddressMethod::Fixed(FileIngestion::Recursive) => {
                ca_tee.and_then(CaHasher::finish)
            }
            ContentAddressMethod::Fixed(FileIngestion::Flat) => {
                let (f, size) = staging.open_file(node)?;
                hash_modulo_reader(f, ca.hash.algo(), info.path.hash_part(), size)?
            }
            ContentAddressMethod::Text => {
                let (f, size) = staging.open_file(node)?;
                hash_modulo_reader(f, HashAlgo::Sha256, "", size)?
            }
        };
        let got = got.ok_or_else(|| {
            ReqError::failed(format!("path '{}' has too many self-references", hl(&full)))
        })?;
        if got != ca.hash {
            return Err(ReqError::failed(format!(
                "ca hash mismatch importing path '{}';\n  specified: {}\n  got:       {}",
                hl(&full),
                hl(ca.hash.to_typed(Encoding::Base32)),
                hl(got.to_typed(Encoding::Base32))
            )));
        }
    }
    Ok(made)
}

/// The NAR hash and size the client declared against what arrived (or what is on disk).
fn check_nar(full: &str, info: &PathInfo, hash: &Hash, size: u64) -> Result<(), ReqError> {
    if *hash != info.nar_hash {
        return Err(ReqError::failed(format!(
            "hash mismatch importing path '{}';\n  specified: {}\n  got:       {}",
            hl(full),
            hl(info.nar_hash.to_typed(Encoding::Base32)),
            hl(hash.to_typed(Encoding::Base32))
        )));
    }
    if size != info.nar_size {
        return Err(ReqError::failed(format!(
            "size mismatch importing path '{}';\n  specified: {}\n  got:       {}",
            hl(full),
            hl(info.nar_size),
            hl(size)
        )));
    }
    Ok(())
}

fn changed(display: &str) -> ReqError {
    ReqError::failed(format!(
        "the staged copy of '{}' changed before it was installed; nothing was added",
        hl(display)
    ))
}
