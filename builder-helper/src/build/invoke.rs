//! What is exec'd for a derivation: its own builder with its arguments, or for
//! `builtin:fetchurl` and `builtin:unpack-channel` the helper's own binary (`--builtin NAME`),
//! which then runs where a builder runs: in the sandbox as the build user (Nix runs its
//! builtins in the sandboxed child too), or on the host for an unsandboxed build. Never in
//! the helper itself: a download or a tarball is hostile input, and the helper holds
//! capabilities.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

use stockade_common::derivation::Derivation;
use stockade_common::store_path::StorePath;

use super::{env, BuildConfig, BuildErrorKind};
use crate::sandbox::self_image::self_image;
use crate::sandbox::spec::CA_BUNDLE;
use crate::sandbox::SandboxPath;

/// The builtin builders the helper runs by exec'ing itself; `builtin:buildenv` runs in the
/// helper (it only reads the store).
pub const EXEC_BUILTINS: &[&[u8]] = &[b"builtin:fetchurl", b"builtin:unpack-channel"];

/// The program, its arguments (without `argv[0]`), and what a sandbox must show besides the
/// input closure for it to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub binds: Vec<SandboxPath>,
    /// Set in the program's environment after the derivation's.
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
}

/// The invocation of `drv`'s builder; `sandboxed` says whether it runs in the sandbox (where
/// the CA bundle is at [`CA_BUNDLE`]) or on the host.
pub fn invocation(
    cfg: &BuildConfig,
    drv: &Derivation,
    outputs: &BTreeMap<String, StorePath>,
    sandboxed: bool,
    shown: &str,
) -> Result<Invocation, BuildErrorKind> {
    if let Some(name) = EXEC_BUILTINS
        .iter()
        .find(|b| **b == drv.builder.as_slice())
        .and_then(|b| b.strip_prefix(b"builtin:"))
    {
        return builtin(cfg, &String::from_utf8_lossy(name), sandboxed, shown);
    }
    let program = PathBuf::from(OsString::from_vec(drv.builder.clone()));
    if !program.is_absolute() {
        return Err(BuildErrorKind::Builder {
            drv: shown.to_string(),
            builder: program.display().to_string(),
        });
    }
    let rewrites = env::output_rewrites(
        outputs
            .iter()
            .map(|(name, path)| (name.as_str(), cfg.store_dir.display(path))),
    );
    let args = drv
        .args
        .iter()
        .map(|a| OsString::from_vec(env::rewrite(a, &rewrites)))
        .collect();
    Ok(Invocation {
        program,
        args,
        binds: Vec::new(),
        env: Vec::new(),
    })
}

/// The helper exec'd as builtin `name` (`stockade-builder-helper --builtin NAME …`).
fn builtin(
    cfg: &BuildConfig,
    name: &str,
    sandboxed: bool,
    shown: &str,
) -> Result<Invocation, BuildErrorKind> {
    let image = self_image().map_err(|message| BuildErrorKind::Builtin {
        drv: shown.to_string(),
        message,
    })?;
    let mut args: Vec<OsString> = vec!["--builtin".into(), name.into()];
    if name == "fetchurl" {
        let ca_file = if sandboxed {
            cfg.ssl_cert_file.as_ref().map(|_| PathBuf::from(CA_BUNDLE))
        } else {
            cfg.ssl_cert_file.clone()
        };
        if let Some(ca) = ca_file {
            args.push("--ca-file".into());
            args.push(ca.into_os_string());
        }
        for mirror in &cfg.hashed_mirrors {
            args.push("--hashed-mirror".into());
            args.push(mirror.into());
        }
    }
    let (binds, env) = if sandboxed {
        let binds = image
            .files()
            .into_iter()
            .map(|(target, source)| SandboxPath {
                target,
                source,
                optional: false,
            })
            .collect();
        let ld_path = image.library_path().into_vec();
        (binds, vec![(b"LD_LIBRARY_PATH".to_vec(), ld_path)])
    } else {
        (Vec::new(), Vec::new())
    };
    Ok(Invocation {
        program: image.exe.clone(),
        args,
        binds,
        env,
    })
}
