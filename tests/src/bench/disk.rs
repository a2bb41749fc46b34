//! Adds whose store is on a real disk, whatever the file system of the harness's temporary
//! directory: what a store's synchronous writes (fsync of files, the store directory, the
//! database) cost.

use std::path::{Path, PathBuf};

use super::{expect_store_paths, Iteration, Workload};
use crate::daemon::Daemon;
use crate::HarnessError;

/// Where the disk workloads put their daemons' instance directories (their `/nix`): the first
/// of `$STOCKADE_BENCH_DISK_DIR`, `/var/tmp` and the cargo target directory that holds the
/// running executable that is on a file system other than tmpfs or ramfs. With
/// `$STOCKADE_BENCH_DISK_DIR` set, that directory or an error.
pub fn disk_dir() -> Result<PathBuf, HarnessError> {
    if let Some(d) = std::env::var_os("STOCKADE_BENCH_DISK_DIR") {
        let d = PathBuf::from(d);
        return match on_disk(&d) {
            Ok(true) => Ok(d),
            Ok(false) => Err(HarnessError::Other(format!(
                "STOCKADE_BENCH_DISK_DIR={} is on tmpfs or ramfs, not on a disk",
                d.display()
            ))),
            Err(e) => Err(HarnessError::io(format!(
                "statfs of STOCKADE_BENCH_DISK_DIR={}",
                d.display()
            ))(e)),
        };
    }
    let target = std::env::current_exe().ok().and_then(|exe| {
        exe.ancestors()
            .find(|a| a.file_name().is_some_and(|n| n == "target"))
            .map(Path::to_path_buf)
    });
    let candidates = [Some(PathBuf::from("/var/tmp")), target];
    candidates
        .into_iter()
        .flatten()
        .find(|d| on_disk(d).unwrap_or(false))
        .ok_or_else(|| {
            HarnessError::Other(
                "no directory on a disk for the disk workloads (/var/tmp and the target \
                 directory are on tmpfs); set STOCKADE_BENCH_DISK_DIR"
                    .into(),
            )
        })
}

/// Whether `dir` is a directory on a file system that is not kept in memory.
fn on_disk(dir: &Path) -> std::io::Result<bool> {
    use nix::sys::statfs::{statfs, FsType, TMPFS_MAGIC};
    const RAMFS_MAGIC: FsType = FsType(0x8584_58f6);
    let fs = statfs(dir)?;
    let t = fs.filesystem_type();
    Ok(dir.is_dir() && t != TMPFS_MAGIC && t != RAMFS_MAGIC)
}

/// Many single-file adds on a disk: `files` new small files per run, each its own store path
/// (one registration each), in `nix-store --add` commands of up to 500 files.
pub struct AddDisk {
    pub files: usize,
}

impl Workload for AddDisk {
    fn name(&self) -> String {
        format!("add-disk-{}", self.files)
    }

    fn description(&self) -> String {
        format!(
            "{} new small files, each its own path, nix-store --add 500 per command, store \
             on disk (STOCKADE_BENCH_DISK_DIR, else /var/tmp)",
            self.files
        )
    }

    fn parent_dir(&self) -> Result<Option<PathBuf>, HarnessError> {
        disk_dir().map(Some)
    }

    fn prepare<'d>(
        &self,
        daemon: &'d Daemon,
        runs: usize,
    ) -> Result<Vec<Iteration<'d>>, HarnessError> {
        let mut out: Vec<Iteration<'d>> = Vec::new();
        for run in 0..runs {
            let dir = daemon.work_dir().join(format!("add-disk/run{run}"));
            std::fs::create_dir_all(&dir).map_err(HarnessError::io("mkdir"))?;
            let mut files = Vec::with_capacity(self.files);
            for i in 0..self.files {
                let f = dir.join(format!("f{i:05}"));
                std::fs::write(&f, format!("add-disk run {run} file {i}\n"))
                    .map_err(HarnessError::io("write"))?;
                files.push(f);
            }
            out.push(Box::new(move || {
                for chunk in files.chunks(500) {
                    let o = daemon.cmd("nix-store").arg("--add").args(chunk).run()?;
                    expect_store_paths(daemon, &o, chunk.len())?;
                }
                Ok(())
            }));
        }
        Ok(out)
    }
}
