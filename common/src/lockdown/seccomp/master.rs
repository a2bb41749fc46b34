//! The master's allow-list ([`SeccompProfile::Master`](super::SeccompProfile::Master)).
//!
//! What the master does after start-up, and so all this list allows:
//! - accepting on its two listening sockets (`accept4`), reading `SO_PEERCRED`, passing
//!   descriptors over its seqpacket channels (`sendmsg`/`recvmsg` with `SCM_RIGHTS`, memfds for
//!   large messages), `poll` on a signalfd and the channels;
//! - per connection, a pipe for the broker's output (`pipe2`, `fcntl(F_SETFL)` for
//!   `O_NONBLOCK`, both allowed by `common`), read in its loop (master/src/daemon/relay.rs);
//! - per connection, `fork` (`clone` without namespace flags; the deny-list kills those) and in
//!   the child `setgroups`, `setresgid`, `setresuid`, `capset`, `prctl(PR_CAPBSET_DROP,
//!   PR_CAP_AMBIENT clear, PR_SET_NO_NEW_PRIVS)`, `close_range`, `dup2`, `chdir`, `execve`;
//! - reaping (`wait4`, `waitid`, `pidfd_open` while a replaced store's store-writer stops) and
//!   signalling its children (`kill`, only to a single pid or, from the child that empties a
//!   released uid after switching to it, `-1`);
//! - in a broker before its own lockdown, lowering its own rlimits (`prlimit64` on pid 0);
//! - reading `/proc/<pid>/status` (uid scans), `/etc/passwd`, `/etc/group`,
//!   `/etc/nsswitch.conf` and NSS modules' sockets (`socket(AF_UNIX)` + `connect`), creating and
//!   `flock`ing the per-uid lock files, connecting to a Nix garbage collector's socket for the
//!   store-writer, reconnecting the audit and syslog sockets (`sendto` only without an address,
//!   as A74 has it for the services).
//!
//! # Inherited
//!
//! A seccomp filter stays across `fork` and `execve`, and filters stack: every broker the
//! master starts runs under this list and then its own, so this list is also a superset of
//! what a broker does from `execve` to its own lockdown (the dynamic loader's file-backed
//! executable mappings, `arch_prctl`, Landlock, `seccomp`, `PR_SET_DUMPABLE 0`) and of the
//! broker's allow-list (which is built into this one). For a master that may start a new
//! store-writer later (run by an ordinary user) the store-writer's list is added as well, and
//! the file-writing restrictions below do not apply.
//!
//! Refused (`EPERM`), beyond the deny-list: opening any file for writing or truncating
//! (`openat` with `O_WRONLY`, `O_RDWR` or `O_TRUNC`; the lock files are opened `O_RDONLY |
//! O_CREAT`, which `flock` needs no more than), `openat2` (its flags are out of seccomp's
//! reach), every call that removes, renames, links, chmods or chowns, sockets of any family but
//! `AF_UNIX`, `bind`/`listen` (the sockets exist), anonymous or writable executable memory
//! (only file-backed read-only code can be mapped, as the loader and `dlopen` do; `mprotect`
//! never adds `PROT_EXEC`), `setuid`/`setgid`/`setreuid`/`setfsuid` (killed by the
//! deny-list), and every `prctl` that is not listed. `execve` itself cannot be limited by path
//! here; see the master's module doc for what limits it.

use nix::libc;
use seccompiler::SeccompCmpOp;

use super::{clear, common, eq, store_writer, Cond, LockdownError, Rules, CREATING_OPEN};

/// The socket type bits of `socket`'s type argument (the rest are flags).
const SOCK_TYPE_MASK: u64 = 0xf;
/// Mode bits no Stockade process may set on a file (A37, V15).
const SET_ID_BITS: u64 = (libc::S_ISUID | libc::S_ISGID) as u64;
/// Open flags that would let the master change a file's contents: any access mode but
/// `O_RDONLY` (0), and truncation.
const WRITING_OPEN: u64 = (libc::O_ACCMODE | libc::O_TRUNC) as u64;
/// `CLOSE_RANGE_CLOEXEC`: mark a range close-on-exec (spawn.rs, in the child).
const CLOSE_RANGE_CLOEXEC: u64 = 1 << 2;

impl Rules {
    /// Allow `nrs` unconditionally where they are not listed yet (the union with a profile
    /// already in the table).
    fn allow_missing(&mut self, nrs: &[libc::c_long]) -> Result<(), LockdownError> {
        for nr in nrs {
            if !self.map.contains_key(nr) {
                self.allow(*nr)?;
            }
        }
        Ok(())
    }

    /// Replace whatever `nr` had with `alternatives` (or unconditional when empty).
    pub(super) fn replace(
        &mut self,
        nr: libc::c_long,
        alternatives: &[&[Cond]],
    ) -> Result<(), LockdownError> {
        self.map.remove(&nr);
        if alternatives.is_empty() {
            self.allow(nr)
        } else {
            self.allow_if(nr, alternatives)
        }
    }
}

