//! One derivation, from its `.drv` in the store to its outputs staged, in the sandbox.
//!
//! [`run_derivation`] reads and parses the `.drv` from the store itself (never a caller's
//! copy), checks that every input exists in the store and lies in the input closure the
//! caller computed from the database, makes the build's directories ([`dirs`]), computes the
//! builder's environment as Nix does ([`env`]), describes the sandbox (the closure bound
//! read-only, outputs written to a staging directory, private network unless fixed-output,
//! `sandbox-paths`), runs the builder while copying its log and enforcing the limits
//! ([`log`]), and on success says where each output is in the staging directory. It does
//! not touch the store or the database: registering the outputs is the store-writer's job.
//! Every process of the build is gone when it returns.
//!
//! Not yet: `__structuredAttrs` (refused with a clear error), derivations whose output
//! paths are not known before the build (floating content-addressed, deferred, impure),
//! `builtin:` builders, `system` / `requiredSystemFeatures` checks, the host's
//! `/etc/resolv.conf` and `/etc/services` for fixed-output builds.

pub mod buildenv;
pub mod dirs;
pub mod env;
pub mod host;
pub mod invoke;
pub mod keep;
pub mod log;
pub mod refgraph;
mod run;
mod status;
pub mod structured;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use stockade_common::derivation::{name_from_drv_path, Derivation, DrvError, DrvLimits};
use stockade_common::floor::Crossed;
use stockade_common::store_path::{StoreDir, StorePath};

use crate::sandbox::{SandboxError, SandboxPath};
pub use dirs::{BuildDir, DirError};
pub use env::{BuilderEnv, EnvError, EnvParams};
pub use log::{Ended, Limits, LogTail, SuperviseError};
pub use status::status_to_string;

/// The daemon's settings that shape a build.
#[derive(Debug, Clone)]
pub struct BuildConfig {
    /// The store directory as builders and `.drv` files name it (`/nix/store`).
    pub store_dir: StoreDir,
    /// Where that store lives on the host (normally the same path).
    pub host_store_dir: PathBuf,
    /// Where build directories are made (Nix 2.26's `build-dir`, else `$TMPDIR`); owned by
    /// the helper, searchable by nobody else.
    pub builds_dir: PathBuf,
    /// `sandbox-build-dir`, normally `/build`.
    pub sandbox_build_dir: PathBuf,
    /// `cores` (`NIX_BUILD_CORES`).
    pub build_cores: u32,
    /// `max-silent-time` and `timeout` in seconds, `max-build-log-size` in bytes; 0: none.
    pub max_silent_time: u64,
    pub timeout: u64,
    pub max_log_size: u64,
    /// `log-lines`: how many lines of the log a failure carries.
    pub log_lines: usize,
    /// `sandbox-paths` and `extra-sandbox-paths`.
    pub sandbox_paths: Vec<SandboxPath>,
    /// `keep-failed`.
    pub keep_failed: bool,
    /// Nix 2.26's `impure-env`.
    pub impure_env: BTreeMap<String, String>,
    /// The CA bundle on the host (Nix's `caFile`): bound into fixed-output sandboxes at
    /// `/etc/ssl/certs/ca-certificates.crt` (as Nix 2.26 does) and used by `builtin:fetchurl`.
    pub ssl_cert_file: Option<PathBuf>,
    /// `hashed-mirrors`, for `builtin:fetchurl`.
    pub hashed_mirrors: Vec<String>,
    /// The cgroup directories the build joins (per build, made by the caller).
    pub cgroups: Vec<PathBuf>,
    /// Whether the build runs in the sandbox; `false` builds on the host ([`host`]) when its
    /// outputs' paths are free.
    pub sandboxed: bool,
    /// The store's floors the build is held to (A43; `None`: a trusted client's build):
    /// stopped once the builds directory's or the store's file system is below one.
    pub floors: Option<stockade_common::floor::Floors>,
}

impl BuildConfig {
    /// Nix's defaults for a store at `store_dir`, building in `builds_dir`.
    pub fn new(store_dir: StoreDir, builds_dir: impl Into<PathBuf>) -> Self {
        BuildConfig {
            host_store_dir: PathBuf::from(store_dir.as_str()),
            store_dir,
            builds_dir: builds_dir.into(),
            sandbox_build_dir: PathBuf::from("/build"),
            build_cores: 1,
            max_silent_time: 0,
            timeout: 0,
            max_log_size: 0,
            log_lines: 25,
            sandbox_paths: Vec::new(),
            keep_failed: false,
            impure_env: BTreeMap::new(),
            ssl_cert_file: None,
            hashed_mirrors: Vec::new(),
            cgroups: Vec::new(),
            sandboxed: true,
            floors: None,
        }
    }
}

