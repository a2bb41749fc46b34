//! Nix's `builtin:` builders that run as a process of their own inside the build sandbox: the
//! builder-helper execs its own binary as `stockade-builder-helper --builtin NAME ...` with the
//! derivation's environment, and the builder's code lives here.
//!
//! - [`fetchurl`]: `builtin:fetchurl`, the downloader of `import <nix/fetchurl.nix>`.
//! - [`unpack_channel`]: `builtin:unpack-channel`, what `nix-channel --update` builds to unpack
//!   a channel tarball.

pub mod fetchurl;
mod transfer;
pub mod unpack_channel;

use std::collections::BTreeMap;
use std::io::Write;

/// What a builtin's `main` does around its work: reads the derivation's environment from the
/// process (variables that are not UTF-8 cannot be ones a builtin reads), runs `work` on it,
/// and turns a failure into `error: MESSAGE` on stderr. Returns the exit code.
fn run_main<E: std::fmt::Display>(
    work: impl FnOnce(&BTreeMap<String, String>) -> Result<(), E>,
) -> i32 {
    let env: BTreeMap<String, String> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    match work(&env) {
        Ok(()) => 0,
        Err(e) => {
            // Nothing better to do when stderr is gone: the exit code still says it failed.
            let _ = writeln!(std::io::stderr(), "error: {e}");
            1
        }
    }
}
