//! Starting one broker for one accepted client.
//!
//! For each connection the master makes the broker's channel to the store-writer (a
//! socketpair), gives the store-writer its end together with the client's identity and trust
//! (`NewClient`), and execs the broker with a start channel on fd 3 over which the `Start`
//! message and two descriptors are already queued: the client's socket and the broker's end of
//! the store-writer channel. The master keeps none of these descriptors afterwards (A7), only
//! the broker's pid and the read end of the pipe that is the broker's standard output and
//! error, which it relays until the broker is reaped (daemon/relay.rs).
//!
//! The broker's build channel is made the same way: one end goes to the builder-helper with
//! `MasterToBuilder::NewClient`, the other travels in the broker's `Start`. Without a helper
//! the helper's end is closed at once: the broker sees a closed channel and refuses builds.
//!
//! The broker's memory and pids budget (`broker-memory-max`, `broker-pids-max`) is held by a
//! cgroup the builder-helper makes: once the broker runs, the master tells the helper its pid
//! (`BrokerStarted`), the helper writes it into the cgroup's `cgroup.procs` and then tells the
//! broker, which waits for that before it reads a byte from its client. The master itself
//! makes no cgroup: after its lockdown it may neither make directories nor open files for
//! writing (restrict.rs), and the helper already makes, limits and removes build cgroups.
//! Where the helper cannot (no cgroup hierarchy, or a daemon run by an ordinary user) or a
//! limit is not enforced, the broker sets rlimits on itself instead (broker/src/budget.rs).

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use stockade_common::ipc::msg::{
    BrokerBudget, BrokerConfig, BrokerFds, ClientIdentity, MasterToBroker,
};
use stockade_common::ipc::{self};
use stockade_common::lockdown::LockdownOptions;

use crate::builder::BuilderHelper;
use crate::config::Config;
use crate::daemon::relay;
use crate::error::{Error, Result};
use crate::paths::Paths;
use crate::spawn::{self, Confinement, Output};
use crate::writer::StoreWriter;

/// The programs the master starts.
#[derive(Debug, Clone)]
pub struct Programs {
    pub broker: PathBuf,
    pub store_writer: PathBuf,
    pub builder_helper: PathBuf,
    /// `stockade-roots-reader`, when installed: without it the store-writer reads runtime
    /// roots itself and misses other users' processes (roots.rs), which the start-up log and
    /// audit line say.
    pub roots_reader: Option<PathBuf>,
}

impl Programs {
    /// Next to the running binary, or in `$STOCKADE_LIBEXEC_DIR` when set (tests, packaging).
    pub fn locate() -> Result<Programs> {
        let dir = match std::env::var_os("STOCKADE_LIBEXEC_DIR") {
            Some(d) if !d.is_empty() => PathBuf::from(d),
            _ => {
                let exe =
                    std::env::current_exe().map_err(Error::io("finding the stockade binary"))?;
                exe.parent()
                    .map(Path::to_path_buf)
                    .ok_or_else(|| Error::Other("the stockade binary has no directory".into()))?
            }
        };
        let p = Programs {
            broker: dir.join("stockade-broker"),
            store_writer: dir.join("stockade-store-writer"),
            builder_helper: dir.join("stockade-builder-helper"),
            roots_reader: Some(dir.join("stockade-roots-reader")).filter(|p| p.exists()),
        };
        for prog in [&p.broker, &p.store_writer, &p.builder_helper]
            .into_iter()
            .chain(p.roots_reader.as_ref())
        {
            check_program(prog)?;
        }
        Ok(p)
    }
}

/// A program the master runs must exist and must not be replaceable by anyone but root or
/// the daemon's user (it runs with the daemon's privileges or with a client's connection).
fn check_program(path: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).map_err(|e| Error::UnsafePath {
        path: path.to_path_buf(),
        reason: format!("cannot run it: {e}"),
    })?;
    let me = nix::unistd::geteuid().as_raw();
    if !m.is_file() || m.mode() & 0o111 == 0 {
        return Err(Error::UnsafePath {
            path: path.to_path_buf(),
            reason: "is not an executable file".into(),
        });
    }
    if (m.uid() != 0 && m.uid() != me) || m.mode() & 0o022 != 0 {
        return Err(Error::UnsafePath {
            path: path.to_path_buf(),
            reason: "is writable by users other than root and the daemon's user".into(),
        });
    }
    // Nor may anyone else replace it (or the symlink naming it) through its directory.
    let real =
        std::fs::canonicalize(path).map_err(Error::io(format!("resolving {}", path.display())))?;
    for dir in [path.parent(), real.parent()].into_iter().flatten() {
        let d =
            std::fs::metadata(dir).map_err(Error::io(format!("examining {}", dir.display())))?;
        let sticky = d.mode() & 0o1000 != 0;
        if (d.uid() != 0 && d.uid() != me) || (d.mode() & 0o022 != 0 && !sticky) {
            return Err(Error::UnsafePath {
                path: dir.to_path_buf(),
                reason: "holds a Stockade program but others may write to it".into(),
            });
        }
    }
    Ok(())
}

/// A broker started.
#[derive(Debug)]
pub struct Launched {
    pub pid: i32,
    /// The read end of its output pipe, for [`crate::daemon::relay::Relay::add`]; `None`
    /// only in a build with the test-only `without-stderr-relay` feature.
    pub output: Option<OwnedFd>,
}

