//! What a running collector shares with everything that adds temp roots meanwhile: this
//! process's sessions (directly) and other processes (through `gc-socket`). As in Nix, a root
//! is known by its hash part, so `<hash>-name.lock`, `.chroot` and `.check` entries of a rooted
//! path are kept too; and a root for a path being deleted waits until the deletion is done,
//! so its adder then finds the path invalid rather than half gone.

use std::collections::HashSet;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// The store-writer's collector, if one runs (one at a time).
#[derive(Default)]
pub struct GcState {
    /// Held for a whole collection.
    pub(super) run: Mutex<()>,
    current: Mutex<Option<Arc<Shared>>>,
    /// The automatic collection's state, and its end.
    pub(super) auto: (Mutex<super::auto::AutoGc>, Condvar),
}

#[derive(Default)]
pub struct Shared {
    inner: Mutex<Inner>,
    wakeup: Condvar,
}

#[derive(Default)]
struct Inner {
    /// Hash parts of every temp root the collector knows of.
    temp_roots: HashSet<String>,
    /// Hash parts of paths the collector has decided to delete and not yet deleted.
    pending: HashSet<String>,
    /// Whether it holds the GC lock (before, another process's collector may).
    holds_lock: bool,
}

impl GcState {
    /// For a thread adding a temp root while the GC lock is taken: `None` when no collector
    /// of ours runs; otherwise it now knows the root (after any deletion of that path), and
    /// `Some(true)` says it holds the lock, so the root needs to reach no one else.
    pub fn note_temp_root(&self, hash_part: &str) -> Option<bool> {
        let shared = self.lock_current().clone()?;
        Some(shared.add_root(hash_part))
    }

    pub(super) fn begin(&self) -> Arc<Shared> {
        let shared = Arc::new(Shared::default());
        *self.lock_current() = Some(shared.clone());
        shared
    }

    pub(super) fn end(&self) {
        if let Some(shared) = self.lock_current().take() {
            shared.clear_pending();
        }
    }

    fn lock_current(&self) -> MutexGuard<'_, Option<Arc<Shared>>> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a new temp root; returns once no deletion of that path is pending.
    pub fn add_root(&self, hash_part: &str) -> bool {
        let mut inner = self.lock();
        inner.temp_roots.insert(hash_part.to_string());
        while inner.pending.contains(hash_part) {
            inner = self.wakeup.wait(inner).unwrap_or_else(|e| e.into_inner());
        }
        inner.holds_lock
    }

    pub(super) fn set_holds_lock(&self) {
        self.lock().holds_lock = true;
    }

    /// Whether `hash_part` is not a temp root; if not and `deleting`, it is marked pending
    /// (see [`Shared::add_root`]) in the same step, so no root for it can slip in between.
    pub(super) fn claim(&self, hash_part: &str, deleting: bool) -> bool {
        let mut inner = self.lock();
        if inner.temp_roots.contains(hash_part) {
            return false;
        }
        if deleting {
            inner.pending.insert(hash_part.to_string());
        }
        true
    }

    /// Adds temp roots read from the roots files.
    pub(super) fn add_known_roots(&self, hash_parts: impl IntoIterator<Item = String>) {
        self.lock().temp_roots.extend(hash_parts);
    }

    /// Drops the pending marks of `hash_parts` (paths found alive after all).
    pub(super) fn release(&self, hash_parts: &[String]) {
        let mut inner = self.lock();
        for h in hash_parts {
            inner.pending.remove(h);
        }
        drop(inner);
        self.wakeup.notify_all();
    }

    /// Every pending deletion is done (or abandoned).
    pub(super) fn clear_pending(&self) {
        self.lock().pending.clear();
        self.wakeup.notify_all();
    }
}
