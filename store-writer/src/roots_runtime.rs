//! Runtime GC roots: the store paths running processes use. Reading them needs the ptrace
//! access check on every `/proc/<pid>` (`CAP_SYS_PTRACE`, and `CAP_DAC_READ_SEARCH` for other
//! users' `fd` directories and `environ`), which the store-writer must not hold, and its
//! Landlock domain alone would keep it from every process outside it. So it asks the master,
//! whose roots-reader holds them (`roots-reader/`, `master/src/roots.rs`), over its control
//! channel: `FindRuntimeRoots { id }`, answered by `RuntimeRoots { id, .. }` chunks that the
//! control loop routes here, as [`crate::gclink`] does for gc-socket connections.
//!
//! The answer is `(target, link)` pairs in the order the reader found them;
//! [`crate::roots`] builds Nix's maps from them. Every pair is checked again here
//! ([`stockade_common::ipc::roots::check_pair`]), and the store-writer still parses each
//! target as a store path and keeps only valid ones: the reader and the master are trusted
//! for nothing but which processes use what.
//!
//! Without a master that answers (unit tests, tools, `stockade daemon --stdio`, whose master
//! runs no roots-reader), or when the answer does not come or is refused, the store-writer
//! reads `/proc` itself with the same scan, and finds what its own rights let it see.
//!
//! One store-writer process serves one store over one control channel, so the link is a
//! process-wide one ([`install`]), reachable from [`crate::roots`] without a
//! [`crate::store::Store`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use stockade_common::ipc::msg::StoreWriterToMaster;
use stockade_common::ipc::roots::Tally;
use stockade_common::ipc::Channel;
use stockade_common::store_path::StoreDir;
use stockade_roots_reader::scan::{self, Pair};

/// How long an answer may take: the master gives the reader 20 seconds per scan, and a request
/// may wait for the scan before its own.
const ANSWER_WAIT: Duration = Duration::from_secs(50);

type Answer = Result<Vec<Pair>, String>;

/// An answer being received.
struct Pending {
    roots: Vec<Pair>,
    tally: Tally,
    tx: SyncSender<Answer>,
}

/// The way to the master's roots-reader.
struct RootsLink {
    /// The logical store directory every target must be under.
    store_dir: String,
    /// A handle on the control channel, for sending only.
    send: Mutex<Channel>,
    pending: Mutex<HashMap<u64, Pending>>,
    next: AtomicU64,
}

static LINK: OnceLock<RootsLink> = OnceLock::new();

/// From now on runtime roots are asked of the master, over `send` (a handle on the control
/// channel). Once per process; false if a link was installed already.
pub fn install(send: Channel, store_dir: &str) -> bool {
    // Request ids start from the pid, so answers meant for a previous store-writer (the
    // master restarts one when the store was replaced) match no request of this one.
    let first = (u64::from(std::process::id()) << 32) | 1;
    LINK.set(RootsLink {
        store_dir: store_dir.to_string(),
        send: Mutex::new(send),
        pending: Mutex::new(HashMap::new()),
        next: AtomicU64::new(first),
    })
    .is_ok()
}

/// The control loop got a `RuntimeRoots` chunk: added to its request's answer, which is
/// complete with `last`, or refused with `error` or a pair that fails
/// [`stockade_common::ipc::roots::check_pair`].
pub fn answer(id: u64, roots: Vec<Pair>, error: Option<String>, last: bool) {
    let Some(link) = LINK.get() else { return };
    let mut pending = link.pending.lock().unwrap_or_else(|e| e.into_inner());
    let Some(p) = pending.get_mut(&id) else {
        return;
    };
    let outcome = match error {
        Some(why) => Some(Err(why)),
        None => match p.tally.add(&link.store_dir, &roots) {
            Err(e) => Some(Err(format!("refused: {e}"))),
            Ok(()) => {
                p.roots.extend(roots);
                last.then(|| Ok(std::mem::take(&mut p.roots)))
            }
        },
    };
    if let Some(answer) = outcome {
        if let Some(p) = pending.remove(&id) {
            let _ = p.tx.try_send(answer);
        }
    }
}

impl RootsLink {
    /// Asks the master and waits for the whole answer.
    fn ask(&self) -> Answer {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = sync_channel(1);
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                id,
                Pending {
                    roots: Vec::new(),
                    tally: Tally::default(),
                    tx,
                },
            );
        let sent = self
            .send
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(&StoreWriterToMaster::FindRuntimeRoots { id }, &[]);
        let answer = match sent {
            Ok(()) => rx
                .recv_timeout(ANSWER_WAIT)
                .unwrap_or_else(|_| Err("no answer from the master".to_string())),
            Err(e) => Err(e.to_string()),
        };
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        answer
    }
}

/// The runtime roots under `store_dir` as `(target, link)` pairs in the order found: from the
/// master's roots-reader when there is one, else read here.
pub fn runtime_pairs(store_dir: &StoreDir) -> Vec<Pair> {
    // Before the roots-reader the store-writer always read /proc itself (test builds only).
    let link = if cfg!(feature = "without-roots-reader") {
        None
    } else {
        LINK.get()
    };
    if let Some(link) = link {
        match link.ask() {
            Ok(pairs) => return pairs,
            Err(e) => log::warn!(
                "runtime roots: no answer from the roots-reader ({e}); reading /proc here, \
                 without other users' processes"
            ),
        }
    }
    match scan::runtime_roots(store_dir.as_str()) {
        Ok(pairs) => pairs,
        Err(e) => {
            log::warn!("runtime roots: {e}; none reported");
            Vec::new()
        }
    }
}
