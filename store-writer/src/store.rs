//! The store-writer's shared state: the store and state directories (held as fds), the
//! database, the trusted keys, the in-process path locks and the audit sinks. Created once from
//! the master's `Start` message; every broker thread borrows it.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg, OFlag};
use nix::sys::stat::{Mode, SFlag};
use nix::unistd::{Gid, Uid};
use thiserror::Error;

use stockade_common::ipc::msg::StoreWriterConfig;
use stockade_common::signature::{PublicKey, SecretKey, TrustedKeys};
use stockade_common::store_path::{StoreDir, StorePath};

use crate::audit::Audit;
use crate::db::{self, Db, DbError, DbOptions, StoreDb};
use crate::{dbbusy, sys};

/// The lock only a running store-writer holds, in the database directory.
pub const WRITER_LOCK: &str = "stockade-writer.lock";

/// Size of `db/reserved` (Nix's `gc-reserved-space` default).
const RESERVED_SIZE: i64 = 8 << 20;

#[derive(Debug, Error)]
pub enum StartError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("invalid store directory: {0}")]
    StoreDir(String),
    #[error("the path '{0}' is a symlink; this is not allowed for the Nix store and its parent directories")]
    Symlink(String),
    #[error("invalid trusted public key: {0}")]
    Key(String),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("another Stockade store-writer serves this store (it holds {0}); two must never write one store at once")]
    SecondWriter(String),
    #[error("checking the paths added before an unclean stop: {0}")]
    Recover(#[from] crate::durable::RecoverError),
}

fn ctx<E: Into<std::io::Error>>(context: impl Into<String>) -> impl FnOnce(E) -> StartError {
    let context = context.into();
    move |e| StartError::Io {
        context,
        source: e.into(),
    }
}

/// Everything the broker threads share.
pub struct Store {
    pub cfg: StoreWriterConfig,
    pub store_dir: StoreDir,
    /// The real store directory, opened once; every store operation is relative to it.
    pub store_fd: OwnedFd,
    pub state_dir: PathBuf,
    pub db_dir: PathBuf,
    /// The single write connection.
    db: Mutex<Db>,
    pub keys: TrustedKeys,
    /// `secret-key-files`, to sign the outputs of builds.
    pub signing_keys: Vec<SecretKey>,
    pub audit: Audit,
    pub euid: Uid,
    pub egid: Gid,
    /// Held for the whole life of the process, shared, as every Nix store process does.
    _big_lock: Flock<File>,
    /// Held exclusively for the whole life of the process: one store-writer per store (A75).
    _writer_lock: Option<Flock<File>>,
    staging_counter: AtomicU64,
    /// Serve queries from the shared write connection instead of per-thread readers (for
    /// measurements).
    pub shared_reads: bool,
    /// The way to a running Nix collector's socket through the master; without it (tests,
    /// tools without a master) the socket is connected directly.
    pub gc_link: std::sync::OnceLock<crate::gclink::GcLink>,
    /// Which registrations wait for a sync of the store (durable.rs).
    pub syncer: Arc<crate::durable::Syncer>,
    /// Untrusted clients' add budgets.
    pub quotas: crate::quota::Quotas,
    /// The database directory, when it is on another file system than the store (synced
    /// with it).
    pub db_fs: Option<OwnedFd>,
    /// Empty staging directories, locked, waiting to be used again.
    pub staging_pool: Mutex<Vec<crate::add::stage::StagingDir>>,
    /// Our garbage collector, when one runs.
    pub gc: crate::gc::GcState,
    /// Untrusted clients' temp-root budgets.
    pub root_budgets: crate::rootbudget::RootBudgets,
}

