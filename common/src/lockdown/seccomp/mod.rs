//! seccomp-bpf allow-lists, compiled into the binary (built at run time from the tables below by
//! `seccompiler`, never read from a file).
//!
//! # Shape
//!
//! Three filters, installed in this order (the kernel runs the newest first and the most severe
//! action wins; between two `ERRNO`s the first one seen, i.e. the newest filter's, wins):
//!
//! 1. `clone3` → `ENOSYS`, everything else allowed. seccomp cannot look inside `clone3`'s
//!    argument struct, so it is refused in a way that makes glibc fall back to `clone`, whose
//!    flags can be checked.
//! 2. The deny-list → the whole process is killed (`SIGSYS`): calls no Stockade service makes
//!    and that only an attacker would (exec, ptrace, namespaces, mounts, identity changes,
//!    kernel attack surface). Everything else allowed. The master's (which execs brokers)
//!    leaves out `execve`, `setresuid`, `setresgid` and `setgroups`.
//! 3. The profile's allow-list; anything not on it fails with `EPERM`. It lists `clone3` as
//!    allowed so that filter 1's `ENOSYS` is the one seen.
//!
//! Filter 3 is installed last, so it need not allow `seccomp` itself: no filter can be added
//! afterwards. Every filter starts with seccompiler's architecture check, which kills a process
//! that switches to another syscall ABI (i386 `int 0x80`). x32 system call numbers (with bit 30
//! set) match no entry of the allow-list and fail with `EPERM`.
//!
//! Syscalls whose verdict does not depend on arguments are answered from the kernel's
//! per-syscall action cache (Linux ≥ 5.11) without running any filter, so the common calls
//! (`read`, `write`, `futex`, ...) cost nothing extra.
//!
//! # Debugging
//!
//! With `stockade daemon --debug-seccomp-log` (the master sends [`SeccompMode::Log`] in each
//! service's start configuration) the allow-list's default action is `LOG` instead of `EPERM`:
//! calls missing from the list succeed and are logged by the kernel (`dmesg`, or the audit
//! log: `type=SECCOMP ... syscall=N`). The deny-list still kills. Never use it in production;
//! the start-up audit lines show `seccomp=log` when it is on. The environment cannot turn it on
//! (A76): a variable leaking into the daemon's environment must not weaken every service.

use std::collections::BTreeMap;

use nix::libc;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use serde::{Deserialize, Serialize};

use super::LockdownError;

mod master;
mod roots_reader;

/// Which allow-list to install.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeccompProfile {
    /// Single-threaded; blocking I/O on the descriptors it was given, reading store files,
    /// pipes and memfds for IPC. No new sockets, no threads, no writes to the file system
    /// (Landlock also refuses those).
    Broker,
    /// The broker's set plus file-system writes, threads (`clone` with `CLONE_THREAD`) and what
    /// SQLite needs. No `execve`, no new sockets, no setuid/setgid modes.
    StoreWriter,
    /// The master after start-up ([`master`]): accepting on its listening sockets, passing
    /// descriptors, forking and exec'ing brokers (with `setresuid`, `setresgid`, `setgroups`
    /// and capability calls in the child), signalling its children, reading `/proc`, passwd
    /// and group; plus what the children it starts later need (they inherit the filter).
    /// Unlike the others it may `execve` and change identity. Without `store_writer_restarts`
    /// (a root master, which exits rather than start a new store-writer) it may not open a
    /// file for writing, remove, rename or chmod anything; it never makes any but AF_UNIX
    /// sockets.
    Master { store_writer_restarts: bool },
    /// The roots-reader (`seccomp/roots_reader.rs`): reading `/proc`, answering on its
    /// control channel (descriptor `control_fd`), nothing else. Single-threaded, no sockets, no
    /// writes.
    RootsReader { control_fd: u32 },
}

/// What happens to a call that is not on the allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum SeccompMode {
    /// Fails with `EPERM`.
    #[default]
    Enforce,
    /// Succeeds and is logged by the kernel (`stockade daemon --debug-seccomp-log` only).
    Log,
}