/// One build to run.
#[derive(Debug, Clone)]
pub struct BuildJob {
    pub drv_path: StorePath,
    /// The closure of the derivation's inputs (input sources and the wanted outputs of input
    /// derivations, with everything they reference), computed by the caller from the
    /// database, where it has checked that each is valid. Only these are visible to the
    /// builder; [`run_derivation`] checks the inputs are among them and exist.
    pub input_closure: BTreeSet<StorePath>,
    /// The references of each path of the closure (`exportReferencesGraph`).
    pub references: BTreeMap<StorePath, BTreeSet<StorePath>>,
    pub build_uid: u32,
    pub build_gid: u32,
    /// The name of the goal in Nix's timeout and log-limit messages, e.g.
    /// `building of '/nix/store/…-x.drv^out' from .drv file` (see [`goal_name`]).
    pub goal_name: String,
}

/// Nix's name for the goal that builds `drv_path` for `wanted` outputs (`None`: all):
/// `building of '<drv><sep><outputs>' from .drv file`; `sep` is `!` in Nix 2.8 and `^` in
/// 2.26, which writes `*` for all outputs (2.8 writes nothing then).
pub fn goal_name(
    store_dir: &StoreDir,
    drv_path: &StorePath,
    wanted: Option<&BTreeSet<String>>,
    sep: char,
) -> String {
    let outputs = match wanted {
        Some(w) => w.iter().cloned().collect::<Vec<_>>().join(","),
        None if sep == '^' => "*".to_string(),
        None => String::new(),
    };
    format!(
        "building of '{}{sep}{outputs}' from .drv file",
        store_dir.display(drv_path)
    )
}

/// One output where the builder left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedOutput {
    /// Its store path.
    pub path: StorePath,
    /// Where it is on the host: in the staging directory (not yet in the store).
    pub staged: PathBuf,
}

