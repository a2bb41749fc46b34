//! What the broker gives up before it reads a byte from its client: every capability, the
//! ability to gain new ones, core dumps and ptrace, every file but the store and the database
//! directory (read-only, landlock), and every system call a worker-protocol server does not
//! need (seccomp).

use std::path::Path;

use stockade_common::ipc::msg::BrokerConfig;
use stockade_common::lockdown;

/// `db_dir` is the database directory when the broker opened it for reading.
pub fn apply(cfg: &BrokerConfig, db_dir: Option<&Path>) -> Result<String, String> {
    let report = lockdown::apply_broker(Path::new(&cfg.real_store_dir), db_dir)
        .map_err(|e| e.to_string())?;
    Ok(report.summary())
}
