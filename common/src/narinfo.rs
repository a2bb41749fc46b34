//! Path metadata ([`PathInfo`], Nix's `ValidPathInfo`), its signatures, and the binary-cache
//! text formats that carry it: `<hash>.narinfo` ([`NarInfo`]) and `nix-cache-info`
//! ([`CacheInfo`]).
//!
//! Both texts come from substituters, i.e. from the network: the parsers bound the input size,
//! line count and reference count, validate every path and hash, and return typed errors.
//! They are stricter than Nix 2.8 where Nix's behaviour is accidental (a line without `:` is
//! silently glued to the next one, `Key:` with nothing after it swallows the next line, repeated
//! keys overwrite each other): such input is refused here.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::content_address::{ContentAddress, ContentAddressError, ContentAddressMethod};
use crate::hash::{Encoding, Hash, HashAlgo, HashError};
use crate::signature::{fingerprint_path, FingerprintError, SecretKey, TrustedKeys};
use crate::store_path::{StoreDir, StorePath, StorePathError};

/// What Nix stores about a valid path (`ValidPathInfo`): the database row, the worker protocol
/// record (§4.2) and, with the download fields of [`NarInfo`], a narinfo.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathInfo {
    pub path: StorePath,
    pub deriver: Option<StorePath>,
    pub nar_hash: Hash,
    pub references: BTreeSet<StorePath>,
    pub registration_time: u64,
    pub nar_size: u64,
    /// Built locally (trusted without signatures).
    pub ultimate: bool,
    pub sigs: BTreeSet<String>,
    pub ca: Option<ContentAddress>,
}

impl PathInfo {
    /// A path with no deriver, references, signatures or content address.
    pub fn new(path: StorePath, nar_hash: Hash, nar_size: u64) -> PathInfo {
        PathInfo {
            path,
            deriver: None,
            nar_hash,
            references: BTreeSet::new(),
            registration_time: 0,
            nar_size,
            ultimate: false,
            sigs: BTreeSet::new(),
            ca: None,
        }
    }

    /// The string signatures cover (see [`fingerprint_path`]).
    pub fn fingerprint(&self, store_dir: &StoreDir) -> Result<String, FingerprintError> {
        fingerprint_path(
            store_dir,
            &self.path,
            &self.nar_hash,
            self.nar_size,
            &self.references,
        )
    }

    /// Adds `key`'s signature of this path.
    pub fn sign(&mut self, store_dir: &StoreDir, key: &SecretKey) -> Result<(), FingerprintError> {
        let fp = self.fingerprint(store_dir)?;
        self.sigs.insert(key.sign(fp).to_string());
        Ok(())
    }

    /// True if the path is exactly what its content address and references produce, so it
    /// needs no signature. A reference to the path itself is the self-reference of a `source`
    /// path; for text paths it is an ordinary reference (and so can never match).
    pub fn is_content_addressed(&self, store_dir: &StoreDir) -> bool {
        let Some(ca) = &self.ca else {
            return false;
        };
        let name = self.path.name();
        let made = match ca.method {
            ContentAddressMethod::Text => ca.store_path(store_dir, name, &self.references, false),
            ContentAddressMethod::Fixed(_) => {
                let mut refs = self.references.clone();
                let self_ref = refs.remove(&self.path);
                ca.store_path(store_dir, name, &refs, self_ref)
            }
        };
        made.is_ok_and(|p| p == self.path)
    }

    /// True if `sig` is a valid signature of this path by a trusted key of its name.
    pub fn check_signature(&self, store_dir: &StoreDir, keys: &TrustedKeys, sig: &str) -> bool {
        self.fingerprint(store_dir)
            .is_ok_and(|fp| keys.verify(fp.as_bytes(), sig))
    }

    /// How many of `sigs` are valid signatures by trusted keys; `usize::MAX` for a
    /// content-addressed path, which needs none (Nix's `maxSigs`). A path without a
    /// fingerprint has no valid signatures.
    pub fn check_signatures(&self, store_dir: &StoreDir, keys: &TrustedKeys) -> usize {
        if self.is_content_addressed(store_dir) {
            return usize::MAX;
        }
        let Ok(fp) = self.fingerprint(store_dir) else {
            return 0;
        };
        self.sigs
            .iter()
            .filter(|s| keys.verify(fp.as_bytes(), s))
            .count()
    }

