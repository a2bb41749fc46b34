//! Realising a build request's targets through the goal graph, and turning each target's
//! outcome into Nix's BuildResult.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsFd, AsRawFd};

use stockade_common::derivation::Derivation;
use stockade_common::ipc::builder::{BuildKind, BuildSettings, BuildStatus};
use stockade_common::ipc::writer::BrokerEvent;
use stockade_common::nar;
use stockade_common::store_path::StorePath;
use stockade_common::worker::request::DerivedPath;
use stockade_common::worker::{ActivityType, Verbosity};

use super::read_derivation;
use crate::ctx::Ctx;
use crate::error::{hl, OpError, OpResult};
use crate::goals::plan::{DrvSource, Plan};
use crate::goals::{run, text, ClientFrames, Outcome, RunOptions, WorkerActs};

/// One target's end.
pub struct Target {
    pub target: DerivedPath,
    pub outcome: Outcome,
    /// The outputs a successful derivation target has now, by name.
    pub outputs: BTreeMap<String, StorePath>,
}

/// The targets' ends, with the worker's activities still open (the operation may have
/// errors to log before they stop).
pub struct Realised {
    pub targets: Vec<Target>,
    pub acts: WorkerActs,
}

impl Realised {
    pub fn stop(self, ctx: &mut Ctx<'_>) -> OpResult<Vec<Target>> {
        self.acts.stop(&mut ClientFrames(&mut *ctx.client))?;
        Ok(self.targets)
    }
}

struct CtxSource<'c, 'a>(&'c mut Ctx<'a>);

impl DrvSource for CtxSource<'_, '_> {
    fn is_valid(&mut self, path: &StorePath) -> OpResult<bool> {
        self.0.store.is_valid(path)
    }
    fn derivation(&mut self, path: &StorePath) -> OpResult<Derivation> {
        read_derivation(self.0, path)
    }
    fn intact(&mut self, path: &StorePath) -> OpResult<bool> {
        let Some(info) = self.0.store.path_info(path)? else {
            return Err(super::invalid_path(self.0, path));
        };
        let store = std::fs::File::open(&self.0.cfg.real_store_dir)?;
        let name = std::ffi::OsStr::new(path.base_name());
        match nix::sys::stat::fstatat(
            Some(store.as_raw_fd()),
            name,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Err(nix::errno::Errno::ENOENT) => return Ok(false),
            Err(e) => return Err(OpError::client(std::io::Error::from(e).to_string())),
            Ok(_) => {}
        }
        let mut h = nar::HashingWriter::sink(info.nar_hash.algo());
        match nar::dump_at(store.as_fd(), name, &mut h) {
            Ok(_) => Ok(h.finish().0 == info.nar_hash),
            // Canonical store files are readable by all: one the broker may not read has been
            // tampered with (nix-daemon, as root, would read it and find it changed).
            Err(nar::DumpError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                Ok(false)
            }
            Err(e) => Err(OpError::client(e.to_string())),
        }
    }
    fn references(&mut self, path: &StorePath) -> OpResult<BTreeSet<StorePath>> {
        Ok(self
            .0
            .store
            .path_info(path)?
            .map(|i| i.references)
            .unwrap_or_default())
    }
    fn output_map(&mut self, drv: &StorePath) -> OpResult<BTreeMap<String, StorePath>> {
        self.0.store.output_map(drv)
    }
    fn say(&mut self, level: Verbosity, text: &str) -> OpResult<()> {
        self.0.client.log(level, text)
    }
}

fn invalid_opaque(ctx: &Ctx<'_>, p: &StorePath) -> OpError {
    OpError::client(format!(
        "path '{}' does not exist and cannot be created",
        hl(ctx.sd.display(p))
    ))
}

/// Builds what `targets` need. `kind` applies to derivation targets themselves.
pub fn realise(ctx: &mut Ctx<'_>, targets: &[DerivedPath], kind: BuildKind) -> OpResult<Realised> {
    for t in targets {
        if let DerivedPath::Opaque(p) = t {
            if !ctx.store.is_valid(p)? {
                return Err(invalid_opaque(ctx, p));
            }
        }
    }
    let acts = WorkerActs::start(&mut ClientFrames(&mut *ctx.client))?;
    match plan_and_run(ctx, targets, kind, &acts) {
        Ok(targets) => Ok(Realised { targets, acts }),
        Err(e) => {
            // The worker is gone before nix-daemon reports its error.
            if !e.fatal {
                acts.stop(&mut ClientFrames(&mut *ctx.client))?;
            }
            Err(e)
        }
    }
}

