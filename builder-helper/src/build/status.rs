//! Nix's words for how a builder ended.

use crate::sandbox::BuildExit;

/// Nix's `statusToString` for a builder that did not succeed.
pub fn status_to_string(exit: BuildExit) -> String {
    match exit {
        BuildExit::Exited(0) => "succeeded".to_string(),
        BuildExit::Exited(n) => format!("failed with exit code {n}"),
        BuildExit::Signaled(sig) => {
            format!(
                "failed due to signal {} ({})",
                sig as i32,
                signal_description(sig)
            )
        }
    }
}

/// glibc's `strsignal` text for the signals a builder can die of.
fn signal_description(sig: nix::sys::signal::Signal) -> String {
    use nix::sys::signal::Signal::*;
    match sig {
        SIGHUP => "Hangup",
        SIGINT => "Interrupt",
        SIGQUIT => "Quit",
        SIGILL => "Illegal instruction",
        SIGTRAP => "Trace/breakpoint trap",
        SIGABRT => "Aborted",
        SIGBUS => "Bus error",
        SIGFPE => "Floating point exception",
        SIGKILL => "Killed",
        SIGUSR1 => "User defined signal 1",
        SIGSEGV => "Segmentation fault",
        SIGUSR2 => "User defined signal 2",
        SIGPIPE => "Broken pipe",
        SIGALRM => "Alarm clock",
        SIGTERM => "Terminated",
        SIGXCPU => "CPU time limit exceeded",
        SIGXFSZ => "File size limit exceeded",
        SIGSYS => "Bad system call",
        other => return format!("Unknown signal {}", other as i32),
    }
    .to_string()
}
