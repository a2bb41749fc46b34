//! Runs a [`Plan`]: every derivation whose inputs are done is handed to the builder-helper at
//! once (the helper owns the global job slots), each `Done` releases what waited for it, and
//! a failure fails its dependents without building them. What the client sees follows
//! nix-daemon's worker: its three progress activities, one build activity per build with the
//! log lines as its results, and the errors of failed dependencies logged as they happen.

use std::collections::HashMap;

use stockade_common::ipc::builder::{
    BrokerToBuilder, BuildReport, BuildStatus, BuilderToBroker, MAX_BUILDS_PER_BROKER,
};
use stockade_common::store_path::StoreDir;
use stockade_common::worker::{ActivityType, Field, ResultType, Verbosity};

use super::plan::Plan;
use super::{text, Frames, Outcome, RunOptions, WorkerActs};
use crate::builder::{Builder, BuilderError};
use crate::error::{OpError, OpResult};

enum State {
    Waiting,
    Open { act: Option<u64> },
    Ended(Outcome),
}

struct Runner<'a> {
    plan: &'a Plan,
    sd: &'a StoreDir,
    out: &'a mut dyn Frames,
    builder: &'a mut Builder,
    opts: &'a RunOptions,
    acts: &'a WorkerActs,
    state: Vec<State>,
    open: HashMap<u64, usize>,
    dependents: Vec<Vec<usize>>,
    halting: bool,
    done: u64,
    running: u64,
    failed: u64,
    /// Nodes that will not be built after all (failed, or a dependency failed).
    gone: u64,
    /// The `post-build-hook` activity of each build whose hook runs.
    hooks: HashMap<u64, u64>,
    /// Round and rounds (`repeat` + 1) of each node being built.
    rounds: HashMap<usize, (u32, u32)>,
}

/// Builds what `plan` needs; an outcome per node.
pub fn run(
    plan: &Plan,
    sd: &StoreDir,
    out: &mut dyn Frames,
    builder: &mut Builder,
    opts: &RunOptions,
    acts: &WorkerActs,
) -> OpResult<Vec<Outcome>> {
    let mut dependents = vec![Vec::new(); plan.nodes.len()];
    for (i, n) in plan.nodes.iter().enumerate() {
        for &d in &n.deps {
            if let Some(v) = dependents.get_mut(d) {
                v.push(i);
            }
        }
    }
    let state = plan
        .nodes
        .iter()
        .map(|n| match (n.build, n.closure_repair) {
            (None, None) => State::Ended(Outcome::Valid),
            _ => State::Waiting,
        })
        .collect();
    let mut r = Runner {
        plan,
        sd,
        out,
        builder,
        opts,
        acts,
        state,
        open: HashMap::new(),
        dependents,
        halting: false,
        done: 0,
        running: 0,
        failed: 0,
        gone: 0,
        hooks: HashMap::new(),
        rounds: HashMap::new(),
    };
    r.progress()?;
    if plan.needs_building() > 0 {
        if opts.max_jobs == 0 {
            return Err(OpError::client(text::no_build_slots(r.out.minor())));
        }
        if let Err(e) = r.builder.ready() {
            let first = plan.nodes.iter().find(|n| n.build.is_some());
            return Err(match (e, first) {
                (BuilderError::Unavailable, Some(n)) => OpError::client(format!(
                    "cannot build '{}': building is not supported by this daemon yet",
                    crate::error::hl(sd.display(&n.drv))
                )),
                (e, _) => e.into(),
            });
        }
    }
    loop {
        r.advance()?;
        if r.open.is_empty() {
            break;
        }
        let msg = r.builder.recv(r.out.hangup_fd())?;
        r.handle(msg)?;
    }
    Ok(r.state
        .into_iter()
        .map(|s| match s {
            State::Ended(o) => o,
            _ => Outcome::Cancelled,
        })
        .collect())
}

