//! The build sandbox: a declarative [`SandboxSpec`] turned into one ordered containment
//! routine, as crosvm's jail configuration and nsjail's `containProc` do.
//!
//! [`spawn`] prepares everything in the calling process ([`plan`]: strings, descriptors, the
//! seccomp programs, the Landlock ruleset, the inputs' mount points), then `clone`s the
//! sandbox's first process into new user, mount, pid, network (unless [`Network::Host`]),
//! IPC and UTS namespaces. The parent writes its uid and gid maps and moves it into the build's
//! cgroup; the child then runs [`contain`] (cgroup namespace, mounts, `pivot_root`, the build
//! user, `no_new_privs`, Landlock, seccomp, no capabilities) and `execve`s the builder, which
//! stays pid 1 of its namespace: killing it ([`Sandbox::kill`]) kills every process of the
//! build, and so does the death of the thread that spawned it (`PR_SET_PDEATHSIG`).
//!
//! The calling process may have threads: between `clone` and `execve` the child only makes
//! system calls on memory prepared before (no allocation, no locks).
//!
//! Privileges (measured by the probes `a_helper_with_three_capabilities_can_run_the_sandbox`
//! and `an_unprivileged_user_can_run_the_sandbox`): the sandbox's first process has
//! capabilities only in its new user namespace, which is enough for every mount,
//! `pivot_root`, the host name and `lo`, so no `CAP_SYS_ADMIN` on the host is ever used.
//! What the host side needs:
//! - mapping a build uid other than its own: `CAP_SETUID` and `CAP_SETGID` (which also lets
//!   the sandbox drop the helper's supplementary groups instead of denying `setgroups`);
//! - making the inputs' mount points in the staging directory, which the build uid owns:
//!   `CAP_DAC_OVERRIDE` (or a staging directory the helper may write);
//! - the host sources (store, staging and build directories) are opened by the sandbox's
//!   first process with the helper's uid but without any host capability: the helper must
//!   reach them by ownership or mode (a `0700` builds directory it owns);
//! - joining the cgroup: write access to its `cgroup.procs` (a delegated subtree it owns);
//! - killing the builder needs nothing: the helper owns the builder's user namespace.
//!
//! Started by an ordinary user (with unprivileged user namespaces) it works with no
//! capability at all, for `host_uid`/`host_gid` = that user's own ids.

pub mod contain;
mod landlock;
pub mod plan;
mod seccomp;
pub mod self_image;
pub mod spec;
mod sys;

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

pub use contain::Step;
pub use spec::{EtcFiles, IdMap, Network, SandboxPath, SandboxSpec, SpecError};

/// Why a sandbox could not be made or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SandboxError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("'{0}' contains a NUL byte or is not a valid name")]
    Nul(String),
    #[error("too many descriptors open to place the sandbox's sources below RLIMIT_NOFILE")]
    TooManyDescriptors,
    #[error("Landlock: {0}")]
    Landlock(String),
    #[error("seccomp: {0}")]
    Seccomp(String),
    #[error("{what} '{}': {errno}", path.display())]
    Host {
        what: &'static str,
        path: PathBuf,
        errno: Errno,
    },
    #[error("{what}: {errno}")]
    Sys { what: &'static str, errno: Errno },
    #[error("setting up the build sandbox failed at {step:?}{item}: {errno}")]
    Setup {
        step: Step,
        /// What the step was working on (an input, a source path), as ` (…)`, or empty.
        item: String,
        errno: Errno,
    },
}

fn sys_err(what: &'static str) -> impl FnOnce(Errno) -> SandboxError {
    move |errno| SandboxError::Sys { what, errno }
}

/// The builder's standard input, output and error.
pub struct Stdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

impl Stdio {
    /// `/dev/null` as input, `out` as both output and error (as Nix gives a builder its log).
    pub fn log_to(out: OwnedFd) -> Result<Stdio, SandboxError> {
        let stdin = sys::own(
            nix::fcntl::open(
                "/dev/null",
                OFlag::O_RDONLY | OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )
            .map_err(sys_err("opening /dev/null"))?,
        );
        let stderr = out.try_clone().map_err(|e| SandboxError::Sys {
            what: "duplicating the log descriptor",
            errno: Errno::from_raw(e.raw_os_error().unwrap_or(0)),
        })?;
        Ok(Stdio {
            stdin,
            stdout: out,
            stderr,
        })
    }

