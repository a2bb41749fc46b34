//! The helper's two shared links: to the master (its control channel, sending side; answers
//! routed to the build that asked, as the store-writer's gclink.rs does) and to the
//! store-writer (one request and its reply at a time, under a lock).

use std::collections::HashMap;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Mutex;
use std::time::Duration;

use serde::de::DeserializeOwned;
use stockade_common::ipc::builder::{BuilderToMaster, BuilderToStoreWriter, StoreWriterToBuilder};
use stockade_common::ipc::msg::{BROKER_SPILL_MAX, VERSION};
use stockade_common::ipc::Channel;

/// How long the master may take to answer `NeedUid`.
const UID_WAIT: Duration = Duration::from_secs(60);
/// How long one store-writer request may take (registering large outputs hashes them all).
const WRITER_WAIT: Duration = Duration::from_secs(3600);

/// A build uid and gid from the master, or why there is none.
pub type UidAnswer = Result<(u32, u32), String>;

pub struct MasterLink {
    send: Mutex<Channel>,
    pending: Mutex<HashMap<u64, SyncSender<UidAnswer>>>,
    next: AtomicU64,
    closed: AtomicBool,
}

impl MasterLink {
    pub fn new(send: Channel) -> MasterLink {
        MasterLink {
            send: Mutex::new(send),
            pending: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            closed: AtomicBool::new(false),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, SyncSender<UidAnswer>>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends a message that needs no answer; failures are logged (the master is going away).
    pub fn notify(&self, msg: &BuilderToMaster) {
        let sent = self
            .send
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(msg, &[]);
        if let Err(e) = sent {
            log::warn!("cannot tell the master {msg:?}: {e}");
        }
    }

    /// A build uid and gid nobody else uses now.
    pub fn need_uid(&self) -> UidAnswer {
        if self.closed.load(Ordering::SeqCst) {
            return Err("the daemon is shutting down".into());
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = sync_channel(1);
        self.pending().insert(id, tx);
        let sent = self
            .send
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(&BuilderToMaster::NeedUid { id }, &[]);
        let answer = match sent {
            Ok(()) => rx
                .recv_timeout(UID_WAIT)
                .unwrap_or_else(|_| Err("no build uid from the master".into())),
            Err(e) => Err(format!("cannot ask the master for a build uid: {e}")),
        };
        self.pending().remove(&id);
        answer
    }

    /// The control loop got the answer to `NeedUid { id }`.
    pub fn answer(&self, id: u64, answer: UidAnswer) {
        if let Some(tx) = self.pending().remove(&id) {
            let _ = tx.try_send(answer);
        } else if let Ok((uid, _)) = answer {
            // The asker gave up meanwhile: the uid goes back at once.
            self.notify(&BuilderToMaster::ReleaseUid { uid });
        }
    }

    /// No more answers will come: every waiting build fails now, later ones at once.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        for (_, tx) in self.pending().drain() {
            let _ = tx.try_send(Err("the daemon is shutting down".into()));
        }
    }
}

/// Why a store-writer request failed.
#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    /// The store-writer answered `Error`; its message is for the client.
    #[error("{0}")]
    Failed(String),
    #[error("the store-writer's channel: {0}")]
    Channel(#[from] stockade_common::ipc::Error),
    #[error("the store-writer answered {0} where a reply was due")]
    Unexpected(&'static str),
}

/// The channel to the store-writer, shared by every build thread. Replaced when the master
/// starts a new store-writer on a replaced store; a request about a build begun with the old
/// one fails here, never reaching a store-writer that does not know the build.
pub struct WriterLink {
    chan: Mutex<WriterChan>,
}

struct WriterChan {
    chan: Channel,
    generation: u64,
    /// Each open build's generation (from its `BeginBuild` to its `EndBuild`).
    builds: HashMap<u64, u64>,
    hello: bool,
    /// A request failed half-way: replies could be out of step with requests from now on.
    broken: bool,
}

impl WriterLink {
    /// Spilling as on brokers' channels to the store-writer (a closure can be large).
    pub fn new(fd: OwnedFd) -> Result<WriterLink, stockade_common::ipc::Error> {
        Ok(WriterLink {
            chan: Mutex::new(WriterChan {
                chan: open_channel(fd)?,
                generation: 0,
                builds: HashMap::new(),
                hello: false,
                broken: false,
            }),
        })
    }

    /// A channel to a new store-writer takes the place of the old one.
    pub fn replace(&self, fd: OwnedFd) -> Result<(), stockade_common::ipc::Error> {
        let chan = open_channel(fd)?;
        let mut w = self.chan.lock().unwrap_or_else(|e| e.into_inner());
        w.chan = chan;
        w.generation += 1;
        w.hello = false;
        w.broken = false;
        Ok(())
    }

    /// Sends `req` (with its descriptor) and returns the reply; the first request is preceded
    /// by the `Hello` exchange.
    pub fn request<T: DeserializeOwned>(
        &self,
        req: &BuilderToStoreWriter,
        fds: &[BorrowedFd<'_>],
    ) -> Result<T, WriterError> {
        let mut guard = self.chan.lock().unwrap_or_else(|e| e.into_inner());
        let w = &mut *guard;
        let current = w.generation;
        match req {
            BuilderToStoreWriter::BeginBuild { build, .. } => {
                w.builds.insert(*build, current);
            }
            BuilderToStoreWriter::RegisterOutputs { build, .. }
            | BuilderToStoreWriter::StoreBuildLog { build }
            | BuilderToStoreWriter::EndBuild { build } => {
                let begun = if matches!(req, BuilderToStoreWriter::EndBuild { .. }) {
                    w.builds.remove(build)
                } else {
                    w.builds.get(build).copied()
                };
                if begun != Some(current) {
                    return Err(WriterError::Failed(
                        "the store was replaced while the build ran".into(),
                    ));
                }
            }
            _ => {}
        }
        if w.broken {
            return Err(WriterError::Failed(
                "the channel to the store-writer is broken".into(),
            ));
        }
        let result = (|| {
            if !w.hello {
                let version: u32 = exchange(
                    &mut w.chan,
                    &BuilderToStoreWriter::Hello { version: VERSION },
                    &[],
                )?;
                if version != VERSION {
                    return Err(WriterError::Failed(format!(
                        "the store-writer speaks message version {version}, we speak {VERSION}"
                    )));
                }
                w.hello = true;
            }
            exchange(&mut w.chan, req, fds)
        })();
        if let (BuilderToStoreWriter::BeginBuild { build, .. }, Err(_)) = (req, &result) {
            w.builds.remove(build);
        }
        if matches!(
            result,
            Err(WriterError::Channel(_) | WriterError::Unexpected(_))
        ) {
            w.broken = true;
        }
        result
    }
}

fn open_channel(fd: OwnedFd) -> Result<Channel, stockade_common::ipc::Error> {
    let mut chan = Channel::from_fd(fd)?;
    chan.enable_spill(BROKER_SPILL_MAX);
    chan.set_read_timeout(Some(WRITER_WAIT))?;
    chan.set_write_timeout(Some(WRITER_WAIT))?;
    Ok(chan)
}

fn exchange<T: DeserializeOwned>(
    chan: &mut Channel,
    req: &BuilderToStoreWriter,
    fds: &[BorrowedFd<'_>],
) -> Result<T, WriterError> {
    chan.send(req, fds)?;
    loop {
        let (reply, _fds) = chan.recv_value::<StoreWriterToBuilder<T>>(1)?;
        match reply {
            StoreWriterToBuilder::Log { text, .. } => log::info!("store-writer: {text}"),
            StoreWriterToBuilder::Error { message } => return Err(WriterError::Failed(message)),
            StoreWriterToBuilder::Upload => return Err(WriterError::Unexpected("Upload")),
            StoreWriterToBuilder::Done(v) => return Ok(v),
        }
    }
}
