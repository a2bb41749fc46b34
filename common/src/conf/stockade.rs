//! `stockade.conf`: Stockade's own settings, in `nix.conf` syntax, next to `nix.conf`.

use serde::{Deserialize, Serialize};

use super::error::{ValueError, WarningKind};
use super::schema::define_settings;
use super::value::{Ctx, SettingValue, UidRange};
use crate::floor::{Floor, InodeFloor, SpaceFloor};

define_settings! {
    /// Settings only Stockade has. Durations are seconds; for the limits and timeouts, 0 means
    /// "none".
    pub struct StockadeSettings;
    fn defaults();
    private {}
    settings {
        /// Unix datagram socket that audit records go to (syslog).
        audit_socket: String = "audit-socket" => "/dev/log".into();
        /// Uids handed to brokers, one per connection, never shared while in use. Must not
        /// overlap the build users or any real account.
        broker_uid_range: UidRange = "broker-uid-range" => UidRange { first: 800_000, last: 865_535 };
        /// Uids handed to builds, one per running build, when `build-users-group` names no group
        /// with members: Nix's `auto-allocate-uids` start (`0x34000000`), far from the broker
        /// range. Must not overlap it or any real account.
        build_uid_range: UidRange = "build-uid-range" => UidRange { first: 872_415_232, last: 872_480_767 };
        /// Connections served at once; the master closes a connection beyond it at once (and
        /// audits that, rate-limited). `trusted-connections-reserved` of them are for trusted
        /// users only.
        max_connections: u32 = "max-connections" => 256;
        /// Connections served at once for one peer uid: a quarter of `max-connections`, so
        /// one account cannot take every slot, yet a CI user running many jobs is served.
        max_connections_per_uid: u32 = "max-connections-per-uid" => 64;
        /// Seconds a client has to finish the worker-protocol handshake.
        handshake_timeout: u64 = "handshake-timeout" => 30;
        /// Seconds an untrusted connection may sit idle between operations. An hour: a
        /// forgotten `nix repl` or a crashed tool frees its slot, while a long evaluation that
        /// goes quiet for less keeps its connection; a client closed while idle gets "unexpected
        /// end-of-file" on its next operation and Nix opens a new connection for the one after.
        idle_timeout: u64 = "idle-timeout" => 3600;
        /// The same for trusted connections. None by default: trusted users have slots of
        /// their own (`trusted-connections-reserved`) and nix-daemon never closes an idle
        /// connection, so deployment tools and an admin's `nix repl` keep theirs.
        trusted_idle_timeout: u64 = "trusted-idle-timeout" => 0;
        /// Of `max-connections`, how many only trusted users (`trusted-users`, never over the
        /// untrusted socket) may take, so that untrusted accounts holding every other slot do
        /// not lock out the administrators (A77). Must be below `max-connections`.
        trusted_connections_reserved: u32 = "trusted-connections-reserved" => 16;
        /// Builds of one client uid running at once, so one account cannot take every job slot
        /// while others wait: `auto` is half of `max-jobs`, rounded up (all of one slot); 0 is
        /// no limit. Builds over it wait, in order, without holding up other uids' builds.
        /// Trusted clients' builds are not limited (an administrator's rebuild may use the
        /// whole machine).
        max_builds_per_uid: AutoCount = "max-builds-per-uid" => AutoCount::Auto;
        /// Memory (RAM, no swap) each build may use, through its cgroup: a number of bytes
        /// with an optional `K`, `M`, `G` or `T` suffix (powers of 1024); `auto` is the
        /// machine's memory divided by `max-jobs`, so that `max-jobs` builds at once fit and
        /// one account (at most `max-builds-per-uid` builds) cannot take all of it; 0 is no
        /// limit. A build over it has its processes ended by the kernel's OOM killer (the
        /// builder "failed due to signal 9"), audited `limit=memory`.
        build_memory_max: AutoSize = "build-memory-max" => AutoSize::Auto;
        /// Processes and threads each build may have at once (its cgroup's `pids.max`), so a
        /// fork bomb ends at that many; 0 is no limit. Audited `limit=pids` when reached.
        build_pids_max: u64 = "build-pids-max" => 16384;
        /// Memory (RAM, no swap) the broker of one connection may use, through a cgroup of
        /// its own (an rlimit on its data segment where there is none): a size as for
        /// `build-memory-max`; 0 is no limit. A broker streams what it adds and bounds what
        /// it reads from a client, so it needs a few MiB; over the budget the kernel ends it,
        /// its client's connection closes, and the helper audits `limit=broker-memory-max`.
        broker_memory_max: ByteSize = "broker-memory-max" => ByteSize(256 << 20);
        /// Processes and threads the broker of one connection may have at once (its
        /// cgroup's `pids.max`, or `RLIMIT_NPROC` of its uid where there is no cgroup); 0 is
        /// no limit. A broker runs one thread; one over the budget fails to start, audited
        /// `limit=broker-pids-max`.
        broker_pids_max: u64 = "broker-pids-max" => 16;
        /// The largest NAR (or file) an untrusted client may add at once; 0: no limit.
        /// Trusted clients and build outputs are not limited.
        untrusted_max_nar_size: ByteSize = "untrusted-max-nar-size" => ByteSize(64 << 30);
        /// How much one untrusted client uid may add to the store in an hour, over all its
        /// connections, so that one account cannot fill the disk for everyone at once; 0: no
        /// limit. Counted on what is added (a path already valid costs nothing).
        untrusted_bytes_per_hour: ByteSize = "untrusted-bytes-per-hour" => ByteSize(128 << 30);
        /// Room kept free on the store's file system (where builds and adds are staged): a
        /// size as for `broker-memory-max`, a share of the file system (`N%`), or `auto`, the
        /// smaller of 1 GiB and 5 % (room for an administrator's repair or rollback, the
        /// database, and the cleanup of what was stopped, without holding back much of a
        /// small disk); 0: none. Below it, every running build of an untrusted client that
        /// writes there is stopped and its directories removed, and an untrusted client's add
        /// that would go below it is refused; trusted clients' builds and adds are not held
        /// to it. Audited `limit=store-free-space-floor`.
        store_free_space_floor: SpaceFloor = "store-free-space-floor" => SpaceFloor(Floor::Auto);
        /// The same for free inodes: a count, `N%`, or `auto`, the smaller of 65536 and 5 %
        /// of the file system's inodes; 0: none (and none where the file system has no fixed
        /// number, as btrfs). Audited `limit=store-free-inodes-floor`.
        store_free_inodes_floor: InodeFloor = "store-free-inodes-floor" => InodeFloor(Floor::Auto);
        /// Temporary roots one untrusted connection may hold (each a line in its roots file
        /// and an entry in the store-writer's memory); 0: only the hard cap of 262144.
        untrusted_temp_roots: u64 = "untrusted-temp-roots" => 262_144;
        /// Temporary roots one untrusted uid may hold over all its connections at once; 0: no
        /// limit.
        untrusted_temp_roots_per_uid: u64 = "untrusted-temp-roots-per-uid" => 1_048_576;
        /// Brokers answer queries from a read-only connection to `db.sqlite` of their own
        /// (one process hop less per query). Off: every query goes through the store-writer,
        /// and brokers never touch the database file, e.g. where it is not world-readable or
        /// where no broker should be able to take SQLite's locks on it.
        broker_reads_database: bool = "broker-reads-database" => true;
        /// Let the store-writer and the brokers run when their confinement is missing: no
        /// Landlock at all (kernel without it, disabled at boot, or ABI 1 for the
        /// store-writer) or a seccomp filter the kernel refuses. Off: they refuse to start,
        /// naming what is missing (A76). An older Landlock ABI that handles fewer rights is
        /// accepted either way, with a warning.
        allow_unconfined: bool = "allow-unconfined" => false;
    }
}