/// A successful build. The staging directory (and the outputs in it) is removed when this is
/// dropped: hand the outputs to the store-writer first.
#[derive(Debug)]
pub struct BuildOutcome {
    pub outputs: BTreeMap<String, StagedOutput>,
    /// Where the outputs are, each at its base name: the staging directory, or the store
    /// itself for a build on the host.
    pub outputs_dir: PathBuf,
    /// Made by the helper itself (a builtin builder), so owned by the helper's uid rather
    /// than the build user's.
    pub by_helper: bool,
    pub dir: BuildDir,
    /// Sandbox set-up time and the whole run.
    pub setup_time: Duration,
    pub duration: Duration,
}

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildErrorKind {
    #[error("reading '{path}' from the store: {source}")]
    ReadStore { path: String, source: io::Error },
    #[error("derivation '{path}': {source}")]
    Drv { path: String, source: DrvError },
    #[error("input '{input}' of '{drv}' is not in the store")]
    MissingInput { drv: String, input: String },
    #[error("input '{input}' of '{drv}' is not in the input closure")]
    NotInClosure { drv: String, input: String },
    #[error("derivation '{drv}' has no output '{output}' (wanted by '{dependent}')")]
    MissingInputOutput {
        drv: String,
        output: String,
        dependent: String,
    },
    #[error("building '{drv}': output '{output}' has no known path (floating content-addressed, deferred and impure derivations are not supported by this daemon yet)")]
    UnknownOutputPath { drv: String, output: String },
    /// Nix's words for a builtin it does not have.
    #[error("unsupported builtin builder '{name}'")]
    UnsupportedBuiltin { drv: String, name: String },
    #[error("building '{drv}': {message}")]
    Builtin { drv: String, message: String },
    #[error("{message}")]
    RefGraph { drv: String, message: String },
    /// Nix's words from `builtin:buildenv`, after the derivation's name.
    #[error("{message}")]
    Buildenv { drv: String, message: String },
    #[error("building '{drv}': {source}")]
    Env { drv: String, source: EnvError },
    #[error("builder '{builder}' of '{drv}' is not an absolute path")]
    Builder { drv: String, builder: String },
    #[error(transparent)]
    Dir(#[from] DirError),
    #[error("while setting up the build environment: {0}")]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Supervise(#[from] SuperviseError),
    /// Nix's `builder for '…' failed with exit code N` (the status as `statusToString`).
    #[error("builder for '{drv}' {status}")]
    BuilderFailed { drv: String, status: String },
    #[error("{goal} timed out after {seconds} seconds of silence")]
    Silent { goal: String, seconds: u64 },
    #[error("{goal} timed out after {seconds} seconds")]
    TimedOut { goal: String, seconds: u64 },
    #[error("{goal} killed after writing more than {limit} bytes of log output")]
    LogLimit { goal: String, limit: u64 },
    /// `path` is where the builder should have left it, on the host (Nix names the host path
    /// in its chroot, `<drv>.chroot/root/nix/store/…`).
    #[error("builder for '{drv}' failed to produce output path for output '{output}' at '{path}'")]
    MissingOutput {
        drv: String,
        output: String,
        path: String,
    },
    /// A43: the file system it wrote to went below a floor.
    #[error("build of '{drv}' was stopped: {crossed}")]
    Floor { drv: String, crossed: Crossed },
    /// Nobody wanted the build any more (every client that asked for it cancelled or left).
    #[error("build of '{drv}' was cancelled")]
    Cancelled { drv: String },
}

/// A failed build: the reason, the build directory when `keep-failed` kept it, and the last
/// `log-lines` lines of the log (Nix appends them to the message when not verbose).
#[derive(Debug, thiserror::Error)]
#[error("{kind}")]
pub struct BuildError {
    pub kind: Box<BuildErrorKind>,
    pub kept_build_dir: Option<PathBuf>,
    pub log_tail: Vec<String>,
}

impl<E: Into<BuildErrorKind>> From<E> for BuildError {
    fn from(e: E) -> Self {
        BuildError {
            kind: Box::new(e.into()),
            kept_build_dir: None,
            log_tail: Vec::new(),
        }
    }
}

/// Reads a regular file of the store (never through a symlink), at most `limit` bytes.
fn read_store_file(
    cfg: &BuildConfig,
    path: &StorePath,
    limit: usize,
) -> Result<Vec<u8>, BuildErrorKind> {
    let shown = cfg.store_dir.display(path);
    let host = cfg.host_store_dir.join(path.base_name());
    let read = || -> io::Result<Vec<u8>> {
        let f = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&host)?;
        if !f.metadata()?.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a regular file",
            ));
        }
        let mut text = Vec::new();
        f.take(limit as u64 + 1).read_to_end(&mut text)?;
        Ok(text)
    };
    read().map_err(|source| BuildErrorKind::ReadStore {
        path: shown,
        source,
    })
}

fn parse_drv(cfg: &BuildConfig, path: &StorePath) -> Result<Derivation, BuildErrorKind> {
    let limits = DrvLimits::default();
    let shown = cfg.store_dir.display(path);
    let drv_err = |source| BuildErrorKind::Drv {
        path: shown.clone(),
        source,
    };
    let name = name_from_drv_path(path).map_err(drv_err)?;
    let text = read_store_file(cfg, path, limits.max_size)?;
    Derivation::parse_with_limits(&cfg.store_dir, &text, name, &limits).map_err(drv_err)
}

/// The input paths of `drv`: its sources and the wanted outputs of its input derivations
/// (each read from the store).
fn input_paths(
    cfg: &BuildConfig,
    drv: &Derivation,
    shown: &str,
) -> Result<BTreeSet<StorePath>, BuildErrorKind> {
    let mut inputs = drv.input_srcs.clone();
    for (input_drv, wanted) in &drv.input_drvs {
        let idrv = parse_drv(cfg, input_drv)?;
        let idrv_shown = cfg.store_dir.display(input_drv);
        for output in wanted {
            let out =
                idrv.outputs
                    .get(output)
                    .ok_or_else(|| BuildErrorKind::MissingInputOutput {
                        drv: idrv_shown.clone(),
                        output: output.clone(),
                        dependent: shown.to_string(),
                    })?;
            let path = out
                .path(&cfg.store_dir, &idrv.name, output)
                .map_err(|e| BuildErrorKind::Drv {
                    path: idrv_shown.clone(),
                    source: e.into(),
                })?
                .ok_or_else(|| BuildErrorKind::UnknownOutputPath {
                    drv: idrv_shown.clone(),
                    output: output.clone(),
                })?;
            inputs.insert(path);
        }
    }
    Ok(inputs)
}

