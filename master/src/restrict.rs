//! The master's own privileges once its privileged set-up is done (SECURITY.md §5: "root with
//! CAP_SETUID, CAP_SETGID, CAP_KILL only").
//!
//! After the sockets are bound and the store-writer runs, the master still needs to switch a
//! forked child to a broker uid (`CAP_SETUID`, `CAP_SETGID`), empty that child's bounding set
//! (`CAP_SETPCAP`), and signal brokers (`CAP_KILL`). Everything else — `CAP_SYS_ADMIN`,
//! `CAP_DAC_OVERRIDE`, `CAP_CHOWN`, … — leaves its bounding, permitted, effective and
//! inheritable sets, so a compromised master can no longer read or write files it has no
//! ordinary permission for.

use caps::{CapSet, Capability, CapsHashSet};

/// What the master keeps.
pub const MASTER_CAPS: [Capability; 4] = [
    Capability::CAP_SETUID,
    Capability::CAP_SETGID,
    Capability::CAP_SETPCAP,
    Capability::CAP_KILL,
];

/// Drop every capability but [`MASTER_CAPS`] from all sets of the calling (only) thread.
pub fn restrict_master() -> Result<(), caps::errors::CapsError> {
    let keep: CapsHashSet = MASTER_CAPS.iter().copied().collect();
    for cap in caps::all() {
        if !keep.contains(&cap) && caps::has_cap(None, CapSet::Bounding, cap).unwrap_or(false) {
            caps::drop(None, CapSet::Bounding, cap)?;
        }
    }
    caps::set(None, CapSet::Effective, &keep)?;
    caps::set(None, CapSet::Permitted, &keep)?;
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new())?;
    if caps::clear(None, CapSet::Ambient).is_err() {
        log::debug!("no ambient capability set to clear");
    }
    Ok(())
}