impl Store {
    /// Creates the directories Nix creates, takes the big lock, opens (or creates) the
    /// database and removes staging directories a previous run left behind.
    pub fn open(cfg: StoreWriterConfig, audit: Audit) -> Result<Store, StartError> {
        let store_dir =
            StoreDir::new(&cfg.store_dir).map_err(|e| StartError::StoreDir(e.to_string()))?;
        let real = PathBuf::from(&cfg.real_store_dir);
        if !real.is_absolute() {
            return Err(StartError::StoreDir(cfg.real_store_dir.clone()));
        }
        // The owner of the store's files: root when the daemon runs as root (the store-writer
        // itself runs under a uid of its own and chowns with CAP_CHOWN), else ourselves.
        let (euid, egid) = if cfg.as_root {
            (Uid::from_raw(0), Gid::from_raw(0))
        } else {
            (nix::unistd::geteuid(), nix::unistd::getegid())
        };

        let store_existed = real.exists();
        std::fs::create_dir_all(&real).map_err(ctx(format!("creating {}", real.display())))?;
        check_no_symlinks(&real)?;
        let store_fd = sys::open(
            real.as_path(),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
            Mode::empty(),
        )
        .map_err(ctx(format!("opening {}", real.display())))?;
        if !store_existed && cfg.as_root {
            fix_store_permissions(store_fd.as_fd())?;
        }
        mkdir_at(store_fd.as_fd(), ".links", 0o755)?;

        let state_dir = PathBuf::from(&cfg.state_dir);
        let profiles = state_dir.join("profiles");
        let gcroots = state_dir.join("gcroots");
        let db_dir = state_dir.join("db");
        // The log directory too: the lockdown grants access to it, so it must exist first.
        let log_dir = PathBuf::from(&cfg.log_dir);
        // gc-socket/: where our collector binds its socket; the lockdown allows that only there.
        let gc_socket = state_dir.join("gc-socket");
        for d in [
            &profiles,
            &state_dir.join("temproots"),
            &gc_socket,
            &db_dir,
            &log_dir,
        ] {
            std::fs::create_dir_all(d).map_err(ctx(format!("creating {}", d.display())))?;
        }
        if !gcroots.exists() {
            std::fs::create_dir_all(&gcroots)
                .map_err(ctx(format!("creating {}", gcroots.display())))?;
            // Nix links gcroots/profiles to the profiles directory by its absolute path.
            std::os::unix::fs::symlink(&profiles, gcroots.join("profiles"))
                .map_err(ctx("creating gcroots/profiles"))?;
        }
        std::fs::create_dir_all(gcroots.join("auto")).map_err(ctx("creating gcroots/auto"))?;
        for d in [profiles.join("per-user"), gcroots.join("per-user")] {
            std::fs::create_dir_all(&d).map_err(ctx(format!("creating {}", d.display())))?;
            let fd = sys::open(
                d.as_path(),
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
                Mode::empty(),
            )
            .map_err(ctx(format!("opening {}", d.display())))?;
            nix::sys::stat::fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(0o755))
                .map_err(ctx(format!("setting the mode of {}", d.display())))?;
        }
        reserve_space(&db_dir.join("reserved"));