impl Default for StockadeSettings {
    fn default() -> Self {
        Self::defaults()
    }
}

impl StockadeSettings {
    fn value_ctx(&self) -> Ctx {
        Ctx { cpus: 1 }
    }
}

/// A count that may be `auto`: decided where it is used, from other settings
/// (`max-builds-per-uid`). Printed as `auto` or the number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AutoCount {
    Auto,
    Fixed(u32),
}

impl SettingValue for AutoCount {
    fn assign(
        &mut self,
        name: &'static str,
        text: &str,
        append: bool,
        ctx: Ctx,
        warnings: &mut Vec<WarningKind>,
    ) -> Result<(), ValueError> {
        if text == "auto" {
            *self = AutoCount::Auto;
            return Ok(());
        }
        let mut n = 0u32;
        n.assign(name, text, append, ctx, warnings)
            .map_err(|_| ValueError::InvalidMaxJobs {
                name,
                value: text.into(),
            })?;
        *self = AutoCount::Fixed(n);
        Ok(())
    }
    fn render(&self) -> String {
        match self {
            AutoCount::Auto => "auto".into(),
            AutoCount::Fixed(n) => n.to_string(),
        }
    }
}

/// A size in bytes that may be `auto` (`build-memory-max`): decided where it is used. Written
/// as a number with an optional `K`, `M`, `G` or `T` suffix (powers of 1024).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AutoSize {
    Auto,
    Fixed(u64),
}

