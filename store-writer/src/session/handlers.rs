//! One handler per request, each returning the reply type its request names
//! (`StoreRequest::Reply`), so a request cannot be answered with another's reply.

use stockade_common::ipc::msg::{QUERY_CHUNK, VERSION};
use stockade_common::ipc::writer::{self as w, BrokerToStoreWriter as Req, Notice, ReqKind};
use stockade_common::narinfo::PathInfo;
use stockade_common::store_path::StorePath;
use stockade_policy::ops::{op_allowed, Op};

use super::Session;
use crate::add::{self, Batch, MAX_BATCHES};
use crate::audit::Severity;
use crate::error::{hl, ReqError};
use crate::upload::Upload;
use crate::{buildlog, gc, optimise, roots, verify};

type Res<T> = Result<T, ReqError>;

impl Session {
    /// Hands `req` to its handler and sends the reply. `Err` ends the session.
    pub(super) fn dispatch(&mut self, req: Req) -> Result<(), ()> {
        match req {
            Req::Hello(r) => self.answer(r, Self::hello),
            Req::IsValidPath(r) => self.answer(r, |s, r| s.q(|db| db.is_valid(&r.path))),
            Req::QueryValidPaths(r) => self.answer(r, Self::query_valid_paths),
            Req::QueryPathInfo(r) => self.answer(r, |s, r| s.q(|db| db.query_path_info(&r.path))),
            Req::QueryReferrers(r) => self.answer(r, |s, r| {
                Ok(s.q(|db| db.query_referrers(&r.path))?.into_iter().collect())
            }),
            Req::QueryValidDerivers(r) => self.answer(r, |s, r| {
                Ok(s.q(|db| db.query_valid_derivers(&r.path))?
                    .into_iter()
                    .collect())
            }),
            Req::QueryDerivationOutputs(r) => {
                self.answer(r, |s, r| s.q(|db| db.query_derivation_outputs(&r.drv)))
            }
            Req::QueryPathFromHashPart(r) => {
                self.answer(r, |s, r| s.q(|db| db.query_path_from_hash_part(&r.hash_part)))
            }
            Req::QueryAllValidPaths(r) => self.answer(r, |s, _| {
                Ok(s.q(|db| db.query_all_valid_paths())?.into_iter().collect())
            }),
            Req::AddToStore(r) => self.answer(r, Self::add_to_store),
            Req::AddToStoreInline(r) => self.answer(r, Self::add_to_store_inline),
            Req::AddNar(r) => self.answer(r, Self::add_nar),
            Req::CommitBatch(r) => self.answer(r, Self::commit_batch),
            Req::AbortBatch(r) => self.answer(r, Self::abort_batch),
            Req::AddTempRoot(r) => self.answer(r, |s, r| {
                let mut roots = s.roots.lock().unwrap_or_else(|e| e.into_inner());
                let res = roots::add_temp_root(&s.store, &mut roots, &r.path);
                if let Err(roots::RootError::Budget(hit)) = &res {
                    roots::audit_budget(&s.store, &s.client, hit);
                }
                Ok(res?)
            }),
            Req::AddIndirectRoot(r) => self.answer(r, Self::add_indirect_root),
            Req::AddPermRoot(r) => self.answer(r, Self::add_perm_root),
            Req::FindRoots(r) => self.answer(r, Self::find_roots),
            Req::AddSignatures(r) => self.answer(r, Self::add_signatures),
            Req::AddBuildLog(r) => self.answer(r, |s, r| {
                let fd = s.open_upload()?;
                buildlog::add_build_log(&s.ctx(), &r.drv, fd)
            }),
            Req::RegisterDrvOutput(r) => self.answer(r, |_, _| {
                Err(ReqError::failed(
                    "experimental Nix feature 'ca-derivations' is disabled; use '--extra-experimental-features ca-derivations' to override",
                ))
            }),
            Req::QueryRealisation(r) => self.answer(r, |_, _| Ok(None)),
            Req::VerifyStore(r) => self.answer(r, Self::verify_store),
            Req::Audit(r) => self.answer(r, |s, r| s.broker_event(r.event)),
            Req::CollectGarbage(r) => self.answer(r, Self::collect_garbage),
            Req::OptimiseStore(r) => self.answer(r, Self::optimise_store),
            // The enum is non_exhaustive across crates; every kind went through `permitted`.
            #[allow(unreachable_patterns)]
            _ => {
                self.violation("unsupported request");
                Err(())
            }
        }
    }

    fn hello(&mut self, r: w::Hello) -> Res<u32> {
        if r.version != VERSION {
            return Err(ReqError::Violation(format!(
                "unsupported message version {}",
                r.version
            )));
        }
        self.hello = true;
        Ok(VERSION)
    }

    fn query_valid_paths(&mut self, r: w::QueryValidPaths) -> Res<Vec<StorePath>> {
        if r.paths.len() > QUERY_CHUNK {
            return Err(ReqError::Violation(format!(
                "{} paths in one query (at most {QUERY_CHUNK})",
                r.paths.len()
            )));
        }
        self.q(|db| db.query_valid_paths(&r.paths))
    }

    fn add_to_store(&mut self, r: w::AddToStore) -> Res<PathInfo> {
        let fd = self.open_upload()?;
        add::add_to_store(
            &self.ctx(),
            &r.name,
            r.method,
            r.algo,
            r.references,
            r.repair,
            Upload::new(fd),
        )
    }

