//! Durability of added paths without an fsync per add.
//!
//! The promise: **a registration that survives a power cut has its contents on disk, or the
//! next start finds out and undoes it.** nix-daemon 2.8 makes no such promise (it syncs nothing
//! but SQLite's WAL, so after a power cut a registered path may be empty or missing); Stockade
//! used to keep it with an `fsync` of the store directory before every registration, which a
//! client adding paths one after the other paid on every path.
//!
//! How, with `fsync-metadata` on (the default):
//!
//! 1. The transaction that registers a path also writes it into `StockadeUnsynced`
//!    ([`crate::db::UNSYNCED_SCHEMA`]): if the registration reaches the disk, so does the row.
//! 2. The [`Syncer`] thread, at most [`MAX_DELAY`] after a registration (sooner once no new one
//!    has come for [`QUIET`]), notes the newest row, calls `syncfs` on the store's file system
//!    (file contents, directory entries, and the WAL when the database lives there; the
//!    database's file system too when it is another one), then deletes every row up to the one
//!    it noted, in one transaction. Rows are only deleted by a transaction that began after a
//!    sync that began after they were committed, so a deletion that reaches the disk implies
//!    the contents of its paths did; SQLite's WAL replays commits in order, so the deletion
//!    cannot survive without the registrations before it.
//! 3. At start ([`recover`], before any client is served), every row left over names a path
//!    registered by a store-writer that stopped before its sync: its contents are hashed
//!    against the registered NAR hash. A path that does not match (or is gone) is
//!    de-registered together with the listed paths that refer to it, and audited; the rest
//!    are synced and their rows deleted.
//! 4. A clean shutdown (`Shutdown` from the master, which a replaced store also sends) runs one
//!    last round ([`Syncer::round`]).
//!
//! With `fsync-metadata = false` nothing is synced and no rows are written (leftover rows of an
//! earlier run are still recovered at start).
//!
//! What a power cut can lose: the registrations of roughly the last second (as with Nix, whose
//! WAL commits are not synced either), never the contents of a path that stays registered.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use thiserror::Error;

use stockade_common::hash::Encoding;
use stockade_common::nar;
use stockade_common::narinfo::PathInfo;
use stockade_common::store_path::StorePath;

use crate::audit::Severity;
use crate::db::DbError;
use crate::store::Store;

/// The longest a registration waits for its sync.
pub const MAX_DELAY: Duration = Duration::from_secs(1);
/// A round starts once no registration has come for this long (a burst is synced once).
pub const QUIET: Duration = Duration::from_millis(100);
/// How long the thread waits after a round failed before it tries again.
const RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, Error)]
pub enum RecoverError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("{0}")]
    Write(String),
}

#[derive(Debug, Error)]
pub enum SyncError {
    #[error("{0}")]
    Db(String),
    #[error("syncfs of the {what}: {errno}")]
    Sync { what: &'static str, errno: Errno },
}

impl From<DbError> for SyncError {
    fn from(e: DbError) -> Self {
        SyncError::Db(e.to_string())
    }
}

/// What a round works on: the store (or a test's stand-in).
pub trait SyncTarget {
    /// The newest row of `StockadeUnsynced`, if any.
    fn last_unsynced(&self) -> Result<Option<i64>, SyncError>;
    /// Writes everything the store's file systems hold in memory to the disk.
    fn sync(&self) -> Result<(), SyncError>;
    /// Deletes the rows up to `upto`.
    fn clear_unsynced(&self, upto: i64) -> Result<(), SyncError>;
}

impl SyncTarget for Store {
    fn last_unsynced(&self) -> Result<Option<i64>, SyncError> {
        Ok(self.db().last_unsynced()?)
    }

    fn sync(&self) -> Result<(), SyncError> {
        syncfs(self.store_fd()).map_err(|errno| SyncError::Sync {
            what: "store",
            errno,
        })?;
        if let Some(db) = &self.db_fs {
            syncfs(db.as_fd()).map_err(|errno| SyncError::Sync {
                what: "database directory",
                errno,
            })?;
        }
        Ok(())
    }

