//! The broker's memory and pids budget (`broker-memory-max`, `broker-pids-max`), in force
//! before it reads a byte from its client.
//!
//! Normally its cgroup holds it: the builder-helper makes one and moves this process into it
//! (builder-helper/src/service/budget.rs), then says so as the first message on the build
//! channel, which the broker waits for here. Each limit that cgroup does not enforce (no
//! cgroup on the machine, a daemon run by an ordinary user, a v2 controller not enabled for
//! the daemon's cgroup, or a helper that did not take this client) is set as an rlimit
//! instead: `RLIMIT_DATA` for memory (the heap and private writable mappings: what a client
//! can make a broker allocate) and `RLIMIT_NPROC` for processes and threads, which the kernel
//! counts per uid and so only where the broker has a uid of its own. Past `RLIMIT_DATA` an
//! allocation fails and the broker aborts; past `RLIMIT_NPROC` a new thread fails.

use std::time::Duration;

use nix::sys::resource::{setrlimit, Resource};
use stockade_common::ipc::builder::BuilderToBroker;
use stockade_common::ipc::msg::BrokerBudget;
use stockade_common::ipc::{self, Channel};

/// How long the helper may take to place a new broker: far more than making a directory and
/// writing three files takes; a helper that does not answer in that time is broken.
const PLACE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why the broker cannot start within its budget.
#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    #[error("waiting for the builder-helper to place this broker in its cgroup: {0}")]
    Helper(#[from] ipc::Error),
    #[error("the builder-helper's first message was {0}, not the broker's budget")]
    Unexpected(String),
    #[error("setting {what} to {value}: {errno}")]
    Rlimit {
        what: &'static str,
        value: u64,
        errno: nix::errno::Errno,
    },
}

/// Waits for the helper (when the master said it places this broker) and sets the rlimits
/// that stand for what the cgroup does not enforce. Returns a summary for the debug log.
pub fn apply(budget: &BrokerBudget, builder: &mut Channel) -> Result<String, BudgetError> {
    let (mut by_cgroup_memory, mut by_cgroup_pids) = (false, false);
    if budget.from_helper {
        builder.set_read_timeout(Some(PLACE_TIMEOUT))?;
        match builder.recv::<BuilderToBroker>() {
            Ok((BuilderToBroker::Budget { memory, pids }, _)) => {
                (by_cgroup_memory, by_cgroup_pids) = (memory, pids);
            }
            Ok((other, _)) => return Err(BudgetError::Unexpected(format!("{other:?}"))),
            // The helper did not take this client (it serves no builds then either).
            Err(ipc::Error::Closed) => {}
            Err(e) => return Err(e.into()),
        }
        builder.set_read_timeout(None)?;
    }
    let memory = match budget.memory_max {
        0 => "none",
        _ if by_cgroup_memory => "cgroup",
        max => {
            limit(Resource::RLIMIT_DATA, "RLIMIT_DATA", max)?;
            "rlimit"
        }
    };
    let pids = match budget.pids_max {
        0 => "none",
        _ if by_cgroup_pids => "cgroup",
        _ if !budget.own_uid => "none (shared uid)",
        max => {
            limit(Resource::RLIMIT_NPROC, "RLIMIT_NPROC", max)?;
            "rlimit"
        }
    };
    Ok(format!("budget memory={memory} pids={pids}"))
}

fn limit(resource: Resource, what: &'static str, value: u64) -> Result<(), BudgetError> {
    setrlimit(resource, value, value).map_err(|errno| BudgetError::Rlimit { what, value, errno })
}
