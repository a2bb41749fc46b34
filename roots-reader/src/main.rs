//! `stockade-roots-reader`: finds the store paths running processes use (runtime GC roots) in
//! `/proc`. Started once by the master with its control channel as a descriptor
//! (`--control-fd 3`), never by hand.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use clap::Parser;
use stockade_common::ipc::Channel;

#[derive(Parser, Debug)]
#[command(name = "stockade-roots-reader", version)]
struct Args {
    /// File descriptor of the control channel the master hands over.
    #[arg(long)]
    control_fd: RawFd,
}

/// Plain stderr logger (the master collects our stderr into its journal).
struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            eprintln!("stockade-roots-reader: {}: {}", r.level(), r.args());
        }
    }
    fn flush(&self) {}
}

static LOGGER: StderrLog = StderrLog;

/// Takes ownership of the inherited control descriptor after checking it is open.
fn inherited_fd(fd: RawFd) -> Option<OwnedFd> {
    if fd < 3 || nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_err() {
        return None;
    }
    // SAFETY: the master passes this descriptor to us at exec and nothing else in this
    // process has taken ownership of it (we checked it is open and not stdio); from here on
    // the `OwnedFd` is its only owner.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn main() {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(log::LevelFilter::Info);
    let args = Args::parse();
    let Some(fd) = inherited_fd(args.control_fd) else {
        eprintln!(
            "stockade-roots-reader: descriptor {} is not an open control channel",
            args.control_fd
        );
        std::process::exit(1);
    };
    let control = match Channel::from_fd(fd) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stockade-roots-reader: control channel: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = stockade_roots_reader::serve::serve(control, args.control_fd) {
        log::error!("{e}");
        std::process::exit(1);
    }
}
