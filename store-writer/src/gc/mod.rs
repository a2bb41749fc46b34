//! Garbage collection, as Nix's `collectGarbage`: under the exclusive GC lock, with a
//! `gc-socket` for other processes' new temp roots, roots found as Nix finds them, the
//! database read once into memory ([`graph`]), deletions in Nix's order ([`walk`]), then the
//! `.links` entries nothing uses any more. Every run is audited: who, what, each path deleted,
//! bytes freed.

mod auto;
mod delete;
mod graph;
mod pause;
mod server;
mod state;
mod walk;

use std::collections::HashSet;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use stockade_common::ipc::msg::ClientIdentity;
use stockade_common::ipc::writer::{CollectGarbage, GcAction, GcResult};
use stockade_common::store_path::StorePath;

pub use auto::auto_gc;
pub use state::GcState;

use crate::audit::Severity;
use crate::error::ReqError;
use crate::roots;
use crate::store::Store;
use walk::{Walk, INFO};

/// Nix's `lvlTalkative`.
const TALKATIVE: u32 = 4;

const OP: &str = "collectGarbage";

/// Deleted paths named per audit line.
const AUDIT_CHUNK: usize = 32;

/// Collects garbage for `client`, audited when it starts, for each path deleted, and when it
/// ends (also when it fails).
pub fn collect_garbage(
    store: &Store,
    client: &ClientIdentity,
    req: &CollectGarbage,
    log: &mut dyn FnMut(u32, String),
) -> Result<GcResult, ReqError> {
    let action = action_name(req.action);
    let max = if req.max_freed == u64::MAX {
        "none".to_string()
    } else {
        req.max_freed.to_string()
    };
    let named = req.paths.len().to_string();
    store.audit.client_event(
        Severity::Notice,
        client,
        &[
            ("op", OP),
            ("outcome", "started"),
            ("action", action),
            ("maxFreed", &max),
            ("paths", &named),
        ],
    );
    let mut deleted = 0u64;
    // What was deleted, a line per AUDIT_CHUNK paths (a line per path would cost a collection
    // of many paths as much as the deletions).
    let mut audit_each = |batch: &[(String, u64)]| {
        for chunk in batch.chunks(AUDIT_CHUNK) {
            deleted += chunk.len() as u64;
            let paths: Vec<&str> = chunk.iter().map(|(p, _)| p.as_str()).collect();
            let freed: u64 = chunk.iter().map(|(_, n)| n).sum();
            store.audit.client_event(
                Severity::Info,
                client,
                &[
                    ("op", "gcDelete"),
                    ("paths", &paths.join(" ")),
                    ("freed", &freed.to_string()),
                ],
            );
        }
    };
    let res = run(store, req, log, &mut audit_each);
    let (outcome, freed, error) = match &res {
        Ok(r) => ("done", r.bytes_freed, String::new()),
        Err(e) => ("failed", 0, e.to_string()),
    };
    let mut fields = vec![("op", OP), ("outcome", outcome), ("action", action)];
    let (deleted_s, freed_s) = (deleted.to_string(), freed.to_string());
    fields.push(("deleted", &deleted_s));
    fields.push(("bytesFreed", &freed_s));
    if !error.is_empty() {
        fields.push(("error", &error));
    }
    store.audit.client_event(Severity::Notice, client, &fields);
    res
}

fn action_name(a: GcAction) -> &'static str {
    match a {
        GcAction::ReturnLive => "returnLive",
        GcAction::ReturnDead => "returnDead",
        GcAction::DeleteDead => "deleteDead",
        GcAction::DeleteSpecific => "deleteSpecific",
    }
}

/// Ends our collector's shared state however the run ends.
struct Running<'a>(&'a Store);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.gc.end();
    }
}

