//! The roots-reader's allow-list ([`SeccompProfile::RootsReader`](super::SeccompProfile)).
//!
//! After its lockdown the roots-reader only waits for a request on its control channel, walks
//! `/proc` and answers. So this list allows: reading files it opens read-only (`openat` without
//! any writing or creating flag; `openat2`, whose flags seccomp cannot read, is refused),
//! listing directories, reading links, file metadata; `recvmsg`/`sendmsg` on the control
//! channel's descriptor only; `write` on standard output and error only (log lines); memory
//! (never executable); signal bookkeeping and `tgkill` on itself (`abort()`); exiting.
//!
//! Not on it, among everything else: `socket`, `connect`, `socketpair`, `sendto` (no network,
//! no other socket: what it reads can only go to the master, which checks it), `execve`,
//! `clone` (no threads, no children), `kill`, `fcntl` beyond reading flags, `ioctl`, `prctl`,
//! `pipe2`, `memfd_create`. The deny-list that runs first kills it for `ptrace`,
//! `process_vm_readv`, `pidfd_getfd` and `open_by_handle_at`, which its capabilities
//! (`CAP_SYS_PTRACE`, `CAP_DAC_READ_SEARCH`) would otherwise make powerful.

use nix::libc;

use super::{clear, eq, Cond, LockdownError, Rules, CREATING_OPEN};

/// Open flags that would let the reader change a file: any access mode but `O_RDONLY`,
/// truncation, appending, or creating.
const WRITING_OPEN: u64 = (libc::O_ACCMODE | libc::O_TRUNC | libc::O_APPEND) as u64 | CREATING_OPEN;

pub(super) fn allow_list(pid: u32, control_fd: u32) -> Result<Rules, LockdownError> {
    let mut r = Rules::default();
    r.allow_all(&[
        // Reading what it opened.
        libc::SYS_read,
        libc::SYS_readv,
        libc::SYS_pread64,
        libc::SYS_lseek,
        libc::SYS_close,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_getdents64,
        libc::SYS_readlinkat,
        // Memory (mmap and mprotect below: never executable).
        libc::SYS_brk,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_madvise,
        // Signals and its own bookkeeping.
        libc::SYS_futex,
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_sigaltstack,
        libc::SYS_restart_syscall,
        libc::SYS_sched_yield,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_clock_gettime,
        libc::SYS_getrandom,
    ])?;
    #[cfg(target_arch = "x86_64")]
    r.allow_all(&[libc::SYS_readlink, libc::SYS_stat, libc::SYS_lstat])?;
    r.allow_if(libc::SYS_openat, &[&[clear(2, WRITING_OPEN)]])?;
    let no_exec: &[&[Cond]] = &[&[clear(2, libc::PROT_EXEC as u64)]];
    r.allow_if(libc::SYS_mmap, no_exec)?;
    r.allow_if(libc::SYS_mprotect, no_exec)?;
    // Its one channel, and its log lines.
    let control: &[&[Cond]] = &[&[eq(0, u64::from(control_fd))]];
    r.allow_if(libc::SYS_recvmsg, control)?;
    r.allow_if(libc::SYS_sendmsg, control)?;
    let stdio: &[&[Cond]] = &[&[eq(0, 1)], &[eq(0, 2)]];
    r.allow_if(libc::SYS_write, stdio)?;
    r.allow_if(libc::SYS_writev, stdio)?;
    r.allow_if(
        libc::SYS_fcntl,
        &[
            &[eq(1, libc::F_GETFD as u64)],
            &[eq(1, libc::F_GETFL as u64)],
        ],
    )?;
    // abort() raises SIGABRT on itself.
    r.allow_if(libc::SYS_tgkill, &[&[eq(0, u64::from(pid))]])?;
    Ok(r)
}