fn plan_and_run(
    ctx: &mut Ctx<'_>,
    targets: &[DerivedPath],
    kind: BuildKind,
    acts: &WorkerActs,
) -> OpResult<Vec<Target>> {
    let act = ctx.client.start_activity(
        Verbosity::Debug,
        ActivityType::UNKNOWN,
        "querying info about missing paths",
        Vec::new(),
    )?;
    ctx.client.stop_activity(act)?;
    let mut plan = Plan::default();
    let mut tops = Vec::new();
    let sd = ctx.sd.clone();
    for t in targets {
        tops.push(match t {
            DerivedPath::Opaque(_) => None,
            DerivedPath::Built { drv, outputs } => {
                Some(plan.add(&mut CtxSource(ctx), &sd, drv, outputs, kind)?)
            }
        });
    }
    let opts = run_options(ctx);
    let outcomes = {
        let mut frames = ClientFrames(&mut *ctx.client);
        run::run(&plan, &sd, &mut frames, ctx.builder, &opts, acts)?
    };
    audit(ctx, &plan, &outcomes);
    let mut out = Vec::new();
    for (t, top) in targets.iter().zip(tops) {
        let node = top.and_then(|i| Some((plan.nodes.get(i)?, outcomes.get(i)?)));
        let (outcome, outputs) = match node {
            // Repairing a path means substituting it again, and there are no substituters:
            // nix-daemon says only that the build failed.
            None if kind == BuildKind::Repair => (
                Outcome::Failed {
                    status: BuildStatus::NoSubstituters,
                    message: String::new(),
                    report: None,
                    logged: true,
                },
                BTreeMap::new(),
            ),
            None => (Outcome::Valid, BTreeMap::new()),
            Some((n, o @ Outcome::Valid)) => (o.clone(), n.wanted_paths()),
            Some((_, o @ Outcome::Built(r))) => (o.clone(), r.outputs.clone()),
            Some((_, o)) => (o.clone(), BTreeMap::new()),
        };
        out.push(Target {
            target: t.clone(),
            outcome,
            outputs,
        });
    }
    Ok(out)
}

/// The client's settings that go with each build.
fn run_options(ctx: &Ctx<'_>) -> RunOptions {
    let o = &*ctx.opts;
    let num = |name: &str| o.overrides.get(name).and_then(|v| v.parse::<u64>().ok());
    let minor = ctx.client.minor();
    RunOptions {
        keep_going: o.keep_going,
        max_jobs: o.max_build_jobs,
        settings: BuildSettings {
            max_silent_time: (o.max_silent_time > 0).then_some(u64::from(o.max_silent_time)),
            timeout: num("timeout"),
            max_build_log_size: num("max-build-log-size"),
            keep_failed: Some(o.keep_failed),
            cores: (o.build_cores > 0).then_some(o.build_cores),
            repeat: num("repeat"),
            enforce_determinism: o.overrides.get("enforce-determinism").and_then(|v| {
                match v.as_str() {
                    "true" => Some(true),
                    "false" => Some(false),
                    _ => None,
                }
            }),
            // Passed as asked: the helper alone decides by the client's trust (A54).
            post_build_hook: o.overrides.get("post-build-hook").cloned(),
        },
        log_lines: num("log-lines")
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or_else(|| text::default_log_lines(minor)),
    }
}

/// One audit line per derivation that had to be built, with how it ended.
fn audit(ctx: &mut Ctx<'_>, plan: &Plan, outcomes: &[Outcome]) {
    for (node, outcome) in plan.nodes.iter().zip(outcomes) {
        if node.build.is_none() {
            continue;
        }
        let result = match outcome {
            Outcome::Valid => "AlreadyValid".to_string(),
            Outcome::Built(r) => format!("{:?}", r.status),
            Outcome::Failed { status, .. } => format!("{status:?}"),
            Outcome::Cancelled => "Cancelled".to_string(),
        };
        ctx.store.audit(BrokerEvent::Build {
            drv: node.drv.clone(),
            result,
        });
    }
}

/// The target's status, error and times, for its BuildResult.
pub fn result_fields(outcome: &Outcome) -> crate::reply::BuildResult {
    let mut r = crate::reply::BuildResult::default();
    match outcome {
        Outcome::Valid => r.status = BuildStatus::AlreadyValid as u64,
        Outcome::Built(rep)
        | Outcome::Failed {
            report: Some(rep), ..
        } => {
            r.status = rep.status as u64;
            r.times_built = u64::from(rep.times_built);
            r.non_deterministic = rep.is_non_deterministic;
            r.start_time = rep.start_time;
            r.stop_time = rep.stop_time;
            r.cpu_user = rep.cpu_user_us;
            r.cpu_system = rep.cpu_system_us;
        }
        Outcome::Failed { .. } | Outcome::Cancelled => r.status = BuildStatus::MiscFailure as u64,
    }
    if let Outcome::Failed {
        status, message, ..
    } = outcome
    {
        r.status = *status as u64;
        r.error = text::result_message(message);
    }
    r
}
