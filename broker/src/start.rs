//! The broker's start-up, up to and including its lockdown: the `Start` message from the
//! master with its descriptors, logging, the read-only database, then confinement. Shared with
//! the test-only `stockade-evil-broker` (feature `evil`), which starts exactly as the real
//! broker does and then plays a compromised one.

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use stockade_common::db::StoreDb;
use stockade_common::ipc::msg::{BrokerConfig, BrokerFds, MasterToBroker};
use stockade_common::ipc::Channel;
use stockade_common::store_path::StoreDir;

use crate::{budget, lockdown};

// The `evil` feature builds a broker that attacks the daemon (tests only): never in a release.
#[cfg(all(not(debug_assertions), feature = "evil"))]
compile_error!("the evil feature builds an attacking broker; it is for test builds only");

/// A broker that has read its start message and locked itself down.
pub struct Started {
    pub cfg: Box<BrokerConfig>,
    pub client: UnixStream,
    /// The channel to the store-writer (not yet greeted).
    pub writer: Channel,
    /// The channel to the builder-helper (not yet greeted).
    pub builder: Channel,
    /// The read-only database connection, opened before the lockdown.
    pub db: Option<StoreDb>,
}

/// Reads the start message on `control_fd`, opens the database and locks down.
pub fn start(control_fd: i32) -> Result<Started, String> {
    if control_fd < 3 {
        return Err("the control descriptor must be 3 or above".into());
    }
    // SAFETY: the master hands us this descriptor at exec and nothing else in this process
    // owns it; a wrong number fails below when it is not a seqpacket socket.
    let fd = unsafe { OwnedFd::from_raw_fd(control_fd) };
    let mut control = Channel::from_fd(fd).map_err(|e| format!("control channel: {e}"))?;
    let (msg, fds) = control
        .recv::<MasterToBroker>()
        .map_err(|e| format!("reading the start message: {e}"))?;
    let MasterToBroker::Start(cfg) = msg else {
        return Err("unexpected start message".into());
    };
    let BrokerFds {
        client: client_fd,
        store_writer: writer_fd,
        builder: builder_fd,
    } = BrokerFds::from_received(fds).ok_or("the start message lacks its descriptors")?;
    drop(control);
    let level = stockade_common::worker::Verbosity::from_wire(cfg.verbosity);
    init_logging(level);
    // The helper sees this end close when the broker exits, which stops its builds.
    let builder = Channel::from_fd(builder_fd).map_err(|e| format!("builder channel: {e}"))?;
    // Under rlimits before anything of the client is read; the cgroup follows (budget.rs).
    let budget = budget::apply(&cfg.budget).map_err(|e| e.to_string())?;

    // No syslog socket: audit events go to the store-writer, which writes them under this
    // connection's identity (A74).
    // Opened (all three files: database, WAL, WAL index) before the lockdown, which leaves the
    // broker no file outside the store to open.
    let db = open_db(&cfg);
    let summary = lockdown::apply(&cfg).map_err(|e| format!("locking down: {e}"))?;
    log::debug!(
        "locked down: {summary} db={} {budget}",
        if db.is_some() { "ro" } else { "none" }
    );

    let writer = Channel::from_fd(writer_fd).map_err(|e| format!("store-writer channel: {e}"))?;
    let client = UnixStream::from(client_fd);
    Ok(Started {
        cfg,
        client,
        writer,
        builder,
        db,
    })
}

/// Opens the database read-only and reads from it once, so that every file SQLite needs is
/// open before the lockdown. SQLite keeps them open for the connection's life (the store-writer
/// holds the database open, so the WAL is never removed); should it ever need to open a file
/// again, the query fails and the broker falls back to the store-writer. Without a connection
/// (no database directory given, files this uid may not read, or may write) queries go to
/// the store-writer, which is slower but answers the same.
fn open_db(cfg: &BrokerConfig) -> Option<StoreDb> {
    let dir = std::path::Path::new(cfg.db_dir.as_deref()?);
    let store_dir = match StoreDir::new(&cfg.store_dir) {
        Ok(sd) => sd,
        Err(e) => {
            log::warn!("store directory {}: {e}", cfg.store_dir);
            return None;
        }
    };
    match StoreDb::open_read_only(dir, &store_dir).and_then(|db| db.warm_up().map(|()| db)) {
        Ok(db) => match writable_descriptor_in(dir) {
            // SQLite opens the WAL read-write whenever the file permissions allow it (the same
            // uid as the store-writer, in an unprivileged daemon): a broker must hold no such
            // descriptor, so it gives the connection up.
            Some(file) => {
                log::info!(
                    "{file} is writable by the broker's uid; queries go to the store-writer"
                );
                None
            }
            None => Some(db),
        },
        Err(e) => {
            log::info!(
                "not reading {} directly ({e}); queries go to the store-writer",
                dir.display()
            );
            None
        }
    }
}

/// A descriptor of this process, open for writing, on a file in `dir` (from /proc/self, read
/// before the lockdown). Unreadable /proc counts as writable: better slower than unsure.
fn writable_descriptor_in(dir: &std::path::Path) -> Option<String> {
    // /proc shows resolved paths.
    let real = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return Some("/proc/self/fd (unreadable)".into());
    };
    for entry in entries.flatten() {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if target.parent() != Some(dir) && target.parent() != Some(real.as_path()) {
            continue;
        }
        // `flags:` is the second line; one read (the file claims size 0, so reading it whole
        // would take a system call per buffer doubling).
        let mut head = [0u8; 256];
        let n =
            std::fs::File::open(std::path::Path::new("/proc/self/fdinfo").join(entry.file_name()))
                .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
                .unwrap_or(0);
        let info = String::from_utf8_lossy(&head[..n]);
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|v| i32::from_str_radix(v.trim(), 8).ok());
        match flags {
            Some(f) if f & nix::libc::O_ACCMODE == nix::libc::O_RDONLY => {}
            _ => return Some(target.display().to_string()),
        }
    }
    None
}

/// Log lines go to stderr, a pipe the master relays to its own, each line prefixed with this
/// broker's pid and connection id (master/src/daemon/relay.rs), so they carry neither here.
fn init_logging(level: stockade_common::worker::Verbosity) {
    struct Stderr(log::LevelFilter);
    impl log::Log for Stderr {
        fn enabled(&self, m: &log::Metadata<'_>) -> bool {
            m.level() <= self.0
        }
        fn log(&self, r: &log::Record<'_>) {
            if self.enabled(r.metadata()) {
                eprintln!("{}", r.args());
            }
        }
        fn flush(&self) {}
    }
    let filter = match level as u32 {
        0 => log::LevelFilter::Error,
        1 => log::LevelFilter::Warn,
        2 | 3 => log::LevelFilter::Info,
        4..=5 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    let _ = log::set_boxed_logger(Box::new(Stderr(filter)));
    log::set_max_level(filter);
}
