//! Moving another uid's process into a cgroup.
//!
//! The kernel checks a write to `cgroup.procs` against the credentials of whoever *opened*
//! the file: on v1 the opener's effective uid must be root or the moved process's uid, on v2
//! the opener must be allowed to write the common ancestor's `cgroup.procs`. The helper runs
//! under a uid of its own, so for a broker (uid of its own too) it opens the files on a
//! short-lived thread whose effective uid alone is the broker's ([`open_as`]): exactly the
//! standing the broker has over itself, and the helper's own credentials never change.
//! `CAP_DAC_OVERRIDE` stays effective across a change between two non-zero uids, so root's
//! `cgroup.procs` opens for writing.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::{err, Cgroup, CgroupError};

impl Cgroup {
    /// Puts `pid`, which runs as `uid`, into every directory.
    pub fn add_as(&self, pid: i32, uid: u32) -> Result<(), CgroupError> {
        let paths: Vec<PathBuf> = self.dirs.iter().map(|d| d.join("cgroup.procs")).collect();
        let files = if uid == nix::unistd::geteuid().as_raw() {
            paths.iter().map(|p| open(p)).collect()
        } else {
            open_as(uid, &paths)
        };
        for (file, path) in files.into_iter().zip(&paths) {
            let mut f = file.map_err(err("opening", path))?;
            f.write_all(format!("{pid}\n").as_bytes())
                .map_err(err("joining", path))?;
        }
        Ok(())
    }
}

fn open(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new().write(true).open(path)
}

/// Opens `paths` for writing with effective uid `uid`, on a thread of its own whose
/// credentials end with it.
fn open_as(uid: u32, paths: &[PathBuf]) -> Vec<io::Result<File>> {
    let opened = std::thread::scope(|s| {
        s.spawn(|| {
            // The raw system call changes this thread's credentials only (glibc's
            // `setresuid` would change every thread's).
            // SAFETY: setresuid takes three ids by value and no pointers; -1 keeps the real
            // and saved uids.
            let rc = unsafe {
                nix::libc::syscall(
                    nix::libc::SYS_setresuid,
                    u32::MAX as nix::libc::c_long,
                    nix::libc::c_long::from(uid),
                    u32::MAX as nix::libc::c_long,
                )
            };
            if rc != 0 {
                let e = io::Error::last_os_error();
                return paths
                    .iter()
                    .map(|_| Err(io::Error::new(e.kind(), format!("setting euid {uid}: {e}"))))
                    .collect();
            }
            paths.iter().map(|p| open(p)).collect::<Vec<_>>()
        })
        .join()
    });
    opened.unwrap_or_else(|_| {
        paths
            .iter()
            .map(|_| Err(io::Error::other("the opening thread panicked")))
            .collect()
    })
}
