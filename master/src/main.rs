//! `stockade`: the master process, the only one that keeps root.
//!
//! It reads the configuration, binds (or inherits) the daemon sockets, starts the
//! store-writer, and for every connection decides admission and trust from `SO_PEERCRED` and
//! `policy`, then execs a broker for it (DESIGN.md, "Processes"). It never parses the worker
//! protocol and never touches the store.
//!
//! Modules, in the order a connection meets them:
//! - [`cli`]: `stockade daemon …` and `nix-daemon …` command lines;
//! - [`paths`], [`config`]: `NIX_*_DIR`, nix.conf, stockade.conf, `--option`;
//! - [`socket`]: the daemon socket and the untrusted socket (the `--stdio --force-untrusted`
//!   design is explained there), systemd activation;
//! - [`daemon`]: the accept loop, admission, limits, supervision, shutdown;
//! - [`peers`], [`uids`]: who the peer is; which uid its broker gets;
//! - [`launch`], [`spawn`], [`writer`]: channels, exec and confinement of the children, and the
//!   builder-helper's control channel ([`builder`]) and its build uids ([`builders`]);
//! - [`roots`]: the roots-reader, which finds runtime GC roots for the store-writer;
//! - [`restart`]: a new store-writer when the store directories were replaced under it;
//! - [`restrict`]: what the master keeps for itself;
//! - [`stdio`]: the `--stdio` modes.

mod builder;
mod builders;
mod cli;
mod config;
mod daemon;
mod error;
mod launch;
mod logger;
mod paths;
mod peers;
mod ratelimit;
mod restart;
mod restrict;
mod roots;
mod socket;
mod spawn;
mod stdio;
mod uids;
mod writer;

use nix::sys::stat::{umask, Mode};
use stockade_common::audit::Audit;

use crate::cli::{DaemonArgs, Invocation};
use crate::config::Config;
use crate::daemon::Ctx;
use crate::error::{Error, Result};
use crate::launch::{Launcher, Programs};
use crate::paths::Paths;

fn main() {
    // Before anything opens a file, so fds 0-3 are never reused for something else.
    if let Err(e) = spawn::occupy_low_fds() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
    let args = match cli::parse() {
        Invocation::Print(text) => {
            println!("{text}");
            return;
        }
        Invocation::Daemon(args) => args,
    };
    logger::init(args.verbosity());
    match run(args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            log::error!("{e}");
            std::process::exit(1);
        }
    }
}

fn run(args: DaemonArgs) -> Result<i32> {
    umask(Mode::from_bits_truncate(0o022));
    let paths = Paths::from_env()?;
    let cfg = Config::load(&paths.conf_dir, &args.options())?;
    for w in &cfg.warnings {
        log::warn!("{w}");
    }
    cfg.check()?;
    let uid = nix::unistd::geteuid().as_raw();
    let as_root = uid == 0;

    if args.stdio {
        // A running daemon is always the one to serve: a second store-writer on its store
        // would race it (A75). Forwarding needs no children and no privileges.
        let local = stdio::serves_locally(as_root, &paths.state_dir);
        if let Some(daemon) = stdio::running_daemon(&args, &paths, local)? {
            let ctx = context(args, paths, cfg, as_root, uid, None)?;
            return stdio::forward(ctx, daemon);
        }
    }
    if as_root {
        check_protected_hardlinks()?;
    }
    let programs = Programs::locate()?;
    let ctx = context(args, paths, cfg, as_root, uid, Some(programs))?;
    if ctx.args.stdio {
        stdio::serve_locally(ctx)
    } else {
        daemon::run(ctx)
    }
}

fn context(
    args: DaemonArgs,
    paths: Paths,
    cfg: Config,
    as_root: bool,
    uid: u32,
    programs: Option<Programs>,
) -> Result<Ctx> {
    // Opened before any lockdown, while /dev/log is reachable.
    let audit = Audit::open("stockade", cfg.audit_socket().as_deref());
    let programs = programs.unwrap_or_else(|| Programs {
        broker: Default::default(),
        store_writer: Default::default(),
        builder_helper: Default::default(),
        roots_reader: None,
    });
    let lockdown = cfg.lockdown(args.seccomp_mode());
    let launcher = Launcher::new(programs, &cfg, &paths, args.verbosity(), lockdown);
    Ok(Ctx {
        paths,
        cfg,
        args,
        audit,
        as_root,
        uid,
        launcher,
    })
}

/// A33: with `fs.protected_hardlinks = 0` users could hard-link store files (or root-owned
/// files into places the daemon later changes); refuse to run as root then.
fn check_protected_hardlinks() -> Result<()> {
    if cfg!(feature = "without-a33") {
        return Ok(());
    }
    match std::fs::read_to_string("/proc/sys/fs/protected_hardlinks") {
        Ok(v) if v.trim() == "0" => Err(Error::Refused(
            "fs.protected_hardlinks is 0; set it to 1 (sysctl fs.protected_hardlinks=1)".into(),
        )),
        Ok(_) => Ok(()),
        Err(e) => {
            log::warn!("cannot read /proc/sys/fs/protected_hardlinks: {e}");
            Ok(())
        }
    }
}

// Test-only switches that turn a defence off (scripts/defences-off.sh). Never in a release build.
#[cfg(all(
    not(debug_assertions),
    any(
        feature = "without-a75",
        feature = "without-stderr-relay",
        feature = "without-a7",
        feature = "without-a33",
        feature = "without-v13",
        feature = "without-broker-cgroup",
        feature = "without-private-builds-dir"
    )
))]
compile_error!("the without-* features switch defences off; they are for test builds only");
