//! The builder-helper's channels: its control channel from the master, one channel per broker,
//! and its one channel to the store-writer (made by the master, so a broker can never hand in
//! a build output: no message a broker can send names a build directory or carries a
//! descriptor).
//!
//! bincode numbers variants by position: append new variants at the end.
//!
//! A build, end to end:
//! 1. broker → helper `Build { id, drv, .. }` (the broker runs the goal graph: it asks only
//!    for derivations whose inputs are valid);
//! 2. the helper reads the `.drv` from the store, asks the store-writer `BeginBuild` (inputs
//!    valid, their closure, all of it and the outputs held as temp roots), takes a global job
//!    slot (`max-jobs`, across every broker) and a build uid from the master (`NeedUid`), and
//!    answers `Started`; a second broker asking for a derivation that is being built gets
//!    `Waiting` and then the same `Done` as the first;
//! 3. `Log` lines while it runs;
//! 4. the helper hands the outputs to the store-writer (`RegisterOutputs` with the staging
//!    directory's descriptor), stores the log (`StoreBuildLog`), ends the build (`EndBuild`,
//!    temp roots dropped), gives the uid back (`ReleaseUid`) once every process of the build is
//!    gone, and answers `Done`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::writer::StoreWriterToBroker;
use super::Message;
use crate::narinfo::PathInfo;
use crate::store_path::StorePath;

pub use super::msg::ClientIdentity;

// ---- master ↔ builder-helper ---------------------------------------------------------------

/// master → builder-helper, on the helper's control channel (fd 3 at exec).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum MasterToBuilder {
    Hello {
        version: u32,
    },
    /// First message after `Hello`. Carries one descriptor: the helper's end of its channel to
    /// the store-writer. → `BuilderToMaster::Ready` or `Failed`.
    Start(Box<BuilderConfig>),
    /// A new broker. Carries one descriptor: the helper's end of that broker's channel. The
    /// identity and trust here are the only ones the helper ever uses for it.
    NewClient {
        client: ClientIdentity,
    },
    /// The connection ended: its builds that no other broker waits for are stopped.
    ClientGone {
        conn_id: u64,
    },
    /// Finish (stop every build, give their uids back) and exit.
    Shutdown,
    /// The answer to `NeedUid { id }`: a build uid and gid nobody else uses now, or why there
    /// is none (`uid` none).
    Uid {
        id: u64,
        uid: Option<u32>,
        gid: u32,
        error: Option<String>,
    },
    /// The store was replaced and a new store-writer serves it. Carries one descriptor: the
    /// helper's end of a channel to it. Builds begun with the old one fail.
    StoreWriter,
    /// The broker of `conn_id` (announced with `NewClient`) runs as `pid` and `uid`, waiting in its
    /// start-up for `BuilderToBroker::Budget`: the helper puts it into a cgroup of its own
    /// with `broker-memory-max` and `broker-pids-max`, then tells it. The master has not
    /// reaped `pid` (it reaps only after this message is sent), so the number is the broker's.
    BrokerStarted {
        conn_id: u64,
        pid: i32,
        uid: u32,
    },
}

/// builder-helper → master.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum BuilderToMaster {
    Hello {
        version: u32,
    },
    Ready,
    /// Start-up failed; the helper exits after sending this.
    Failed {
        reason: String,
    },
    /// A build needs a uid (the master's allocator, shared with brokers' uids: the same
    /// rules, a separate range). → `MasterToBuilder::Uid { id }`
    NeedUid {
        id: u64,
    },
    /// Every process of the build that had `uid` is gone; the master checks and reuses it.
    ReleaseUid {
        uid: u32,
    },
    /// A line for the master's audit (the helper has no syslog of its own after lockdown).
    Audit {
        conn_id: u64,
        event: String,
        fields: Vec<(String, String)>,
    },
}

/// `sandbox` in nix.conf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SandboxSetting {
    Enabled,
    /// Sandboxed unless the derivation says `__noChroot = true`.
    Relaxed,
    Disabled,
}

