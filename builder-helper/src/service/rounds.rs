//! Nix 2.8's `repeat`: a normal build runs `repeat` more times, and each round's outputs are
//! compared with the first's (by NAR hash, which covers contents, modes and references)
//! before anything is registered. A difference is Nix's `output '…' of '…' differs from
//! previous round`: the build fails with `NotDeterministic` under `enforce-determinism`,
//! otherwise the message is logged, the rounds stop, and the first round's outputs are
//! registered. (Later Nix dropped `repeat`; `--check` remains.)
//!
//! Each round runs like the first: in a fresh build directory and cgroup, as the same build
//! uid, everything of the previous round killed. The first round's outputs stay staged until
//! the store-writer takes them.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use stockade_common::hash::Hash;
use stockade_common::ipc::builder::{BuildReport, BuildStatus, BuilderToBroker};
use stockade_common::nar;
use stockade_common::worker::hl;

use super::sched::Cancel;
use super::session::failure;
use super::Service;
use crate::build::{run_derivation_with, BuildConfig, BuildJob, BuildOutcome};

/// How the rounds after the first went.
pub struct Repeated {
    /// Rounds run, the first included.
    pub rounds: u32,
    pub non_deterministic: bool,
}

fn nar_hashes(outcome: &BuildOutcome) -> Result<BTreeMap<String, Hash>, String> {
    outcome
        .outputs
        .iter()
        .map(|(name, out)| {
            nar::dump_and_hash(Path::new(&out.staged))
                .map(|(h, _)| (name.clone(), h))
                .map_err(|e| format!("hashing output '{name}': {e}"))
        })
        .collect()
}

/// Runs rounds 2..=`total` after `first`; `Err` is the build's failure report.
#[allow(clippy::too_many_arguments)]
pub fn repeat(
    svc: &Service,
    cfg: &BuildConfig,
    job: &BuildJob,
    sink: &mut dyn Write,
    cancel: &Cancel,
    build: u64,
    first: &BuildOutcome,
    total: u32,
    enforce: bool,
    fixed: bool,
) -> Result<Repeated, Box<BuildReport>> {
    if total <= 1 {
        return Ok(Repeated {
            rounds: 1,
            non_deterministic: false,
        });
    }
    let want = nar_hashes(first).map_err(|why| Box::new(failure(BuildStatus::MiscFailure, why)))?;
    let drv = &job.drv_path;
    for round in 2..=total {
        for w in svc.sched.waiters(drv, cancel).iter().filter(|w| w.follows) {
            let _ = w.broker.send(&BuilderToBroker::Round { id: w.id, round });
        }
        let cgroup = svc.build_cgroup(build);
        let mut cfg = cfg.clone();
        cfg.cgroups = cgroup
            .as_ref()
            .map(|c| c.dirs().to_vec())
            .unwrap_or_default();
        let ran = run_derivation_with(&cfg, job, sink, Some(cancel.fd()));
        drop(cgroup);
        let outcome = ran.map_err(|e| Box::new(super::job::failed(e, fixed)))?;
        let got =
            nar_hashes(&outcome).map_err(|why| Box::new(failure(BuildStatus::MiscFailure, why)))?;
        let differs = want
            .iter()
            .find(|(name, h)| got.get(*name) != Some(*h))
            .and_then(|(name, _)| first.outputs.get(name))
            .map(|o| o.path.clone());
        if let Some(path) = differs {
            let message = differs_message(cfg.store_dir.display(&path), cfg.store_dir.display(drv));
            if enforce {
                let mut r = failure(BuildStatus::NotDeterministic, message);
                r.is_non_deterministic = true;
                r.times_built = round;
                return Err(Box::new(r));
            }
            let _ = sink.write_all(format!("{message}\n").as_bytes());
            return Ok(Repeated {
                rounds: round,
                non_deterministic: true,
            });
        }
    }
    Ok(Repeated {
        rounds: total,
        non_deterministic: false,
    })
}

/// Nix's words for an output that came out differently in a later round.
pub fn differs_message(output: String, drv: String) -> String {
    format!(
        "output '{}' of '{}' differs from previous round",
        hl(output),
        hl(drv)
    )
}
