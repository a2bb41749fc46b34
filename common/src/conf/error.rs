//! Errors and warnings of configuration parsing.

use std::fmt;

/// Where a configuration line came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    /// The file as it was named (absolute path for files, any label for in-memory text).
    pub file: String,
    /// 1-based line number.
    pub line: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// A value that a setting cannot take. The texts start with Nix 2.8's own messages so people
/// searching for them find the same answers; some add what was expected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("setting '{name}' has invalid value '{value}'")]
    InvalidInteger { name: &'static str, value: String },
    #[error("Boolean setting '{name}' has invalid value '{value}' (expected true or false)")]
    InvalidBool { name: &'static str, value: String },
    #[error("option '{name}' has invalid value '{value}' (expected true, false or relaxed)")]
    InvalidSandbox { name: &'static str, value: String },
    #[error("configuration setting '{name}' should be 'auto' or an integer, not '{value}'")]
    InvalidMaxJobs { name: &'static str, value: String },
    #[error("not an absolute path: '{value}' (setting '{name}')")]
    NotAbsolute { name: &'static str, value: String },
    #[error("setting '{name}' has invalid value '{value}': {reason}")]
    Invalid {
        name: &'static str,
        value: String,
        reason: &'static str,
    },
}

/// What went wrong, without the location.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ErrorKind {
    /// Not `NAME = VALUE`, `include PATH` or `!include PATH`. Holds the line without its comment.
    #[error("illegal configuration line '{0}'")]
    IllegalLine(String),
    /// Stockade reads configuration as UTF-8 (Nix takes any bytes); comments may hold anything.
    #[error("configuration line is not valid UTF-8")]
    NotUtf8,
    #[error("file '{path}' included from '{from}' not found")]
    IncludeNotFound { path: String, from: String },
    /// The file exists but could not be read (a directory, a FIFO, permission denied, I/O
    /// error). Nix silently skips such files; a daemon must not run on half its configuration.
    #[error("cannot read configuration file '{path}': {reason}")]
    Read { path: String, reason: String },
    #[error("configuration file '{path}' is larger than {limit} bytes")]
    FileTooLarge { path: String, limit: usize },
    #[error("configuration files together are larger than {limit} bytes (include loop?)")]
    TotalTooLarge { limit: usize },
    #[error("more than {limit} configuration files read (include loop?)")]
    TooManyFiles { limit: usize },
    #[error("includes nested deeper than {limit} levels at '{path}' (include loop?)")]
    TooDeep { path: String, limit: usize },
    #[error("not an absolute path: '{0}'")]
    NotAbsolute(String),
    #[error(transparent)]
    Value(#[from] ValueError),
}

/// A configuration error, with the file and line when it came from a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfError {
    pub location: Option<Location>,
    pub kind: ErrorKind,
}

impl ConfError {
    pub(crate) fn at(location: &Location, kind: impl Into<ErrorKind>) -> Self {
        ConfError {
            location: Some(location.clone()),
            kind: kind.into(),
        }
    }

    pub(crate) fn bare(kind: impl Into<ErrorKind>) -> Self {
        ConfError {
            location: None,
            kind: kind.into(),
        }
    }
}

impl fmt::Display for ConfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.location {
            Some(loc) => write!(f, "{loc}: {}", self.kind),
            None => write!(f, "{}", self.kind),
        }
    }
}

impl std::error::Error for ConfError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.kind)
    }
}

impl From<ValueError> for ConfError {
    fn from(e: ValueError) -> Self {
        ConfError::bare(e)
    }
}

/// Something worth telling the administrator that does not stop loading.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WarningKind {
    /// Nix's `unknown setting 'NAME'` (also for `extra-NAME` when NAME is not a list setting).
    UnknownSetting(String),
    /// An old name from the nix.conf manual's "Deprecated alias" lists. Nix 2.8 accepts these
    /// silently; Stockade says so once per use.
    DeprecatedAlias {
        alias: String,
        canonical: &'static str,
    },
    /// Nix's `unknown experimental feature 'NAME'`; the name is dropped.
    UnknownExperimentalFeature(String),
    /// A `key=value` map setting (`access-tokens`) had a word without `=`, which Nix ignores.
    /// The word itself is not repeated: it may be a secret.
    MapEntryWithoutEquals { setting: &'static str },
}

impl fmt::Display for WarningKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WarningKind::UnknownSetting(name) => write!(f, "unknown setting '{name}'"),
            WarningKind::DeprecatedAlias { alias, canonical } => {
                write!(f, "'{alias}' is a deprecated alias of '{canonical}'")
            }
            WarningKind::UnknownExperimentalFeature(name) => {
                write!(f, "unknown experimental feature '{name}'")
            }
            WarningKind::MapEntryWithoutEquals { setting } => {
                write!(f, "ignoring an entry of '{setting}' without '='")
            }
        }
    }
}

/// A warning with the place it came from (none for `--option` / SetOptions).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    pub location: Option<Location>,
    pub kind: WarningKind,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.location {
            Some(loc) => write!(f, "{loc}: {}", self.kind),
            None => write!(f, "{}", self.kind),
        }
    }
}