/// What a build of one derivation needs to know before it starts, read from the store.
#[derive(Debug, Clone)]
pub struct DrvFacts {
    pub drv: Derivation,
    /// Input sources and the wanted outputs of input derivations.
    pub inputs: BTreeSet<StorePath>,
    /// Every output's path, by name.
    pub outputs: BTreeMap<String, StorePath>,
    /// Fixed-output (network allowed; a failure is transient for Nix).
    pub fixed: bool,
}

/// Reads `drv_path` and its input derivations from the store and says what the build takes
/// in and puts out.
pub fn derivation_facts(cfg: &BuildConfig, drv_path: &StorePath) -> Result<DrvFacts, BuildError> {
    let shown = cfg.store_dir.display(drv_path);
    let drv = parse_drv(cfg, drv_path)?;
    let drv_type = drv.drv_type().map_err(|source| BuildErrorKind::Drv {
        path: shown.clone(),
        source,
    })?;
    if drv.is_builtin()
        && drv.builder != b"builtin:buildenv"
        && !invoke::EXEC_BUILTINS.contains(&drv.builder.as_slice())
    {
        let name = String::from_utf8_lossy(&drv.builder["builtin:".len()..]).into_owned();
        return Err(BuildErrorKind::UnsupportedBuiltin { drv: shown, name }.into());
    }
    // Nix 2.26's check (2.8 would try, and fail to reach the network).
    if drv.builder == b"builtin:fetchurl" && !drv_type.is_fixed() {
        let message = "'builtin:fetchurl' must be a fixed-output or impure derivation".into();
        return Err(BuildErrorKind::Builtin {
            drv: shown,
            message,
        }
        .into());
    }
    let mut outputs = BTreeMap::new();
    for (name, out) in &drv.outputs {
        let path = out
            .path(&cfg.store_dir, &drv.name, name)
            .map_err(|e| BuildErrorKind::Drv {
                path: shown.clone(),
                source: e.into(),
            })?
            .ok_or_else(|| BuildErrorKind::UnknownOutputPath {
                drv: shown.clone(),
                output: name.clone(),
            })?;
        outputs.insert(name.clone(), path);
    }
    let inputs = input_paths(cfg, &drv, &shown)?;
    Ok(DrvFacts {
        drv,
        inputs,
        outputs,
        fixed: drv_type.is_fixed(),
    })
}

/// Runs the build of `job.drv_path`; see the module documentation. `log_sink` gets the
/// builder's stdout and stderr, merged, line by line.
pub fn run_derivation(
    cfg: &BuildConfig,
    job: &BuildJob,
    log_sink: &mut dyn Write,
) -> Result<BuildOutcome, BuildError> {
    run_derivation_with(cfg, job, log_sink, None)
}

