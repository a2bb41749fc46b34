//! Command lines: `stockade daemon …`, and `nix-daemon …` when the binary is called by that
//! name (a symlink), so that it can replace nix-daemon in unit files and scripts unchanged.

use std::ffi::OsString;
use std::path::Path;

use clap::{ArgAction, Args, Parser, Subcommand};
use stockade_common::lockdown::SeccompMode;
use stockade_policy::TrustOverride;

/// Nix's verbosity levels (`lvlError` … `lvlVomit`); the default is `lvlInfo`.
pub const LVL_INFO: u32 = 3;
/// `lvlDebug`, what `--debug` selects.
pub const LVL_DEBUG: u32 = 6;
/// `lvlVomit`, the most verbose level.
pub const LVL_VOMIT: u32 = 7;

#[derive(Parser, Debug)]
#[command(
    name = "stockade",
    version,
    about = "Privilege-separated Nix store daemon",
    long_about = "Privilege-separated Nix store daemon, a drop-in replacement for nix-daemon.\n\
                  Called as `nix-daemon`, it accepts nix-daemon's command line."
)]
struct StockadeCli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the store daemon in the foreground.
    Daemon(DaemonArgs),
}

/// `nix-daemon`'s own command line (Nix 2.8, plus the trust flags of Nix ≥ 2.16).
#[derive(Parser, Debug)]
#[command(
    name = "nix-daemon",
    about = "Nix store daemon (Stockade)",
    disable_version_flag = true
)]
struct NixDaemonCli {
    /// Accepted for compatibility; the daemon always runs in the foreground.
    #[arg(long)]
    daemon: bool,
    /// Print the version and exit.
    #[arg(long)]
    version: bool,
    #[command(flatten)]
    args: DaemonArgs,
}

/// The daemon's flags, shared by both command lines.
#[derive(Args, Debug, Clone, Default)]
pub struct DaemonArgs {
    /// Serve one client on standard input/output instead of listening on the socket.
    #[arg(long)]
    pub stdio: bool,
    /// Trust the client(s) whatever trusted-users says (admission still applies).
    #[arg(long, conflicts_with_all = ["force_untrusted", "default_trust"])]
    pub force_trusted: bool,
    /// Do not trust the client(s) whatever trusted-users says.
    #[arg(long, conflicts_with_all = ["force_trusted", "default_trust"])]
    pub force_untrusted: bool,
    /// Decide trust from trusted-users (the default).
    #[arg(long)]
    pub default_trust: bool,
    /// Override a nix.conf or stockade.conf setting.
    #[arg(long = "option", num_args = 2, value_names = ["NAME", "VALUE"], action = ArgAction::Append)]
    pub option: Vec<String>,
    /// Log more (repeatable).
    #[arg(short = 'v', long = "verbose", action = ArgAction::Count)]
    pub verbose: u8,
    /// Log less (repeatable).
    #[arg(long, action = ArgAction::Count)]
    pub quiet: u8,
    /// Log at debug level.
    #[arg(long)]
    pub debug: bool,
    /// Debugging only: the store-writer's and brokers' seccomp allow-lists log calls outside
    /// them (kernel log) instead of refusing them. Audited as `seccomp=log`.
    #[arg(long)]
    pub debug_seccomp_log: bool,
}

impl DaemonArgs {
    /// The command-line trust override.
    pub fn trust_override(&self) -> TrustOverride {
        if self.force_trusted {
            TrustOverride::ForceTrusted
        } else if self.force_untrusted {
            TrustOverride::ForceUntrusted
        } else {
            TrustOverride::Default
        }
    }

    /// The services' seccomp mode: only this flag turns the allow-lists into logging (A76).
    pub fn seccomp_mode(&self) -> SeccompMode {
        if self.debug_seccomp_log {
            SeccompMode::Log
        } else {
            SeccompMode::Enforce
        }
    }

    /// `--option NAME VALUE` pairs in order.
    pub fn options(&self) -> Vec<(String, String)> {
        self.option
            .chunks_exact(2)
            .filter_map(|pair| match pair {
                [name, value] => Some((name.clone(), value.clone())),
                _ => None,
            })
            .collect()
    }