/// Install the three filters of `profile` on every thread of the process (`TSYNC`). Also sets
/// `no_new_privs`, which seccomp requires.
pub fn apply_seccomp(profile: SeccompProfile, mode: SeccompMode) -> Result<(), LockdownError> {
    let programs = compile(profile, mode, std::process::id())?;
    for program in &programs {
        seccompiler::apply_filter_all_threads(program).map_err(LockdownError::seccomp)?;
    }
    Ok(())
}

/// The BPF programs of `profile`, in installation order. `pid` is the process's own pid: the
/// only target `tgkill` may have (so `abort()` still raises `SIGABRT`).
pub fn compile(
    profile: SeccompProfile,
    mode: SeccompMode,
    pid: u32,
) -> Result<Vec<BpfProgram>, LockdownError> {
    let arch = target_arch()?;
    let default = match mode {
        SeccompMode::Enforce => SeccompAction::Errno(libc::EPERM as u32),
        SeccompMode::Log => SeccompAction::Log,
    };
    let mut clone3 = Rules::default();
    clone3.allow(libc::SYS_clone3)?;
    let filters = [
        (
            clone3,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
        ),
        (
            deny_list(profile)?,
            SeccompAction::Allow,
            SeccompAction::KillProcess,
        ),
        (allow_list(profile, pid)?, default, SeccompAction::Allow),
    ];
    let mut programs = Vec::with_capacity(filters.len());
    for (rules, mismatch, matched) in filters {
        let filter = SeccompFilter::new(rules.map, mismatch, matched, arch)
            .map_err(LockdownError::seccomp_backend)?;
        programs.push(BpfProgram::try_from(filter).map_err(LockdownError::seccomp_backend)?);
    }
    Ok(programs)
}

fn target_arch() -> Result<TargetArch, LockdownError> {
    if cfg!(target_arch = "x86_64") {
        Ok(TargetArch::x86_64)
    } else if cfg!(target_arch = "aarch64") {
        Ok(TargetArch::aarch64)
    } else {
        Err(LockdownError::UnsupportedArch(std::env::consts::ARCH))
    }
}

/// A syscall table under construction. Each syscall appears once: either unconditionally, or
/// with a list of rules of which one must match (each rule's conditions must all hold).
#[derive(Default)]
struct Rules {
    map: BTreeMap<i64, Vec<SeccompRule>>,
}

/// One argument condition: (argument index, comparison, value), on the low 32 bits (every
/// argument checked here is an `int`, `mode_t` or flag word the kernel truncates to 32 bits).
type Cond = (u8, SeccompCmpOp, u64);

impl Rules {
    fn allow(&mut self, nr: libc::c_long) -> Result<(), LockdownError> {
        self.insert(nr, Vec::new())
    }

    fn allow_all(&mut self, nrs: &[libc::c_long]) -> Result<(), LockdownError> {
        nrs.iter().try_for_each(|nr| self.allow(*nr))
    }

