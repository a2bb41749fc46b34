//! Deciding and deleting, in Nix's order. For each entry of the store directory (or each
//! path named, for a specific delete) the collector gathers what would keep it alive: its
//! referrers, and with keep-derivations / keep-outputs the outputs of a derivation / the
//! derivations of an output. If none of that is alive or a root, all of it is garbage and
//! goes, referrers first. Nix's messages and order are kept, since clients print them.
//!
//! Deletions wait in a batch and are invalidated in one transaction, committed durably, before
//! any file is removed: a collector stopped at any point leaves every registered path whole.
//! A path whose deletion is pending cannot gain a temp root until it is gone (state.rs).

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::os::fd::OwnedFd;

use std::os::unix::ffi::OsStrExt;

use stockade_common::ipc::writer::GcResult;
use stockade_common::store_path::StorePath;

use super::delete::{self, Done, Job};
use super::graph::{Graph, Node};
use super::state::Shared;
use crate::db::Invalidated;
use crate::store::Store;
use crate::sys;

/// Deletions invalidated per transaction when nothing limits the bytes to free.
const BATCH: usize = 512;

/// Nix's `lvlInfo`, at which it reports each deletion.
pub const INFO: u32 = 3;

/// Receives each flushed batch's deleted paths and the bytes each freed, for the audit.
pub type AuditDeleted<'a> = &'a mut dyn FnMut(&[(String, u64)]);

/// Deletion stopped: `max-freed` was reached.
pub struct LimitReached;

/// Something decided dead, waiting to be deleted.
enum Doomed {
    /// A store path (registered or not): invalidated first when registered.
    Path(StorePath),
    /// An entry whose name is no store path (left-overs): removed as it is.
    Other(OsString),
}

pub struct Walk<'a> {
    pub store: &'a Store,
    pub shared: &'a Shared,
    pub graph: Graph,
    /// Closed under what keeps what alive.
    pub alive: Vec<bool>,
    /// Alive and not in the graph: temp roots that are not registered, paths registered
    /// after the graph was read.
    pub alive_other: HashSet<StorePath>,
    pub dead: HashSet<StorePath>,
    pub deleting: bool,
    pub keep_outputs: bool,
    pub keep_derivations: bool,
    /// For a specific delete: the paths named.
    pub only: Option<HashSet<StorePath>>,
    pub max_freed: u64,
    pub result: GcResult,
    pub deleted: BTreeSet<String>,
    batch: Vec<Doomed>,
    batch_hashes: Vec<String>,
    /// The store directory, for removing.
    store_fd: OwnedFd,
    /// The removing thread, for a collection with no byte limit.
    pipeline: Option<delete::Pipeline>,
    /// Batches flushed (for [`Walk::stall_for_test`]).
    flushes: usize,
    pub log: &'a mut dyn FnMut(u32, String),
    pub audit_each: AuditDeleted<'a>,
}

