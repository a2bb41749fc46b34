//! Prints `sha256:<base16> <nar size>` of the NAR serialisation of a path (like
//! `nix-hash --type sha256 PATH`, plus the size). Used by `bench/nar-hash.sh`.
//!
//! Usage: `cargo run --release -p stockade-common --example nar_hash -- PATH`

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(path), None) = (args.next(), args.next()) else {
        eprintln!("usage: nar_hash PATH");
        return ExitCode::from(2);
    };
    match stockade_common::nar::dump_and_hash(&PathBuf::from(path)) {
        Ok((hash, size)) => {
            println!("sha256:{} {size}", hash.to_base16());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
