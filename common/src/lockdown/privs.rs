//! Capabilities, `no_new_privs` and dumpability.
//!
//! Capabilities, like `no_new_privs`, are per thread: these calls cover the calling thread and
//! the threads it creates afterwards, which is why lockdown runs before any thread exists.

use caps::{CapSet, Capability, CapsHashSet};
use nix::sys::prctl;

use super::LockdownError;

/// `PR_SET_NO_NEW_PRIVS`: no later `execve` can grant privileges (setuid bits, file
/// capabilities), and it is the precondition for unprivileged Landlock and seccomp.
pub fn no_new_privs() -> Result<(), LockdownError> {
    prctl::set_no_new_privs().map_err(|source| LockdownError::Prctl {
        what: "PR_SET_NO_NEW_PRIVS",
        source,
    })
}

/// `PR_SET_DUMPABLE 0`: no core dumps (which could hold client data), and processes of the same
/// uid can no longer `ptrace` us or open our `/proc/<pid>` files (A35).
pub fn set_not_dumpable() -> Result<(), LockdownError> {
    prctl::set_dumpable(false).map_err(|source| LockdownError::Prctl {
        what: "PR_SET_DUMPABLE",
        source,
    })
}

/// Empty every capability set of the calling thread: ambient, bounding, inheritable, permitted
/// and effective.
///
/// Emptying the bounding set needs `CAP_SETPCAP`; an unprivileged process has none to lose
/// and, with `no_new_privs` and no `execve`, cannot gain any, so its bounding set is left as it
/// is (the report shows it). Everything else is always possible and is checked afterwards.
pub fn drop_all_capabilities() -> Result<(), LockdownError> {
    reduce_capabilities(&CapsHashSet::new())
}

/// Keep only `keep` (where it is already permitted) in the bounding, permitted and effective
/// sets; empty the ambient and inheritable sets. For the store-writer: `CAP_CHOWN`,
/// `CAP_FOWNER`, `CAP_DAC_OVERRIDE`, `CAP_DAC_READ_SEARCH`.
pub fn keep_only_capabilities(keep: &[Capability]) -> Result<(), LockdownError> {
    reduce_capabilities(&keep.iter().copied().collect())
}

/// The capabilities the store-writer keeps when it runs as root.
pub const STORE_WRITER_CAPS: [Capability; 4] = [
    Capability::CAP_CHOWN,
    Capability::CAP_FOWNER,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_DAC_READ_SEARCH,
];

/// The capabilities the roots-reader keeps when the daemon runs as root, both needed to find
/// the runtime roots of other users' processes: `CAP_SYS_PTRACE` for the ptrace access check
/// of `/proc/<pid>/{exe,cwd,fd/*,maps,environ}`, `CAP_DAC_READ_SEARCH` to list
/// `/proc/<pid>/fd` (mode 0500) and read `/proc/<pid>/environ` (mode 0400) of another uid.
pub const ROOTS_READER_CAPS: [Capability; 2] =
    [Capability::CAP_SYS_PTRACE, Capability::CAP_DAC_READ_SEARCH];

fn caps_err(what: &'static str) -> impl FnOnce(caps::errors::CapsError) -> LockdownError {
    move |source| LockdownError::Caps {
        what,
        detail: source.to_string(),
    }
}

fn reduce_capabilities(keep: &CapsHashSet) -> Result<(), LockdownError> {
    // Ambient first: it is not otherwise limited by what follows. Kernels before 4.3 have no
    // ambient set, and then there is nothing to clear.
    if caps::runtime::ambient_set_supported().is_ok() {
        caps::clear(None, CapSet::Ambient).map_err(caps_err("clearing the ambient set"))?;
    }

    // Bounding set while CAP_SETPCAP is still effective.
    let effective = caps::read(None, CapSet::Effective).map_err(caps_err("reading CapEff"))?;
    if effective.contains(&Capability::CAP_SETPCAP) {
        let bounding = caps::read(None, CapSet::Bounding).map_err(caps_err("reading CapBnd"))?;
        for cap in bounding.difference(keep) {
            caps::drop(None, CapSet::Bounding, *cap)
                .map_err(caps_err("dropping from the bounding set"))?;
        }
    }

    caps::clear(None, CapSet::Inheritable).map_err(caps_err("clearing CapInh"))?;

    // Effective must stay a subset of permitted, so shrink it first.
    let permitted = caps::read(None, CapSet::Permitted).map_err(caps_err("reading CapPrm"))?;
    let target: CapsHashSet = permitted.intersection(keep).copied().collect();
    caps::set(None, CapSet::Effective, &target).map_err(caps_err("setting CapEff"))?;
    caps::set(None, CapSet::Permitted, &target).map_err(caps_err("setting CapPrm"))?;

    // Check with the kernel rather than trust the sequence above.
    let eff = caps::read(None, CapSet::Effective).map_err(caps_err("reading CapEff"))?;
    let prm = caps::read(None, CapSet::Permitted).map_err(caps_err("reading CapPrm"))?;
    if !eff.is_subset(keep) || !prm.is_subset(keep) {
        return Err(LockdownError::CapsRemain {
            mask: mask(&eff) | mask(&prm),
        });
    }
    Ok(())
}

/// The kernel bit mask of a capability set.
pub fn mask(set: &CapsHashSet) -> u64 {
    set.iter().fold(0, |m, c| m | c.bitmask())
}

/// Short lower-case names (`chown,fowner`) of the capabilities in `mask`, `none` if empty.
/// Bits this crate has no name for appear as `cap<N>`.
pub fn names(mask: u64) -> String {
    let mut out: Vec<String> = Vec::new();
    for bit in 0..64u8 {
        if mask & (1u64 << bit) == 0 {
            continue;
        }
        let name = caps::all()
            .into_iter()
            .find(|c| c.index() == bit)
            .map(|c| {
                let full = c.to_string().to_ascii_lowercase();
                full.strip_prefix("cap_").unwrap_or(&full).to_string()
            })
            .unwrap_or_else(|| format!("cap{bit}"));
        out.push(name);
    }
    if out.is_empty() {
        "none".to_string()
    } else {
        out.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_names() {
        assert_eq!(names(0), "none");
        let m = mask(&STORE_WRITER_CAPS.iter().copied().collect());
        assert_eq!(m, 0b1111);
        assert_eq!(names(m), "chown,dac_override,dac_read_search,fowner");
        assert_eq!(names(1 << 63), "cap63");
    }
}
