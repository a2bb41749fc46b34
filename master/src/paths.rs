//! Where things are: the `NIX_*_DIR` environment variables, with Nix's defaults.
//!
//! `NIX_REMOTE` is deliberately not read: the daemon *is* the store, and a daemon told to use
//! a daemon store would connect to itself.

use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// Directories and sockets the master uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    /// `NIX_CONF_DIR` (`/etc/nix`): nix.conf and stockade.conf.
    pub conf_dir: PathBuf,
    /// `NIX_STORE_DIR` (`/nix/store`).
    pub store_dir: PathBuf,
    /// `NIX_STATE_DIR` (`/nix/var/nix`).
    pub state_dir: PathBuf,
    /// `NIX_LOG_DIR` (`/nix/var/log/nix`).
    pub log_dir: PathBuf,
    /// `$NIX_STATE_DIR/daemon-socket`: created and owned by the daemon's user (A8).
    pub socket_dir: PathBuf,
    /// `NIX_DAEMON_SOCKET_PATH` (`$NIX_STATE_DIR/daemon-socket/socket`).
    pub socket_path: PathBuf,
    /// `$NIX_STATE_DIR/daemon-socket/untrusted`: connections here are never trusted.
    pub untrusted_socket_path: PathBuf,
}

/// Name of the untrusted socket inside [`Paths::socket_dir`].
pub const UNTRUSTED_SOCKET_NAME: &str = "untrusted";

impl Paths {
    /// From the process environment.
    pub fn from_env() -> Result<Paths> {
        Paths::from_lookup(|var| std::env::var_os(var).map(PathBuf::from))
    }

    /// From a lookup function (tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<PathBuf>) -> Result<Paths> {
        let dir = |var: &'static str, default: &str| -> Result<PathBuf> {
            match get(var) {
                // Nix treats an empty variable as unset.
                Some(p) if !p.as_os_str().is_empty() => canon(var, &p),
                _ => Ok(PathBuf::from(default)),
            }
        };
        let conf_dir = dir("NIX_CONF_DIR", "/etc/nix")?;
        let store_dir = dir("NIX_STORE_DIR", "/nix/store")?;
        let state_dir = dir("NIX_STATE_DIR", "/nix/var/nix")?;
        let log_dir = dir("NIX_LOG_DIR", "/nix/var/log/nix")?;
        let socket_dir = state_dir.join("daemon-socket");
        let default_socket = socket_dir.join("socket");
        let socket_path = dir("NIX_DAEMON_SOCKET_PATH", &default_socket.to_string_lossy())?;
        if store_dir == Path::new("/") {
            return Err(Error::Env {
                var: "NIX_STORE_DIR",
                reason: "the store cannot be the root directory".into(),
            });
        }
        Ok(Paths {
            untrusted_socket_path: socket_dir.join(UNTRUSTED_SOCKET_NAME),
            conf_dir,
            store_dir,
            state_dir,
            log_dir,
            socket_dir,
            socket_path,
        })
    }
}

/// An absolute path with `.`, `..`, repeated and trailing slashes resolved lexically, as Nix's
/// `canonPath` does for these variables.
fn canon(var: &'static str, p: &Path) -> Result<PathBuf> {
    if !p.is_absolute() {
        return Err(Error::Env {
            var,
            reason: format!("'{}' is not an absolute path", p.display()),
        });
    }
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn with(vars: &[(&str, &str)]) -> Result<Paths> {
        let m: HashMap<String, PathBuf> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), PathBuf::from(v)))
            .collect();
        Paths::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn defaults() {
        let p = with(&[]).expect("defaults");
        assert_eq!(p.conf_dir, Path::new("/etc/nix"));
        assert_eq!(p.store_dir, Path::new("/nix/store"));
        assert_eq!(p.state_dir, Path::new("/nix/var/nix"));
        assert_eq!(p.log_dir, Path::new("/nix/var/log/nix"));
        assert_eq!(
            p.socket_path,
            Path::new("/nix/var/nix/daemon-socket/socket")
        );
        assert_eq!(
            p.untrusted_socket_path,
            Path::new("/nix/var/nix/daemon-socket/untrusted")
        );
    }

    #[test]
    fn overrides() {
        let p = with(&[
            ("NIX_STATE_DIR", "/tmp/x//state/"),
            ("NIX_STORE_DIR", "/tmp/x/./store/../store"),
            ("NIX_CONF_DIR", ""),
            ("NIX_REMOTE", "daemon"),
        ])
        .expect("ok");
        assert_eq!(p.state_dir, Path::new("/tmp/x/state"));
        assert_eq!(p.store_dir, Path::new("/tmp/x/store"));
        assert_eq!(p.conf_dir, Path::new("/etc/nix"));
        assert_eq!(
            p.socket_path,
            Path::new("/tmp/x/state/daemon-socket/socket")
        );
        let p = with(&[("NIX_DAEMON_SOCKET_PATH", "/run/s")]).expect("ok");
        assert_eq!(p.socket_path, Path::new("/run/s"));
        assert_eq!(
            p.untrusted_socket_path,
            Path::new("/nix/var/nix/daemon-socket/untrusted")
        );
    }

    #[test]
    fn relative_or_root_is_refused() {
        assert!(with(&[("NIX_STORE_DIR", "store")]).is_err());
        assert!(with(&[("NIX_STORE_DIR", "/")]).is_err());
        assert!(with(&[("NIX_STORE_DIR", "/a/..")]).is_err());
    }
}
