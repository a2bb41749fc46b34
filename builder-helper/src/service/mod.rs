//! The builder-helper as a service, shaped like the store-writer: the master's control
//! channel (`Hello`, `Start` with the store-writer channel, then `NewClient` / `ClientGone` /
//! `Uid` answers until `Shutdown` or end of file), one session thread per broker
//! ([`session`], its phases in [`phase`]), a scheduler shared by all sessions ([`sched`]) and
//! one thread per build ([`job`]). Each broker also gets a cgroup of its own ([`budget`]).

pub mod budget;
pub mod floor;
pub mod hook;
pub mod job;
pub mod links;
pub mod phase;
pub mod rounds;
pub mod sched;
pub mod session;

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;

use stockade_common::derivation::Derivation;
use stockade_common::ipc::builder::{
    BuilderConfig, BuilderToMaster as Out, ClientIdentity, MasterToBuilder as In, SandboxSetting,
};
use stockade_common::ipc::msg::VERSION;
use stockade_common::ipc::{self, Channel};
use stockade_common::store_path::StoreDir;

use crate::build::BuildConfig;
use crate::sandbox::SandboxPath;
use links::{MasterLink, WriterLink};
use phase::Effective;
use sched::{Broker, Scheduler};

/// Everything the sessions and builds share.
pub struct Service {
    pub config: BuilderConfig,
    pub(crate) base: BuildConfig,
    pub writer: WriterLink,
    pub master: MasterLink,
    pub sched: Scheduler,
    /// Where each build's cgroup is made (detected once).
    pub cgroups: crate::cgroup::Hierarchies,
}

/// Why the helper cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("store directory '{0}': {1}")]
    StoreDir(String, String),
    #[error("sandbox-paths entry '{0}': {1}")]
    SandboxPath(String, String),
    #[error("the store-writer channel: {0}")]
    Writer(#[from] ipc::Error),
}

impl Service {
    /// The service for `config`, talking to the store-writer over `writer` and sending to
    /// the master over `master`.
    pub fn new(
        config: BuilderConfig,
        writer: OwnedFd,
        master: Channel,
    ) -> Result<Service, StartError> {
        let store_dir = StoreDir::new(&config.store_dir)
            .map_err(|e| StartError::StoreDir(config.store_dir.clone(), e.to_string()))?;
        let mut base = BuildConfig::new(store_dir, &config.builds_dir);
        base.host_store_dir = PathBuf::from(&config.real_store_dir);
        base.sandbox_build_dir = PathBuf::from(&config.sandbox_build_dir);
        base.build_cores = config.cores;
        base.max_silent_time = config.max_silent_time;
        base.timeout = config.timeout;
        base.max_log_size = config.max_build_log_size;
        base.keep_failed = config.keep_failed;
        base.impure_env = config.impure_env.iter().cloned().collect();
        base.ssl_cert_file = config.ssl_cert_file.as_ref().map(PathBuf::from);
        base.hashed_mirrors = config.hashed_mirrors.clone();
        for entry in &config.sandbox_paths {
            let p = SandboxPath::parse(entry)
                .map_err(|e| StartError::SandboxPath(entry.clone(), e.to_string()))?;
            base.sandbox_paths.push(p);
        }
        let cgroups = crate::cgroup::Hierarchies::detect();
        log::info!(
            "build cgroups: {}",
            cgroups.describe(crate::cgroup::Group::Builds)
        );
        let svc = Service {
            cgroups,
            sched: Scheduler::new(config.max_jobs, config.max_builds_per_uid),
            writer: WriterLink::new(writer)?,
            master: MasterLink::new(master),
            base,
            config,
        };
        log::info!("{}", svc.describe_broker_budget());
        budget::sweep(&svc);
        Ok(svc)
    }

    /// The build settings of one build.
    pub fn build_config(&self, eff: &Effective) -> BuildConfig {
        let mut c = self.base.clone();
        c.build_cores = eff.cores;
        c.max_silent_time = eff.max_silent_time;
        c.timeout = eff.timeout;
        c.max_log_size = eff.max_build_log_size;
        c.keep_failed = eff.keep_failed;
        c.floors = eff.held_to_floors.then_some(self.config.store_floors);
        c
    }