    /// The three descriptors moved to numbers above 2 (close-on-exec), so that `dup2` onto
    /// 0-2 in the routine never overwrites one that is still to be copied.
    fn above_2(self) -> Result<[OwnedFd; 3], SandboxError> {
        let mut out = Vec::with_capacity(3);
        for fd in [self.stdin, self.stdout, self.stderr] {
            let n = nix::fcntl::fcntl(fd.as_raw_fd(), FcntlArg::F_DUPFD_CLOEXEC(3))
                .map_err(sys_err("duplicating a standard descriptor"))?;
            out.push(sys::own(n));
        }
        let [a, b, c]: [OwnedFd; 3] = out
            .try_into()
            .map_err(|_| SandboxError::Nul(String::new()))?;
        Ok([a, b, c])
    }
}

/// How the builder ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildExit {
    Exited(i32),
    Signaled(Signal),
}

impl BuildExit {
    pub fn success(self) -> bool {
        self == BuildExit::Exited(0)
    }
}

/// A running builder (pid 1 of its pid namespace).
#[derive(Debug)]
pub struct Sandbox {
    pid: Pid,
    /// Write end of the "go" pipe, held while the build runs.
    go: Option<OwnedFd>,
    exit: Option<BuildExit>,
    /// From the start of [`spawn`] until the builder was exec'd.
    pub setup_time: Duration,
    /// The kernel's Landlock ABI and whether scoping (ABI 6) applies; `None` when the kernel
    /// has no Landlock (the build still runs; the caller logs or refuses it).
    pub landlock: Option<(u32, bool)>,
}

impl Sandbox {
    /// The builder's pid in the helper's pid namespace.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// SIGKILL to the builder. It is its pid namespace's init, so the kernel kills every other
    /// process of the build with it (forked, `setsid`, daemonised alike).
    pub fn kill(&self) -> Result<(), SandboxError> {
        if self.exit.is_some() {
            return Ok(());
        }
        match kill(self.pid, Signal::SIGKILL) {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(e) => Err(SandboxError::Sys {
                what: "killing the builder",
                errno: e,
            }),
        }
    }

    /// The builder's exit if it has ended (reaping it), `None` while it runs. Like
    /// [`Sandbox::wait`], an exit means the pid namespace is empty.
    pub fn try_wait(&mut self) -> Result<Option<BuildExit>, SandboxError> {
        if let Some(e) = self.exit {
            return Ok(Some(e));
        }
        let exit = match waitpid(self.pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => BuildExit::Exited(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => BuildExit::Signaled(sig),
            Ok(_) | Err(Errno::EINTR) => return Ok(None),
            Err(e) => return Err(sys_err("waiting for the builder")(e)),
        };
        self.exit = Some(exit);
        self.go = None;
        Ok(Some(exit))
    }

    /// Waits for the builder. When it returns, the builder's pid namespace is empty: an init
    /// is reaped only after every other process of its namespace is gone.
    pub fn wait(&mut self) -> Result<BuildExit, SandboxError> {
        if let Some(e) = self.exit {
            return Ok(e);
        }
        let exit = loop {
            match waitpid(self.pid, None) {
                Ok(WaitStatus::Exited(_, code)) => break BuildExit::Exited(code),
                Ok(WaitStatus::Signaled(_, sig, _)) => break BuildExit::Signaled(sig),
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(e) => return Err(sys_err("waiting for the builder")(e)),
            }
        };
        self.exit = Some(exit);
        self.go = None;
        Ok(exit)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.kill();
            let _ = self.wait();
        }
    }
}

/// Makes the sandbox described by `spec` and starts its builder with `stdio`.
///
/// The calling thread must outlive the build: the parent-death signal fires when the thread
/// that cloned the sandbox exits, not only the process.
pub fn spawn(spec: &SandboxSpec, stdio: Stdio) -> Result<Sandbox, SandboxError> {
    spawn_with(spec, stdio, None)
}