/// Everything per-connection that does not change between connections.
#[derive(Debug, Clone)]
pub struct Launcher {
    pub programs: Programs,
    template: BrokerConfig,
    /// The database directory's group, for brokers that read the database (A69).
    db_group: Option<u32>,
    /// `trusted-idle-timeout`; the template has the untrusted one.
    trusted_idle_timeout: u64,
}

impl Launcher {
    pub fn new(
        programs: Programs,
        cfg: &Config,
        paths: &Paths,
        verbosity: u32,
        lockdown: LockdownOptions,
    ) -> Self {
        let store_dir = paths.store_dir.to_string_lossy().into_owned();
        let template = BrokerConfig {
            client: ClientIdentity {
                conn_id: 0,
                uid: 0,
                gid: 0,
                pid: 0,
                trusted: false,
                user_name: None,
            },
            real_store_dir: store_dir.clone(),
            db_dir: cfg
                .stockade
                .broker_reads_database
                .then(|| paths.state_dir.join("db").to_string_lossy().into_owned()),
            store_dir,
            substituters: cfg.settings.substituters.clone(),
            trusted_substituters: cfg.trusted_substituters(),
            max_jobs: cfg.max_jobs(),
            cores: cfg.settings.cores,
            verbosity,
            handshake_timeout: cfg.stockade.handshake_timeout,
            idle_timeout: cfg.idle_timeout(false),
            lockdown,
            budget: BrokerBudget {
                memory_max: cfg.broker_memory_max(),
                pids_max: cfg.broker_pids_max(),
                from_helper: false,
                own_uid: false,
            },
        };
        let db_group = cfg
            .stockade
            .broker_reads_database
            .then(|| crate::daemon::db_reader_gid(&cfg.broker_uid_range()));
        Launcher {
            programs,
            template,
            db_group,
            trusted_idle_timeout: cfg.idle_timeout(true),
        }
    }

    /// Register the client with the store-writer and exec its broker. `broker_uid` is the
    /// broker's own uid when the daemon runs as root.
    pub fn launch(
        &self,
        writer: &mut StoreWriter,
        helper: Option<&mut BuilderHelper>,
        client: OwnedFd,
        identity: &ClientIdentity,
        broker_uid: Option<u32>,
    ) -> Result<Launched> {
        // First what can fail for want of descriptors, before the services hear of the client.
        let (relayed, output) = if cfg!(feature = "without-stderr-relay") {
            (None, Output::MasterStderr)
        } else {
            let (read, write) = relay::pipe()?;
            (Some(read), Output::Pipe(write))
        };
        let (to_writer_broker_end, to_writer_writer_end) =
            ipc::socketpair().map_err(Error::ipc("socketpair"))?;
        let (mut start_ours, start_theirs) = ipc::socketpair().map_err(Error::ipc("socketpair"))?;
        let mut config = self.template.clone();
        config.client = identity.clone();
        if identity.trusted {
            config.idle_timeout = self.trusted_idle_timeout;
        }
        let budget = &mut config.budget;
        budget.own_uid = broker_uid.is_some();
        // Should the helper then not take the client, the broker sees its channel closed and
        // falls back to rlimits.
        budget.from_helper = helper.is_some() && (budget.memory_max > 0 || budget.pids_max > 0);
        let from_helper = budget.from_helper;
        let broker_end = to_writer_broker_end.into_fd();
        let (to_builder_broker_end, to_builder_helper_end) =
            ipc::socketpair().map_err(Error::ipc("socketpair"))?;
        let builder_end = to_builder_broker_end.into_fd();
        // Queue the start message before the broker exists: the fresh socket has room, so this
        // cannot block on a broker that never reads.
        let fds = BrokerFds {
            client: client.as_fd(),
            store_writer: broker_end.as_fd(),
            builder: builder_end.as_fd(),
        };
        start_ours
            .send(&MasterToBroker::Start(Box::new(config)), &fds.into_array())
            .map_err(Error::ipc("preparing the broker's start message"))?;
        drop(start_ours);
        drop(client);
        drop(broker_end);
        drop(builder_end);
        writer.new_client(identity, to_writer_writer_end)?;
        let mut helper = helper;
        let mut helper_knows = false;
        if let Some(h) = helper.as_deref_mut() {
            match h.new_client(identity, to_builder_helper_end) {
                Ok(()) => helper_knows = true,
                // The connection is served without builds rather than refused.
                Err(e) => log::error!("{e}"),
            }
        }
        let confinement = match broker_uid {
            Some(uid) => Confinement::OwnUid {
                uid,
                gid: uid,
                group: self.db_group,
            },
            None => Confinement::SameUid,
        };
        let start_fd = start_theirs.into_fd();
        match spawn::spawn(&self.programs.broker, &start_fd, confinement, output, false) {
            Ok(pid) => {
                if let Some(h) = helper.filter(|_| from_helper && helper_knows) {
                    // Unsent, the broker gives up waiting for its cgroup and exits.
                    let uid = broker_uid.unwrap_or_else(|| nix::unistd::geteuid().as_raw());
                    if let Err(e) = h.broker_started(identity.conn_id, pid, uid) {
                        log::error!("{e}");
                    }
                }
                Ok(Launched {
                    pid,
                    output: relayed,
                })
            }
            Err(e) => {
                // The store-writer already knows the client; tell it the client is gone.
                if let Err(e2) = writer.client_gone(identity.conn_id) {
                    log::error!("{e2}");
                }
                if let Some(h) = helper {
                    if let Err(e2) = h.client_gone(identity.conn_id) {
                        log::error!("{e2}");
                    }
                }
                Err(e)
            }
        }
    }
}
