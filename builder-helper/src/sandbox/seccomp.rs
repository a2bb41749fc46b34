//! The builder's seccomp filters: an allow-list (as Lix has, where Nix has a deny-list) and two
//! small refusal filters on top of it. Compiled before `clone`, installed by the sandbox's
//! first process just before `execve`.
//!
//! 1. Allow-list: what general-purpose build tools call (files, processes, signals, sockets,
//!    System V / POSIX IPC, memory). Anything else fails with `ENOSYS`, so a program probing
//!    for a newer call (`clone3`, `io_uring_setup`, `statmount`) falls back as on an older
//!    kernel. Not listed, hence refused: io_uring, `keyctl` / `add_key` / `request_key`, `bpf`,
//!    `perf_event_open`, `userfaultfd`, the mount family, `pivot_root`, `chroot`, `setns`,
//!    module loading, `kexec`, `reboot`, swap, clocks, `acct`, `quotactl`, `syslog`,
//!    `open_by_handle_at`, `fanotify`.
//! 2. `EPERM` for: `chmod` family with `S_ISUID` or `S_ISGID` (no setuid/setgid file can come
//!    out of a build), `mknod` / `mknodat` of character or block devices (fifos and sockets
//!    stay possible), `clone` / `unshare` with `CLONE_NEWUSER` (a nested user namespace would
//!    give the builder capabilities again, over its own namespaces), `ioctl` `TIOCSTI` and
//!    `TIOCLINUX` (input injected into a terminal). Other ioctls are allowed (`isatty`,
//!    `FIONBIO`, `FICLONE`); Landlock limits device ioctls to the sandbox's `/dev` nodes.
//! 3. `ENOTSUP` for setting or removing extended attributes (which also carry ACLs and file
//!    capabilities), as Nix answers, so `cp -a` and `tar` carry on without them.
//!
//! Between filters the kernel takes the most severe action and, between two `ERRNO`s, the one
//! of the most recently installed filter, so 2 and 3 win over 1's `ENOSYS`.
//!
//! `ptrace`, `process_vm_readv` and `kill` stay allowed (debuggers and test suites use them):
//! the builder's own pid namespace means it can only name its own processes, and Landlock
//! refuses ptrace and signals towards processes outside its domain.
//!
//! Every filter starts with seccompiler's architecture check, which kills a process making
//! system calls of another ABI: 32-bit builds (`i686-linux` on `x86_64`) are not supported yet.

use nix::libc;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use std::collections::BTreeMap;

use super::SandboxError;

