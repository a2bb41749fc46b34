//! The collector's `gc-socket`: while it runs, a process outside this store-writer that wants
//! a temp root (and cannot take the GC lock) connects and sends `<path>\n` lines; each is
//! answered `1` once the collector knows the root and is not deleting that path.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{bind, listen, Backlog, UnixAddr};
use nix::sys::stat::Mode;
use stockade_common::store_path::StoreDir;

use super::state::Shared;
use crate::store::Store;

/// Clients served at once; more wait in the listen queue.
const MAX_CLIENTS: usize = 64;
/// Longest line a client may send.
const MAX_LINE: u64 = 4096;

pub struct RootsServer {
    stop: OwnedFd,
    thread: Option<JoinHandle<()>>,
}

impl RootsServer {
    /// Binds `gc-socket/socket` on a socket from the master (replacing what is there: no
    /// collector but ours can run now, we hold the lock) and serves it.
    pub fn start(store: &Store, shared: Arc<Shared>) -> std::io::Result<RootsServer> {
        let link = store
            .gc_link
            .get()
            .ok_or_else(|| std::io::Error::other("no master to make the socket"))?;
        let sock = link.new_socket()?;
        let dir = store.state_dir.join("gc-socket");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("socket");
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        bind(sock.as_raw_fd(), &UnixAddr::new(&path)?)?;
        // Nix's mode: whoever adds a temp root must reach it.
        nix::sys::stat::fchmodat(
            None,
            &path,
            Mode::from_bits_truncate(0o666),
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )?;
        listen(&sock, Backlog::new(128).unwrap_or(Backlog::MAXCONN))?;
        let listener = UnixListener::from(sock);
        let (stop_r, stop_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let store_dir = store.store_dir.clone();
        let thread = std::thread::Builder::new()
            .name("gc-socket".into())
            .spawn(move || serve(listener, stop_r, shared, store_dir))?;
        Ok(RootsServer {
            stop: stop_w,
            thread: Some(thread),
        })
    }
}

impl Drop for RootsServer {
    fn drop(&mut self) {
        let _ = nix::unistd::write(&self.stop, b"x");
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(listener: UnixListener, stop: OwnedFd, shared: Arc<Shared>, store_dir: StoreDir) {
    let clients: Arc<Mutex<HashMap<u64, UnixStream>>> = Arc::default();
    let mut threads = Vec::new();
    let mut next = 0u64;
    loop {
        let mut fds = [
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                log::warn!("gc-socket: {e}");
                break;
            }
        }
        if fds[0].any().unwrap_or(true) {
            break;
        }
        let Ok((conn, _)) = listener.accept() else {
            continue;
        };
        threads.retain(|t: &JoinHandle<()>| !t.is_finished());
        if threads.len() >= MAX_CLIENTS {
            // It retries: a refused or closed connection sends it back to the lock.
            continue;
        }
        let Ok(handle) = conn.try_clone() else {
            continue;
        };
        let id = next;
        next += 1;
        clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, handle);
        let (shared, store_dir, clients) = (shared.clone(), store_dir.clone(), clients.clone());
        let spawned = std::thread::Builder::new()
            .name("gc-socket-client".into())
            .spawn(move || {
                serve_client(conn, &shared, &store_dir);
                clients
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
            });
        if let Ok(t) = spawned {
            threads.push(t);
        }
    }
    // Waking every client still connected ends its thread.
    for c in clients.lock().unwrap_or_else(|e| e.into_inner()).values() {
        let _ = c.shutdown(std::net::Shutdown::Both);
    }
    for t in threads {
        let _ = t.join();
    }
}

fn serve_client(conn: UnixStream, shared: &Shared, store_dir: &StoreDir) {
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    let mut input = BufReader::new(conn);
    loop {
        let mut line = Vec::new();
        match (&mut input).take(MAX_LINE).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.pop() != Some(b'\n') {
            return;
        }
        match std::str::from_utf8(&line)
            .ok()
            .and_then(|s| store_dir.parse(s).ok())
        {
            Some(p) => {
                shared.add_root(p.hash_part());
            }
            None => log::warn!("gc-socket: received garbage instead of a root"),
        }
        if out.write_all(b"1").is_err() {
            return;
        }
    }
}
