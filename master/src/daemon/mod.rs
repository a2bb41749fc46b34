//! The accept loop and supervision.
//!
//! One thread, one `poll` over: a signalfd (SIGCHLD, SIGTERM, SIGINT, SIGHUP), the
//! store-writer's control channel, the two listening sockets, and each broker's output pipe
//! (relay.rs: what a broker writes reaches the log only prefixed, escaped and bounded). Being
//! single-threaded is what makes forking children safe (spawn.rs) and keeps the state below
//! free of locks.
//!
//! For each connection: `SO_PEERCRED` → passwd/group look-ups → `policy::admit` (allowed-users,
//! trusted-users, build-users-group; connections on the untrusted socket are never trusted) →
//! connection limits → a broker uid (root only) → store-writer `NewClient` → broker exec.
//! A refused connection is closed without a byte, as nix-daemon does, after an audit line and
//! nix-daemon's `error processing connection: …` message on standard error.
//!
//! When a broker exits the master tells the store-writer (`ClientGone`), frees the broker's uid
//! once nothing runs under it, and writes the `closed` audit line. If the store-writer dies the
//! master exits non-zero (see writer.rs). If the store and state directories were replaced since
//! the store-writer started, the next client first gets a new store-writer (restart.rs).
//! SIGTERM/SIGINT: stop accepting, send `Shutdown`, wait for the store-writer to exit, send
//! SIGTERM to the remaining brokers, exit 0. SIGHUP is ignored (configuration is read at start
//! only).

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use stockade_common::audit::{Audit, Facility, Severity};
use stockade_common::ipc::builder::BuilderToMaster;
use stockade_common::ipc::msg::{ClientIdentity, StoreWriterConfig, StoreWriterToMaster};
use stockade_common::ipc::{self};
use stockade_policy::{admit, referenced_groups, Admission, RefuseCause, TrustOverride};

use crate::builder::BuilderHelper;
use crate::builders::BuildUids;
use crate::cli::DaemonArgs;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::launch::Launcher;
use crate::paths::Paths;
use crate::peers::peer_facts;
use crate::ratelimit::RateLimit;
use crate::restart::{self, Checked, StoreWatch};
use crate::roots::RootsReader;
use crate::socket::{self, Listeners};
use crate::spawn::Confinement;
use crate::uids::UidPool;
use crate::writer::StoreWriter;
use relay::Relay;

mod accept;
mod children;
mod ctx;
pub(crate) mod relay;
pub use ctx::{db_reader_gid, unprivileged_notice, yes_no, Ctx};

/// How long the store-writer has to finish after `Shutdown` before it is killed.
pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_secs(60);

/// Connections accepted per listener per loop turn, so one flooded socket cannot starve the
/// other or the signal handling.
const ACCEPT_BATCH: usize = 64;
/// How long the accept loop waits, idle, before checking released broker uids for leftovers.
const VERIFY_UIDS_AFTER_MS: u16 = 100;

/// Which socket a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Main,
    Untrusted,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Source::Main => "main",
            Source::Untrusted => "untrusted",
        }
    }
}

/// A live connection, keyed by its broker's pid.
#[derive(Debug)]
struct Conn {
    conn_id: u64,
    client_uid: u32,
    client_pid: i32,
    broker_uid: Option<u32>,
    started: Instant,
}

/// How many closed connections' client uids [`Daemon::recently_closed`] keeps.
const RECENTLY_CLOSED: usize = 256;

struct Daemon {
    ctx: Ctx,
    listeners: Option<Listeners>,
    writer: StoreWriter,
    /// The directories `writer` started on.
    watch: StoreWatch,
    writer_chan_open: bool,
    writer_exited: bool,
    helper: BuilderHelper,
    helper_chan_open: bool,
    /// The helper died while the daemon was not shutting down: exit non-zero.
    helper_died: bool,
    build_uids: BuildUids,
    /// The roots-reader, when installed (roots.rs).
    roots: Option<RootsReader>,
    sigfd: SignalFd,
    uids: Option<UidPool>,
    conns: HashMap<i32, Conn>,
    /// The brokers' output (relay.rs).
    relay: Relay,
    per_uid: HashMap<u32, u32>,
    /// The client uids of the last [`RECENTLY_CLOSED`] connections: the helper audits a
    /// broker's limits when told the connection ended (service/budget.rs), after it is gone
    /// from `conns`.
    recently_closed: VecDeque<(u64, u32)>,
    next_conn: u64,
    groups: Vec<String>,
    /// A spare descriptor, given up to accept-and-close a connection when out of descriptors.
    reserve: Option<File>,
    limit_log: RateLimit,
    shutdown_deadline: Option<Instant>,
}

