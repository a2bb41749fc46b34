//! Brokers' cgroups: each broker's memory and pids budget (`broker-memory-max`,
//! `broker-pids-max`; SECURITY.md A12, A63), so that one client's broker cannot take the
//! machine's memory or processes from the others.
//!
//! The helper makes them because it already makes, limits and removes build cgroups, and the
//! master, confined after start-up, may make no directory (master/src/launch.rs). For each
//! connection the master sends `BrokerStarted { pid }` right after forking the broker, which
//! then waits in its start-up, before reading anything from its client, for
//! `BuilderToBroker::Budget`: [`place`] makes `stockade-brokers/broker-<helper pid>-<conn>`,
//! writes the limits and the pid, and sends that message saying which limits the cgroup
//! enforces; the broker sets an rlimit for each it does not (broker/src/budget.rs). The pid
//! cannot name another process: the master reaps a broker only after sending its pid, and this
//! channel delivers `BrokerStarted` before the `ClientGone` that follows a reap.
//!
//! When the connection ends ([`release`]) the cgroup's events say whether the broker ran into
//! a limit (the kernel's OOM killer ended it, or a thread was refused), which is logged and
//! audited `limit=broker-memory-max` or `limit=broker-pids-max`; then the cgroup is emptied and
//! removed.

use std::sync::atomic::{AtomicBool, Ordering};

use stockade_common::ipc::builder::BuilderToBroker;

use super::sched::Broker;
use super::Service;
use crate::cgroup::{Cgroup, CgroupError, Group, Limits};

/// Whether the first broker without a cgroup has been logged (once per helper).
static FALLBACK_SAID: AtomicBool = AtomicBool::new(false);

impl Service {
    /// The limits a broker's cgroup carries.
    fn broker_limits(&self) -> Limits {
        let (m, p) = (self.config.broker_memory_max, self.config.broker_pids_max);
        Limits {
            memory_bytes: (m > 0).then_some(m),
            pids: (p > 0).then_some(p),
        }
    }

    /// The start-up log line about brokers' budgets.
    pub fn describe_broker_budget(&self) -> String {
        if self.cgroups.any_for(Group::Brokers) {
            format!("broker cgroups: {}", self.cgroups.describe(Group::Brokers))
        } else {
            "broker cgroups: none on this machine; brokers hold themselves to \
             broker-memory-max and broker-pids-max with rlimits"
                .to_string()
        }
    }
}

/// Puts broker `pid` (running as `uid`) into a new cgroup and tells it which limits hold; `None` (and a broker
/// told to use rlimits) when no cgroup could be made or joined.
pub fn place(svc: &Service, broker: &Broker, pid: i32, uid: u32) -> Option<Cgroup> {
    let conn_id = broker.client.conn_id;
    let cgroup = make(svc, conn_id, pid, uid);
    let enforced = cgroup.as_ref().map(Cgroup::enforced).unwrap_or_default();
    let msg = BuilderToBroker::Budget {
        memory: enforced.memory,
        pids: enforced.pids,
    };
    if let Err(e) = broker.send(&msg) {
        // The broker is gone already; its cgroup goes with `ClientGone`.
        log::debug!("conn {conn_id}: telling the broker its budget: {e}");
    }
    cgroup
}

fn make(svc: &Service, conn_id: u64, pid: i32, uid: u32) -> Option<Cgroup> {
    if !svc.cgroups.any_for(Group::Brokers) {
        return None;
    }
    let name = format!("broker-{}-{conn_id}", std::process::id());
    let fallback = |e: &CgroupError| {
        if !FALLBACK_SAID.swap(true, Ordering::Relaxed) {
            log::warn!(
                "brokers get no cgroup ({e}); they hold themselves to broker-memory-max \
                 and broker-pids-max with rlimits (said once)"
            );
        }
    };
    let cg = match svc
        .cgroups
        .create_in(Group::Brokers, &name, svc.broker_limits())
    {
        Ok(cg) => cg,
        Err(e) => {
            fallback(&e);
            return None;
        }
    };
    match cg.add_as(pid, uid) {
        Ok(()) => Some(cg),
        // A broker that has ended already (a client that only probed the socket) says
        // nothing about the machine's cgroups; its empty cgroup goes with `cg`.
        Err(e) if e.source.raw_os_error() == Some(nix::libc::ESRCH) => {
            log::debug!("conn {conn_id}: the broker ended before it was placed");
            None
        }
        Err(e) => {
            fallback(&e);
            None
        }
    }
}

/// The connection ended: audits the limits its broker ran into, then empties and removes its
/// cgroup.
pub fn release(svc: &Service, conn_id: u64, cgroup: Cgroup) {
    let usage = cgroup.usage();
    let cfg = &svc.config;
    if let Some(n) = usage.oom_kills.filter(|n| *n > 0) {
        log::warn!(
            "conn {conn_id}: the broker reached its memory budget (broker-memory-max = {} \
             bytes) and the kernel ended it",
            cfg.broker_memory_max
        );
        svc.audit(
            conn_id,
            "limit",
            &[
                ("limit", "broker-memory-max".to_string()),
                ("max", cfg.broker_memory_max.to_string()),
                ("oom-kills", n.to_string()),
            ],
        );
    }
    if let Some(n) = usage.pids_refused.filter(|n| *n > 0) {
        log::warn!(
            "conn {conn_id}: the broker reached its budget of {} processes and threads \
             (broker-pids-max); {n} were refused",
            cfg.broker_pids_max
        );
        svc.audit(
            conn_id,
            "limit",
            &[
                ("limit", "broker-pids-max".to_string()),
                ("max", cfg.broker_pids_max.to_string()),
                ("refused", n.to_string()),
            ],
        );
    }
    if let Some(peak) = usage.peak_memory {
        log::debug!("conn {conn_id}: the broker's peak memory was {peak} bytes");
    }
    drop(cgroup);
}

/// Removes the broker cgroups of helpers that are gone (a daemon killed without its clean-up):
/// names carry the helper's pid, and a cgroup that still holds a process is not removed
/// (`rmdir` refuses), so another daemon's are safe.
pub fn sweep(svc: &Service) {
    for parent in svc.cgroups.parents(Group::Brokers) {
        let Ok(entries) = std::fs::read_dir(&parent) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let owner = name
                .to_str()
                .and_then(|n| n.strip_prefix("broker-"))
                .and_then(|n| n.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok());
            let Some(pid) = owner else { continue };
            if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = std::fs::remove_dir(entry.path());
            }
        }
    }
}