        let lock_path = db_dir.join("big-lock");
        let lock_file = sys::open(
            lock_path.as_path(),
            OFlag::O_RDWR | OFlag::O_CREAT,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(ctx("opening the big lock"))?;
        let big_lock = match Flock::lock(File::from(lock_file), FlockArg::LockSharedNonblock) {
            Ok(l) => l,
            Err((f, Errno::EWOULDBLOCK)) => {
                log::info!("waiting for the big Nix store lock...");
                Flock::lock(f, FlockArg::LockShared)
                    .map_err(|(_, e)| ctx("locking the big lock")(e))?
            }
            Err((_, e)) => return Err(ctx("locking the big lock")(e)),
        };

        let writer_lock = lock_writer(&db_dir)?;

        let db = db::init(
            &db_dir,
            &store_dir,
            &DbOptions {
                use_wal: cfg.use_sqlite_wal,
                fsync_metadata: cfg.fsync_metadata,
            },
        )?;

        let db_fs = other_file_system(store_fd.as_fd(), &db_dir)?;

        let mut keys = TrustedKeys::new();
        for k in &cfg.trusted_public_keys {
            keys.insert(PublicKey::parse(k).map_err(|e| StartError::Key(e.to_string()))?);
        }
        // Read now, before the lockdown: nothing else in Stockade ever reads them.
        let mut signing_keys = Vec::new();
        for f in &cfg.secret_key_files {
            let text = zeroize::Zeroizing::new(
                std::fs::read_to_string(f).map_err(ctx(format!("reading secret key '{f}'")))?,
            );
            let key = SecretKey::parse(text.trim())
                .map_err(|e| StartError::Key(format!("secret key '{f}': {e}")))?;
            signing_keys.push(key);
        }

        let store = Store {
            store_dir,
            store_fd,
            state_dir,
            db_dir,
            db: Mutex::new(db),
            keys,
            signing_keys,
            audit,
            euid,
            egid,
            _big_lock: big_lock,
            _writer_lock: writer_lock,
            staging_counter: AtomicU64::new(0),
            shared_reads: false,
            gc_link: std::sync::OnceLock::new(),
            syncer: Arc::default(),
            quotas: crate::quota::Quotas::new(
                cfg.untrusted_max_nar_size,
                cfg.untrusted_bytes_per_hour,
            )
            .with_floors(cfg.store_floors),
            db_fs,
            staging_pool: Mutex::new(Vec::new()),
            gc: Default::default(),
            root_budgets: crate::rootbudget::RootBudgets::new(
                cfg.untrusted_temp_roots,
                cfg.untrusted_temp_roots_per_uid,
            ),
            cfg,
        };
        crate::add::stage::remove_stale(store.store_fd());
        if store.cfg.as_root {
            store.give_state_to_owner();
        }
        restrict_db_dir(&store.db_dir, &store.cfg)?;
        Ok(store)
    }

    /// As root the store-writer runs under a uid of its own, so what it just created (state
    /// directories, the database files) belongs to that uid: hand it to the store owner, as
    /// the files nix-daemon creates are root's. Only entries owned by us are changed.
    fn give_state_to_owner(&self) {
        let me = nix::unistd::geteuid();
        if me == self.euid {
            return;
        }
        let state = &self.state_dir;
        let mut paths = vec![
            PathBuf::from(&self.cfg.real_store_dir),
            PathBuf::from(&self.cfg.real_store_dir).join(".links"),
            state.clone(),
            PathBuf::from(&self.cfg.log_dir),
        ];
        for rel in [
            "profiles",
            "profiles/per-user",
            "gcroots",
            "gcroots/per-user",
            "gcroots/auto",
            "gcroots/profiles",
            "temproots",
            "gc-socket",
            "db",
            "db/db.sqlite",
            "db/db.sqlite-wal",
            "db/db.sqlite-shm",
            "db/schema",
            "db/big-lock",
            "db/stockade-writer.lock",
            "db/reserved",
        ] {
            paths.push(state.join(rel));
        }
        for p in paths {
            let Ok(st) = nix::sys::stat::lstat(p.as_path()) else {
                continue;
            };
            if st.st_uid != me.as_raw() {
                continue;
            }
            if let Err(e) = nix::unistd::fchownat(
                None,
                p.as_path(),
                Some(self.euid),
                Some(self.egid),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            ) {
                log::warn!("cannot give {} to the store owner: {e}", p.display());
            }
        }
    }