/// Block the signals the loop handles and return a signalfd for them. Must run before any
/// child exists (so no SIGCHLD is missed) and before any thread is started.
fn signal_fd() -> Result<SignalFd> {
    let mut mask = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        mask.add(s);
    }
    mask.thread_block()
        .map_err(Error::sys("blocking signals"))?;
    SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(Error::sys("signalfd"))
}

fn open_reserve() -> Option<File> {
    File::open("/dev/null").ok()
}

/// Run the daemon until shutdown; returns the exit code.
pub fn run(ctx: Ctx) -> Result<i32> {
    if !ctx.as_root {
        log::warn!("{}", unprivileged_notice(ctx.uid));
    }
    let sigfd = signal_fd()?;
    // The store-writer is up and locked down before the socket appears: a client that sees
    // the socket never meets a half-started daemon.
    let mut writer = ctx.start_store_writer()?;
    // Started before the master drops its capabilities (it needs the helper's uid and caps).
    let helper = ctx.start_builder(&mut writer)?;
    // Likewise: it needs CAP_SYS_PTRACE, which the master drops (roots.rs).
    let roots = ctx.start_roots_reader()?;
    let build_uids = BuildUids::new(&ctx)?;
    let watch = StoreWatch::record(&ctx.paths);
    let listeners = socket::open(&ctx.paths, ctx.uid)?;
    let uids = if ctx.as_root {
        Some(UidPool::new(ctx.cfg.broker_uid_range())?)
    } else {
        None
    };
    // Everything that needs more than the steady state runs: confine the master itself
    // before the first connection (restrict.rs).
    let confined = crate::restrict::lockdown(ctx.lockdown(), ctx.as_root)?;
    let groups = {
        let s = &ctx.cfg.settings;
        referenced_groups(&[&s.allowed_users, &s.trusted_users])
            .into_iter()
            .map(str::to_string)
            .collect()
    };
    let main_path = if listeners.activated {
        "(systemd)".to_string()
    } else {
        ctx.paths.socket_path.to_string_lossy().into_owned()
    };
    ctx.audit_start(
        "daemon",
        &[
            ("socket", main_path.clone()),
            (
                "untrusted-socket",
                ctx.paths
                    .untrusted_socket_path
                    .to_string_lossy()
                    .into_owned(),
            ),
            ("store-writer-pid", writer.pid.to_string()),
            ("builder-helper-pid", helper.pid.to_string()),
            (
                "roots-reader-pid",
                roots
                    .as_ref()
                    .map_or_else(|| "none".to_string(), |r| r.pid.to_string()),
            ),
            ("build-uids", build_uids.describe()),
        ]
        .into_iter()
        .chain(crate::restrict::audit_fields(&confined))
        .collect::<Vec<_>>(),
    );
    log::info!(
        "stockade {}: listening on {main_path} (untrusted: {}), pid {}",
        env!("CARGO_PKG_VERSION"),
        ctx.paths.untrusted_socket_path.display(),
        std::process::id()
    );
    socket::sd_notify(&format!("READY=1\nMAINPID={}", std::process::id()));
    let mut d = Daemon {
        ctx,
        listeners: Some(listeners),
        writer,
        watch,
        writer_chan_open: true,
        writer_exited: false,
        helper,
        helper_chan_open: true,
        helper_died: false,
        build_uids,
        roots,
        sigfd,
        uids,
        conns: HashMap::new(),
        relay: Relay::new(),
        per_uid: HashMap::new(),
        recently_closed: VecDeque::new(),
        next_conn: 1,
        groups,
        reserve: open_reserve(),
        limit_log: RateLimit::new(20),
        shutdown_deadline: None,
    };
    d.run()
}

/// `timeout`, or the time left until `deadline` if that is sooner.
fn sooner(timeout: PollTimeout, deadline: Option<Instant>) -> PollTimeout {
    let Some(d) = deadline else { return timeout };
    let left = PollTimeout::try_from(d.saturating_duration_since(Instant::now()))
        .unwrap_or(PollTimeout::MAX);
    if timeout == PollTimeout::NONE || left < timeout {
        left
    } else {
        timeout
    }
}

