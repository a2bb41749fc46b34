//! A compromised broker that tries to take what others need (SECURITY.md A12, A63): memory
//! and threads past its budget (`broker-memory-max`, `broker-pids-max`), and the
//! store-writer's attention.
//!
//! - `memory-hog`: holds 1 MiB blocks, every byte written, up to [`HOG_MEMORY`]. Its cgroup
//!   ends it at the budget (no answer: the connection closes); under `RLIMIT_DATA` an
//!   allocation fails and it answers `refused ENOMEM after <n> MiB`; with no budget it
//!   answers `SUCCEEDED held <n> MiB`.
//! - `pids-hog`: starts threads that wait, up to [`HOG_THREADS`]: `refused after <n> threads:
//!   <error>` at the budget, else `SUCCEEDED <n> threads`; they all end before it answers.
//! - `writer-flood`: sends `IsValidPath` requests to the store-writer without reading an
//!   answer until its channel takes no more (the store-writer's session for this broker then
//!   waits to send), answers `flooded sent=<n>` and leaves the answers unread while the
//!   client does anything else.

use std::sync::mpsc;
use std::time::Duration;

use stockade_common::hash::Hash;
use stockade_common::ipc::writer::{self as w, BrokerToStoreWriter};
use stockade_common::ipc::{self, Channel};
use stockade_common::store_path::StoreDir;

/// What `memory-hog` tries to hold: far over any budget a test sets, little for the machine.
const HOG_MEMORY: usize = 1 << 30;
/// How many threads `pids-hog` tries to have at once.
const HOG_THREADS: usize = 256;
/// `writer-flood` stops after this many requests even if the channel still takes them.
const FLOOD_MAX: u64 = 1 << 20;

pub fn memory_hog() -> String {
    const BLOCK: usize = 1 << 20;
    let mut held: Vec<Vec<u8>> = Vec::new();
    while held.len() * BLOCK < HOG_MEMORY {
        let mut block = Vec::new();
        if block.try_reserve_exact(BLOCK).is_err() {
            return format!("refused ENOMEM after {} MiB", held.len());
        }
        // Written, so every page is really in use.
        block.resize(BLOCK, 0xa5);
        held.push(block);
    }
    format!("SUCCEEDED held {} MiB", held.len())
}

pub fn pids_hog() -> String {
    let mut started = Vec::new();
    let mut refused = None;
    for _ in 0..HOG_THREADS {
        let (tx, rx) = mpsc::channel::<()>();
        let spawned = std::thread::Builder::new()
            .stack_size(64 << 10)
            .spawn(move || {
                // Ends when the sender is dropped.
                let _ = rx.recv();
            });
        match spawned {
            Ok(handle) => started.push((tx, handle)),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let n = started.len();
    for (tx, handle) in started {
        drop(tx);
        let _ = handle.join();
    }
    match refused {
        Some(e) => format!("refused after {n} threads: {e}"),
        None => format!("SUCCEEDED {n} threads"),
    }
}

pub fn writer_flood(writer: &mut Channel, sd: &StoreDir) -> String {
    let path = match sd.make_text_path(
        "evil-flood",
        &Hash::sha256(b"stockade-evil"),
        &Default::default(),
    ) {
        Ok(p) => p,
        Err(e) => return format!("refused {e}"),
    };
    // Only to notice that the queue is full; the answer does not depend on how long.
    if let Err(e) = writer.set_write_timeout(Some(Duration::from_secs(1))) {
        return format!("refused {e}");
    }
    let req: BrokerToStoreWriter = w::IsValidPath { path }.into();
    let mut sent = 0u64;
    let how = loop {
        if sent >= FLOOD_MAX {
            break "max".to_string();
        }
        match writer.send(&req, &[]) {
            Ok(()) => sent += 1,
            Err(ipc::Error::Timeout) => break "full".to_string(),
            Err(e) => break e.to_string(),
        }
    };
    let _ = writer.set_write_timeout(None);
    format!("flooded sent={sent} stop={how}")
}
