//! The listening sockets: bound by the master in a directory it owns, or inherited from systemd.
//!
//! Two sockets are served:
//! - the daemon socket (`NIX_DAEMON_SOCKET_PATH`, default
//!   `$NIX_STATE_DIR/daemon-socket/socket`, mode 0666), where trust follows `trusted-users`;
//! - `$NIX_STATE_DIR/daemon-socket/untrusted` (mode 0666), whose connections are never trusted.
//!   `stockade daemon --stdio --force-untrusted` run by an ordinary user (typically as an SSH
//!   forced command) splices its standard input/output to this socket, so the daemon serves the
//!   SSH account with that account's uid and without trust, whatever `trusted-users` says. The
//!   Nix worker protocol has no message a client could use to give up trust, hence a second
//!   socket rather than a request on the first.
//!
//! The socket directory is created 0755 by the daemon's user; if it exists owned by anyone else
//! the master refuses to start (A8), since that user could swap the socket for their own. A stale
//! socket file is removed before binding; a socket somebody still listens on is not. The 0666
//! mode is set through the umask at `bind` time rather than by a `chmod` on the path afterwards,
//! which could follow a symlink planted in between.
//!
//! With systemd socket activation (`LISTEN_PID` = our pid, `LISTEN_FDS` ≥ 1) the first
//! inherited descriptor (fd 3) is the daemon socket; one named `untrusted` in `LISTEN_FDNAMES`,
//! if any, is the untrusted socket, which otherwise is bound as above.

use std::fs::{self, DirBuilder};
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::socket::{getsockopt, sockopt, SockType};
use nix::sys::stat::{fchmod, umask, Mode};

use crate::error::{Error, Result};
use crate::paths::{Paths, UNTRUSTED_SOCKET_NAME};

/// First descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// The sockets the accept loop serves.
#[derive(Debug)]
pub struct Listeners {
    pub main: UnixListener,
    pub untrusted: UnixListener,
    /// Whether the main socket came from systemd.
    pub activated: bool,
}

/// Set up both sockets. `uid` is the daemon's effective uid (the required owner of the socket
/// directory).
pub fn open(paths: &Paths, uid: u32) -> Result<Listeners> {
    let inherited = take_systemd_fds()?;
    let mut main = None;
    let mut untrusted = None;
    for (fd, name) in inherited {
        let l = listener_from_fd(fd)?;
        if name.as_deref() == Some(UNTRUSTED_SOCKET_NAME) {
            untrusted.get_or_insert(l);
        } else {
            main.get_or_insert(l);
        }
    }
    let activated = main.is_some();
    ensure_socket_dir(&paths.socket_dir, uid)?;
    let main = match main {
        Some(l) => l,
        None => {
            if let Some(parent) = paths.socket_path.parent() {
                create_missing_dirs(parent)?;
            }
            bind_socket(&paths.socket_path)?
        }
    };
    let untrusted = match untrusted {
        Some(l) => l,
        None => bind_socket(&paths.untrusted_socket_path)?,
    };
    Ok(Listeners {
        main,
        untrusted,
        activated,
    })
}

/// `mkdir -p` with mode 0755 for what is missing; existing directories are left alone.
fn create_missing_dirs(dir: &Path) -> Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(Error::io(format!("creating {}", dir.display())))
}

/// Create the socket directory or check the existing one: a real directory owned by `uid`, not
/// writable by others, in a parent that others cannot rename it in.
pub fn ensure_socket_dir(dir: &Path, uid: u32) -> Result<()> {
    ensure_owned_dir(dir, uid, 0o755)
}

/// [`ensure_socket_dir`] with mode 0700.
pub fn ensure_private_dir(dir: &Path, uid: u32) -> Result<()> {
    ensure_owned_dir(dir, uid, 0o700)
}

