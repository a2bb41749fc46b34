//! Adding paths, in one straight line per request:
//!
//! 1. **decide** what the request claims before reading its data (`decide`): names, methods,
//!    evidence for the contents per the client's trust, references; a path that is valid
//!    already (and not being repaired) is answered without writing anything;
//! 2. **receive and stage** the data (`ingest` for AddToStore, whose path is known only
//!    once the data is hashed; `stage::nar` for AddNar): parsed and hashed as it arrives, into a
//!    locked staging directory (`stage`), or into memory first when small;
//! 3. **install** (`install`): under the store path locks, re-check validity, check the tree on
//!    disk against its hash, rename into place and register in one transaction.
//!
//! No lock is held while the client's data arrives: the locked staging directory and a temp
//! root (taken as soon as the path is known) protect the work instead.

mod batch;
pub(crate) mod decide;
mod ingest;
pub(crate) mod install;
pub mod stage;

use std::collections::BTreeSet;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use stockade_common::content_address::{ContentAddress, ContentAddressMethod};
use stockade_common::hash::{Encoding, HashAlgo};
use stockade_common::ipc::msg::ClientIdentity;
use stockade_common::narinfo::PathInfo;
use stockade_common::store_path::StorePath;

pub use batch::{Batch, MAX_BATCHES};
use install::{Item, Outcome};

use crate::audit::Severity;
use crate::error::ReqError;
use crate::roots::{add_temp_root, TempRoots};
use crate::store::Store;
use crate::sys;
use crate::upload::Upload;

/// The node of a single add inside its staging directory.
const NODE: &str = "x";

/// Who is asking, as the master told us, and their temporary roots.
pub struct Ctx<'a> {
    pub store: &'a Arc<Store>,
    pub client: &'a ClientIdentity,
    pub roots: &'a Mutex<TempRoots>,
    /// Path locks to release once the reply has been sent (None: release them at once).
    pub after_reply: Option<&'a std::cell::RefCell<Vec<crate::pathlocks::Pending>>>,
}

impl Ctx<'_> {
    /// Keeps `locks` until the session has sent its reply: the paths are registered, so the
    /// client need not wait while the lock files are removed.
    fn release_after_reply(&self, locks: crate::pathlocks::PathGuard<'_>) {
        if let Some(later) = self.after_reply {
            later.borrow_mut().push(locks.defer());
        }
    }

    fn temp_root(&self, p: &StorePath) -> Result<(), ReqError> {
        let mut roots = self.roots.lock().unwrap_or_else(|e| e.into_inner());
        let res = add_temp_root(self.store, &mut roots, p);
        if let Err(crate::roots::RootError::Budget(hit)) = &res {
            crate::roots::audit_budget(self.store, self.client, hit);
        }
        res?;
        Ok(())
    }

    /// A43: refuses (and audits) an untrusted add of `bytes` more that would take the store's
    /// file system below its free-space or inode floor.
    fn floor(&self, op: &str, what: &str, bytes: u64) -> Result<(), ReqError> {
        let fs = std::os::fd::AsFd::as_fd(&self.store.store_fd);
        match self.store.quotas.floor_crossed(self.client, fs, bytes) {
            Some(c) => Err(self.below_floor(op, what, bytes, c)),
            None => Ok(()),
        }
    }

    /// The audited refusal of an add of `bytes` more for floor `c`.
    fn below_floor(
        &self,
        op: &str,
        what: &str,
        bytes: u64,
        c: stockade_common::floor::Crossed,
    ) -> ReqError {
        let (free, floor, size) = (c.free.to_string(), c.floor.to_string(), bytes.to_string());
        self.store.audit.client_event(
            Severity::Warning,
            self.client,
            &[
                ("op", op),
                ("outcome", "limit"),
                ("limit", c.setting()),
                ("path", what),
                ("size", &size),
                ("free", &free),
                ("floor", &floor),
            ],
        );
        ReqError::failed(format!(
            "cannot add '{what}': the store's file system has {} {unit} free, and adding {bytes} \
             bytes would leave less than the {} {unit} kept for trusted users ({})",
            c.free,
            c.floor,
            c.setting(),
            unit = c.unit()
        ))
    }

    fn refuse(&self, op: &str, path: &str, reason: &str) {
        self.store.audit.client_event(
            Severity::Warning,
            self.client,
            &[
                ("op", op),
                ("outcome", "refused"),
                ("path", path),
                ("reason", reason),
            ],
        );
    }

    fn added(&self, op: &str, info: &PathInfo, evidence: &str) {
        let full = self.store.full(&info.path);
        let hash = info.nar_hash.to_typed(Encoding::Base32);
        self.store.audit.client_event(
            Severity::Notice,
            self.client,
            &[
                ("op", op),
                ("outcome", "added"),
                ("path", &full),
                ("narHash", &hash),
                ("evidence", evidence),
            ],
        );
    }
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// AddToStore: the store-writer hashes the data and computes the path. → the registered info.
/// The data comes from `input`: an upload pipe, or the bytes of an inline request.
pub fn add_to_store(
    ctx: &Ctx<'_>,
    name: &str,
    method: ContentAddressMethod,
    algo: HashAlgo,
    references: Vec<StorePath>,
    repair: bool,
    input: impl Read,
) -> Result<PathInfo, ReqError> {
    let res = add_to_store_inner(ctx, name, method, algo, references, repair, input);
    if let Err(ReqError::Failed(msg)) = &res {
        ctx.refuse("addToStore", name, msg);
    }
    res
}

