//! `nix-store --optimise` of a store full of duplicate files.

use std::path::PathBuf;

use super::{expect_store_paths, failure, Iteration, Setup, Workload};
use crate::daemon::Daemon;
use crate::HarnessError;

/// Before each run (untimed) `paths` new store paths of `files` files each are added: the first
/// half of each path's files have the same contents in every path of the run, the other half
/// are its own. The timed run is one `nix-store --optimise`, which must link every copy of the
/// shared files but one; the paths of earlier runs are linked already (their inodes are
/// `.links` entries, skipped unread), as in a store optimised before.
pub struct Optimise {
    pub paths: usize,
    pub files: usize,
}

impl Optimise {
    /// The files of path `i` of run `run`.
    fn write_path(&self, dir: &std::path::Path, run: usize, i: usize) -> Result<(), HarnessError> {
        std::fs::create_dir_all(dir.join("sub")).map_err(HarnessError::io("mkdir"))?;
        for j in 0..self.files {
            let shared = j < self.files / 2;
            // 150 B to 4 KiB, the shared ones the same in every path of the run.
            let (label, size) = if shared {
                (format!("run {run} shared {j}\n"), 150 + j * 397 % 4000)
            } else {
                (
                    format!("run {run} path {i} own {j}\n"),
                    150 + (i * 7 + j * 13) % 4000,
                )
            };
            let data = label.repeat(size / label.len() + 1);
            let name = if j % 4 == 3 {
                format!("sub/f{j:02}")
            } else {
                format!("f{j:02}")
            };
            std::fs::write(dir.join(name), &data.as_bytes()[..size])
                .map_err(HarnessError::io("writing a file"))?;
        }
        Ok(())
    }

    /// Files one run replaces by links: every copy of a shared file but the first.
    fn expected_links(&self) -> usize {
        self.paths.saturating_sub(1) * (self.files / 2)
    }
}

impl Workload for Optimise {
    fn name(&self) -> String {
        format!("optimise-{}x{}", self.paths, self.files)
    }

    fn description(&self) -> String {
        format!(
            "nix-store --optimise after adding {} paths of {} files, half of them the same in \
             every path ({} links per run; store on tmpfs)",
            self.paths,
            self.files,
            self.expected_links()
        )
    }

    /// On tmpfs (`/dev/shm`) unless `$STOCKADE_TEST_TMPDIR` says where: the walk and the
    /// hashing, not the disk, are what is compared.
    fn parent_dir(&self) -> Result<Option<PathBuf>, HarnessError> {
        let shm = PathBuf::from("/dev/shm");
        let tmpfs = nix::sys::statfs::statfs(&shm)
            .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC);
        let chosen = std::env::var_os("STOCKADE_TEST_TMPDIR").is_some();
        Ok((tmpfs && !chosen).then_some(shm))
    }

    fn prepare<'d>(
        &self,
        daemon: &'d Daemon,
        runs: usize,
    ) -> Result<Vec<Iteration<'d>>, HarnessError> {
        // Timed with the adds: the runner uses `prepare_runs`.
        let runs = self.prepare_runs(daemon, runs)?;
        Ok(runs
            .into_iter()
            .map(|(setup, timed)| -> Iteration<'d> {
                Box::new(move || {
                    if let Some(s) = setup {
                        s()?;
                    }
                    timed()
                })
            })
            .collect())
    }

    fn prepare_runs<'d>(
        &self,
        daemon: &'d Daemon,
        runs: usize,
    ) -> Result<Vec<(Option<Setup<'d>>, Iteration<'d>)>, HarnessError> {
        let want = format!("freed by hard-linking {} files", self.expected_links());
        let mut out: Vec<(Option<Setup<'d>>, Iteration<'d>)> = Vec::new();
        for run in 0..runs {
            let root = daemon.work_dir().join(format!("optimise/run{run}"));
            let mut dirs = Vec::with_capacity(self.paths);
            for i in 0..self.paths {
                let dir = root.join(format!("p{i:04}"));
                self.write_path(&dir, run, i)?;
                dirs.push(dir);
            }
            let setup: Setup<'d> = Box::new(move || {
                for chunk in dirs.chunks(250) {
                    let o = daemon.cmd("nix-store").arg("--add").args(chunk).run()?;
                    expect_store_paths(daemon, &o, chunk.len())?;
                }
                Ok(())
            });
            let want = want.clone();
            let timed: Iteration<'d> = Box::new(move || {
                let o = daemon.cmd("nix-store").arg("--optimise").run()?;
                if o.success() && o.stderr_str().contains(&want) {
                    Ok(())
                } else {
                    Err(failure(daemon, &format!("expected '{want}'"), &o))
                }
            });
            out.push((Some(setup), timed));
        }
        Ok(out)
    }
}