impl SettingValue for AutoSize {
    fn assign(
        &mut self,
        name: &'static str,
        text: &str,
        _append: bool,
        _ctx: Ctx,
        _warnings: &mut Vec<WarningKind>,
    ) -> Result<(), ValueError> {
        if text == "auto" {
            *self = AutoSize::Auto;
            return Ok(());
        }
        *self = AutoSize::Fixed(parse_size(name, text, "expected 'auto' or a size")?);
        Ok(())
    }
    fn render(&self) -> String {
        match self {
            AutoSize::Auto => "auto".into(),
            AutoSize::Fixed(n) => n.to_string(),
        }
    }
}

/// `N`, `NK`, `NM`, `NG` or `NT` (powers of 1024) as bytes.
pub(crate) fn parse_size(
    name: &'static str,
    text: &str,
    what: &'static str,
) -> Result<u64, ValueError> {
    let invalid = || ValueError::Invalid {
        name,
        value: text.into(),
        reason: what,
    };
    let (digits, shift) = match text.char_indices().last() {
        Some((i, 'K')) => (&text[..i], 10),
        Some((i, 'M')) => (&text[..i], 20),
        Some((i, 'G')) => (&text[..i], 30),
        Some((i, 'T')) => (&text[..i], 40),
        _ => (text, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    let n: u64 = digits.parse().map_err(|_| invalid())?;
    n.checked_mul(1u64 << shift).ok_or_else(invalid)
}

/// A size in bytes, written as a number with an optional `K`, `M`, `G` or `T` suffix (powers
/// of 1024); 0 means "no limit" where a limit is meant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByteSize(pub u64);

impl SettingValue for ByteSize {
    fn assign(
        &mut self,
        name: &'static str,
        text: &str,
        _append: bool,
        _ctx: Ctx,
        _warnings: &mut Vec<WarningKind>,
    ) -> Result<(), ValueError> {
        self.0 = parse_size(
            name,
            text,
            "expected a size: bytes, or with a K, M, G or T suffix",
        )?;
        Ok(())
    }
    fn render(&self) -> String {
        self.0.to_string()
    }
}

#[cfg(test)]
mod auto_size_tests {
    use super::*;

    fn parse(text: &str) -> Result<AutoSize, ValueError> {
        let mut v = AutoSize::Auto;
        v.assign(
            "build-memory-max",
            text,
            false,
            Ctx { cpus: 1 },
            &mut Vec::new(),
        )
        .map(|()| v)
    }

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse("auto"), Ok(AutoSize::Auto));
        assert_eq!(parse("0"), Ok(AutoSize::Fixed(0)));
        assert_eq!(parse("1024"), Ok(AutoSize::Fixed(1024)));
        assert_eq!(parse("512M"), Ok(AutoSize::Fixed(512 << 20)));
        assert_eq!(parse("8G"), Ok(AutoSize::Fixed(8 << 30)));
        for bad in ["", "G", "-1", "1.5G", "8g", "99999999999T", "8 G"] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
