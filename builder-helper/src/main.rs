//! `stockade-builder-helper`: sandbox construction and build supervision. Started by the
//! master with its control channel as a descriptor (`--control-fd 3`), never by hand.

use std::os::fd::RawFd;

use clap::Parser;
use stockade_common::ipc::Channel;

#[derive(Parser, Debug)]
#[command(name = "stockade-builder-helper", version)]
struct Args {
    /// File descriptor of the control channel the master hands over.
    #[arg(long)]
    control_fd: RawFd,
}

/// `--builtin NAME ARGS…`: the helper exec'd as a builtin builder, in the sandbox (or on
/// the host for an unsandboxed build), as the build user. It never serves a control channel.
fn run_builtin(args: &[std::ffi::OsString]) -> i32 {
    match args.split_first() {
        Some((name, rest)) if name == "fetchurl" => {
            stockade_builder_helper::builtin::fetchurl::main(rest)
        }
        Some((name, rest)) if name == "unpack-channel" => {
            stockade_builder_helper::builtin::unpack_channel::main(rest)
        }
        Some((name, _)) => {
            eprintln!(
                "error: unsupported builtin builder '{}'",
                name.to_string_lossy()
            );
            1
        }
        None => {
            eprintln!("error: --builtin needs the builtin's name");
            1
        }
    }
}

fn main() {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == "--builtin") {
        std::process::exit(run_builtin(&argv[2..]));
    }
    stockade_common::child::init_logging("stockade-builder-helper");
    let args = Args::parse();
    let Some(fd) = stockade_common::child::inherited_fd(args.control_fd) else {
        eprintln!(
            "stockade-builder-helper: descriptor {} is not an open control channel",
            args.control_fd
        );
        std::process::exit(1);
    };
    let control = match Channel::from_fd(fd) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stockade-builder-helper: control channel: {e}");
            std::process::exit(1);
        }
    };
    std::process::exit(stockade_builder_helper::service::serve(control));
}
