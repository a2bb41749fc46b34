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

use stockade_common::ipc::msg::{
    BrokerToStoreWriter as Req, ClientIdentity, ReqKind, StoreWriterToBroker as Reply,
    BROKER_SPILL_MAX, QUERY_CHUNK, VERSION,
};
use stockade_common::ipc::{self, Channel};
use stockade_policy::ops::{op_allowed, Op};

use crate::add::{self, Batch, Ctx, MAX_BATCHES};
use crate::audit::Severity;
use crate::db::{DbError, StoreDb};
use crate::error::{hl, ReqError};
use crate::phase::{permitted, Phase, Verdict};
use crate::roots::{self, TempRoots};
use crate::store::Store;
use crate::{buildlog, upload, verify};

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
    };
    s.run();
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
            let reply = match permitted(phase, req.kind(), trusted) {
                Verdict::Violation(why) => return self.violation(why),
                Verdict::Refuse(denied) => Err(self.refuse(req.kind(), denied.0)),
                Verdict::Handle => self.dispatch(req),
            };
            let reply = match reply {
                Ok(r) => r,
                Err(ReqError::Failed(message)) => Reply::Error { message },
                Err(ReqError::Violation(why)) => return self.violation(&why),
            };
            if self.send(&reply).is_err() {
                return;
            }
        }
    }

    fn send(&mut self, reply: &Reply) -> Result<(), ()> {
        self.chan.send(reply, &[]).map_err(|e| {
            log::warn!(
                "conn {}: cannot reply to the broker: {e}",
                self.client.conn_id
            );
        })
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
            .send(&Reply::Upload, &[tx.as_fd()])
            .map_err(|e| ReqError::Violation(format!("cannot hand out an upload pipe: {e}")))?;
        Ok(rx)
    }

    fn dispatch(&mut self, req: Req) -> Result<Reply, ReqError> {
        match req {
            Req::Hello { version } if version == VERSION => {
                self.hello = true;
                Ok(Reply::Hello { version: VERSION })
            }
            Req::Hello { version } => Err(ReqError::Violation(format!(
                "unsupported message version {version}"
            ))),
            Req::IsValidPath { path } => Ok(Reply::Bool(self.q(|db| db.is_valid(&path))?)),
            Req::QueryValidPaths { paths } => {
                if paths.len() > QUERY_CHUNK {
                    return Err(ReqError::Violation(format!(
                        "{} paths in one query (at most {QUERY_CHUNK})",
                        paths.len()
                    )));
                }
                let valid = self.q(|db| db.query_valid_paths(&paths))?;
                Ok(Reply::Paths(valid))
            }
            Req::QueryPathInfo { path } => Ok(Reply::PathInfo(
                self.q(|db| db.query_path_info(&path))?.map(Box::new),
            )),
            Req::QueryReferrers { path } => Ok(Reply::Paths(
                self.q(|db| db.query_referrers(&path))?.into_iter().collect(),
            )),
            Req::QueryValidDerivers { path } => Ok(Reply::Paths(
                self.q(|db| db.query_valid_derivers(&path))?
                    .into_iter()
                    .collect(),
            )),
            Req::QueryDerivationOutputs { drv } => Ok(Reply::OutputMap(
                self.q(|db| db.query_derivation_outputs(&drv))?,
            )),
            Req::QueryPathFromHashPart { hash_part } => Ok(Reply::OptPath(
                self.q(|db| db.query_path_from_hash_part(&hash_part))?,
            )),
            Req::QueryAllValidPaths => Ok(Reply::Paths(
                self.q(|db| db.query_all_valid_paths())?.into_iter().collect(),
            )),
            Req::AddToStore {
                name,
                method,
                algo,
                references,
                repair,
            } => {
                let fd = self.open_upload()?;
                let info = add::add_to_store(&self.ctx(), &name, method, algo, references, repair, fd)?;
                Ok(Reply::PathInfo(Some(Box::new(info))))
            }
            Req::AddNar {
                info,
                repair,
                dont_check_sigs,
                batch,
            } => {
                match batch {
                    None => {
                        let fd = self.open_upload()?;
                        add::add_nar(&self.ctx(), *info, repair, dont_check_sigs, None, fd)?
                    }
                    Some(id) => {
                        if !self.batches.contains_key(&id) {
                            if self.batches.len() >= MAX_BATCHES {
                                return Err(ReqError::failed(format!(
                                    "too many open batches (at most {MAX_BATCHES})"
                                )));
                            }
                            self.batches.insert(id, Batch::new());
                        }
                        let mut batch = self
                            .batches
                            .remove(&id)
                            .ok_or_else(|| ReqError::Violation("batch vanished".into()))?;
                        if batch.failed() {
                            self.batches.insert(id, batch);
                            return Err(ReqError::failed(
                                "an earlier path of this batch failed to import",
                            ));
                        }
                        let res = self.open_upload().and_then(|fd| {
                            add::add_nar(
                                &self.ctx(),
                                *info,
                                repair,
                                dont_check_sigs,
                                Some(&mut batch),
                                fd,
                            )
                        });
                        if res.is_err() {
                            batch.fail();
                        }
                        self.batches.insert(id, batch);
                        res?;
                    }
                }
                Ok(Reply::Ok)
            }
            Req::CommitBatch { batch } => {
                let b = self
                    .batches
                    .remove(&batch)
                    .ok_or_else(|| ReqError::Violation(format!("commit of unknown batch {batch}")))?;
                b.commit(&self.ctx())?;
                Ok(Reply::Ok)
            }
            Req::AbortBatch { batch } => {
                self.batches
                    .remove(&batch)
                    .ok_or_else(|| ReqError::Violation(format!("abort of unknown batch {batch}")))?;
                Ok(Reply::Ok)
            }
            Req::AddTempRoot { path } => {
                let mut roots = self.roots.lock().unwrap_or_else(|e| e.into_inner());
                roots::add_temp_root(&self.store, &mut roots, &path)?;
                Ok(Reply::Ok)
            }
            Req::AddIndirectRoot { link } => {
                let link = roots::add_indirect_root(&self.store, &link)?;
                self.store.audit.client_event(
                    Severity::Info,
                    &self.client,
                    &[("op", "addIndirectRoot"), ("link", &link)],
                );
                Ok(Reply::Ok)
            }
            Req::AddPermRoot { path, link } => {
                let link = {
                    let mut roots = self.roots.lock().unwrap_or_else(|e| e.into_inner());
                    roots::add_perm_root(&self.store, &mut roots, &path, &link)?
                };
                self.store.audit.client_event(
                    Severity::Info,
                    &self.client,
                    &[
                        ("op", "addPermRoot"),
                        ("path", &self.store.full(&path)),
                        ("link", &link),
                    ],
                );
                Ok(Reply::Text(link))
            }
            Req::FindRoots => {
                let censor = !self.client.trusted;
                let found = {
                    let mut is_valid = |p: &stockade_common::store_path::StorePath| {
                        self.q(|db| db.is_valid(p)).unwrap_or(false)
                    };
                    roots::find_roots(&self.store, &mut is_valid, censor)
                };
                let mut out = Vec::new();
                for (path, links) in found {
                    for link in links {
                        out.push((link, path.clone()));
                    }
                }
                Ok(Reply::Roots(out))
            }
            Req::AddSignatures { path, sigs } => {
                for s in &sigs {
                    if s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
                        return Err(ReqError::failed(format!("invalid signature '{}'", hl(s))));
                    }
                }
                let set = sigs.iter().cloned().collect();
                self.store
                    .write("adding signatures", |db| db.add_signatures(&path, &set))?;
                let full = self.store.full(&path);
                self.store.audit.client_event(
                    Severity::Notice,
                    &self.client,
                    &[("op", "addSignatures"), ("path", &full), ("sigs", &sigs.join(" "))],
                );
                Ok(Reply::Ok)
            }
            Req::AddBuildLog { drv } => {
                let fd = self.open_upload()?;
                buildlog::add_build_log(&self.ctx(), &drv, fd)?;
                Ok(Reply::Ok)
            }
            Req::RegisterDrvOutput { .. } => Err(ReqError::failed(
                "experimental Nix feature 'ca-derivations' is disabled; use '--extra-experimental-features ca-derivations' to override",
            )),
            Req::QueryRealisation { .. } => Ok(Reply::OptText(None)),
            Req::VerifyStore {
                check_contents,
                repair,
            } => {
                if repair {
                    let op = Op::VerifyStore { repair };
                    if let Err(denied) = op_allowed(op, self.client.trusted) {
                        return Err(self.refuse(ReqKind::VerifyStore, denied.0));
                    }
                    return Err(self.refuse(ReqKind::VerifyStore, "repairing is not supported yet"));
                }
                let store = self.store.clone();
                let chan = &mut self.chan;
                let mut log = |level: u32, text: String| {
                    let _ = chan.send(&Reply::Log { level, text }, &[]);
                };
                let errors = verify::verify_store(&store, &self.client, check_contents, &mut log)?;
                Ok(Reply::Bool(errors))
            }
            // The enum is non_exhaustive across crates; every kind went through `permitted`.
            #[allow(unreachable_patterns)]
            _ => Err(ReqError::Violation("unsupported request".into())),
        }
    }
}
