//! The store replaced under a running daemon.
//!
//! An administrator, or a test harness between tests (Nix's functional tests remove the store
//! and state directories and make them again, empty), may replace the directories while the
//! daemon runs. nix-daemon opens the store anew for every connection, so its next client works
//! on the new store. Stockade's store-writer holds descriptors and Landlock rules on the
//! directories it opened at start, so it would answer every later client "Permission denied".
//!
//! So for each admitted client, before it is handed to the store-writer, the master compares
//! the real store directory, the state directory and its `db/` with what they were when the
//! current store-writer reported `Ready` (it creates missing directories at start, so they exist
//! then): device and inode, and the birth time where the file system reports one, so that a
//! directory made again on the inode number just freed still counts as new. When one changed or
//! is gone:
//!
//! 1. the old store-writer is told to shut down and the master waits until it has exited and
//!    reaps it (at most [`SHUTDOWN_GRACE`], then SIGKILL), so nothing it holds (its database
//!    connection, its lock on the state directory) outlives it. Connections it served lose
//!    their channel to it: their next change fails with an error;
//! 2. a new store-writer is started exactly as at start-up ([`Ctx::start_store_writer`]) and
//!    the identities it started on are recorded;
//! 3. one log line and one audit line (`store-replaced`, old and new identities, both pids);
//! 4. the client is served by the new store-writer.
//!
//! The master does this in its accept loop: new clients wait in the listen backlog meanwhile.
//!
//! # A root daemon exits instead
//!
//! As root, a store-writer needs CAP_CHOWN, CAP_FOWNER, CAP_DAC_OVERRIDE and
//! CAP_DAC_READ_SEARCH, which spawn.rs carries into it by keeping them in the permitted set
//! across the uid change and raising them as ambient capabilities: the process that forks it
//! must hold them in its permitted and bounding sets. After start-up the master holds only
//! CAP_SETUID, CAP_SETGID, CAP_SETPCAP and CAP_KILL (restrict.rs), and a capability dropped from
//! those sets cannot come back. Keeping the four for a restart would widen what the master can
//! do in normal operation: in its permitted set a compromised master raises them with one
//! capset(2) and reads or writes any file, which is what restrict.rs takes away; in its bounding
//! set alone it regains them by exec'ing any program as uid 0. A helper process kept alive only
//! to start store-writers would be a new long-lived process holding those capabilities and
//! CAP_SETUID, for an administrative event that loses every open connection anyway. So a root
//! master that no longer holds them stops the old store-writer the same way, writes one error
//! line and one audit line (`action=exit`) and exits with status 1 for its supervisor to start
//! the daemon again (the shipped unit has `Restart=on-failure`; with socket activation, clients
//! that connect meanwhile wait on the socket). The client that found the change is closed
//! without an answer. A daemon run by an ordinary user needs no capabilities and restarts its
//! store-writer in place, as does a root master that kept its capabilities because it could not
//! drop them at start-up.

use std::fmt;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use caps::{CapSet, Capability};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use stockade_common::audit::{Facility, Severity};

use crate::daemon::{Ctx, SHUTDOWN_GRACE};
use crate::paths::Paths;
use crate::spawn::STORE_WRITER_CAPS;
use crate::writer::StoreWriter;

/// What a directory is, as far as telling a replaced one apart goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DirId {
    Present {
        dev: u64,
        ino: u64,
        /// Birth time, where the file system reports it.
        born: Option<SystemTime>,
    },
    /// Does not exist (or a component of its path is not a directory).
    Gone,
    /// Could not be examined (e.g. no search permission): never counts as a change.
    Unknown,
}

impl DirId {
    fn of(path: &Path) -> DirId {
        match std::fs::metadata(path) {
            Ok(m) => DirId::Present {
                dev: m.dev(),
                ino: m.ino(),
                born: m.created().ok(),
            },
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(nix::libc::ENOENT | nix::libc::ENOTDIR)
                ) =>
            {
                DirId::Gone
            }
            Err(e) => {
                log::debug!("cannot examine {}: {e}", path.display());
                DirId::Unknown
            }
        }
    }

    /// Whether `now` is another directory than `self` (recorded earlier).
    fn replaced_by(&self, now: &DirId) -> bool {
        match (self, now) {
            (DirId::Present { .. }, DirId::Gone) => true,
            (DirId::Present { .. }, DirId::Present { .. }) => self != now,
            _ => false,
        }
    }
}

