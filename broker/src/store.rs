//! The broker's view of the store. Queries are answered from the broker's own read-only
//! connection to the database when it has one (no round trip to another process per query);
//! everything else, and every query when the database could not be opened, goes over the
//! channel to the store-writer: one request, then log messages and exactly one final reply.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::fd::OwnedFd;

use stockade_common::db::{DbError, StoreDb};
use stockade_common::ipc::msg::{BROKER_SPILL_MAX, QUERY_CHUNK};
use stockade_common::ipc::writer::{self as w, StoreRequest, StoreWriterToBroker as Rep, Upload};
use stockade_common::ipc::Channel;
use stockade_common::narinfo::PathInfo;
use stockade_common::store_path::StorePath;

use crate::error::{OpError, OpResult};

pub struct Store {
    ch: Channel,
    /// The read-only database connection, if the broker could open one before its lockdown.
    db: Option<StoreDb>,
}

/// Receives the store-writer's log lines while a request runs.
pub type LogSink<'a> = &'a mut dyn FnMut(u32, String);

impl Store {
    pub fn new(mut ch: Channel, db: Option<StoreDb>) -> Store {
        ch.enable_spill(BROKER_SPILL_MAX);
        Store { ch, db }
    }

    /// Runs `f` on the local read connection. `None` when there is none, or when SQLite itself
    /// failed (a store whose WAL index this uid cannot use, say): then the local connection
    /// is given up and this and later queries go to the store-writer.
    fn local<T>(&mut self, f: impl FnOnce(&StoreDb) -> Result<T, DbError>) -> Option<OpResult<T>> {
        let db = self.db.as_ref()?;
        match f(db) {
            Ok(v) => Some(Ok(v)),
            Err(DbError::Sqlite(e)) => {
                log::warn!("reading the database directly failed ({e}); asking the store-writer from now on");
                self.db = None;
                None
            }
            Err(e) => Some(Err(OpError::client(e.client_message()))),
        }
    }

    /// The channel opens with an exchange of `Hello`s carrying the message-set version.
    pub fn hello(&mut self) -> OpResult<()> {
        let version = stockade_common::ipc::msg::VERSION;
        match self.call(w::Hello { version })? {
            v if v == version => Ok(()),
            v => Err(OpError::fatal(format!(
                "store-writer speaks another message version: {v}"
            ))),
        }
    }

    /// Waits for the store-writer's answer to an upload request: the write end of the pipe it
    /// reads the data from (A70), or the refusal it answered with at once.
    fn recv_upload<R: StoreRequest>(&mut self) -> OpResult<Result<OwnedFd, OpError>> {
        loop {
            let (rep, mut fds) = self.ch.recv::<Rep<R::Reply>>()?;
            match rep {
                Rep::Log { .. } => continue,
                Rep::Upload => {
                    return fds
                        .pop()
                        .map(Ok)
                        .ok_or_else(|| OpError::fatal("upload pipe missing"))
                }
                Rep::Error { message } => return Ok(Err(OpError::client(message))),
                Rep::Done(_) => return Err(OpError::fatal("upload answered without a pipe")),
            }
        }
    }

    /// Waits for the final reply to `R`, passing log messages to `log`.
    fn recv_reply<R: StoreRequest>(&mut self, log: LogSink<'_>) -> OpResult<R::Reply> {
        loop {
            let (rep, _) = self.ch.recv::<Rep<R::Reply>>()?;
            match rep {
                Rep::Log { level, text } => log(level, text),
                Rep::Error { message } => return Err(OpError::client(message)),
                Rep::Done(v) => return Ok(v),
                Rep::Upload => {
                    return Err(OpError::fatal("a pipe offered for a request without data"))
                }
            }
        }
    }

    /// Sends `req` and waits for its reply, passing log messages to `log`.
    pub fn call_logged<R: StoreRequest>(&mut self, req: R, log: LogSink<'_>) -> OpResult<R::Reply> {
        // Brokers hand the store-writer no descriptors (A70).
        self.ch.send(&req.into(), &[])?;
        self.recv_reply::<R>(log)
    }

    /// Hands an audit event to the store-writer, which writes it under this connection's
    /// identity (brokers hold no syslog socket, A74). A failure only loses the line: the
    /// channel's own failure ends the session at its next request anyway.
    pub fn audit(&mut self, event: stockade_common::ipc::writer::BrokerEvent) {
        if let Err(e) = self.call(stockade_common::ipc::writer::Audit { event }) {
            log::warn!("an audit event was not written: {}", e.message);
        }
    }

    pub fn call<R: StoreRequest>(&mut self, req: R) -> OpResult<R::Reply> {
        self.call_logged(req, &mut |_, _| {})
    }

    pub fn is_valid(&mut self, path: &StorePath) -> OpResult<bool> {
        if let Some(r) = self.local(|db| db.is_valid(path)) {
            return r;
        }
        self.call(w::IsValidPath { path: path.clone() })
    }