impl Daemon {
    fn run(&mut self) -> Result<i32> {
        loop {
            if self.writer_exited {
                return Ok(self.finish());
            }
            let timeout = match self.shutdown_deadline {
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        log::error!("the store-writer did not exit in time; killing it");
                        let _ = kill(Pid::from_raw(self.writer.pid), Signal::SIGKILL);
                        self.shutdown_deadline = None;
                        PollTimeout::NONE
                    } else {
                        PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX)
                    }
                }
                None => PollTimeout::NONE,
            };
            // Released broker uids are checked once the burst that released them is over.
            let unverified = self.uids.as_ref().is_some_and(|p| p.has_unverified())
                || self.build_uids.has_unverified();
            let timeout = if unverified && timeout == PollTimeout::NONE {
                PollTimeout::from(VERIFY_UIDS_AFTER_MS)
            } else {
                timeout
            };
            // A runtime-roots scan that must end by its deadline; refusal counts to report.
            let timeout = sooner(timeout, self.roots.as_ref().and_then(RootsReader::deadline));
            let timeout = sooner(timeout, self.limit_log.due());
            let (sig, chan, helper, roots, main, untrusted, relayed) = {
                let roots_chan = self.roots.as_ref().and_then(RootsReader::channel);
                let mut fds = vec![PollFd::new(self.sigfd.as_fd(), PollFlags::POLLIN)];
                if self.writer_chan_open {
                    fds.push(PollFd::new(
                        self.writer.channel().as_fd(),
                        PollFlags::POLLIN,
                    ));
                }
                if self.helper_chan_open {
                    fds.push(PollFd::new(
                        self.helper.channel().as_fd(),
                        PollFlags::POLLIN,
                    ));
                }
                if let Some(c) = roots_chan {
                    fds.push(PollFd::new(c.as_fd(), PollFlags::POLLIN));
                }
                if let Some(l) = &self.listeners {
                    fds.push(PollFd::new(l.main.as_fd(), PollFlags::POLLIN));
                    fds.push(PollFd::new(l.untrusted.as_fd(), PollFlags::POLLIN));
                }
                let relay_base = fds.len();
                let relay_ids: Vec<u64> = self
                    .relay
                    .fds()
                    .map(|(id, fd)| {
                        fds.push(PollFd::new(fd, PollFlags::POLLIN));
                        id
                    })
                    .collect();
                match poll(&mut fds, timeout) {
                    Ok(_) => {}
                    Err(Errno::EINTR) => continue,
                    Err(e) => return Err(Error::sys("poll")(e)),
                }
                let ready = |i: usize| {
                    fds.get(i)
                        .and_then(|f| f.revents())
                        .is_some_and(|r| !r.is_empty())
                };
                let chan_i = if self.writer_chan_open { Some(1) } else { None };
                let helper_i = 1 + usize::from(self.writer_chan_open);
                let helper_i = self.helper_chan_open.then_some(helper_i);
                let roots_i =
                    1 + usize::from(self.writer_chan_open) + usize::from(self.helper_chan_open);
                let roots_i = roots_chan.is_some().then_some(roots_i);
                let base = 1
                    + usize::from(self.writer_chan_open)
                    + usize::from(self.helper_chan_open)
                    + usize::from(roots_chan.is_some());
                let listening = self.listeners.is_some();
                // POLLHUP too: a broker that closed its end, or exited.
                let relayed: Vec<u64> = relay_ids
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| ready(relay_base + i))
                    .map(|(_, id)| *id)
                    .collect();
                (
                    ready(0),
                    chan_i.is_some_and(ready),
                    helper_i.is_some_and(ready),
                    roots_i.is_some_and(ready),
                    listening && ready(base),
                    listening && ready(base + 1),
                    relayed,
                )
            };
            if !(sig || chan || helper || roots || main || untrusted || !relayed.is_empty()) {
                if let Some(pool) = self.uids.as_mut() {
                    pool.verify_released();
                }
                self.build_uids.verify_released();
            }
            if sig {
                self.handle_signals();
            }
            if chan {
                self.handle_writer_message();
            }
            if helper {
                self.handle_helper_message();
            }
            if let Some(r) = self.roots.as_mut() {
                if roots {
                    r.handle_message(&mut self.writer);
                }
                r.check_timeout(&mut self.writer);
            }
            if main {
                self.accept_batch(Source::Main);
            }
            if untrusted {
                self.accept_batch(Source::Untrusted);
            }
            self.report_suppressed(Instant::now());
            // Reaped brokers' streams are gone already (`closed`): nothing to do for those.
            for id in relayed {
                if let Err(e) = self.relay.ready(id, &mut io::stderr()) {
                    log::warn!("{e}");
                }
            }
        }
    }

    /// After the store-writer has exited: stop the brokers and pick the exit code.
    fn finish(&mut self) -> i32 {
        for pid in self.conns.keys() {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGTERM);
        }
        let clean =
            (self.shutdown_deadline.is_some() || self.listeners.is_none()) && !self.helper_died;
        self.ctx.audit.event_at(
            Facility::Daemon,
            Severity::Notice,
            0,
            self.ctx.uid,
            "stop",
            &[
                ("clean", yes_no(clean)),
                ("open-connections", &self.conns.len().to_string()),
            ],
        );
        if clean {
            0
        } else {
            1
        }
    }

    fn begin_shutdown(&mut self, signal: Signal) {
        if self.listeners.is_none() {
            return;
        }
        log::info!("received {signal}, shutting down");
        socket::sd_notify("STOPPING=1");
        // Closing the listeners refuses new connections; the socket files stay (systemd may
        // own them, and nix-daemon leaves them too).
        self.listeners = None;
        self.shutdown_deadline = Some(Instant::now() + SHUTDOWN_GRACE);
        if self.helper_chan_open {
            if let Err(e) = self.helper.shutdown() {
                log::error!("{e}");
                let _ = kill(Pid::from_raw(self.helper.pid), Signal::SIGTERM);
            }
        }
        if let Some(r) = self.roots.as_mut() {
            r.shutdown();
        }
        if let Err(e) = self.writer.shutdown() {
            log::error!("{e}");
            let _ = kill(Pid::from_raw(self.writer.pid), Signal::SIGTERM);
        }
    }

    fn handle_signals(&mut self) {
        loop {
            match self.sigfd.read_signal() {
                Ok(Some(info)) => {
                    let Ok(sig) = Signal::try_from(info.ssi_signo as i32) else {
                        continue;
                    };
                    match sig {
                        Signal::SIGCHLD => self.reap(),
                        Signal::SIGTERM | Signal::SIGINT => self.begin_shutdown(sig),
                        Signal::SIGHUP => {
                            log::info!("ignoring SIGHUP: restart the daemon to apply new settings")
                        }
                        _ => {}
                    }
                }
                Ok(None) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    log::error!("reading signals: {e}");
                    break;
                }
            }
        }
        // SIGCHLDs coalesce; reap whatever is there even if the signal was merged away.
        self.reap();
    }

    fn reap(&mut self) {
        loop {
            let status = match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(s) => s,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    log::error!("waitpid: {e}");
                    return;
                }
            };
            let (pid, how) = match status {
                WaitStatus::Exited(pid, code) => (pid, ("exit", code.to_string())),
                WaitStatus::Signaled(pid, sig, _) => (pid, ("signal", sig.as_str().to_string())),
                _ => continue,
            };
            if pid.as_raw() == self.helper.pid {
                self.helper_exited(&how);
            } else if let Some(r) = self.roots.as_mut().filter(|r| r.pid == pid.as_raw()) {
                r.exited(&mut self.writer, &how, self.shutdown_deadline.is_some());
            } else if pid.as_raw() == self.writer.pid {
                self.writer_exited = true;
                if self.shutdown_deadline.is_some() {
                    log::info!("the store-writer exited ({} {})", how.0, how.1);
                } else {
                    log::error!(
                        "the store-writer exited unexpectedly ({} {}); stopping",
                        how.0,
                        how.1
                    );
                    self.ctx.audit.event_at(
                        Facility::Daemon,
                        Severity::Err,
                        0,
                        self.ctx.uid,
                        "store-writer-died",
                        &[(how.0, &how.1)],
                    );
                }
            } else if let Some(conn) = self.conns.remove(&pid.as_raw()) {
                self.closed(pid.as_raw(), conn, &how);
            }
        }
    }

    /// `how`: `("exit", code)` or `("signal", name)`.
    fn closed(&mut self, broker_pid: i32, conn: Conn, how: &(&str, String)) {
        // Its last lines before the `closed` line; then its pipe is closed, whoever else may
        // hold the write end.
        if let Err(e) = self.relay.exited(conn.conn_id, &mut io::stderr()) {
            log::warn!("{e}");
        }
        if self.helper_chan_open {
            if let Err(e) = self.helper.client_gone(conn.conn_id) {
                log::debug!("{e}");
            }
        }
        if !self.writer_exited && self.writer_chan_open {
            if let Err(e) = self.writer.client_gone(conn.conn_id) {
                // While shutting down the store-writer may already have closed its end.
                if self.shutdown_deadline.is_some() {
                    log::debug!("{e}");
                } else {
                    log::error!("{e}");
                }
            }
        }
        if self.recently_closed.len() >= RECENTLY_CLOSED {
            self.recently_closed.pop_front();
        }
        self.recently_closed
            .push_back((conn.conn_id, conn.client_uid));
        if let Some(n) = self.per_uid.get_mut(&conn.client_uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_uid.remove(&conn.client_uid);
            }
        }
        if let (Some(pool), Some(uid)) = (self.uids.as_mut(), conn.broker_uid) {
            pool.release(uid);
        }
        let secs = format!("{:.3}", conn.started.elapsed().as_secs_f64());
        self.ctx.audit.event_at(
            Facility::AuthPriv,
            Severity::Info,
            conn.conn_id,
            conn.client_uid,
            "closed",
            &[
                ("pid", &conn.client_pid.to_string()),
                ("broker-pid", &broker_pid.to_string()),
                (how.0, &how.1),
                ("seconds", &secs),
            ],
        );
    }
}

/// The real uid of `pid`, from `/proc/<pid>/status`.
fn proc_uid(pid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
