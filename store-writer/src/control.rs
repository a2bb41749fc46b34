//! The master's control channel: `Hello`, `Start`, then `NewClient` / `ClientGone` until
//! `Shutdown` or end of file.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use stockade_common::ipc::msg::{
    ClientIdentity, MasterToStoreWriter as In, StoreWriterConfig, StoreWriterToMaster as Out,
    VERSION,
};
use stockade_common::ipc::{self, Channel};

use crate::audit::{Audit, Severity};
use crate::roots::{self, TempRoots};
use crate::store::{StartError, Store};
use crate::{durable, session};

/// A live broker connection, as the control loop sees it.
struct Conn {
    /// A duplicate of the channel socket, to shut it down from outside the thread.
    sock: OwnedFd,
    roots: Arc<Mutex<TempRoots>>,
    thread: Option<JoinHandle<()>>,
}

type Conns = Arc<Mutex<HashMap<u64, Conn>>>;

/// The builder-helper's channel, served on its own thread.
struct Helper {
    sock: OwnedFd,
    thread: JoinHandle<()>,
}

/// Opens the store from `cfg` (what `Start` does) and checks what an unclean stop may have
/// left (durable.rs). The syncer is started separately ([`durable::start`]), after the
/// lockdown.
pub fn start(cfg: StoreWriterConfig) -> Result<Arc<Store>, StartError> {
    let audit = Audit::open(cfg.audit_socket.as_deref());
    let store = Arc::new(Store::open(cfg, audit)?);
    durable::recover(&store)?;
    Ok(store)
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
    let cfg = match control.recv::<In>() {
        Ok((In::Start(cfg), _)) => *cfg,
        Ok(_) => {
            log::error!("control channel: expected Start");
            return 1;
        }
        Err(e) => {
            log::error!("control channel: {e}");
            return 1;
        }
    };
    let store = match start(cfg) {
        Ok(s) => s,
        Err(e) => {
            let reason = e.to_string();
            log::error!("cannot start: {reason}");
            let _ = control.send(&Out::Failed { reason }, &[]);
            return 1;
        }
    };
    let confinement = match crate::lockdown::lock_down(&store.cfg) {
        Ok(summary) => summary,
        Err(e) => {
            let reason = format!("cannot lock the process down: {e}");
            let _ = control.send(&Out::Failed { reason }, &[]);
            return 1;
        }
    };
    let startup = format!(
        "store={} real={} require_sigs={} keys={} {confinement}",
        store.cfg.store_dir,
        store.cfg.real_store_dir,
        store.cfg.require_sigs,
        store.cfg.trusted_public_keys.len()
    );
    store
        .audit
        .event(Severity::Notice, &[("op", "start"), ("settings", &startup)]);
    // Session threads ask the master for gc-socket connections through a second handle on
    // this channel; the answers arrive in the loop below.
    match control
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| e.to_string())
        .and_then(|fd| Channel::from_fd(fd).map_err(|e| e.to_string()))
    {
        Ok(send) => {
            let _ = store.gc_link.set(crate::gclink::GcLink::new(send));
        }
        Err(e) => log::warn!("no way to reach a running garbage collector: {e}"),
    }
    // Runtime roots come from the master's roots-reader, asked through a third handle.
    if store.cfg.runtime_roots_from_master {
        match control
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| e.to_string())
            .and_then(|fd| Channel::from_fd(fd).map_err(|e| e.to_string()))
        {
            Ok(send) => {
                crate::roots_runtime::install(send, &store.cfg.store_dir);
            }
            Err(e) => log::warn!("runtime roots are read here, not by the roots-reader: {e}"),
        }
    }
    if store.cfg.fsync_metadata && !durable::held_by_test() {
        if let Err(e) = durable::start(&store) {
            let reason = format!("cannot start the syncer: {e}");
            let _ = control.send(&Out::Failed { reason }, &[]);
            return 1;
        }
    }
    if let Err(e) = control.send(&Out::Ready, &[]) {
        log::error!("control channel: {e}");
        return 1;
    }

    let conns: Conns = Arc::new(Mutex::new(HashMap::new()));
    let mut helper: Option<Helper> = None;
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
                if let Err(reason) = new_client(&store, &conns, client.clone(), fd) {
                    log::warn!("conn {}: refused: {reason}", client.conn_id);
                    let _ = control.send(
                        &Out::ClientRefused {
                            conn_id: client.conn_id,
                            reason,
                        },
                        &[],
                    );
                }
            }
            In::ClientGone { conn_id } => client_gone(&conns, conn_id),
            In::GcSocket { id, error } => {
                let answer = match (error, fds.pop()) {
                    (None, Some(fd)) => Ok(fd),
                    (Some(why), _) => Err(why),
                    (None, None) => Err("no descriptor".to_string()),
                };
                if let Some(link) = store.gc_link.get() {
                    link.answer(id, answer);
                }
            }
            In::RuntimeRoots {
                id,
                roots,
                error,
                last,
            } => crate::roots_runtime::answer(id, roots, error, last),
            In::BuilderHelper => {
                let Some(fd) = fds.pop() else { continue };
                // A new helper (the master restarted it): the old one's channel ends, and
                // its open builds with it.
                if let Some(old) = helper.take() {
                    stop_helper(old);
                }
                match start_helper(&store, fd) {
                    Ok(h) => helper = Some(h),
                    Err(e) => log::error!("builder-helper channel refused: {e}"),
                }
            }
            In::Shutdown => break 0,
            other => {
                log::error!("control channel: unexpected {other:?}");
                break 1;
            }
        }
    };
    shutdown_all(&conns);
    if let Some(h) = helper.take() {
        stop_helper(h);
    }
    // Every add has finished: one last sync, so the next start has nothing to check.
    store.syncer.stop();
    if let Err(e) = store.syncer.round(&*store) {
        log::warn!("syncing added paths at shutdown: {e}; the next start checks them");
    }
    status
}

