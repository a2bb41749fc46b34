//! The roots-reader as the master sees it, and the relay of its answers to the store-writer.
//!
//! # Started once, kept running
//!
//! Finding runtime GC roots needs `CAP_SYS_PTRACE` and `CAP_DAC_READ_SEARCH` (the ptrace access
//! check of `/proc/<pid>/{exe,cwd,fd/*,maps,environ}`, and other users' `fd` directories and
//! `environ`). The store-writer must hold neither, so a process of its own does it, under a
//! uid of its own with exactly those two capabilities. The master can give them only before
//! its own lockdown (restrict.rs): afterwards its bounding set holds `CAP_SETUID`,
//! `CAP_SETGID`, `CAP_SETPCAP` and `CAP_KILL` only, and `no_new_privs` forbids regaining any.
//! A reader spawned per request would be simpler and would hold nothing between collections,
//! but the master could not give it the capabilities then, and keeping them in the master
//! for that (a root process that accepts connections) is what the split is for. So the reader
//! is started with the builder-helper, before the lockdown, and kept; a garbage collection or a
//! FindRoots is rare, and between requests it sleeps in `recvmsg` on its channel. If it dies it
//! is not restarted (the master could not): the store-writer then reads `/proc` itself again,
//! which finds only what its own rights let it see, and the master logs it.
//!
//! # Relay
//!
//! The store-writer asks (`FindRuntimeRoots { id }`); the master asks the reader
//! (`Find { scan }`) and passes each chunk of the answer on as `RuntimeRoots { id, .. }`.
//! Requests that come while a scan runs wait and share the next scan (at most
//! [`MAX_WAITING`]), so a flood of FindRoots costs one scan at a time. The master reads the
//! reader like any less trusted peer: messages are bounded by the channel's limit, each pair
//! is checked ([`stockade_common::ipc::roots::check_pair`]) and the totals bounded ([`Tally`])
//! before anything is passed on, and a scan gets [`SCAN_TIMEOUT`]; the loop handles one
//! message per turn, so a chatty reader cannot starve the accept loop. A reader that breaks
//! the protocol (a bad pair, a message out of turn) is killed. One that is only slow is left
//! alone: its askers get an error at the deadline (and read `/proc` themselves), and what
//! it sends for that scan later is dropped.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use stockade_common::ipc::msg::VERSION;
use stockade_common::ipc::roots::{
    MasterToRootsReader, RootsReaderConfig, RootsReaderToMaster, Tally,
};
use stockade_common::ipc::{self, Channel};

use crate::error::{Error, Result};
use crate::spawn::{self, Confinement};
use crate::writer::StoreWriter;

/// How long the reader may take to start and lock down.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a message may wait for room in the reader's queue.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one scan may take before its askers get an error.
pub const SCAN_TIMEOUT: Duration = Duration::from_secs(20);
/// Requests waiting for the next scan at most; more are answered with an error at once.
pub const MAX_WAITING: usize = 1024;

/// The scan being run, and for whom.
#[derive(Debug)]
struct Scan {
    scan: u64,
    askers: Vec<u64>,
    deadline: Instant,
    tally: Tally,
}

/// A running roots-reader and its requests.
#[derive(Debug)]
pub struct RootsReader {
    pub pid: i32,
    chan: Channel,
    store_dir: String,
    alive: bool,
    /// The next scan's number; every number below it has been sent.
    next_scan: u64,
    current: Option<Scan>,
    waiting: Vec<u64>,
}