    /// The name of a trusted key that validly signed this path, if any (content addressing
    /// is not considered here).
    pub fn signed_by<'k>(&self, store_dir: &StoreDir, keys: &'k TrustedKeys) -> Option<&'k str> {
        let fp = self.fingerprint(store_dir).ok()?;
        keys.verify_any(fp.as_bytes(), &self.sigs)
    }

    /// References as base names, in order (the narinfo `References` field).
    pub fn short_refs(&self) -> Vec<&str> {
        self.references.iter().map(StorePath::base_name).collect()
    }
}

/// Bounds for parsing hostile narinfo text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_bytes: usize,
    pub max_lines: usize,
    pub max_references: usize,
}

impl Default for Limits {
    fn default() -> Self {
        // Real narinfos are well under 100 lines and a few KiB; even huge closures have a
        // few thousand direct references at most.
        Limits {
            max_bytes: 1 << 20,
            max_lines: 1024,
            max_references: 16384,
        }
    }
}

/// Keys whose value is validated; everything else is ignored, as in Nix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    StorePath,
    Url,
    Compression,
    FileHash,
    FileSize,
    NarHash,
    NarSize,
    References,
    Deriver,
    System,
    Sig,
    Ca,
}

impl Field {
    fn from_key(k: &str) -> Option<Field> {
        Some(match k {
            "StorePath" => Field::StorePath,
            "URL" => Field::Url,
            "Compression" => Field::Compression,
            "FileHash" => Field::FileHash,
            "FileSize" => Field::FileSize,
            "NarHash" => Field::NarHash,
            "NarSize" => Field::NarSize,
            "References" => Field::References,
            "Deriver" => Field::Deriver,
            "System" => Field::System,
            "Sig" => Field::Sig,
            "CA" => Field::Ca,
            _ => return None,
        })
    }

    pub fn key(self) -> &'static str {
        match self {
            Field::StorePath => "StorePath",
            Field::Url => "URL",
            Field::Compression => "Compression",
            Field::FileHash => "FileHash",
            Field::FileSize => "FileSize",
            Field::NarHash => "NarHash",
            Field::NarSize => "NarSize",
            Field::References => "References",
            Field::Deriver => "Deriver",
            Field::System => "System",
            Field::Sig => "Sig",
            Field::Ca => "CA",
        }
    }

    const COUNT: usize = 12;

    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum NarInfoError {
    #[error("narinfo is larger than {0} bytes")]
    TooLarge(usize),
    #[error("narinfo is not valid UTF-8")]
    NotUtf8,
    #[error("narinfo has more than {0} lines")]
    TooManyLines(usize),
    #[error("narinfo has more than {0} references")]
    TooManyReferences(usize),
    #[error("narinfo line {0}: expecting ':'")]
    NoColon(usize),
    #[error("narinfo line {0}: expecting a separator and a value after ':'")]
    NoValue(usize),
    #[error("narinfo line {0}: expecting '\\n'")]
    NoNewline(usize),
    #[error("narinfo line {line}: repeated field {}", .field.key())]
    Duplicate { line: usize, field: Field },
    #[error("narinfo line {line}: bad {}: {source}", .field.key())]
    Path {
        line: usize,
        field: Field,
        source: StorePathError,
    },
    #[error("narinfo line {line}: bad {}: {source}", .field.key())]
    Hash {
        line: usize,
        field: Field,
        source: HashError,
    },
    #[error("narinfo line {line}: {} must be a sha256 hash", .field.key())]
    NotSha256 { line: usize, field: Field },
    #[error("narinfo line {line}: {} is not a valid number", .field.key())]
    Number { line: usize, field: Field },
    #[error("narinfo line {line}: {} contains control characters", .field.key())]
    ControlChar { line: usize, field: Field },
    #[error("narinfo line {0}: signature is empty or contains whitespace or control characters")]
    BadSig(usize),
    #[error("narinfo line {line}: bad CA: {source}")]
    Ca {
        line: usize,
        source: ContentAddressError,
    },
    #[error("narinfo has no {}", .0.key())]
    Missing(Field),
    #[error("narinfo NarSize is zero")]
    ZeroNarSize,
    #[error("cannot print narinfo: {} would not survive the text form", .0.key())]
    Unprintable(Field),
}

