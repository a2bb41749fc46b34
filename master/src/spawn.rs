//! Starting the other Stockade processes: exec (never just fork, DESIGN.md), with exactly one
//! extra descriptor, the control channel, as fd 3, and the confinement decided by the master.
//!
//! What every child gets:
//! - fd 0 `/dev/null`, fds 1 and 2 the master's standard error or, for a broker, a pipe the
//!   master relays line by line ([`Output`], daemon/relay.rs) (in `--stdio` mode the master's
//!   standard output is the client's channel and must never reach a child), fd 3 the control
//!   channel, and nothing else: every other descriptor is marked close-on-exec in the child
//!   (`close_range(4, ~0, CLOSE_RANGE_CLOEXEC)`) on top of the master opening everything
//!   close-on-exec;
//! - an empty signal mask, working directory `/`, and an environment reduced to
//!   [`PASSED_ENV`] (so neither `NIX_REMOTE` nor systemd's variables leak);
//! - `no_new_privs`.
//!
//! As root, additionally ([`Confinement`]):
//! - the store-writer runs under a uid of its own (not 0: the master is the only root process)
//!   and keeps exactly [`STORE_WRITER_CAPS`], carried across exec as ambient capabilities; its
//!   bounding set holds nothing else (no `CAP_SYS_ADMIN`, no `CAP_SETUID`, …). It makes the
//!   store's files root-owned with CAP_CHOWN, so the store looks exactly as nix-daemon leaves it;
//! - the builder-helper runs under a uid of its own too and keeps exactly [`BUILDER_CAPS`]
//!   the same way (never `CAP_SYS_ADMIN`: the sandbox's mounts happen in the build's own user
//!   namespace), and the roots-reader [`ROOTS_READER_CAPS`];
//! - a broker gets an empty bounding set, no supplementary groups, and its own uid and gid
//!   (`setresgid` then `setresuid`), which clears every capability.
//!
//! The master forks only while it has a single thread (the accept loop is single-threaded;
//! `--stdio` starts its copying threads after its children), so the `pre_exec` code may
//! allocate; it still uses only precomputed data and plain system calls.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use caps::{CapSet, Capability, CapsHashSet};
use nix::errno::Errno;
use nix::sys::signal::{sigprocmask, SigSet, SigmaskHow};
use nix::unistd::{Gid, Uid};

use crate::error::{Error, Result};

/// The descriptor number of the control channel in every child.
pub const CONTROL_FD: RawFd = 3;

/// Capabilities the store-writer keeps when the daemon runs as root: owning and fixing up
/// files in the store and state directories whatever their current owner and mode.
pub const STORE_WRITER_CAPS: [Capability; 4] = [
    Capability::CAP_CHOWN,
    Capability::CAP_FOWNER,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_DAC_READ_SEARCH,
];

/// Capabilities the builder-helper keeps when the daemon runs as root, each for one thing:
/// - `CAP_SETUID`, `CAP_SETGID`: writing the uid and gid maps of a build's user namespace
///   for a build uid that is not the helper's own (and dropping the helper's groups there);
///   running an unsandboxed builder (`sandbox = false`) as its build uid;
/// - `CAP_CHOWN`: handing each build's directories to its build uid;
/// - `CAP_DAC_OVERRIDE`: reaching into those directories (the builder's uid owns them) to
///   make the inputs' mount points, write `passAsFile` files and clean up after the build;
/// - `CAP_KILL`: killing an unsandboxed builder, which runs under its build uid in the
///   helper's own namespaces (a sandboxed one is in a user namespace the helper owns, where
///   no capability is needed).
pub const BUILDER_CAPS: [Capability; 5] = [
    Capability::CAP_SETUID,
    Capability::CAP_SETGID,
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_KILL,
];

/// Capabilities the roots-reader keeps when the daemon runs as root: `CAP_SYS_PTRACE` and
/// `CAP_DAC_READ_SEARCH`, to read every process's `/proc/<pid>` entries (roots.rs).
pub use stockade_common::lockdown::ROOTS_READER_CAPS;

