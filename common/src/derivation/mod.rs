//! Derivations: the `.drv` ATerm (parse and print, byte-identical to Nix 2.8), the
//! `hashDerivationModulo` hash and the output paths derived from it, the `.drv` store path,
//! DrvOutput ids and Realisation JSON, and the BasicDerivation wire form.
//!
//! The parser accepts exactly what Nix's printer produces: canonical escapes, strictly sorted
//! maps and sets, lowercase base16 fixed-output hashes, fixed-output paths that match their
//! hash, no trailing bytes. Nix's own parser is laxer (it ignores order, lets duplicates
//! overwrite each other, accepts any escape), but for every input we accept,
//! `to_aterm(parse(x)) == x`, which rules out two readers disagreeing about one file.

mod aterm;
mod hash_modulo;
mod realisation;
mod wire;

use std::collections::{BTreeMap, BTreeSet};

use thiserror::Error;

use crate::hash::{Hash, HashAlgo, HashError};
use crate::store_path::{
    check_name, output_path_name, FileIngestion, StoreDir, StorePath, StorePathError,
};

pub use hash_modulo::{hash_derivation_modulo, DrvHash, DrvHashCache, DrvHashKind};
pub use realisation::{DrvOutput, Realisation, RealisationError};
pub use wire::{read_basic_derivation, write_basic_derivation};

/// Extension of derivation store paths.
pub const DRV_EXTENSION: &str = ".drv";

/// Bounds on what the parsers accept; the defaults are far above anything Nix produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrvLimits {
    /// Total bytes of the ATerm or of the wire form.
    pub max_size: usize,
    /// Bytes of one (unescaped) string.
    pub max_string: usize,
    pub max_outputs: usize,
    pub max_input_drvs: usize,
    pub max_input_srcs: usize,
    pub max_args: usize,
    pub max_env: usize,
}

impl Default for DrvLimits {
    fn default() -> Self {
        DrvLimits {
            max_size: 64 << 20,
            max_string: 64 << 20,
            max_outputs: 1024,
            max_input_drvs: 1 << 16,
            max_input_srcs: 1 << 16,
            max_args: 1 << 16,
            max_env: 1 << 16,
        }
    }
}

