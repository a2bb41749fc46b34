//! The broker's memory and pids budget (`broker-memory-max`, `broker-pids-max`), in force
//! before it reads a byte from its client.
//!
//! Normally its cgroup holds it: the builder-helper makes one and moves this process into it
//! (builder-helper/src/service/budget.rs), then says which limits took as the first message on
//! the build channel. Moving a process into a cgroup waits for an RCU grace period (tens of
//! milliseconds on a v1 hierarchy), so the broker does not wait for it: it starts at once under
//! rlimits of twice the budget, a backstop for what it allocates before the move (which stays
//! charged outside the cgroup) that lets the cgroup's own limit act first afterwards. Once the
//! helper's answer is read (at the first build, or never), each limit the cgroup does not
//! enforce drops to the budget itself. Where the master did not ask the helper (no helper),
//! the rlimits are the budget from the start. `RLIMIT_DATA` stands for memory (the heap and
//! private writable mappings: what a client can make a broker allocate) and `RLIMIT_NPROC`
//! for processes and threads, which the kernel counts per uid and so only where the broker has
//! a uid of its own. Past `RLIMIT_DATA` an allocation fails and the broker aborts; past
//! `RLIMIT_NPROC` a new thread fails.

use std::sync::OnceLock;

use nix::sys::resource::{setrlimit, Resource};
use stockade_common::ipc::msg::BrokerBudget;

/// The budget as the master gave it, for [`settle`].
static BUDGET: OnceLock<BrokerBudget> = OnceLock::new();

/// Why the broker cannot start within its budget.
#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    #[error("setting {what} to {value}: {errno}")]
    Rlimit {
        what: &'static str,
        value: u64,
        errno: nix::errno::Errno,
    },
}

/// Sets the rlimits the broker starts under. Returns a summary for the debug log.
pub fn apply(budget: &BrokerBudget) -> Result<String, BudgetError> {
    let _ = BUDGET.set(*budget);
    // Until the cgroup holds the broker, twice the budget; the budget itself without a helper.
    let factor = if budget.from_helper { 2 } else { 1 };
    let memory = match budget.memory_max {
        0 => "none",
        max => {
            limit(
                Resource::RLIMIT_DATA,
                "RLIMIT_DATA",
                max.saturating_mul(factor),
            )?;
            if budget.from_helper {
                "cgroup"
            } else {
                "rlimit"
            }
        }
    };
    let pids = match budget.pids_max {
        0 => "none",
        _ if !budget.own_uid && !budget.from_helper => "none (shared uid)",
        _ if !budget.own_uid => "cgroup",
        max => {
            limit(
                Resource::RLIMIT_NPROC,
                "RLIMIT_NPROC",
                max.saturating_mul(factor),
            )?;
            if budget.from_helper {
                "cgroup"
            } else {
                "rlimit"
            }
        }
    };
    Ok(format!("budget memory={memory} pids={pids}"))
}

/// The helper's answer: which limits its cgroup enforces. Each one it does not falls to the
/// budget as an rlimit (lowering a limit needs no privilege).
pub fn settle(memory_by_cgroup: bool, pids_by_cgroup: bool) -> Result<(), BudgetError> {
    let Some(budget) = BUDGET.get() else {
        return Ok(());
    };
    if budget.memory_max != 0 && !memory_by_cgroup {
        limit(Resource::RLIMIT_DATA, "RLIMIT_DATA", budget.memory_max)?;
    }
    if budget.pids_max != 0 && !pids_by_cgroup && budget.own_uid {
        limit(Resource::RLIMIT_NPROC, "RLIMIT_NPROC", budget.pids_max)?;
    }
    if !memory_by_cgroup || !pids_by_cgroup {
        log::debug!(
            "budget settled: memory={} pids={}",
            if memory_by_cgroup { "cgroup" } else { "rlimit" },
            if pids_by_cgroup { "cgroup" } else { "rlimit" }
        );
    }
    Ok(())
}

fn limit(resource: Resource, what: &'static str, value: u64) -> Result<(), BudgetError> {
    setrlimit(resource, value, value).map_err(|errno| BudgetError::Rlimit { what, value, errno })
}
