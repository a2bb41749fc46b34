//! Connection set-up: many short sessions one after another, as shells and build scripts make
//! them. Stockade forks and execs a confined broker per connection where nix-daemon forks
//! itself, so this is where that costs show.

use super::{Iteration, Workload};
use crate::daemon::Daemon;
use crate::raw::RawConn;
use crate::HarnessError;

/// `sessions` connections in a row, each: handshake, SetOptions, one IsValidPath, close.
/// Spoken by the harness itself, so no client start-up hides the daemon's part.
pub struct Connect {
    pub sessions: usize,
}

impl Workload for Connect {
    fn name(&self) -> String {
        format!("connect-{}", self.sessions)
    }

    fn description(&self) -> String {
        format!(
            "{} connections in a row, each a handshake, SetOptions and one IsValidPath",
            self.sessions
        )
    }

    fn prepare<'d>(
        &self,
        daemon: &'d Daemon,
        runs: usize,
    ) -> Result<Vec<Iteration<'d>>, HarnessError> {
        let missing = format!(
            "{}/00000000000000000000000000000000-absent",
            daemon.store_dir()
        );
        let sessions = self.sessions;
        let mut out: Vec<Iteration<'d>> = Vec::new();
        for _ in 0..runs {
            let missing = missing.clone();
            out.push(Box::new(move || {
                for _ in 0..sessions {
                    let io = |e: std::io::Error| HarnessError::Other(format!("connect: {e}"));
                    let mut c = RawConn::connect(daemon).map_err(io)?;
                    c.handshake().map_err(io)?;
                    if !c.set_options(&[]).map_err(io)?.is_ok() {
                        return Err(HarnessError::Other("SetOptions refused".into()));
                    }
                    match c.is_valid_path(&missing).map_err(io)? {
                        Ok(false) => {}
                        other => {
                            return Err(HarnessError::Other(format!(
                                "IsValidPath of an absent path: {other:?}\n{}",
                                daemon.log_tail(20)
                            )))
                        }
                    }
                }
                Ok(())
            }));
        }
        Ok(out)
    }
}
