//! Adding paths: fresh trees and files, and re-adding ones that are already valid.

use std::path::Path;

use super::{expect_store_paths, failure, Iteration, Workload};
use crate::daemon::Daemon;
use crate::HarnessError;

/// `nix-store --add` of a fresh tree of small files (a different tree each run, so that every
/// run really adds a path).
pub struct AddTree {
    pub files: usize,
}

impl Workload for AddTree {
    fn name(&self) -> String {
        format!("add-tree-{}", self.files)
    }

    fn description(&self) -> String {
        format!(
            "nix-store --add of a tree of {} small files (0.1 KiB average) in {} directories",
            self.files,
            self.files.div_ceil(50)
        )
    }

    fn prepare<'d>(
        &self,
        daemon: &'d Daemon,
        runs: usize,
    ) -> Result<Vec<Iteration<'d>>, HarnessError> {
        let mut out: Vec<Iteration<'d>> = Vec::new();
        for run in 0..runs {
            let root = daemon.work_dir().join(format!("add-tree/run{run}/tree"));
            write_tree(&root, self.files, &format!("run {run}"))?;
            out.push(Box::new(move || {
                let path = daemon.cmd("nix-store").arg("--add").arg(&root).run()?;
                expect_store_paths(daemon, &path, 1)
            }));
        }
        Ok(out)
    }
}

/// `nix-store --add` of one large file. The file is written once (untimed): a 1 MiB random
/// block repeated, cheap to make and not compressible to nothing. Each run adds it under
/// another name (a hard link), so every run creates a new store path from the same bytes.
pub struct AddFile {
    pub mib: usize,
}

impl Workload for AddFile {
    fn name(&self) -> String {
        let gib = self.mib / 1024;
        if gib * 1024 == self.mib {
            format!("add-file-{gib}g")
        } else {
            format!("add-file-{}m", self.mib)
        }
    }

    fn description(&self) -> String {
        format!("nix-store --add of one {} MiB file", self.mib)
    }

    fn prepare<'d>(
        &self,
        daemon: &'d Daemon,
        runs: usize,
    ) -> Result<Vec<Iteration<'d>>, HarnessError> {
        let dir = daemon.work_dir().join("add-file");
        std::fs::create_dir_all(&dir).map_err(HarnessError::io("mkdir"))?;
        let blob = dir.join("blob");
        write_big_file(&blob, self.mib)?;
        let mut out: Vec<Iteration<'d>> = Vec::new();
        for run in 0..runs {
            let name = dir.join(format!("big-{run}"));
            std::fs::hard_link(&blob, &name).map_err(HarnessError::io("hard link"))?;
            out.push(Box::new(move || {
                let path = daemon.cmd("nix-store").arg("--add").arg(&name).run()?;
                expect_store_paths(daemon, &path, 1)
            }));
        }
        Ok(out)
    }
}

/// A tree of `files` small files (10-110 bytes, 50 per directory), their contents marked with
/// `label` so that trees of different labels are different store paths.
fn write_tree(root: &Path, files: usize, label: &str) -> Result<(), HarnessError> {
    for i in 0..files {
        let dir = root.join(format!("d{:03}", i / 50));
        if i % 50 == 0 {
            std::fs::create_dir_all(&dir).map_err(HarnessError::io("mkdir"))?;
        }
        let contents = format!("{label} file {i}\n{}\n", "x".repeat(i % 97));
        std::fs::write(dir.join(format!("f{i:05}")), contents)
            .map_err(HarnessError::io("writing a tree file"))?;
    }
    Ok(())
}

/// `mib` MiB: one random MiB (from the process's random hasher state, no extra crate),
/// repeated.
fn write_big_file(path: &Path, mib: usize) -> Result<(), HarnessError> {
    use std::hash::{BuildHasher, Hasher};
    use std::io::Write;
    let state = std::collections::hash_map::RandomState::new();
    let mut block = Vec::with_capacity(1 << 20);
    let mut i: u64 = 0;
    while block.len() < 1 << 20 {
        let mut h = state.build_hasher();
        h.write_u64(i);
        block.extend_from_slice(&h.finish().to_le_bytes());
        i += 1;
    }
    let f = std::fs::File::create(path).map_err(HarnessError::io("creating the big file"))?;
    let mut w = std::io::BufWriter::new(f);
    for _ in 0..mib {
        w.write_all(&block)
            .map_err(HarnessError::io("writing the big file"))?;
    }
    w.flush().map_err(HarnessError::io("writing the big file"))
}

/// `nix-store --add` of `source` once, untimed; returns the store path it printed.
fn add_once(daemon: &Daemon, source: &Path) -> Result<String, HarnessError> {
    let o = daemon.cmd("nix-store").arg("--add").arg(source).run()?;
    expect_store_paths(daemon, &o, 1)?;
    Ok(o.stdout_str().trim().to_string())
}

/// One timed re-add: `nix-store --add` of `source`, which must print `expected` again.
fn readd<'d>(daemon: &'d Daemon, source: std::path::PathBuf, expected: String) -> Iteration<'d> {
    Box::new(move || {
        let o = daemon.cmd("nix-store").arg("--add").arg(&source).run()?;
        if o.success() && o.stdout_str().trim() == expected {
            Ok(())
        } else {
            Err(failure(daemon, &format!("expected {expected} again"), &o))
        }
    })
}

/// `nix-store --add` of a tree of small files that is already valid: the daemon receives and
/// hashes the whole NAR, finds the path valid and has nothing to write. The tree is added once
/// untimed; every run adds the same tree again and must get the same path.
pub struct ReAddTree {
    pub files: usize,
}

impl Workload for ReAddTree {
    fn name(&self) -> String {
        format!("readd-tree-{}", self.files)
    }

    fn description(&self) -> String {
        format!(
            "nix-store --add again of a valid tree of {} small files in {} directories",
            self.files,
            self.files.div_ceil(50)
        )
    }

    fn prepare<'d>(
        &self,
        daemon: &'d Daemon,
        runs: usize,
    ) -> Result<Vec<Iteration<'d>>, HarnessError> {
        let root = daemon.work_dir().join("readd-tree/tree");
        write_tree(&root, self.files, "readd")?;
        let path = add_once(daemon, &root)?;
        Ok((0..runs)
            .map(|_| readd(daemon, root.clone(), path.clone()))
            .collect())
    }
}

/// `nix-store --add` of one large file that is already valid (as [`AddFile`], but the same
/// name every run, so the same store path).
pub struct ReAddFile {
    pub mib: usize,
}

impl Workload for ReAddFile {
    fn name(&self) -> String {
        format!("re{}", AddFile { mib: self.mib }.name())
    }

    fn description(&self) -> String {
        format!("nix-store --add again of a valid {} MiB file", self.mib)
    }

    fn prepare<'d>(
        &self,
        daemon: &'d Daemon,
        runs: usize,
    ) -> Result<Vec<Iteration<'d>>, HarnessError> {
        let dir = daemon.work_dir().join("readd-file");
        std::fs::create_dir_all(&dir).map_err(HarnessError::io("mkdir"))?;
        let blob = dir.join("big");
        write_big_file(&blob, self.mib)?;
        let path = add_once(daemon, &blob)?;
        Ok((0..runs)
            .map(|_| readd(daemon, blob.clone(), path.clone()))
            .collect())
    }
}
