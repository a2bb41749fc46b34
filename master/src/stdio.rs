//! `--stdio`: serve one client on standard input/output (an SSH forced command, `nix-store
//! --serve`-style remote stores, `ssh-ng://`).
//!
//! Two cases, following Nix 2.8's choice between a local store and the daemon:
//!
//! - **The store is ours** (root, or an ordinary user whose `NIX_STATE_DIR` is writable, as in
//!   Nix's own test suite): start the store-writer and one broker, exactly as for a socket
//!   connection. The client is trusted unless `--force-untrusted` (2.8 trusts a `--stdio` peer:
//!   whoever set up the pipe did the access control). If standard input and output are one
//!   unix stream socket (sshd usually hands its child a socketpair) the broker gets that socket
//!   itself; otherwise the master splices the two streams to a socketpair with two copying
//!   threads, started only after the children exist (spawn.rs forks single-threaded).
//! - **The store is the daemon's** (an ordinary user, state directory not writable): connect to
//!   the running daemon and splice. The daemon then judges the connecting uid (the SSH
//!   account) by its own `allowed-users` / `trusted-users`. With `--force-untrusted` the
//!   connection goes to the daemon's untrusted socket (`daemon-socket/untrusted`, see
//!   socket.rs), so the account is served untrusted whatever `trusted-users` says (A57);
//!   `--force-trusted` cannot be honoured there and is an error.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;

use nix::sys::socket::{getsockopt, sockopt, SockType};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{AccessFlags, Pid};
use stockade_common::audit::{Facility, Severity};
use stockade_common::ipc::msg::ClientIdentity;
use stockade_common::ipc::{peer_cred, PeerCred};
use stockade_policy::TrustOverride;

use crate::cli::DaemonArgs;
use crate::daemon::relay::Relay;
use crate::daemon::{unprivileged_notice, yes_no, Ctx};
use crate::error::{Error, Result};
use crate::paths::Paths;
use crate::uids::UidPool;

/// Whether this invocation serves the store itself.
pub fn serves_locally(ctx_as_root: bool, state_dir: &std::path::Path) -> bool {
    ctx_as_root || nix::unistd::access(state_dir, AccessFlags::W_OK).is_ok()
}

/// Serve one client on fds 0/1 with our own store-writer and broker.
pub fn serve_locally(ctx: Ctx) -> Result<i32> {
    if !ctx.as_root {
        log::warn!("{}", unprivileged_notice(ctx.uid));
    }
    let stdin = io::stdin();
    let stdout = io::stdout();
    let same_socket = same_unix_stream_socket(stdin.as_fd(), stdout.as_fd());
    let trusted = ctx.args.trust_override().unauthenticated();
    let cred = if same_socket {
        peer_cred(&stdin.as_fd()).ok()
    } else {
        None
    };
    let cred = cred.unwrap_or(PeerCred {
        pid: nix::unistd::getppid().as_raw(),
        uid: nix::unistd::getuid().as_raw(),
        gid: nix::unistd::getgid().as_raw(),
    });

    let mut writer = ctx.start_store_writer()?;
    // Builds as the daemon would run them: the helper, and build uids from the same pool.
    let mut helper = ctx.start_builder(&mut writer)?;
    let mut build_uids = crate::builders::BuildUids::new(&ctx)?;
    // Kept until the end: it holds the broker uid's lock.
    let mut pool = if ctx.as_root {
        Some(UidPool::new(ctx.cfg.broker_uid_range())?)
    } else {
        None
    };
    let broker_uid = match pool.as_mut() {
        Some(p) => Some(
            p.allocate()
                .ok_or_else(|| Error::Refused("no free broker uid".into()))?,
        ),
        None => None,
    };
    // As the daemon: confined before the broker is started (restrict.rs); the copying threads
    // start later and inherit it.
    let confined = crate::restrict::lockdown(ctx.lockdown(), ctx.as_root)?;
    let mut fields = vec![("store-writer-pid", writer.pid.to_string())];
    fields.extend(crate::restrict::audit_fields(&confined));
    ctx.audit_start("stdio", &fields);
    let conn_id = 1;
    let identity = ClientIdentity {
        conn_id,
        uid: cred.uid,
        gid: cred.gid,
        pid: cred.pid,
        trusted,
        user_name: None,
    };
    let (client, splice): (OwnedFd, Option<UnixStream>) = if same_socket {
        let fd = stdin
            .as_fd()
            .try_clone_to_owned()
            .map_err(Error::io("duplicating standard input"))?;
        (fd, None)
    } else {
        let (ours, theirs) = UnixStream::pair().map_err(Error::io("socketpair"))?;
        (theirs.into(), Some(ours))
    };
    let launched = ctx.launcher.launch(
        &mut writer,
        Some(&mut helper),
        client,
        &identity,
        broker_uid,
    )?;
    let broker = launched.pid;
    // The broker's output, relayed as the daemon relays it (on standard error, which is not
    // the client's channel).
    let mut relay = Relay::new();
    if let Some(fd) = launched.output {
        relay.add(conn_id, broker, fd);
    }
    ctx.audit.event_at(
        Facility::AuthPriv,
        Severity::Info,
        conn_id,
        cred.uid,
        "accepted",
        &[
            ("pid", &cred.pid.to_string()),
            ("trusted", yes_no(trusted)),
            ("socket", "stdio"),
            ("broker-pid", &broker.to_string()),
        ],
    );
    // Threads only from here on: every child has been forked.
    let output = splice.map(start_splice).transpose()?;
    let status = serve_until(
        &ctx,
        &mut helper,
        &mut build_uids,
        &mut relay,
        broker,
        &identity,
    );
    if let Some(out) = output {
        let _ = out.join();
    }
    let _ = helper.client_gone(conn_id);
    let _ = helper.shutdown();
    let helper_status = wait_for(helper.pid);
    build_uids.verify_released();
    let _ = writer.client_gone(conn_id);
    let _ = writer.shutdown();
    let writer_status = wait_for(writer.pid);
    if let (Some(p), Some(uid)) = (pool.as_mut(), broker_uid) {
        p.release(uid);
        p.verify_released();
    }
    ctx.audit.event_at(
        Facility::AuthPriv,
        Severity::Info,
        conn_id,
        cred.uid,
        "closed",
        &[
            ("pid", &cred.pid.to_string()),
            ("broker-pid", &broker.to_string()),
            ("status", &status),
            ("store-writer-status", &writer_status),
            ("builder-helper-status", &helper_status),
        ],
    );
    Ok(0)
}