fn ensure_owned_dir(dir: &Path, uid: u32, mode: u32) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("/"));
    create_missing_dirs(parent)?;
    let pmeta =
        fs::metadata(parent).map_err(Error::io(format!("examining {}", parent.display())))?;
    if pmeta.mode() & 0o002 != 0 && pmeta.mode() & 0o1000 == 0 {
        return Err(Error::UnsafePath {
            path: parent.to_path_buf(),
            reason: "is world-writable; anyone could replace the socket directory".into(),
        });
    }
    match DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::io(format!("creating {}", dir.display()))(e)),
    }
    // Examine what we will use through a descriptor, so nothing can be swapped in between.
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECTORY | nix::libc::O_NOFOLLOW)
        .open(dir)
        .map_err(|e| Error::UnsafePath {
            path: dir.to_path_buf(),
            reason: format!("cannot be opened as a directory (not following symlinks): {e}"),
        })?;
    let meta = f
        .metadata()
        .map_err(Error::io(format!("examining {}", dir.display())))?;
    if meta.uid() != uid {
        return Err(Error::UnsafePath {
            path: dir.to_path_buf(),
            reason: format!(
                "is owned by uid {}, not by the daemon's uid {uid}; refusing to serve a socket \
                 another user could replace (remove the directory if it is stale)",
                meta.uid()
            ),
        });
    }
    if meta.mode() & 0o7777 != mode {
        fchmod(f.as_raw_fd(), Mode::from_bits_truncate(mode))
            .map_err(Error::sys(format!("chmod {mode:o} {}", dir.display())))?;
    }
    Ok(())
}

/// Bind a listening socket at `path` with mode 0666, replacing a stale socket file.
pub fn bind_socket(path: &Path) -> Result<UnixListener> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(Error::Refused(format!(
                    "another daemon is already listening on {}",
                    path.display()
                )));
            }
            fs::remove_file(path).map_err(Error::io(format!(
                "removing stale socket {}",
                path.display()
            )))?;
        }
        Ok(_) => {
            return Err(Error::UnsafePath {
                path: path.to_path_buf(),
                reason: "exists and is not a socket; refusing to replace it".into(),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("examining {}", path.display()))(e)),
    }
    // The master is single-threaded here, so the umask change affects only this bind.
    let old = umask(Mode::from_bits_truncate(0o111));
    let bound = UnixListener::bind(path);
    umask(old);
    let listener = bound.map_err(Error::io(format!("binding {}", path.display())))?;
    listener
        .set_nonblocking(true)
        .map_err(Error::io("making the socket non-blocking"))?;
    Ok(listener)
}

/// Descriptors passed by systemd, with their names; empty when not socket-activated. The
/// variables are removed so that no child sees them.
fn take_systemd_fds() -> Result<Vec<(OwnedFd, Option<String>)>> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").ok();
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    let ours = pid
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    let count = fds.and_then(|n| n.parse::<i32>().ok()).unwrap_or(0);
    if !ours || count <= 0 {
        return Ok(Vec::new());
    }
    // A handful is all a daemon socket unit passes; more is a misconfiguration.
    if count > 16 {
        return Err(Error::Other(format!(
            "systemd passed {count} sockets; expected at most 2"
        )));
    }
    let names: Vec<String> = names
        .map(|n| n.split(':').map(str::to_string).collect())
        .unwrap_or_default();
    let mut out = Vec::new();
    for i in 0..count {
        let raw = LISTEN_FDS_START + i;
        out.push((own_inherited_fd(raw), names.get(i as usize).cloned()));
    }
    Ok(out)
}

fn own_inherited_fd(raw: RawFd) -> OwnedFd {
    // SAFETY: per the sd_listen_fds protocol, LISTEN_PID named this process and LISTEN_FDS says
    // descriptors 3.. are open and passed to us; this runs once (the variables are removed
    // first) before anything else in the process could have opened or adopted them.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

/// Check an inherited descriptor is a listening unix stream socket and make it close-on-exec
/// (inherited descriptors are not) and non-blocking.
fn listener_from_fd(fd: OwnedFd) -> Result<UnixListener> {
    let what = format!("inherited descriptor {}", fd.as_raw_fd());
    let ty = getsockopt(&fd, sockopt::SockType).map_err(Error::sys(what.clone()))?;
    let listening = getsockopt(&fd, sockopt::AcceptConn).map_err(Error::sys(what.clone()))?;
    if ty != SockType::Stream || !listening {
        return Err(Error::Other(format!(
            "{what} is not a listening stream socket"
        )));
    }
    fcntl(
        fd.as_fd().as_raw_fd(),
        FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC),
    )
    .map_err(Error::sys(what.clone()))?;
    let l = UnixListener::from(fd);
    // A unix listener's local address is a path (or unnamed); anything else is not ours.
    l.local_addr()
        .map_err(|_| Error::Other(format!("{what} is not a unix socket")))?;
    l.set_nonblocking(true).map_err(Error::io(what))?;
    Ok(l)
}