    fn clear_unsynced(&self, upto: i64) -> Result<(), SyncError> {
        self.write("clearing synced paths", |db| db.clear_unsynced(upto))
            .map(drop)
            .map_err(|e| SyncError::Db(e.to_string()))
    }
}

/// `syncfs(2)` of the file system holding `fd`.
pub fn syncfs(fd: BorrowedFd<'_>) -> nix::Result<()> {
    nix::unistd::syncfs(fd.as_raw_fd())
}

#[derive(Default)]
struct State {
    /// Registrations were committed since the last round began.
    pending: bool,
    /// When the first and the last of them were noted.
    first: Option<Instant>,
    last: Option<Instant>,
    stopped: bool,
    /// Rounds that finished without an error.
    rounds: u64,
}

/// The bookkeeping of the syncer: which registrations wait for a sync, and one round at a time.
#[derive(Default)]
pub struct Syncer {
    state: Mutex<State>,
    wake: Condvar,
    /// Held for a whole round, so the thread's rounds and a shutdown's never interleave.
    round: Mutex<()>,
}

impl Syncer {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called after a transaction that wrote rows of `StockadeUnsynced` has committed.
    pub fn note(&self) {
        let now = Instant::now();
        let mut st = self.state();
        st.last = Some(now);
        if st.pending {
            // The thread already waits for a due time; it reads `last` again when it wakes.
            return;
        }
        st.pending = true;
        st.first = Some(now);
        drop(st);
        self.wake.notify_all();
    }

    /// Whether registrations wait for a round.
    pub fn pending(&self) -> bool {
        self.state().pending
    }

    /// Ends the thread (after its current round).
    pub fn stop(&self) {
        self.state().stopped = true;
        self.wake.notify_all();
    }

    /// One round: notes the newest row, syncs, deletes the rows up to the noted one. Returns
    /// that row (None when there was none). On failure nothing is deleted and the rows stay
    /// pending for the next round.
    pub fn round(&self, target: &impl SyncTarget) -> Result<Option<i64>, SyncError> {
        let _one = self.round.lock().unwrap_or_else(|e| e.into_inner());
        {
            // Before reading the newest row: a registration committed after that read notes
            // itself after this, so it is pending for the next round.
            let mut st = self.state();
            st.pending = false;
            st.first = None;
            st.last = None;
        }
        let res = (|| {
            let Some(upto) = target.last_unsynced()? else {
                return Ok(None);
            };
            target.sync()?;
            target.clear_unsynced(upto)?;
            Ok(Some(upto))
        })();
        match &res {
            Ok(_) => {
                self.state().rounds += 1;
                self.wake.notify_all();
            }
            Err(_) => self.note(),
        }
        res
    }

    /// Rounds that finished without an error so far.
    pub fn rounds(&self) -> u64 {
        self.state().rounds
    }

