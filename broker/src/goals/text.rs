//! nix-daemon's words around builds. Where 2.8 and 2.26 differ, a client at protocol 1.38
//! (Nix 2.24 and later) gets the newer form.

use stockade_common::ipc::builder::{BuildKind, BuildReport};

use crate::error::hl;

/// The first protocol minor whose clients get the newer wording.
const NEWER: u8 = 38;

/// Nix's default `log-lines` (2.8: 10; 2.26: 25).
pub fn default_log_lines(minor: u8) -> usize {
    if minor >= NEWER {
        25
    } else {
        10
    }
}

/// The text of the build activity (the activity nix-daemon starts when a build starts).
pub fn activity_text(kind: BuildKind, drv: &str, round: u32, rounds: u32) -> String {
    match kind {
        BuildKind::Normal if rounds > 1 => format!("building '{drv}' (round {round}/{rounds})"),
        BuildKind::Normal => format!("building '{drv}'"),
        BuildKind::Repair => format!("repairing outputs of '{drv}'"),
        BuildKind::Check => format!("checking outputs of '{drv}'"),
    }
}

/// Nix's text of an error made from one plain string (no format arguments): it starts with a
/// colour reset.
pub fn plain(message: &str) -> String {
    format!("\x1b[0m{message}")
}

/// A failed build's error. When the builder itself failed, Nix adds (the daemon's logger is
/// never verbose) the last lines of the log and where the whole log is, and raises the result
/// as a plain string.
pub fn failure(report: &BuildReport, drv: &str, minor: u8, log_lines: usize) -> String {
    if !report.error.starts_with("builder for '") {
        return report.error.clone();
    }
    let mut msg = report.error.clone();
    let skip = report.log_tail.len().saturating_sub(log_lines);
    let tail = report.log_tail.get(skip..).unwrap_or_default();
    if tail.is_empty() {
        return plain(&msg);
    }
    msg.push_str(&format!(";\nlast {} log lines:\n", tail.len()));
    for line in tail {
        msg.push_str("> ");
        msg.push_str(line);
        msg.push('\n');
    }
    if minor >= NEWER {
        msg.push_str(&format!(
            "For full logs, run:\n  \x1b[1mnix-store -l {drv}\x1b[0m"
        ));
    } else {
        msg.push_str(&format!(
            "For full logs, run '\x1b[1mnix log {drv}\x1b[0m'."
        ));
    }
    plain(&msg)
}

pub fn dependency_failed(failed: usize, drv: &str) -> String {
    format!(
        "{} dependencies of derivation '{}' failed to build",
        hl(failed),
        hl(drv)
    )
}

/// A repair whose outputs were intact but not all of their closure could be repaired.
pub fn closure_unrepaired(drv: &str) -> String {
    format!(
        "some paths in the output closure of derivation '{}' could not be repaired",
        hl(drv)
    )
}

/// A BuildDerivation whose inputs are not all valid.
pub fn dependencies_missing(drv: &str) -> String {
    format!("some dependencies of '{}' are missing", hl(drv))
}

/// `max-jobs = 0` with something to build and no remote builders.
pub fn no_build_slots(minor: u8) -> String {
    if minor >= NEWER {
        let pad = " ".repeat(20);
        plain(&format!(
            "\n{pad}Unable to start any build;\n{pad}either increase '--max-jobs' or enable \
             remote builds.\n\n{pad}For more information run 'man nix.conf' and search for \
             '/machines'.\n{}",
            " ".repeat(16)
        ))
    } else {
        plain(
            "unable to start any build; either increase '--max-jobs' or enable remote builds.\n\
             https://nixos.org/manual/nix/stable/advanced-topics/distributed-builds.html",
        )
    }
}

/// Several targets failed: `paths` are the failed targets' store paths, sorted.
pub fn build_of_failed(paths: &[String]) -> String {
    let quoted: Vec<String> = paths.iter().map(|p| format!("'{p}'")).collect();
    format!("build of {} failed", hl(quoted.join(", ")))
}

/// A BuildResult's `errorMsg`: Nix prints the error's message behind a colour reset.
pub fn result_message(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        plain(message)
    }
}

/// A log line of Nix's logError, as nix-daemon sends it (`STDERR_NEXT`, no newline).
pub fn logged_error(message: &str) -> String {
    format!(
        "\x1b[31;1merror:\x1b[0m {}",
        message.trim_end_matches('\n').replace('\n', "\n       ")
    )
}
