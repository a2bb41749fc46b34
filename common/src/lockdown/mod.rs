//! Self-confinement: what each Stockade service applies to itself right after setup, before it
//! reads a byte from a less trusted peer (SECURITY.md §5, A47, A60, A61).
//!
//! [`apply_broker`] and [`apply_store_writer`] do everything in order ([`apply_master`] and
//! [`apply_roots_reader`] the same without Landlock):
//!
//! 1. capabilities: all dropped ([`drop_all_capabilities`]), or all but the store-writer's four
//!    ([`keep_only_capabilities`]);
//! 2. `no_new_privs` ([`no_new_privs`]);
//! 3. not dumpable ([`set_not_dumpable`]): no core dumps, no `ptrace` or `/proc/<pid>` access
//!    from the same uid;
//! 4. Landlock ([`landlock_restrict`]): only the profile's directories can be opened, no TCP,
//!    abstract unix sockets and signals scoped to the process's own domain;
//! 5. seccomp last ([`apply_seccomp`]), so the steps above need not be on its allow-list.
//!
//! Fail closed (A76, [`policy`](self::policy)): when Landlock enforces nothing (no Landlock in
//! the kernel, disabled at boot, or ABI 1 for a profile that must rename across directories) or
//! the seccomp filters cannot be installed, the apply functions return
//! [`LockdownError::Unconfined`] unless [`LockdownOptions::confinement`] is
//! [`ConfinementPolicy::AllowUnconfined`] (`allow-unconfined = true`). An older Landlock ABI
//! (partial enforcement) is accepted with a warning.
//!
//! and return a [`Report`] whose [`Report::summary`] goes on the audit start-up line, e.g.
//! `landlock=full(abi7) seccomp=on caps=none nnp=1 dumpable=0`.
//!
//! Capabilities, `no_new_privs` and (on Landlock ABI < 8) the Landlock domain are per thread:
//! call these before creating any thread; later threads inherit everything. The seccomp
//! filters are installed on all threads.
//!
//! After lockdown, paths outside the profile cannot be opened any more, including `/proc` and
//! `/dev/log`: open what is needed (syslog socket, database, status fd) before. To find
//! missing system calls, run `stockade daemon --debug-seccomp-log` ([`SeccompMode::Log`], see
//! [`seccomp`](self::seccomp)); nothing in the environment switches a defence off.

mod fs_rules;
pub mod policy;
mod privs;
pub mod seccomp;
mod status;

use std::fmt;
use std::path::{Path, PathBuf};

pub use caps::Capability;
pub use fs_rules::{
    landlock_abi, landlock_restrict, Access, Enforcement, LandlockStatus, TARGET_ABI,
};
pub use policy::{landlock_ok, seccomp_ok, ConfinementPolicy, LockdownOptions};
pub use privs::names as capability_names;
pub use privs::{
    drop_all_capabilities, keep_only_capabilities, no_new_privs, set_not_dumpable,
    ROOTS_READER_CAPS, STORE_WRITER_CAPS,
};
pub use seccomp::{apply_seccomp, SeccompMode, SeccompProfile};
pub use status::{parse_status, status, ProcStatus, StatusReader};

/// Why a process could not confine itself. The caller should refuse to serve: a service that
/// asked for confinement and did not get it must not go on as if it had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockdownError {
    #[error("prctl({what}) failed: {source}")]
    Prctl {
        what: &'static str,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("{what}: {detail}")]
    Caps { what: &'static str, detail: String },
    #[error("capabilities still present after dropping them: {}", privs::names(*mask))]
    CapsRemain { mask: u64 },
    #[error("Landlock: {0}")]
    Landlock(#[from] landlock::RulesetError),
    #[error("Landlock rule for '{}': {source}", path.display())]
    LandlockPath {
        path: PathBuf,
        #[source]
        source: landlock::PathFdError,
    },
    #[error("seccomp: {0}")]
    Seccomp(String),
    #[error("seccomp table: {0}")]
    SeccompTable(&'static str),
    #[error("no seccomp profile for architecture {0}")]
    UnsupportedArch(&'static str),
    #[error("reading /proc/thread-self/status: {0}")]
    Status(#[source] std::io::Error),
    #[error("unexpected /proc/thread-self/status: {0}")]
    StatusParse(&'static str),
    /// Confinement is missing and `allow-unconfined` is not set (A76).
    #[error(
        "refusing to run the {service} unconfined: {missing}; set `allow-unconfined = true` \
         in stockade.conf to run it anyway"
    )]
    Unconfined {
        service: &'static str,
        missing: String,
    },
}

impl LockdownError {
    fn seccomp(e: seccompiler::Error) -> Self {
        LockdownError::Seccomp(e.to_string())
    }

    fn seccomp_backend(e: seccompiler::BackendError) -> Self {
        LockdownError::Seccomp(e.to_string())
    }
}

/// Which service was locked down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Broker,
    StoreWriter,
    Master,
    RootsReader,
}

impl Profile {
    /// The service's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Profile::Broker => "broker",
            Profile::StoreWriter => "store-writer",
            Profile::Master => "master",
            Profile::RootsReader => "roots-reader",
        }
    }
}

/// What was applied, and what the kernel says is in force afterwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub profile: Profile,
    pub landlock: LandlockStatus,
    /// `None` when the filters could not be installed (allowed by `allow-unconfined`).
    pub seccomp: Option<SeccompMode>,
    /// `/proc/thread-self/status` read after everything was applied.
    pub status: ProcStatus,
}