/// [`spawn`], holding `clone_lock` (when given) for the `clone` itself only: the child
/// inherits every descriptor open at that moment, and a caller that writes files a builder
/// may run keeps them closed while the lock is held; the child's set-up after the clone
/// needs no lock, so builds set up side by side.
pub fn spawn_with(
    spec: &SandboxSpec,
    stdio: Stdio,
    clone_lock: Option<&std::sync::Mutex<()>>,
) -> Result<Sandbox, SandboxError> {
    let started = Instant::now();
    let landlock = landlock::prepare()?;
    let landlock_abi = landlock.as_ref().map(|l| (l.abi, l.scoped));
    let seccomp = compiled_seccomp()?;
    let (go_read, go_write) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(sys_err("pipe"))?;
    let (report_read, report_write) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(sys_err("pipe"))?;
    let plan = plan::make(spec, stdio, go_read, report_write, landlock, seccomp)?;

    let held = clone_lock.map(|l| l.lock().unwrap_or_else(|e| e.into_inner()));
    // SAFETY: the child runs `contain::contain` only, which makes system calls on the plan
    // prepared above and ends in execve or _exit; it never returns here (nor drops `held`).
    let cloned = unsafe { sys::clone_process(plan.clone_flags) }.map_err(sys_err("clone"))?;
    let pid = match cloned {
        sys::Cloned::Child => contain::contain(&plan),
        sys::Cloned::Parent(pid) => Pid::from_raw(pid),
    };
    drop(held);
    // The child's ends of the pipes, its standard descriptors and the ruleset.
    drop(plan);
    let mut sandbox = Sandbox {
        pid,
        go: None,
        exit: None,
        setup_time: Duration::ZERO,
        landlock: if cfg!(feature = "without-landlock") {
            None
        } else {
            landlock_abi
        },
    };

    write_id_maps(pid, &spec.ids)?;
    for cgroup in &spec.cgroups {
        let procs = cgroup.join("cgroup.procs");
        std::fs::write(&procs, format!("{pid}\n")).map_err(|e| SandboxError::Host {
            what: "joining the build's cgroup",
            path: procs,
            errno: Errno::from_raw(e.raw_os_error().unwrap_or(0)),
        })?;
    }
    nix::unistd::write(go_write.as_fd(), b"g").map_err(sys_err("starting the sandbox"))?;
    sandbox.go = Some(go_write);

    // EOF: execve succeeded (the pipe is close-on-exec); 12 bytes: the routine failed.
    let mut msg = Vec::new();
    let mut report = std::fs::File::from(report_read);
    report
        .read_to_end(&mut msg)
        .map_err(|_| SandboxError::Sys {
            what: "reading the sandbox's report",
            errno: Errno::EIO,
        })?;
    if msg.len() >= 12 {
        let word = |i: usize| u32::from_ne_bytes(msg[i..i + 4].try_into().unwrap_or([0; 4]));
        let step = Step::from_u32(word(0)).unwrap_or(Step::Exec);
        let errno = Errno::from_raw(word(8) as i32);
        let _ = sandbox.wait();
        return Err(SandboxError::Setup {
            step,
            item: describe(spec, step, word(4)),
            errno,
        });
    }
    sandbox.setup_time = started.elapsed();
    Ok(sandbox)
}

/// The builder's seccomp programs, compiled once per process.
fn compiled_seccomp() -> Result<Vec<seccompiler::BpfProgram>, SandboxError> {
    static PROGRAMS: std::sync::OnceLock<Result<Vec<seccompiler::BpfProgram>, String>> =
        std::sync::OnceLock::new();
    PROGRAMS
        .get_or_init(|| seccomp::compile().map_err(|e| e.to_string()))
        .clone()
        .map_err(SandboxError::Seccomp)
}

/// `uid_map`, `setgroups`, `gid_map` of the child's user namespace: one id each. `setgroups`
/// is denied when this process could not map a group otherwise (no `CAP_SETGID`).
fn write_id_maps(pid: Pid, ids: &IdMap) -> Result<(), SandboxError> {
    let write = |file: &str, contents: String| {
        let path = PathBuf::from(format!("/proc/{pid}/{file}"));
        std::fs::write(&path, contents).map_err(|e| SandboxError::Host {
            what: "writing",
            path,
            errno: Errno::from_raw(e.raw_os_error().unwrap_or(0)),
        })
    };
    write(
        "uid_map",
        format!("{} {} 1\n", ids.inside_uid, ids.host_uid),
    )?;
    let can_setgid =
        caps::has_cap(None, caps::CapSet::Effective, caps::Capability::CAP_SETGID).unwrap_or(false);
    if !can_setgid {
        write("setgroups", "deny\n".to_string())?;
    }
    write(
        "gid_map",
        format!("{} {} 1\n", ids.inside_gid, ids.host_gid),
    )
}

/// Names the item a failed step was working on.
fn describe(spec: &SandboxSpec, step: Step, item: u32) -> String {
    let i = item as usize;
    let named = match step {
        Step::OpenSource => match i {
            0 => Some(spec.host_store_dir.display().to_string()),
            1 => Some(spec.store_staging.display().to_string()),
            2 => Some(spec.build_dir.display().to_string()),
            3 => Some("/dev".into()),
            4 => Some("/proc".into()),
            n => spec
                .sandbox_paths
                .get(n - 5)
                .map(|p| p.source.display().to_string()),
        },
        Step::BindInput => spec.inputs.get(i).cloned(),
        Step::DevNode => plan::DEV_NODES.get(i).map(|n| format!("/dev/{n}")),
        Step::SandboxPath => spec
            .sandbox_paths
            .get(i)
            .map(|p| p.target.display().to_string()),
        _ => (i > 0).then(|| format!("#{i}")),
    };
    named.map(|n| format!(" ({n})")).unwrap_or_default()
}