    /// The same add with the data already here: its size was bounded by the request kind's
    /// limit before it was decoded (A68).
    fn add_to_store_inline(&mut self, r: w::AddToStoreInline) -> Res<PathInfo> {
        add::add_to_store(
            &self.ctx(),
            &r.name,
            r.method,
            r.algo,
            r.references,
            r.repair,
            r.data.0.as_slice(),
        )
    }

    fn add_nar(&mut self, r: w::AddNar) -> Res<()> {
        let Some(id) = r.batch else {
            let fd = self.open_upload()?;
            return add::add_nar(&self.ctx(), *r.info, r.repair, r.dont_check_sigs, None, fd);
        };
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
                *r.info,
                r.repair,
                r.dont_check_sigs,
                Some(&mut batch),
                fd,
            )
        });
        if res.is_err() {
            batch.fail();
        }
        self.batches.insert(id, batch);
        res
    }

    fn commit_batch(&mut self, r: w::CommitBatch) -> Res<()> {
        let b = self
            .batches
            .remove(&r.batch)
            .ok_or_else(|| ReqError::Violation(format!("commit of unknown batch {}", r.batch)))?;
        b.commit(&self.ctx())
    }

    fn abort_batch(&mut self, r: w::AbortBatch) -> Res<()> {
        self.batches
            .remove(&r.batch)
            .ok_or_else(|| ReqError::Violation(format!("abort of unknown batch {}", r.batch)))?;
        Ok(())
    }

    fn add_indirect_root(&mut self, r: w::AddIndirectRoot) -> Res<()> {
        let link = roots::add_indirect_root(&self.store, &r.link)?;
        self.store.audit.client_event(
            Severity::Info,
            &self.client,
            &[("op", "addIndirectRoot"), ("link", &link)],
        );
        Ok(())
    }

    fn add_perm_root(&mut self, r: w::AddPermRoot) -> Res<String> {
        let link = {
            let mut roots = self.roots.lock().unwrap_or_else(|e| e.into_inner());
            roots::add_perm_root(&self.store, &mut roots, &r.path, &r.link)?
        };
        self.store.audit.client_event(
            Severity::Info,
            &self.client,
            &[
                ("op", "addPermRoot"),
                ("path", &self.store.full(&r.path)),
                ("link", &link),
            ],
        );
        Ok(link)
    }

    fn find_roots(&mut self, _: w::FindRoots) -> Res<Vec<(String, StorePath)>> {
        let censor = !self.client.trusted;
        let mut notices = Vec::new();
        let found = {
            let mut is_valid = |p: &StorePath| self.q(|db| db.is_valid(p)).unwrap_or(false);
            let mut log = |level: u32, text: String| notices.push((level, text));
            roots::find_roots(&self.store, &mut is_valid, censor, &mut log)
        };
        for (level, text) in notices {
            let _ = self.chan.send(&Notice::Log { level, text }, &[]);
        }
        // In nix-daemon's order: clients print them in an order that depends on it.
        let mut out = Vec::new();
        for (path, links) in found.iter() {
            for link in links.keys() {
                out.push((link.clone(), path.clone()));
            }
        }
        Ok(out)
    }

    fn add_signatures(&mut self, r: w::AddSignatures) -> Res<()> {
        for s in &r.sigs {
            if s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(ReqError::failed(format!("invalid signature '{}'", hl(s))));
            }
        }
        let set = r.sigs.iter().cloned().collect();
        self.store
            .write("adding signatures", |db| db.add_signatures(&r.path, &set))?;
        let full = self.store.full(&r.path);
        self.store.audit.client_event(
            Severity::Notice,
            &self.client,
            &[
                ("op", "addSignatures"),
                ("path", &full),
                ("sigs", &r.sigs.join(" ")),
            ],
        );
        Ok(())
    }

    fn verify_store(&mut self, r: w::VerifyStore) -> Res<w::VerifyOutcome> {
        let op = Op::VerifyStore { repair: r.repair };
        if let Err(denied) = op_allowed(op, self.client.trusted) {
            return Err(self.refuse(ReqKind::VerifyStore, denied.0));
        }
        let store = self.store.clone();
        let chan = &mut self.chan;
        let mut log = |level: u32, text: String| {
            let _ = chan.send(&Notice::Log { level, text }, &[]);
        };
        verify::verify_store(&store, &self.client, r.check_contents, r.repair, &mut log)
    }

    fn collect_garbage(&mut self, r: w::CollectGarbage) -> Res<w::GcResult> {
        let store = self.store.clone();
        let client = self.client.clone();
        let chan = &mut self.chan;
        let mut log = |level: u32, text: String| {
            let _ = chan.send(&Notice::Log { level, text }, &[]);
        };
        gc::collect_garbage(&store, &client, &r, &mut log)
    }

    fn optimise_store(&mut self, r: w::OptimiseStore) -> Res<()> {
        let store = self.store.clone();
        let chan = &mut self.chan;
        let mut log = |level: u32, text: String| {
            let _ = chan.send(&Notice::Log { level, text }, &[]);
        };
        optimise::optimise_store(&store, &self.client, r.verbosity, &mut log)
    }
}