#[rustfmt::skip]
const ALLOWED: &[libc::c_long] = &[
    // files and directories
    libc::SYS_read, libc::SYS_write, libc::SYS_readv, libc::SYS_writev, libc::SYS_pread64,
    libc::SYS_pwrite64, libc::SYS_preadv, libc::SYS_pwritev, libc::SYS_preadv2,
    libc::SYS_pwritev2, libc::SYS_openat, libc::SYS_openat2, libc::SYS_close,
    libc::SYS_close_range, libc::SYS_dup, libc::SYS_dup3, libc::SYS_fcntl, libc::SYS_flock,
    libc::SYS_fsync, libc::SYS_fdatasync, libc::SYS_sync, libc::SYS_syncfs,
    libc::SYS_sync_file_range, libc::SYS_truncate, libc::SYS_ftruncate, libc::SYS_fallocate,
    libc::SYS_fadvise64, libc::SYS_lseek, libc::SYS_getdents64, libc::SYS_getcwd,
    libc::SYS_chdir, libc::SYS_fchdir, libc::SYS_mkdirat, libc::SYS_mknodat,
    libc::SYS_unlinkat, libc::SYS_symlinkat, libc::SYS_linkat, libc::SYS_renameat,
    libc::SYS_renameat2, libc::SYS_faccessat, libc::SYS_faccessat2, libc::SYS_fchmod,
    libc::SYS_fchmodat, libc::SYS_fchmodat2, libc::SYS_fchownat, libc::SYS_fchown,
    libc::SYS_utimensat, libc::SYS_newfstatat, libc::SYS_fstat, libc::SYS_statx,
    libc::SYS_statfs, libc::SYS_fstatfs, libc::SYS_readlinkat, libc::SYS_umask,
    libc::SYS_copy_file_range, libc::SYS_splice, libc::SYS_tee, libc::SYS_vmsplice,
    libc::SYS_sendfile, libc::SYS_getxattr, libc::SYS_lgetxattr, libc::SYS_fgetxattr,
    libc::SYS_listxattr, libc::SYS_llistxattr, libc::SYS_flistxattr,
    libc::SYS_inotify_init1, libc::SYS_inotify_add_watch, libc::SYS_inotify_rm_watch,
    libc::SYS_memfd_create, libc::SYS_name_to_handle_at,
    // memory
    libc::SYS_mmap, libc::SYS_munmap, libc::SYS_mprotect, libc::SYS_mremap, libc::SYS_madvise,
    libc::SYS_msync, libc::SYS_mlock, libc::SYS_munlock, libc::SYS_mlock2, libc::SYS_mlockall,
    libc::SYS_munlockall, libc::SYS_mincore, libc::SYS_brk, libc::SYS_membarrier,
    libc::SYS_pkey_mprotect, libc::SYS_pkey_alloc, libc::SYS_pkey_free,
    libc::SYS_get_mempolicy, libc::SYS_set_mempolicy, libc::SYS_mbind,
    // processes, threads, signals
    libc::SYS_clone, libc::SYS_execve, libc::SYS_execveat, libc::SYS_exit,
    libc::SYS_exit_group, libc::SYS_wait4, libc::SYS_waitid, libc::SYS_unshare,
    libc::SYS_rt_sigaction, libc::SYS_rt_sigprocmask, libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigsuspend, libc::SYS_rt_sigpending, libc::SYS_rt_sigtimedwait,
    libc::SYS_rt_sigqueueinfo, libc::SYS_rt_tgsigqueueinfo, libc::SYS_sigaltstack,
    libc::SYS_kill, libc::SYS_tgkill, libc::SYS_tkill, libc::SYS_pidfd_open,
    libc::SYS_pidfd_send_signal, libc::SYS_restart_syscall,
    libc::SYS_ptrace, libc::SYS_process_vm_readv, libc::SYS_process_vm_writev, libc::SYS_kcmp,
    libc::SYS_futex, libc::SYS_futex_waitv, libc::SYS_set_robust_list,
    libc::SYS_get_robust_list, libc::SYS_set_tid_address, libc::SYS_rseq,
    libc::SYS_sched_yield, libc::SYS_sched_getaffinity, libc::SYS_sched_setaffinity,
    libc::SYS_sched_getparam, libc::SYS_sched_setparam, libc::SYS_sched_getscheduler,
    libc::SYS_sched_setscheduler, libc::SYS_sched_get_priority_max,
    libc::SYS_sched_get_priority_min, libc::SYS_sched_rr_get_interval,
    libc::SYS_sched_getattr, libc::SYS_sched_setattr, libc::SYS_getcpu,
    libc::SYS_ioprio_get, libc::SYS_ioprio_set,
    // identity and limits (changing ids fails without capabilities; tools probe them)
    libc::SYS_getpid, libc::SYS_getppid, libc::SYS_gettid, libc::SYS_getuid,
    libc::SYS_geteuid, libc::SYS_getgid, libc::SYS_getegid, libc::SYS_getresuid,
    libc::SYS_getresgid, libc::SYS_getgroups, libc::SYS_setgroups, libc::SYS_setuid,
    libc::SYS_setgid, libc::SYS_setreuid, libc::SYS_setregid, libc::SYS_setresuid,
    libc::SYS_setresgid, libc::SYS_setfsuid, libc::SYS_setfsgid, libc::SYS_getpgid,
    libc::SYS_setpgid, libc::SYS_getsid, libc::SYS_setsid, libc::SYS_getpriority,
    libc::SYS_setpriority, libc::SYS_getrlimit, libc::SYS_setrlimit, libc::SYS_prlimit64,
    libc::SYS_getrusage, libc::SYS_times, libc::SYS_sysinfo, libc::SYS_uname,
    libc::SYS_capget, libc::SYS_capset, libc::SYS_prctl, libc::SYS_personality,
    // self-confinement of the builder's own (can only narrow what it has)
    libc::SYS_seccomp, libc::SYS_landlock_create_ruleset, libc::SYS_landlock_add_rule,
    libc::SYS_landlock_restrict_self,
    // time
    libc::SYS_nanosleep, libc::SYS_clock_nanosleep, libc::SYS_clock_gettime,
    libc::SYS_clock_getres, libc::SYS_gettimeofday, libc::SYS_timer_create,
    libc::SYS_timer_settime, libc::SYS_timer_gettime, libc::SYS_timer_getoverrun,
    libc::SYS_timer_delete, libc::SYS_timerfd_create, libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime, libc::SYS_getitimer, libc::SYS_setitimer,
    // descriptors that wait
    libc::SYS_pipe2, libc::SYS_eventfd2, libc::SYS_epoll_create1, libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait, libc::SYS_epoll_pwait2, libc::SYS_signalfd4, libc::SYS_ppoll,
    libc::SYS_pselect6, libc::SYS_io_setup, libc::SYS_io_destroy, libc::SYS_io_submit,
    libc::SYS_io_cancel, libc::SYS_io_getevents,
    // sockets (the network namespace and Landlock decide what they reach)
    libc::SYS_socket, libc::SYS_socketpair, libc::SYS_bind, libc::SYS_connect,
    libc::SYS_listen, libc::SYS_accept, libc::SYS_accept4, libc::SYS_getsockname,
    libc::SYS_getpeername, libc::SYS_sendto, libc::SYS_recvfrom, libc::SYS_sendmsg,
    libc::SYS_recvmsg, libc::SYS_sendmmsg, libc::SYS_recvmmsg, libc::SYS_shutdown,
    libc::SYS_setsockopt, libc::SYS_getsockopt,
    // System V and POSIX IPC (the build's own IPC namespace)
    libc::SYS_shmget, libc::SYS_shmat, libc::SYS_shmdt, libc::SYS_shmctl, libc::SYS_semget,
    libc::SYS_semop, libc::SYS_semtimedop, libc::SYS_semctl, libc::SYS_msgget,
    libc::SYS_msgsnd, libc::SYS_msgrcv, libc::SYS_msgctl, libc::SYS_mq_open,
    libc::SYS_mq_unlink, libc::SYS_mq_timedsend, libc::SYS_mq_timedreceive,
    libc::SYS_mq_notify, libc::SYS_mq_getsetattr,
    libc::SYS_getrandom, libc::SYS_ioctl,
];