    /// Nix verbosity: `lvlInfo`, plus one per `-v`, minus one per `--quiet`, at least
    /// `lvlDebug` with `--debug`.
    pub fn verbosity(&self) -> u32 {
        let v = (LVL_INFO + u32::from(self.verbose)).saturating_sub(u32::from(self.quiet));
        let v = if self.debug { v.max(LVL_DEBUG) } else { v };
        v.min(LVL_VOMIT)
    }
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Invocation {
    Daemon(DaemonArgs),
    /// Print this and exit 0 (`nix-daemon --version`).
    Print(String),
}

/// Whether `argv0` calls for nix-daemon's command line.
pub fn is_nix_daemon_name(argv0: &OsString) -> bool {
    Path::new(argv0)
        .file_name()
        .is_some_and(|n| n == "nix-daemon")
}

/// Parse the process's command line, exiting with clap's message on errors, `--help` and
/// `stockade --version`.
pub fn parse() -> Invocation {
    let argv: Vec<OsString> = std::env::args_os().collect();
    parse_from(argv).unwrap_or_else(|e| e.exit())
}

/// Parse `argv` (including argv[0]).
pub fn parse_from(argv: Vec<OsString>) -> Result<Invocation, clap::Error> {
    let nix_daemon = argv.first().is_some_and(is_nix_daemon_name);
    if nix_daemon {
        let cli = NixDaemonCli::try_parse_from(argv)?;
        if cli.version {
            return Ok(Invocation::Print(format!(
                "nix-daemon (Stockade) {}",
                env!("CARGO_PKG_VERSION")
            )));
        }
        return Ok(Invocation::Daemon(cli.args));
    }
    let cli = StockadeCli::try_parse_from(argv)?;
    match cli.command {
        Command::Daemon(args) => Ok(Invocation::Daemon(args)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Invocation, clap::Error> {
        parse_from(args.iter().map(OsString::from).collect())
    }

    fn daemon(args: &[&str]) -> DaemonArgs {
        match parse(args) {
            Ok(Invocation::Daemon(a)) => a,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    #[test]
    fn stockade_daemon_flags() {
        let a = daemon(&[
            "stockade",
            "daemon",
            "--stdio",
            "--force-untrusted",
            "--option",
            "max-jobs",
            "4",
            "--option",
            "substituters",
            "",
            "-vv",
            "--quiet",
        ]);
        assert!(a.stdio);
        assert_eq!(a.trust_override(), TrustOverride::ForceUntrusted);
        assert_eq!(
            a.options(),
            vec![
                ("max-jobs".to_string(), "4".to_string()),
                ("substituters".to_string(), String::new())
            ]
        );
        assert_eq!(a.verbosity(), LVL_INFO + 1);
        assert_eq!(
            daemon(&["stockade", "daemon", "--debug"]).verbosity(),
            LVL_DEBUG
        );
        assert_eq!(a.seccomp_mode(), SeccompMode::Enforce);
        assert_eq!(
            daemon(&["stockade", "daemon", "--stdio", "--debug-seccomp-log"]).seccomp_mode(),
            SeccompMode::Log
        );
        assert_eq!(
            daemon(&["nix-daemon", "--debug-seccomp-log"]).seccomp_mode(),
            SeccompMode::Log
        );
        assert_eq!(
            daemon(&["stockade", "daemon"]).trust_override(),
            TrustOverride::Default
        );
        assert_eq!(
            daemon(&["stockade", "daemon", "--force-trusted"]).trust_override(),
            TrustOverride::ForceTrusted
        );
        assert_eq!(
            daemon(&["x/stockade", "daemon", "-vvvvvvvvvv"]).verbosity(),
            LVL_VOMIT
        );
        assert_eq!(
            daemon(&["stockade", "daemon", "--quiet", "--quiet", "--quiet", "--quiet"]).verbosity(),
            0
        );
    }

    #[test]
    fn conflicting_and_unknown_flags_are_errors() {
        assert!(parse(&["stockade", "daemon", "--force-trusted", "--force-untrusted"]).is_err());
        assert!(parse(&["stockade", "daemon", "--default-trust", "--force-untrusted"]).is_err());
        assert!(parse(&["stockade", "daemon", "--option", "x"]).is_err());
        assert!(parse(&["stockade", "daemon", "--bogus"]).is_err());
        assert!(parse(&["stockade"]).is_err());
        // `--daemon` belongs to nix-daemon's command line only.
        assert!(parse(&["stockade", "daemon", "--daemon"]).is_err());
    }

    #[test]
    fn nix_daemon_name() {
        let a = daemon(&["/usr/bin/nix-daemon", "--daemon", "--option", "a", "b"]);
        assert!(!a.stdio);
        assert_eq!(a.options(), vec![("a".to_string(), "b".to_string())]);
        assert!(daemon(&["nix-daemon", "--stdio"]).stdio);
        assert!(daemon(&["nix-daemon"]).option.is_empty());
        match parse(&["nix-daemon", "--version"]) {
            Ok(Invocation::Print(s)) => assert!(s.starts_with("nix-daemon (Stockade) ")),
            other => panic!("{other:?}"),
        }
        // Not a subcommand there.
        assert!(parse(&["nix-daemon", "daemon"]).is_err());
        assert!(!is_nix_daemon_name(&OsString::from("nix-daemon-x")));
    }
}
