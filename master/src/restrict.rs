//! The master's own confinement once its privileged set-up is done (SECURITY.md §5: "root with
//! CAP_SETUID, CAP_SETGID, CAP_KILL only; seccomp allow-list; AF_UNIX only").
//!
//! Applied after the store-writer, the builder-helper and the roots-reader run (the last two
//! need capabilities the master then no longer has: roots.rs), the listening sockets are bound
//! and the uid pools exist, before the first connection is accepted ([`lockdown`]); in
//! `--stdio` mode before the broker is started, or before forwarding begins. In order:
//!
//! 1. NSS is warmed up ([`warm_up_nss`]): glibc loads the modules of `nsswitch.conf`'s passwd
//!    and group lines with `dlopen` while every call is still allowed (the filter would allow
//!    the read-only file-backed mappings of a later `dlopen`, but not what an arbitrary module
//!    does while initialising);
//! 2. the systemd notification socket is connected ([`crate::socket::sd_notify_prepare`]), so
//!    `READY=1`/`STOPPING=1` need no `sendto` with an address;
//! 3. capabilities: all but [`MASTER_CAPS`] leave every set (a daemon run by an ordinary user
//!    has none); `no_new_privs`; not dumpable;
//! 4. the [`SeccompProfile::Master`](stockade_common::lockdown::SeccompProfile::Master)
//!    allow-list.
//!
//! A failure is fatal unless `allow-unconfined = true` (A76). The start-up audit line carries
//! `master-caps=`, `master-seccomp=` and `master-landlock=`, and one log line says the same.
//!
//! # No Landlock domain
//!
//! The master takes none. A domain is inherited by everything started afterwards, and
//! everything the master starts later runs inside it: every broker (its exec, dynamic loader,
//! libraries and its read of the store would all have to be granted, so the domain would be
//! the union of what the children need), and, for a daemon run by an ordinary user, a new
//! store-writer when the store was replaced (restart.rs): Landlock rules name the inodes of the
//! directories that existed when the domain was made, so the replaced store and state
//! directories would be out of reach of the new store-writer (and `LANDLOCK_SCOPE_SIGNAL` would
//! keep the master from signalling the store-writer and helper started before it). The
//! builder-helper, the one process that mounts, is started once, before the lockdown, and never
//! restarted (builder.rs: its death stops the daemon), so a domain would not break its mounts;
//! the reasons above are why there is none.
//!
//! # What `execve` may run
//!
//! seccomp cannot read paths, so the filter does not limit which file the master execs (it
//! execs the binaries [`crate::launch::Programs`] found and checked at start). What a
//! compromised master could exec instead runs no stronger than the master itself: the seccomp
//! filters stay across `execve`, `no_new_privs` forbids gaining privileges through setuid bits
//! or file capabilities, and the bounding set holds only [`MASTER_CAPS`], so a uid-0 program
//! exec'd by the master gets those four capabilities at most.
//!
//! # Files
//!
//! As uid 0 without `CAP_DAC_OVERRIDE` the master still owns root's files; the allow-list lets
//! it open files only for reading (no `O_WRONLY`, `O_RDWR`, `O_TRUNC`), and nothing that
//! removes, renames, links, chmods or chowns. It creates only the per-uid lock files
//! (`O_RDONLY | O_CREAT`, uids.rs).

use stockade_common::lockdown::{self, Capability, LockdownOptions, Report};

use crate::error::{Error, Result};

/// What a root master keeps after start-up, each for one thing it still does:
/// - `CAP_SETUID`, `CAP_SETGID`: a forked child takes a broker's uid, gid and groups before
///   exec (spawn.rs), and the child that ends a released uid's leftovers takes that uid
///   (uids.rs);
/// - `CAP_SETPCAP`: that child empties its bounding set before exec, so a broker can never
///   regain a capability (`PR_CAPBSET_DROP`);
/// - `CAP_KILL`: signalling brokers (other uids) at shutdown and when one holds the database's
///   locks (A69), the store-writer and the builder-helper (their own uids) when they do not
///   stop in time, the roots-reader when it breaks its protocol.
///
/// Not kept: `CAP_CHOWN`, `CAP_FOWNER`, `CAP_DAC_OVERRIDE` (the master makes no per-connection
/// file but the lock files, in root-owned directories it owns), `CAP_SYS_ADMIN`, and every
/// other. Without them a root master cannot start a new store-writer (restart.rs exits
/// instead) nor a builder-helper nor a roots-reader (never restarted; CAP_SYS_PTRACE and
/// CAP_DAC_READ_SEARCH, which the reader keeps, are gone from the master's bounding set).
pub const MASTER_CAPS: [Capability; 4] = [
    Capability::CAP_SETUID,
    Capability::CAP_SETGID,
    Capability::CAP_SETPCAP,
    Capability::CAP_KILL,
];

/// Load the NSS modules the passwd and group databases use, by looking up names and ids no
/// one has (every source of `nsswitch.conf` is consulted then), before the filter. After the
/// lockdown `files` reads `/etc/passwd` and `/etc/group`, nscd and systemd-userdb are asked
/// over AF_UNIX sockets; a module whose calls the filter refuses (one speaking TCP or
/// netlink, for instance) fails, glibc counts it unavailable, the look-up finds nothing and
/// the peer is matched by its decimal uid, as when the name is unknown: never more trust.
pub fn warm_up_nss() {
    use nix::unistd::{Gid, Group, Uid, User};
    const NOBODY_NAME: &str = "stockade-nss-warm-up-no-such-name";
    const NOBODY_ID: u32 = 4_294_967_200;
    let _ = User::from_name(NOBODY_NAME);
    let _ = User::from_uid(Uid::from_raw(NOBODY_ID));
    let _ = Group::from_name(NOBODY_NAME);
    let _ = Group::from_gid(Gid::from_raw(NOBODY_ID));
}

/// Confine the master (see the module doc). `keep_caps`: whether it still spawns brokers
/// under their own uids (false when it only forwards a `--stdio` connection).
pub fn lockdown(opts: LockdownOptions, keep_caps: bool) -> Result<Report> {
    warm_up_nss();
    crate::socket::sd_notify_prepare();
    let keep: &[Capability] = if keep_caps { &MASTER_CAPS } else { &[] };
    // A root master exits rather than start a new store-writer (restart.rs); a daemon run by
    // an ordinary user starts one, inside this filter.
    let store_writer_restarts = !nix::unistd::geteuid().is_root();
    let report = lockdown::apply_master(keep, store_writer_restarts, opts)
        .map_err(|e| Error::Other(e.to_string()))?;
    log::info!("master confined: {}", report.summary());
    Ok(report)
}

/// The start-up audit line's fields about the master itself.
pub fn audit_fields(report: &Report) -> Vec<(&'static str, String)> {
    let seccomp = match (report.status.seccomp, report.seccomp) {
        (2, Some(lockdown::SeccompMode::Enforce)) => "on",
        (2, Some(lockdown::SeccompMode::Log)) => "log",
        (2, None) => "incomplete",
        _ => "off",
    };
    vec![
        (
            "master-caps",
            lockdown::capability_names(report.status.cap_eff),
        ),
        ("master-seccomp", seccomp.to_string()),
        ("master-landlock", report.landlock.to_string()),
    ]
}