impl Report {
    /// One line for the audit log: `landlock=full(abi7) seccomp=on caps=none nnp=1 dumpable=0`.
    /// `caps` names the effective capabilities; `bnd=…` is added when the bounding set is not
    /// empty while the effective set is (an unprivileged start cannot empty it; harmless with
    /// `no_new_privs` and no `execve`, but visible).
    pub fn summary(&self) -> String {
        let seccomp = match (self.status.seccomp, self.seccomp) {
            (2, Some(SeccompMode::Enforce)) => "on",
            (2, Some(SeccompMode::Log)) => "log",
            // Some of the filters went in before one failed.
            (2, None) => "incomplete",
            _ => "off",
        };
        let mut line = format!(
            "landlock={} seccomp={} caps={} nnp={} dumpable=0",
            self.landlock,
            seccomp,
            privs::names(self.status.cap_eff),
            u8::from(self.status.no_new_privs),
        );
        if self.status.cap_eff == 0 && self.status.cap_bnd != 0 {
            line.push_str(&format!(" bnd={:x}", self.status.cap_bnd));
        }
        line
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.summary())
    }
}

/// Lock down a broker: no capabilities, read-only `store_dir` (the real store directory on
/// disk) and nothing else on disk, the broker allow-list.
pub fn apply_broker(store_dir: &Path, opts: LockdownOptions) -> Result<Report, LockdownError> {
    let reader = StatusReader::open()?;
    warn_if_threaded(&reader);
    drop_all_capabilities()?;
    finish(
        Profile::Broker,
        reader,
        &[(store_dir.to_path_buf(), Access::ReadOnly)],
        SeccompProfile::Broker,
        opts,
    )
}

/// Lock down the store-writer: read-write `store_dir`, `state_dir` (`/nix/var/nix`) and
/// `log_dir` (`/nix/var/log/nix`), nothing else on disk; with `keep_caps` the four
/// capabilities of [`STORE_WRITER_CAPS`] (only meaningful when started with them), else none.
///
/// Not reachable afterwards, so to be arranged before or differently: SQLite's temporary files
/// (`/var/tmp`, `/tmp`: use `PRAGMA temp_store = MEMORY` or `SQLITE_TMPDIR` under `state_dir`),
/// `/dev/urandom` (SQLite falls back to weaker seeding without it), and `/proc/*` for the
/// garbage collector's runtime-root scan. Landlock does not govern metadata calls (`stat`,
/// `readlink`), so following indirect GC roots out of the state directory still works.
pub fn apply_store_writer(
    store_dir: &Path,
    state_dir: &Path,
    log_dir: &Path,
    keep_caps: bool,
    opts: LockdownOptions,
) -> Result<Report, LockdownError> {
    let reader = StatusReader::open()?;
    warn_if_threaded(&reader);
    if keep_caps {
        keep_only_capabilities(&STORE_WRITER_CAPS)?;
    } else {
        drop_all_capabilities()?;
    }
    let mut rules = vec![
        (store_dir.to_path_buf(), Access::ReadWrite),
        (state_dir.to_path_buf(), Access::ReadWrite),
    ];
    // Where its collector binds `gc-socket/socket` (made at start-up; without it, other
    // processes wait for the GC lock instead of reaching the collector).
    let gc_socket = state_dir.join("gc-socket");
    if gc_socket.is_dir() {
        rules.push((gc_socket, Access::ReadWriteSockets));
    }
    rules.push((log_dir.to_path_buf(), Access::ReadWrite));
    // Runtime GC roots, when the roots-reader cannot be asked, are read in /proc.
    rules.push((PathBuf::from("/proc"), Access::ReadOnly));
    finish(
        Profile::StoreWriter,
        reader,
        &rules,
        SeccompProfile::StoreWriter,
        opts,
    )
}