    /// The valid subset of `paths`, asked in chunks so no message grows with the request.
    pub fn query_valid(&mut self, paths: &BTreeSet<StorePath>) -> OpResult<BTreeSet<StorePath>> {
        if let Some(r) = self.local(|db| db.query_valid_paths(paths)) {
            return r.map(|v| v.into_iter().collect());
        }
        let all: Vec<StorePath> = paths.iter().cloned().collect();
        let mut out = BTreeSet::new();
        for chunk in all.chunks(QUERY_CHUNK) {
            out.extend(self.call(w::QueryValidPaths {
                paths: chunk.to_vec(),
            })?);
        }
        Ok(out)
    }

    pub fn path_info(&mut self, path: &StorePath) -> OpResult<Option<PathInfo>> {
        if let Some(r) = self.local(|db| db.query_path_info(path)) {
            return r;
        }
        self.call(w::QueryPathInfo { path: path.clone() })
    }

    pub fn referrers(&mut self, path: &StorePath) -> OpResult<BTreeSet<StorePath>> {
        if let Some(r) = self.local(|db| db.query_referrers(path)) {
            return r;
        }
        Ok(self
            .call(w::QueryReferrers { path: path.clone() })?
            .into_iter()
            .collect())
    }

    pub fn valid_derivers(&mut self, path: &StorePath) -> OpResult<BTreeSet<StorePath>> {
        if let Some(r) = self.local(|db| db.query_valid_derivers(path)) {
            return r;
        }
        Ok(self
            .call(w::QueryValidDerivers { path: path.clone() })?
            .into_iter()
            .collect())
    }

    pub fn all_valid(&mut self) -> OpResult<BTreeSet<StorePath>> {
        if let Some(r) = self.local(|db| db.query_all_valid_paths()) {
            return r;
        }
        Ok(self.call(w::QueryAllValidPaths {})?.into_iter().collect())
    }

    pub fn path_from_hash_part(&mut self, hash_part: &str) -> OpResult<Option<StorePath>> {
        if let Some(r) = self.local(|db| db.query_path_from_hash_part(hash_part)) {
            return r;
        }
        self.call(w::QueryPathFromHashPart {
            hash_part: hash_part.to_string(),
        })
    }

    pub fn output_map(&mut self, drv: &StorePath) -> OpResult<BTreeMap<String, StorePath>> {
        if let Some(r) = self.local(|db| db.query_derivation_outputs(drv)) {
            return r;
        }
        self.call(w::QueryDerivationOutputs { drv: drv.clone() })
    }
}

/// Where an upload's data goes: the store-writer's pipe, or nowhere when it refused the request
/// at once. Writes to a refused upload fail, as writes to a pipe the store-writer stopped
/// reading do, so callers keep reading their client's stream to its end either way.
pub enum UploadTx {
    Pipe(BufWriter<File>),
    Refused,
}

impl Write for UploadTx {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            UploadTx::Pipe(w) => w.write(buf),
            UploadTx::Refused => Err(io::ErrorKind::BrokenPipe.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            UploadTx::Pipe(w) => w.flush(),
            UploadTx::Refused => Ok(()),
        }
    }
}

/// An upload of request `R` under way: the request went out, the data goes into `tx`, then
/// the reply comes.
pub struct Uploading<R> {
    pub tx: UploadTx,
    refused: Option<OpError>,
    req: std::marker::PhantomData<R>,
}

impl Store {
    /// Sends an upload request and gets the pipe for its data (A70: the store-writer makes it).
    pub fn start_upload<R: Upload>(&mut self, req: R) -> OpResult<Uploading<R>> {
        self.ch.send(&req.into(), &[])?;
        let (tx, refused) = match self.recv_upload::<R>()? {
            Ok(fd) => (
                UploadTx::Pipe(BufWriter::with_capacity(64 * 1024, File::from(fd))),
                None,
            ),
            Err(e) => (UploadTx::Refused, Some(e)),
        };
        Ok(Uploading {
            tx,
            refused,
            req: std::marker::PhantomData,
        })
    }

    /// Ends the data (EOF for the store-writer) and waits for the final reply. A failed flush
    /// means the store-writer stopped reading; its reply says why. Uploads do not log.
    pub fn finish_upload<R: Upload>(&mut self, up: Uploading<R>) -> OpResult<R::Reply> {
        if let Some(e) = up.refused {
            return Err(e);
        }
        let mut tx = up.tx;
        let _ = tx.flush();
        drop(tx);
        self.recv_reply::<R>(&mut |_, _| {})
    }

    /// Gives an upload up (the client's data was bad): the store-writer sees a short stream,
    /// and its reply is read and dropped.
    pub fn abandon_upload<R: Upload>(&mut self, up: Uploading<R>) {
        if up.refused.is_none() {
            drop(up.tx);
            let _ = self.recv_reply::<R>(&mut |_, _| {});
        }
    }
}