/// Environment variables a child inherits from the master; everything else is dropped.
/// Proxy and certificate variables are for substituter access; `STOCKADE_*` for the test
/// doubles. No service takes a defence switch from its environment (A76): confinement options
/// travel in the typed start configuration.
pub const PASSED_ENV: &[&str] = &[
    "PATH",
    "TZ",
    "LANG",
    "LC_ALL",
    "RUST_BACKTRACE",
    "RUST_LOG",
    "NIX_SSL_CERT_FILE",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "http_proxy",
    "https_proxy",
    "ftp_proxy",
    "all_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "FTP_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
];

/// How a child is confined beyond what every child gets.
#[derive(Debug, Clone)]
pub enum Confinement {
    /// Root daemon, store-writer: this uid and gid, no groups, [`STORE_WRITER_CAPS`] only.
    StoreWriterCaps { uid: u32, gid: u32 },
    /// Root daemon, builder-helper: this uid and gid, no groups, [`BUILDER_CAPS`] only.
    BuilderCaps { uid: u32, gid: u32 },
    /// Root daemon, roots-reader: this uid and gid, no groups, [`ROOTS_READER_CAPS`] only.
    RootsReaderCaps { uid: u32, gid: u32 },
    /// Root daemon, broker: this uid and gid, no groups, no capabilities.
    /// Its own uid and gid, and at most one supplementary group.
    OwnUid {
        uid: u32,
        gid: u32,
        group: Option<u32>,
    },
    /// Daemon run by an ordinary user: the same uid; only `no_new_privs`.
    SameUid,
}

/// Where a child's standard output and error go.
#[derive(Debug)]
pub enum Output {
    /// The master's own standard error: the trusted services (daemon/relay.rs says why).
    MasterStderr,
    /// The write end of a pipe whose other end the master relays: brokers.
    Pipe(OwnedFd),
}

/// The environment children get.
pub fn child_env() -> Vec<(OsString, OsString)> {
    std::env::vars_os()
        .filter(|(k, _)| {
            k.to_str()
                .is_some_and(|k| PASSED_ENV.contains(&k) || k.starts_with("STOCKADE_"))
        })
        .collect()
}

/// The highest capability number the kernel knows.
fn last_cap() -> i32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63)
}

/// What the child's `pre_exec` needs, all computed before forking.
struct Plan {
    control: RawFd,
    confinement: Confinement,
    /// Bounding-set entries to drop.
    drop_bounding: Vec<i32>,
    keep: CapsHashSet,
}

/// Starts a privileged service (`program`) that the master keeps for its whole life: in its
/// own process group (a terminal's ^C reaches the master, which then stops it in order), its
/// output through the master's stderr, talking over a new channel on which reads wait at most
/// `start` (its hello and start-up) and writes at most `send`. Returns its pid and the channel.
pub fn service(
    program: &Path,
    confinement: Confinement,
    what: &'static str,
    start: std::time::Duration,
    send: std::time::Duration,
) -> Result<(i32, stockade_common::ipc::Channel)> {
    use stockade_common::ipc;
    let (ours, theirs) = ipc::socketpair().map_err(Error::ipc("socketpair"))?;
    let theirs = theirs.into_fd();
    let pid = spawn(program, &theirs, confinement, Output::MasterStderr, true)?;
    drop(theirs);
    ours.set_read_timeout(Some(start))
        .map_err(Error::ipc(what))?;
    ours.set_write_timeout(Some(send))
        .map_err(Error::ipc(what))?;
    Ok((pid, ours))
}

