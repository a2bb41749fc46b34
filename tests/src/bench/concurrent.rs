//! Many clients at once.

use super::{expect_store_paths, Iteration, Workload};
use crate::daemon::Daemon;
use crate::HarnessError;

/// Many clients at once, each a short mixed session of three connections: add a small file of
/// its own, query its hash, export it (NarFromPath). Measures the wall time until all are done.
pub struct Concurrent {
    pub clients: usize,
}

/// One client's session; `$1` is its file. Prints the path it added.
const SESSION: &str = "set -e
p=$(nix-store --add \"$1\")
nix-store -q --hash \"$p\" >/dev/null
nix-store --export \"$p\" >/dev/null
echo \"$p\"";

impl Workload for Concurrent {
    fn name(&self) -> String {
        format!("concurrent-{}", self.clients)
    }

    fn description(&self) -> String {
        format!(
            "{} clients at once, each: nix-store --add of a small file, -q --hash, --export",
            self.clients
        )
    }

    fn prepare<'d>(
        &self,
        daemon: &'d Daemon,
        runs: usize,
    ) -> Result<Vec<Iteration<'d>>, HarnessError> {
        let dir = daemon.work_dir().join("concurrent");
        std::fs::create_dir_all(&dir).map_err(HarnessError::io("mkdir"))?;
        let mut out: Vec<Iteration<'d>> = Vec::new();
        for run in 0..runs {
            let mut files = Vec::new();
            for c in 0..self.clients {
                let f = dir.join(format!("r{run}-c{c}"));
                std::fs::write(&f, format!("run {run} client {c}\n"))
                    .map_err(HarnessError::io("write"))?;
                files.push(f);
            }
            out.push(Box::new(move || {
                std::thread::scope(|s| {
                    let handles: Vec<_> = files
                        .iter()
                        .map(|f| {
                            s.spawn(move || {
                                let o = daemon
                                    .cmd("/bin/sh")
                                    .args(["-c", SESSION, "session"])
                                    .arg(f)
                                    .run()?;
                                expect_store_paths(daemon, &o, 1)
                            })
                        })
                        .collect();
                    for h in handles {
                        h.join().map_err(|_| {
                            HarnessError::Other("a client thread panicked".into())
                        })??;
                    }
                    Ok(())
                })
            }));
        }
        Ok(out)
    }
}