/// What the helper needs to build, decided by the master from nix.conf and stockade.conf.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuilderConfig {
    /// The logical store directory (`/nix/store`).
    pub store_dir: String,
    /// Where it is on disk.
    pub real_store_dir: String,
    /// `NIX_STATE_DIR`.
    pub state_dir: String,
    /// Where build directories are made: Nix's `build-dir` (2.26 default `$TMPDIR`, later
    /// Nix `$NIX_STATE_DIR/builds`). On the store's filesystem, outputs are moved in, not
    /// copied.
    pub builds_dir: String,
    pub sandbox: SandboxSetting,
    /// `sandbox-paths` entries (`target=source`, `path`, a trailing `?`), unparsed.
    pub sandbox_paths: Vec<String>,
    /// `sandbox-build-dir`.
    pub sandbox_build_dir: String,
    /// `max-jobs`: builds at once across the whole daemon.
    pub max_jobs: u32,
    /// `max-builds-per-uid` resolved: builds of one untrusted client uid at once (0 = no
    /// limit). The uid is the one the master put in `NewClient`.
    pub max_builds_per_uid: u32,
    /// `cores`.
    pub cores: u32,
    /// Defaults a client may lower (seconds, bytes; 0 = none).
    pub max_silent_time: u64,
    pub timeout: u64,
    pub max_build_log_size: u64,
    pub keep_failed: bool,
    /// `system`, `extra-platforms`, `system-features`.
    pub system: String,
    pub extra_platforms: Vec<String>,
    pub system_features: Vec<String>,
    /// `post-build-hook` from the daemon's own configuration (never a client's).
    pub post_build_hook: Option<String>,
    /// `allow-new-privileges`, `filter-syscalls`.
    pub allow_new_privileges: bool,
    pub filter_syscalls: bool,
    /// Whether the daemon runs as root (else builds run as the daemon's user, unsandboxed
    /// unless user namespaces allow a sandbox).
    pub as_root: bool,
    /// Nix 2.26 `impure-env` (`name=value`).
    pub impure_env: Vec<(String, String)>,
    /// The CA bundle fixed-output builds see at `/etc/ssl/certs/ca-certificates.crt` and
    /// `builtin:fetchurl` verifies TLS with (Nix's `caFile`: `NIX_SSL_CERT_FILE`,
    /// `SSL_CERT_FILE`, else the first bundle that exists).
    pub ssl_cert_file: Option<String>,
    /// `hashed-mirrors`, tried first by `builtin:fetchurl` for flat fixed outputs.
    pub hashed_mirrors: Vec<String>,
    /// Nix 2.8's `repeat` (extra rounds of every build, compared) and
    /// `enforce-determinism` (a difference fails the build).
    pub repeat: u64,
    pub enforce_determinism: bool,
    /// Each build's cgroup limits (`build-memory-max` in bytes, `build-pids-max`); 0: none.
    pub build_memory_max: u64,
    pub build_pids_max: u64,
    /// The extra audit destination.
    pub audit_socket: Option<String>,
    /// Each broker's cgroup limits (`broker-memory-max` in bytes, `broker-pids-max`); 0:
    /// none.
    pub broker_memory_max: u64,
    pub broker_pids_max: u64,
    /// `store-free-space-floor` and `store-free-inodes-floor` (A43): untrusted builds are
    /// stopped when the file system they write to goes below either.
    pub store_floors: crate::floor::Floors,
}

// ---- broker ↔ builder-helper -----------------------------------------------------------------

/// Settings of one build a client may choose (the broker passes the client's, the helper
/// clamps them to what the client's trust allows).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildSettings {
    pub max_silent_time: Option<u64>,
    pub timeout: Option<u64>,
    pub max_build_log_size: Option<u64>,
    pub keep_failed: Option<bool>,
    pub cores: Option<u32>,
    /// `repeat`: extra rounds to compare (with `check` mode, how many).
    pub repeat: Option<u64>,
    /// `enforce-determinism` (with `repeat`).
    pub enforce_determinism: Option<bool>,
    /// `post-build-hook` as the client set it (empty: none); the helper runs it for trusted
    /// clients only, in place of the daemon's (A54).
    pub post_build_hook: Option<String>,
}

/// How a build treats outputs that are valid already.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BuildKind {
    Normal,
    /// Build again and replace the outputs (trusted clients only).
    Repair,
    /// Build again and compare with the valid outputs; register nothing.
    Check,
}

/// broker → builder-helper, on the per-client channel. At most [`MAX_BUILDS_PER_BROKER`]
/// builds of one broker are open at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum BrokerToBuilder {
    Hello {
        version: u32,
    },
    /// Build `drv` (a store derivation, read from the store by the helper) for `outputs`
    /// (empty: all). `id` is the broker's, unique among its open builds.
    Build {
        id: u64,
        drv: StorePath,
        outputs: Vec<String>,
        kind: BuildKind,
        settings: BuildSettings,
    },
    /// The broker no longer wants build `id` (its client left or a dependency failed under
    /// `keep-going = false`): stopped unless another broker waits for it. → `Done` anyway.
    Cancel {
        id: u64,
    },
}

