//! One build, on a thread of its own that lives until the build has ended (the sandbox's
//! parent-death signal is tied to the thread that cloned it): `BeginBuild`, a job slot, a
//! build uid, `Started`, the build with its log sent to the broker and kept in a file,
//! `RegisterOutputs`, `ReleaseUid`, `StoreBuildLog`, `EndBuild`, and `Done` to every broker
//! that waits for it.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use stockade_common::ipc::builder::{
    BuildInputs, BuildKind, BuildReport, BuildStatus, BuilderToBroker, BuilderToMaster,
    BuilderToStoreWriter, RegisteredOutputs,
};
use stockade_common::store_path::StorePath;

use super::links::WriterError;
use super::phase::Effective;
use super::sched::Cancel;
use super::session::failure;
use super::Service;
use crate::build::{
    derivation_facts, goal_name, run_derivation_with, BuildError, BuildErrorKind, BuildJob,
    DrvFacts,
};

/// Longest log line sent in one message; longer lines are split.
const LINE_CHUNK: usize = 16 * 1024;
/// Longest log-tail line in a report (the report must fit in one message).
const TAIL_LINE_MAX: usize = 1024;

static NEXT_BUILD: AtomicU64 = AtomicU64::new(1);

/// Starts the build thread; the scheduler has counted it.
pub fn spawn(
    svc: Arc<Service>,
    drv: StorePath,
    kind: BuildKind,
    eff: Effective,
    cancel: Arc<Cancel>,
    conn_id: u64,
) {
    let name = format!("build-{}", drv.name());
    let (svc2, drv2, cancel2) = (svc.clone(), drv.clone(), cancel.clone());
    let started = std::thread::Builder::new().name(name).spawn(move || {
        run(&svc2, &drv2, kind, eff, &cancel2, conn_id);
    });
    if let Err(e) = started {
        let report = failure(
            BuildStatus::MiscFailure,
            format!("cannot start a build thread: {e}"),
        );
        for w in svc.sched.finish(&drv, &cancel) {
            w.broker.done(w.id, report.clone());
        }
        svc.sched.release(false, &cancel);
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn run(
    svc: &Service,
    drv: &StorePath,
    kind: BuildKind,
    eff: Effective,
    cancel: &Cancel,
    conn: u64,
) {
    let mut slot = false;
    let mut report = if svc.sched.hold_drv(drv, cancel) {
        build(svc, drv, kind, eff, cancel, conn, &mut slot)
    } else {
        failure(BuildStatus::MiscFailure, "the build was cancelled".into())
    };
    report.log_tail.iter_mut().for_each(|l| {
        if l.len() > TAIL_LINE_MAX {
            let mut end = TAIL_LINE_MAX;
            while !l.is_char_boundary(end) {
                end -= 1;
            }
            l.truncate(end);
        }
    });
    for w in svc.sched.finish(drv, cancel) {
        w.broker.done(w.id, report.clone());
    }
    // After the `Done`s: a build waiting for the slot starts only once this one has ended.
    svc.sched.release(slot, cancel);
}

/// Nix's status for a failed build.
fn status_of(kind: &BuildErrorKind, fixed: bool) -> BuildStatus {
    match kind {
        BuildErrorKind::BuilderFailed { .. } if fixed => BuildStatus::TransientFailure,
        BuildErrorKind::BuilderFailed { .. } => BuildStatus::PermanentFailure,
        BuildErrorKind::MissingOutput { .. } => BuildStatus::OutputRejected,
        BuildErrorKind::Silent { .. } | BuildErrorKind::TimedOut { .. } => BuildStatus::TimedOut,
        BuildErrorKind::LogLimit { .. } => BuildStatus::LogLimitExceeded,
        _ => BuildStatus::MiscFailure,
    }
}

fn build(
    svc: &Service,
    drv: &StorePath,
    kind: BuildKind,
    eff: Effective,
    cancel: &Cancel,
    conn: u64,
    slot: &mut bool,
) -> BuildReport {
    let cfg = svc.build_config(&eff);
    let shown = cfg.store_dir.display(drv);
    let facts = match derivation_facts(&cfg, drv) {
        Ok(f) => f,
        Err(e) => return failure(BuildStatus::MiscFailure, e.to_string()),
    };
    if let Err(why) = can_build_here(&svc.config, &facts.drv, &shown) {
        return failure(BuildStatus::MiscFailure, why);
    }
    // A49: `sandbox = true` forbids `__noChroot` outright, in Nix's words (`relaxed` allows it;
    // a root daemon still confines such a build).
    if svc.config.sandbox == stockade_common::ipc::builder::SandboxSetting::Enabled
        && super::no_chroot(&facts.drv)
    {
        return failure(
            BuildStatus::MiscFailure,
            format!(
                "derivation '{}' has '__noChroot' set, but that's not allowed when 'sandbox' is \
                 'true'",
                stockade_common::worker::hl(&shown)
            ),
        );
    }
    let build = NEXT_BUILD.fetch_add(1, Ordering::Relaxed);
    let begin = BuilderToStoreWriter::BeginBuild {
        build,
        drv: drv.clone(),
        inputs: facts.inputs.iter().cloned().collect(),
        outputs: facts.outputs.values().cloned().collect(),
    };
    let inputs: BuildInputs = match svc.writer.request(&begin, &[]) {
        Ok(i) => i,
        Err(e) => return failure(BuildStatus::MiscFailure, e.to_string()),
    };
    // `repeat` applies to normal builds only.
    let rounds = match kind {
        BuildKind::Normal => (
            u32::try_from(eff.repeat.saturating_add(1)).unwrap_or(u32::MAX),
            eff.enforce_determinism,
        ),
        _ => (1, true),
    };
    // The hook and whether a client set it.
    let hook = eff
        .hook(svc.config.post_build_hook.as_deref())
        .map(|h| (h, eff.post_build_hook.is_some()));
    let report = begun(
        svc, drv, kind, cancel, conn, slot, &cfg, &facts, &inputs, build, rounds, hook,
    );
    if let Err(e) = svc
        .writer
        .request::<()>(&BuilderToStoreWriter::EndBuild { build }, &[])
    {
        log::warn!("ending build {build} of {shown}: {e}");
    }
    report
}

/// The build after `BeginBuild` (whose `EndBuild` the caller sends whatever happens here).
#[allow(clippy::too_many_arguments)]
fn begun(
    svc: &Service,
    drv: &StorePath,
    kind: BuildKind,
    cancel: &Cancel,
    conn: u64,
    slot: &mut bool,
    cfg: &crate::build::BuildConfig,
    facts: &DrvFacts,
    inputs: &BuildInputs,
    build: u64,
    (rounds, enforce): (u32, bool),
    hook: Option<(&str, bool)>,
) -> BuildReport {
    let shown = cfg.store_dir.display(drv);
    let valid: BTreeSet<&StorePath> = inputs.valid_outputs.iter().collect();
    if kind == BuildKind::Normal && facts.outputs.values().all(|p| valid.contains(p)) {
        let mut r = failure(BuildStatus::AlreadyValid, String::new());
        r.outputs = facts.outputs.clone();
        return r;
    }
    let at_limit = |uid, limit| svc.audit_uid_limit(conn, &shown, uid, limit);
    if !svc.sched.take_slot(drv, cancel, at_limit) {
        let why = if cancel.fired() {
            "the build was cancelled".to_string()
        } else {
            // Nix's words when `max-jobs` is 0 and there are no remote builders.
            format!(
                "unable to start any build; either increase '--max-jobs' or enable remote \
                 builds.\nhttps://nixos.org/manual/nix/stable/advanced-topics/distributed-builds.html \
                 (while building '{shown}')"
            )
        };
        return failure(BuildStatus::MiscFailure, why);
    }
    *slot = true;
    let (uid, gid) = match svc.master.need_uid() {
        Ok(ids) => ids,
        Err(why) => return failure(BuildStatus::MiscFailure, format!("no build user: {why}")),
    };
    let start_time = now();
    // Unsandboxed only for a daemon run by an ordinary user, and only a normal build (see
    // build/host.rs); a root daemon always confines its builds.
    let sandboxed = svc.sandboxed(&facts.drv) || svc.config.as_root || kind != BuildKind::Normal;
    for w in svc.sched.waiters(drv, cancel).iter().filter(|w| w.follows) {
        let _ = w.broker.send(&BuilderToBroker::Started {
            id: w.id,
            sandboxed,
            rounds,
        });
    }
    svc.audit(
        conn,
        "build-start",
        &[
            ("drv", shown.clone()),
            ("build-uid", uid.to_string()),
            ("sandboxed", sandboxed.to_string()),
        ],
    );
    let job = BuildJob {
        drv_path: drv.clone(),
        input_closure: inputs.closure.iter().cloned().collect(),
        references: inputs
            .closure
            .iter()
            .cloned()
            .zip(
                inputs
                    .references
                    .iter()
                    .map(|r| r.iter().cloned().collect()),
            )
            .collect(),
        build_uid: uid,
        build_gid: gid,
        goal_name: goal_name(&cfg.store_dir, drv, None, '^'),
    };
    let mut sink = match LogSink::new(svc, drv, cancel, &cfg.builds_dir) {
        Ok(s) => s,
        Err(e) => {
            svc.master.notify(&BuilderToMaster::ReleaseUid { uid });
            return failure(
                BuildStatus::MiscFailure,
                format!("cannot keep the log: {e}"),
            );
        }
    };
    // A cgroup of its own (kill everything, measure it); a build never fails for want of one.
    let cgroup = svc.build_cgroup(build);
    let mut cfg = cfg.clone();
    cfg.sandboxed = sandboxed;
    cfg.cgroups = cgroup
        .as_ref()
        .map(|c| c.dirs().to_vec())
        .unwrap_or_default();
    let cfg = &cfg;
    let ran = run_derivation_with(cfg, &job, &mut sink, Some(cancel.fd()));
    let usage = cgroup.as_ref().map(|c| c.usage()).unwrap_or_default();
    // Whatever the build left behind dies with its cgroup, before the uid is given back.
    drop(cgroup);
    let mut limits_hit = limits_hit(&svc.config, &usage);
    limits_hit.extend(super::floor::stopped(svc, conn, &shown, &ran));
    for (_, note) in &limits_hit {
        let _ = sink.write_all(format!("{note}\n").as_bytes());
    }
    // From the start of the sandbox's set-up until the builder was exec'd.
    let setup = ran.as_ref().ok().map(|o| o.setup_time);
    let mut report = match ran {
        Ok(outcome) => {
            let repeated = super::rounds::repeat(
                svc,
                cfg,
                &job,
                &mut sink,
                cancel,
                build,
                &outcome,
                rounds,
                enforce,
                facts.fixed,
            );
            match repeated {
                Err(report) => *report,
                Ok(r) => {
                    // A builtin's output is the helper's own, not the build user's.
                    let owner = (!outcome.by_helper).then_some(uid);
                    let mut report = register(
                        svc,
                        build,
                        owner,
                        kind,
                        &outcome.outputs_dir,
                        &facts.outputs,
                    );
                    if report.status == BuildStatus::Built {
                        report.times_built = r.rounds;
                        report.is_non_deterministic = r.non_deterministic;
                    }
                    report
                }
            }
        }
        Err(e) => failed(e, facts.fixed),
    };
    if report.status == BuildStatus::Built {
        if let Some((hook, from_client)) = hook {
            let ids = (uid, gid);
            report.hook_failure = super::hook::after_build(
                svc,
                super::hook::AfterBuild {
                    hook,
                    from_client,
                    drv,
                    report: &report,
                    ids,
                    build,
                    conn,
                },
                cancel,
            );
        }
    }
    // run_derivation returns only once every process of the build is gone.
    svc.master.notify(&BuilderToMaster::ReleaseUid { uid });
    report.start_time = start_time;
    report.stop_time = now();
    report.cpu_user_us = usage.cpu_user_us;
    report.cpu_system_us = usage.cpu_system_us;
    if let Some(log) = sink.seal() {
        let req = BuilderToStoreWriter::StoreBuildLog { build };
        if let Err(e) = svc.writer.request::<()>(&req, &[log.as_fd()]) {
            log::warn!("storing the log of {shown}: {e}");
        }
    }
    svc.audit(
        conn,
        "build-end",
        &[
            ("drv", shown),
            ("build-uid", uid.to_string()),
            ("status", format!("{:?}", report.status)),
            (
                "seconds",
                report.stop_time.saturating_sub(start_time).to_string(),
            ),
            (
                "sandbox-ms",
                setup.map_or_else(
                    || "-".to_string(),
                    |d| format!("{:.2}", d.as_secs_f64() * 1000.0),
                ),
            ),
            (
                "peak-memory",
                usage
                    .peak_memory
                    .map_or_else(|| "-".to_string(), |m| m.to_string()),
            ),
            (
                "limit",
                if limits_hit.is_empty() {
                    "-".to_string()
                } else {
                    limits_hit
                        .iter()
                        .map(|(name, _)| *name)
                        .collect::<Vec<_>>()
                        .join(",")
                },
            ),
        ],
    );
    report
}

/// The cgroup limits a build ran into (audit name, a line for its log).
fn limits_hit(
    config: &stockade_common::ipc::builder::BuilderConfig,
    usage: &crate::cgroup::Usage,
) -> Vec<(&'static str, String)> {
    let mut hit = Vec::new();
    if usage.oom_kills.unwrap_or(0) > 0 {
        hit.push((
            "memory",
            format!(
                "note: the build reached its memory limit (build-memory-max = {} bytes) and the \
                 kernel ended processes of it",
                config.build_memory_max
            ),
        ));
    }
    if usage.pids_refused.unwrap_or(0) > 0 {
        hit.push((
            "pids",
            format!(
                "note: the build reached its limit of {} processes and threads \
                 (build-pids-max); forks were refused",
                config.build_pids_max
            ),
        ));
    }
    hit
}

pub(super) fn failed(e: BuildError, fixed: bool) -> BuildReport {
    let mut r = failure(status_of(&e.kind, fixed), e.kind.to_string());
    r.log_tail = e.log_tail;
    r.kept_build_dir = e.kept_build_dir.map(|p| p.display().to_string());
    r
}

/// Hands the staged outputs to the store-writer.
fn register(
    svc: &Service,
    build: u64,
    uid: Option<u32>,
    kind: BuildKind,
    staging: &std::path::Path,
    outputs: &BTreeMap<String, StorePath>,
) -> BuildReport {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(staging)
    {
        Ok(f) => OwnedFd::from(f),
        Err(e) => {
            let why = format!("opening the staging directory: {e}");
            return failure(BuildStatus::MiscFailure, why);
        }
    };
    let req = BuilderToStoreWriter::RegisterOutputs {
        build,
        build_uid: uid,
        kind,
    };
    match svc
        .writer
        .request::<RegisteredOutputs>(&req, &[dir.as_fd()])
    {
        Ok(RegisteredOutputs {
            rejected: Some((status, why)),
            ..
        }) => failure(status, why),
        Ok(RegisteredOutputs { infos, .. }) => {
            let mut r = failure(BuildStatus::Built, String::new());
            r.outputs = outputs.clone();
            r.infos = infos.into_values().collect();
            r.times_built = 1;
            r
        }
        Err(WriterError::Failed(why)) => failure(BuildStatus::MiscFailure, why),
        Err(e) => failure(BuildStatus::MiscFailure, e.to_string()),
    }
}

/// The builder's log: each line to the brokers that follow the build, everything into an
/// unnamed file for `StoreBuildLog`. On disk, in the builds directory (only the helper can
/// list it), rather than in memory: `max-build-log-size` is unlimited by default, and a
/// builder printing without end must fill a disk Nix would fill too, not the machine's RAM.
/// A memfd only where that cannot be made (no `O_TMPFILE` there, no builds directory yet).
struct LogSink<'a> {
    svc: &'a Service,
    drv: &'a StorePath,
    cancel: &'a Cancel,
    memfd: std::fs::File,
    partial: Vec<u8>,
}

impl<'a> LogSink<'a> {
    fn new(
        svc: &'a Service,
        drv: &'a StorePath,
        cancel: &'a Cancel,
        dir: &std::path::Path,
    ) -> io::Result<Self> {
        use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
        use std::os::unix::fs::OpenOptionsExt;
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_TMPFILE)
            .open(dir)
        {
            Ok(f) => f,
            Err(e) => {
                log::warn!(
                    "keeping a build log in memory: no unnamed file in {}: {e}",
                    dir.display()
                );
                std::fs::File::from(memfd_create(
                    c"stockade-build-log",
                    MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
                )?)
            }
        };
        Ok(LogSink {
            svc,
            drv,
            cancel,
            memfd: file,
            partial: Vec::new(),
        })
    }

    /// One line to the clients, carriage returns applied as nix-daemon applies them (A44:
    /// escape codes go through as nix-daemon sends them, Nix's client strips those).
    fn send_line(&self, line: &[u8]) {
        let line = crate::build::log::overwritten(line);
        let followers: Vec<_> = self
            .svc
            .sched
            .waiters(self.drv, self.cancel)
            .into_iter()
            .filter(|w| w.follows)
            .collect();
        for chunk in line.chunks(LINE_CHUNK) {
            for w in &followers {
                w.broker.log(w.id, chunk);
            }
        }
    }

    /// The whole log, sealed, or `None` when the builder wrote nothing.
    fn seal(mut self) -> Option<OwnedFd> {
        use nix::fcntl::{fcntl, FcntlArg, SealFlag};
        use std::os::fd::AsRawFd;
        if !self.partial.is_empty() {
            let rest = std::mem::take(&mut self.partial);
            self.send_line(&rest);
        }
        if self.memfd.metadata().map(|m| m.len()).unwrap_or(0) == 0 {
            return None;
        }
        let seals = SealFlag::F_SEAL_SHRINK
            | SealFlag::F_SEAL_GROW
            | SealFlag::F_SEAL_WRITE
            | SealFlag::F_SEAL_SEAL;
        // A memfd is sealed so that not even the helper can change it once handed over;
        // a file on disk cannot be (nothing else can reach an unnamed file anyway).
        let _ = fcntl(self.memfd.as_raw_fd(), FcntlArg::F_ADD_SEALS(seals));
        // The reader shares the file offset: it starts at the beginning.
        io::Seek::seek(&mut self.memfd, io::SeekFrom::Start(0)).ok()?;
        Some(OwnedFd::from(self.memfd))
    }
}