/// [`run_derivation`] that stops the build (with [`BuildErrorKind::Cancelled`]) when `cancel`
/// becomes readable. The calling thread must live until this returns: the sandbox's
/// parent-death signal is tied to it.
pub fn run_derivation_with(
    cfg: &BuildConfig,
    job: &BuildJob,
    log_sink: &mut dyn Write,
    cancel: Option<std::os::fd::BorrowedFd<'_>>,
) -> Result<BuildOutcome, BuildError> {
    let started = Instant::now();
    let shown = cfg.store_dir.display(&job.drv_path);
    let DrvFacts {
        drv,
        inputs,
        outputs,
        fixed,
    } = derivation_facts(cfg, &job.drv_path)?;

    for input in inputs {
        if !job.input_closure.contains(&input) {
            return Err(BuildErrorKind::NotInClosure {
                drv: shown,
                input: cfg.store_dir.display(&input),
            }
            .into());
        }
    }
    for input in &job.input_closure {
        if fs::symlink_metadata(cfg.host_store_dir.join(input.base_name())).is_err() {
            return Err(BuildErrorKind::MissingInput {
                drv: shown,
                input: cfg.store_dir.display(input),
            }
            .into());
        }
    }

    if drv.builder == b"builtin:buildenv" {
        return run::buildenv(cfg, job, &drv, &outputs, log_sink, started);
    }
    // Unsandboxed only where nothing is at the outputs' paths (they are written in place).
    let on_host = !cfg.sandboxed
        && outputs
            .values()
            .all(|p| fs::symlink_metadata(cfg.host_store_dir.join(p.base_name())).is_err());
    let dir = BuildDir::create(
        &cfg.builds_dir,
        job.drv_path.name(),
        job.build_uid,
        job.build_gid,
    )?;
    let sandbox_build_dir = if on_host {
        dir.build().to_string_lossy().into_owned()
    } else {
        cfg.sandbox_build_dir.to_string_lossy().into_owned()
    };
    let host_env = |k: &str| std::env::var_os(k).map(OsString::into_vec);
    let output_paths: BTreeMap<String, String> = outputs
        .iter()
        .map(|(name, path)| (name.clone(), cfg.store_dir.display(path)))
        .collect();
    let rewrites = env::output_rewrites(output_paths.iter().map(|(n, p)| (n.as_str(), p.clone())));
    let env = env::builder_env(
        &drv,
        &EnvParams {
            store_dir: cfg.store_dir.as_str(),
            build_cores: cfg.build_cores,
            build_dir: &sandbox_build_dir,
            fixed_output: fixed,
            impure_env: &cfg.impure_env,
            host_env: &host_env,
            rewrites: &rewrites,
            output_paths: &output_paths,
        },
    )
    .map_err(|source| BuildErrorKind::Env {
        drv: shown.clone(),
        source,
    })?;
    let mut env = env;
    if !drv.env.contains_key(b"__json".as_slice()) {
        if let Some(attr) = drv.env.get(b"exportReferencesGraph".as_slice()) {
            let attr = String::from_utf8_lossy(attr);
            let graphs =
                refgraph::files(&cfg.store_dir, &attr, &job.input_closure, &job.references)
                    .map_err(|e| BuildErrorKind::RefGraph {
                        drv: shown.clone(),
                        message: e.to_string(),
                    })?;
            env.files.extend(graphs);
        }
    }
    let invocation = invoke::invocation(cfg, &drv, &outputs, !on_host, &shown)?;

    let mut tail = LogTail::new(cfg.log_lines);
    let ran = if on_host {
        run::on_host(cfg, job, &dir, env, invocation, log_sink, &mut tail, cancel)
    } else {
        run::in_sandbox(
            cfg, job, &dir, env, invocation, &outputs, fixed, log_sink, &mut tail, cancel,
        )
    };
    let outputs_dir = if on_host {
        cfg.host_store_dir.clone()
    } else {
        dir.staging()
    };
    let fail = |kind: BuildErrorKind, dir: BuildDir, tail: LogTail| {
        // Stopped for the floor: never kept, the space must come back.
        let keep = cfg.keep_failed && !matches!(kind, BuildErrorKind::Floor { .. });
        let kept_build_dir = if keep { dir.keep() } else { None };
        BuildError {
            kind: Box::new(kind),
            kept_build_dir,
            log_tail: tail.into_lines(),
        }
    };
    let (ended, setup_time) = match ran {
        Ok(r) => r,
        Err(kind) => return Err(fail(kind, dir, tail)),
    };
    let kind = match ended {
        Ended::Exited(exit) if exit.success() => None,
        Ended::Exited(exit) => Some(BuildErrorKind::BuilderFailed {
            drv: shown.clone(),
            status: status_to_string(exit),
        }),
        Ended::TimedOut { silence: true } => Some(BuildErrorKind::Silent {
            goal: job.goal_name.clone(),
            seconds: cfg.max_silent_time,
        }),
        Ended::TimedOut { silence: false } => Some(BuildErrorKind::TimedOut {
            goal: job.goal_name.clone(),
            seconds: cfg.timeout,
        }),
        Ended::LogLimit => Some(BuildErrorKind::LogLimit {
            goal: job.goal_name.clone(),
            limit: cfg.max_log_size,
        }),
        Ended::Cancelled => Some(BuildErrorKind::Cancelled { drv: shown.clone() }),
        Ended::Floor(crossed) => Some(BuildErrorKind::Floor {
            drv: shown.clone(),
            crossed,
        }),
    };
    if let Some(kind) = kind {
        return Err(fail(kind, dir, tail));
    }

    let mut staged = BTreeMap::new();
    for (name, path) in outputs {
        let at = outputs_dir.join(path.base_name());
        if fs::symlink_metadata(&at).is_err() {
            let kind = BuildErrorKind::MissingOutput {
                drv: shown,
                output: name,
                path: at.display().to_string(),
            };
            return Err(fail(kind, dir, tail));
        }
        staged.insert(name, StagedOutput { path, staged: at });
    }
    dir.remove_build();
    Ok(BuildOutcome {
        outputs: staged,
        outputs_dir,
        by_helper: false,
        dir,
        setup_time,
        duration: started.elapsed(),
    })
}
