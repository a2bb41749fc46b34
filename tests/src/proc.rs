//! Process plumbing: entering the test's mount namespace, switching user, dying with the test,
//! and waiting for processes through pidfds instead of polling their status.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use nix::unistd::{Gid, Pid, Uid};

/// What a child does between fork and exec. Everything is prepared before the fork: the
/// closure only makes syscalls, because allocating in a forked child of a threaded process
/// (the test harness runs tests on threads) can deadlock on the allocator lock.
#[derive(Default)]
pub(crate) struct ChildSetup {
    /// Join this mount namespace (`/proc/<holder>/ns/mnt`).
    pub mnt_ns: Option<OwnedFd>,
    /// Become this user: uid, primary gid, supplementary groups.
    pub ids: Option<(Uid, Gid, Vec<Gid>)>,
    /// Change to this directory after entering the namespace (setns resets the cwd).
    pub cwd: Option<CString>,
    /// Be killed when the spawning thread ends, so a crashed test leaves nothing behind.
    pub die_with_parent: bool,
}

/// Installs `setup` to run in the child of `cmd`.
pub(crate) fn apply(cmd: &mut Command, setup: ChildSetup) {
    let parent = Pid::this();
    let ChildSetup {
        mnt_ns,
        ids,
        cwd,
        die_with_parent,
    } = setup;
    let child = move || -> io::Result<()> {
        if die_with_parent {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            // The parent may have gone between fork and prctl; then nobody would kill us.
            if nix::unistd::getppid() != parent {
                return Err(io::Error::from_raw_os_error(nix::libc::ESRCH));
            }
        }
        if let Some(ns) = &mnt_ns {
            nix::sched::setns(ns.as_fd(), CloneFlags::CLONE_NEWNS)?;
        }
        if let Some((uid, gid, groups)) = &ids {
            nix::unistd::setgroups(groups)?;
            nix::unistd::setgid(*gid)?;
            nix::unistd::setuid(*uid)?;
        }
        if let Some(dir) = &cwd {
            nix::unistd::chdir(dir.as_c_str())?;
        }
        Ok(())
    };
    // SAFETY: the closure owns everything it touches (prepared before the fork) and only makes
    // async-signal-safe syscalls (prctl, getppid, setns, setgroups, setgid, setuid, chdir); it
    // neither allocates nor takes locks, so it is sound in the forked child of a threaded process.
    unsafe {
        cmd.pre_exec(child);
    }
}

/// A pidfd: a handle on one process that cannot be confused with a later process of the same
/// pid, which can be polled for exit and signalled.
pub(crate) struct ProcHandle {
    pub pid: i32,
    fd: OwnedFd,
}

impl ProcHandle {
    pub fn open(pid: i32) -> io::Result<Self> {
        let p = rustix::process::Pid::from_raw(pid)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "pid 0"))?;
        let fd = rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty())?;
        Ok(ProcHandle { pid, fd })
    }

    pub fn kill(&self) -> io::Result<()> {
        match rustix::process::pidfd_send_signal(&self.fd, rustix::process::Signal::KILL) {
            Ok(()) => Ok(()),
            // Already gone (a zombie still accepts signals; ESRCH means fully exited).
            Err(e) if e == rustix::io::Errno::SRCH => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }
}

/// Waits until every process in `procs` has exited or `deadline` passes; returns the pids of
/// those still running.
pub(crate) fn wait_all_exited(procs: &[ProcHandle], deadline: Instant) -> Vec<i32> {
    let mut pending: Vec<&ProcHandle> = procs.iter().collect();
    while !pending.is_empty() {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let mut fds: Vec<PollFd> = pending
            .iter()
            .map(|p| PollFd::new(p.fd().as_fd(), PollFlags::POLLIN))
            .collect();
        let timeout = poll_timeout(deadline - now);
        match poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break,
        }
        let exited: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        let mut i = 0;
        pending.retain(|_| {
            let keep = !exited.get(i).copied().unwrap_or(false);
            i += 1;
            keep
        });
    }
    pending.iter().map(|p| p.pid).collect()
}

/// A poll timeout of at most `d` (rounded up to a whole millisecond so we never spin).
pub(crate) fn poll_timeout(d: Duration) -> PollTimeout {
    let ms = d.as_millis().saturating_add(1).min(i32::MAX as u128) as i32;
    PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
}

/// The identity of a process's mount namespace (`mnt:[4026531840]`), if it can be read.
pub(crate) fn mnt_ns_id(pid: i32) -> Option<String> {
    fs::read_link(format!("/proc/{pid}/ns/mnt"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// Every process whose mount namespace is `ns_id`.
pub(crate) fn pids_in_mnt_ns(ns_id: &str) -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
        .filter(|pid| mnt_ns_id(*pid).as_deref() == Some(ns_id))
        .collect()
}

/// Every process (readable by us) whose environment contains `marker` (`NAME=value`). Used to
/// find a daemon's descendants when there is no private namespace to find them by.
pub(crate) fn pids_with_env(marker: &str) -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id() as i32;
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
        .filter(|pid| *pid != me)
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/environ"))
                .map(|env| env.split(|b| *b == 0).any(|kv| kv == marker.as_bytes()))
                .unwrap_or(false)
        })
        .collect()
}

/// Kills every process `find` reports, repeatedly (a process may fork while we kill), and
/// waits for them to exit. Returns the pids that survived the deadline.
pub(crate) fn kill_all(find: impl Fn() -> Vec<i32>, still_ours: impl Fn(i32) -> bool) -> Vec<i32> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut handles: Vec<ProcHandle> = Vec::new();
    for _round in 0..20 {
        let pids: Vec<i32> = find()
            .into_iter()
            .filter(|p| !handles.iter().any(|h| h.pid == *p))
            .collect();
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            let Ok(h) = ProcHandle::open(pid) else {
                continue; // exited meanwhile
            };
            // Re-check after taking the handle: the pid may have been reused by a stranger.
            if still_ours(pid) {
                let _ = h.kill();
                handles.push(h);
            }
        }
    }
    wait_all_exited(&handles, deadline)
}

/// True if a process exists and has not exited (zombies count as exited).
pub fn process_alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself contain ')'.
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat.get(i + 2..i + 3))
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Looks `name` up in the standard system directories.
pub(crate) fn find_program(name: &str) -> Option<std::path::PathBuf> {
    crate::SYSTEM_PATH
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}
