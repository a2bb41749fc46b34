//! Builds without the sandbox (`sandbox = false`, or `relaxed` with `__noChroot`), for a
//! daemon run by an ordinary user, as Nix's own test suite runs nix-daemon: the builder sees
//! the host's file system, writes its outputs at their real store paths, and runs as the
//! helper's own uid. Only what changes no behaviour is added: `no_new_privs`, its own session
//! (so every process it starts in it is killed with it), and death with the helper.
//!
//! A daemon running as root never builds this way (its build users could not write the store,
//! and a root daemon's builds are always confined); nor does a check or repair (the outputs
//! exist already), nor a build whose output path is taken on disk: those run sandboxed.

use std::ffi::OsString;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::log::Builder;
use crate::sandbox::{BuildExit, SandboxError};

/// A builder started on the host.
pub struct HostBuilder {
    pid: Pid,
    exit: Option<BuildExit>,
    pub setup_time: Duration,
}

fn sys(what: &'static str) -> impl FnOnce(Errno) -> SandboxError {
    move |errno| SandboxError::Sys { what, errno }
}

/// Starts `builder` with `args` (its `argv[0]` its base name, as Nix gives it) and exactly
/// `env`, in `dir`, its output and errors into `log`.
pub fn spawn(
    builder: &Path,
    args: &[OsString],
    env: &[(OsString, OsString)],
    dir: &Path,
    log: OwnedFd,
) -> Result<HostBuilder, SandboxError> {
    spawn_as(builder, args, env, dir, log, None, &[])
}

/// [`spawn`] as `ids` (uid, gid; no supplementary groups) when given, which takes CAP_SETUID
/// and CAP_SETGID, in the cgroups `cgroups` (directories) from its first instruction.
pub fn spawn_as(
    builder: &Path,
    args: &[OsString],
    env: &[(OsString, OsString)],
    dir: &Path,
    log: OwnedFd,
    ids: Option<(u32, u32)>,
    cgroups: &[std::path::PathBuf],
) -> Result<HostBuilder, SandboxError> {
    let started = Instant::now();
    let procs: Vec<std::ffi::CString> = cgroups
        .iter()
        .filter_map(|d| {
            std::ffi::CString::new(d.join("cgroup.procs").into_os_string().into_encoded_bytes())
                .ok()
        })
        .collect();
    let err_log = log.try_clone().map_err(|e| SandboxError::Sys {
        what: "duplicating the log pipe",
        errno: Errno::from_raw(e.raw_os_error().unwrap_or(0)),
    })?;
    let argv0 = builder
        .file_name()
        .map(OsString::from)
        .unwrap_or_else(|| builder.as_os_str().to_owned());
    let mut cmd = Command::new(builder);
    cmd.arg0(argv0)
        .args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(File::from(log)))
        .stderr(Stdio::from(File::from(err_log)));
    // SAFETY: the closure runs in the forked child before exec and makes only system calls
    // (setsid, open/write of prepared paths, set*id, prctl) that are async-signal-safe; it
    // touches no lock and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid()?;
            for p in &procs {
                let fd = nix::fcntl::open(
                    p.as_c_str(),
                    nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC,
                    nix::sys::stat::Mode::empty(),
                )?;
                let wrote = nix::unistd::write(std::os::fd::BorrowedFd::borrow_raw(fd), b"0\n");
                let _ = nix::unistd::close(fd);
                wrote?;
            }
            if let Some((uid, gid)) = ids {
                nix::unistd::setgroups(&[])?;
                let gid = nix::unistd::Gid::from_raw(gid);
                let uid = nix::unistd::Uid::from_raw(uid);
                nix::unistd::setresgid(gid, gid, gid)?;
                nix::unistd::setresuid(uid, uid, uid)?;
            }
            // After the uid change, which clears it.
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            nix::sys::prctl::set_no_new_privs()?;
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| SandboxError::Sys {
        what: "starting the builder",
        errno: Errno::from_raw(e.raw_os_error().unwrap_or(0)),
    })?;
    let pid = Pid::from_raw(child.id() as i32);
    // The std handle is dropped without waiting; the pid is reaped here.
    drop(child);
    Ok(HostBuilder {
        pid,
        exit: None,
        setup_time: started.elapsed(),
    })
}

impl HostBuilder {
    /// SIGKILL to the builder's session (its process group: what it started without a
    /// `setsid` of its own).
    fn kill_group(&self) {
        let _ = kill(Pid::from_raw(-self.pid.as_raw()), Signal::SIGKILL);
    }

    fn reaped(&mut self, st: WaitStatus) -> Option<BuildExit> {
        let exit = match st {
            WaitStatus::Exited(_, code) => BuildExit::Exited(code),
            WaitStatus::Signaled(_, sig, _) => BuildExit::Signaled(sig),
            _ => return None,
        };
        self.exit = Some(exit);
        // Whatever it left running in its group ends with it, as a build's processes do.
        self.kill_group();
        Some(exit)
    }
}

impl Builder for HostBuilder {
    fn kill(&mut self) -> Result<(), SandboxError> {
        if self.exit.is_none() {
            self.kill_group();
        }
        Ok(())
    }

    fn try_wait(&mut self) -> Result<Option<BuildExit>, SandboxError> {
        if let Some(e) = self.exit {
            return Ok(Some(e));
        }
        match waitpid(self.pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(st) => Ok(self.reaped(st)),
            Err(Errno::EINTR) => Ok(None),
            Err(e) => Err(sys("waiting for the builder")(e)),
        }
    }

    fn wait(&mut self) -> Result<BuildExit, SandboxError> {
        loop {
            if let Some(e) = self.exit {
                return Ok(e);
            }
            match waitpid(self.pid, None) {
                Ok(st) => {
                    self.reaped(st);
                }
                Err(Errno::EINTR) => {}
                Err(e) => return Err(sys("waiting for the builder")(e)),
            }
        }
    }
}

impl Drop for HostBuilder {
    fn drop(&mut self) {
        if self.exit.is_none() {
            self.kill_group();
            let _ = self.wait();
        }
    }
}
