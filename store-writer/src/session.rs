//! One broker channel, served on its own thread.
//!
//! As in OpenSSH's privilege-separation monitor, each connection is a small state machine
//! whose phase (`phase.rs`) decides, from a request's kind alone, whether it is handled,
//! refused for this client's trust, or ends the channel; that happens before the request is
//! decoded, within a size limit per kind (A68). A malformed message, a wrong descriptor count
//! or an unknown batch also ends the channel (logged and audited) without touching the store.
//! Identity and trust come only from the master's `NewClient` message, never from the broker.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stockade_common::ipc::msg::{ClientIdentity, BROKER_SPILL_MAX};
use stockade_common::ipc::writer::{
    BrokerToStoreWriter as Req, Notice, ReqKind, StoreRequest, StoreWriterToBroker as Reply,
};
use stockade_common::ipc::{self, Channel, Message};

use crate::add::{Batch, Ctx};
use crate::audit::Severity;
use crate::db::{DbError, StoreDb};
use crate::error::ReqError;
use crate::phase::{permitted, Phase, Verdict};
use crate::roots::TempRoots;
use crate::store::Store;
use crate::upload;

mod brokeraudit;
mod handlers;

/// How long a reply may wait for a broker that does not read its channel.
const SEND_TIMEOUT: Duration = Duration::from_secs(120);

/// Nix's log level for `printInfo`.
pub const LVL_INFO: u32 = 3;
/// Nix's log level for `printError`.
pub const LVL_ERROR: u32 = 0;

pub struct Session {
    store: Arc<Store>,
    client: ClientIdentity,
    chan: Channel,
    /// This thread's read connection, opened at the first query: brokers answer most queries
    /// themselves, so many sessions never need one.
    reader: std::cell::OnceCell<StoreDb>,
    roots: Arc<Mutex<TempRoots>>,
    hello: bool,
    batches: HashMap<u64, Batch>,
    /// Path locks of the last add, released once its reply has been sent.
    after_reply: std::cell::RefCell<Vec<crate::pathlocks::Pending>>,
    /// What the client tried to override, written as one line when the session ends.
    overrides: brokeraudit::Overrides,
}

/// Serves `chan` until the broker closes it or breaks the protocol.
pub fn serve(
    store: Arc<Store>,
    client: ClientIdentity,
    mut chan: Channel,
    roots: Arc<Mutex<TempRoots>>,
) {
    chan.enable_spill(BROKER_SPILL_MAX);
    if let Err(e) = chan.set_write_timeout(Some(SEND_TIMEOUT)) {
        log::warn!("conn {}: cannot set a send timeout: {e}", client.conn_id);
    }
    let mut s = Session {
        store,
        client,
        chan,
        reader: std::cell::OnceCell::new(),
        roots,
        hello: false,
        batches: HashMap::new(),
        after_reply: Default::default(),
        overrides: Default::default(),
    };
    s.run();
    s.release_locks();
    s.audit_overrides();
}

impl Session {
    /// The session's phase, from its state.
    fn phase(&self) -> Phase {
        if !self.hello {
            Phase::BeforeHello
        } else if !self.batches.is_empty() {
            Phase::InBatch
        } else {
            Phase::Ready
        }
    }

    fn run(&mut self) {
        loop {
            let phase = self.phase();
            let trusted = self.client.trusted;
            // The kind (first bytes) is checked against the phase before anything is decoded,
            // and decides how large the message may be (A68).
            let admit = |head: &[u8]| {
                if cfg!(feature = "without-a68") {
                    return Ok(BROKER_SPILL_MAX);
                }
                let kind = ReqKind::from_head(head).ok_or("unknown request")?;
                match permitted(phase, kind, trusted) {
                    Verdict::Violation(why) => Err(format!("{kind:?}: {why}")),
                    Verdict::Handle | Verdict::Refuse(_) => Ok(kind.max_bytes()),
                }
            };
            let (req, _) = match self.chan.recv_admitted::<Req>(admit) {
                Ok(m) => m,
                Err(ipc::Error::Closed) => return,
                Err(e) => return self.violation(&format!("bad message: {e}")),
            };
            // Decided again on what was decoded (a spilled payload is read twice).
            let sent = match permitted(phase, req.kind(), trusted) {
                Verdict::Violation(why) => return self.violation(why),
                Verdict::Refuse(denied) => {
                    let message = self.refuse(req.kind(), denied.0).to_string();
                    self.send(&Notice::Error { message })
                }
                Verdict::Handle => self.dispatch(req),
            };
            if sent.is_err() {
                return;
            }
        }
    }