pub(super) fn allow_list(pid: u32, store_writer_restarts: bool) -> Result<Rules, LockdownError> {
    let mut r = Rules::default();
    // What the brokers it starts keep doing under this filter (and the store-writer's too, when
    // it may start one).
    common(&mut r, pid)?;
    if store_writer_restarts {
        store_writer(&mut r)?;
    }
    r.allow_missing(&[
        // Unix sockets it holds: accepting, connecting (a garbage collector's socket, NSS
        // services, syslog and the audit socket again).
        libc::SYS_accept4,
        libc::SYS_connect,
        // The per-uid lock files (uids.rs).
        libc::SYS_flock,
        // `--stdio` copies between its standard streams and a socket; std may splice.
        libc::SYS_splice,
        libc::SYS_sendfile,
        // Children: exec, reaping, a pidfd to wait for a store-writer with a deadline.
        libc::SYS_execve,
        libc::SYS_wait4,
        libc::SYS_waitid,
        libc::SYS_pidfd_open,
        // In the child before exec: working directory `/`, its own process group
        // (store-writer, builder-helper), identity, capabilities. capset can only lower what
        // the master holds.
        libc::SYS_chdir,
        libc::SYS_setpgid,
        // A child sets its own file-creation mask at start (the store-writer).
        libc::SYS_umask,
        libc::SYS_setgroups,
        libc::SYS_setresuid,
        libc::SYS_setresgid,
        libc::SYS_capget,
        libc::SYS_capset,
        // A child between exec and its own lockdown: Landlock and its own filters only ever
        // restrict.
        libc::SYS_landlock_create_ruleset,
        libc::SYS_landlock_add_rule,
        libc::SYS_landlock_restrict_self,
        libc::SYS_seccomp,
    ])?;
    #[cfg(target_arch = "x86_64")]
    r.allow_missing(&[libc::SYS_arch_prctl])?;
    // Fork as well as threads (namespace flags are killed by the deny-list).
    r.replace(libc::SYS_clone, &[])?;
    if !store_writer_restarts {
        // Reading only: no access mode but O_RDONLY, no O_TRUNC; a file created (the lock
        // files) gets no setuid/setgid bit (the mode argument means nothing without a
        // creating flag). openat2's flags are out of reach: refused.
        r.replace(
            libc::SYS_openat,
            &[
                &[clear(2, WRITING_OPEN | CREATING_OPEN)],
                &[clear(2, WRITING_OPEN), clear(3, SET_ID_BITS)],
            ],
        )?;
        r.map.remove(&libc::SYS_openat2);
    }
    // W^X, except for read-only file-backed code: what the dynamic loader maps for a child it
    // just exec'd (and dlopen). Never anonymous or writable executable memory, and mprotect
    // (common) never adds PROT_EXEC.
    r.replace(
        libc::SYS_mmap,
        &[
            &[clear(2, libc::PROT_EXEC as u64)],
            &[
                clear(2, libc::PROT_WRITE as u64),
                clear(3, libc::MAP_ANONYMOUS as u64),
            ],
        ],
    )?;
    // prctl: reading state and naming threads (common); in a child before exec, dropping
    // bounding-set entries, clearing the ambient set and setting no_new_privs; in a child
    // after exec, making itself not dumpable. Not PR_SET_KEEPCAPS, PR_SET_SECUREBITS, making
    // a process dumpable again or raising ambient capabilities.
    let mut prctl_rules: Vec<Vec<Cond>> = [
        libc::PR_SET_NAME,
        libc::PR_GET_NAME,
        libc::PR_GET_DUMPABLE,
        libc::PR_GET_NO_NEW_PRIVS,
        libc::PR_GET_SECCOMP,
        libc::PR_CAPBSET_READ,
        libc::PR_CAPBSET_DROP,
        libc::PR_SET_NO_NEW_PRIVS,
    ]
    .iter()
    .map(|op| vec![eq(0, *op as u64)])
    .collect();
    prctl_rules.push(vec![eq(0, libc::PR_SET_DUMPABLE as u64), eq(1, 0)]);
    for sub in [libc::PR_CAP_AMBIENT_CLEAR_ALL, libc::PR_CAP_AMBIENT_IS_SET] {
        prctl_rules.push(vec![eq(0, libc::PR_CAP_AMBIENT as u64), eq(1, sub as u64)]);
    }
    let prctl_rules: Vec<&[Cond]> = prctl_rules.iter().map(Vec::as_slice).collect();
    r.replace(libc::SYS_prctl, &prctl_rules)?;
    // Its own limits (pid 0), which a broker sets on itself before its lockdown when no
    // cgroup holds its budget (broker/src/budget.rs). Without CAP_SYS_RESOURCE, which no
    // process under this filter has, a limit can only be lowered.
    r.replace(libc::SYS_prlimit64, &[&[eq(0, 0)]])?;
    // In the child before exec: mark every descriptor above fd 3 close-on-exec.
    r.replace(libc::SYS_close_range, &[&[eq(2, CLOSE_RANGE_CLOEXEC)]])?;
    // AF_UNIX only (SECURITY.md §5): stream sockets to connect to a garbage collector's socket
    // or an NSS service (nscd, systemd-userdb), datagram sockets to reconnect syslog and the
    // audit socket. socketpair and sendto (no address, A74) as in common.
    let unix_type = |ty: libc::c_int| {
        [
            eq(0, libc::AF_UNIX as u64),
            (1, SeccompCmpOp::MaskedEq(SOCK_TYPE_MASK), ty as u64),
        ]
    };
    let (stream, dgram) = (unix_type(libc::SOCK_STREAM), unix_type(libc::SOCK_DGRAM));
    r.replace(libc::SYS_socket, &[&stream[..], &dgram[..]])?;
    // Signals: to one process (a broker, its store-writer or helper), or to -1 from the child
    // that has switched to a released broker uid to end that uid's leftovers (uids.rs). Not
    // to process groups (0 and other negative values).
    r.replace(
        libc::SYS_kill,
        &[
            &[
                (0, SeccompCmpOp::MaskedEq(0x8000_0000), 0),
                (0, SeccompCmpOp::Ne, 0),
            ],
            &[eq(0, u64::from(u32::MAX))],
        ],
    )?;
    // A child's abort() raises SIGABRT on itself, with its own pid: any thread group (the
    // master may signal any of its children with kill anyway).
    r.replace(libc::SYS_tgkill, &[])?;
    Ok(r)
}
