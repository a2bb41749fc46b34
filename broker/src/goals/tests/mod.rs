//! The goal graph against a fake builder-helper: a thread on the other end of a socketpair
//! that answers each `Build` with `Started`, one `Log` line and `Done`. Before it sends `Done`
//! it waits until the broker has shown the log line to the client (so the broker has sent
//! every `Build` it was going to send before that `Done`) and reads what is queued: a `Build`
//! that arrives before its dependency's `Done` is then seen as such.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::mpsc;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use stockade_common::derivation::{Derivation, DerivationOutput};
use stockade_common::ipc::builder::*;
use stockade_common::ipc::{self, Channel};
use stockade_common::store_path::{StoreDir, StorePath};
use stockade_common::worker::{ActivityType, Field, ResultType, Verbosity};

use super::plan::{DrvSource, Plan};
use super::{run, Frames, Outcome, RunOptions, WorkerActs};
use crate::builder::Builder;
use crate::error::OpResult;

mod repair;

fn path(name: &str) -> StorePath {
    let hash: String = name
        .chars()
        .map(|_| 'a')
        .chain(std::iter::repeat('1'))
        .take(32)
        .collect();
    StoreDir::default()
        .parse(&format!("/nix/store/{hash}-{name}"))
        .unwrap()
}

/// Derivations `name.drv` with one output `name`, inputs by name; `valid` outputs exist,
/// `damaged` ones no longer hash to their NAR hash, `refs` are the outputs' references.
#[derive(Default)]
struct Store {
    drvs: HashMap<StorePath, Derivation>,
    valid: BTreeSet<StorePath>,
    damaged: BTreeSet<StorePath>,
    refs: HashMap<StorePath, BTreeSet<StorePath>>,
    said: Vec<String>,
}

impl Store {
    fn new(graph: &[(&str, &[&str])], valid: &[&str]) -> Store {
        let mut drvs = HashMap::new();
        for (name, inputs) in graph {
            let d = Derivation {
                name: name.to_string(),
                outputs: BTreeMap::from([(
                    "out".into(),
                    DerivationOutput::InputAddressed(path(name)),
                )]),
                input_drvs: inputs
                    .iter()
                    .map(|i| {
                        (
                            path(&format!("{i}.drv")),
                            BTreeSet::from(["out".to_string()]),
                        )
                    })
                    .collect(),
                input_srcs: BTreeSet::new(),
                system: b"x86_64-linux".to_vec(),
                builder: b"/bin/sh".to_vec(),
                args: Vec::new(),
                env: BTreeMap::new(),
            };
            drvs.insert(path(&format!("{name}.drv")), d);
        }
        let valid = valid.iter().map(|n| path(n)).collect();
        Store {
            drvs,
            valid,
            ..Store::default()
        }
    }
}