fn new_client(
    store: &Arc<Store>,
    conns: &Conns,
    client: ClientIdentity,
    fd: OwnedFd,
) -> Result<(), String> {
    let chan = Channel::from_fd(fd).map_err(|e| e.to_string())?;
    let sock = chan
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| e.to_string())?;
    let mut map = conns.lock().unwrap_or_else(|e| e.into_inner());
    if map.contains_key(&client.conn_id) {
        return Err(format!(
            "connection id {} is already in use",
            client.conn_id
        ));
    }
    {
        // nix-daemon makes the per-user profile and root directories for every client (also
        // when run by an ordinary user: then they are that user's).
        match &client.user_name {
            Some(name) => {
                if let Err(e) = roots::create_user_dirs(store, name, client.uid) {
                    log::warn!("conn {}: per-user directories: {e}", client.conn_id);
                }
            }
            _ => log::info!(
                "conn {}: uid {} has no user name",
                client.conn_id,
                client.uid
            ),
        }
    }
    let roots = TempRoots::new(&store.state_dir, client.conn_id)
        .with_charge(store.root_budgets.charge_for(&client));
    let roots = Arc::new(Mutex::new(roots));
    let conn_id = client.conn_id;
    let thread = {
        let store = store.clone();
        let roots = roots.clone();
        let conns = conns.clone();
        std::thread::Builder::new()
            .name(format!("conn-{conn_id}"))
            .spawn(move || {
                session::serve(store, client, chan, roots);
                // The broker is gone: so are its temporary roots (unless ClientGone did it).
                let gone = conns
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&conn_id);
                if let Some(c) = gone {
                    c.roots.lock().unwrap_or_else(|e| e.into_inner()).close();
                }
            })
            .map_err(|e| e.to_string())?
    };
    map.insert(
        conn_id,
        Conn {
            sock,
            roots,
            thread: Some(thread),
        },
    );
    Ok(())
}

/// Ends a connection's channel and drops its temporary roots.
fn client_gone(conns: &Conns, conn_id: u64) {
    let gone = conns
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&conn_id);
    if let Some(c) = gone {
        let _ = nix::sys::socket::shutdown(c.sock.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        c.roots.lock().unwrap_or_else(|e| e.into_inner()).close();
    }
}

/// Shuts every channel down and waits for the threads to finish their current request.
fn shutdown_all(conns: &Conns) {
    let all: Vec<Conn> = conns
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .drain()
        .map(|(_, c)| c)
        .collect();
    for c in &all {
        let _ = nix::sys::socket::shutdown(c.sock.as_raw_fd(), nix::sys::socket::Shutdown::Both);
    }
    for mut c in all {
        if let Some(t) = c.thread.take() {
            let _ = t.join();
        }
        c.roots.lock().unwrap_or_else(|e| e.into_inner()).close();
    }
}

/// Serves the builder-helper's channel on a thread of its own.
fn start_helper(store: &Arc<Store>, fd: OwnedFd) -> Result<Helper, String> {
    let chan = Channel::from_fd(fd).map_err(|e| e.to_string())?;
    let sock = chan
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| e.to_string())?;
    let store = store.clone();
    let thread = std::thread::Builder::new()
        .name("builder-helper".into())
        .spawn(move || crate::build::session::serve(store, chan))
        .map_err(|e| e.to_string())?;
    Ok(Helper { sock, thread })
}

/// Ends the helper's channel and waits for its current request to finish.
fn stop_helper(h: Helper) {
    let _ = nix::sys::socket::shutdown(h.sock.as_raw_fd(), nix::sys::socket::Shutdown::Both);
    let _ = h.thread.join();
}

/// Serves one broker channel on a new thread without the control channel (tests, tools).
pub fn spawn_session(store: &Arc<Store>, client: ClientIdentity, chan: Channel) -> JoinHandle<()> {
    let store = store.clone();
    std::thread::spawn(move || {
        let roots = TempRoots::new(&store.state_dir, client.conn_id)
            .with_charge(store.root_budgets.charge_for(&client));
        session::serve(store, client, chan, Arc::new(Mutex::new(roots)));
    })
}

/// Serves a builder-helper channel on a new thread without the control channel (tests).
pub fn spawn_helper(store: &Arc<Store>, chan: Channel) -> JoinHandle<()> {
    let store = store.clone();
    std::thread::spawn(move || crate::build::session::serve(store, chan))
}