fn add_to_store_inner(
    ctx: &Ctx<'_>,
    name: &str,
    method: ContentAddressMethod,
    algo: HashAlgo,
    references: Vec<StorePath>,
    repair: bool,
    input: impl Read,
) -> Result<PathInfo, ReqError> {
    let store = ctx.store;
    let refs: BTreeSet<StorePath> = references.into_iter().collect();
    decide::ca_request(ctx, name, method, algo, &refs)?;
    // Its size is not known yet: refused at once when the floor is crossed already.
    ctx.floor("addToStore", name, 0)?;
    // Its size is known once it has all arrived: an untrusted client's data stops at the
    // largest add it may make; the hour's budget is charged once the path is known.
    let allowance = store.quotas.allowance(ctx.client);
    let capped = crate::quota::Capped::new(input, allowance);
    let fs = std::os::fd::AsFd::as_fd(&store.store_fd);
    let mut input = crate::quota::Floored::new(capped, &store.quotas, ctx.client, fs);
    let received = ingest::receive(store, &mut input, method, algo, name, NODE);
    if let (Err(_), Some(c)) = (&received, input.crossed) {
        return Err(ctx.below_floor("addToStore", name, 0, c));
    }
    let got = match received {
        Err(_) if input.inner.exceeded => {
            let limit = allowance.unwrap_or(0);
            return Err(ReqError::failed(format!(
                "cannot add '{name}': it is more than the {limit} bytes an untrusted user may add \
                 at once (untrusted-max-nar-size)"
            )));
        }
        other => other?,
    };
    let ca = ContentAddress {
        method,
        hash: got.ca_hash,
    };
    let path = ca
        .store_path(&store.store_dir, name, &refs, false)
        .map_err(|e| ReqError::failed(e.to_string()))?;
    ctx.temp_root(&path)?;
    if !repair {
        if let Some(existing) = store.db().query_path_info(&path)? {
            return Ok(existing);
        }
    }
    crate::gc::auto_gc(store, true);
    let full = store.full(&path);
    // Data that arrived in memory is yet to be written; staged data is on disk already.
    let to_write = match got.data {
        ingest::Data::Memory(_) => got.nar_size,
        ingest::Data::Staged(..) => 0,
    };
    ctx.floor("addToStore", &full, to_write)?;
    store
        .quotas
        .charge(ctx.client, &full, got.nar_size)
        .map_err(ReqError::failed)?;
    let (staging, made) = match ingest::materialise(store, got.data, method, NODE) {
        Ok(m) => m,
        Err(e) => {
            store.quotas.refund(ctx.client, got.nar_size);
            return Err(e);
        }
    };
    // Sealed for its node count only (A75: nothing was added to the tree while it was
    // written); it goes straight to the commit, so there is no later state to compare.
    staging.seal(NODE, &full, made)?;
    let info = PathInfo {
        path,
        deriver: None,
        nar_hash: got.nar_hash,
        references: refs,
        registration_time: now(),
        nar_size: got.nar_size,
        ultimate: false,
        sigs: BTreeSet::new(),
        ca: Some(ca),
    };
    let item = Item {
        node: NODE.to_string(),
        info,
        repair,
        evidence: "ca".to_string(),
        seal: None,
    };
    match install::commit(ctx, &staging, vec![item], "addToStore")?.pop() {
        Some(Outcome::Added(info) | Outcome::Present(info)) => Ok(info),
        None => Err(ReqError::failed("nothing was installed")),
    }
}

