//! Garbage collection: what `nix-store --gc` costs when there is garbage to find and delete.
//! Each run deletes what the untimed step before it made.

use super::{expect_store_paths, failure, Iteration, Setup, Workload};
use crate::daemon::Daemon;
use crate::HarnessError;

/// Adds `n` new small files as store paths, in commands of 500 (untimed).
fn add_garbage(d: &Daemon, tag: &str, n: usize) -> Result<Vec<String>, HarnessError> {
    let dir = d.work_dir().join(tag);
    std::fs::create_dir_all(&dir).map_err(HarnessError::io("mkdir"))?;
    let mut files = Vec::new();
    for i in 0..n {
        let f = dir.join(format!("g{i:06}"));
        std::fs::write(&f, format!("{tag} garbage {i}\n")).map_err(HarnessError::io("write"))?;
        files.push(f);
    }
    let mut paths = Vec::new();
    for chunk in files.chunks(500) {
        let out = d.cmd("nix-store").arg("--add").args(chunk).run()?;
        expect_store_paths(d, &out, chunk.len())?;
        paths.extend(out.stdout_str().lines().map(str::to_string));
    }
    std::fs::remove_dir_all(&dir).map_err(HarnessError::io("rmdir"))?;
    Ok(paths)
}

/// The timed part: one full collection that must delete exactly `n` paths.
fn collect<'d>(d: &'d Daemon, n: usize) -> Iteration<'d> {
    Box::new(move || {
        let o = d.cmd("nix-store").arg("--gc").run()?;
        let want = format!("{n} store paths deleted");
        if o.success() && o.stdout_str().contains(&want) {
            Ok(())
        } else {
            Err(failure(d, &format!("expected: {want}"), &o))
        }
    })
}

/// A store of nothing but `paths` unreferenced, unrooted paths, all collected.
pub struct GcDead {
    pub paths: usize,
}

impl Workload for GcDead {
    fn name(&self) -> String {
        format!("gc-dead-{}", self.paths)
    }

    fn description(&self) -> String {
        format!(
            "nix-store --gc of {} unreferenced paths (made untimed before each run)",
            self.paths
        )
    }

    fn prepare<'d>(&self, d: &'d Daemon, runs: usize) -> Result<Vec<Iteration<'d>>, HarnessError> {
        Ok((0..runs).map(|_| collect(d, self.paths)).collect())
    }

    fn prepare_runs<'d>(
        &self,
        d: &'d Daemon,
        runs: usize,
    ) -> Result<Vec<(Option<Setup<'d>>, Iteration<'d>)>, HarnessError> {
        let n = self.paths;
        Ok(self
            .prepare(d, runs)?
            .into_iter()
            .enumerate()
            .map(|(run, it)| {
                let setup: Setup<'d> =
                    Box::new(move || add_garbage(d, &format!("dead-{run}"), n).map(|_| ()));
                (Some(setup), it)
            })
            .collect())
    }
}

/// A store of `paths` paths of which half are alive (all referred to by one rooted path, as a
/// profile's closure is) and half garbage, made again before each run.
pub struct GcMixed {
    pub paths: usize,
}

impl Workload for GcMixed {
    fn name(&self) -> String {
        format!("gc-mixed-{}", self.paths)
    }

    fn description(&self) -> String {
        format!(
            "nix-store --gc of a store of {} paths, half of them alive through one root",
            self.paths
        )
    }

    fn prepare<'d>(&self, d: &'d Daemon, runs: usize) -> Result<Vec<Iteration<'d>>, HarnessError> {
        let live = add_garbage(d, "live", self.paths / 2)?;
        let list = d.work_dir().join("live-paths");
        std::fs::write(&list, live.join("\n")).map_err(HarnessError::io("write"))?;
        // One path that refers to every live path, rooted.
        let expr = format!(
            "builtins.toFile \"profile\" (builtins.concatStringsSep \"\\n\" (map builtins.storePath \
             (builtins.filter (p: builtins.isString p && p != \"\") \
             (builtins.split \"\\n\" (builtins.readFile {})))))",
            list.display()
        );
        let o = d
            .cmd("nix-instantiate")
            .args(["--read-write-mode", "--eval", "-E", &expr])
            .run()?;
        let root = o.stdout_str().trim().trim_matches('"').to_string();
        if !o.success() || !root.starts_with(d.store_dir().as_str()) {
            return Err(failure(d, "making the profile", &o));
        }
        let o = d
            .cmd("nix-store")
            .args([
                "--add-root",
                &d.work_dir().join("profile").display().to_string(),
                "-r",
                &root,
            ])
            .run()?;
        if !o.success() {
            return Err(failure(d, "rooting the profile", &o));
        }
        let garbage = self.paths - self.paths / 2;
        Ok((0..runs).map(|_| collect(d, garbage - 1)).collect())
    }

    fn prepare_runs<'d>(
        &self,
        d: &'d Daemon,
        runs: usize,
    ) -> Result<Vec<(Option<Setup<'d>>, Iteration<'d>)>, HarnessError> {
        // One fewer: the profile itself is the other half's last path.
        let n = self.paths - self.paths / 2 - 1;
        Ok(self
            .prepare(d, runs)?
            .into_iter()
            .enumerate()
            .map(|(run, it)| {
                let setup: Setup<'d> =
                    Box::new(move || add_garbage(d, &format!("mixed-{run}"), n).map(|_| ()));
                (Some(setup), it)
            })
            .collect())
    }
}