#[derive(Debug, Error)]
pub enum DrvError {
    #[error("derivation is larger than the limit of {limit} bytes")]
    TooLarge { limit: usize },
    #[error("at byte {offset}: expected {expected}")]
    Expected {
        offset: usize,
        expected: &'static str,
    },
    #[error("at byte {offset}: unterminated string")]
    UnterminatedString { offset: usize },
    #[error("at byte {offset}: string longer than {limit} bytes")]
    StringTooLong { offset: usize, limit: usize },
    #[error("at byte {offset}: escape or control character Nix does not write")]
    NonCanonicalString { offset: usize },
    #[error("at byte {offset}: '\\' or '\"' in a field Nix writes without escaping")]
    BadRawField { offset: usize },
    #[error("at byte {offset}: more than {limit} {what}")]
    TooMany {
        offset: usize,
        what: &'static str,
        limit: usize,
    },
    #[error("at byte {offset}: {what} not in strictly increasing order")]
    NotSorted { offset: usize, what: &'static str },
    #[error("at byte {offset}: {source}")]
    BadPath {
        offset: usize,
        source: StorePathError,
    },
    #[error("at byte {offset}: input derivation '{path}' does not end in '.drv'")]
    NotADerivation { offset: usize, path: String },
    #[error("at byte {offset}: invalid output name '{name}'")]
    BadOutputName { offset: usize, name: String },
    #[error("at byte {offset}: unknown hash algorithm '{algo}'")]
    BadHashAlgo { offset: usize, algo: String },
    #[error("at byte {offset}: fixed-output hash is not lowercase base16 of its type: {source}")]
    BadHash { offset: usize, source: HashError },
    #[error("at byte {offset}: invalid output (path, algo, hash) combination: {reason}")]
    BadOutput { offset: usize, reason: &'static str },
    #[error("at byte {offset}: fixed output path '{found}', should be '{expected}'")]
    FixedOutputPath {
        offset: usize,
        found: String,
        expected: String,
    },
    #[error("at byte {offset}: trailing data after the derivation")]
    TrailingData { offset: usize },
    #[error("at byte {offset}: non-zero padding")]
    BadPadding { offset: usize },
    #[error("invalid derivation name '{name}': {source}")]
    BadName {
        name: String,
        source: StorePathError,
    },
    #[error("store path '{0}' is not a derivation")]
    NotADrvPath(String),
    #[error(transparent)]
    Path(#[from] StorePathError),
    #[error("derivation must have at least one output")]
    NoOutputs,
    #[error("only one fixed output is allowed for now")]
    MultipleFixedOutputs,
    #[error("single fixed output must be named \"out\"")]
    FixedOutputNotOut,
    #[error("all floating outputs must use the same hash type")]
    FloatingHashTypes,
    #[error("can't mix derivation output types")]
    MixedOutputTypes,
    #[error("no hash for output '{output}' of input derivation '{input}'")]
    MissingInputOutput { input: String, output: String },
    #[error("input derivations form a cycle through '{0}'")]
    Cycle(String),
    #[error("resolver returned derivation named '{found}' for '{path}'")]
    ResolvedWrongName { path: String, found: String },
    #[error("cannot read input derivation '{path}': {source}")]
    Input { path: String, source: Box<DrvError> },
    /// For resolvers: the caller's own failure to read a derivation from its store.
    #[error("cannot read derivation '{path}': {source}")]
    Resolve {
        path: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("derivation '{drv}' has incorrect output '{found}', should be '{expected}'")]
    IncorrectOutput {
        drv: String,
        found: String,
        expected: String,
    },
    #[error(
        "derivation '{drv}' has incorrect environment variable '{var}', should be '{expected}'"
    )]
    IncorrectEnv {
        drv: String,
        var: String,
        expected: String,
    },
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// One output of a derivation. The experimental kinds (floating CA, deferred, impure) are only
/// parsed and printed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DerivationOutput {
    /// The path is fixed by `hashDerivationModulo` of the derivation.
    InputAddressed(StorePath),
    /// Fixed-output: the path follows from the expected hash (and the derivation name).
    CAFixed { method: FileIngestion, hash: Hash },
    CAFloating {
        method: FileIngestion,
        algo: HashAlgo,
    },
    /// Input-addressed, path not known yet: the masked form `derivation {}` hashes, and the form
    /// of derivations depending on floating CA ones.
    Deferred,
    Impure {
        method: FileIngestion,
        algo: HashAlgo,
    },
}

impl DerivationOutput {
    /// The output path when it is known without building: input-addressed (as declared) and
    /// fixed-output (computed); `None` for the other kinds.
    pub fn path(
        &self,
        store_dir: &StoreDir,
        drv_name: &str,
        output: &str,
    ) -> Result<Option<StorePath>, StorePathError> {
        match self {
            DerivationOutput::InputAddressed(p) => Ok(Some(p.clone())),
            DerivationOutput::CAFixed { method, hash } => {
                fixed_output_path(store_dir, drv_name, output, *method, hash).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// The (path, hashAlgo, hash) fields as written in the ATerm and on the wire.
    fn fields(
        &self,
        store_dir: &StoreDir,
        drv_name: &str,
        output: &str,
        mask: bool,
    ) -> Result<(String, String, String), StorePathError> {
        let path = |p: &StorePath| {
            if mask {
                String::new()
            } else {
                store_dir.display(p)
            }
        };
        Ok(match self {
            DerivationOutput::InputAddressed(p) => (path(p), String::new(), String::new()),
            DerivationOutput::CAFixed { method, hash } => {
                let p = fixed_output_path(store_dir, drv_name, output, *method, hash)?;
                (
                    path(&p),
                    format!("{}{}", method.prefix(), hash.algo()),
                    hash.to_base16(),
                )
            }
            DerivationOutput::CAFloating { method, algo } => (
                String::new(),
                format!("{}{}", method.prefix(), algo),
                String::new(),
            ),
            DerivationOutput::Deferred => (String::new(), String::new(), String::new()),
            DerivationOutput::Impure { method, algo } => (
                String::new(),
                format!("{}{}", method.prefix(), algo),
                "impure".to_string(),
            ),
        })
    }

    /// Decodes the (path, hashAlgo, hash) fields of output `output`, as Nix's
    /// `parseDerivationOutput` does, but strictly: a hash without algorithm, a path on a
    /// floating or impure output, a non-canonical hash or a wrong fixed-output path are errors.
    /// `offset` is only used in errors.
    fn from_fields(
        store_dir: &StoreDir,
        drv_name: &str,
        output: &str,
        (path, algo, hash): (&[u8], &[u8], &[u8]),
        offset: usize,
    ) -> Result<DerivationOutput, DrvError> {
        let bad = |reason| DrvError::BadOutput { offset, reason };
        if algo.is_empty() {
            if !hash.is_empty() {
                return Err(bad("hash without an algorithm"));
            }
            if path.is_empty() {
                return Ok(DerivationOutput::Deferred);
            }
            return Ok(DerivationOutput::InputAddressed(parse_path(
                store_dir, path, offset,
            )?));
        }
        let (method, algo_name) = match algo.strip_prefix(b"r:") {
            Some(rest) => (FileIngestion::Recursive, rest),
            None => (FileIngestion::Flat, algo),
        };
        let algo = std::str::from_utf8(algo_name)
            .ok()
            .and_then(|a| a.parse::<HashAlgo>().ok())
            .ok_or_else(|| DrvError::BadHashAlgo {
                offset,
                algo: String::from_utf8_lossy(algo).into_owned(),
            })?;
        if hash == b"impure" {
            if !path.is_empty() {
                return Err(bad("impure output with a path"));
            }
            return Ok(DerivationOutput::Impure { method, algo });
        }
        if hash.is_empty() {
            if !path.is_empty() {
                return Err(bad("floating output with a path"));
            }
            return Ok(DerivationOutput::CAFloating { method, algo });
        }
        let hash =
            parse_base16(algo, hash).map_err(|source| DrvError::BadHash { offset, source })?;
        let expected = fixed_output_path(store_dir, drv_name, output, method, &hash)
            .map_err(|source| DrvError::BadPath { offset, source })?;
        let expected = store_dir.display(&expected);
        if path != expected.as_bytes() {
            return Err(DrvError::FixedOutputPath {
                offset,
                found: String::from_utf8_lossy(path).into_owned(),
                expected,
            });
        }
        Ok(DerivationOutput::CAFixed { method, hash })
    }
}

/// Only the form Nix prints: lowercase base16 of exactly the digest size.
fn parse_base16(algo: HashAlgo, s: &[u8]) -> Result<Hash, HashError> {
    let text = String::from_utf8_lossy(s);
    if s.len() != algo.base16_len() || !s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(HashError::BadBase16(text.into_owned()));
    }
    Hash::parse_digest(algo, &text)
}

fn fixed_output_path(
    store_dir: &StoreDir,
    drv_name: &str,
    output: &str,
    method: FileIngestion,
    hash: &Hash,
) -> Result<StorePath, StorePathError> {
    store_dir.make_fixed_output_path(
        &output_path_name(drv_name, output),
        method,
        hash,
        &BTreeSet::new(),
        false,
    )
}

fn parse_path(store_dir: &StoreDir, s: &[u8], offset: usize) -> Result<StorePath, DrvError> {
    let text = std::str::from_utf8(s).map_err(|_| DrvError::BadPath {
        offset,
        source: StorePathError::NotInStore(String::from_utf8_lossy(s).into_owned()),
    })?;
    store_dir
        .parse(text)
        .map_err(|source| DrvError::BadPath { offset, source })
}

/// Output names end up in store path names (`<drvName>-<output>`), so they must consist of
/// store path name characters.
fn parse_output_name(s: &[u8], offset: usize) -> Result<String, DrvError> {
    let bad = || DrvError::BadOutputName {
        offset,
        name: String::from_utf8_lossy(s).into_owned(),
    };
    let name = std::str::from_utf8(s).map_err(|_| bad())?;
    check_name(name, name).map_err(|_| bad())?;
    Ok(name.to_string())
}

/// `system` and the other fields Nix prints unescaped cannot hold `"` or `\` and still read
/// back the same.
fn check_raw_field(s: &[u8], offset: usize) -> Result<(), DrvError> {
    if s.iter().any(|c| matches!(c, b'"' | b'\\')) {
        return Err(DrvError::BadRawField { offset });
    }
    Ok(())
}

/// Checks a derivation name: `<name>.drv` must be a valid store path name.
fn check_drv_name(name: &str) -> Result<(), DrvError> {
    let full = format!("{name}{DRV_EXTENSION}");
    check_name(&full, &full).map_err(|source| DrvError::BadName {
        name: name.to_string(),
        source,
    })
}

/// The derivation name of a `.drv` store path (its name without `.drv`).
pub fn name_from_drv_path(path: &StorePath) -> Result<&str, DrvError> {
    path.name()
        .strip_suffix(DRV_EXTENSION)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| DrvError::NotADrvPath(path.to_string()))
}

/// The placeholder a floating CA output's environment variable holds before the build
/// (`/` + base32 of sha256(`nix-output:<output>`)).
pub fn hash_placeholder(output: &str) -> String {
    format!(
        "/{}",
        Hash::sha256(format!("nix-output:{output}").as_bytes()).to_base32()
    )
}

/// The kind of a derivation as a whole, from the kinds of its outputs (Nix's
/// `BasicDerivation::type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DerivationType {
    InputAddressed {
        deferred: bool,
    },
    /// `fixed`: fixed-output (unsandboxed, network allowed); otherwise floating.
    ContentAddressed {
        fixed: bool,
    },
    Impure,
}

impl DerivationType {
    pub fn is_fixed(self) -> bool {
        matches!(self, DerivationType::ContentAddressed { fixed: true })
    }