fn run(
    store: &Store,
    req: &CollectGarbage,
    log: &mut dyn FnMut(u32, String),
    audit_each: walk::AuditDeleted<'_>,
) -> Result<GcResult, ReqError> {
    let deleting = req.action.deletes();
    let _one = store.gc.run.lock().unwrap_or_else(|e| e.into_inner());
    let reserved = store.db_dir.join("reserved");
    if deleting {
        // Room to work on a full disk, as Nix frees it; made again at the end.
        let _ = std::fs::remove_file(&reserved);
    }
    let res = collect(store, req, deleting, log, audit_each);
    if deleting {
        crate::store::reserve_space(&reserved);
    }
    res
}

fn collect(
    store: &Store,
    req: &CollectGarbage,
    deleting: bool,
    log: &mut dyn FnMut(u32, String),
    audit_each: walk::AuditDeleted<'_>,
) -> Result<GcResult, ReqError> {
    // Known before the lock is ours, so a root added meanwhile is never missed (state.rs).
    let shared = store.gc.begin();
    let _running = Running(store);
    let _lock = gc_lock(store, log)?;
    shared.set_holds_lock();
    let _server = match server::RootsServer::start(store, shared.clone()) {
        Ok(s) => Some(s),
        Err(e) => {
            // Others then wait for the lock instead of reaching us: slower, never unsafe.
            log::warn!("cannot serve gc-socket: {e}");
            None
        }
    };

    log(INFO, "finding garbage collector roots...".into());
    // Temp roots first (Nix reads them after the permanent ones): a client makes a permanent
    // root while its temp root holds the path, and may then drop the temp root. Read in this
    // order, a permanent root made after the scan is covered by a temp root that was read or
    // has come through the socket since; in Nix's order both can be missed (A28).
    let mut temp = roots::new_roots();
    let read_temp = |temp: &mut roots::Roots, log: &mut dyn FnMut(u32, String)| {
        roots::find_temp_roots(store, temp, true, log);
        shared.add_known_roots(temp.iter().map(|(p, _)| p.hash_part().to_string()));
    };
    let permanent = |reader: &crate::db::StoreDb, log: &mut dyn FnMut(u32, String)| {
        let mut is_valid = |p: &StorePath| reader.is_valid(p).unwrap_or(false);
        roots::find_roots_no_temp(store, &mut is_valid, true, log)
    };
    let (reader, found) = if cfg!(feature = "without-a28") {
        let reader = store.reader()?;
        let found = permanent(&reader, log);
        pause::at(store, pause::BETWEEN_ROOTS);
        read_temp(&mut temp, log);
        (reader, found)
    } else {
        read_temp(&mut temp, log);
        pause::at(store, pause::BETWEEN_ROOTS);
        let reader = store.reader()?;
        let found = permanent(&reader, log);
        (reader, found)
    };

    let graph = graph::Graph::load(&reader)?;
    pause::at(store, pause::AFTER_ROOTS);
    let only = (req.action == GcAction::DeleteSpecific)
        .then(|| req.paths.iter().cloned().collect::<HashSet<_>>());
    let mut walk = Walk::new(
        store,
        &shared,
        graph,
        deleting,
        only,
        req.max_freed,
        log,
        audit_each,
    )?;
    for (p, _) in found.iter().chain(temp.iter()) {
        walk.mark_alive(p);
    }

    if req.action == GcAction::DeleteSpecific {
        for p in &req.paths {
            let stopped = walk.visit(p).and_then(|()| walk.finish()).is_err();
            if !walk.dead.contains(p) && !stopped {
                return Err(ReqError::failed(format!(
                    "Cannot delete path '{}' since it is still alive. To find out why, use: nix-store --query --roots",
                    store.full(p)
                )));
            }
            if stopped {
                break;
            }
        }
    } else if req.max_freed > 0 {
        (walk.log)(
            INFO,
            if deleting {
                "deleting garbage..."
            } else {
                "determining live/dead paths..."
            }
            .into(),
        );
        let entries = crate::sys::read_dir(store.store_fd()).map_err(|e| {
            ReqError::failed(format!(
                "opening directory '{}': {e}",
                store.store_dir.as_str()
            ))
        })?;
        let _ = (|| -> Result<(), walk::LimitReached> {
            for (name, _) in entries {
                if name == ".links" {
                    continue;
                }
                match name.to_str().map(StorePath::from_base_name) {
                    Some(Ok(p)) => walk.visit(&p)?,
                    _ => walk.stray(&name)?,
                }
            }
            walk.finish()
        })();
    }
    let _ = walk.finish();

    let mut result = std::mem::take(&mut walk.result);
    match req.action {
        GcAction::ReturnLive => {
            // Nix reports what its walk found alive: nothing without a walk.
            if req.max_freed > 0 {
                result.paths = walk.alive_paths();
            }
            return Ok(result);
        }
        GcAction::ReturnDead => {
            let mut all: std::collections::BTreeSet<String> = std::mem::take(&mut walk.deleted);
            all.extend(walk.dead.iter().map(|p| store.full(p)));
            result.paths = all.into_iter().collect();
            return Ok(result);
        }
        GcAction::DeleteDead | GcAction::DeleteSpecific => {}
    }
    result.paths = std::mem::take(&mut walk.deleted).into_iter().collect();
    drop(walk);
    remove_unused_links(store, log)?;
    Ok(result)
}