    /// Whether `drv` builds in the sandbox.
    pub fn sandboxed(&self, drv: &Derivation) -> bool {
        match self.config.sandbox {
            SandboxSetting::Enabled => true,
            SandboxSetting::Disabled => false,
            SandboxSetting::Relaxed => !no_chroot(drv),
        }
    }

    /// An audit line, written by the master.
    pub fn audit(&self, conn_id: u64, event: &str, fields: &[(&str, String)]) {
        self.master.notify(&Out::Audit {
            conn_id,
            event: event.to_string(),
            fields: fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        });
    }
}

impl Service {
    /// A build waits because every uid that asked for it runs `max-builds-per-uid` builds.
    pub fn audit_uid_limit(&self, conn_id: u64, drv: &str, uid: u32, limit: u32) {
        self.audit(
            conn_id,
            "build-wait",
            &[
                ("drv", drv.to_string()),
                ("reason", "per-uid-limit".to_string()),
                ("waiting-uid", uid.to_string()),
                ("max-builds-per-uid", limit.to_string()),
            ],
        );
    }
}

/// Nix's `getBoolAttr("__noChroot")`: `1` in the environment, or `true` in structured attrs.
pub(crate) fn no_chroot(drv: &Derivation) -> bool {
    if let Some(json) = drv.env.get(b"__json".as_slice()) {
        return serde_json::from_slice::<serde_json::Value>(json)
            .ok()
            .and_then(|v| v.get("__noChroot").and_then(|b| b.as_bool()))
            .unwrap_or(false);
    }
    drv.env
        .get(b"__noChroot".as_slice())
        .is_some_and(|v| v.as_slice() == b"1")
}

/// A live broker, as the control loop sees it.
struct Conn {
    broker: Arc<Broker>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The broker's cgroup, once it is in it.
    cgroup: Option<crate::cgroup::Cgroup>,
}

/// Serves the control channel; returns the process exit status.
pub fn serve(mut control: Channel) -> i32 {
    match control.recv::<In>() {
        Ok((In::Hello { version }, _)) if version == VERSION => {}
        Ok((In::Hello { version }, _)) => {
            log::error!("master speaks message version {version}, we speak {VERSION}");
            return 1;
        }
        Ok(_) => {
            log::error!("control channel: expected Hello");
            return 1;
        }
        Err(e) => {
            log::error!("control channel: {e}");
            return 1;
        }
    }
    if let Err(e) = control.send(&Out::Hello { version: VERSION }, &[]) {
        log::error!("control channel: {e}");
        return 1;
    }
    let (cfg, writer) = match control.recv::<In>() {
        Ok((In::Start(cfg), mut fds)) => match fds.pop() {
            Some(fd) => (*cfg, fd),
            None => return 1,
        },
        Ok(_) => {
            log::error!("control channel: expected Start");
            return 1;
        }
        Err(e) => {
            log::error!("control channel: {e}");
            return 1;
        }
    };
    let started = control
        .as_fd_clone()
        .map_err(StartError::Writer)
        .and_then(|send| Service::new(cfg, writer, send));
    let svc = match started {
        Ok(s) => Arc::new(s),
        Err(e) => {
            let reason = e.to_string();
            log::error!("cannot start: {reason}");
            let _ = control.send(&Out::Failed { reason }, &[]);
            return 1;
        }
    };
    if let Err(e) = control.send(&Out::Ready, &[]) {
        log::error!("control channel: {e}");
        return 1;
    }
    let mut conns: HashMap<u64, Conn> = HashMap::new();
    let status = loop {
        let (msg, mut fds) = match control.recv::<In>() {
            Ok(m) => m,
            Err(ipc::Error::Closed) => break 0,
            Err(e) => {
                log::error!("control channel: {e}");
                break 1;
            }
        };
        match msg {
            In::NewClient { client } => {
                let Some(fd) = fds.pop() else { continue };
                let conn_id = client.conn_id;
                match new_client(&svc, client, fd) {
                    Ok(c) => {
                        let old = conns.insert(conn_id, c);
                        if let Some(old) = old {
                            old.broker.shut_down();
                        }
                    }
                    Err(e) => log::warn!("conn {conn_id}: refused: {e}"),
                }
            }
            In::BrokerStarted { conn_id, pid, uid } => match conns.get_mut(&conn_id) {
                Some(c) if c.cgroup.is_none() => {
                    c.cgroup = budget::place(&svc, &c.broker, pid, uid);
                }
                _ => log::warn!("conn {conn_id}: a broker pid for no new connection"),
            },
            In::ClientGone { conn_id } => {
                let gone = conns.remove(&conn_id);
                if let Some(mut c) = gone {
                    // The session thread sees the end of its channel and withdraws its builds.
                    c.broker.shut_down();
                    if let Some(cg) = c.cgroup.take() {
                        budget::release(&svc, conn_id, cg);
                    }
                }
                // Its builds nobody else waits for stop; the broker is gone, no `Done` to send.
                drop(svc.sched.withdraw(conn_id, None));
            }
            In::Uid {
                id,
                uid,
                gid,
                error,
            } => {
                let answer = match uid {
                    Some(u) => Ok((u, gid)),
                    None => Err(error.unwrap_or_else(|| "no free build uid".into())),
                };
                svc.master.answer(id, answer);
            }
            In::StoreWriter => {
                let Some(fd) = fds.pop() else { continue };
                if let Err(e) = svc.writer.replace(fd) {
                    log::error!("the new store-writer's channel: {e}");
                }
            }
            In::Shutdown => break 0,
            other => {
                log::error!("control channel: unexpected {other:?}");
                break 1;
            }
        }
    };
    // Every build stops; their uids go back before we exit.
    let all: Vec<Conn> = conns.into_values().collect();
    for c in &all {
        c.broker.shut_down();
    }
    svc.master.close();
    svc.sched.stop_all();
    for mut c in all {
        if let Some(t) = c.thread.take() {
            let _ = t.join();
        }
    }
    status
}