/// Open builds one broker may have at once; more is a protocol violation.
pub const MAX_BUILDS_PER_BROKER: usize = 4096;

/// Nix's `BuildResult::Status`, with its wire numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BuildStatus {
    Built = 0,
    Substituted = 1,
    AlreadyValid = 2,
    PermanentFailure = 3,
    InputRejected = 4,
    OutputRejected = 5,
    TransientFailure = 6,
    CachedFailure = 7,
    TimedOut = 8,
    MiscFailure = 9,
    DependencyFailed = 10,
    LogLimitExceeded = 11,
    NotDeterministic = 12,
    ResolvesToAlreadyValid = 13,
    NoSubstituters = 14,
}

impl BuildStatus {
    pub fn is_success(self) -> bool {
        matches!(
            self,
            BuildStatus::Built
                | BuildStatus::Substituted
                | BuildStatus::AlreadyValid
                | BuildStatus::ResolvesToAlreadyValid
        )
    }
}

/// How a build ended, as the broker turns it into Nix's `BuildResult` and error messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildReport {
    pub status: BuildStatus,
    /// Nix's message for a failure (`builder for '…' failed with exit code 1`), without the
    /// log tail; empty on success.
    pub error: String,
    /// The last `log-lines` lines of the log, for the broker to append as Nix does when the
    /// client is not verbose.
    pub log_tail: Vec<String>,
    /// Every output of the derivation that is valid now, by name.
    pub outputs: BTreeMap<String, StorePath>,
    /// Their infos, as the store-writer registered them (for BuildDerivation and
    /// `nix-store --check`).
    pub infos: Vec<PathInfo>,
    /// Times the derivation was built (`repeat` + 1 when built, 0 when not).
    pub times_built: u32,
    pub is_non_deterministic: bool,
    /// Unix seconds.
    pub start_time: u64,
    pub stop_time: u64,
    /// Microseconds of CPU the build used, when the cgroup knows.
    pub cpu_user_us: Option<u64>,
    pub cpu_system_us: Option<u64>,
    /// Where `keep-failed` kept the build directory.
    pub kept_build_dir: Option<String>,
    /// The outputs are valid, but the daemon's `post-build-hook` failed: Nix's message
    /// (`program '…' failed with exit code 1`), which fails the whole request as in Nix.
    pub hook_failure: Option<String>,
}

/// builder-helper → broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum BuilderToBroker {
    Hello {
        version: u32,
    },
    /// Build `id` waits for another client's build of the same derivation.
    Waiting {
        id: u64,
    },
    /// Build `id` took its slot and runs now (Nix's "building '…'" activity starts here).
    Started {
        id: u64,
        /// `sandbox` in effect for this build, for the audit and the log.
        sandboxed: bool,
        /// How many times it is built (`repeat` + 1; 1 normally).
        rounds: u32,
    },
    /// Build `id` starts its round `round` (from 2; Nix starts a new build activity).
    Round {
        id: u64,
        round: u32,
    },
    /// One line of the builder's output (without the newline), in order.
    Log {
        id: u64,
        line: Vec<u8>,
    },
    /// The daemon's `post-build-hook` runs for build `id` (after its outputs are valid).
    HookStarted {
        id: u64,
        hook: String,
    },
    /// One line of the hook's output (stdout and stderr merged, without the newline).
    HookLog {
        id: u64,
        line: Vec<u8>,
    },
    /// The build ended (built, failed, or cancelled). Always the last message about `id`.
    Done {
        id: u64,
        report: Box<BuildReport>,
    },
    /// The broker broke the protocol; the channel closes after this.
    Error {
        message: String,
    },
    /// The helper's first message to a broker whose `BrokerBudget::from_helper` is set, before
    /// the broker reads anything from its client: the broker is in its cgroup, and these
    /// limits are enforced by it (the broker sets an rlimit for each that is not).
    Budget {
        memory: bool,
        pids: bool,
    },
}

// ---- builder-helper → store-writer -----------------------------------------------------------

