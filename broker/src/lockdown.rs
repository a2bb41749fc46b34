//! What the broker gives up before it reads a byte from its client: privileges it might have
//! inherited, the ability to gain new ones, core dumps and ptrace.
//!
//! seccomp and landlock are added here (see SECURITY.md §5); until then the broker already
//! runs under its own uid with no capabilities, exec'd fresh by the master.

use stockade_common::ipc::msg::BrokerConfig;

pub fn apply(_cfg: &BrokerConfig) -> Result<(), String> {
    nix::sys::prctl::set_no_new_privs().map_err(|e| format!("no_new_privs: {e}"))?;
    nix::sys::prctl::set_dumpable(false).map_err(|e| format!("dumpable: {e}"))?;
    Ok(())
}
