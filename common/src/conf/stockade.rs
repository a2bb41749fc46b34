//! `stockade.conf`: Stockade's own settings, in `nix.conf` syntax, next to `nix.conf`.

use super::schema::define_settings;
use super::value::{Ctx, UidRange};

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
        /// audits that, rate-limited).
        max_connections: u32 = "max-connections" => 256;
        /// Connections served at once for one peer uid: a quarter of `max-connections`, so
        /// one account cannot take every slot, yet a CI user running many jobs is served.
        max_connections_per_uid: u32 = "max-connections-per-uid" => 64;
        /// Seconds a client has to finish the worker-protocol handshake.
        handshake_timeout: u64 = "handshake-timeout" => 30;
        /// Seconds a connection may sit idle between operations. Off by default: Nix clients
        /// (`nix repl`, long evaluations) keep idle daemon connections for hours.
        idle_timeout: u64 = "idle-timeout" => 0;
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
