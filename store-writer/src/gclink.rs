//! Reaching a running Nix garbage collector (A70). While a collector runs it holds the GC lock
//! and reads new temp roots from its `gc-socket`; a root written only to our temproots file
//! then would be missed and the path collected. After its lockdown the store-writer may not
//! make sockets, so it asks the master over the control channel for a connected one. Session
//! threads share the sending side; the control loop routes each answer to its asker. The same
//! sending side carries notices that need no answer (a database held by a broker, A69).

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Mutex;
use std::time::Duration;

use stockade_common::ipc::msg::StoreWriterToMaster;
use stockade_common::ipc::Channel;

/// How long an answer from the master may take.
const ANSWER_WAIT: Duration = Duration::from_secs(10);

type Answer = Result<OwnedFd, String>;

pub struct GcLink {
    /// A second handle on the control channel, for sending only.
    send: Mutex<Channel>,
    pending: Mutex<HashMap<u64, SyncSender<Answer>>>,
    next: AtomicU64,
}

impl GcLink {
    pub fn new(send: Channel) -> GcLink {
        GcLink {
            send: Mutex::new(send),
            pending: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
        }
    }

    /// A connection to the running collector's socket, made by the master.
    pub fn connect(&self) -> io::Result<UnixStream> {
        let fd = self.ask(|id| StoreWriterToMaster::ConnectGcSocket { id })?;
        Ok(UnixStream::from(fd))
    }

    /// A new unbound unix stream socket from the master, for our own collector to bind.
    pub fn new_socket(&self) -> io::Result<OwnedFd> {
        self.ask(|id| StoreWriterToMaster::ListenGcSocket { id })
    }

    /// Sends the request `msg(id)` and waits for the descriptor answered to `id`.
    fn ask(&self, msg: impl FnOnce(u64) -> StoreWriterToMaster) -> io::Result<OwnedFd> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = sync_channel(1);
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        let sent = self
            .send
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(&msg(id), &[]);
        let answer = match sent {
            Ok(()) => rx
                .recv_timeout(ANSWER_WAIT)
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer from the master")),
            Err(e) => Err(io::Error::other(e.to_string())),
        };
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        answer?.map_err(|why| io::Error::new(io::ErrorKind::ConnectionRefused, why))
    }

    /// Tells the master something that needs no answer.
    pub fn notify(&self, msg: &StoreWriterToMaster) {
        let sent = self
            .send
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(msg, &[]);
        if let Err(e) = sent {
            log::warn!("cannot tell the master {msg:?}: {e}");
        }
    }

    /// The control loop got the master's answer `id`.
    pub fn answer(&self, id: u64, answer: Answer) {
        let asker = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        if let Some(tx) = asker {
            let _ = tx.try_send(answer);
        }
    }
}
