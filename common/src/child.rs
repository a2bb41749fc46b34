//! What every service the master execs (store-writer, builder-helper, roots-reader) does
//! first: log to standard error under its own name, and take its control channel from the
//! descriptor the master handed over at exec.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Plain standard-error logger: `<name>: <LEVEL>: <message>` (the master's journal has the
/// rest).
struct StderrLog {
    name: &'static str,
}

impl log::Log for StderrLog {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            eprintln!("{}: {}: {}", self.name, r.level(), r.args());
        }
    }
    fn flush(&self) {}
}

/// Logs at info level and above to standard error as `name`. Once per process.
pub fn init_logging(name: &'static str) {
    let logger: &'static StderrLog = Box::leak(Box::new(StderrLog { name }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
}

/// Takes ownership of the control descriptor the master passed at exec, after checking it is
/// open and not one of the standard streams.
pub fn inherited_fd(fd: RawFd) -> Option<OwnedFd> {
    if fd < 3 || nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_err() {
        return None;
    }
    // SAFETY: the master passes this descriptor to us at exec and nothing else in this
    // process has taken ownership of it (we checked it is open and not stdio); from here on
    // the `OwnedFd` is its only owner.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}