impl RootsReader {
    /// Starts `program`, exchanges `Hello`s and sends the configuration; returns once it is
    /// `Ready` (locked down).
    pub fn start(
        program: &Path,
        confinement: Confinement,
        config: RootsReaderConfig,
    ) -> Result<RootsReader> {
        let what = "roots-reader channel";
        let (pid, ours) = spawn::service(program, confinement, what, START_TIMEOUT, SEND_TIMEOUT)?;
        let store_dir = config.store_dir.clone();
        let mut r = RootsReader {
            pid,
            chan: ours,
            store_dir,
            alive: true,
            next_scan: 1,
            current: None,
            waiting: Vec::new(),
        };
        if let Err(e) = r.handshake(config) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            return Err(e);
        }
        r.chan.set_read_timeout(None).map_err(Error::ipc(what))?;
        Ok(r)
    }

    fn handshake(&mut self, config: RootsReaderConfig) -> Result<()> {
        let what = "talking to the roots-reader";
        self.chan
            .send(&MasterToRootsReader::Hello { version: VERSION }, &[])
            .map_err(Error::ipc(what))?;
        match self.recv().map_err(Error::ipc(what))? {
            RootsReaderToMaster::Hello { version } if version == VERSION => {}
            RootsReaderToMaster::Hello { version } => {
                return Err(Error::VersionMismatch {
                    got: version,
                    want: VERSION,
                })
            }
            RootsReaderToMaster::Failed { reason } => return Err(Error::RootsReaderFailed(reason)),
            other => return Err(Error::Other(unexpected(&other, "Hello"))),
        }
        self.chan
            .send(&MasterToRootsReader::Start(config), &[])
            .map_err(Error::ipc(what))?;
        match self.recv().map_err(Error::ipc(what))? {
            RootsReaderToMaster::Ready { confinement } => {
                log::info!("roots-reader (pid {}) confined: {confinement}", self.pid);
                Ok(())
            }
            RootsReaderToMaster::Failed { reason } => Err(Error::RootsReaderFailed(reason)),
            other => Err(Error::Other(unexpected(&other, "Ready"))),
        }
    }

    fn recv(&mut self) -> std::result::Result<RootsReaderToMaster, ipc::Error> {
        self.chan.recv::<RootsReaderToMaster>().map(|(m, _fds)| m)
    }

    /// The channel, to poll while the reader lives.
    pub fn channel(&self) -> Option<&Channel> {
        self.alive.then_some(&self.chan)
    }

    /// When the running scan times out, if one runs.
    pub fn deadline(&self) -> Option<Instant> {
        self.current.as_ref().map(|s| s.deadline)
    }

    /// The store-writer's request `id`.
    pub fn ask(&mut self, id: u64, writer: &mut StoreWriter) {
        if !self.alive {
            answer_error(writer, id, "the roots-reader is not running");
            return;
        }
        if self.waiting.len() >= MAX_WAITING {
            answer_error(writer, id, "too many runtime-root requests at once");
            return;
        }
        self.waiting.push(id);
        if self.current.is_none() {
            self.next(writer);
        }
    }

    /// Starts a scan for every waiting request, if there are any.
    fn next(&mut self, writer: &mut StoreWriter) {
        if self.waiting.is_empty() || !self.alive {
            return;
        }
        let scan = self.next_scan;
        self.next_scan += 1;
        let askers = std::mem::take(&mut self.waiting);
        if let Err(e) = self.chan.send(&MasterToRootsReader::Find { scan }, &[]) {
            for id in askers {
                answer_error(writer, id, &format!("asking the roots-reader: {e}"));
            }
            self.broken(writer, &format!("cannot send it a request: {e}"));
            return;
        }
        self.current = Some(Scan {
            scan,
            askers,
            deadline: Instant::now() + SCAN_TIMEOUT,
            tally: Tally::default(),
        });
    }

    /// One message from the reader (its channel is readable).
    pub fn handle_message(&mut self, writer: &mut StoreWriter) {
        let msg = match self.recv() {
            Ok(m) => m,
            Err(ipc::Error::Closed) => {
                self.gone(writer, "its channel closed");
                return;
            }
            Err(e) => {
                self.broken(writer, &e.to_string());
                return;
            }
        };
        let (scan, outcome) = match msg {
            RootsReaderToMaster::Roots { scan, pairs, last } => (scan, Ok((pairs, last))),
            RootsReaderToMaster::Error { scan, reason } => (scan, Err(reason)),
            other => {
                self.broken(writer, &unexpected(&other, "Roots or Error"));
                return;
            }
        };
        let Some(cur) = self.current.as_mut().filter(|c| c.scan == scan) else {
            if scan >= self.next_scan {
                self.broken(
                    writer,
                    &format!("an answer to scan {scan}, never asked for"),
                );
            }
            // Else the rest of a scan that timed out: dropped.
            return;
        };
        let (pairs, last) = match outcome {
            Ok(p) => p,
            Err(reason) => {
                log::warn!("the roots-reader could not scan /proc: {reason}");
                self.finish(writer, Some(reason));
                return;
            }
        };
        if let Err(e) = cur.tally.add(&self.store_dir, &pairs) {
            self.broken(writer, &format!("its answer is refused: {e}"));
            return;
        }
        for id in &cur.askers {
            if let Err(e) = writer.runtime_roots(*id, pairs.clone(), None, last) {
                log::warn!("{e}");
            }
        }
        if last {
            self.current = None;
            self.next(writer);
        }
    }

    /// The running scan's deadline passed: its askers get an error.
    pub fn check_timeout(&mut self, writer: &mut StoreWriter) {
        if self.deadline().is_some_and(|d| Instant::now() >= d) {
            log::warn!(
                "the roots-reader (pid {}) did not answer within {}s",
                self.pid,
                SCAN_TIMEOUT.as_secs()
            );
            self.finish(
                writer,
                Some("the roots-reader did not answer in time".into()),
            );
        }
    }

    /// Ends the running scan (with `error` for its askers), then starts the next.
    fn finish(&mut self, writer: &mut StoreWriter, error: Option<String>) {
        if let Some(cur) = self.current.take() {
            if let Some(e) = &error {
                for id in cur.askers {
                    answer_error(writer, id, e);
                }
            }
        }
        self.next(writer);
    }

    /// The reader broke the protocol: killed, and every request answered with an error.
    fn broken(&mut self, writer: &mut StoreWriter, why: &str) {
        log::error!("the roots-reader (pid {}) is killed: {why}", self.pid);
        if self.alive {
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
        }
        self.gone(writer, why);
    }

    /// The reader is gone (or must be treated so): every request gets an error, and later
    /// ones at once.
    fn gone(&mut self, writer: &mut StoreWriter, why: &str) {
        if self.alive {
            log::error!(
                "the roots-reader (pid {}) is gone ({why}): the store-writer reads runtime \
                 roots itself, without other users' processes",
                self.pid
            );
        }
        self.alive = false;
        let why = format!("the roots-reader is gone: {why}");
        let askers = self.current.take().map(|c| c.askers).unwrap_or_default();
        for id in askers.into_iter().chain(std::mem::take(&mut self.waiting)) {
            answer_error(writer, id, &why);
        }
    }

    /// The reader exited (`how`: as the reaper describes it); `expected` while shutting down.
    pub fn exited(&mut self, writer: &mut StoreWriter, how: &(&str, String), expected: bool) {
        if expected {
            log::info!("the roots-reader exited ({} {})", how.0, how.1);
            self.alive = false;
        }
        self.gone(writer, &format!("{} {}", how.0, how.1));
    }

    /// Asks it to exit.
    pub fn shutdown(&mut self) {
        if self.alive && self.chan.send(&MasterToRootsReader::Shutdown, &[]).is_err() {
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGTERM);
        }
    }
}

fn answer_error(writer: &mut StoreWriter, id: u64, why: &str) {
    if let Err(e) = writer.runtime_roots(id, Vec::new(), Some(why.to_string()), true) {
        log::warn!("{e}");
    }
}

fn unexpected(msg: &RootsReaderToMaster, expected: &str) -> String {
    // The variant name only: a reader's strings go no further than the log in bounded form.
    let name = format!("{msg:?}");
    let name: String = name
        .chars()
        .take_while(|c| c.is_alphanumeric())
        .take(32)
        .collect();
    format!("unexpected message from the roots-reader: {name} instead of {expected}")
}

#[cfg(test)]
mod tests;