impl<'a> Walk<'a> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: &'a Store,
        shared: &'a Shared,
        graph: Graph,
        deleting: bool,
        only: Option<HashSet<StorePath>>,
        max_freed: u64,
        log: &'a mut dyn FnMut(u32, String),
        audit_each: AuditDeleted<'a>,
    ) -> std::io::Result<Walk<'a>> {
        let alive = vec![false; graph.node_count()];
        let store_fd = store.store_fd.try_clone()?;
        let pipeline = if deleting && max_freed == u64::MAX {
            match store.store_fd.try_clone().and_then(delete::Pipeline::start) {
                Ok(p) => Some(p),
                Err(e) => {
                    log::warn!("collecting garbage without a removing thread: {e}");
                    None
                }
            }
        } else {
            None
        };
        Ok(Walk {
            store,
            shared,
            graph,
            alive,
            alive_other: HashSet::new(),
            dead: HashSet::new(),
            deleting,
            keep_outputs: store.cfg.gc.keep_outputs,
            keep_derivations: store.cfg.gc.keep_derivations,
            only,
            max_freed,
            result: GcResult::default(),
            deleted: BTreeSet::new(),
            batch: Vec::new(),
            batch_hashes: Vec::new(),
            store_fd,
            pipeline,
            flushes: 0,
            log,
            audit_each,
        })
    }

    /// Deletes what is still batched and waits for every removal.
    pub fn finish(&mut self) -> Result<(), LimitReached> {
        let flushed = self.flush();
        let drained = self.take_done(true);
        flushed.and(drained)
    }

    /// Marks `p` and what it keeps alive.
    pub fn mark_alive(&mut self, p: &StorePath) {
        match self.graph.node(p) {
            Some(n) if self.graph.is_valid(n) => {
                let (ko, kd) = (self.keep_outputs, self.keep_derivations);
                self.graph.closure(&[n], ko, kd, &mut self.alive);
            }
            _ => {
                self.alive_other.insert(p.clone());
            }
        }
    }

    fn is_alive(&self, p: &StorePath) -> bool {
        match self.graph.node(p) {
            Some(n) => self.alive[n as usize] || self.alive_other.contains(p),
            None => self.alive_other.contains(p),
        }
    }

    /// Nix's deleteReferrersClosure from `start`.
    pub fn visit(&mut self, start: &StorePath) -> Result<(), LimitReached> {
        let mut seen: HashSet<StorePath> = HashSet::new();
        let mut visited: Vec<StorePath> = Vec::new();
        let mut todo: VecDeque<StorePath> = VecDeque::new();
        let mut claimed: Vec<String> = Vec::new();
        seen.insert(start.clone());
        todo.push_back(start.clone());
        let verdict = loop {
            let Some(p) = todo.pop_front() else {
                break Verdict::Dead;
            };
            visited.push(p.clone());
            if self.is_alive(&p) {
                break Verdict::Alive(None);
            }
            if self.dead.contains(&p) {
                continue;
            }
            if self.only.as_ref().is_some_and(|o| !o.contains(&p)) {
                break Verdict::Undecided;
            }
            if !self.shared.claim(p.hash_part(), self.deleting) {
                break Verdict::Alive(Some(p));
            }
            if self.deleting {
                claimed.push(p.hash_part().to_string());
            }
            match self.graph.node(&p) {
                Some(n) if self.graph.is_valid(n) => {
                    for k in self
                        .graph
                        .keepers(n, self.keep_outputs, self.keep_derivations)
                    {
                        let kp = self.graph.path(k);
                        if !seen.contains(kp) {
                            seen.insert(kp.clone());
                            todo.push_back(kp.clone());
                        }
                    }
                }
                Some(_) => {}
                None => {
                    // Registered after the graph was read (its adder holds a temp root, so
                    // this is only belt and braces): alive.
                    let now_valid = self.store.db().is_valid(&p).unwrap_or(true);
                    if now_valid {
                        break Verdict::Alive(Some(p));
                    }
                }
            }
        };
        match verdict {
            Verdict::Alive(root) => {
                self.shared.release(&claimed);
                if let Some(r) = root {
                    self.mark_alive(&r);
                }
                if !self.is_alive(start) {
                    self.alive_other.insert(start.clone());
                    if let Some(n) = self.graph.node(start) {
                        self.alive[n as usize] = true;
                    }
                }
                Ok(())
            }
            Verdict::Undecided => {
                self.shared.release(&claimed);
                Ok(())
            }
            Verdict::Dead => {
                for p in self.topo_sort(&visited) {
                    if !self.dead.insert(p.clone()) {
                        continue;
                    }
                    if self.deleting {
                        self.batch_hashes.push(p.hash_part().to_string());
                        self.batch.push(Doomed::Path(p));
                    }
                }
                if self.batch.len() >= self.batch_limit() {
                    self.flush()?;
                }
                Ok(())
            }
        }
    }

    /// An entry of the store directory whose name is no store path: removed, in any mode, as
    /// Nix does; a `tmp-*` directory its owner holds locked (a staging directory, a Nix
    /// build's) is left alone.
    pub fn stray(&mut self, name: &OsStr) -> Result<(), LimitReached> {
        if name.as_bytes().starts_with(b"tmp-") && locked_dir(self.store, name) {
            return Ok(());
        }
        self.batch.push(Doomed::Other(name.to_os_string()));
        self.flush()
    }

    /// Every path found alive, as full paths in order.
    pub fn alive_paths(&self) -> Vec<String> {
        let mut all: BTreeSet<String> = self
            .alive_other
            .iter()
            .map(|p| self.store.full(p))
            .collect();
        for (i, &a) in self.alive.iter().enumerate() {
            if a {
                if let Ok(n) = Node::try_from(i) {
                    all.insert(self.store.full(self.graph.path(n)));
                }
            }
        }
        all.into_iter().collect()
    }

    fn batch_limit(&self) -> usize {
        if self.max_freed == u64::MAX {
            BATCH
        } else {
            1
        }
    }

    /// Invalidates and deletes what the batch holds, in order.
    pub fn flush(&mut self) -> Result<(), LimitReached> {
        if self.batch.is_empty() {
            return Ok(());
        }
        super::pause::at(self.store, super::pause::BEFORE_DELETE);
        let batch = std::mem::take(&mut self.batch);
        let hashes = std::mem::take(&mut self.batch_hashes);
        if self.max_freed != u64::MAX {
            // With a limit, as Nix: each path invalidated and removed before the next is
            // touched, so the collection stops right after the one that reaches the limit and
            // everything after it stays registered and whole.
            let mut res = Ok(());
            for d in batch {
                let Some(entry) = self.invalidated_entries(vec![d]).pop() else {
                    continue;
                };
                let job = Job {
                    entries: vec![entry],
                    hashes: Vec::new(),
                };
                res = self.account(delete::run(&self.store_fd, job));
                if res.is_err() {
                    break;
                }
            }
            self.shared.release(&hashes);
            return res;
        }
        let entries = self.invalidated_entries(batch);
        self.stall_for_test();
        let job = Job { entries, hashes };
        if let Some(p) = self.pipeline.as_mut() {
            let job = match p.send(job) {
                Ok(()) => return self.take_done(false),
                Err(job) => job,
            };
            return self.account(delete::run(&self.store_fd, job));
        }
        let done = delete::run(&self.store_fd, job);
        self.account(done)
    }

    /// Invalidates the registered paths of `batch` (one transaction) and returns what is to
    /// be removed, in order: (name in the store, full path), without the paths kept.
    fn invalidated_entries(&mut self, batch: Vec<Doomed>) -> Vec<(OsString, String)> {
        let paths: Vec<StorePath> = batch
            .iter()
            .filter_map(|d| match d {
                Doomed::Path(p) => Some(p.clone()),
                Doomed::Other(_) => None,
            })
            .collect();
        let kept = if paths.is_empty() {
            HashSet::new()
        } else {
            self.invalidate(&paths)
        };
        let mut entries = Vec::with_capacity(batch.len());
        for d in batch {
            let name: OsString = match &d {
                Doomed::Path(p) if kept.contains(p) => continue,
                Doomed::Path(p) => p.to_string().into(),
                Doomed::Other(n) => n.clone(),
            };
            let full = format!(
                "{}/{}",
                self.store.store_dir.as_str(),
                name.to_string_lossy()
            );
            entries.push((name, full));
        }
        entries
    }

    /// Accounts for the jobs the removing thread has finished (all of them, with `wait`).
    pub fn take_done(&mut self, wait: bool) -> Result<(), LimitReached> {
        while let Some(done) = self.pipeline.as_mut().and_then(|p| p.next(wait)) {
            self.account(done)?;
        }
        Ok(())
    }

    /// Reports a removed job: the client's lines, the audit, the bytes; stops at `max-freed`.
    fn account(&mut self, done: Done) -> Result<(), LimitReached> {
        let mut res = Ok(());
        // One message for the batch's lines: the client prints the same text, and a
        // collection of many paths is not a message and a write per path at each hop.
        let mut lines: Vec<String> = Vec::with_capacity(done.gone.len());
        let mut counted = 0;
        for (full, freed) in &done.gone {
            lines.push(format!("deleting '{full}'"));
            counted += 1;
            self.deleted.insert(full.clone());
            self.result.bytes_freed = self.result.bytes_freed.saturating_add(*freed);
            if self.result.bytes_freed > self.max_freed {
                lines.push(format!(
                    "deleted more than {} bytes; stopping",
                    self.max_freed
                ));
                res = Err(LimitReached);
                break;
            }
        }
        if !lines.is_empty() {
            (self.log)(INFO, lines.join("\n"));
        }
        (self.audit_each)(&done.gone[..counted]);
        self.shared.release(&done.hashes);
        res
    }

    /// For a test: once a batch is removed and audited and the next one invalidated but not
    /// removed, stop for good (the test kills the store-writer here).
    fn stall_for_test(&mut self) {
        if !stalled_by_test() {
            return;
        }
        self.flushes += 1;
        if self.flushes < 2 {
            return;
        }
        let _ = self.take_done(true);
        loop {
            std::thread::park();
        }
    }

    /// Invalidates `paths` (one durable transaction; one by one when a path has gained a
    /// referrer since the graph was read). Returns those kept: still referred to, alive now.
    fn invalidate(&mut self, paths: &[StorePath]) -> HashSet<StorePath> {
        let mut kept = HashSet::new();
        let all = self.store.write("collecting garbage", |db| {
            db.invalidate_checked(paths, true)
        });
        let single = match all {
            Ok(Invalidated::Done(gone)) => {
                self.note_invalid(&gone);
                return kept;
            }
            Ok(Invalidated::InUse(..)) => true,
            Err(e) => {
                log::warn!("invalidating garbage: {e}");
                true
            }
        };
        if single {
            for p in paths {
                let one = std::slice::from_ref(p);
                match self
                    .store
                    .write("collecting garbage", |db| db.invalidate_checked(one, true))
                {
                    Ok(Invalidated::Done(gone)) => self.note_invalid(&gone),
                    Ok(Invalidated::InUse(p)) => {
                        log::info!(
                            "not deleting {}: a path registered meanwhile refers to it",
                            self.store.full(&p)
                        );
                        kept.insert(p);
                    }
                    Err(e) => {
                        log::warn!("invalidating {}: {e}", self.store.full(p));
                        kept.insert(p.clone());
                    }
                }
            }
        }
        for p in &kept {
            self.dead.remove(p);
            self.mark_alive(p);
        }
        kept
    }

    fn note_invalid(&mut self, gone: &[StorePath]) {
        for p in gone {
            if let Some(n) = self.graph.node(p) {
                self.graph.invalidated(n);
            }
        }
    }

    /// Nix's topoSortPaths: referrers before what they refer to, ties in path order.
    fn topo_sort(&self, visited: &[StorePath]) -> Vec<StorePath> {
        let items: BTreeSet<&StorePath> = visited.iter().collect();
        let mut done: HashSet<&StorePath> = HashSet::new();
        let mut sorted: Vec<StorePath> = Vec::with_capacity(items.len());
        for &root in &items {
            if !done.insert(root) {
                continue;
            }
            // Depth first without recursion: (path, its children still to visit).
            let mut stack: Vec<(&StorePath, Vec<&StorePath>)> =
                vec![(root, self.children(root, &items))];
            while let Some((p, kids)) = stack.last_mut() {
                match kids.pop() {
                    Some(c) => {
                        if done.insert(c) {
                            let grand = self.children(c, &items);
                            stack.push((c, grand));
                        }
                    }
                    None => {
                        sorted.push((*p).clone());
                        stack.pop();
                    }
                }
            }
        }
        sorted.reverse();
        sorted
    }

    /// `p`'s references among `items`, in reverse path order (popped from the back, they are
    /// visited in path order, as Nix's loop over a `std::set`).
    fn children<'s>(&self, p: &StorePath, items: &BTreeSet<&'s StorePath>) -> Vec<&'s StorePath> {
        let Some(n) = self.graph.node(p) else {
            return Vec::new();
        };
        let refs: BTreeSet<&StorePath> = self
            .graph
            .references(n)
            .iter()
            .map(|&r: &Node| self.graph.path(r))
            .collect();
        let mut kids: Vec<&'s StorePath> = refs
            .iter()
            .filter_map(|r| items.get(*r).copied())
            .filter(|i| *i != p)
            .collect();
        kids.reverse();
        kids
    }
}

/// Whether a test asked the collector to stop for good after its first deletions
/// (`STOCKADE_TEST_GC_STALL`, honoured by debug builds only), so that it can be killed there.
fn stalled_by_test() -> bool {
    cfg!(debug_assertions) && std::env::var_os("STOCKADE_TEST_GC_STALL").is_some()
}

enum Verdict {
    /// Alive; `Some(p)`: because of `p`, whose closure must now be marked.
    Alive(Option<StorePath>),
    /// Garbage, everything visited.
    Dead,
    /// A specific delete met a path it was not asked to delete.
    Undecided,
}

/// Whether the directory `name` in the store is locked by someone (as Nix 2.20+ checks before
/// removing a `tmp-*` directory).
fn locked_dir(store: &Store, name: &OsStr) -> bool {
    use nix::fcntl::{Flock, FlockArg};
    let Ok(fd) = sys::open_dir_at(store.store_fd(), name) else {
        return false;
    };
    Flock::lock(fd, FlockArg::LockExclusiveNonblock).is_err()
}
