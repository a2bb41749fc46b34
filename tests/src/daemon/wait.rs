//! Waiting for a daemon: until its socket accepts connections, or until it exits.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::process::Child;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use super::Daemon;
use crate::proc::{self, ProcHandle};
use crate::HarnessError;

impl Daemon {
    /// Waits until a connection to the socket succeeds. Wakes on inotify events in the socket
    /// directory and on the daemon's exit (pidfd); only a socket that exists but refuses
    /// connections (bound, not yet listening) is retried on a short, growing timer.
    pub(super) fn wait_for_socket(&mut self, timeout: Duration) -> Result<(), HarnessError> {
        let sock = self.socket_path();
        let dir = self.socket_dir.clone();
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|e| HarnessError::io("inotify_init")(e.into()))?;
        inotify
            .add_watch(
                &dir,
                AddWatchFlags::IN_CREATE | AddWatchFlags::IN_ATTRIB | AddWatchFlags::IN_MOVED_TO,
            )
            .map_err(|e| HarnessError::io(format!("watching {}", dir.display()))(e.into()))?;
        let pid = self.pid();
        let pidfd = ProcHandle::open(pid).map_err(HarnessError::io("pidfd_open of the daemon"))?;
        let deadline = Instant::now() + timeout;
        let mut backoff = Duration::from_millis(1);
        loop {
            let retry = match UnixStream::connect(&sock) {
                Ok(s) => {
                    settle(s, deadline);
                    return Ok(());
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    let b = backoff;
                    backoff = (backoff * 2).min(Duration::from_millis(50));
                    Some(b)
                }
                Err(e) => {
                    return Err(HarnessError::io(format!(
                        "connecting to {}",
                        sock.display()
                    ))(e))
                }
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(HarnessError::StartTimeout {
                    kind: self.kind.name(),
                    socket: sock.display().to_string(),
                    timeout,
                    log: self.log_tail(40),
                });
            }
            let wait = retry.map_or(deadline - now, |r| r.min(deadline - now));
            let mut fds = [
                PollFd::new(inotify.as_fd(), PollFlags::POLLIN),
                PollFd::new(pidfd.fd().as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, proc::poll_timeout(wait)) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(HarnessError::io("poll")(e.into())),
            }
            let died = fds[1].revents().is_some_and(|r| !r.is_empty());
            if died {
                let status = match self.child.as_mut().map(Child::wait) {
                    Some(Ok(s)) => s.to_string(),
                    _ => "unknown status".into(),
                };
                return Err(HarnessError::DaemonDied {
                    kind: self.kind.name(),
                    status,
                    socket: sock.display().to_string(),
                    log: self.log_tail(40),
                });
            }
            // Drain the events; which file changed does not matter, we just try again.
            while let Ok(events) = inotify.read_events() {
                if events.is_empty() {
                    break;
                }
            }
        }
    }

    /// Waits up to `timeout` for the daemon's main process to exit by itself; returns its exit
    /// status (None if it still runs).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let handle = ProcHandle::open(child.id() as i32).ok()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            let mut fds = [PollFd::new(handle.fd().as_fd(), PollFlags::POLLIN)];
            let _ = poll(&mut fds, proc::poll_timeout(deadline - now));
        }
    }
}

/// Waits for the daemon's answer to the first half of a handshake on the probe's connection,
/// best effort: nix-daemon's worker opens (and on a fresh store creates) the database before it
/// answers, and a second worker doing that at the same moment fails with "database is busy".
fn settle(mut s: UnixStream, deadline: Instant) {
    use std::io::{Read, Write};
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() || s.set_read_timeout(Some(left)).is_err() {
        return;
    }
    let magic = stockade_common::worker::WORKER_MAGIC_1.to_le_bytes();
    let mut answer = [0u8; 8];
    let _ = s.write_all(&magic).and_then(|()| s.read_exact(&mut answer));
}