impl DrvSource for Store {
    fn is_valid(&mut self, p: &StorePath) -> OpResult<bool> {
        Ok(self.valid.contains(p))
    }
    fn derivation(&mut self, p: &StorePath) -> OpResult<Derivation> {
        Ok(self.drvs[p].clone())
    }
    fn intact(&mut self, p: &StorePath) -> OpResult<bool> {
        Ok(!self.damaged.contains(p))
    }
    fn references(&mut self, p: &StorePath) -> OpResult<BTreeSet<StorePath>> {
        Ok(match self.drvs.get(p) {
            Some(d) => d.input_drvs.keys().cloned().collect(),
            None => self.refs.get(p).cloned().unwrap_or_default(),
        })
    }
    fn output_map(&mut self, drv: &StorePath) -> OpResult<BTreeMap<String, StorePath>> {
        Ok(BTreeMap::from([("out".into(), path(&name_of(drv)))]))
    }
    fn say(&mut self, _level: Verbosity, text: &str) -> OpResult<()> {
        self.said.push(text.into());
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Frame {
    Start(u64, ActivityType, String, Vec<Field>),
    Stop(u64),
    Result(u64, ResultType, Vec<Field>),
    Error(String),
}

struct Recorder {
    frames: Vec<Frame>,
    next: u64,
    logged: mpsc::Sender<()>,
}

impl Frames for Recorder {
    fn minor(&self) -> u8 {
        34
    }
    fn start(
        &mut self,
        _: Verbosity,
        ty: ActivityType,
        text: &str,
        f: Vec<Field>,
    ) -> OpResult<u64> {
        self.next += 1;
        self.frames
            .push(Frame::Start(self.next, ty, text.into(), f));
        Ok(self.next)
    }
    fn stop(&mut self, id: u64) -> OpResult<()> {
        self.frames.push(Frame::Stop(id));
        Ok(())
    }
    fn result(&mut self, id: u64, ty: ResultType, fields: Vec<Field>) -> OpResult<()> {
        if ty == ResultType::BUILD_LOG_LINE {
            let _ = self.logged.send(());
        }
        self.frames.push(Frame::Result(id, ty, fields));
        Ok(())
    }
    fn log_error(&mut self, message: &str) -> OpResult<()> {
        self.frames.push(Frame::Error(message.into()));
        Ok(())
    }
    fn log(&mut self, _level: Verbosity, text: &str) -> OpResult<()> {
        self.frames.push(Frame::Error(text.into()));
        Ok(())
    }
    fn hangup_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

#[derive(Debug, PartialEq)]
enum Event {
    /// A build request, with the names whose `Done` had been sent when it arrived.
    Build(String, Vec<String>),
    Cancel(String),
}

fn name_of(drv: &StorePath) -> String {
    drv.name().trim_end_matches(".drv").to_string()
}

fn queued(ch: &Channel) -> bool {
    let mut fds = [PollFd::new(ch.as_fd(), PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::ZERO).unwrap() > 0
}

/// The fake helper: `failing` names fail with exit code 1.
fn helper(mut ch: Channel, failing: Vec<&'static str>, logged: mpsc::Receiver<()>) -> Vec<Event> {
    let mut events = Vec::new();
    let mut done = Vec::new();
    let mut pending: VecDeque<(BrokerToBuilder, Vec<String>)> = VecDeque::new();
    let mut names = HashMap::new();
    loop {
        let (msg, done_then) = match pending.pop_front() {
            Some(m) => m,
            None => match ch.recv::<BrokerToBuilder>() {
                Ok((m, _)) => (m, done.clone()),
                Err(ipc::Error::Closed) => return events,
                Err(e) => panic!("{e}"),
            },
        };
        let (id, drv) = match msg {
            BrokerToBuilder::Hello { version } => {
                ch.send(&BuilderToBroker::Hello { version }, &[]).unwrap();
                // As the real helper may: its word on the broker's cgroup after the Hello (it
                // comes whenever the move is done), which the broker must settle and skip.
                let budget = BuilderToBroker::Budget {
                    memory: true,
                    pids: true,
                };
                ch.send(&budget, &[]).unwrap();
                continue;
            }
            BrokerToBuilder::Cancel { id } => {
                events.push(Event::Cancel(names.get(&id).cloned().unwrap_or_default()));
                continue;
            }
            BrokerToBuilder::Build { id, drv, .. } => (id, drv),
            other => panic!("{other:?}"),
        };
        let name = name_of(&drv);
        names.insert(id, name.clone());
        events.push(Event::Build(name.clone(), done_then));
        ch.send(
            &BuilderToBroker::Started {
                id,
                sandboxed: true,
                rounds: 1,
            },
            &[],
        )
        .unwrap();
        let line = format!("log of {name}").into_bytes();
        ch.send(&BuilderToBroker::Log { id, line }, &[]).unwrap();
        logged.recv().unwrap();
        while queued(&ch) {
            pending.push_back((ch.recv::<BrokerToBuilder>().unwrap().0, done.clone()));
        }
        let cancelled = pending
            .iter()
            .any(|(m, _)| *m == BrokerToBuilder::Cancel { id });
        let fails = failing.contains(&name.as_str()) || cancelled;
        let report = BuildReport {
            status: if fails {
                BuildStatus::PermanentFailure
            } else {
                BuildStatus::Built
            },
            error: if fails {
                format!("builder for '{}' failed with exit code 1", drv.base_name())
            } else {
                String::new()
            },
            log_tail: vec![format!("log of {name}")],
            outputs: BTreeMap::from([("out".into(), path(&name))]),
            infos: Vec::new(),
            times_built: 1,
            is_non_deterministic: false,
            start_time: 1,
            stop_time: 2,
            cpu_user_us: None,
            cpu_system_us: None,
            kept_build_dir: None,
            hook_failure: None,
        };
        let report = Box::new(report);
        ch.send(&BuilderToBroker::Done { id, report }, &[]).unwrap();
        done.push(name);
    }
}

struct Run {
    outcomes: BTreeMap<String, Outcome>,
    events: Vec<Event>,
    frames: Vec<Frame>,
    /// What planning said.
    said: Vec<String>,
}

fn build(
    graph: &[(&str, &[&str])],
    valid: &[&str],
    targets: &[&str],
    failing: Vec<&'static str>,
    keep_going: bool,
) -> Run {
    let store = Store::new(graph, valid);
    build_in(store, targets, BuildKind::Normal, failing, keep_going)
}

fn build_in(
    mut store: Store,
    targets: &[&str],
    kind: BuildKind,
    failing: Vec<&'static str>,
    keep_going: bool,
) -> Run {
    let sd = StoreDir::default();
    let mut plan = Plan::default();
    for t in targets {
        let drv = path(&format!("{t}.drv"));
        plan.add(&mut store, &sd, &drv, &BTreeSet::new(), kind)
            .unwrap();
    }
    let (ours, theirs) = ipc::socketpair().unwrap();
    let (tx, rx) = mpsc::channel();
    let fake = std::thread::spawn(move || helper(theirs, failing, rx));
    let mut rec = Recorder {
        frames: Vec::new(),
        next: 0,
        logged: tx,
    };
    let mut builder = Builder::new(Some(ours));
    let opts = RunOptions {
        keep_going,
        max_jobs: 1,
        settings: BuildSettings::default(),
        log_lines: 10,
    };
    let acts = WorkerActs::start(&mut rec).unwrap();
    let outcomes = run::run(&plan, &sd, &mut rec, &mut builder, &opts, &acts).unwrap();
    acts.stop(&mut rec).unwrap();
    drop(builder);
    let events = fake.join().unwrap();
    let outcomes = plan
        .nodes
        .iter()
        .map(|n| name_of(&n.drv))
        .zip(outcomes)
        .collect();
    Run {
        outcomes,
        events,
        frames: rec.frames,
        said: store.said,
    }
}

fn built(name: &str, before: &[&str]) -> Event {
    Event::Build(name.into(), before.iter().map(|s| s.to_string()).collect())
}

fn status(o: &Outcome) -> Option<BuildStatus> {
    match o {
        Outcome::Built(r) => Some(r.status),
        Outcome::Failed { status, .. } => Some(*status),
        _ => None,
    }
}

#[test]
fn a_dependent_is_submitted_after_its_dependency_is_done() {
    let r = build(
        &[("top", &["dep"]), ("dep", &[])],
        &[],
        &["top"],
        vec![],
        false,
    );
    assert_eq!(r.events, vec![built("dep", &[]), built("top", &["dep"])]);
    assert!(
        r.outcomes.values().all(Outcome::success),
        "{:?}",
        r.outcomes
    );
}

#[test]
fn a_failure_fails_its_dependents_unbuilt() {
    let r = build(
        &[("top", &["dep"]), ("dep", &[])],
        &[],
        &["top"],
        vec!["dep"],
        false,
    );
    assert_eq!(r.events, vec![built("dep", &[])]);
    assert_eq!(
        status(&r.outcomes["dep"]),
        Some(BuildStatus::PermanentFailure)
    );
    let Outcome::Failed {
        status,
        message,
        logged,
        ..
    } = &r.outcomes["top"]
    else {
        panic!("{:?}", r.outcomes["top"]);
    };
    assert_eq!(*status, BuildStatus::DependencyFailed);
    assert!(!logged);
    assert!(
        message.contains("dependencies of derivation") && message.contains("top.drv"),
        "{message}"
    );
    // The dependency's error reaches the client as it happens, with its log's tail.
    let logged: Vec<&Frame> = r
        .frames
        .iter()
        .filter(|f| matches!(f, Frame::Error(_)))
        .collect();
    let [Frame::Error(e)] = logged[..] else {
        panic!("{:?}", r.frames)
    };
    assert!(
        e.contains("failed with exit code 1;\nlast 1 log lines:\n> log of dep\n"),
        "{e}"
    );
}

#[test]
fn keep_going_builds_what_does_not_depend_on_a_failure() {
    let graph: &[(&str, &[&str])] = &[("top", &["bad", "good"]), ("bad", &[]), ("good", &[])];
    let r = build(graph, &[], &["top"], vec!["bad"], true);
    assert_eq!(r.events.len(), 2, "{:?}", r.events);
    assert!(r
        .events
        .iter()
        .any(|e| matches!(e, Event::Build(n, _) if n == "good")));
    assert_eq!(status(&r.outcomes["good"]), Some(BuildStatus::Built));
    assert_eq!(
        status(&r.outcomes["top"]),
        Some(BuildStatus::DependencyFailed)
    );

    // Without keep-going the other build is cancelled.
    let r = build(graph, &[], &["top"], vec!["bad"], false);
    assert_eq!(
        r.events,
        vec![
            built("bad", &[]),
            built("good", &[]),
            Event::Cancel("good".into())
        ]
    );
    assert!(matches!(r.outcomes["good"], Outcome::Cancelled));
    assert!(!r.outcomes["top"].success());
}

#[test]
fn valid_outputs_are_not_built() {
    let r = build(
        &[("top", &["dep"]), ("dep", &[])],
        &["dep"],
        &["top"],
        vec![],
        false,
    );
    assert_eq!(r.events, vec![built("top", &[])]);
    let r = build(
        &[("top", &["dep"]), ("dep", &[])],
        &["top"],
        &["top"],
        vec![],
        false,
    );
    assert_eq!(r.events, vec![]);
    assert!(matches!(r.outcomes["top"], Outcome::Valid));
}

#[test]
fn log_lines_are_results_of_the_build_activity() {
    let r = build(&[("one", &[])], &[], &["one"], vec![], false);
    let drv = StoreDir::default().display(&path("one.drv"));
    let start = r.frames.iter().find_map(|f| match f {
        Frame::Start(id, ActivityType::BUILD, text, fields) => {
            Some((*id, text.clone(), fields.clone()))
        }
        _ => None,
    });
    let (id, text, fields) = start.expect("a build activity");
    assert_eq!(text, format!("building '{drv}'"));
    assert_eq!(
        fields,
        vec![
            Field::string(drv.clone()),
            Field::string(""),
            Field::Int(1),
            Field::Int(1)
        ]
    );
    let line = Frame::Result(
        id,
        ResultType::BUILD_LOG_LINE,
        vec![Field::string("log of one")],
    );
    let at = |f: &Frame| r.frames.iter().position(|g| g == f);
    assert!(at(&line).is_some(), "{:?}", r.frames);
    assert!(at(&line) < at(&Frame::Stop(id)), "{:?}", r.frames);
    // The worker's three activities open first and close last, in reverse.
    let kinds: Vec<ActivityType> = r
        .frames
        .iter()
        .take(3)
        .filter_map(|f| match f {
            Frame::Start(_, ty, _, _) => Some(*ty),
            _ => None,
        })
        .collect();
    assert_eq!(
        kinds,
        vec![
            ActivityType::REALISE,
            ActivityType::BUILDS,
            ActivityType::COPY_PATHS
        ]
    );
    assert_eq!(r.frames.last(), Some(&Frame::Stop(1)));
}
