//! The broker's end of its build channel to the builder-helper (`common::ipc::builder`): the
//! `Hello` exchange at first use, then `Build` and `Cancel` out and the helper's reports in.
//! While it waits for the helper it also watches the client's socket, so a client that hangs
//! up mid-build ends the broker (and with it the channel, which stops the builds).

use std::os::fd::{AsFd, BorrowedFd};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use stockade_common::ipc::builder::{BrokerToBuilder, BuilderToBroker};
use stockade_common::ipc::{self, Channel};

use crate::error::OpError;

/// Why the channel cannot be used.
#[derive(Debug)]
pub enum BuilderError {
    /// No helper at the other end (none runs, or it exited).
    Unavailable,
    /// The client hung up while the broker waited.
    ClientGone,
    /// The helper broke the protocol, or the channel failed.
    Broken(String),
}

impl From<BuilderError> for OpError {
    fn from(e: BuilderError) -> OpError {
        match e {
            BuilderError::Unavailable => {
                OpError::client("building is not supported by this daemon yet")
            }
            BuilderError::ClientGone => OpError::fatal("the client hung up during a build"),
            BuilderError::Broken(m) => OpError::fatal(format!("builder-helper: {m}")),
        }
    }
}

fn channel_error(e: ipc::Error) -> BuilderError {
    match e {
        ipc::Error::Closed
        | ipc::Error::Sys(nix::errno::Errno::EPIPE | nix::errno::Errno::ECONNRESET) => {
            BuilderError::Unavailable
        }
        e => BuilderError::Broken(e.to_string()),
    }
}

pub struct Builder {
    ch: Option<Channel>,
    greeted: bool,
    next: u64,
}

impl Builder {
    /// `None`: this broker has no build channel at all.
    pub fn new(ch: Option<Channel>) -> Builder {
        Builder {
            ch,
            greeted: false,
            next: 0,
        }
    }

    /// A build id not used before on this channel.
    pub fn next_id(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    fn channel(&mut self) -> Result<&mut Channel, BuilderError> {
        self.ch.as_mut().ok_or(BuilderError::Unavailable)
    }

    /// Greets the helper once; a closed channel means there is none.
    pub fn ready(&mut self) -> Result<(), BuilderError> {
        if self.greeted {
            return Ok(());
        }
        let version = ipc::msg::VERSION;
        let res = self.exchange_hello(version);
        if matches!(res, Err(BuilderError::Unavailable)) {
            // Forget it: every later build fails the same way without a system call.
            self.ch = None;
        }
        res?;
        self.greeted = true;
        Ok(())
    }

    fn exchange_hello(&mut self, version: u32) -> Result<(), BuilderError> {
        let ch = self.channel()?;
        ch.send(&BrokerToBuilder::Hello { version }, &[])
            .map_err(channel_error)?;
        match next(ch)? {
            BuilderToBroker::Hello { version: v } if v == version => Ok(()),
            BuilderToBroker::Hello { version: v } => Err(BuilderError::Broken(format!(
                "speaks message version {v}, the broker {version}"
            ))),
            other => Err(BuilderError::Broken(format!(
                "answered Hello with {other:?}"
            ))),
        }
    }

    pub fn send(&mut self, msg: &BrokerToBuilder) -> Result<(), BuilderError> {
        self.ready()?;
        self.channel()?.send(msg, &[]).map_err(channel_error)
    }

    /// The helper's next message; fails with `ClientGone` when `client` hangs up first.
    pub fn recv(
        &mut self,
        client: Option<BorrowedFd<'_>>,
    ) -> Result<BuilderToBroker, BuilderError> {
        let ch = self.channel()?;
        loop {
            if let Some(client) = client {
                wait_for(ch.as_fd(), client)?;
            }
            match one(ch)? {
                Some(BuilderToBroker::Error { message }) => {
                    return Err(BuilderError::Broken(message))
                }
                Some(msg) => return Ok(msg),
                None => continue,
            }
        }
    }
}

/// The helper's next message; `None` for a `Budget`, settled here: the helper sends it once
/// its move of this broker into a cgroup is done, before or after any other answer.
fn one(ch: &mut Channel) -> Result<Option<BuilderToBroker>, BuilderError> {
    match ch.recv::<BuilderToBroker>().map_err(channel_error)?.0 {
        BuilderToBroker::Budget { memory, pids } => {
            crate::budget::settle(memory, pids)
                .map_err(|e| BuilderError::Broken(format!("settling the budget: {e}")))?;
            Ok(None)
        }
        msg => Ok(Some(msg)),
    }
}

/// The helper's next message but `Budget`s ([`one`]).
fn next(ch: &mut Channel) -> Result<BuilderToBroker, BuilderError> {
    loop {
        if let Some(msg) = one(ch)? {
            return Ok(msg);
        }
    }
}

/// Blocks until the channel has a message, or the client hung up. Data from the client (a
/// pipelined request) is left for after the build.
fn wait_for(ch: BorrowedFd<'_>, client: BorrowedFd<'_>) -> Result<(), BuilderError> {
    let mut watch_client = true;
    loop {
        let mut fds = vec![PollFd::new(ch, PollFlags::POLLIN)];
        if watch_client {
            fds.push(PollFd::new(client, PollFlags::empty()));
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(BuilderError::Broken(format!("poll: {e}"))),
        }
        let ready = |fd: &PollFd<'_>| fd.revents().unwrap_or(PollFlags::empty());
        let hangup = PollFlags::POLLHUP | PollFlags::POLLERR;
        if let Some(c) = fds.get(1) {
            if ready(c).intersects(hangup) {
                return Err(BuilderError::ClientGone);
            }
            if ready(c).contains(PollFlags::POLLNVAL) {
                watch_client = false;
            }
        }
        if fds.first().is_some_and(|f| !ready(f).is_empty()) {
            return Ok(());
        }
    }
}