/// The systemd notification socket, connected once: the master's seccomp filter allows
/// `sendto` only without an address (A74), so the address is given to `connect` before the
/// lockdown. `None` without `NOTIFY_SOCKET` or when it cannot be reached.
static NOTIFY: std::sync::OnceLock<Option<std::os::unix::net::UnixDatagram>> =
    std::sync::OnceLock::new();

fn notify_socket() -> Option<&'static std::os::unix::net::UnixDatagram> {
    NOTIFY
        .get_or_init(|| {
            let path = std::env::var_os("NOTIFY_SOCKET")?;
            let sock = std::os::unix::net::UnixDatagram::unbound().ok()?;
            let bytes = path.as_encoded_bytes();
            let connected = if let Some(name) = bytes.strip_prefix(b"@") {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name)
                    .and_then(|addr| sock.connect_addr(&addr))
            } else {
                sock.connect(PathBuf::from(&path))
            };
            connected
                .map_err(|e| log::debug!("sd_notify: connecting: {e}"))
                .ok()?;
            Some(sock)
        })
        .as_ref()
}

/// Connect the notification socket now (before the master's lockdown).
pub fn sd_notify_prepare() {
    let _ = notify_socket();
}

/// `sd_notify`: tell systemd (Type=notify) about our state; nothing without `NOTIFY_SOCKET`.
pub fn sd_notify(state: &str) {
    let Some(sock) = notify_socket() else {
        return;
    };
    if let Err(e) = sock.send(state.as_bytes()) {
        log::debug!("sd_notify: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// `bind_socket` changes the process-wide umask for a moment, which would change the modes
    /// of what a parallel test creates meanwhile.
    static UMASK: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn creates_dir_and_binds_0666() {
        let _umask = UMASK.lock().unwrap_or_else(|e| e.into_inner());
        let t = tempfile::tempdir().expect("tempdir");
        let dir = t.path().join("state/daemon-socket");
        let uid = nix::unistd::geteuid().as_raw();
        ensure_socket_dir(&dir, uid).expect("dir");
        let m = fs::metadata(&dir).expect("meta");
        assert_eq!(m.mode() & 0o7777, 0o755);
        let sock = dir.join("socket");
        let l = bind_socket(&sock).expect("bind");
        let m = fs::symlink_metadata(&sock).expect("meta");
        assert!(m.file_type().is_socket());
        assert_eq!(m.mode() & 0o777, 0o666);
        // A live listener is not replaced.
        assert!(matches!(bind_socket(&sock), Err(Error::Refused(_))));
        drop(l);
        // A stale one is.
        bind_socket(&sock).expect("rebind over stale socket");
    }

    #[test]
    fn refuses_foreign_dir_and_non_socket() {
        let _umask = UMASK.lock().unwrap_or_else(|e| e.into_inner());
        let t = tempfile::tempdir().expect("tempdir");
        let dir = t.path().join("daemon-socket");
        fs::create_dir(&dir).expect("mkdir");
        let uid = nix::unistd::geteuid().as_raw();
        // Owned by us but someone else's uid expected: refused (A8).
        assert!(matches!(
            ensure_socket_dir(&dir, uid.wrapping_add(1)),
            Err(Error::UnsafePath { .. })
        ));
        // Loose permissions on our own directory are tightened.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).expect("chmod");
        ensure_socket_dir(&dir, uid).expect("ours");
        assert_eq!(fs::metadata(&dir).expect("m").mode() & 0o7777, 0o755);
        // A symlink in place of the directory is refused.
        let link = t.path().join("link-dir");
        std::os::unix::fs::symlink(&dir, &link).expect("symlink");
        assert!(matches!(
            ensure_socket_dir(&link, uid),
            Err(Error::UnsafePath { .. })
        ));
        // A regular file where the socket goes is not removed.
        let file = dir.join("socket");
        fs::write(&file, b"x").expect("write");
        assert!(matches!(bind_socket(&file), Err(Error::UnsafePath { .. })));
        assert!(file.exists());
        // A world-writable parent without the sticky bit is refused.
        let open = t.path().join("open");
        fs::create_dir(&open).expect("mkdir");
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).expect("chmod");
        assert!(matches!(
            ensure_socket_dir(&open.join("daemon-socket"), uid),
            Err(Error::UnsafePath { .. })
        ));
    }
}
