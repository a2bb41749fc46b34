//! AddBuildLog: `<log dir>/drvs/<first 2 chars>/<rest>[.bz2]`, written to a temporary name and
//! renamed into place; an existing log is kept (as Nix 2.8 does). Only trusted clients may add
//! logs (checked by the caller).

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
    let store = ctx.store;
    let full = store.full(drv);
    if !drv.is_derivation() {
        return Err(ReqError::failed(format!(
            "'{}' is not a derivation",
            hl(&full)
        )));
    }
    let mut input = Upload::new(fd);
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
    let name = if store.cfg.compress_build_log {
        compressed.as_str()
    } else {
        rest
    };
    let exists = |n: &str| sys::lstat_at(dir.as_fd(), n).is_ok();
    if exists(&compressed) || exists(rest) {
        sys::drain(&mut input, u64::MAX)?;
        return Ok(());
    }
    let tmp = format!("{name}.tmp.{}", store.unique_suffix());
    let file = File::from(sys::openat(
        dir.as_fd(),
        tmp.as_str(),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW,
        Mode::from_bits_truncate(0o644),
    )?);
    let remove_tmp = || {
        let _ = nix::unistd::unlinkat(
            Some(dir.as_raw_fd()),
            tmp.as_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
    };
    let written = write_log(&mut input, file, store.cfg.compress_build_log);
    let size = match written {
        Ok(n) => n,
        Err(e) => {
            remove_tmp();
            return Err(e.into());
        }
    };
    match nix::fcntl::renameat2(
        Some(dir.as_raw_fd()),
        tmp.as_str(),
        Some(dir.as_raw_fd()),
        OsStr::new(name),
        RenameFlags::RENAME_NOREPLACE,
    ) {
        Ok(()) => {}
        // Someone else's log got there first: keep it.
        Err(Errno::EEXIST) => remove_tmp(),
        Err(e) => {
            remove_tmp();
            return Err(e.into());
        }
    }
    let size = size.to_string();
    store.audit.client_event(
        Severity::Info,
        ctx.client,
        &[("op", "addBuildLog"), ("drv", &full), ("bytes", &size)],
    );
    Ok(())
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