    /// The write connection. A thread that panicked while holding it leaves SQLite in a
    /// consistent state (an open transaction rolls back on drop), so poisoning is ignored.
    pub fn db(&self) -> MutexGuard<'_, Db> {
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs the write `f` on the write connection, retrying while another process holds the
    /// database locked, with the connection given up between tries (A69). After
    /// [`dbbusy::BUSY_DEADLINE`] it fails, naming the lock holders, and audits that.
    pub fn write<T>(
        &self,
        what: &str,
        mut f: impl FnMut(&mut Db) -> Result<T, DbError>,
    ) -> Result<T, crate::error::ReqError> {
        let stalled = || {
            let holders = dbbusy::steady_holders(&self.db_dir);
            if holders.is_empty() || cfg!(feature = "without-a69") {
                return;
            }
            if let Some(link) = self.gc_link.get() {
                link.notify(
                    &stockade_common::ipc::msg::StoreWriterToMaster::DatabaseHeld { holders },
                );
            }
        };
        match dbbusy::retry(|| f(&mut self.db()), stalled) {
            Ok(v) => Ok(v),
            Err(dbbusy::Busy::Other(e)) => Err(e.into()),
            Err(dbbusy::Busy::TimedOut(e)) => {
                let holders = dbbusy::describe(&dbbusy::lock_holders(&self.db_dir));
                let secs = dbbusy::BUSY_DEADLINE.as_secs().to_string();
                self.audit.event(
                    crate::audit::Severity::Warning,
                    &[
                        ("op", "database"),
                        ("outcome", "busy"),
                        ("during", what),
                        ("waited", &secs),
                        ("holders", &holders),
                        ("error", &e.to_string()),
                    ],
                );
                Err(crate::error::ReqError::failed(format!(
                    "the Nix database is locked by another process (pid:uid {}); gave up {what} after {secs} s",
                    if holders.is_empty() { "unknown" } else { &holders }
                )))
            }
        }
    }

    /// A fresh read connection for one broker thread.
    pub fn reader(&self) -> Result<StoreDb, DbError> {
        StoreDb::open_reader(&self.db_dir, &self.store_dir)
    }

    pub fn store_fd(&self) -> BorrowedFd<'_> {
        self.store_fd.as_fd()
    }

    pub fn full(&self, p: &StorePath) -> String {
        self.store_dir.display(p)
    }

    /// `<pid>-<n>`, unique in this store's life: for temporary names.
    pub fn unique_suffix(&self) -> String {
        let n = self.staging_counter.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n}", std::process::id())
    }

    /// A connection to a running Nix garbage collector's `gc-socket`.
    pub fn connect_gc(&self) -> std::io::Result<std::os::unix::net::UnixStream> {
        match self.gc_link.get() {
            Some(link) => link.connect(),
            None => {
                std::os::unix::net::UnixStream::connect(self.state_dir.join("gc-socket/socket"))
            }
        }
    }

    /// `<state>/gc.lock`, opened anew for each holder (flock locks belong to the open file).
    pub fn open_gc_lock(&self) -> std::io::Result<File> {
        let fd = sys::open(
            self.state_dir.join("gc.lock").as_path(),
            OFlag::O_RDWR | OFlag::O_CREAT,
            Mode::from_bits_truncate(0o600),
        )?;
        Ok(File::from(fd))
    }

    /// A shared hold on the GC lock: while it lives, no Nix garbage collector runs, so paths
    /// being staged or registered cannot be collected under us. Waits for a running GC.
    pub fn gc_shared(&self) -> std::io::Result<Flock<File>> {
        let f = self.open_gc_lock()?;
        Flock::lock(f, FlockArg::LockShared).map_err(|(_, e)| e.into())
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.syncer.stop();
    }
}

/// `dir`, opened, when it is on another file system than `store` (None when on the same).
fn other_file_system(store: BorrowedFd<'_>, dir: &Path) -> Result<Option<OwnedFd>, StartError> {
    let fd = sys::open(
        dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
        Mode::empty(),
    )
    .map_err(ctx(format!("opening {}", dir.display())))?;
    let (a, b) = (
        sys::fstat(store).map_err(ctx("inspecting the store"))?,
        sys::fstat(fd.as_fd()).map_err(ctx(format!("inspecting {}", dir.display())))?,
    );
    Ok((a.st_dev != b.st_dev).then_some(fd))
}