/// The GC lock, exclusively; says so when it has to wait, as Nix does.
fn gc_lock(store: &Store, log: &mut dyn FnMut(u32, String)) -> Result<Flock<File>, ReqError> {
    let f = store.open_gc_lock()?;
    match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(l),
        Err((f, Errno::EWOULDBLOCK)) => {
            log(INFO, "waiting for the big garbage collector lock...".into());
            Flock::lock(f, FlockArg::LockExclusive)
                .map_err(|(_, e)| ReqError::from(std::io::Error::from(e)))
        }
        Err((_, e)) => Err(std::io::Error::from(e).into()),
    }
}

/// Removes `.links` entries with one link left (no store file uses them) and reports what
/// hard-linking saves, in Nix's words.
fn remove_unused_links(store: &Store, log: &mut dyn FnMut(u32, String)) -> Result<(), ReqError> {
    log(INFO, "deleting unused links...".into());
    // A link count read here must not change under us from an optimiser in this process.
    let _links = crate::optimise::links_lock();
    let links_path = format!("{}/.links", store.store_dir.as_str());
    let links = crate::sys::open_dir_at(store.store_fd(), ".links")
        .map_err(|e| ReqError::failed(format!("opening directory '{links_path}': {e}")))?;
    let (mut actual, mut unshared) = (0i64, 0i64);
    for (name, _) in crate::sys::read_dir(links.as_fd())
        .map_err(|e| ReqError::failed(format!("opening directory '{links_path}': {e}")))?
    {
        let Ok(st) = crate::sys::lstat_at(links.as_fd(), name.as_os_str()) else {
            continue;
        };
        if st.st_nlink != 1 {
            actual += st.st_size;
            unshared += (st.st_nlink as i64 - 1) * st.st_size;
            continue;
        }
        log(
            TALKATIVE,
            format!(
                "deleting unused link '{links_path}/{}'",
                name.to_string_lossy()
            ),
        );
        nix::unistd::unlinkat(
            Some(links.as_raw_fd()),
            name.as_os_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        )
        .map_err(|e| {
            ReqError::failed(format!(
                "deleting '{links_path}/{}': {e}",
                name.to_string_lossy()
            ))
        })?;
    }
    let st = crate::sys::fstat(links.as_fd())
        .map_err(|e| ReqError::failed(format!("statting '{links_path}': {e}")))?;
    let overhead = st.st_blocks * 512;
    log(
        INFO,
        format!(
            "note: currently hard linking saves {:.2} MiB",
            (unshared - actual - overhead) as f64 / (1024.0 * 1024.0)
        ),
    );
    Ok(())
}