/// Lock down the master once everything it starts only at start-up runs (store-writer,
/// builder-helper) and its sockets are bound: capabilities reduced to `keep` (where permitted;
/// none for a daemon run by an ordinary user), `no_new_privs`, not dumpable, the
/// [`SeccompProfile::Master`] allow-list. No Landlock domain: brokers are exec'd inside it, and
/// a store-writer restarted on a replaced store would be too, on directories the rules no
/// longer name (see `master/src/restrict.rs`); the report says `landlock=none(…:not-taken)`.
///
/// A failure to reduce the capabilities or to install the filters is fatal unless `opts` allow
/// running unconfined.
///
/// `store_writer_restarts`: the master may start a new store-writer later (a daemon run by an
/// ordinary user, when the store is replaced); it inherits the master's filter, so the
/// filter then allows what the store-writer does too.
pub fn apply_master(
    keep: &[Capability],
    store_writer_restarts: bool,
    opts: LockdownOptions,
) -> Result<Report, LockdownError> {
    let profile = Profile::Master;
    let reader = StatusReader::open()?;
    warn_if_threaded(&reader);
    if let Err(e) = keep_only_capabilities(keep) {
        match opts.confinement {
            ConfinementPolicy::Required => {
                return Err(LockdownError::Unconfined {
                    service: profile.name(),
                    missing: format!("its capabilities cannot be reduced ({e})"),
                })
            }
            ConfinementPolicy::AllowUnconfined => {
                log::warn!("the master keeps its capabilities ({e}): allow-unconfined = true")
            }
        }
    }
    no_new_privs()?;
    set_not_dumpable()?;
    let landlock = LandlockStatus {
        enforcement: Enforcement::None,
        abi: landlock_abi(),
        note: Some("not-taken"),
    };
    let mode = opts.seccomp;
    if mode == SeccompMode::Log {
        log::warn!(
            "--debug-seccomp-log: the master's system calls outside its allow-list are logged, \
             not refused"
        );
    }
    let installed = seccomp_ok(
        profile,
        apply_seccomp(
            SeccompProfile::Master {
                store_writer_restarts,
            },
            mode,
        ),
        opts.confinement,
    )?;
    let status = reader.read()?;
    Ok(Report {
        profile,
        landlock,
        seccomp: installed.then_some(mode),
        status,
    })
}

/// Lock down the roots-reader: capabilities reduced to [`ROOTS_READER_CAPS`] (where permitted;
/// none for a daemon run by an ordinary user), `no_new_privs`, not dumpable, the
/// [`SeccompProfile::RootsReader`] allow-list with `control_fd` its one channel.
///
/// No Landlock domain: Landlock confines `ptrace` to the domain's own processes, and the
/// kernel applies that to the ptrace access check of `/proc/<pid>/{exe,cwd,fd/*,maps,environ}`
/// too, so a reader inside any domain would find no process but itself (nor would Landlock
/// rules on `/proc` keep a process holding `CAP_SYS_PTRACE` out of the rest of the file system:
/// `/proc/<pid>/root` leads there). The report says `landlock=none(…:not-taken)`; what the
/// reader can read it can only send to the master, which checks every pair.
pub fn apply_roots_reader(control_fd: u32, opts: LockdownOptions) -> Result<Report, LockdownError> {
    let profile = Profile::RootsReader;
    let reader = StatusReader::open()?;
    warn_if_threaded(&reader);
    keep_only_capabilities(&ROOTS_READER_CAPS)?;
    no_new_privs()?;
    set_not_dumpable()?;
    let landlock = LandlockStatus {
        enforcement: Enforcement::None,
        abi: landlock_abi(),
        note: Some("not-taken"),
    };
    let mode = opts.seccomp;
    if mode == SeccompMode::Log {
        log::warn!(
            "--debug-seccomp-log: system calls outside the allow-list are logged, not refused"
        );
    }
    let installed = seccomp_ok(
        profile,
        apply_seccomp(SeccompProfile::RootsReader { control_fd }, mode),
        opts.confinement,
    )?;
    let status = reader.read()?;
    Ok(Report {
        profile,
        landlock,
        seccomp: installed.then_some(mode),
        status,
    })
}

fn finish(
    profile: Profile,
    reader: StatusReader,
    rules: &[(PathBuf, Access)],
    seccomp_profile: SeccompProfile,
    opts: LockdownOptions,
) -> Result<Report, LockdownError> {
    no_new_privs()?;
    set_not_dumpable()?;
    let landlock = landlock_restrict(rules)?;
    landlock_ok(profile, &landlock, opts.confinement)?;
    if landlock.enforcement != Enforcement::Full {
        log::warn!("Landlock not fully enforced: {landlock}");
    }
    let mode = opts.seccomp;
    if mode == SeccompMode::Log {
        log::warn!(
            "--debug-seccomp-log: system calls outside the allow-list are logged, not refused"
        );
    }
    let installed = seccomp_ok(
        profile,
        apply_seccomp(seccomp_profile, mode),
        opts.confinement,
    )?;
    let status = reader.read()?;
    Ok(Report {
        profile,
        landlock,
        seccomp: installed.then_some(mode),
        status,
    })
}

fn warn_if_threaded(reader: &StatusReader) {
    if let Ok(s) = reader.read() {
        if s.threads > 1 {
            log::warn!(
                "lockdown with {} threads: capabilities and Landlock cover only the calling \
                 thread and its descendants",
                s.threads
            );
        }
    }
}
