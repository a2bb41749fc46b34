//! `stockade-no-userns PROGRAM [ARGS…]`: runs PROGRAM where no new user namespace can be made,
//! as on a kernel without them (SECURITY.md A50's test). A seccomp filter, inherited by every
//! descendant, fails `clone` and `unshare` with `CLONE_NEWUSER` (`EPERM`), and `clone3`
//! (`ENOSYS`, whose flags a filter cannot read: callers fall back to `clone`). Sets
//! `no_new_privs`, as seccompiler does.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

use nix::libc;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

fn filter(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    errno: i32,
    arch: TargetArch,
) -> Result<BpfProgram, seccompiler::Error> {
    let f = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(errno as u32),
        arch,
    )?;
    Ok(f.try_into()?)
}

fn deny_user_namespaces() -> Result<(), seccompiler::Error> {
    let arch: TargetArch = std::env::consts::ARCH.try_into()?;
    let newuser = libc::CLONE_NEWUSER as u64;
    let rule = SeccompRule::new(vec![SeccompCondition::new(
        0,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(newuser),
        newuser,
    )?])?;
    let clone = BTreeMap::from([
        (libc::SYS_clone, vec![rule.clone()]),
        (libc::SYS_unshare, vec![rule]),
    ]);
    seccompiler::apply_filter(&filter(clone, libc::EPERM, arch)?)?;
    let clone3 = BTreeMap::from([(libc::SYS_clone3, vec![])]);
    seccompiler::apply_filter(&filter(clone3, libc::ENOSYS, arch)?)
}

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let Some(program) = args.next() else {
        eprintln!("usage: stockade-no-userns PROGRAM [ARGS...]");
        return ExitCode::from(2);
    };
    if let Err(e) = deny_user_namespaces() {
        eprintln!("stockade-no-userns: installing the filter: {e}");
        return ExitCode::from(2);
    }
    let err = Command::new(&program).args(args).exec();
    eprintln!(
        "stockade-no-userns: exec {}: {err}",
        program.to_string_lossy()
    );
    ExitCode::from(127)
}