/// Start `program --control-fd 3` with `control` as fd 3 and `output` as fds 1 and 2. Returns
/// the child's pid; the caller reaps it (`waitpid`), the `Child` handle is not kept.
pub fn spawn(
    program: &Path,
    control: &OwnedFd,
    confinement: Confinement,
    output: Output,
    new_process_group: bool,
) -> Result<i32> {
    let kept: &[Capability] = match confinement {
        Confinement::StoreWriterCaps { .. } => &STORE_WRITER_CAPS,
        Confinement::BuilderCaps { .. } => &BUILDER_CAPS,
        Confinement::RootsReaderCaps { .. } => &ROOTS_READER_CAPS,
        Confinement::OwnUid { .. } | Confinement::SameUid => &[],
    };
    let keep: CapsHashSet = kept.iter().copied().collect();
    let drop_bounding: Vec<i32> = match confinement {
        Confinement::StoreWriterCaps { .. }
        | Confinement::BuilderCaps { .. }
        | Confinement::RootsReaderCaps { .. } => (0..=last_cap())
            .filter(|i| !kept.iter().any(|c| i32::from(c.index()) == *i))
            .collect(),
        Confinement::OwnUid { .. } => (0..=last_cap()).collect(),
        Confinement::SameUid => Vec::new(),
    };
    let plan = Plan {
        control: control.as_raw_fd(),
        confinement,
        drop_bounding,
        keep,
    };
    let (err_out, err_err) = match output {
        Output::MasterStderr => (dup_stderr()?, dup_stderr()?),
        Output::Pipe(w) => {
            let w2 = w.try_clone().map_err(Error::io("duplicating a pipe"))?;
            (w, w2)
        }
    };

    let mut cmd = Command::new(program);
    cmd.arg("--control-fd")
        .arg(CONTROL_FD.to_string())
        .env_clear()
        .envs(child_env())
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::from(err_out))
        .stderr(Stdio::from(err_err));
    if new_process_group {
        cmd.process_group(0);
    }
    // SAFETY: the closure runs in the child between fork and exec. The master forks only while
    // single-threaded (module doc), so no lock can be held by a vanished thread; the closure
    // only issues system calls on data computed before the fork and touches no shared state.
    unsafe {
        cmd.pre_exec(move || child_setup(&plan).map_err(std::io::Error::from));
    }
    let child = cmd
        .spawn()
        .map_err(Error::io(format!("starting {}", program.display())))?;
    i32::try_from(child.id()).map_err(|_| Error::Other("child pid out of range".into()))
}

/// The master's standard error as an owned, close-on-exec descriptor.
fn dup_stderr() -> Result<OwnedFd> {
    use std::os::fd::AsFd;
    std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map_err(Error::io("duplicating standard error"))
}

/// Make sure descriptors 0 to 3 are open (on `/dev/null` if they were not), so that nothing the
/// master opens later, such as the pipe `Command` uses to report exec failures, gets a number a
/// child's fixed layout overwrites.
pub fn occupy_low_fds() -> Result<()> {
    for fd in 0..=CONTROL_FD {
        if nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD) == Err(Errno::EBADF) {
            // open() returns the lowest free number, which is `fd`: those below are open.
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
                .map_err(Error::io("opening /dev/null"))?;
            let raw = std::os::fd::IntoRawFd::into_raw_fd(f);
            if fd == CONTROL_FD {
                nix::fcntl::fcntl(
                    raw,
                    nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
                )
                .map_err(Error::sys("fcntl"))?;
            }
        }
    }
    Ok(())
}