/// The x86_64 calls that aarch64 (and every newer architecture) no longer has.
#[cfg(target_arch = "x86_64")]
#[rustfmt::skip]
const ALLOWED_LEGACY: &[libc::c_long] = &[
    libc::SYS_open, libc::SYS_creat, libc::SYS_stat, libc::SYS_lstat, libc::SYS_access,
    libc::SYS_pipe, libc::SYS_dup2, libc::SYS_poll, libc::SYS_select, libc::SYS_epoll_create,
    libc::SYS_epoll_wait, libc::SYS_eventfd, libc::SYS_signalfd, libc::SYS_inotify_init,
    libc::SYS_mkdir, libc::SYS_rmdir, libc::SYS_unlink, libc::SYS_link, libc::SYS_symlink,
    libc::SYS_readlink, libc::SYS_rename, libc::SYS_chmod, libc::SYS_chown, libc::SYS_lchown,
    libc::SYS_utime, libc::SYS_utimes, libc::SYS_futimesat, libc::SYS_getdents,
    libc::SYS_time, libc::SYS_alarm, libc::SYS_pause, libc::SYS_fork, libc::SYS_vfork,
    libc::SYS_arch_prctl, libc::SYS_getpgrp, libc::SYS_mknod,
    // map_shadow_stack (glibc with CET shadow stacks)
    453,
];

#[cfg(not(target_arch = "x86_64"))]
const ALLOWED_LEGACY: &[libc::c_long] = &[];

#[rustfmt::skip]
const XATTR_WRITES: &[libc::c_long] = &[
    libc::SYS_setxattr, libc::SYS_lsetxattr, libc::SYS_fsetxattr, libc::SYS_removexattr,
    libc::SYS_lremovexattr, libc::SYS_fremovexattr,
    // setxattrat, removexattrat (Linux 6.13)
    463, 466,
];

