//! The newer Nix (2.26, worker protocol 1.38) that `scripts/newer-nix.sh` installs beside the
//! system's Nix 2.8: its nix-daemon is the reference for newer clients, its clients run against
//! either daemon.
//!
//! Where it lives: `$STOCKADE_NEWER_NIX`, else [`DEFAULT_NEWER_NIX_PREFIX`]; the wrappers
//! (`nix`, `nix-store`, `nix-daemon`, ...) are in its `bin`.

use std::path::PathBuf;

/// Where `scripts/newer-nix.sh` installs the newer Nix unless `STOCKADE_NEWER_NIX` says
/// otherwise.
pub const DEFAULT_NEWER_NIX_PREFIX: &str = "/opt/stockade-newer-nix";

/// The series the tests expect (the version nix-daemon 2.26 announces starts with it).
pub const NEWER_NIX_SERIES: &str = "2.26.";

/// The installation prefix (whether or not anything is installed there).
pub fn newer_nix_prefix() -> PathBuf {
    std::env::var_os("STOCKADE_NEWER_NIX")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_NEWER_NIX_PREFIX))
}

/// The directory holding the newer Nix's programs, or why it is not usable.
pub fn newer_nix_bin() -> Result<PathBuf, String> {
    let prefix = newer_nix_prefix();
    let bin = prefix.join("bin");
    for p in ["nix", "nix-store", "nix-daemon"] {
        let f = bin.join(p);
        if !f.is_file() {
            return Err(format!(
                "the newer Nix is not installed: {} is missing (run scripts/newer-nix.sh {}, \
                 or scripts/deps.sh)",
                f.display(),
                prefix.display()
            ));
        }
    }
    Ok(bin)
}

/// One of the newer Nix's programs (e.g. `nix-store`), or why it is not usable.
pub fn newer_nix_program(name: &str) -> Result<PathBuf, String> {
    Ok(newer_nix_bin()?.join(name))
}

/// PATH for a client of the newer Nix: its `bin` first, then the system directories.
pub fn newer_nix_path() -> Result<String, String> {
    Ok(format!(
        "{}:{}",
        newer_nix_bin()?.display(),
        crate::SYSTEM_PATH
    ))
}

/// True if a test that needs root and the newer Nix can run here. When it cannot: panics if
/// `CI` is set (CI must never silently skip), otherwise prints why the test `name` is skipped
/// and returns false.
pub fn newer_nix_or_skip(name: &str) -> bool {
    if !crate::root_or_skip(name) {
        return false;
    }
    let reason = match newer_nix_bin() {
        Ok(_) => return true,
        Err(e) => e,
    };
    let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
    assert!(!ci, "{name}: {reason}; CI is set, so not skipping");
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("SKIPPED {name}: {reason}\n").as_bytes(),
    );
    false
}

/// Returns from the enclosing test unless it can run as root with the newer Nix installed
/// (see [`newer_nix_or_skip`]).
#[macro_export]
macro_rules! skip_unless_newer_nix {
    () => {{
        fn __here() {}
        fn __name_of<T>(_: T) -> &'static str {
            ::std::any::type_name::<T>()
        }
        let name = __name_of(__here);
        if !$crate::newer_nix_or_skip(name.strip_suffix("::__here").unwrap_or(name)) {
            return;
        }
    }};
}