/// In the child: descriptors, signal mask, capabilities, identity, no_new_privs.
fn child_setup(plan: &Plan) -> Result<(), Errno> {
    // The control channel becomes fd 3 without close-on-exec.
    if plan.control == CONTROL_FD {
        nix::fcntl::fcntl(
            CONTROL_FD,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )?;
    } else {
        nix::unistd::dup2(plan.control, CONTROL_FD)?;
    }
    mark_cloexec_from(CONTROL_FD + 1);
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)?;

    for &cap in &plan.drop_bounding {
        capbset_drop(cap)?;
    }
    match plan.confinement {
        Confinement::StoreWriterCaps { uid, gid }
        | Confinement::BuilderCaps { uid, gid }
        | Confinement::RootsReaderCaps { uid, gid } => {
            // Change uid while CAP_SETUID/CAP_SETGID are still effective, keeping the
            // permitted set across the change (it would be cleared), then trim every set to
            // what the child keeps. Inheritable must hold what the ambient set is to
            // carry across exec.
            // SAFETY: PR_SET_KEEPCAPS takes an integer flag and no pointers.
            Errno::result(unsafe { nix::libc::prctl(nix::libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) })?;
            clear_ambient()?;
            nix::unistd::setgroups(&[])?;
            let (g, u) = (Gid::from_raw(gid), Uid::from_raw(uid));
            nix::unistd::setresgid(g, g, g)?;
            nix::unistd::setresuid(u, u, u)?;
            if nix::unistd::geteuid() != u || nix::unistd::getuid() != u {
                return Err(Errno::EPERM);
            }
            caps_set(CapSet::Permitted, &plan.keep)?;
            caps_set(CapSet::Inheritable, &plan.keep)?;
            caps_set(CapSet::Effective, &plan.keep)?;
            for cap in plan.keep.iter() {
                caps::raise(None, CapSet::Ambient, *cap).map_err(|_| Errno::last())?;
            }
        }
        Confinement::OwnUid { uid, gid, group } => {
            caps_set(CapSet::Inheritable, &CapsHashSet::new())?;
            clear_ambient()?;
            match group {
                Some(g) => nix::unistd::setgroups(&[Gid::from_raw(g)])?,
                None => nix::unistd::setgroups(&[])?,
            }
            let (g, u) = (Gid::from_raw(gid), Uid::from_raw(uid));
            nix::unistd::setresgid(g, g, g)?;
            nix::unistd::setresuid(u, u, u)?;
            // With every uid non-zero the kernel has cleared all capabilities; make sure.
            if nix::unistd::geteuid() != u || nix::unistd::getuid() != u {
                return Err(Errno::EPERM);
            }
        }
        Confinement::SameUid => {}
    }
    nix::sys::prctl::set_no_new_privs()?;
    Ok(())
}

fn caps_set(set: CapSet, value: &CapsHashSet) -> Result<(), Errno> {
    caps::set(None, set, value).map_err(|_| Errno::last())
}

fn clear_ambient() -> Result<(), Errno> {
    match caps::clear(None, CapSet::Ambient) {
        Ok(()) => Ok(()),
        // Kernels before 4.3 have no ambient set: nothing to clear.
        Err(_) if Errno::last() == Errno::EINVAL => Ok(()),
        Err(_) => Err(Errno::last()),
    }
}

/// `prctl(PR_CAPBSET_DROP, cap)`; a number the kernel does not know is already absent.
fn capbset_drop(cap: i32) -> Result<(), Errno> {
    let Ok(cap) = nix::libc::c_ulong::try_from(cap) else {
        return Ok(());
    };
    // SAFETY: PR_CAPBSET_DROP takes a capability number by value and no pointers.
    let rc = unsafe { nix::libc::prctl(nix::libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
    match Errno::result(rc) {
        Ok(_) | Err(Errno::EINVAL) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Mark every descriptor from `first` up close-on-exec (Linux ≥ 5.11). On older kernels the
/// master's own close-on-exec discipline is what remains.
fn mark_cloexec_from(first: RawFd) {
    let Ok(first) = nix::libc::c_uint::try_from(first) else {
        return;
    };
    // SAFETY: close_range takes two descriptor numbers and flags by value; with
    // CLOSE_RANGE_CLOEXEC it closes nothing, it only sets FD_CLOEXEC on the range.
    let _ = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_close_range,
            first,
            nix::libc::c_uint::MAX,
            nix::libc::CLOSE_RANGE_CLOEXEC,
        )
    };
}
