//! `nix.conf` and the settings the daemon honours, as Nix 2.8 reads them.
//!
//! - [`parse`] is the syntax (pure; included files come from a [`FileSource`]).
//! - [`Settings`] holds every setting Nix 2.8 knows, typed, with 2.8's defaults
//!   ([`HostFacts`] supplies the machine-dependent ones); [`Settings::set`] is `--option` and
//!   SetOptions; [`Settings::show_config`] prints `nix show-config`'s format.
//! - [`StockadeSettings`] is `stockade.conf`, Stockade's own settings in the same syntax.
//!
//! ```
//! use stockade_common::conf::{HostFacts, MemorySource, Settings};
//!
//! let mut s = Settings::defaults(&HostFacts::generic(), "/etc/nix");
//! let text = b"trusted-users = root @wheel # admins\nextra-substituters = https://x/\n";
//! s.apply_text(text, "/etc/nix/nix.conf", &mut MemorySource::default())?;
//! assert_eq!(s.trusted_users, ["root", "@wheel"]);
//! assert_eq!(s.substituters, ["https://cache.nixos.org/", "https://x/"]);
//!
//! let warnings = s.set("build-timeout", "60")?; // a deprecated alias of `timeout`
//! assert_eq!((s.timeout, warnings.len()), (60, 1));
//! assert!(s.set("cores", "many").is_err());
//! assert!(s.show_config().contains("\ntimeout = 60\n"));
//! # Ok::<(), stockade_common::conf::ConfError>(())
//! ```
//!
//! What the daemon reads, and where it differs from `nix-daemon` 2.8:
//! - Only `$NIX_CONF_DIR/nix.conf` (default `/etc/nix`) and what it includes; a missing file
//!   means defaults. nix-daemon also reads its own user's config files
//!   (`$XDG_CONFIG_HOME/nix/nix.conf`, `NIX_USER_CONF_FILES`) and `NIX_CONFIG`: those are client
//!   mechanisms, and a daemon's policy should live in one place, so Stockade ignores them.
//! - Files that exist but cannot be read (directories, FIFOs, permission denied) are errors;
//!   Nix silently skips them, which for a daemon could mean running with a looser
//!   `allowed-users` than the administrator wrote.
//! - Include depth, file size, total size and file count are bounded ([`parse`]'s constants).
//! - Non-UTF-8 text outside comments is an error.
//! - Deprecated aliases give a warning; Nix accepts them silently.
//! - Environment-dependent defaults Stockade does not follow: `nix-path` (empty),
//!   `NIX_REMOTE_SYSTEMS` for `builders`, `NIX_IGNORE_SYMLINK_STORE` for
//!   `allow-symlinked-store`.
//!
//! Values parse exactly as in 2.8: booleans take `true`/`yes`/`1` and `false`/`no`/`0`;
//! integers are plain decimal with an optional sign and no unit suffix (2.8 has `K`/`M`/`G`/`T`
//! only on some command-line flags, not in settings); lists are split at blanks; `sandbox`
//! takes `true`/`false`/`relaxed`; `max-jobs` takes `auto`.

pub mod error;
mod host;
pub mod parse;
pub(crate) mod schema;
mod settings;
mod stockade;
pub(crate) mod value;

use std::path::{Path, PathBuf};

pub use error::{ConfError, ErrorKind, Location, ValueError, Warning, WarningKind};
pub use host::HostFacts;
pub use parse::{Entry, FileSource, Filesystem, MemorySource};
pub use schema::{Resolved, SettingDef};
pub use settings::{Settings, CACHE_NIXOS_ORG_KEY};
pub(crate) use stockade::parse_size;
pub use stockade::{AutoCount, AutoSize, ByteSize, StockadeSettings};
pub use value::{AccessTokens, ExperimentalFeature, MaxJobs, OptionalPath, SandboxMode, UidRange};

/// Where configuration lives when `NIX_CONF_DIR` is not set.
pub const DEFAULT_CONF_DIR: &str = "/etc/nix";

/// Settings loaded from a file, with what was worth a warning.
#[derive(Clone, Debug, PartialEq)]
pub struct Loaded<T> {
    pub settings: T,
    pub warnings: Vec<Warning>,
    /// Whether the file existed (else `settings` are the defaults).
    pub found: bool,
}

/// `$NIX_CONF_DIR`, or [`DEFAULT_CONF_DIR`].
pub fn conf_dir_from_env() -> PathBuf {
    std::env::var_os("NIX_CONF_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONF_DIR))
}

/// The canonical form of an absolute configuration directory.
fn conf_dir_str(conf_dir: &Path) -> Result<String, ConfError> {
    let s = conf_dir.to_str().ok_or_else(|| {
        ConfError::bare(ErrorKind::NotAbsolute(conf_dir.to_string_lossy().into()))
    })?;
    parse::canon_path(s).ok_or_else(|| ConfError::bare(ErrorKind::NotAbsolute(s.into())))
}

fn file_in(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

impl Settings {
    /// Read `CONF_DIR/nix.conf` (and its includes) from disk over this machine's defaults.
    pub fn load(conf_dir: &Path) -> Result<Loaded<Settings>, ConfError> {
        Self::load_with(conf_dir, HostFacts::detect(), &mut Filesystem)
    }

    /// [`Settings::load`] with given machine facts and file source.
    pub fn load_with(
        conf_dir: &Path,
        host: HostFacts,
        source: &mut dyn FileSource,
    ) -> Result<Loaded<Settings>, ConfError> {
        let dir = conf_dir_str(conf_dir)?;
        let mut settings = Settings::defaults(&host, &dir);
        let warnings = settings.apply_file(&file_in(&dir, "nix.conf"), source)?;
        Ok(Loaded {
            settings,
            found: warnings.is_some(),
            warnings: warnings.unwrap_or_default(),
        })
    }

    /// [`StockadeSettings::load`]: `CONF_DIR/stockade.conf`.
    pub fn load_stockade(conf_dir: &Path) -> Result<Loaded<StockadeSettings>, ConfError> {
        StockadeSettings::load(conf_dir)
    }
}

impl StockadeSettings {
    /// Read `CONF_DIR/stockade.conf` (and its includes) over the defaults; missing = defaults.
    pub fn load(conf_dir: &Path) -> Result<Loaded<StockadeSettings>, ConfError> {
        Self::load_with(conf_dir, &mut Filesystem)
    }

    /// [`StockadeSettings::load`] with a given file source.
    pub fn load_with(
        conf_dir: &Path,
        source: &mut dyn FileSource,
    ) -> Result<Loaded<StockadeSettings>, ConfError> {
        let dir = conf_dir_str(conf_dir)?;
        let mut settings = StockadeSettings::defaults();
        let warnings = settings.apply_file(&file_in(&dir, "stockade.conf"), source)?;
        Ok(Loaded {
            settings,
            found: warnings.is_some(),
            warnings: warnings.unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests;
