//! `min-free` / `max-free`: when the store's file system has less than `min-free` bytes
//! available, collect garbage until `max-free` are, as Nix's autoGC does. Checked at most
//! every `min-free-check-interval` seconds, before an add (which waits for a collection that
//! runs, so adds do not fill the disk meanwhile) and when a build starts (which does not
//! wait). The collection runs in a thread of its own, audited as `trigger=min-free`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use stockade_common::ipc::msg::ClientIdentity;
use stockade_common::ipc::writer::{CollectGarbage, GcAction};

use crate::store::Store;

#[derive(Default)]
pub struct AutoGc {
    running: bool,
    last_check: Option<Instant>,
    /// Available bytes after the last automatic collection (None: none yet).
    avail_after: Option<u64>,
}

/// Starts an automatic collection if space is short; with `wait`, returns once any running
/// one has ended.
pub fn auto_gc(store: &Arc<Store>, wait: bool) {
    let s = store.cfg.gc;
    if s.min_free == 0 {
        return;
    }
    let state = &store.gc.auto;
    let mut st = state.0.lock().unwrap_or_else(|e| e.into_inner());
    if !st.running {
        let now = Instant::now();
        let interval = Duration::from_secs(s.min_free_check_interval);
        let due = match st.last_check {
            None => true,
            Some(t) => now.duration_since(t) >= interval,
        };
        if !due {
            return;
        }
        st.last_check = Some(now);
        let Some(avail) = available(store) else {
            return;
        };
        if avail >= s.min_free || avail >= s.max_free {
            return;
        }
        // Nothing much freed last time: collecting again would not help.
        if st
            .avail_after
            .is_some_and(|a| avail as f64 > a as f64 * 0.97)
        {
            return;
        }
        st.running = true;
        let to_free = s.max_free - avail;
        let store2 = store.clone();
        let spawned = std::thread::Builder::new()
            .name("auto-gc".into())
            .spawn(move || run(&store2, to_free));
        if spawned.is_err() {
            st.running = false;
            return;
        }
    }
    while wait && st.running {
        st = state.1.wait(st).unwrap_or_else(|e| e.into_inner());
    }
}

fn run(store: &Arc<Store>, to_free: u64) {
    log::info!("running auto-GC to free {to_free} bytes");
    let me = ClientIdentity {
        conn_id: 0,
        uid: nix::unistd::geteuid().as_raw(),
        gid: nix::unistd::getegid().as_raw(),
        pid: std::process::id() as i32,
        trusted: true,
        user_name: Some("auto-gc (min-free)".into()),
    };
    let req = CollectGarbage {
        action: GcAction::DeleteDead,
        paths: Vec::new(),
        max_freed: to_free,
    };
    if let Err(e) = super::collect_garbage(store, &me, &req, &mut |_, _| {}) {
        log::warn!("auto-GC: {e}");
    }
    let after = available(store);
    let state = &store.gc.auto;
    let mut st = state.0.lock().unwrap_or_else(|e| e.into_inner());
    st.running = false;
    st.avail_after = after;
    st.last_check = Some(Instant::now());
    drop(st);
    state.1.notify_all();
}

/// Bytes available to unprivileged users on the store's file system.
fn available(store: &Store) -> Option<u64> {
    let st = nix::sys::statvfs::fstatvfs(&store.store_fd).ok()?;
    Some((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
}