/// The connection to forward to, when a daemon serves the store: `None` when this process
/// should serve it itself (`local`, and no daemon answers). The socket depends on the trust
/// asked for: `--force-untrusted` goes to the untrusted one.
pub fn running_daemon(args: &DaemonArgs, paths: &Paths, local: bool) -> Result<Option<UnixStream>> {
    if local && cfg!(feature = "without-a75") {
        return Ok(None);
    }
    let path = match args.trust_override() {
        TrustOverride::ForceUntrusted => &paths.untrusted_socket_path,
        TrustOverride::Default | TrustOverride::ForceTrusted => &paths.socket_path,
    };
    match UnixStream::connect(path) {
        Ok(sock) if args.trust_override() == TrustOverride::ForceTrusted => {
            drop(sock);
            Err(Error::Refused(
                "--force-trusted cannot be honoured: a daemon serves this store and decides \
                 the trust of forwarded connections"
                    .into(),
            ))
        }
        Ok(sock) => Ok(Some(sock)),
        // No daemon (no socket, or nobody listening): the store is ours if we may write it.
        Err(e)
            if local
                && matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
        {
            Ok(None)
        }
        Err(e) => Err(Error::io(format!(
            "cannot connect to the daemon at {}",
            path.display()
        ))(e)),
    }
}

/// Splice standard input/output to the running daemon's connection `sock`.
pub fn forward(ctx: Ctx, sock: UnixStream) -> Result<i32> {
    log::debug!(
        "forwarding to the daemon at {}",
        ctx.paths.socket_path.display()
    );
    // Forwarding starts nothing and needs no capability: all are dropped.
    crate::restrict::lockdown(ctx.lockdown(), false)?;
    let out = start_splice(sock)?;
    let _ = out.join();
    Ok(0)
}

/// Copy stdin → `sock` (half-closing it at end of input) and `sock` → stdout. Returns the
/// output thread; the input thread is left to end with the process.
fn start_splice(sock: UnixStream) -> Result<JoinHandle<()>> {
    let to_sock = sock
        .try_clone()
        .map_err(Error::io("duplicating a socket"))?;
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let mut to_sock = to_sock;
            let _ = io::copy(&mut io::stdin().lock(), &mut to_sock);
            let _ = to_sock.shutdown(std::net::Shutdown::Write);
        })
        .map_err(Error::io("starting a thread"))?;
    std::thread::Builder::new()
        .name("stdout".into())
        .spawn(move || {
            let mut from = sock;
            let mut out = io::stdout().lock();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match from.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        let Some(chunk) = buf.get(..n) else { break };
                        if out.write_all(chunk).and_then(|()| out.flush()).is_err() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
        })
        .map_err(Error::io("starting a thread"))
}