/// `db/stockade-writer.lock` (0600, so no other user can open it to hold it), exclusively.
fn lock_writer(db_dir: &Path) -> Result<Option<Flock<File>>, StartError> {
    if cfg!(feature = "without-a75") {
        return Ok(None);
    }
    let path = db_dir.join(WRITER_LOCK);
    let fd = sys::open(
        path.as_path(),
        OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_NOFOLLOW,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(ctx(format!("opening {}", path.display())))?;
    match Flock::lock(File::from(fd), FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(Some(l)),
        Err((_, Errno::EWOULDBLOCK)) => Err(StartError::SecondWriter(path.display().to_string())),
        Err((_, e)) => Err(ctx(format!("locking {}", path.display()))(e)),
    }
}

/// The database directory is entered only by the store owner and, through `db_group`, the
/// brokers that read the database: Nix leaves it (and `db.sqlite-shm`) readable by every
/// account, which lets any local user take a read lock on SQLite's write-lock byte and stall
/// every store write (A69). Nix itself runs as root and never needs more.
fn restrict_db_dir(db_dir: &Path, cfg: &StoreWriterConfig) -> Result<(), StartError> {
    if cfg!(feature = "without-a69") {
        return Ok(());
    }
    let fd = sys::open(
        db_dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
        Mode::empty(),
    )
    .map_err(ctx(format!("opening {}", db_dir.display())))?;
    let mode = match cfg.db_group {
        Some(gid) if cfg.as_root => {
            nix::unistd::fchown(
                fd.as_raw_fd(),
                Some(Uid::from_raw(0)),
                Some(Gid::from_raw(gid)),
            )
            .map_err(ctx(format!("changing the group of {}", db_dir.display())))?;
            0o750
        }
        _ => 0o700,
    };
    nix::sys::stat::fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(mode))
        .map_err(ctx(format!("changing the mode of {}", db_dir.display())))?;
    Ok(())
}

fn mkdir_at(dir: BorrowedFd<'_>, name: &str, mode: u32) -> Result<(), StartError> {
    match nix::sys::stat::mkdirat(Some(dir.as_raw_fd()), name, Mode::from_bits_truncate(mode)) {
        Ok(()) | Err(Errno::EEXIST) => Ok(()),
        Err(e) => Err(ctx(format!("creating {name}"))(e)),
    }
}

/// Nix refuses a store that is, or lies below, a symlink (`allow-symlinked-store` off).
fn check_no_symlinks(real: &Path) -> Result<(), StartError> {
    let mut p = Some(real);
    while let Some(dir) = p {
        if dir.as_os_str() == OsStr::new("/") {
            break;
        }
        let md =
            std::fs::symlink_metadata(dir).map_err(ctx(format!("inspecting {}", dir.display())))?;
        if md.file_type().is_symlink() {
            return Err(StartError::Symlink(dir.display().to_string()));
        }
        p = dir.parent();
    }
    Ok(())
}

/// A new store made as root gets Nix's mode 1775, group `nixbld` when that group exists (the
/// `build-users-group` Debian's Nix uses), else root. An existing store is left alone.
fn fix_store_permissions(fd: BorrowedFd<'_>) -> Result<(), StartError> {
    let gid = nix::unistd::Group::from_name("nixbld")
        .ok()
        .flatten()
        .map_or(Gid::from_raw(0), |g| g.gid);
    nix::unistd::fchown(fd.as_raw_fd(), Some(Uid::from_raw(0)), Some(gid))
        .map_err(ctx("changing the owner of the store"))?;
    nix::sys::stat::fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(0o1775))
        .map_err(ctx("changing the mode of the store"))?;
    let st = sys::fstat(fd).map_err(ctx("inspecting the store"))?;
    debug_assert_eq!(sys::file_type(&st), SFlag::S_IFDIR);
    Ok(())
}

/// `db/reserved`: space Nix frees before a GC when the disk is full. Best effort, as in Nix.
pub(crate) fn reserve_space(path: &Path) {
    let ok = std::fs::metadata(path).is_ok_and(|m| m.len() == RESERVED_SIZE as u64);
    if ok {
        return;
    }
    if let Ok(fd) = sys::open(
        path,
        OFlag::O_WRONLY | OFlag::O_CREAT,
        Mode::from_bits_truncate(0o600),
    ) {
        if nix::fcntl::posix_fallocate(fd.as_raw_fd(), 0, RESERVED_SIZE).is_err() {
            let _ = File::from(fd).set_len(RESERVED_SIZE as u64);
        }
    }
}