/// `major:minor:inode`, with `@seconds.nanoseconds` of the birth time when known; `gone`;
/// `unknown`.
impl fmt::Display for DirId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DirId::Present { dev, ino, born } => {
                let (major, minor) = (nix::sys::stat::major(*dev), nix::sys::stat::minor(*dev));
                write!(f, "{major}:{minor}:{ino}")?;
                if let Some(d) = born.and_then(|b| b.duration_since(SystemTime::UNIX_EPOCH).ok()) {
                    write!(f, "@{}.{:09}", d.as_secs(), d.subsec_nanos())?;
                }
                Ok(())
            }
            DirId::Gone => f.write_str("gone"),
            DirId::Unknown => f.write_str("unknown"),
        }
    }
}

/// The names the three directories go by in log and audit lines.
const NAMES: [&str; 3] = ["store", "state", "db"];

/// The directories the current store-writer started on.
#[derive(Debug, Clone)]
pub struct StoreWatch {
    ids: [DirId; 3],
}

impl StoreWatch {
    /// The store, state and `db/` directories as they are now (call once the store-writer is
    /// `Ready`).
    pub fn record(paths: &Paths) -> StoreWatch {
        StoreWatch {
            ids: [
                DirId::of(&paths.store_dir),
                DirId::of(&paths.state_dir),
                DirId::of(&paths.state_dir.join("db")),
            ],
        }
    }

    fn replaced_by(&self, now: &StoreWatch) -> bool {
        self.ids.iter().zip(&now.ids).any(|(a, b)| a.replaced_by(b))
    }

    /// `store 8:1:12 -> gone, db …` for the directories that changed.
    fn changes(&self, now: &StoreWatch) -> String {
        NAMES
            .iter()
            .zip(self.ids.iter().zip(&now.ids))
            .filter(|(_, (a, b))| a.replaced_by(b))
            .map(|(name, (a, b))| format!("{name} {a} -> {b}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `store-old`, `store-new`, … audit fields.
    fn fields(&self, now: &StoreWatch) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (name, (a, b)) in NAMES.iter().zip(self.ids.iter().zip(&now.ids)) {
            out.push((format!("{name}-old"), a.to_string()));
            out.push((format!("{name}-new"), b.to_string()));
        }
        out
    }
}

/// What [`ensure_current`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    /// The directories are those the store-writer started on.
    Current,
    /// They were replaced; a new store-writer serves the new ones.
    Restarted,
    /// They were replaced and the old store-writer has exited, but no new one runs (a root
    /// master without the capabilities, or the new one failed to start): the daemon must stop
    /// with status 1. Logged and audited.
    Stop,
}

/// Make sure `writer` serves the directories that are there now; see the module
/// documentation.
pub fn ensure_current(ctx: &Ctx, watch: &mut StoreWatch, writer: &mut StoreWriter) -> Checked {
    let now = StoreWatch::record(&ctx.paths);
    if !watch.replaced_by(&now) {
        return Checked::Current;
    }
    let changes = watch.changes(&now);
    let old_pid = writer.pid;
    log::debug!("store directories replaced ({changes}); stopping store-writer {old_pid}");
    let mut extra: Vec<(String, String)> = vec![("old-pid".into(), old_pid.to_string())];
    let (how, status) = stop_store_writer(writer);
    extra.push((how.into(), status));

    let missing = missing_capabilities(ctx.as_root);
    if !missing.is_empty() {
        let missing = missing.join(",");
        log::error!(
            "the store directories were replaced while the daemon ran ({changes}); exiting with \
             status 1 for the supervisor to restart the daemon: a new store-writer needs \
             {missing}, which this root daemon gave up after start-up"
        );
        extra.push(("action".into(), "exit".into()));
        extra.push(("missing".into(), missing));
        audit(ctx, Severity::Err, watch, &now, &extra);
        return Checked::Stop;
    }
    match ctx.start_store_writer() {
        Ok(new) => {
            *writer = new;
            // Recorded now that it has created whatever was missing.
            let started_on = StoreWatch::record(&ctx.paths);
            log::warn!(
                "the store directories were replaced while the daemon ran ({changes}); \
                 restarted the store-writer on the new ones (pid {old_pid} -> {})",
                writer.pid
            );
            extra.push(("new-pid".into(), writer.pid.to_string()));
            extra.push(("action".into(), "restarted".into()));
            audit(ctx, Severity::Notice, watch, &started_on, &extra);
            *watch = started_on;
            Checked::Restarted
        }
        Err(e) => {
            log::error!(
                "the store directories were replaced while the daemon ran ({changes}) and a new \
                 store-writer could not start: {e}; exiting with status 1"
            );
            extra.push(("action".into(), "failed".into()));
            extra.push(("reason".into(), e.to_string()));
            audit(ctx, Severity::Err, watch, &now, &extra);
            Checked::Stop
        }
    }
}

/// The one `store-replaced` audit line: each directory's identity before and after, then
/// `extra`.
fn audit(
    ctx: &Ctx,
    severity: Severity,
    old: &StoreWatch,
    new: &StoreWatch,
    extra: &[(String, String)],
) {
    let mut fields = old.fields(new);
    fields.extend_from_slice(extra);
    let refs: Vec<(&str, &str)> = fields
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    ctx.audit.event_at(
        Facility::Daemon,
        severity,
        0,
        ctx.uid,
        "store-replaced",
        &refs,
    );
}

/// What the master lacks to start a store-writer ([`crate::spawn`]): nothing for a daemon run
/// by an ordinary user (same uid, no capabilities); as root, the store-writer's capabilities and
/// those that switch a child's uid and bounding set, each in the permitted and bounding sets.
fn missing_capabilities(as_root: bool) -> Vec<String> {
    if !as_root {
        return Vec::new();
    }
    let permitted = caps::read(None, CapSet::Permitted).unwrap_or_default();
    let bounding = caps::read(None, CapSet::Bounding).unwrap_or_default();
    STORE_WRITER_CAPS
        .iter()
        .chain(&[
            Capability::CAP_SETUID,
            Capability::CAP_SETGID,
            Capability::CAP_SETPCAP,
        ])
        .filter(|c| !(permitted.contains(c) && bounding.contains(c)))
        .map(|c| c.to_string())
        .collect()
}

/// Ask the store-writer to finish, wait until it has exited (SIGKILL after
/// [`SHUTDOWN_GRACE`]) and reap it. Returns how it ended as an audit field: `("old-exit",
/// code)` or `("old-signal", name)`.
fn stop_store_writer(writer: &mut StoreWriter) -> (&'static str, String) {
    let pid = Pid::from_raw(writer.pid);
    // A pidfd to wait with a deadline. The child is not reaped until the waitpid below, so
    // its pid cannot be reused meanwhile.
    let pidfd = rustix::process::Pid::from_raw(writer.pid).and_then(|p| {
        rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty())
            .map_err(|e| log::debug!("pidfd_open: {e}"))
            .ok()
    });
    if let Err(e) = writer.shutdown() {
        // Its channel may be closed already (it is exiting); make sure it does.
        log::debug!("{e}");
        let _ = kill(pid, Signal::SIGTERM);
    }
    // Without pidfds (Linux before 5.3) the blocking waitpid below is the wait.
    if let Some(fd) = &pidfd {
        if !wait_readable(fd, SHUTDOWN_GRACE) {
            log::error!("the old store-writer did not exit in time; killing it");
            let _ = kill(pid, Signal::SIGKILL);
        }
    }
    loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, code)) => return ("old-exit", code.to_string()),
            Ok(WaitStatus::Signaled(_, sig, _)) => return ("old-signal", sig.as_str().into()),
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(e) => {
                log::error!("waiting for the old store-writer: {e}");
                return ("old-exit", "unknown".into());
            }
        }
    }
}

