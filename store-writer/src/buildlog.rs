//! Build logs: `<log dir>/drvs/<first 2 chars>/<rest>[.bz2]`, written to a temporary name and
//! renamed into place. AddBuildLog keeps an existing log (as Nix 2.8 does; only trusted
//! clients may add logs, checked by the caller); the log of a build Stockade ran replaces it.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{OFlag, RenameFlags};
use nix::sys::stat::Mode;

use stockade_common::store_path::StorePath;

use crate::add::Ctx;
use crate::audit::Severity;
use crate::error::{hl, ReqError};
use crate::store::Store;
use crate::sys;
use crate::upload::Upload;

fn subdir(parent: BorrowedFd<'_>, name: &str) -> Result<OwnedFd, ReqError> {
    match nix::sys::stat::mkdirat(
        Some(parent.as_raw_fd()),
        name,
        Mode::from_bits_truncate(0o755),
    ) {
        Ok(()) | Err(Errno::EEXIST) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(sys::open_dir_at(parent, name)?)
}

pub fn add_build_log(ctx: &Ctx<'_>, drv: &StorePath, fd: OwnedFd) -> Result<(), ReqError> {
    let mut input = Upload::new(fd);
    let Some(size) = write(ctx.store, drv, &mut input, false)? else {
        return Ok(());
    };
    let size = size.to_string();
    let full = ctx.store.full(drv);
    ctx.store.audit.client_event(
        Severity::Info,
        ctx.client,
        &[("op", "addBuildLog"), ("drv", &full), ("bytes", &size)],
    );
    Ok(())
}

/// The log of a build the store-writer registered, from the builder-helper: a memfd (or any
/// regular file) read from its start. It replaces an older log, as a new build's log does in
/// Nix. Returns the log's size.
pub fn store_build_log(store: &Store, drv: &StorePath, fd: OwnedFd) -> Result<u64, ReqError> {
    let st = sys::fstat(fd.as_fd())?;
    if sys::file_type(&st) != nix::sys::stat::SFlag::S_IFREG {
        // A pipe or socket could block this thread forever.
        return Err(ReqError::failed("a build log must come as a regular file"));
    }
    let mut input = io::BufReader::new(PositionedFile::new(File::from(fd)));
    Ok(write(store, drv, &mut input, true)?.unwrap_or(0))
}

/// Reads a file from its start whatever its descriptor's offset (`pread`).
struct PositionedFile {
    file: File,
    pos: u64,
}

impl PositionedFile {
    fn new(file: File) -> PositionedFile {
        PositionedFile { file, pos: 0 }
    }
}

impl io::Read for PositionedFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Writes the log of `drv` from `input` to a temporary name and renames it into place. An
/// existing log is kept (`None`, the input drained) unless `replace`.
fn write<R: io::Read>(
    store: &Store,
    drv: &StorePath,
    input: &mut R,
    replace: bool,
) -> Result<Option<u64>, ReqError> {
    let full = store.full(drv);
    if !drv.is_derivation() {
        return Err(ReqError::failed(format!(
            "'{}' is not a derivation",
            hl(&full)
        )));
    }
    let base = drv.base_name();
    // A validated base name is at least 34 ASCII characters.
    let (Some(head), Some(rest)) = (base.get(..2), base.get(2..)) else {
        return Err(ReqError::failed("invalid derivation name"));
    };
    std::fs::create_dir_all(&store.cfg.log_dir)?;
    let log_dir = sys::open(
        store.cfg.log_dir.as_str(),
        OFlag::O_RDONLY | OFlag::O_DIRECTORY,
        Mode::empty(),
    )?;
    let drvs = subdir(log_dir.as_fd(), "drvs")?;
    let dir = subdir(drvs.as_fd(), head)?;
    let compressed = format!("{rest}.bz2");
    let (name, other) = if store.cfg.compress_build_log {
        (compressed.as_str(), rest)
    } else {
        (rest, compressed.as_str())
    };
    let exists = |n: &str| sys::lstat_at(dir.as_fd(), n).is_ok();
    if !replace && (exists(&compressed) || exists(rest)) {
        sys::drain(input, u64::MAX)?;
        return Ok(None);
    }
    let tmp = format!("{name}.tmp.{}", store.unique_suffix());
    let file = File::from(sys::openat(
        dir.as_fd(),
        tmp.as_str(),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW,
        Mode::from_bits_truncate(0o644),
    )?);
    let remove = |n: &str| {
        let _ = nix::unistd::unlinkat(
            Some(dir.as_raw_fd()),
            n,
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
    };
    let size = match write_log(input, file, store.cfg.compress_build_log) {
        Ok(n) => n,
        Err(e) => {
            remove(&tmp);
            return Err(e.into());
        }
    };
    let flags = if replace {
        RenameFlags::empty()
    } else {
        RenameFlags::RENAME_NOREPLACE
    };
    match nix::fcntl::renameat2(
        Some(dir.as_raw_fd()),
        tmp.as_str(),
        Some(dir.as_raw_fd()),
        OsStr::new(name),
        flags,
    ) {
        Ok(()) => {}
        // Someone else's log got there first: keep it.
        Err(Errno::EEXIST) => remove(&tmp),
        Err(e) => {
            remove(&tmp);
            return Err(e.into());
        }
    }
    if replace {
        // An older log in the other form would be found instead of this one.
        remove(other);
    }
    Ok(Some(size))
}

/// Copies the log, compressing it with bzip2 when asked; returns the uncompressed size.
fn write_log<R: io::Read>(input: &mut R, file: File, compress: bool) -> io::Result<u64> {
    if compress {
        let mut enc = bzip2::write::BzEncoder::new(file, bzip2::Compression::best());
        let n = io::copy(input, &mut enc)?;
        let mut file = enc.finish()?;
        file.flush()?;
        Ok(n)
    } else {
        let mut file = file;
        io::copy(input, &mut file)
    }
}