/// builder-helper → store-writer, on the one channel the master made between them (the
/// store-writer's end arrives as `MasterToStoreWriter::BuilderHelper`). The store-writer
/// answers each with [`StoreWriterToBroker<R>`] (`Log`s, then `Error` or `Done(R)`), exactly as
/// it answers brokers; both ends enable spilling with `BROKER_SPILL_MAX`, as on brokers'
/// channels (a closure can exceed one message), and the helper sends `Hello` first. The
/// log memfd of `StoreBuildLog` arrives positioned at its start. Requests about one build carry its `build` id (the helper's), and are
/// permitted only in that build's phase: `BeginBuild` opens it, `EndBuild` closes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum BuilderToStoreWriter {
    /// → `u32` (the store-writer's message version).
    Hello { version: u32 },
    /// A build of `drv` starts: check that every input (`inputs`: the derivation's input
    /// sources and the output paths of its input derivations) is valid, and hold the inputs'
    /// closure and `outputs` as temp roots until `EndBuild`. → [`BuildInputs`]
    BeginBuild {
        build: u64,
        drv: StorePath,
        inputs: Vec<StorePath>,
        outputs: Vec<StorePath>,
    },
    /// Take the outputs of build `build` in. Carries one descriptor: the staging directory
    /// (the builder's view of the store directory), where each output is at its base name.
    /// The store-writer reads the `.drv` itself, moves or copies each output in without
    /// following symlinks, checks ownership (`build_uid`; nothing may be owned by anyone else),
    /// canonicalises, hashes, scans references among the closure and the outputs, checks
    /// fixed-output hashes and the reference constraints, and registers all outputs in one
    /// transaction with `drv` as deriver. With `kind` `Check` it registers nothing and
    /// compares with the valid outputs instead. → [`RegisteredOutputs`]
    RegisterOutputs {
        build: u64,
        build_uid: Option<u32>,
        kind: BuildKind,
    },
    /// Store the log of `drv` (`$NIX_LOG_DIR/drvs/xx/rest[.bz2]`), replacing an older one.
    /// Carries one descriptor: a sealed memfd holding the whole log. → `()`
    StoreBuildLog { build: u64 },
    /// The build is over: drop its temp roots. → `()`
    EndBuild { build: u64 },
}

/// The answer to `BeginBuild`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildInputs {
    /// The closure of the inputs (what the sandbox may see), sorted.
    pub closure: Vec<StorePath>,
    /// Outputs of the derivation that are valid already, by path.
    pub valid_outputs: Vec<StorePath>,
    /// The references of each path of the closure, in the closure's order
    /// (`exportReferencesGraph`).
    pub references: Vec<Vec<StorePath>>,
}

/// The answer to `RegisterOutputs`: each output's info, or for a refusal a failure (the
/// reply is `Done` with `rejected` set rather than `Error`, so the helper can report the
/// status Nix gives it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisteredOutputs {
    /// By output name.
    pub infos: BTreeMap<String, PathInfo>,
    /// Nix's message when an output was refused (hash mismatch, a forbidden reference, a
    /// missing output, bad ownership): status `OutputRejected` (hash mismatch, references)
    /// or `MiscFailure`; with `Check`, `NotDeterministic` when the outputs differ.
    pub rejected: Option<(BuildStatus, String)>,
}

/// The store-writer's answers to the helper, by request.
pub type StoreWriterToBuilder<T> = StoreWriterToBroker<T>;

impl Message for MasterToBuilder {
    const MAX_FDS: usize = 1;
    fn fd_count(&self) -> usize {
        match self {
            MasterToBuilder::Start(_)
            | MasterToBuilder::NewClient { .. }
            | MasterToBuilder::StoreWriter => 1,
            _ => 0,
        }
    }
}

impl Message for BuilderToStoreWriter {
    const MAX_FDS: usize = 1;
    fn fd_count(&self) -> usize {
        match self {
            BuilderToStoreWriter::RegisterOutputs { .. }
            | BuilderToStoreWriter::StoreBuildLog { .. } => 1,
            _ => 0,
        }
    }
}

no_fds!(BuilderToMaster, BrokerToBuilder, BuilderToBroker);

#[cfg(test)]
mod tests {
    use super::*;

    /// bincode numbers variants by position: these numbers are the wire.
    #[test]
    fn status_numbers_are_nix_s() {
        assert_eq!(BuildStatus::AlreadyValid as u8, 2);
        assert_eq!(BuildStatus::DependencyFailed as u8, 10);
        assert_eq!(BuildStatus::NoSubstituters as u8, 14);
        assert!(BuildStatus::Built.is_success());
        assert!(!BuildStatus::TimedOut.is_success());
    }
}