    /// Runs `handle` on `req` and sends its reply, whose type is the one `R` names. `Err`
    /// ends the session (the broker is gone or broke the protocol).
    fn answer<R: StoreRequest>(
        &mut self,
        req: R,
        handle: impl FnOnce(&mut Self, R) -> Result<R::Reply, ReqError>,
    ) -> Result<(), ()> {
        let reply = match handle(self, req) {
            Ok(v) => Reply::Done(v),
            Err(ReqError::Failed(message)) => Reply::Error { message },
            Err(ReqError::Violation(why)) => {
                self.violation(&why);
                return Err(());
            }
        };
        self.send(&reply)
    }

    fn send<M: Message>(&mut self, reply: &M) -> Result<(), ()> {
        let sent = self.chan.send(reply, &[]).map_err(|e| {
            log::warn!(
                "conn {}: cannot reply to the broker: {e}",
                self.client.conn_id
            );
        });
        self.release_locks();
        sent
    }

    fn release_locks(&self) {
        for locks in self.after_reply.borrow_mut().drain(..) {
            locks.release(self.store.store_fd());
        }
    }

    fn violation(&mut self, why: &str) {
        log::warn!(
            "conn {}: closing the broker channel: {why}",
            self.client.conn_id
        );
        self.store.audit.client_event(
            Severity::Warning,
            &self.client,
            &[("op", "protocol"), ("outcome", "closed"), ("reason", why)],
        );
    }

    /// Runs a query on this thread's reader (or the shared connection when configured so).
    fn q<T>(&self, f: impl FnOnce(&StoreDb) -> Result<T, DbError>) -> Result<T, ReqError> {
        if self.store.shared_reads {
            return Ok(f(&self.store.db())?);
        }
        if self.reader.get().is_none() {
            let opened = self.store.reader().map_err(|e| {
                log::error!(
                    "conn {}: cannot open a database reader: {e}",
                    self.client.conn_id
                );
                e
            })?;
            // Only this thread touches the cell, so it is empty here.
            let _ = self.reader.set(opened);
        }
        match self.reader.get() {
            Some(r) => Ok(f(r)?),
            None => Err(ReqError::failed("no database reader")),
        }
    }

    fn ctx(&self) -> Ctx<'_> {
        Ctx {
            store: &self.store,
            client: &self.client,
            roots: &self.roots,
            after_reply: Some(&self.after_reply),
        }
    }

    /// Refuses a request this client's trust does not allow, audited.
    fn refuse(&self, kind: ReqKind, msg: &str) -> ReqError {
        let op = format!("{kind:?}");
        self.store.audit.client_event(
            Severity::Warning,
            &self.client,
            &[("op", &op), ("outcome", "refused"), ("reason", msg)],
        );
        ReqError::failed(msg)
    }

    /// Makes the pipe an upload's data comes through and hands the broker its write end
    /// (`Upload`); the read end stays here (A70).
    fn open_upload(&mut self) -> Result<OwnedFd, ReqError> {
        let (rx, tx) = upload::pipe()?;
        self.chan
            .send(&Notice::Upload, &[tx.as_fd()])
            .map_err(|e| ReqError::Violation(format!("cannot hand out an upload pipe: {e}")))?;
        Ok(rx)
    }
}
