//! Diagnostics on standard error, in Nix's style (`error: …`, `warning: …`, plain otherwise).
//! These are for the administrator's journal; audit events go through
//! [`stockade_common::audit`] instead.

use std::io::Write;

use log::{Level, LevelFilter, Log, Metadata, Record};

struct StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let prefix = match record.level() {
            Level::Error => "error: ",
            Level::Warn => "warning: ",
            _ => "",
        };
        // One write per line so that lines from several processes sharing stderr do not mix.
        let line = format!("{prefix}{}\n", record.args());
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

/// The `log` filter for a Nix verbosity level.
pub fn level_filter(verbosity: u32) -> LevelFilter {
    match verbosity {
        0 => LevelFilter::Error,
        1 => LevelFilter::Warn,
        2 | 3 => LevelFilter::Info,
        4 | 5 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    }
}

/// Install the logger (once; later calls only change the level).
pub fn init(verbosity: u32) {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level_filter(verbosity));
}