/// Poll `fd` until it is readable or `timeout` passes; true when readable.
fn wait_readable(fd: &impl AsFd, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match poll(
            &mut fds,
            PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => return true,
            Err(e) => {
                log::error!("poll: {e}");
                return false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_removed_directory_is_gone() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("store");
        std::fs::create_dir(&d).unwrap();
        let before = DirId::of(&d);
        assert!(matches!(before, DirId::Present { .. }));
        assert!(!before.replaced_by(&DirId::of(&d)));
        std::fs::remove_dir(&d).unwrap();
        let gone = DirId::of(&d);
        assert_eq!(gone, DirId::Gone);
        assert!(before.replaced_by(&gone));
        assert_eq!(gone.to_string(), "gone");
        std::fs::write(t.path().join("a-file"), b"").unwrap();
        assert_eq!(DirId::of(&t.path().join("a-file/below")), DirId::Gone);
    }

    #[test]
    fn same_inode_number_born_later_is_another() {
        let at = |s| Some(SystemTime::UNIX_EPOCH + Duration::from_secs(s));
        let old = DirId::Present {
            dev: 1,
            ino: 2,
            born: at(10),
        };
        let reused = DirId::Present {
            dev: 1,
            ino: 2,
            born: at(11),
        };
        assert!(old.replaced_by(&reused));
        assert_eq!(reused.to_string(), "0:1:2@11.000000000");
    }

    #[test]
    fn unknown_is_never_a_change() {
        let present = DirId::Present {
            dev: 1,
            ino: 2,
            born: None,
        };
        assert!(!present.replaced_by(&DirId::Unknown));
        assert!(!DirId::Unknown.replaced_by(&DirId::Gone));
        assert!(!DirId::Gone.replaced_by(&present));
        assert_eq!(present.to_string(), "0:1:2");
    }
}
