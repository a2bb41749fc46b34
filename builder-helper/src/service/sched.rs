//! What every session shares: the brokers' sending ends, the builds in flight by derivation
//! (one build per derivation at a time; a second asker waits for it and gets the same
//! `Done`) and the global job slots (`max-jobs` across every broker, at most
//! `max-builds-per-uid` of them for one untrusted client uid). One lock guards all of it;
//! nothing slow happens under it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use stockade_common::ipc::builder::{BuildKind, BuildReport, BuilderToBroker, ClientIdentity};
use stockade_common::ipc::Channel;
use stockade_common::store_path::StorePath;

/// One broker's channel, as build threads see it.
pub struct Broker {
    pub client: ClientIdentity,
    out: Mutex<Channel>,
    /// A duplicate of the socket, to shut it down from any thread.
    sock: OwnedFd,
    /// Builds of this broker that have not had their `Done` yet.
    open: Mutex<HashSet<u64>>,
    /// A log line could not be sent in time: no more logs to it.
    stalled: AtomicBool,
}

impl Broker {
    pub fn new(client: ClientIdentity, out: Channel) -> std::io::Result<Broker> {
        let sock = out.as_fd().try_clone_to_owned()?;
        Ok(Broker {
            client,
            out: Mutex::new(out),
            sock,
            open: Mutex::new(HashSet::new()),
            stalled: AtomicBool::new(false),
        })
    }

    pub fn send(&self, msg: &BuilderToBroker) -> Result<(), stockade_common::ipc::Error> {
        self.out
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(msg, &[])
    }

    pub fn log(&self, id: u64, line: &[u8]) {
        if self.stalled.load(Ordering::Relaxed) {
            return;
        }
        let msg = BuilderToBroker::Log {
            id,
            line: line.to_vec(),
        };
        if let Err(e) = self.send(&msg) {
            log::warn!("conn {}: no more build logs: {e}", self.client.conn_id);
            self.stalled.store(true, Ordering::Relaxed);
        }
    }

    /// Sends `Done` and closes build `id` (in that order, under the same lock, so a broker
    /// may reuse `id` once it has its `Done`).
    pub fn done(&self, id: u64, report: BuildReport) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let msg = BuilderToBroker::Done {
            id,
            report: Box::new(report),
        };
        if let Err(e) = self.send(&msg) {
            log::info!("conn {}: cannot send Done: {e}", self.client.conn_id);
        }
        open.remove(&id);
    }

    /// Records a new build `id`; false when it is open already or too many are.
    pub fn open_build(&self, id: u64, max: usize) -> Result<(), &'static str> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.contains(&id) {
            return Err("a build with this id is open already");
        }
        if open.len() >= max {
            return Err("too many open builds");
        }
        open.insert(id);
        Ok(())
    }

    pub fn shut_down(&self) {
        let _ = nix::sys::socket::shutdown(self.sock.as_raw_fd(), nix::sys::socket::Shutdown::Both);
    }
}

/// Stops a build from another thread: the build's supervision polls the read end, which
/// becomes readable (end of file) when the write end is closed.
pub struct Cancel {
    read: OwnedFd,
    write: Mutex<Option<OwnedFd>>,
    flag: AtomicBool,
    /// The build's place in the queue for job slots (request order).
    ticket: u64,
}

impl Cancel {
    pub fn new() -> std::io::Result<Cancel> {
        Cancel::with_ticket(0)
    }

    fn with_ticket(ticket: u64) -> std::io::Result<Cancel> {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        Ok(Cancel {
            read,
            write: Mutex::new(Some(write)),
            flag: AtomicBool::new(false),
            ticket,
        })
    }

    fn fire(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.write.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    pub fn fired(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }
}

/// Someone waiting for a build's `Done`.
#[derive(Clone)]
pub struct Waiter {
    pub broker: Arc<Broker>,
    pub id: u64,
    /// Gets the log (the broker that started the build).
    pub follows: bool,
}

struct Entry {
    kind: BuildKind,
    waiters: Vec<Waiter>,
    cancel: Arc<Cancel>,
    /// Whether the entry holds the derivation (else it queues behind another kind's build).
    active: bool,
}

struct State {
    max_jobs: u32,
    running: u32,
    /// Slots one untrusted client uid may hold (0: no limit), and how many each holds.
    per_uid_max: u32,
    per_uid: HashMap<u32, u32>,
    /// The uid each running build's slot is counted against (by ticket); none for a build a
    /// trusted client waits for.
    charged: HashMap<u64, u32>,
    /// Builds by derivation; several only when they differ in kind (they run one after
    /// another).
    builds: HashMap<StorePath, Vec<Entry>>,
    threads: usize,
    shutting_down: bool,
    /// Job slots go to builds in the order they were requested (as Nix's worker starts
    /// them in the order of its goals), not to whichever thread wakes first; a build whose
    /// uids are all at their limit is passed over (ticket → derivation).
    next_ticket: u64,
    slot_queue: BTreeMap<u64, StorePath>,
}

/// Whom a build's slot would be counted against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Charge {
    /// No limit applies (none configured, or a trusted client waits for it).
    Free,
    Uid(u32),
}

