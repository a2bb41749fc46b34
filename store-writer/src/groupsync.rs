//! One `fsync` of the store directory for many installs: each add that renamed a path into
//! the store waits for an fsync that started after its rename, and concurrent adds share one.
//! The store directory is synced before a path is registered, so a power cut can lose a
//! registration (leaving an unregistered path, which is garbage) but never leaves a
//! registration whose directory entry is gone.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::{Condvar, Mutex};

#[derive(Default)]
struct State {
    /// Tickets handed out (one per caller).
    asked: u64,
    /// Every ticket up to this one is covered by a finished fsync.
    done: u64,
    running: bool,
}

#[derive(Default)]
pub struct GroupSync {
    state: Mutex<State>,
    finished: Condvar,
}

impl GroupSync {
    /// Returns once an fsync of `dir` that began after this call has finished.
    pub fn sync(&self, dir: BorrowedFd<'_>) -> nix::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.asked += 1;
        let mine = st.asked;
        loop {
            if st.done >= mine {
                return Ok(());
            }
            if !st.running {
                // This fsync covers every ticket handed out so far.
                st.running = true;
                let covers = st.asked;
                drop(st);
                let res = nix::unistd::fsync(dir.as_raw_fd());
                st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                st.running = false;
                if res.is_ok() {
                    st.done = st.done.max(covers);
                }
                self.finished.notify_all();
                res?;
                continue;
            }
            st = self.finished.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::sync::Arc;

    #[test]
    fn every_caller_returns_after_a_sync() {
        let dir = Arc::new(std::fs::File::open("/tmp").unwrap());
        let gs = Arc::new(GroupSync::default());
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (gs, dir) = (gs.clone(), dir.clone());
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        gs.sync(dir.as_fd()).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let st = gs.state.lock().unwrap();
        assert_eq!(st.done, st.asked);
        assert_eq!(st.asked, 160);
    }
}