fn new_client(svc: &Arc<Service>, client: ClientIdentity, fd: OwnedFd) -> Result<Conn, String> {
    let recv = Channel::from_fd(fd).map_err(|e| e.to_string())?;
    let send = recv.as_fd_clone().map_err(|e| e.to_string())?;
    session::prepare(&send);
    let conn_id = client.conn_id;
    let broker = Arc::new(Broker::new(client, send).map_err(|e| e.to_string())?);
    let thread = {
        let svc = svc.clone();
        let broker = broker.clone();
        std::thread::Builder::new()
            .name(format!("conn-{conn_id}"))
            .spawn(move || session::serve(svc, broker, recv))
            .map_err(|e| e.to_string())?
    };
    Ok(Conn {
        broker,
        thread: Some(thread),
        cgroup: None,
    })
}

/// A second handle on a channel's socket.
trait CloneChannel {
    fn as_fd_clone(&self) -> Result<Channel, ipc::Error>;
}

impl CloneChannel for Channel {
    fn as_fd_clone(&self) -> Result<Channel, ipc::Error> {
        use std::os::fd::AsFd;
        let fd = self.as_fd().try_clone_to_owned().map_err(|e| {
            ipc::Error::Sys(nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(0)))
        })?;
        Channel::from_fd(fd)
    }
}

impl Service {
    /// The cgroup of build `build`, or none (no hierarchy, or no right to make one there: said
    /// in the log, and the pid namespace still ends every process of the build).
    pub fn build_cgroup(&self, build: u64) -> Option<crate::cgroup::BuildCgroup> {
        if !self.cgroups.any() {
            return None;
        }
        let name = format!("build-{}-{build}", std::process::id());
        let limits = crate::cgroup::Limits {
            memory_bytes: (self.config.build_memory_max > 0)
                .then_some(self.config.build_memory_max),
            pids: (self.config.build_pids_max > 0).then_some(self.config.build_pids_max),
        };
        match self.cgroups.create(&name, limits) {
            Ok(c) => Some(c),
            Err(e) => {
                log::warn!("build {build}: no cgroup: {e}");
                None
            }
        }
    }
}