/// AddNar: adds a NAR with client-claimed metadata, or stages it into `batch`.
pub fn add_nar(
    ctx: &Ctx<'_>,
    info: PathInfo,
    repair: bool,
    dont_check_sigs: bool,
    batch: Option<&mut Batch>,
    fd: OwnedFd,
) -> Result<(), ReqError> {
    let full = ctx.store.full(&info.path);
    let op = if batch.is_some() {
        "addNar(batch)"
    } else {
        "addNar"
    };
    let res = add_nar_inner(ctx, info, repair, dont_check_sigs, batch, fd);
    if let Err(ReqError::Failed(msg)) = &res {
        ctx.refuse(op, &full, msg);
    }
    res
}

fn add_nar_inner(
    ctx: &Ctx<'_>,
    mut info: PathInfo,
    repair: bool,
    dont_check_sigs: bool,
    batch: Option<&mut Batch>,
    fd: OwnedFd,
) -> Result<(), ReqError> {
    let store = ctx.store;
    let evidence = decide::evidence(ctx, &mut info, dont_check_sigs)?;
    if repair && !ctx.client.trusted && !cfg!(feature = "without-a72") {
        // A72: nix-daemon lets anyone repair a valid path with a NAR it may add (any NAR, with
        // `require-sigs = false`), i.e. replace what others depend on. Here an untrusted
        // repair may only put back the registered contents.
        if let Some(old) = store.db().query_path_info(&info.path)? {
            if old.nar_hash != info.nar_hash {
                return Err(ReqError::failed(format!(
                    "cannot repair '{}' with contents other than its registered ones, because \
                     you are not in 'trusted-users'",
                    store.full(&info.path)
                )));
            }
        }
    }
    let mut input = Upload::new(fd);
    let drain_limit = info.nar_size.saturating_add(1);
    let staged = batch.as_deref().map(Batch::paths).unwrap_or_default();
    // Already staged in this batch, or valid: the data is not needed.
    if staged.contains(&info.path) || (!repair && store.db().is_valid(&info.path)?) {
        sys::drain(&mut input, drain_limit)?;
        return Ok(());
    }
    decide::references(ctx, Some(&info.path), &info.references, &staged)?;
    let full = store.full(&info.path);
    ctx.floor("addNar", &full, info.nar_size)?;
    store
        .quotas
        .charge(ctx.client, &full, info.nar_size)
        .map_err(ReqError::failed)?;
    let nar_size = info.nar_size;
    let res = add_nar_stage(ctx, info, repair, evidence, batch, input, &full);
    if res.is_err() {
        store.quotas.refund(ctx.client, nar_size);
    }
    res
}

/// The rest of AddNar, once the add is decided and paid for.
fn add_nar_stage(
    ctx: &Ctx<'_>,
    info: PathInfo,
    repair: bool,
    evidence: String,
    batch: Option<&mut Batch>,
    input: Upload,
    full: &str,
) -> Result<(), ReqError> {
    let store = ctx.store;
    ctx.temp_root(&info.path)?;
    crate::gc::auto_gc(store, true);
    match batch {
        Some(b) => b.stage(info, repair, evidence, input, store),
        None => {
            // Before A70 the GC lock was held while the client's data arrived.
            let _gc = if cfg!(feature = "without-a70") {
                Some(store.gc_shared()?)
            } else {
                None
            };
            let staging = stage::Staging::new(store)?;
            let made = stage::nar(&staging, NODE, &info, input)?;
            staging.seal(NODE, full, made)?;
            let item = Item {
                node: NODE.to_string(),
                info,
                repair,
                evidence,
                seal: None,
            };
            install::commit(ctx, &staging, vec![item], "addNar")?;
            Ok(())
        }
    }
}
