//! The builder's Landlock domain. The ruleset is created before `clone` (handled rights and
//! scopes); its rules are added by the sandbox's first process after `pivot_root`, on the
//! sandbox's own paths (its `/`, `/dev/pts` and `/dev/shm` are file systems that do not exist
//! before), and it enters the domain itself just before `execve`. The process that mounts
//! never has a domain: Landlock refuses mount and pivot_root to restricted processes.
//!
//! Rights: read and execute everywhere in the sandbox; full write (no device nodes) beneath
//! the build directory and the store directory (whose entries are the outputs being made;
//! inputs there are read-only mounts); read, write and device ioctls on the `/dev` nodes.
//! Scopes (ABI 6): no abstract unix socket and no signal outside the domain, which matters
//! most for fixed-output builders that share the host's network namespace.

use std::os::fd::OwnedFd;

use landlock::{make_bitflags, Access as _, AccessFs, BitFlags, Ruleset, RulesetAttr, Scope, ABI};
use stockade_common::lockdown::{landlock_abi, TARGET_ABI};

use super::SandboxError;

/// A created ruleset and the right masks the sandbox's rules use, already cut down to what the
/// ruleset handles (a rule with an unhandled right is refused by the kernel).
#[derive(Debug)]
pub struct LandlockPlan {
    pub ruleset: OwnedFd,
    /// The kernel's Landlock ABI (for reports).
    pub abi: u32,
    pub scoped: bool,
    pub read_exec: u64,
    pub write_tree: u64,
    pub dev_tree: u64,
    pub dev_file: u64,
}

/// Creates the ruleset, or `None` when the kernel has no Landlock (the rest of the sandbox
/// still applies; the caller decides whether to log or refuse).
pub fn prepare() -> Result<Option<LandlockPlan>, SandboxError> {
    let abi = landlock_abi();
    if abi == 0 {
        return Ok(None);
    }
    let effective = ABI::from(abi.min(TARGET_ABI as u32) as i32);
    let handled = AccessFs::from_all(effective);
    let mut ruleset = Ruleset::default().handle_access(handled).map_err(ll)?;
    let scoped = abi >= 6;
    if scoped {
        ruleset = ruleset
            .scope(Scope::AbstractUnixSocket | Scope::Signal)
            .map_err(ll)?;
    }
    let created = ruleset.create().map_err(ll)?;
    let Some(fd) = Option::<OwnedFd>::from(created) else {
        return Ok(None);
    };
    let mask = |rights: BitFlags<AccessFs>| (rights & handled).bits();
    let read_exec = make_bitflags!(AccessFs::{Execute | ReadFile | ReadDir});
    let write_tree = read_exec
        | make_bitflags!(AccessFs::{
            WriteFile | Truncate | RemoveDir | RemoveFile | MakeDir | MakeReg | MakeSym
                | MakeFifo | MakeSock | Refer
        });
    Ok(Some(LandlockPlan {
        ruleset: fd,
        abi,
        scoped,
        read_exec: mask(read_exec),
        write_tree: mask(write_tree),
        dev_tree: mask(write_tree | AccessFs::IoctlDev),
        dev_file: mask(make_bitflags!(AccessFs::{ReadFile | WriteFile | Truncate | IoctlDev})),
    }))
}

fn ll(e: landlock::RulesetError) -> SandboxError {
    SandboxError::Landlock(e.to_string())
}
