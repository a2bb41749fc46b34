//! The three ways a build runs once its directories and environment are ready: in the
//! sandbox, on the host (`sandbox = false` for a daemon run by an ordinary user), or in the
//! helper itself (`builtin:buildenv`).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Write;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use stockade_common::derivation::Derivation;
use stockade_common::store_path::StorePath;

use super::invoke::Invocation;
use super::log::{self, Ended, Limits, LogTail};
use super::{
    buildenv, host, BuildConfig, BuildDir, BuildError, BuildErrorKind, BuildJob, BuildOutcome,
    BuilderEnv, StagedOutput,
};
use crate::sandbox::{self, IdMap, SandboxError, SandboxSpec, Stdio};

/// Held while the helper has a descriptor open for writing on a file a builder could run and
/// while it clones a sandbox: a clone copies every open descriptor into the child until its
/// exec, and a write descriptor there would make exec of that file fail (`ETXTBSY`).
static SPAWN_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The limits `cfg` puts on the builder.
fn limits(cfg: &BuildConfig) -> Limits {
    Limits {
        max_silent_time: (cfg.max_silent_time > 0)
            .then(|| Duration::from_secs(cfg.max_silent_time)),
        timeout: (cfg.timeout > 0).then(|| Duration::from_secs(cfg.timeout)),
        max_log_size: cfg.max_log_size,
        // Outputs are staged in the builds directory (or written to the store on the host);
        // the build directory is there too.
        floor: cfg.floors.map(|floors| log::FloorWatch {
            floors,
            dirs: vec![cfg.builds_dir.clone(), cfg.host_store_dir.clone()],
        }),
    }
}

/// `builtin:buildenv` ([`buildenv`]), run by the helper into the staging directory.
pub(super) fn buildenv(
    cfg: &BuildConfig,
    job: &BuildJob,
    drv: &Derivation,
    outputs: &BTreeMap<String, StorePath>,
    log_sink: &mut dyn Write,
    started: Instant,
) -> Result<BuildOutcome, BuildError> {
    let shown = cfg.store_dir.display(&job.drv_path);
    let out = outputs
        .get("out")
        .ok_or_else(|| BuildErrorKind::MissingOutput {
            drv: shown.clone(),
            output: "out".into(),
            path: String::new(),
        })?
        .clone();
    let dir = BuildDir::create(
        &cfg.builds_dir,
        job.drv_path.name(),
        job.build_uid,
        job.build_gid,
    )?;
    let view = buildenv::StoreView {
        logical: cfg.store_dir.as_str(),
        host: &cfg.host_store_dir,
    };
    let staged_at = dir.staging().join(out.base_name());
    if let Err(e) = buildenv::build_env(&view, &drv.env, &staged_at, log_sink) {
        return Err(BuildError {
            kind: Box::new(BuildErrorKind::Buildenv {
                drv: shown,
                message: e.to_string(),
            }),
            kept_build_dir: None,
            log_tail: Vec::new(),
        });
    }
    let mut staged = BTreeMap::new();
    staged.insert(
        "out".to_string(),
        StagedOutput {
            path: out,
            staged: staged_at,
        },
    );
    dir.remove_build();
    Ok(BuildOutcome {
        outputs: staged,
        outputs_dir: dir.staging(),
        by_helper: true,
        dir,
        setup_time: Duration::ZERO,
        duration: started.elapsed(),
    })
}

/// Writes the `passAsFile` files and runs the builder on the host (see [`host`]).
#[allow(clippy::too_many_arguments)]
pub(super) fn on_host(
    cfg: &BuildConfig,
    job: &BuildJob,
    dir: &BuildDir,
    env: BuilderEnv,
    invocation: Invocation,
    log_sink: &mut dyn Write,
    tail: &mut LogTail,
    cancel: Option<std::os::fd::BorrowedFd<'_>>,
) -> Result<(Ended, Duration), BuildErrorKind> {
    let vars = environment(env.vars, invocation.env);
    let (read, write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|errno| SandboxError::Sys {
            what: "making the log pipe",
            errno,
        })?;
    let mut running = {
        let _no_clone = SPAWN_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        for (name, contents) in &env.files {
            dir.write_file(name, contents, job.build_uid, job.build_gid)?;
        }
        host::spawn(
            &invocation.program,
            &invocation.args,
            &vars,
            &dir.build(),
            write,
        )?
    };
    let limits = limits(cfg);
    let ended = log::supervise(&mut running, read, limits, log_sink, tail, cancel);
    let setup_time = running.setup_time;
    drop(running);
    Ok((ended?, setup_time))
}

/// Writes the `passAsFile` files, describes the sandbox and runs the builder in it.
#[allow(clippy::too_many_arguments)]
pub(super) fn in_sandbox(
    cfg: &BuildConfig,
    job: &BuildJob,
    dir: &BuildDir,
    env: BuilderEnv,
    invocation: Invocation,
    outputs: &BTreeMap<String, StorePath>,
    fixed: bool,
    log_sink: &mut dyn Write,
    tail: &mut LogTail,
    cancel: Option<std::os::fd::BorrowedFd<'_>>,
) -> Result<(Ended, Duration), BuildErrorKind> {
    {
        let _no_clone = SPAWN_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        for (name, contents) in &env.files {
            dir.write_file(name, contents, job.build_uid, job.build_gid)?;
        }
    }
    let mut spec = SandboxSpec::new(
        IdMap::nix(job.build_uid, job.build_gid),
        cfg.store_dir.as_str(),
        dir.staging(),
        dir.build(),
        invocation.program,
    );
    spec.host_store_dir = cfg.host_store_dir.clone();
    spec.sandbox_build_dir = cfg.sandbox_build_dir.clone();
    spec.etc = sandbox::EtcFiles::nix(&spec.ids, &cfg.sandbox_build_dir);
    spec.inputs = job
        .input_closure
        .iter()
        .map(|p| p.base_name().to_string())
        .collect();
    spec.outputs = outputs
        .values()
        .map(|p| PathBuf::from(cfg.store_dir.display(p)))
        .collect();
    spec.sandbox_paths = cfg.sandbox_paths.clone();
    spec.sandbox_paths.extend(invocation.binds);
    if fixed {
        spec.share_host_network(cfg.ssl_cert_file.as_deref());
    }
    spec.env = environment(env.vars, invocation.env);
    spec.args = invocation.args;
    spec.cgroups = cfg.cgroups.clone();

    let (read, write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|errno| SandboxError::Sys {
            what: "making the log pipe",
            errno,
        })?;
    let mut running = sandbox::spawn_with(&spec, Stdio::log_to(write)?, Some(&SPAWN_LOCK))?;
    let limits = limits(cfg);
    let ended = log::supervise(&mut running, read, limits, log_sink, tail, cancel);
    // Dropping the sandbox kills and reaps it if supervision stopped early.
    let setup_time = running.setup_time;
    drop(running);
    Ok((ended?, setup_time))
}

/// The derivation's environment with the invocation's own variables set over it.
fn environment(
    mut vars: BTreeMap<Vec<u8>, Vec<u8>>,
    extra: Vec<(Vec<u8>, Vec<u8>)>,
) -> Vec<(OsString, OsString)> {
    vars.extend(extra);
    vars.into_iter()
        .map(|(k, v)| (OsString::from_vec(k), OsString::from_vec(v)))
        .collect()
}