/// Whether `a` and `b` are the same unix stream socket.
fn same_unix_stream_socket(a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> bool {
    let is_stream = getsockopt(&a, sockopt::SockType).is_ok_and(|t| t == SockType::Stream);
    if !is_stream {
        return false;
    }
    let stat = |fd: BorrowedFd<'_>| nix::sys::stat::fstat(fd.as_raw_fd()).ok();
    let unix = UnixStream::from(match a.try_clone_to_owned() {
        Ok(fd) => fd,
        Err(_) => return false,
    });
    let is_unix = unix.local_addr().is_ok();
    match (stat(a), stat(b)) {
        (Some(x), Some(y)) => is_unix && x.st_dev == y.st_dev && x.st_ino == y.st_ino,
        _ => false,
    }
}

/// Answers the helper (build uids, audit lines) and relays the broker's output until the
/// broker exits; returns how it exited.
fn serve_until(
    ctx: &Ctx,
    helper: &mut crate::builder::BuilderHelper,
    uids: &mut crate::builders::BuildUids,
    relay: &mut Relay,
    broker: i32,
    client: &ClientIdentity,
) -> String {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use stockade_common::ipc::builder::BuilderToMaster;
    let exited = |relay: &mut Relay, status: String| {
        if let Err(e) = relay.exited(client.conn_id, &mut io::stderr()) {
            log::warn!("{e}");
        }
        status
    };
    let mut open = true;
    loop {
        match waitpid(
            Pid::from_raw(broker),
            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
        ) {
            Ok(WaitStatus::Exited(_, code)) => return exited(relay, format!("exit:{code}")),
            Ok(WaitStatus::Signaled(_, sig, _)) => {
                return exited(relay, format!("signal:{}", sig.as_str()))
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return exited(relay, format!("unknown ({e})")),
        }
        // The broker's exit is seen within this long (there is no signalfd in this mode).
        let (ready, relayed) = {
            let mut fds = Vec::new();
            if open {
                fds.push(PollFd::new(helper.channel().as_fd(), PollFlags::POLLIN));
            }
            let relay_base = fds.len();
            let ids: Vec<u64> = relay
                .fds()
                .map(|(id, fd)| {
                    fds.push(PollFd::new(fd, PollFlags::POLLIN));
                    id
                })
                .collect();
            if fds.is_empty() {
                let status = wait_for(broker);
                return exited(relay, status);
            }
            if !matches!(poll(&mut fds, PollTimeout::from(100u16)), Ok(n) if n > 0) {
                continue;
            }
            let ready = |i: usize| {
                fds.get(i)
                    .and_then(|f| f.revents())
                    .is_some_and(|r| !r.is_empty())
            };
            let relayed: Vec<u64> = ids
                .iter()
                .enumerate()
                .filter(|(i, _)| ready(relay_base + i))
                .map(|(_, id)| *id)
                .collect();
            (open && ready(0), relayed)
        };
        for id in relayed {
            if let Err(e) = relay.ready(id, &mut io::stderr()) {
                log::warn!("{e}");
            }
        }
        if !ready {
            continue;
        }
        match helper.recv() {
            Ok(BuilderToMaster::NeedUid { id }) => {
                let answer = uids.allocate(ctx.uid);
                if let Err(e) = helper.answer_uid(id, answer) {
                    log::warn!("{e}");
                }
            }
            Ok(BuilderToMaster::ReleaseUid { uid }) => uids.release(uid),
            Ok(BuilderToMaster::Audit { event, fields, .. }) => {
                let refs: Vec<(&str, &str)> = fields
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                ctx.audit.event_at(
                    Facility::Daemon,
                    Severity::Info,
                    client.conn_id,
                    client.uid,
                    &event,
                    &refs,
                );
            }
            Ok(other) => log::warn!("unexpected message from the builder-helper: {other:?}"),
            Err(e) => {
                log::warn!("builder-helper channel: {e}");
                open = false;
            }
        }
    }
}

/// Wait for a child; a description of how it ended.
fn wait_for(pid: i32) -> String {
    loop {
        match waitpid(Pid::from_raw(pid), None) {
            Ok(WaitStatus::Exited(_, code)) => return format!("exit:{code}"),
            Ok(WaitStatus::Signaled(_, sig, _)) => return format!("signal:{}", sig.as_str()),
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return format!("unknown ({e})"),
        }
    }
}
