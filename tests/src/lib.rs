//! Test harness: starts a store daemon (Stockade or the real nix-daemon) over a throw-away
//! `/nix` in a private mount namespace and runs real Nix clients against it.
//!
//! ```no_run
//! use stockade_tests::{skip_unless_root, Daemon, DaemonKind};
//! skip_unless_root!();
//! let d = Daemon::builder(DaemonKind::Nix).start().unwrap();
//! let file = d.write_work_file("hello.txt", b"hello\n");
//! let path = d.run_ok(["nix-store", "--add", file.to_str().unwrap()]);
//! assert!(path.starts_with("/nix/store/"));
//! ```
//!
//! Layout of one instance (a fresh temporary directory `<base>`):
//!
//! ```text
//! <base>/nix/            bind-mounted over /nix inside the namespace (the logical store)
//! <base>/etc/nix/        NIX_CONF_DIR: nix.conf, stockade.conf
//! <base>/tmp/            TMPDIR of the daemon and its clients (1777)
//! <base>/home/<user>/    HOME and XDG dirs of each client user, and of the daemon
//! <base>/work/           scratch files a test wants to add (readable by every user)
//! <base>/logs/           daemon.log (stdout+stderr), holder.log
//! <base>/run/            stdin/stdout/stderr of each client command
//! ```
//!
//! Every process of an instance (holder, daemon, its workers and builders, clients) is killed
//! when the [`Daemon`] is dropped, including during a panic, and each dies on its own if the
//! thread that started it ends.

pub mod bench;
pub mod builddir;
mod client;
mod daemon;
pub mod evil;
pub mod fsutil;
pub mod gcpause;
pub mod http;
pub mod newer;
mod proc;
pub mod raw;
pub mod sec;
pub mod session;
mod users;

pub use client::{Client, RunOutput};
pub use daemon::{
    busybox_derivation, nix_string, stockade_bin, Daemon, DaemonBuilder, DaemonKind, Layout,
    DEFAULT_NIX_CONF,
};
pub use fsutil::host_nix_fingerprint;
pub use newer::{newer_nix_bin, newer_nix_or_skip, newer_nix_prefix};
pub use proc::process_alive;
pub use users::{ensure_user, User};

use std::time::Duration;

/// PATH given to daemons and clients: the system directories only.
pub const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long a daemon may take to start listening.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one client command may run before it is killed.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(300);

/// Everything that can go wrong in the harness itself (not in the code under test).
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("daemon binary for {kind}: {reason}")]
    NoDaemonBinary { kind: String, reason: String },
    #[error("the namespace holder failed: {0}")]
    Holder(String),
    #[error("{kind} exited ({status}) before listening on {socket}; its output:\n{log}")]
    DaemonDied {
        kind: String,
        status: String,
        socket: String,
        log: String,
    },
    #[error("{kind} did not listen on {socket} within {timeout:?}; its output:\n{log}")]
    StartTimeout {
        kind: String,
        socket: String,
        timeout: Duration,
        log: String,
    },
    #[error("`{command}` did not finish within {timeout:?} and was killed;\nstdout:\n{stdout}\nstderr:\n{stderr}")]
    CommandTimeout {
        command: String,
        timeout: Duration,
        stdout: String,
        stderr: String,
    },
    #[error("test user: {0}")]
    User(String),
    #[error("{0}")]
    Other(String),
}

impl HarnessError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HarnessError {
        let what = what.into();
        move |source| HarnessError::Io { what, source }
    }
}

/// True if the integration tests can run here (we are root). When not root: panics if the
/// environment variable `CI` is set (CI must never silently skip), otherwise prints why the
/// test `name` is skipped and returns false.
pub fn root_or_skip(name: &str) -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
    assert!(
        !ci,
        "{name}: these tests need root (mount namespaces, useradd); CI is set, so not skipping"
    );
    // Straight to fd 2: the test harness captures eprintln!, and a skip must be visible.
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("SKIPPED {name}: needs root (mount namespaces, useradd); run the tests as root\n")
            .as_bytes(),
    );
    false
}

/// Returns from the enclosing test unless it can run (see [`root_or_skip`]).
#[macro_export]
macro_rules! skip_unless_root {
    () => {{
        // The enclosing function's path, e.g. `harness_nix_daemon::build_with_busybox`.
        fn __here() {}
        fn __name_of<T>(_: T) -> &'static str {
            ::std::any::type_name::<T>()
        }
        let name = __name_of(__here);
        if !$crate::root_or_skip(name.strip_suffix("::__here").unwrap_or(name)) {
            return;
        }
    }};
}