impl Runner<'_> {
    fn progress(&mut self) -> OpResult<()> {
        let [realise, builds, copies] = self.acts.0;
        let expected = (self.plan.needs_building() as u64).saturating_sub(self.gone);
        let int = Field::Int;
        self.out.result(
            builds,
            ResultType::PROGRESS,
            vec![
                int(self.done),
                int(expected),
                int(self.running),
                int(self.failed),
            ],
        )?;
        self.out
            .result(copies, ResultType::PROGRESS, vec![int(0); 4])?;
        for ty in [ActivityType::FILE_TRANSFER, ActivityType::COPY_PATH] {
            self.out.result(
                realise,
                ResultType::SET_EXPECTED,
                vec![int(ty.0.into()), int(0)],
            )?;
        }
        Ok(())
    }

    /// Fails the nodes whose dependencies failed and submits the ones that are ready, until
    /// nothing changes.
    fn advance(&mut self) -> OpResult<()> {
        let mut changed = true;
        while changed {
            changed = false;
            // In discovery order (targets as given, then inputs in the derivations' order),
            // the order in which Nix's worker creates its goals and, with few job slots,
            // starts them.
            for i in 0..self.plan.nodes.len() {
                if !matches!(self.state.get(i), Some(State::Waiting)) {
                    continue;
                }
                let Some(node) = self.plan.nodes.get(i) else {
                    continue;
                };
                let (mut pending, mut failed) = (0, 0);
                for d in &node.deps {
                    match self.state.get(*d) {
                        Some(State::Ended(o)) if o.success() => {}
                        Some(State::Ended(_)) => failed += 1,
                        _ => pending += 1,
                    }
                }
                // Without keep-going the first failure is enough to give up on a node.
                let give_up = failed > 0 && (pending == 0 || !self.opts.keep_going);
                if let (None, Some(unrepairable)) = (node.build, node.closure_repair) {
                    if give_up || (pending == 0 && unrepairable > 0) {
                        let drv = self.sd.display(&node.drv);
                        self.end(
                            i,
                            BuildStatus::MiscFailure,
                            text::closure_unrepaired(&drv),
                            None,
                        )?;
                        changed = true;
                    } else if pending == 0 {
                        // Its closure is repaired: nothing of its own to build.
                        if let Some(s) = self.state.get_mut(i) {
                            *s = State::Ended(Outcome::Valid);
                        }
                        changed = true;
                    }
                } else if give_up {
                    let drv = self.sd.display(&node.drv);
                    let message = text::dependency_failed(failed, &drv);
                    self.end(i, BuildStatus::DependencyFailed, message, None)?;
                    changed = true;
                } else if pending == 0 && failed == 0 && !self.halting {
                    self.submit(i)?;
                    changed = true;
                }
            }
        }
        Ok(())
    }

    fn submit(&mut self, i: usize) -> OpResult<()> {
        let Some(node) = self.plan.nodes.get(i) else {
            return Ok(());
        };
        if self.open.len() >= MAX_BUILDS_PER_BROKER {
            return Err(OpError::client(
                "too many builds at once for one connection",
            ));
        }
        let id = self.builder.next_id();
        let outputs = if node.all {
            Vec::new()
        } else {
            node.wanted.iter().cloned().collect()
        };
        self.builder.send(&BrokerToBuilder::Build {
            id,
            drv: node.drv.clone(),
            outputs,
            kind: node
                .build
                .unwrap_or(stockade_common::ipc::builder::BuildKind::Normal),
            settings: self.opts.settings.clone(),
        })?;
        self.open.insert(id, i);
        if let Some(s) = self.state.get_mut(i) {
            *s = State::Open { act: None };
        }
        Ok(())
    }

    /// Records a node's failure: logged at once when a dependent is waiting for it (it is
    /// not a target's final error then), and the end of everything without keep-going.
    fn end(
        &mut self,
        i: usize,
        status: BuildStatus,
        message: String,
        report: Option<Box<BuildReport>>,
    ) -> OpResult<()> {
        let waited_for = self.dependents.get(i).is_some_and(|ds| {
            ds.iter()
                .any(|d| matches!(self.state.get(*d), Some(State::Waiting)))
        });
        if waited_for {
            self.out.log_error(&message)?;
        }
        // Only builds count in the progress (a closure repair builds nothing itself).
        if self.plan.nodes.get(i).is_some_and(|n| n.build.is_some()) {
            if status != BuildStatus::DependencyFailed {
                self.failed += 1;
            }
            self.gone += 1;
        }
        if let Some(s) = self.state.get_mut(i) {
            *s = State::Ended(Outcome::Failed {
                status,
                message,
                report,
                logged: waited_for,
            });
        }
        self.progress()?;
        if !self.opts.keep_going && !self.halting {
            self.halting = true;
            let ids: Vec<u64> = self.open.keys().copied().collect();
            for id in ids {
                self.builder.send(&BrokerToBuilder::Cancel { id })?;
            }
        }
        Ok(())
    }

    fn handle(&mut self, msg: BuilderToBroker) -> OpResult<()> {
        let id = match &msg {
            BuilderToBroker::Waiting { id }
            | BuilderToBroker::Started { id, .. }
            | BuilderToBroker::Round { id, .. }
            | BuilderToBroker::Log { id, .. }
            | BuilderToBroker::HookStarted { id, .. }
            | BuilderToBroker::HookLog { id, .. }
            | BuilderToBroker::Done { id, .. } => *id,
            other => {
                return Err(BuilderError::Broken(format!("unexpected message {other:?}")).into())
            }
        };
        let Some(&i) = self.open.get(&id) else {
            return Err(BuilderError::Broken(format!("a message about unknown build {id}")).into());
        };
        match msg {
            BuilderToBroker::Started { rounds, .. } => {
                self.rounds.insert(i, (1, rounds.max(1)));
                self.activity(i)?;
                self.progress()?;
            }
            BuilderToBroker::Round { round, .. } => {
                // Nix starts a new build activity for each round.
                if let Some(State::Open { act }) = self.state.get_mut(i) {
                    if let Some(a) = act.take() {
                        self.out.stop(a)?;
                        self.running = self.running.saturating_sub(1);
                    }
                }
                if let Some(r) = self.rounds.get_mut(&i) {
                    r.0 = round;
                }
                self.activity(i)?;
            }
            BuilderToBroker::Log { line, .. } => {
                let act = self.activity(i)?;
                self.out
                    .result(act, ResultType::BUILD_LOG_LINE, vec![Field::String(line)])?;
            }
            BuilderToBroker::HookStarted { hook, .. } => {
                let drv = self.plan.nodes.get(i).map(|n| self.sd.display(&n.drv));
                // Nix 2.8 says it at `info`; later Nix only when talkative.
                let level = if self.out.minor() >= 35 {
                    Verbosity::Talkative
                } else {
                    Verbosity::Info
                };
                let act = self.out.start(
                    level,
                    ActivityType::POST_BUILD_HOOK,
                    &format!("running post-build-hook '{hook}'"),
                    vec![Field::string(drv.unwrap_or_default())],
                )?;
                self.hooks.insert(id, act);
            }
            BuilderToBroker::HookLog { line, .. } => {
                if let Some(&act) = self.hooks.get(&id) {
                    self.out.result(
                        act,
                        ResultType::POST_BUILD_LOG_LINE,
                        vec![Field::String(line)],
                    )?;
                }
            }
            BuilderToBroker::Done { report, .. } => {
                self.open.remove(&id);
                if let Some(act) = self.hooks.remove(&id) {
                    self.out.stop(act)?;
                }
                if let Some(failure) = &report.hook_failure {
                    // As in Nix, a failing hook fails the whole request (the outputs stay
                    // valid); what else runs for it is stopped.
                    self.cancel_all()?;
                    return Err(OpError::client(failure.clone()));
                }
                if let Some(dir) = &report.kept_build_dir {
                    self.out.log(
                        Verbosity::Error,
                        &format!("note: keeping build directory '{dir}'"),
                    )?;
                }
                if let Some(State::Open { act: Some(act), .. }) = self.state.get(i) {
                    let act = *act;
                    self.out.stop(act)?;
                    self.running = self.running.saturating_sub(1);
                }
                self.finish(i, report)?;
            }
            _ => {}
        }
        Ok(())
    }

    fn finish(&mut self, i: usize, report: Box<BuildReport>) -> OpResult<()> {
        if report.status.is_success() {
            if report.status == BuildStatus::Built {
                self.done += 1;
            }
            if let Some(s) = self.state.get_mut(i) {
                *s = State::Ended(Outcome::Built(report));
            }
            return self.progress();
        }
        if self.halting {
            // Cancelled at our request, or failed while everything stops anyway.
            if let Some(s) = self.state.get_mut(i) {
                *s = State::Ended(Outcome::Cancelled);
            }
            return Ok(());
        }
        let drv = self.plan.nodes.get(i).map(|n| self.sd.display(&n.drv));
        let drv = drv.unwrap_or_default();
        let message = text::failure(&report, &drv, self.out.minor(), self.opts.log_lines);
        self.end(i, report.status, message, Some(report))
    }

    /// Cancels every open build and waits for their `Done`s, so that the channel carries
    /// nothing about this request into the next one.
    fn cancel_all(&mut self) -> OpResult<()> {
        let ids: Vec<u64> = self.open.keys().copied().collect();
        for id in ids {
            self.builder.send(&BrokerToBuilder::Cancel { id })?;
        }
        while !self.open.is_empty() {
            if let BuilderToBroker::Done { id, .. } = self.builder.recv(self.out.hangup_fd())? {
                self.open.remove(&id);
            }
        }
        Ok(())
    }

    /// The node's build activity, started at its first sign of life.
    fn activity(&mut self, i: usize) -> OpResult<u64> {
        let Some(State::Open { act, .. }) = self.state.get_mut(i) else {
            return Err(OpError::fatal("build activity of a build that is not open"));
        };
        if let Some(a) = act {
            return Ok(*a);
        }
        let node = self.plan.nodes.get(i);
        let drv = node.map(|n| self.sd.display(&n.drv)).unwrap_or_default();
        let kind = node
            .and_then(|n| n.build)
            .unwrap_or(stockade_common::ipc::builder::BuildKind::Normal);
        let (round, rounds) = self.rounds.get(&i).copied().unwrap_or((1, 1));
        let id = self.out.start(
            Verbosity::Info,
            ActivityType::BUILD,
            &text::activity_text(kind, &drv, round, rounds),
            vec![
                Field::string(drv.clone()),
                Field::string(""),
                Field::Int(u64::from(round)),
                Field::Int(u64::from(rounds)),
            ],
        )?;
        if let Some(State::Open { act, .. }) = self.state.get_mut(i) {
            *act = Some(id);
        }
        self.running += 1;
        Ok(id)
    }
}