    /// Allowed when one of `alternatives` holds (each a list of conditions that must all hold).
    fn allow_if(
        &mut self,
        nr: libc::c_long,
        alternatives: &[&[Cond]],
    ) -> Result<(), LockdownError> {
        let mut rules = Vec::with_capacity(alternatives.len());
        for conds in alternatives {
            let conds = conds
                .iter()
                .map(|(arg, op, value)| {
                    SeccompCondition::new(*arg, SeccompCmpArgLen::Dword, op.clone(), *value)
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(LockdownError::seccomp_backend)?;
            rules.push(SeccompRule::new(conds).map_err(LockdownError::seccomp_backend)?);
        }
        if rules.is_empty() {
            return Err(LockdownError::SeccompTable(
                "conditional entry without rules",
            ));
        }
        self.insert(nr, rules)
    }

    fn insert(&mut self, nr: libc::c_long, rules: Vec<SeccompRule>) -> Result<(), LockdownError> {
        // A second entry would silently replace (or, merged, narrow) the first.
        if self.map.insert(nr, rules).is_some() {
            return Err(LockdownError::SeccompTable("system call listed twice"));
        }
        Ok(())
    }
}

fn eq(arg: u8, value: u64) -> Cond {
    (arg, SeccompCmpOp::Eq, value)
}

/// `(arg & mask) == 0`
fn clear(arg: u8, mask: u64) -> Cond {
    (arg, SeccompCmpOp::MaskedEq(mask), 0)
}

/// `(arg & bits) == bits`
fn set(arg: u8, bits: u64) -> Cond {
    (arg, SeccompCmpOp::MaskedEq(bits), bits)
}

/// `fchmodat2` (Linux 6.6) has the same number on every architecture; libc lacks it on aarch64.
const SYS_FCHMODAT2: libc::c_long = 452;
/// `SO_RCVTIMEO_NEW` / `SO_SNDTIMEO_NEW` (64-bit time), same on x86_64 and aarch64.
const SO_RCVTIMEO_NEW: u64 = 66;
const SO_SNDTIMEO_NEW: u64 = 67;

/// The socket type bits of `socket`'s and `socketpair`'s type argument (the rest are flags).
const SOCK_TYPE_MASK: u64 = 0xf;

/// Mode bits no Stockade process may set on a file (A37, V15).
const SET_ID_BITS: u64 = (libc::S_ISUID | libc::S_ISGID) as u64;
/// Open flags that create a file (and so use the mode argument): `O_CREAT`, and `O_TMPFILE`'s
/// own bit (`O_TMPFILE` also contains `O_DIRECTORY`, which alone creates nothing).
const CREATING_OPEN: u64 = (libc::O_CREAT | (libc::O_TMPFILE & !libc::O_DIRECTORY)) as u64;

/// Namespace flags of `clone`. (`CLONE_NEWTIME` is left out: for `clone` that bit is part of
/// the exit signal; `unshare` and `clone3` are refused anyway.)
const CLONE_NS_FLAGS: [libc::c_int; 7] = [
    libc::CLONE_NEWNS,
    libc::CLONE_NEWCGROUP,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
];

/// Calls that kill the process: the ones that would let a compromised process escape or attack
/// the kernel, and that no Stockade service makes after start (A47, A60, SECURITY.md §5).
///
/// The master's profile leaves out the calls it needs to start brokers (`execve`, `setresuid`,
/// `setresgid`, `setgroups`); its allow-list limits them instead.
fn deny_list(profile: SeccompProfile) -> Result<Rules, LockdownError> {
    let mut r = Rules::default();
    if !matches!(profile, SeccompProfile::Master { .. }) {
        r.allow_all(&[
            libc::SYS_execve,
            libc::SYS_setresuid,
            libc::SYS_setresgid,
            libc::SYS_setgroups,
        ])?;
    }
    r.allow_all(&[
        // Other processes' memory.
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_pidfd_getfd,
        // Mounts and namespaces.
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_move_mount,
        libc::SYS_open_tree,
        libc::SYS_fsopen,
        libc::SYS_fsmount,
        libc::SYS_fsconfig,
        libc::SYS_fspick,
        libc::SYS_mount_setattr,
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_chroot,
        // Running anything else (`execve` above).
        libc::SYS_execveat,
        // Identity.
        libc::SYS_setuid,
        libc::SYS_setgid,
        libc::SYS_setreuid,
        libc::SYS_setregid,
        libc::SYS_setfsuid,
        libc::SYS_setfsgid,
        // Kernel attack surface.
        libc::SYS_bpf,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_userfaultfd,
        libc::SYS_perf_event_open,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        // Opening files by handle bypasses paths, and so Landlock (with CAP_DAC_READ_SEARCH).
        libc::SYS_open_by_handle_at,
        // The machine itself.
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_reboot,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_acct,
        libc::SYS_sethostname,
        libc::SYS_setdomainname,
    ])?;
    #[cfg(target_arch = "x86_64")]
    r.allow_all(&[libc::SYS_iopl, libc::SYS_ioperm])?;
    // New namespaces through clone (plain threads and forks are the allow-list's business).
    let alternatives: Vec<[Cond; 1]> = CLONE_NS_FLAGS
        .iter()
        .map(|flag| [set(0, *flag as u64)])
        .collect();
    let alternatives: Vec<&[Cond]> = alternatives.iter().map(|a| &a[..]).collect();
    r.allow_if(libc::SYS_clone, &alternatives)?;
    Ok(r)
}

fn allow_list(profile: SeccompProfile, pid: u32) -> Result<Rules, LockdownError> {
    if let SeccompProfile::Master {
        store_writer_restarts,
    } = profile
    {
        return master::allow_list(pid, store_writer_restarts);
    }
    if let SeccompProfile::RootsReader { control_fd } = profile {
        return roots_reader::allow_list(pid, control_fd);
    }
    let mut r = Rules::default();
    common(&mut r, pid)?;
    if profile == SeccompProfile::StoreWriter {
        store_writer(&mut r)?;
    }
    if profile == SeccompProfile::Broker {
        // Moving an upload from the client's socket into the store-writer's pipe.
        r.allow(libc::SYS_splice)?;
        // Lowering its own rlimits to its budget once the helper says what its cgroup does
        // not hold (broker/src/budget.rs); without CAP_SYS_RESOURCE it cannot raise them.
        r.replace(libc::SYS_prlimit64, &[&[eq(0, 0)]])?;
    }
    Ok(r)
}

/// What the broker and the store-writer need.
fn common(r: &mut Rules, pid: u32) -> Result<(), LockdownError> {
    r.allow_all(&[
        // I/O on descriptors.
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_lseek,
        libc::SYS_close,
        libc::SYS_dup,
        libc::SYS_dup3,
        libc::SYS_fadvise64,
        // Looking at files (metadata is not governed by Landlock, and reveals little).
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_fstatfs,
        libc::SYS_getdents64,
        libc::SYS_readlinkat,
        libc::SYS_faccessat,
        libc::SYS_faccessat2,
        libc::SYS_getcwd,
        // openat2 carries its mode in a struct seccomp cannot read; it is what RESOLVE_BENEATH
        // walks use, so it stays, and the store-writer's own canonicalisation covers its modes.
        libc::SYS_openat2,
        // IPC: pipes and memfds to pass data, messages with descriptors on existing sockets.
        libc::SYS_pipe2,
        libc::SYS_memfd_create,
        libc::SYS_sendmsg,
        libc::SYS_recvmsg,
        libc::SYS_recvfrom,
        libc::SYS_shutdown,
        libc::SYS_getsockopt,
        libc::SYS_getsockname,
        libc::SYS_getpeername,
        libc::SYS_ppoll,
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_pwait2,
        // Memory (mmap and mprotect are below: never executable).
        libc::SYS_brk,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_madvise,
        // Synchronisation, signals, threads' own bookkeeping.
        libc::SYS_futex,
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_sigaltstack,
        libc::SYS_restart_syscall,
        libc::SYS_set_robust_list,
        libc::SYS_set_tid_address,
        libc::SYS_rseq,
        libc::SYS_sched_getaffinity,
        libc::SYS_sched_yield,
        libc::SYS_exit,
        libc::SYS_exit_group,
        // Refused with ENOSYS by the first filter; listed so that verdict is the one seen.
        libc::SYS_clone3,
        // Who and when.
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_getppid,
        libc::SYS_getuid,
        libc::SYS_geteuid,
        libc::SYS_getgid,
        libc::SYS_getegid,
        libc::SYS_getresuid,
        libc::SYS_getresgid,
        libc::SYS_getgroups,
        libc::SYS_uname,
        libc::SYS_clock_gettime,
        libc::SYS_clock_getres,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_gettimeofday,
        libc::SYS_getrandom,
    ])?;
    // The legacy path-based calls glibc still uses on x86_64 (stat, access, readlink, ...).
    #[cfg(target_arch = "x86_64")]
    r.allow_all(&[
        libc::SYS_stat,
        libc::SYS_lstat,
        libc::SYS_access,
        libc::SYS_readlink,
        libc::SYS_dup2,
        libc::SYS_pipe,
        libc::SYS_poll,
        libc::SYS_epoll_wait,
    ])?;

    // Opening: creating a file must not give it setuid/setgid bits (openat(dfd, path, flags,
    // mode)). For the broker Landlock refuses creation anyway.
    r.allow_if(
        libc::SYS_openat,
        &[&[clear(2, CREATING_OPEN)], &[clear(3, SET_ID_BITS)]],
    )?;
    // W^X: nothing becomes executable after start (no JIT, no dlopen).
    let no_exec: &[&[Cond]] = &[&[clear(2, libc::PROT_EXEC as u64)]];
    r.allow_if(libc::SYS_mmap, no_exec)?;
    r.allow_if(libc::SYS_mprotect, no_exec)?;
    // fcntl: descriptor flags, locks, seals, pipe sizes. Not F_SETOWN / F_SETSIG (signals to
    // other processes) or leases. Not open-file-description locks either: /proc/locks names no
    // process for them, so a broker holding SQLite's lock that way could not be found and
    // ended (A69); SQLite takes process-associated locks.
    let fcntl_cmds = [
        libc::F_DUPFD,
        libc::F_DUPFD_CLOEXEC,
        libc::F_GETFD,
        libc::F_SETFD,
        libc::F_GETFL,
        libc::F_SETFL,
        libc::F_GETLK,
        libc::F_SETLK,
        libc::F_SETLKW,
        libc::F_OFD_GETLK,
        libc::F_ADD_SEALS,
        libc::F_GET_SEALS,
        libc::F_GETPIPE_SZ,
        libc::F_SETPIPE_SZ,
    ];
    allow_arg_in(r, libc::SYS_fcntl, 1, &fcntl_cmds.map(|c| c as u64))?;
    // ioctl: only asking how much is readable, whether a descriptor is a terminal, and
    // close-on-exec. Notably not TIOCSTI (typing into a terminal).
    allow_arg_in(
        r,
        libc::SYS_ioctl,
        1,
        &[
            ioctl_request(libc::FIONREAD),
            ioctl_request(libc::TCGETS),
            ioctl_request(libc::FIOCLEX),
            ioctl_request(libc::FIONCLEX),
        ],
    )?;
    // prctl: reading state and naming threads. Nothing that undoes the lockdown
    // (PR_SET_DUMPABLE) or changes capabilities.
    allow_arg_in(
        r,
        libc::SYS_prctl,
        0,
        &[
            libc::PR_SET_NAME as u64,
            libc::PR_GET_NAME as u64,
            libc::PR_GET_DUMPABLE as u64,
            libc::PR_GET_NO_NEW_PRIVS as u64,
            libc::PR_GET_SECCOMP as u64,
            libc::PR_CAPBSET_READ as u64,
        ],
    )?;
    // Socket options the IPC layer sets (timeouts, SO_PASSCRED off) and buffer sizes.
    let sockopts = [
        libc::SO_RCVTIMEO as u64,
        libc::SO_SNDTIMEO as u64,
        SO_RCVTIMEO_NEW,
        SO_SNDTIMEO_NEW,
        libc::SO_PASSCRED as u64,
        libc::SO_SNDBUF as u64,
        libc::SO_RCVBUF as u64,
    ];
    let sockopt_rules: Vec<[Cond; 2]> = sockopts
        .iter()
        .map(|opt| [eq(1, libc::SOL_SOCKET as u64), eq(2, *opt)])
        .collect();
    let sockopt_rules: Vec<&[Cond]> = sockopt_rules.iter().map(|a| &a[..]).collect();
    r.allow_if(libc::SYS_setsockopt, &sockopt_rules)?;
    // A connected pair of unix sockets reaches nothing outside the process, unless it is a
    // datagram pair: `sendmsg` on one can still name any socket on the file system (A74), and
    // seccomp cannot read `msg_name`. So stream and seqpacket pairs only.
    let unix_type = |ty: libc::c_int| {
        [
            eq(0, libc::AF_UNIX as u64),
            (1, SeccompCmpOp::MaskedEq(SOCK_TYPE_MASK), ty as u64),
        ]
    };
    let (stream, seqpacket) = (
        unix_type(libc::SOCK_STREAM),
        unix_type(libc::SOCK_SEQPACKET),
    );
    if cfg!(feature = "without-a74") {
        r.allow_if(libc::SYS_socketpair, &[&[eq(0, libc::AF_UNIX as u64)]])?;
        r.allow(libc::SYS_sendto)?;
    } else {
        r.allow_if(libc::SYS_socketpair, &[&stream[..], &seqpacket[..]])?;
        // Sends only to the socket's own peer: `sendto` with an address could reach another
        // user's datagram socket, or syslog, under no one's name (A74).
        r.allow_if(libc::SYS_sendto, &[&[eq(4, 0)]])?;
    }
    // Signals only to itself (abort() → raise(SIGABRT)).
    r.allow_if(libc::SYS_tgkill, &[&[eq(0, u64::from(pid))]])?;
    // Reading limits (pid 0, no new limit); never raising them.
    r.allow_if(libc::SYS_prlimit64, &[&[eq(0, 0), eq(2, 0)]])?;
    Ok(())
}

/// The store-writer's additions: writing the file system, threads.
fn store_writer(r: &mut Rules) -> Result<(), LockdownError> {
    r.allow_all(&[
        // Serving the collector's `gc-socket` on a socket the master made (it may not make
        // one: no socket()); Landlock lets it bind only in `gc-socket/`.
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_accept4,
        libc::SYS_mkdirat,
        libc::SYS_unlinkat,
        libc::SYS_renameat2,
        libc::SYS_symlinkat,
        libc::SYS_linkat,
        libc::SYS_fchown,
        libc::SYS_fchownat,
        libc::SYS_utimensat,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_syncfs,
        libc::SYS_ftruncate,
        libc::SYS_truncate,
        libc::SYS_flock,
        libc::SYS_fallocate,
        libc::SYS_copy_file_range,
        libc::SYS_sendfile,
        libc::SYS_splice,
        libc::SYS_statfs,
        // Canonicalisation lists and removes extended attributes on descriptors it opened
        // (setting them stays refused).
        libc::SYS_flistxattr,
        libc::SYS_fremovexattr,
    ])?;
    #[cfg(target_arch = "x86_64")]
    r.allow_all(&[
        libc::SYS_renameat,
        libc::SYS_rename,
        libc::SYS_mkdir,
        libc::SYS_rmdir,
        libc::SYS_unlink,
        libc::SYS_symlink,
        libc::SYS_link,
        libc::SYS_chown,
        libc::SYS_lchown,
    ])?;
    // No setuid/setgid bits, whichever call sets the mode.
    r.allow_if(libc::SYS_fchmod, &[&[clear(1, SET_ID_BITS)]])?;
    r.allow_if(libc::SYS_fchmodat, &[&[clear(2, SET_ID_BITS)]])?;
    r.allow_if(SYS_FCHMODAT2, &[&[clear(2, SET_ID_BITS)]])?;
    #[cfg(target_arch = "x86_64")]
    r.allow_if(libc::SYS_chmod, &[&[clear(1, SET_ID_BITS)]])?;
    // Threads, not processes (a fork would escape nothing but has no use here).
    r.allow_if(libc::SYS_clone, &[&[set(0, libc::CLONE_THREAD as u64)]])?;
    Ok(())
}

/// An ioctl request number as a filter value (`libc::Ioctl` is `c_ulong` on glibc, `c_int` on
/// musl; the kernel compares it as a 32-bit `unsigned int`).
#[allow(clippy::unnecessary_cast)]
fn ioctl_request(request: libc::Ioctl) -> u64 {
    request as u64
}

/// Allow `nr` when argument `arg` is one of `values`.
fn allow_arg_in(
    r: &mut Rules,
    nr: libc::c_long,
    arg: u8,
    values: &[u64],
) -> Result<(), LockdownError> {
    let alternatives: Vec<[Cond; 1]> = values.iter().map(|v| [eq(arg, *v)]).collect();
    let alternatives: Vec<&[Cond]> = alternatives.iter().map(|a| &a[..]).collect();
    r.allow_if(nr, &alternatives)
}

#[cfg(test)]
mod tests;