    pub fn is_ca(self) -> bool {
        !matches!(self, DerivationType::InputAddressed { .. })
    }

    pub fn is_pure(self) -> bool {
        !matches!(self, DerivationType::Impure)
    }

    pub fn is_sandboxed(self) -> bool {
        match self {
            DerivationType::InputAddressed { .. } => true,
            DerivationType::ContentAddressed { fixed } => !fixed,
            DerivationType::Impure => false,
        }
    }

    pub fn has_known_output_paths(self) -> bool {
        match self {
            DerivationType::InputAddressed { deferred } => !deferred,
            DerivationType::ContentAddressed { fixed } => fixed,
            DerivationType::Impure => false,
        }
    }
}

/// A parsed `.drv`. Builder, args and environment are bytes: Nix strings can hold any byte
/// sequence (e.g. half of a UTF-8 character from `builtins.substring`), and `.drv` files keep
/// them as they are. `system` is bytes for the same reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Derivation {
    /// The derivation name: the `.drv` path's name without `.drv`.
    pub name: String,
    pub outputs: BTreeMap<String, DerivationOutput>,
    pub input_drvs: BTreeMap<StorePath, BTreeSet<String>>,
    pub input_srcs: BTreeSet<StorePath>,
    pub system: Vec<u8>,
    pub builder: Vec<u8>,
    pub args: Vec<Vec<u8>>,
    pub env: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Derivation {
    /// Parses a `.drv` file of derivation `name` with the default limits.
    pub fn parse(store_dir: &StoreDir, text: &[u8], name: &str) -> Result<Derivation, DrvError> {
        Self::parse_with_limits(store_dir, text, name, &DrvLimits::default())
    }

    pub fn parse_with_limits(
        store_dir: &StoreDir,
        text: &[u8],
        name: &str,
        limits: &DrvLimits,
    ) -> Result<Derivation, DrvError> {
        aterm::parse(store_dir, text, name, limits)
    }

    /// The ATerm exactly as Nix writes it. Fails only if a fixed output's path cannot be formed
    /// from `name` (never for a parsed derivation).
    pub fn to_aterm(&self, store_dir: &StoreDir) -> Result<Vec<u8>, DrvError> {
        aterm::print(self, store_dir, false, None)
    }

    pub fn drv_type(&self) -> Result<DerivationType, DrvError> {
        let (mut ia, mut fixed, mut floating, mut deferred, mut impure) = (0, 0, 0, 0, 0);
        let mut floating_algo = None;
        for out in self.outputs.values() {
            match out {
                DerivationOutput::InputAddressed(_) => ia += 1,
                DerivationOutput::CAFixed { .. } => fixed += 1,
                DerivationOutput::CAFloating { algo, .. } => {
                    floating += 1;
                    if *floating_algo.get_or_insert(*algo) != *algo {
                        return Err(DrvError::FloatingHashTypes);
                    }
                }
                DerivationOutput::Deferred => deferred += 1,
                DerivationOutput::Impure { .. } => impure += 1,
            }
        }
        match (ia, fixed, floating, deferred, impure) {
            (0, 0, 0, 0, 0) => Err(DrvError::NoOutputs),
            (_, 0, 0, 0, 0) => Ok(DerivationType::InputAddressed { deferred: false }),
            (0, n, 0, 0, 0) => {
                if n > 1 {
                    Err(DrvError::MultipleFixedOutputs)
                } else if !self.outputs.contains_key("out") {
                    Err(DrvError::FixedOutputNotOut)
                } else {
                    Ok(DerivationType::ContentAddressed { fixed: true })
                }
            }
            (0, 0, _, 0, 0) => Ok(DerivationType::ContentAddressed { fixed: false }),
            (0, 0, 0, _, 0) => Ok(DerivationType::InputAddressed { deferred: true }),
            (0, 0, 0, 0, _) => Ok(DerivationType::Impure),
            _ => Err(DrvError::MixedOutputTypes),
        }
    }

    /// Builders named `builtin:…` run inside the daemon.
    pub fn is_builtin(&self) -> bool {
        self.builder.starts_with(b"builtin:")
    }

    /// References of the `.drv` file: input sources and input derivations (outputs are not
    /// references).
    pub fn references(&self) -> BTreeSet<StorePath> {
        let mut refs = self.input_srcs.clone();
        refs.extend(self.input_drvs.keys().cloned());
        refs
    }

    /// The store path the `.drv` file gets: a text path named `<name>.drv` over the ATerm.
    pub fn drv_path(&self, store_dir: &StoreDir) -> Result<StorePath, DrvError> {
        let text = self.to_aterm(store_dir)?;
        Ok(store_dir.make_text_path(
            &format!("{}{DRV_EXTENSION}", self.name),
            &Hash::sha256(&text),
            &self.references(),
        )?)
    }

    /// Output paths known without hashing: input-addressed as declared, fixed-output computed,
    /// `None` for the rest (Nix's `outputsAndOptPaths`).
    pub fn static_output_paths(
        &self,
        store_dir: &StoreDir,
    ) -> Result<BTreeMap<String, Option<StorePath>>, DrvError> {
        self.outputs
            .iter()
            .map(|(name, out)| Ok((name.clone(), out.path(store_dir, &self.name, name)?)))
            .collect()
    }

    /// `hashDerivationModulo(self, mask)`; see [`hash_derivation_modulo`].
    pub fn hash_modulo<R>(
        &self,
        mask_outputs: bool,
        cache: &mut DrvHashCache,
        resolver: &mut R,
    ) -> Result<DrvHash, DrvError>
    where
        R: FnMut(&StorePath) -> Result<Derivation, DrvError>,
    {
        hash_derivation_modulo(self, mask_outputs, cache, resolver)
    }

    /// The output paths Nix computes for this derivation: input-addressed and deferred outputs
    /// from `H(drv, true)` (`None` for deferred outputs when an input is deferred), fixed
    /// outputs from their hash, `None` for floating and impure outputs. Works on the masked
    /// form as well as on the final one. The store directory is the cache's.
    pub fn compute_output_paths<R>(
        &self,
        cache: &mut DrvHashCache,
        resolver: &mut R,
    ) -> Result<BTreeMap<String, Option<StorePath>>, DrvError>
    where
        R: FnMut(&StorePath) -> Result<Derivation, DrvError>,
    {
        self.drv_type()?;
        let store_dir = cache.store_dir().clone();
        let mut modulo: Option<DrvHash> = None;
        let mut res = BTreeMap::new();
        for (name, out) in &self.outputs {
            let path = match out {
                DerivationOutput::InputAddressed(_) | DerivationOutput::Deferred => {
                    let h = match &modulo {
                        Some(h) => h,
                        None => modulo.insert(hash_derivation_modulo(self, true, cache, resolver)?),
                    };
                    let known = matches!(out, DerivationOutput::InputAddressed(_))
                        || h.kind == DrvHashKind::Regular;
                    match (known, h.hashes.get(name)) {
                        (true, Some(hash)) => {
                            Some(store_dir.make_output_path(name, hash, &self.name)?)
                        }
                        _ => None,
                    }
                }
                other => other.path(&store_dir, &self.name, name)?,
            };
            res.insert(name.clone(), path);
        }
        Ok(res)
    }

    /// The check Nix makes when a `.drv` is registered ("has incorrect output"): the derivation
    /// type must be consistent, every input-addressed output path must be the one
    /// `H(drv, true)` gives, and the environment variable named after each input-addressed or
    /// fixed output must hold its path.
    pub fn check_output_paths<R>(
        &self,
        cache: &mut DrvHashCache,
        resolver: &mut R,
    ) -> Result<(), DrvError>
    where
        R: FnMut(&StorePath) -> Result<Derivation, DrvError>,
    {
        self.drv_type()?;
        let store_dir = cache.store_dir().clone();
        let drv_label = format!("{}{DRV_EXTENSION}", self.name);
        let env_has = |name: &str, path: &StorePath| -> Result<(), DrvError> {
            let expected = store_dir.display(path);
            match self.env.get(name.as_bytes()) {
                Some(v) if v == expected.as_bytes() => Ok(()),
                _ => Err(DrvError::IncorrectEnv {
                    drv: drv_label.clone(),
                    var: name.to_string(),
                    expected,
                }),
            }
        };
        let mut modulo: Option<DrvHash> = None;
        for (name, out) in &self.outputs {
            match out {
                DerivationOutput::InputAddressed(declared) => {
                    let h = match &modulo {
                        Some(h) => h,
                        None => modulo.insert(hash_derivation_modulo(self, true, cache, resolver)?),
                    };
                    let hash = h
                        .hashes
                        .get(name)
                        .ok_or_else(|| DrvError::MissingInputOutput {
                            input: drv_label.clone(),
                            output: name.clone(),
                        })?;
                    let expected = store_dir.make_output_path(name, hash, &self.name)?;
                    if *declared != expected {
                        return Err(DrvError::IncorrectOutput {
                            drv: drv_label,
                            found: store_dir.display(declared),
                            expected: store_dir.display(&expected),
                        });
                    }
                    env_has(name, declared)?;
                }
                DerivationOutput::CAFixed { method, hash } => {
                    env_has(
                        name,
                        &fixed_output_path(&store_dir, &self.name, name, *method, hash)?,
                    )?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Turns the form `derivation {}` hashes (output paths and output environment variables
    /// empty) into the final one, as the evaluator does: input-addressed outputs get the paths
    /// of `H(drv, true)` (or stay deferred if an input is deferred), the fixed output's variable
    /// gets its path, floating and impure outputs' variables get their placeholders. Output
    /// variables missing from `env` are added (the evaluator always sets them before hashing),
    /// so filling is idempotent.
    pub fn fill_output_paths<R>(
        &mut self,
        cache: &mut DrvHashCache,
        resolver: &mut R,
    ) -> Result<(), DrvError>
    where
        R: FnMut(&StorePath) -> Result<Derivation, DrvError>,
    {
        let store_dir = cache.store_dir().clone();
        match self.drv_type()? {
            DerivationType::InputAddressed { .. } => {
                // The evaluator hashes with every output's variable present (and empty); a
                // missing variable would change the hash. Work on a copy so that `self` is
                // untouched on error.
                let mut pre = self.clone();
                for name in self.outputs.keys() {
                    pre.env.insert(name.clone().into_bytes(), Vec::new());
                }
                let h = hash_derivation_modulo(&pre, true, cache, resolver)?;
                for (name, out) in pre.outputs.iter_mut() {
                    let key = name.clone().into_bytes();
                    *out = match (h.kind, h.hashes.get(name)) {
                        (DrvHashKind::Regular, Some(hash)) => {
                            let p = store_dir.make_output_path(name, hash, &pre.name)?;
                            pre.env.insert(key, store_dir.display(&p).into_bytes());
                            DerivationOutput::InputAddressed(p)
                        }
                        _ => DerivationOutput::Deferred,
                    };
                }
                *self = pre;
            }
            DerivationType::ContentAddressed { fixed: true } => {
                for (name, out) in &self.outputs {
                    if let Some(p) = out.path(&store_dir, &self.name, name)? {
                        self.env.insert(
                            name.clone().into_bytes(),
                            store_dir.display(&p).into_bytes(),
                        );
                    }
                }
            }
            DerivationType::ContentAddressed { fixed: false } | DerivationType::Impure => {
                for name in self.outputs.keys() {
                    self.env.insert(
                        name.clone().into_bytes(),
                        hash_placeholder(name).into_bytes(),
                    );
                }
            }
        }
        Ok(())
    }

    /// DrvOutput ids (`sha256:<hex H(drv, true)>!<output>`) of every output.
    pub fn output_ids<R>(
        &self,
        cache: &mut DrvHashCache,
        resolver: &mut R,
    ) -> Result<BTreeMap<String, DrvOutput>, DrvError>
    where
        R: FnMut(&StorePath) -> Result<Derivation, DrvError>,
    {
        let h = hash_derivation_modulo(self, true, cache, resolver)?;
        Ok(h.hashes
            .into_iter()
            .map(|(output, drv_hash)| (output.clone(), DrvOutput { drv_hash, output }))
            .collect())
    }
}

#[cfg(test)]
mod tests;