pub struct Scheduler {
    state: Mutex<State>,
    changed: Condvar,
}

/// What [`Scheduler::request`] decided.
pub enum Joined {
    /// Another broker's build of the same derivation will answer.
    Waiting,
    /// A new build: run it on a thread of its own.
    New(Arc<Cancel>),
}

impl Scheduler {
    /// `per_uid_max`: `max-builds-per-uid` (0: no limit).
    pub fn new(max_jobs: u32, per_uid_max: u32) -> Scheduler {
        Scheduler {
            state: Mutex::new(State {
                max_jobs,
                running: 0,
                per_uid_max,
                per_uid: HashMap::new(),
                charged: HashMap::new(),
                builds: HashMap::new(),
                threads: 0,
                shutting_down: false,
                next_ticket: 1,
                slot_queue: BTreeMap::new(),
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A broker asks for `drv`: joins the build of the same kind in flight, or starts one.
    pub fn request(
        &self,
        drv: &StorePath,
        kind: BuildKind,
        waiter: Waiter,
    ) -> std::io::Result<Joined> {
        let mut st = self.lock();
        let entries = st.builds.entry(drv.clone()).or_default();
        if let Some(e) = entries
            .iter_mut()
            .find(|e| e.kind == kind && !e.cancel.fired())
        {
            e.waiters.push(Waiter {
                follows: false,
                ..waiter
            });
            // A new waiter may lift the build over its uids' limits.
            self.changed.notify_all();
            return Ok(Joined::Waiting);
        }
        let active = entries.is_empty();
        let ticket = st.next_ticket;
        let cancel = Arc::new(Cancel::with_ticket(ticket)?);
        st.next_ticket += 1;
        st.slot_queue.insert(ticket, drv.clone());
        let entries = st.builds.entry(drv.clone()).or_default();
        entries.push(Entry {
            kind,
            waiters: vec![waiter],
            cancel: cancel.clone(),
            active,
        });
        st.threads += 1;
        Ok(Joined::New(cancel))
    }

    /// Called by a build thread first: waits until its derivation is not being built by a
    /// build of another kind. False when cancelled meanwhile.
    pub fn hold_drv(&self, drv: &StorePath, cancel: &Cancel) -> bool {
        let mut st = self.lock();
        loop {
            if cancel.fired() {
                return false;
            }
            let Some(entries) = st.builds.get_mut(drv) else {
                return false;
            };
            // First come, first built.
            if !entries.iter().any(|e| e.active) {
                if let Some(first) = entries.first_mut() {
                    first.active = true;
                }
            }
            match entries.iter().find(|e| is(e, cancel)) {
                Some(e) if e.active => return true,
                Some(_) => {}
                None => return false,
            }
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Who waits for this build now.
    pub fn waiters(&self, drv: &StorePath, cancel: &Cancel) -> Vec<Waiter> {
        let st = self.lock();
        entry(&st, drv, cancel)
            .map(|e| e.waiters.clone())
            .unwrap_or_default()
    }

    /// Takes a global job slot; false when cancelled (or no slot can ever be had). The first
    /// time the build waits because every uid that wants it is at `max-builds-per-uid`,
    /// `on_limit(uid, limit)` is called (without the lock held).
    pub fn take_slot(
        &self,
        drv: &StorePath,
        cancel: &Cancel,
        on_limit: impl FnOnce(u32, u32),
    ) -> bool {
        let mut on_limit = Some(on_limit);
        let mut st = self.lock();
        loop {
            if cancel.fired() || st.max_jobs == 0 {
                st.slot_queue.remove(&cancel.ticket);
                self.changed.notify_all();
                return false;
            }
            if st.running < st.max_jobs {
                if let Some((ticket, charge)) = first_startable(&st) {
                    if ticket == cancel.ticket {
                        st.slot_queue.remove(&ticket);
                        st.running += 1;
                        if let Charge::Uid(uid) = charge {
                            *st.per_uid.entry(uid).or_insert(0) += 1;
                            st.charged.insert(ticket, uid);
                        }
                        self.changed.notify_all();
                        return true;
                    }
                }
            }
            if let Err(Some(uid)) = charge_of(&st, drv, cancel.ticket) {
                if let Some(f) = on_limit.take() {
                    let limit = st.per_uid_max;
                    drop(st);
                    f(uid, limit);
                    st = self.lock();
                    continue;
                }
            }
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    pub fn max_jobs(&self) -> u32 {
        self.lock().max_jobs
    }

    /// The build is over: its waiters, for their `Done`. The derivation is free for the next
    /// build from here on.
    pub fn finish(&self, drv: &StorePath, cancel: &Cancel) -> Vec<Waiter> {
        let mut st = self.lock();
        let mut out = Vec::new();
        if let Some(entries) = st.builds.get_mut(drv) {
            if let Some(i) = entries.iter().position(|e| is(e, cancel)) {
                out = entries.remove(i).waiters;
            }
            if entries.is_empty() {
                st.builds.remove(drv);
            }
        }
        self.changed.notify_all();
        out
    }

    /// After the `Done`s: the slot (if taken) goes back, the thread is counted out.
    pub fn release(&self, slot: bool, cancel: &Cancel) {
        let mut st = self.lock();
        // A build that ended before taking its slot leaves the queue.
        st.slot_queue.remove(&cancel.ticket);
        if slot {
            st.running = st.running.saturating_sub(1);
            if let Some(uid) = st.charged.remove(&cancel.ticket) {
                if let Some(n) = st.per_uid.get_mut(&uid) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        st.per_uid.remove(&uid);
                    }
                }
            }
        }
        st.threads = st.threads.saturating_sub(1);
        self.changed.notify_all();
    }

    /// A broker no longer wants build `id` (or, with `id` none, any of its builds): builds
    /// nobody else waits for are cancelled. Returns the waiters removed, for their `Done`.
    pub fn withdraw(&self, conn_id: u64, id: Option<u64>) -> Vec<Waiter> {
        let mut st = self.lock();
        let mut gone = Vec::new();
        for entries in st.builds.values_mut() {
            for e in entries.iter_mut() {
                let before = e.waiters.len();
                e.waiters.retain(|w| {
                    let mine =
                        w.broker.client.conn_id == conn_id && (id.is_none() || id == Some(w.id));
                    if mine {
                        gone.push(w.clone());
                    }
                    !mine
                });
                if before > 0 && e.waiters.is_empty() {
                    e.cancel.fire();
                }
            }
        }
        self.changed.notify_all();
        gone
    }

    /// Shutdown: cancels every build and waits until every build thread has finished.
    pub fn stop_all(&self) {
        let mut st = self.lock();
        st.shutting_down = true;
        for e in st.builds.values().flatten() {
            e.cancel.fire();
        }
        self.changed.notify_all();
        while st.threads > 0 {
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    pub fn shutting_down(&self) -> bool {
        self.lock().shutting_down
    }
}

/// Whether `e` is the build `cancel` belongs to.
fn is(e: &Entry, cancel: &Cancel) -> bool {
    std::ptr::eq(Arc::as_ptr(&e.cancel), cancel)
}

fn entry<'a>(st: &'a State, drv: &StorePath, cancel: &Cancel) -> Option<&'a Entry> {
    st.builds.get(drv)?.iter().find(|e| is(e, cancel))
}

/// The first build in the queue that may start now, with whom its slot counts against.
fn first_startable(st: &State) -> Option<(u64, Charge)> {
    st.slot_queue
        .iter()
        .find_map(|(ticket, drv)| charge_of(st, drv, *ticket).ok().map(|c| (*ticket, c)))
}

/// Whom build `ticket` of `drv` would be counted against; `Err(Some(uid))` when every uid
/// that waits for it is at its limit (the first waiter's uid), `Err(None)` when the build is
/// over or cancelled (it leaves the queue by itself).
fn charge_of(st: &State, drv: &StorePath, ticket: u64) -> Result<Charge, Option<u32>> {
    let e = st
        .builds
        .get(drv)
        .and_then(|es| es.iter().find(|e| e.cancel.ticket == ticket))
        .filter(|e| !e.cancel.fired())
        .ok_or(None)?;
    if st.per_uid_max == 0 || e.waiters.iter().any(|w| w.broker.client.trusted) {
        return Ok(Charge::Free);
    }
    // The waiters in the order they asked: the starter's uid first.
    e.waiters
        .iter()
        .map(|w| w.broker.client.uid)
        .find(|uid| st.per_uid.get(uid).copied().unwrap_or(0) < st.per_uid_max)
        .map(Charge::Uid)
        .ok_or_else(|| e.waiters.first().map(|w| w.broker.client.uid))
}

#[cfg(test)]
mod tests;