impl Write for LogSink<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.memfd.write_all(data)?;
        self.partial.extend_from_slice(data);
        while let Some(i) = self.partial.iter().position(|&c| c == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=i).collect();
            self.send_line(&line[..i]);
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Nix's `canBuildLocally`: the derivation's `system` is this machine's or one of
/// `extra-platforms` (builtins run anywhere), and every `requiredSystemFeatures` entry is in
/// `system-features`; otherwise Nix's message.
fn can_build_here(
    config: &stockade_common::ipc::builder::BuilderConfig,
    drv: &stockade_common::derivation::Derivation,
    shown: &str,
) -> Result<(), String> {
    let platform = String::from_utf8_lossy(&drv.system).into_owned();
    let required: BTreeSet<String> = match drv.env.get(b"__json".as_slice()) {
        Some(json) => serde_json::from_slice::<serde_json::Value>(json)
            .ok()
            .and_then(|v| v.get("requiredSystemFeatures").cloned())
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        None => drv
            .env
            .get(b"requiredSystemFeatures".as_slice())
            .map(|v| {
                String::from_utf8_lossy(v)
                    .split_whitespace()
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default(),
    };
    let ours: BTreeSet<&String> = config.system_features.iter().collect();
    let platform_ok =
        drv.is_builtin() || platform == config.system || config.extra_platforms.contains(&platform);
    if platform_ok && required.iter().all(|f| ours.contains(f)) {
        return Ok(());
    }
    let join = |it: Vec<&String>| it.into_iter().cloned().collect::<Vec<_>>().join(", ");
    Err(format!(
        "a '{platform}' with features {{{}}} is required to build '{shown}', but I am a '{}' \
         with features {{{}}}",
        join(required.iter().collect()),
        config.system,
        join(ours.into_iter().collect()),
    ))
}
