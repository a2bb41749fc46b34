//! What the broker gives up before it reads a byte from its client: every capability, the
//! ability to gain new ones, core dumps and ptrace, every file but the store (read-only,
//! landlock), and every system call a worker-protocol server does not need (seccomp). Without
//! Landlock or seccomp it refuses to serve unless the master's `allow-unconfined` says so.

use std::path::Path;

use stockade_common::ipc::msg::BrokerConfig;
use stockade_common::lockdown;

pub fn apply(cfg: &BrokerConfig) -> Result<String, String> {
    let report = lockdown::apply_broker(Path::new(&cfg.real_store_dir), cfg.lockdown)
        .map_err(|e| e.to_string())?;
    Ok(report.summary())
}