/// A binary-cache `.narinfo`: path metadata plus where and how the NAR is stored.
/// `info.registration_time` and `info.ultimate` are not part of the text (0 and false).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NarInfo {
    pub info: PathInfo,
    /// Location of the (compressed) NAR, relative to the cache root.
    pub url: String,
    /// `bzip2` when absent or empty, as in Nix.
    pub compression: String,
    /// sha256 of the compressed file.
    pub file_hash: Option<Hash>,
    /// Size of the compressed file; 0 when absent.
    pub file_size: u64,
    pub system: Option<String>,
}

/// Parses a decimal `u64`: digits only (no sign, no spaces).
fn parse_number(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// A signature string as stored: it is kept verbatim (a malformed one simply never verifies),
/// but it must survive the space-separated `sigs` column and the line-based texts.
fn sig_is_storable(s: &str) -> bool {
    !s.is_empty() && !s.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// URL, Compression and System are free text that ends up in requests, file names and logs;
/// no real narinfo has control characters in them (Nix would keep them).
fn is_clean(s: &str) -> bool {
    !s.chars().any(char::is_control)
}

fn clean_text(line: usize, field: Field, value: &str) -> Result<String, NarInfoError> {
    if is_clean(value) {
        Ok(value.to_string())
    } else {
        Err(NarInfoError::ControlChar { line, field })
    }
}

fn parse_sha256(line: usize, field: Field, value: &str) -> Result<Hash, NarInfoError> {
    let h = Hash::parse_typed(value).map_err(|source| NarInfoError::Hash {
        line,
        field,
        source,
    })?;
    if h.algo() != HashAlgo::Sha256 {
        return Err(NarInfoError::NotSha256 { line, field });
    }
    Ok(h)
}

impl NarInfo {
    /// Parses narinfo text with the default [`Limits`].
    pub fn parse(store_dir: &StoreDir, data: &[u8]) -> Result<NarInfo, NarInfoError> {
        Self::parse_with_limits(store_dir, data, &Limits::default())
    }

    /// Parses narinfo text: `Key: value` lines, each ending in `\n`. The key runs to the first
    /// `:`, and one (ASCII) character after it is skipped, as Nix does. Unknown keys are
    /// ignored; known keys other than `Sig` may appear once.
    pub fn parse_with_limits(
        store_dir: &StoreDir,
        data: &[u8],
        limits: &Limits,
    ) -> Result<NarInfo, NarInfoError> {
        if data.len() > limits.max_bytes {
            return Err(NarInfoError::TooLarge(limits.max_bytes));
        }
        let text = std::str::from_utf8(data).map_err(|_| NarInfoError::NotUtf8)?;

        let mut seen = [false; Field::COUNT];
        let mut path = None;
        let mut url = None;
        let mut compression = None;
        let mut file_hash = None;
        let mut file_size = 0;
        let mut nar_hash = None;
        let mut nar_size = None;
        let mut references = BTreeSet::new();
        let mut deriver = None;
        let mut system = None;
        let mut sigs = BTreeSet::new();
        let mut ca = None;

        let mut rest = text;
        let mut line = 0;
        while !rest.is_empty() {
            line += 1;
            if line > limits.max_lines {
                return Err(NarInfoError::TooManyLines(limits.max_lines));
            }
            let (l, r) = rest.split_once('\n').ok_or(NarInfoError::NoNewline(line))?;
            rest = r;
            let (key, after) = l.split_once(':').ok_or(NarInfoError::NoColon(line))?;
            let value = match after.as_bytes().first() {
                // Skipping one ASCII byte keeps `value` on a character boundary.
                Some(b) if b.is_ascii() => after.get(1..).ok_or(NarInfoError::NoValue(line))?,
                _ => return Err(NarInfoError::NoValue(line)),
            };
            let Some(field) = Field::from_key(key) else {
                continue;
            };
            if field != Field::Sig {
                let slot = seen
                    .get_mut(field.index())
                    .ok_or(NarInfoError::Duplicate { line, field })?;
                if *slot {
                    return Err(NarInfoError::Duplicate { line, field });
                }
                *slot = true;
            }
            let path_err = |source| NarInfoError::Path {
                line,
                field,
                source,
            };
            match field {
                Field::StorePath => path = Some(store_dir.parse(value).map_err(path_err)?),
                Field::Url => url = Some(clean_text(line, field, value)?),
                Field::Compression => compression = Some(clean_text(line, field, value)?),
                Field::FileHash => file_hash = Some(parse_sha256(line, field, value)?),
                Field::FileSize => {
                    file_size = parse_number(value).ok_or(NarInfoError::Number { line, field })?
                }
                Field::NarHash => nar_hash = Some(parse_sha256(line, field, value)?),
                Field::NarSize => {
                    nar_size =
                        Some(parse_number(value).ok_or(NarInfoError::Number { line, field })?)
                }
                Field::References => {
                    for r in value.split(' ').filter(|r| !r.is_empty()) {
                        if references.len() >= limits.max_references {
                            return Err(NarInfoError::TooManyReferences(limits.max_references));
                        }
                        references.insert(StorePath::from_base_name(r).map_err(path_err)?);
                    }
                }
                Field::Deriver => {
                    if value != "unknown-deriver" {
                        deriver = Some(StorePath::from_base_name(value).map_err(path_err)?);
                    }
                }
                Field::System => {
                    if !value.is_empty() {
                        system = Some(clean_text(line, field, value)?);
                    }
                }
                Field::Sig => {
                    if !sig_is_storable(value) {
                        return Err(NarInfoError::BadSig(line));
                    }
                    sigs.insert(value.to_string());
                }
                Field::Ca => {
                    ca = ContentAddress::parse_opt(value)
                        .map_err(|source| NarInfoError::Ca { line, source })?
                }
            }
        }

        let path = path.ok_or(NarInfoError::Missing(Field::StorePath))?;
        let nar_hash = nar_hash.ok_or(NarInfoError::Missing(Field::NarHash))?;
        let url = url
            .filter(|u| !u.is_empty())
            .ok_or(NarInfoError::Missing(Field::Url))?;
        let nar_size = nar_size.ok_or(NarInfoError::Missing(Field::NarSize))?;
        if nar_size == 0 {
            return Err(NarInfoError::ZeroNarSize);
        }
        let compression = compression
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| "bzip2".to_string());

        Ok(NarInfo {
            info: PathInfo {
                path,
                deriver,
                nar_hash,
                references,
                registration_time: 0,
                nar_size,
                ultimate: false,
                sigs,
                ca,
            },
            url,
            compression,
            file_hash,
            file_size,
            system,
        })
    }

    /// Prints the narinfo in Nix's field order. Fails instead of printing something that would
    /// not parse back to the same value (an empty URL, a control character, a zero NarSize, a
    /// non-sha256 hash, an unstorable signature).
    pub fn render(&self, store_dir: &StoreDir) -> Result<String, NarInfoError> {
        let info = &self.info;
        if self.url.is_empty() || !is_clean(&self.url) {
            return Err(NarInfoError::Unprintable(Field::Url));
        }
        if !is_clean(&self.compression) {
            return Err(NarInfoError::Unprintable(Field::Compression));
        }
        if self.file_hash.is_some_and(|h| h.algo() != HashAlgo::Sha256) {
            return Err(NarInfoError::Unprintable(Field::FileHash));
        }
        if info.nar_hash.algo() != HashAlgo::Sha256 {
            return Err(NarInfoError::Unprintable(Field::NarHash));
        }
        if info.nar_size == 0 {
            return Err(NarInfoError::Unprintable(Field::NarSize));
        }
        if self
            .system
            .as_deref()
            .is_some_and(|s| s.is_empty() || !is_clean(s))
        {
            return Err(NarInfoError::Unprintable(Field::System));
        }
        if !info.sigs.iter().all(|s| sig_is_storable(s)) {
            return Err(NarInfoError::Unprintable(Field::Sig));
        }

        let mut out = String::new();
        let mut put = |k: &str, v: &str| {
            out.push_str(k);
            out.push_str(": ");
            out.push_str(v);
            out.push('\n');
        };
        put("StorePath", &store_dir.display(&info.path));
        put("URL", &self.url);
        put(
            "Compression",
            if self.compression.is_empty() {
                "bzip2"
            } else {
                &self.compression
            },
        );
        if let Some(h) = &self.file_hash {
            put("FileHash", &h.to_typed(Encoding::Base32));
        }
        put("FileSize", &self.file_size.to_string());
        put("NarHash", &info.nar_hash.to_typed(Encoding::Base32));
        put("NarSize", &info.nar_size.to_string());
        put("References", &info.short_refs().join(" "));
        if let Some(d) = &info.deriver {
            put("Deriver", d.base_name());
        }
        if let Some(s) = &self.system {
            put("System", s);
        }
        for s in &info.sigs {
            put("Sig", s);
        }
        if let Some(ca) = &info.ca {
            put("CA", &ca.to_string());
        }
        Ok(out)
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CacheInfoError {
    #[error("nix-cache-info is larger than {0} bytes")]
    TooLarge(usize),
    #[error("nix-cache-info is not valid UTF-8")]
    NotUtf8,
    #[error("nix-cache-info has a bad Priority '{0}'")]
    BadPriority(String),
    #[error("nix-cache-info names conflicting store directories")]
    ConflictingStoreDir,
    #[error("binary cache is for Nix stores with prefix '{cache}', not '{ours}'")]
    WrongStoreDir { cache: String, ours: String },
}

/// A cache's `nix-cache-info`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheInfo {
    pub store_dir: Option<String>,
    pub want_mass_query: Option<bool>,
    pub priority: Option<i32>,
}

impl CacheInfo {
    /// Largest `nix-cache-info` accepted; real ones are three short lines.
    pub const MAX_BYTES: usize = 64 << 10;

    /// Parses `Key: value` lines as Nix does: blank lines and lines without `:` are skipped,
    /// values are trimmed, unknown keys ignored, `WantMassQuery` is true only for `1`.
    /// `Priority` must be an integer (Nix would throw on garbage too).
    pub fn parse(data: &[u8]) -> Result<CacheInfo, CacheInfoError> {
        if data.len() > Self::MAX_BYTES {
            return Err(CacheInfoError::TooLarge(Self::MAX_BYTES));
        }
        let text = std::str::from_utf8(data).map_err(|_| CacheInfoError::NotUtf8)?;
        let mut info = CacheInfo::default();
        for line in text.split('\n') {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim_matches([' ', '\t', '\r', '\n']);
            match key {
                "StoreDir" => {
                    // Nix checks every StoreDir line against its own, so all must agree.
                    if info.store_dir.as_deref().is_some_and(|d| d != value) {
                        return Err(CacheInfoError::ConflictingStoreDir);
                    }
                    info.store_dir = Some(value.to_string());
                }
                "WantMassQuery" => info.want_mass_query = Some(value == "1"),
                "Priority" => {
                    let p = value
                        .parse()
                        .map_err(|_| CacheInfoError::BadPriority(value.to_string()))?;
                    info.priority = Some(p);
                }
                _ => {}
            }
        }
        Ok(info)
    }

    /// A cache that names a store directory must name ours.
    pub fn check_store_dir(&self, store_dir: &StoreDir) -> Result<(), CacheInfoError> {
        match &self.store_dir {
            Some(d) if d != store_dir.as_str() => Err(CacheInfoError::WrongStoreDir {
                cache: d.clone(),
                ours: store_dir.as_str().to_string(),
            }),
            _ => Ok(()),
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Some(d) = &self.store_dir {
            out.push_str(&format!("StoreDir: {d}\n"));
        }
        if let Some(w) = self.want_mass_query {
            out.push_str(&format!("WantMassQuery: {}\n", u8::from(w)));
        }
        if let Some(p) = self.priority {
            out.push_str(&format!("Priority: {p}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signature::PublicKey;
    use crate::store_path::FileIngestion;

    // Written by `nix copy --to file://…` (Nix 2.8.0) for `nix-store --add` of "hello\n",
    // signed with the key below.
    const NIX_NARINFO: &str = "\
StorePath: /nix/store/6h9lcbx523532ax1c5g2351w9bm8ykhy-f.txt
URL: nar/17gd6zzlkx90irc6qawagdkgh1d7qvlnq46yjf7xiqw9ycz7zq4a.nar.xz
Compression: xz
FileHash: sha256:17gd6zzlkx90irc6qawagdkgh1d7qvlnq46yjf7xiqw9ycz7zq4a
FileSize: 128
NarHash: sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw
NarSize: 120
References: 
Sig: test-1:I1roKQmjvkB2BXn9bJ53LujvOR/CpvVOOOT0Pvp9DbJmgDzgoE8anzdgGjujmOUNWYkXpAeJ/+OsR3h0NcUWAg==
CA: fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw
";
    const NIX_PUB: &str = "test-1:Rn0jvoc2FKHjh/RFvWDf3S8Q1fr1MgzBFGpFN/hbdW4=";
    const H1: &str = "hv2lxdwpbmd9zfj87n6n7z5wxhnswizx";

    fn sd() -> StoreDir {
        StoreDir::default()
    }

    fn minimal() -> String {
        format!(
            "StorePath: /nix/store/{H1}-t\nURL: nar/x\n\
             NarHash: sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw\nNarSize: 1\n"
        )
    }

    #[test]
    fn nix_narinfo_round_trips_byte_for_byte() {
        let ni = NarInfo::parse(&sd(), NIX_NARINFO.as_bytes()).unwrap();
        assert_eq!(
            ni.url,
            "nar/17gd6zzlkx90irc6qawagdkgh1d7qvlnq46yjf7xiqw9ycz7zq4a.nar.xz"
        );
        assert_eq!(ni.compression, "xz");
        assert_eq!(ni.file_size, 128);
        assert_eq!(ni.info.nar_size, 120);
        assert!(ni.info.references.is_empty());
        assert_eq!(ni.info.sigs.len(), 1);
        assert_eq!(ni.render(&sd()).unwrap(), NIX_NARINFO);

        let keys = TrustedKeys::parse_list(NIX_PUB).unwrap();
        assert!(ni.info.is_content_addressed(&sd()));
        assert_eq!(ni.info.check_signatures(&sd(), &keys), usize::MAX);
        assert_eq!(ni.info.signed_by(&sd(), &keys), Some("test-1"));
        let mut plain = ni.info.clone();
        plain.ca = None;
        assert_eq!(plain.check_signatures(&sd(), &keys), 1);
        assert_eq!(plain.check_signatures(&sd(), &TrustedKeys::new()), 0);
        plain.nar_size += 1;
        assert_eq!(plain.check_signatures(&sd(), &keys), 0);
        assert_eq!(plain.signed_by(&sd(), &keys), None);
    }

    #[test]
    fn defaults_and_optional_fields() {
        let ni = NarInfo::parse(&sd(), minimal().as_bytes()).unwrap();
        assert_eq!(ni.compression, "bzip2");
        assert_eq!((ni.file_hash, ni.file_size), (None, 0));
        let printed = ni.render(&sd()).unwrap();
        assert!(printed.contains("Compression: bzip2\nFileSize: 0\n"));
        assert_eq!(NarInfo::parse(&sd(), printed.as_bytes()).unwrap(), ni);

        let more = format!(
            "{}References: {H1}-t  0v2lxdwpbmd9zfj87n6n7z5wxhnswizx-z\nDeriver: unknown-deriver\n\
             System: x86_64-linux\nCompression: \nSomething: else: entirely\nCA: \nSig: b\nSig: a\n",
            minimal()
        );
        let ni = NarInfo::parse(&sd(), more.as_bytes()).unwrap();
        assert_eq!(
            ni.info.short_refs(),
            [
                "0v2lxdwpbmd9zfj87n6n7z5wxhnswizx-z".to_string(),
                format!("{H1}-t")
            ]
        );
        assert_eq!(ni.info.deriver, None);
        assert_eq!(ni.system.as_deref(), Some("x86_64-linux"));
        assert_eq!(ni.compression, "bzip2");
        assert_eq!(ni.info.ca, None);
        let printed = ni.render(&sd()).unwrap();
        assert!(
            printed.ends_with("System: x86_64-linux\nSig: a\nSig: b\n"),
            "{printed}"
        );
        assert_eq!(NarInfo::parse(&sd(), printed.as_bytes()).unwrap(), ni);

        // Nix skips whatever single character follows the colon.
        let tab = minimal().replace("URL: ", "URL:\t");
        assert_eq!(NarInfo::parse(&sd(), tab.as_bytes()).unwrap().url, "nar/x");
        let deriver = format!("{}Deriver: {H1}-t.drv\n", minimal());
        let ni = NarInfo::parse(&sd(), deriver.as_bytes()).unwrap();
        assert_eq!(ni.info.deriver.unwrap().name(), "t.drv");
    }

    #[test]
    fn required_fields() {
        let m = minimal();
        for (drop, field) in [
            ("StorePath", Field::StorePath),
            ("URL", Field::Url),
            ("NarHash", Field::NarHash),
            ("NarSize", Field::NarSize),
        ] {
            let text: String = m
                .lines()
                .filter(|l| !l.starts_with(drop))
                .map(|l| format!("{l}\n"))
                .collect();
            assert_eq!(
                NarInfo::parse(&sd(), text.as_bytes()),
                Err(NarInfoError::Missing(field))
            );
        }
        let empty_url = m.replace("URL: nar/x", "URL: ");
        assert_eq!(
            NarInfo::parse(&sd(), empty_url.as_bytes()),
            Err(NarInfoError::Missing(Field::Url))
        );
        let zero = m.replace("NarSize: 1", "NarSize: 0");
        assert_eq!(
            NarInfo::parse(&sd(), zero.as_bytes()),
            Err(NarInfoError::ZeroNarSize)
        );
    }

    #[test]
    fn hostile_input() {
        let m = minimal();
        let bad = |s: &str| NarInfo::parse(&sd(), s.as_bytes()).unwrap_err();
        assert!(matches!(
            bad(&m.replace("/nix/store/", "/nix/store2/")),
            NarInfoError::Path {
                field: Field::StorePath,
                ..
            }
        ));
        assert!(matches!(
            bad(&m.replace("-t\n", "-t/../../etc\n")),
            NarInfoError::Path { .. }
        ));
        assert!(matches!(
            bad(&format!("{m}References: ../etc\n")),
            NarInfoError::Path {
                field: Field::References,
                ..
            }
        ));
        assert!(matches!(
            bad(&format!("{m}Deriver: /nix/store/{H1}-t.drv\n")),
            NarInfoError::Path {
                field: Field::Deriver,
                ..
            }
        ));
        assert!(matches!(
            bad(&m.replace("sha256:04zw", "sha256:04ew")),
            NarInfoError::Hash { .. }
        ));
        assert!(matches!(
            bad(&m.replace(
                "sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw",
                "md5:00000000000000000000000000000000"
            )),
            NarInfoError::NotSha256 {
                field: Field::NarHash,
                ..
            }
        ));
        assert!(matches!(
            bad(&m.replace("NarSize: 1", "NarSize: +1")),
            NarInfoError::Number { .. }
        ));
        assert!(matches!(
            bad(&m.replace("NarSize: 1", "NarSize: 18446744073709551616")),
            NarInfoError::Number { .. }
        ));
        assert!(matches!(
            bad(&format!("{m}URL: again\n")),
            NarInfoError::Duplicate {
                field: Field::Url,
                line: 5
            }
        ));
        assert!(matches!(
            bad(&format!("{m}Sig: a b\n")),
            NarInfoError::BadSig(5)
        ));
        assert!(matches!(
            bad(&format!("{m}CA: nope:x\n")),
            NarInfoError::Ca { .. }
        ));
        assert_eq!(bad(m.trim_end()), NarInfoError::NoNewline(4));
        assert_eq!(bad(&format!("{m}\n")), NarInfoError::NoColon(5));
        assert_eq!(bad(&format!("{m}URL:\n")), NarInfoError::NoValue(5));
        assert_eq!(bad(&format!("{m}URL:\u{e9}x\n")), NarInfoError::NoValue(5));
        assert_eq!(
            NarInfo::parse(&sd(), b"StorePath: \xff\n").unwrap_err(),
            NarInfoError::NotUtf8
        );

        let limits = Limits {
            max_bytes: 300,
            max_lines: 6,
            max_references: 2,
        };
        let big = format!("{m}X: {}\n", "y".repeat(300));
        assert_eq!(
            NarInfo::parse_with_limits(&sd(), big.as_bytes(), &limits),
            Err(NarInfoError::TooLarge(300))
        );
        let lines = format!("{m}X: 1\nX: 2\nX: 3\n");
        assert_eq!(
            NarInfo::parse_with_limits(&sd(), lines.as_bytes(), &limits),
            Err(NarInfoError::TooManyLines(6))
        );
        let refs = format!("{m}References: {H1}-a {H1}-b {H1}-c\n");
        assert_eq!(
            NarInfo::parse_with_limits(&sd(), refs.as_bytes(), &limits),
            Err(NarInfoError::TooManyReferences(2))
        );
    }

    #[test]
    fn render_refuses_what_would_not_parse_back() {
        let mut ni = NarInfo::parse(&sd(), minimal().as_bytes()).unwrap();
        ni.url = "a\nStorePath: /evil".into();
        assert_eq!(ni.render(&sd()), Err(NarInfoError::Unprintable(Field::Url)));
        ni.url = "ok".into();
        ni.info.sigs.insert("a b".into());
        assert_eq!(ni.render(&sd()), Err(NarInfoError::Unprintable(Field::Sig)));
        ni.info.sigs.clear();
        ni.info.nar_size = 0;
        assert_eq!(
            ni.render(&sd()),
            Err(NarInfoError::Unprintable(Field::NarSize))
        );
    }

    #[test]
    fn content_addressed_paths() {
        let sd = sd();
        let nar = Hash::sha256(b"pretend nar");
        let other: StorePath = format!("{H1}-dep").parse().unwrap();
        let refs: BTreeSet<StorePath> = [other.clone()].into();

        // Source path with a self-reference: the self entry becomes `:self`.
        let ca = ContentAddress::fixed(FileIngestion::Recursive, nar);
        let p = ca.store_path(&sd, "src", &refs, true).unwrap();
        let mut info = PathInfo::new(p.clone(), nar, 10);
        info.ca = Some(ca);
        info.references = [other.clone(), p.clone()].into();
        assert!(info.is_content_addressed(&sd));
        // Without the self-reference it is another path.
        info.references = refs.clone();
        assert!(!info.is_content_addressed(&sd));

        // Text path: references as given.
        let text = ContentAddress::text(Hash::sha256(b"contents"));
        let tp = text.store_path(&sd, "x.drv", &refs, false).unwrap();
        let mut ti = PathInfo::new(tp.clone(), nar, 10);
        ti.ca = Some(text);
        ti.references = refs.clone();
        assert!(ti.is_content_addressed(&sd));
        ti.references.insert(tp);
        assert!(!ti.is_content_addressed(&sd));

        // Flat fixed output with references never matches (Nix would assert).
        let flat = ContentAddress::fixed(FileIngestion::Flat, Hash::sha256(b"f"));
        let fp = flat.store_path(&sd, "f", &BTreeSet::new(), false).unwrap();
        let mut fi = PathInfo::new(fp, nar, 10);
        fi.ca = Some(flat);
        assert!(fi.is_content_addressed(&sd));
        fi.references = refs;
        assert!(!fi.is_content_addressed(&sd));

        // A claimed CA that does not reproduce the path.
        let mut liar = PathInfo::new(other, nar, 10);
        liar.ca = Some(ca);
        assert!(!liar.is_content_addressed(&sd));
    }

    #[test]
    fn sign_and_check() {
        let sd = sd();
        let key = SecretKey::generate("k-1").unwrap();
        let p: StorePath = format!("{H1}-t").parse().unwrap();
        let mut info = PathInfo::new(p, Hash::sha256(b"n"), 5);
        info.sign(&sd, &key).unwrap();
        let keys: TrustedKeys = [key.to_public()].into_iter().collect();
        assert_eq!(info.check_signatures(&sd, &keys), 1);
        let sig = info.sigs.iter().next().unwrap().clone();
        assert!(info.check_signature(&sd, &keys, &sig));
        let stranger: TrustedKeys = [PublicKey::parse(NIX_PUB).unwrap()].into_iter().collect();
        assert_eq!(info.check_signatures(&sd, &stranger), 0);
        info.references.insert(format!("{H1}-u").parse().unwrap());
        assert_eq!(
            info.check_signatures(&sd, &keys),
            0,
            "references are signed"
        );
        info.nar_size = 0;
        assert!(info.sign(&sd, &key).is_err());
        assert_eq!(info.check_signatures(&sd, &keys), 0);
    }

    #[test]
    fn cache_info() {
        let ci =
            CacheInfo::parse(b"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n").unwrap();
        assert_eq!(
            ci,
            CacheInfo {
                store_dir: Some("/nix/store".into()),
                want_mass_query: Some(true),
                priority: Some(40),
            }
        );
        assert_eq!(
            ci.render(),
            "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n"
        );
        assert!(ci.check_store_dir(&sd()).is_ok());
        assert!(ci
            .check_store_dir(&StoreDir::new("/gnu/store").unwrap())
            .is_err());
        let odd =
            CacheInfo::parse(b"junk\n\nWantMassQuery:  true \r\nPriority:\t-5\nX: y").unwrap();
        assert_eq!((odd.want_mass_query, odd.priority), (Some(false), Some(-5)));
        assert_eq!(odd.store_dir, None);
        assert!(CacheInfo::parse(b"Priority: high\n").is_err());
        assert!(CacheInfo::parse(b"StoreDir: /a\nStoreDir: /b\n").is_err());
        assert!(CacheInfo::parse(&vec![b'x'; CacheInfo::MAX_BYTES + 1]).is_err());
    }
}
