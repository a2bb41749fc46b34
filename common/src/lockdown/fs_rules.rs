//! Landlock: which files the process may still open, no TCP, no abstract unix sockets or
//! signals outside its own domain.
//!
//! Best effort: the ruleset asks for everything of [`TARGET_ABI`] and the kernel enforces what
//! it knows; the result says how much that was. A kernel without Landlock is not an error here;
//! the services refuse to run without it unless `allow-unconfined = true`
//! ([`landlock_ok`](super::landlock_ok)).
//!
//! Landlock governs opening, creating, removing, renaming and linking, not metadata: `stat`,
//! `readlink`, `chmod`, `chown` and `utimensat` are outside it, which is why the broker's
//! seccomp allow-list has no mode- or owner-changing call.

use std::fmt;
use std::path::PathBuf;

use landlock::{
    make_bitflags, Access as _, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible,
    PathBeneath, PathFd, RestrictionStatus, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus, Scope, ABI,
};

use super::LockdownError;

/// The newest Landlock ABI whose rights these profiles were written and tested against
/// (Linux 6.15). Newer kernels enforce this much; raising it means reviewing the new rights
/// (ABI 8: all-thread enforcement, ABI 9: connecting to named unix sockets, ABI 10: UDP).
pub const TARGET_ABI: ABI = ABI::V7;

/// What a rule grants beneath a directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read files and list directories. No execute.
    ReadOnly,
    /// Also write, truncate, create regular files, directories and symlinks, remove, and
    /// rename or link across directories (`Refer`). No execute, no device/fifo/socket nodes,
    /// no device ioctls.
    ReadWrite,
    /// [`Access::ReadWrite`] and binding unix sockets (the collector's `gc-socket/`).
    ReadWriteSockets,
}

impl Access {
    fn rights(self) -> BitFlags<AccessFs> {
        match self {
            Access::ReadOnly => make_bitflags!(AccessFs::{ReadFile | ReadDir}),
            Access::ReadWrite => make_bitflags!(AccessFs::{
                ReadFile | ReadDir | WriteFile | Truncate | RemoveDir | RemoveFile
                    | MakeDir | MakeReg | MakeSym | Refer
            }),
            Access::ReadWriteSockets => Access::ReadWrite.rights() | AccessFs::MakeSock,
        }
    }
}

/// How much of the requested ruleset the running kernel enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforcement {
    /// Everything the profile asks for.
    Full,
    /// Some of it: the kernel's Landlock ABI is older than [`TARGET_ABI`] (e.g. no TCP rules
    /// before ABI 4, no scoping before ABI 6).
    Partial,
    /// Nothing: no Landlock in this kernel, disabled at boot, or too old for the profile.
    None,
}

/// Outcome of [`landlock_restrict`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LandlockStatus {
    pub enforcement: Enforcement,
    /// The running kernel's Landlock ABI version (0 when there is none).
    pub abi: u32,
    /// Why enforcement is not full, in a few words.
    pub note: Option<&'static str>,
}

impl fmt::Display for LandlockStatus {
    /// `full(abi7)`, `partial(abi3)`, `none(abi0:not-in-kernel)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let word = match self.enforcement {
            Enforcement::Full => "full",
            Enforcement::Partial => "partial",
            Enforcement::None => "none",
        };
        write!(f, "{word}(abi{}", self.abi)?;
        if let (Enforcement::None, Some(note)) = (self.enforcement, self.note) {
            write!(f, ":{note}")?;
        }
        write!(f, ")")
    }
}

/// The Landlock ABI version of the running kernel, 0 if it has none or it is disabled.
pub fn landlock_abi() -> u32 {
    // landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION) returns the version.
    const LANDLOCK_CREATE_RULESET_VERSION: nix::libc::c_uint = 1;
    // SAFETY: with a null attribute pointer, size 0 and the VERSION flag the kernel reads and
    // writes no memory; it returns the ABI version or -1 with errno.
    let v = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_landlock_create_ruleset,
            std::ptr::null::<nix::libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    u32::try_from(v).unwrap_or(0)
}

