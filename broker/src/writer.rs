//! The broker's side of its channel to the store-writer: one request, then log messages and
//! exactly one final reply.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::BorrowedFd;

use stockade_common::ipc::msg::{
    BrokerToStoreWriter as Req, StoreWriterToBroker as Rep, BROKER_SPILL_MAX, QUERY_CHUNK,
};
use stockade_common::ipc::Channel;
use stockade_common::narinfo::PathInfo;
use stockade_common::store_path::StorePath;

use crate::error::{OpError, OpResult};

pub struct Writer {
    ch: Channel,
}

/// Receives the store-writer's log lines while a request runs.
pub type LogSink<'a> = &'a mut dyn FnMut(u32, String);

impl Writer {
    pub fn new(mut ch: Channel) -> Writer {
        ch.enable_spill(BROKER_SPILL_MAX);
        Writer { ch }
    }

    /// The channel opens with an exchange of `Hello`s carrying the message-set version.
    pub fn hello(&mut self) -> OpResult<()> {
        let version = stockade_common::ipc::msg::VERSION;
        match self.call(&Req::Hello { version })? {
            Rep::Hello { version: v } if v == version => Ok(()),
            other => Err(OpError::fatal(format!(
                "store-writer speaks another message version: {other:?}"
            ))),
        }
    }

    /// Sends a request without waiting (for uploads, whose data follows in the pipe).
    pub fn send(&mut self, req: &Req, fds: &[BorrowedFd<'_>]) -> OpResult<()> {
        self.ch.send(req, fds)?;
        Ok(())
    }

    /// Waits for the final reply to a request sent with [`send`](Self::send); log messages
    /// that arrive meanwhile are dropped (uploads do not log).
    pub fn recv_reply(&mut self) -> OpResult<Rep> {
        loop {
            let (rep, _) = self.ch.recv::<Rep>()?;
            match rep {
                Rep::Log { .. } => continue,
                Rep::Error { message } => return Err(OpError::client(message)),
                other => return Ok(other),
            }
        }
    }

    /// Sends `req` and waits for its final reply, passing log messages to `log`.
    pub fn call_logged(
        &mut self,
        req: &Req,
        fds: &[BorrowedFd<'_>],
        log: LogSink<'_>,
    ) -> OpResult<Rep> {
        self.ch.send(req, fds)?;
        loop {
            let (rep, _) = self.ch.recv::<Rep>()?;
            match rep {
                Rep::Log { level, text } => log(level, text),
                Rep::Error { message } => return Err(OpError::client(message)),
                other => return Ok(other),
            }
        }
    }

    pub fn call(&mut self, req: &Req) -> OpResult<Rep> {
        self.call_logged(req, &[], &mut |_, _| {})
    }

    pub fn expect_ok(&mut self, req: &Req) -> OpResult<()> {
        match self.call(req)? {
            Rep::Ok => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    pub fn is_valid(&mut self, path: &StorePath) -> OpResult<bool> {
        match self.call(&Req::IsValidPath { path: path.clone() })? {
            Rep::Bool(b) => Ok(b),
            other => Err(unexpected(&other)),
        }
    }

    /// The valid subset of `paths`, asked in chunks so no message grows with the request.
    pub fn query_valid(&mut self, paths: &BTreeSet<StorePath>) -> OpResult<BTreeSet<StorePath>> {
        let all: Vec<StorePath> = paths.iter().cloned().collect();
        let mut out = BTreeSet::new();
        for chunk in all.chunks(QUERY_CHUNK) {
            match self.call(&Req::QueryValidPaths {
                paths: chunk.to_vec(),
            })? {
                Rep::Paths(v) => out.extend(v),
                other => return Err(unexpected(&other)),
            }
        }
        Ok(out)
    }

    pub fn path_info(&mut self, path: &StorePath) -> OpResult<Option<PathInfo>> {
        match self.call(&Req::QueryPathInfo { path: path.clone() })? {
            Rep::PathInfo(i) => Ok(i.map(|b| *b)),
            other => Err(unexpected(&other)),
        }
    }

    pub fn paths(&mut self, req: &Req) -> OpResult<BTreeSet<StorePath>> {
        match self.call(req)? {
            Rep::Paths(v) => Ok(v.into_iter().collect()),
            other => Err(unexpected(&other)),
        }
    }

    pub fn output_map(&mut self, drv: &StorePath) -> OpResult<BTreeMap<String, StorePath>> {
        match self.call(&Req::QueryDerivationOutputs { drv: drv.clone() })? {
            Rep::OutputMap(m) => Ok(m),
            other => Err(unexpected(&other)),
        }
    }
}

pub fn unexpected(rep: &Rep) -> OpError {
    OpError::fatal(format!("unexpected reply from the store-writer: {rep:?}"))
}
