//! Removing what the collector has invalidated. A collection with no byte limit hands each
//! invalidated batch to a thread of its own, which removes the files while the collector
//! decides and invalidates the next batch (the two halves cost about the same); with a limit,
//! the collector removes each path itself, to stop right after the one that reaches it.

use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::thread::JoinHandle;

use crate::sys;

/// Entries to remove (name in the store, full path), and the hash parts whose pending mark
/// ends once they are gone.
pub struct Job {
    pub entries: Vec<(OsString, String)>,
    pub hashes: Vec<String>,
}

/// A job done: each full path with the bytes its removal freed.
pub struct Done {
    pub gone: Vec<(String, u64)>,
    pub hashes: Vec<String>,
}

/// Removes a job's entries below `store`, in order.
pub fn run(store: &OwnedFd, job: Job) -> Done {
    let mut gone = Vec::with_capacity(job.entries.len());
    for (name, full) in job.entries {
        let freed = match sys::remove_tree_freeing(store.as_fd(), &name) {
            Ok(n) => n,
            Err(e) => {
                // Invalid already: a later collection removes what is left.
                log::warn!("deleting {full}: {e}");
                0
            }
        };
        gone.push((full, freed));
    }
    Done {
        gone,
        hashes: job.hashes,
    }
}

/// The removing thread: jobs in, results out, in order.
pub struct Pipeline {
    jobs: Option<Sender<Job>>,
    done: Receiver<Done>,
    thread: Option<JoinHandle<()>>,
    /// Jobs sent and not yet received back.
    pub in_flight: usize,
}

impl Pipeline {
    pub fn start(store: OwnedFd) -> std::io::Result<Pipeline> {
        let (jobs, job_rx) = channel::<Job>();
        let (done_tx, done) = channel::<Done>();
        let thread = std::thread::Builder::new()
            .name("gc-delete".into())
            .spawn(move || {
                for job in job_rx {
                    if done_tx.send(run(&store, job)).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Pipeline {
            jobs: Some(jobs),
            done,
            thread: Some(thread),
            in_flight: 0,
        })
    }

    /// Queues `job`; gives it back if the thread is gone.
    pub fn send(&mut self, job: Job) -> Result<(), Job> {
        match self.jobs.as_ref().map(|j| j.send(job)) {
            Some(Ok(())) => {
                self.in_flight += 1;
                Ok(())
            }
            Some(Err(e)) => Err(e.0),
            None => Err(Job {
                entries: Vec::new(),
                hashes: Vec::new(),
            }),
        }
    }

    /// A finished job, waiting for one if `wait` (None: nothing in flight, or not yet).
    pub fn next(&mut self, wait: bool) -> Option<Done> {
        if self.in_flight == 0 {
            return None;
        }
        let got = if wait {
            self.done.recv().ok()
        } else {
            self.done.try_recv().ok()
        };
        if got.is_some() {
            self.in_flight -= 1;
        } else if wait {
            // The thread died: nothing more will come.
            self.in_flight = 0;
        }
        got
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