/// Restrict the calling thread (and the threads and processes it creates later) to `rules`:
/// every file-system right of [`TARGET_ABI`] is handled, so anything not granted here is
/// denied (`EACCES`); TCP bind and connect are denied (ABI ≥ 4); abstract unix sockets and
/// signals are scoped to the domain (ABI ≥ 6). Also sets `no_new_privs`.
///
/// Descriptors opened before the call keep working (Landlock checks at open time), and pipes,
/// socketpairs and memfds are not file-system objects, so a process can keep passing data.
///
/// Every path must exist. If any rule is [`Access::ReadWrite`], cross-directory renames and
/// links must keep working, so on a kernel that cannot allow them (ABI 1) nothing is enforced
/// rather than breaking the process; the status says so.
pub fn landlock_restrict(rules: &[(PathBuf, Access)]) -> Result<LandlockStatus, LockdownError> {
    let mut ruleset = Ruleset::default();
    if rules.iter().any(|(_, a)| *a == Access::ReadWrite) {
        ruleset = ruleset
            .set_compatibility(CompatLevel::SoftRequirement)
            .handle_access(AccessFs::Refer)?
            .set_compatibility(CompatLevel::BestEffort);
    }
    let mut created = ruleset
        .handle_access(AccessFs::from_all(TARGET_ABI))?
        .handle_access(AccessNet::from_all(TARGET_ABI))?
        .scope(Scope::from_all(TARGET_ABI))?
        .create()?;
    for (path, access) in rules {
        let fd = PathFd::new(path).map_err(|source| LockdownError::LandlockPath {
            path: path.clone(),
            source,
        })?;
        created = created.add_rule(PathBeneath::new(fd, access.rights()))?;
    }
    let status = created.restrict_self()?;
    Ok(summarise(&status))
}

fn summarise(status: &RestrictionStatus) -> LandlockStatus {
    let (abi, unavailable) = match status.landlock {
        landlock::LandlockStatus::Available {
            effective_abi,
            kernel_abi,
        } => (
            kernel_abi
                .and_then(|v| u32::try_from(v).ok())
                .unwrap_or(effective_abi as u32),
            None,
        ),
        landlock::LandlockStatus::NotEnabled => (0, Some("disabled-at-boot")),
        landlock::LandlockStatus::NotImplemented => (0, Some("not-in-kernel")),
    };
    let enforcement = match status.ruleset {
        RulesetStatus::FullyEnforced => Enforcement::Full,
        RulesetStatus::PartiallyEnforced => Enforcement::Partial,
        RulesetStatus::NotEnforced => Enforcement::None,
    };
    let note = match enforcement {
        Enforcement::Full => None,
        Enforcement::Partial => Some("kernel-abi-older-than-target"),
        Enforcement::None => unavailable.or(Some("kernel-cannot-allow-renames")),
    };
    LandlockStatus {
        enforcement,
        abi,
        note,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display() {
        let s = LandlockStatus {
            enforcement: Enforcement::Full,
            abi: 7,
            note: None,
        };
        assert_eq!(s.to_string(), "full(abi7)");
        let s = LandlockStatus {
            enforcement: Enforcement::None,
            abi: 0,
            note: Some("not-in-kernel"),
        };
        assert_eq!(s.to_string(), "none(abi0:not-in-kernel)");
    }

    #[test]
    fn read_only_grants_no_write_or_execute() {
        let ro = Access::ReadOnly.rights();
        assert!(!ro.contains(AccessFs::Execute));
        assert!(!ro.contains(AccessFs::WriteFile));
        let rw = Access::ReadWrite.rights();
        assert!(rw.contains(AccessFs::Refer) && rw.contains(AccessFs::MakeSym));
        assert!(!rw.intersects(make_bitflags!(AccessFs::{
            Execute | MakeChar | MakeBlock | MakeFifo | MakeSock | IoctlDev
        })));
    }
}
