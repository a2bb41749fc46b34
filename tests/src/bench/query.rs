//! Queries of many valid paths from one client.

use super::{expect_store_paths, failure, Iteration, Workload};
use crate::daemon::Daemon;
use crate::HarnessError;

/// Adds `n` distinct small files (untimed setup of the query workloads) and returns their
/// store paths.
fn add_small_paths(daemon: &Daemon, what: &str, n: usize) -> Result<Vec<String>, HarnessError> {
    let dir = daemon.work_dir().join(what);
    std::fs::create_dir_all(&dir).map_err(HarnessError::io("mkdir"))?;
    let mut files = Vec::new();
    for i in 0..n {
        let f = dir.join(format!("q{i:05}"));
        std::fs::write(&f, format!("{what} file {i}\n")).map_err(HarnessError::io("write"))?;
        files.push(f);
    }
    let mut paths = Vec::new();
    // Several clients in chunks, to keep argument lists short.
    for chunk in files.chunks(500) {
        let out = daemon.cmd("nix-store").arg("--add").args(chunk).run()?;
        expect_store_paths(daemon, &out, chunk.len())?;
        paths.extend(out.stdout_str().lines().map(str::to_string));
    }
    Ok(paths)
}

/// `nix-store --check-validity` of many valid paths in one client command. Nix 2.8 asks
/// IsValidPath once per path (its path-info cache is empty in a fresh client).
pub struct QueryValid {
    pub paths: usize,
}

impl Workload for QueryValid {
    fn name(&self) -> String {
        format!("query-valid-{}", self.paths)
    }

    fn description(&self) -> String {
        format!(
            "nix-store --check-validity of {} valid paths, one client (IsValidPath each)",
            self.paths
        )
    }

    fn prepare<'d>(
        &self,
        daemon: &'d Daemon,
        runs: usize,
    ) -> Result<Vec<Iteration<'d>>, HarnessError> {
        let paths = std::sync::Arc::new(add_small_paths(daemon, "query-valid", self.paths)?);
        let mut out: Vec<Iteration<'d>> = Vec::new();
        for _ in 0..runs {
            let paths = paths.clone();
            out.push(Box::new(move || {
                let o = daemon
                    .cmd("nix-store")
                    .arg("--check-validity")
                    .args(paths.iter())
                    .run()?;
                if o.success() && o.stdout.is_empty() {
                    Ok(())
                } else {
                    Err(failure(daemon, "unexpected validity result", &o))
                }
            }));
        }
        Ok(out)
    }
}

/// `nix-store -q --hash` of many valid paths in one client command (one QueryPathInfo each).
pub struct QueryInfo {
    pub paths: usize,
}

impl Workload for QueryInfo {
    fn name(&self) -> String {
        format!("query-info-{}", self.paths)
    }

    fn description(&self) -> String {
        format!(
            "nix-store -q --hash of {} valid paths, one client (QueryPathInfo each)",
            self.paths
        )
    }

    fn prepare<'d>(
        &self,
        daemon: &'d Daemon,
        runs: usize,
    ) -> Result<Vec<Iteration<'d>>, HarnessError> {
        let paths = std::sync::Arc::new(add_small_paths(daemon, "query-info", self.paths)?);
        let mut out: Vec<Iteration<'d>> = Vec::new();
        for _ in 0..runs {
            let paths = paths.clone();
            out.push(Box::new(move || {
                let o = daemon
                    .cmd("nix-store")
                    .args(["-q", "--hash"])
                    .args(paths.iter())
                    .run()?;
                let ok = o.success()
                    && o.stdout_str()
                        .lines()
                        .filter(|l| l.starts_with("sha256:"))
                        .count()
                        == paths.len();
                if ok {
                    Ok(())
                } else {
                    Err(failure(daemon, "unexpected query result", &o))
                }
            }));
        }
        Ok(out)
    }
}