    /// Waits until more than `seen` rounds have finished, at most `timeout`; whether they have.
    pub fn wait_rounds(&self, seen: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.state();
        while st.rounds <= seen {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .wake
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Waits until a round is due: true, or false once stopped.
    fn wait_due(&self) -> bool {
        let mut st = self.state();
        loop {
            if st.stopped {
                return false;
            }
            let due = match (st.pending, st.first, st.last) {
                (true, Some(first), Some(last)) => Some((first + MAX_DELAY).min(last + QUIET)),
                _ => None,
            };
            st = match due {
                None => self.wake.wait(st).unwrap_or_else(|e| e.into_inner()),
                Some(due) => {
                    let now = Instant::now();
                    if now >= due {
                        return true;
                    }
                    self.wake
                        .wait_timeout(st, due - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }

    /// Waits `d`, or less if stopped meanwhile; false once stopped.
    fn pause(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let mut st = self.state();
        while !st.stopped {
            let now = Instant::now();
            if now >= deadline {
                return true;
            }
            st = self
                .wake
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        false
    }
}

/// Starts the syncer thread of `store` (after the lockdown: threads must not exist before it).
/// The thread holds the store weakly and ends when it is dropped or [`Syncer::stop`]ped.
pub fn start(store: &Arc<Store>) -> std::io::Result<()> {
    let weak: Weak<Store> = Arc::downgrade(store);
    let syncer = store.syncer.clone();
    std::thread::Builder::new()
        .name("syncer".into())
        .spawn(move || {
            while syncer.wait_due() {
                let Some(store) = weak.upgrade() else { break };
                if let Err(e) = syncer.round(&*store) {
                    log::warn!("syncing added paths: {e}; trying again");
                    drop(store);
                    if !syncer.pause(RETRY) {
                        break;
                    }
                }
            }
        })
        .map(drop)
}

/// Whether a test asked for the syncer never to run (`STOCKADE_TEST_HOLD_SYNC`, honoured by
/// debug builds only), so that it can stop the store-writer with rows left over.
pub fn held_by_test() -> bool {
    cfg!(debug_assertions) && std::env::var_os("STOCKADE_TEST_HOLD_SYNC").is_some()
}

/// What [`recover`] found.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Paths that were listed and still registered, all hashed.
    pub checked: usize,
    /// De-registered: damaged, or referring to a damaged path.
    pub invalidated: Vec<StorePath>,
    /// Damaged but left registered: a path outside the list refers to it.
    pub kept: Vec<StorePath>,
}

/// Checks the paths a store-writer that did not stop cleanly left in `StockadeUnsynced` (see
/// the module's comment), de-registers the damaged ones, syncs and empties the table. Runs at
/// start, before any client is served.
pub fn recover(store: &Store) -> Result<Recovery, RecoverError> {
    let rows = store.db().unsynced()?;
    let mut out = Recovery::default();
    if rows.is_empty() {
        return Ok(out);
    }
    log::info!("checking {} paths added before an unclean stop", rows.len());
    let mut listed: BTreeSet<StorePath> = BTreeSet::new();
    // Damaged path -> why.
    let mut damaged: BTreeMap<StorePath, String> = BTreeMap::new();
    // A path registered again (repair) has a row per registration.
    let texts: BTreeSet<&str> = rows.iter().map(|(_, t)| t.as_str()).collect();
    for text in texts {
        let Ok(p) = store.store_dir.parse(text) else {
            log::warn!("StockadeUnsynced names {text:?}, not a store path; ignored");
            continue;
        };
        let Some(info) = store.db().query_path_info(&p)? else {
            continue;
        };
        out.checked += 1;
        if let Err(why) = check_contents(store, &info) {
            damaged.insert(p.clone(), why);
        }
        listed.insert(p);
    }
    let (drop, kept) = to_invalidate(store, &listed, &damaged)?;
    if !drop.is_empty() {
        out.invalidated = store
            .write("de-registering damaged paths", |db| {
                db.invalidate_all(&drop)
            })
            .map_err(|e| RecoverError::Write(e.to_string()))?;
    }
    for p in &out.invalidated {
        let reason = damaged
            .get(p)
            .cloned()
            .unwrap_or_else(|| "it refers to a damaged path".to_string());
        let full = store.full(p);
        log::warn!("{full}: de-registered after an unclean stop: {reason}");
        store.audit.event(
            Severity::Warning,
            &[
                ("op", "recover"),
                ("outcome", "invalidated"),
                ("path", &full),
                ("reason", &reason),
            ],
        );
    }
    for p in &kept {
        let full = store.full(p);
        let reason = damaged.get(p).map_or("", String::as_str);
        log::error!(
            "{full} is damaged ({reason}) but a valid path refers to it; run nix-store --verify --check-contents --repair"
        );
        store.audit.event(
            Severity::Err,
            &[
                ("op", "recover"),
                ("outcome", "damaged"),
                ("path", &full),
                ("reason", reason),
            ],
        );
    }
    out.kept = kept;
    let counts = [
        rows.len().to_string(),
        out.checked.to_string(),
        out.invalidated.len().to_string(),
        out.kept.len().to_string(),
    ];
    store.audit.event(
        if out.invalidated.is_empty() && out.kept.is_empty() {
            Severity::Notice
        } else {
            Severity::Warning
        },
        &[
            ("op", "recover"),
            ("outcome", "finished"),
            ("listed", &counts[0]),
            ("checked", &counts[1]),
            ("invalidated", &counts[2]),
            ("damagedKept", &counts[3]),
        ],
    );
    // What was found intact may so far be in memory only (the store-writer was killed, the
    // machine kept running): sync before the rows go.
    if let Err(e) = store.syncer.round(store) {
        log::warn!("syncing after the recovery: {e}; the rows stay for the next round");
    }
    Ok(out)
}

/// Whether `info.path` on disk still hashes to its registered NAR hash (and size).
fn check_contents(store: &Store, info: &PathInfo) -> Result<(), String> {
    let mut h = nar::HashingWriter::sink(info.nar_hash.algo());
    nar::dump_at(store.store_fd(), OsStr::new(info.path.base_name()), &mut h)
        .map_err(|e| format!("cannot be read: {e}"))?;
    let (got, size, _) = h.finish();
    if got != info.nar_hash {
        return Err(format!(
            "its contents hash to {}, not to the registered {}",
            got.to_typed(Encoding::Base32),
            info.nar_hash.to_typed(Encoding::Base32)
        ));
    }
    if info.nar_size != 0 && size != info.nar_size {
        return Err(format!(
            "its NAR is {size} bytes, not the registered {}",
            info.nar_size
        ));
    }
    Ok(())
}

/// Which paths to de-register: the damaged ones and, transitively, the listed paths that refer
/// to them (registered in the same unsynced window, they cannot stay valid without them).
/// A path a registered path outside the list refers to is kept, with everything it refers to
/// (Nix's verify does the same for a missing path with valid referrers); the second set says
/// which damaged paths were kept that way.
fn to_invalidate(
    store: &Store,
    listed: &BTreeSet<StorePath>,
    damaged: &BTreeMap<StorePath, String>,
) -> Result<(BTreeSet<StorePath>, Vec<StorePath>), DbError> {
    let db = store.db();
    let mut bad: BTreeSet<StorePath> = damaged.keys().cloned().collect();
    let mut queue: Vec<StorePath> = bad.iter().cloned().collect();
    let mut keep: BTreeSet<StorePath> = BTreeSet::new();
    while let Some(p) = queue.pop() {
        for r in db.query_referrers(&p)? {
            if r == p {
                continue;
            }
            if listed.contains(&r) {
                if bad.insert(r.clone()) {
                    queue.push(r);
                }
            } else {
                keep.insert(p.clone());
            }
        }
    }
    let mut queue: Vec<StorePath> = keep.iter().cloned().collect();
    while let Some(p) = queue.pop() {
        let refs = db
            .query_path_info(&p)?
            .map(|i| i.references)
            .unwrap_or_default();
        for r in refs {
            if r != p && bad.contains(&r) && keep.insert(r.clone()) {
                queue.push(r);
            }
        }
    }
    let kept = keep
        .iter()
        .filter(|p| damaged.contains_key(*p))
        .cloned()
        .collect();
    let drop = bad.difference(&keep).cloned().collect();
    Ok((drop, kept))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// A stand-in for the store: the rows' sequence numbers.
    #[derive(Default)]
    struct Fake {
        rows: RefCell<Vec<i64>>,
        next: RefCell<i64>,
        syncs: RefCell<u32>,
        fail_sync: RefCell<bool>,
        /// An add commits while the sync runs.
        add_during_sync: RefCell<bool>,
    }

    impl Fake {
        fn add(&self) -> i64 {
            let mut n = self.next.borrow_mut();
            *n += 1;
            self.rows.borrow_mut().push(*n);
            *n
        }
    }

    impl SyncTarget for Fake {
        fn last_unsynced(&self) -> Result<Option<i64>, SyncError> {
            Ok(self.rows.borrow().iter().copied().max())
        }
        fn sync(&self) -> Result<(), SyncError> {
            *self.syncs.borrow_mut() += 1;
            if *self.add_during_sync.borrow() {
                self.add();
            }
            if *self.fail_sync.borrow() {
                return Err(SyncError::Sync {
                    what: "store",
                    errno: Errno::EIO,
                });
            }
            Ok(())
        }
        fn clear_unsynced(&self, upto: i64) -> Result<(), SyncError> {
            self.rows.borrow_mut().retain(|&s| s > upto);
            Ok(())
        }
    }

    #[test]
    fn a_round_clears_what_was_committed_before_it_and_nothing_after() {
        let s = Syncer::default();
        let f = Fake::default();
        f.add();
        s.note();
        f.add();
        s.note();
        assert!(s.pending());
        *f.add_during_sync.borrow_mut() = true;
        assert_eq!(s.round(&f).unwrap(), Some(2));
        assert_eq!(
            *f.rows.borrow(),
            vec![3],
            "the row added during the sync stays"
        );
        assert_eq!(*f.syncs.borrow(), 1);
        *f.add_during_sync.borrow_mut() = false;
        s.note();
        assert!(s.pending());
        assert_eq!(s.round(&f).unwrap(), Some(3));
        assert!(f.rows.borrow().is_empty());
        assert!(!s.pending());
    }

    #[test]
    fn a_round_without_rows_does_not_sync() {
        let s = Syncer::default();
        let f = Fake::default();
        s.note();
        assert_eq!(s.round(&f).unwrap(), None);
        assert_eq!(*f.syncs.borrow(), 0);
        assert!(!s.pending());
    }

    #[test]
    fn a_failed_sync_deletes_nothing_and_stays_pending() {
        let s = Syncer::default();
        let f = Fake::default();
        f.add();
        s.note();
        *f.fail_sync.borrow_mut() = true;
        assert!(s.round(&f).is_err());
        assert_eq!(*f.rows.borrow(), vec![1]);
        assert!(s.pending(), "a failed round must be retried");
        *f.fail_sync.borrow_mut() = false;
        assert_eq!(s.round(&f).unwrap(), Some(1));
        assert!(f.rows.borrow().is_empty());
    }

    #[test]
    fn a_note_makes_a_round_due_within_the_delays() {
        let s = Syncer::default();
        s.note();
        // Due at most MAX_DELAY after the first note, so this returns (no stop needed).
        assert!(s.wait_due());
        s.stop();
        assert!(!s.wait_due(), "a stopped syncer is never due");
        assert!(!s.pause(Duration::from_secs(3600)));
    }
}
