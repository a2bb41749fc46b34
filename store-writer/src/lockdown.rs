//! Locking the process down once it is set up (after the database, the directories and the
//! audit sockets are open, before the first broker request is read): only the capabilities a
//! store owner needs (none when not root), no_new_privs, not dumpable, landlock (read-write
//! store, state and log directories, read-only /proc) and the store-writer's seccomp
//! allow-list (no exec, no new sockets, no mount family, no setuid bits). Without Landlock or
//! seccomp it refuses to start unless the master's `allow-unconfined` says so (A76).
//!
//! Consequences, by design: a garbage collector that is running when a temp root is added
//! cannot be reached over gc-socket (no new sockets), so that AddTempRoot fails rather than
//! races; the audit socket must be connected before this point.

use std::path::Path;

use stockade_common::ipc::msg::StoreWriterConfig;
use stockade_common::lockdown;

/// Returns the one-line summary for the start-up audit line.
pub fn lock_down(cfg: &StoreWriterConfig) -> Result<String, String> {
    let report = lockdown::apply_store_writer(
        Path::new(&cfg.real_store_dir),
        Path::new(&cfg.state_dir),
        Path::new(&cfg.log_dir),
        cfg.as_root,
        cfg.lockdown,
    )
    .map_err(|e| e.to_string())?;
    Ok(report.summary())
}