/// The three programs, in installation order.
pub fn compile() -> Result<Vec<BpfProgram>, SandboxError> {
    let arch = if cfg!(target_arch = "x86_64") {
        TargetArch::x86_64
    } else if cfg!(target_arch = "aarch64") {
        TargetArch::aarch64
    } else {
        return Err(SandboxError::Seccomp(format!(
            "no builder filter for {}",
            std::env::consts::ARCH
        )));
    };

    let mut allow: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for nr in ALLOWED.iter().chain(ALLOWED_LEGACY) {
        allow.insert(*nr, Vec::new());
    }

    let mut refuse: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let setid = u64::from(libc::S_ISUID | libc::S_ISGID);
    let mode_has = |arg: u8, bits: u64| cond(arg, SeccompCmpOp::MaskedEq(bits), bits);
    let setid_rules = |arg: u8| -> Result<Vec<SeccompRule>, SandboxError> {
        Ok(vec![
            rule(vec![mode_has(arg, u64::from(libc::S_ISUID))?])?,
            rule(vec![mode_has(arg, u64::from(libc::S_ISGID))?])?,
        ])
    };
    debug_assert_eq!(setid, 0o6000);
    refuse.insert(libc::SYS_fchmod, setid_rules(1)?);
    refuse.insert(libc::SYS_fchmodat, setid_rules(2)?);
    refuse.insert(libc::SYS_fchmodat2, setid_rules(2)?);
    let fmt = u64::from(libc::S_IFMT);
    let device_rules = |arg: u8| -> Result<Vec<SeccompRule>, SandboxError> {
        Ok(vec![
            rule(vec![cond(
                arg,
                SeccompCmpOp::MaskedEq(fmt),
                u64::from(libc::S_IFCHR),
            )?])?,
            rule(vec![cond(
                arg,
                SeccompCmpOp::MaskedEq(fmt),
                u64::from(libc::S_IFBLK),
            )?])?,
        ])
    };
    refuse.insert(libc::SYS_mknodat, device_rules(2)?);
    let newuser = libc::CLONE_NEWUSER as u64;
    let newuser_rule = || -> Result<Vec<SeccompRule>, SandboxError> {
        Ok(vec![rule(vec![cond(
            0,
            SeccompCmpOp::MaskedEq(newuser),
            newuser,
        )?])?])
    };
    // Typing into a terminal's input queue (TIOCSTI) or the console's (TIOCLINUX) would reach
    // whatever reads that terminal outside the build.
    refuse.insert(
        libc::SYS_ioctl,
        vec![
            rule(vec![cond(1, SeccompCmpOp::Eq, libc::TIOCSTI)?])?,
            rule(vec![cond(1, SeccompCmpOp::Eq, libc::TIOCLINUX)?])?,
        ],
    );
    refuse.insert(libc::SYS_clone, newuser_rule()?);
    refuse.insert(libc::SYS_unshare, newuser_rule()?);
    #[cfg(target_arch = "x86_64")]
    {
        refuse.insert(libc::SYS_chmod, setid_rules(1)?);
        refuse.insert(libc::SYS_mknod, device_rules(1)?);
    }

    let mut xattr: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for nr in XATTR_WRITES {
        xattr.insert(*nr, Vec::new());
    }

    let filters = [
        (
            allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
            SeccompAction::Allow,
        ),
        (
            refuse,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EPERM as u32),
        ),
        (
            xattr,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOTSUP as u32),
        ),
    ];
    let mut programs = Vec::with_capacity(filters.len());
    for (rules, mismatch, matched) in filters {
        let filter = SeccompFilter::new(rules, mismatch, matched, arch).map_err(backend)?;
        programs.push(BpfProgram::try_from(filter).map_err(backend)?);
    }
    Ok(programs)
}

/// A condition on the low 32 bits of an argument: every argument checked here (`mode_t`,
/// the clone/unshare flag bits of interest) lies there.
fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SandboxError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).map_err(backend)
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, SandboxError> {
    SeccompRule::new(conditions).map_err(backend)
}

fn backend(e: seccompiler::BackendError) -> SandboxError {
    SandboxError::Seccomp(e.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_filters_compile() {
        let programs = super::compile().unwrap();
        assert_eq!(programs.len(), 3);
        assert!(programs.iter().all(|p| !p.is_empty() && p.len() < 4096));
    }
}
