//! Store paths: `<storeDir>/<32 base32 chars>-<name>`, their validation and how Nix computes
//! them for every kind of path.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::base32;
use crate::hash::{self, Hash, HashAlgo};

/// Characters in the hash part.
pub const HASH_LEN: usize = 32;
/// Bytes of the truncated hash the hash part encodes.
pub const HASH_BYTES: usize = 20;
/// Longest name Nix accepts.
pub const MAX_NAME_LEN: usize = 211;
pub const DEFAULT_STORE_DIR: &str = "/nix/store";

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum StorePathError {
    #[error("path '{0}' is not in the Nix store")]
    NotInStore(String),
    #[error("store path '{0}' has an invalid hash part")]
    BadHash(String),
    #[error("store path '{0}' has no name")]
    NoName(String),
    #[error("store path '{0}' has a name longer than {MAX_NAME_LEN} characters")]
    NameTooLong(String),
    #[error("store path '{path}' contains illegal character '{ch}'")]
    BadChar { path: String, ch: char },
    #[error("store path name '{0}' is not allowed")]
    BadName(String),
    #[error("store directory '{0}' must be an absolute path without a trailing slash")]
    BadStoreDir(String),
}

/// Checks a store path name: 1–211 of `[A-Za-z0-9+-._?=]`, not `.` or `..`.
/// A leading `.` is accepted, as Nix 2.8 does (`nix-store --add .bashrc`).
pub fn check_name(name: &str, whole: &str) -> Result<(), StorePathError> {
    if name.is_empty() {
        return Err(StorePathError::NoName(whole.to_string()));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(StorePathError::NameTooLong(whole.to_string()));
    }
    if let Some(ch) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "+-._?=".contains(*c)))
    {
        return Err(StorePathError::BadChar {
            path: whole.to_string(),
            ch,
        });
    }
    if name == "." || name == ".." {
        return Err(StorePathError::BadName(name.to_string()));
    }
    Ok(())
}

/// A store path without its store directory: the validated base name `<hash>-<name>`.
/// Orders by base name, as Nix does.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct StorePath {
    base: String,
}

impl StorePath {
    /// Parses a base name `<32 base32 chars>-<name>`.
    pub fn from_base_name(base: &str) -> Result<StorePath, StorePathError> {
        let (hash, rest) = match (base.get(..HASH_LEN), base.get(HASH_LEN..)) {
            (Some(h), Some(r)) => (h, r),
            _ => return Err(StorePathError::BadHash(base.to_string())),
        };
        if !base32::is_valid_str(hash) {
            return Err(StorePathError::BadHash(base.to_string()));
        }
        let name = rest
            .strip_prefix('-')
            .ok_or_else(|| StorePathError::NoName(base.to_string()))?;
        check_name(name, base)?;
        Ok(StorePath {
            base: base.to_string(),
        })
    }

    /// Builds a path from a 20-byte hash and a name.
    pub fn from_hash(digest: &[u8; HASH_BYTES], name: &str) -> Result<StorePath, StorePathError> {
        let base = format!("{}-{}", base32::encode(digest), name);
        check_name(name, &base)?;
        Ok(StorePath { base })
    }

    pub fn hash_part(&self) -> &str {
        &self.base[..HASH_LEN]
    }

    pub fn name(&self) -> &str {
        &self.base[HASH_LEN + 1..]
    }

    pub fn base_name(&self) -> &str {
        &self.base
    }

    pub fn is_derivation(&self) -> bool {
        self.name().ends_with(".drv")
    }

    /// The hash part decoded to its 20 bytes.
    pub fn hash_bytes(&self) -> [u8; HASH_BYTES] {
        let mut out = [0u8; HASH_BYTES];
        // The hash part was validated on construction; a decode failure cannot happen here,
        // and zeros are a harmless answer if it ever did.
        if let Ok(v) = base32::decode(self.hash_part(), HASH_BYTES) {
            out.copy_from_slice(&v);
        }
        out
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.base)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({})", self.base)
    }
}

impl FromStr for StorePath {
    type Err = StorePathError;
    fn from_str(s: &str) -> Result<Self, StorePathError> {
        StorePath::from_base_name(s)
    }
}

impl TryFrom<String> for StorePath {
    type Error = StorePathError;
    fn try_from(s: String) -> Result<Self, StorePathError> {
        StorePath::from_base_name(&s)
    }
}

impl From<StorePath> for String {
    fn from(p: StorePath) -> String {
        p.base
    }
}

/// The store directory (`/nix/store` unless `NIX_STORE_DIR` says otherwise); it takes part in
/// every path hash, so it is carried explicitly rather than assumed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StoreDir(String);

impl Default for StoreDir {
    fn default() -> Self {
        StoreDir(DEFAULT_STORE_DIR.to_string())
    }
}

impl StoreDir {
    pub fn new(dir: &str) -> Result<StoreDir, StorePathError> {
        if !dir.starts_with('/')
            || (dir.len() > 1 && dir.ends_with('/'))
            || dir.contains("//")
            || dir.split('/').any(|c| c == "." || c == "..")
            || dir.contains('\0')
        {
            return Err(StorePathError::BadStoreDir(dir.to_string()));
        }
        Ok(StoreDir(dir.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Parses a full path; it must be exactly `<storeDir>/<base>` with no further components.
    pub fn parse(&self, path: &str) -> Result<StorePath, StorePathError> {
        let base = path
            .strip_prefix(self.0.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .filter(|b| !b.contains('/'))
            .ok_or_else(|| StorePathError::NotInStore(path.to_string()))?;
        StorePath::from_base_name(base).map_err(|e| match e {
            StorePathError::BadHash(_) => StorePathError::BadHash(path.to_string()),
            other => other,
        })
    }

    /// Like [`parse`](Self::parse), but accepts a path inside a store path and returns the
    /// store path plus the remainder (`/nix/store/x-y/bin/sh` → (`x-y`, `/bin/sh`)).
    pub fn parse_prefix<'a>(&self, path: &'a str) -> Result<(StorePath, &'a str), StorePathError> {
        let rest = path
            .strip_prefix(self.0.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| StorePathError::NotInStore(path.to_string()))?;
        let (base, tail) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        Ok((StorePath::from_base_name(base)?, tail))
    }

    pub fn display(&self, p: &StorePath) -> String {
        format!("{}/{}", self.0, p.base)
    }

    /// `hash = b32(compress(sha256("<type>:sha256:<hex inner>:<storeDir>:<name>"), 20))`.
    pub fn make_path(
        &self,
        path_type: &str,
        inner: &Hash,
        name: &str,
    ) -> Result<StorePath, StorePathError> {
        let fingerprint = format!(
            "{}:{}:{}:{}:{}",
            path_type,
            inner.algo(),
            inner.to_base16(),
            self.0,
            name
        );
        let h = Hash::sha256(fingerprint.as_bytes());
        let c = hash::compress(h.digest(), HASH_BYTES);
        let mut digest = [0u8; HASH_BYTES];
        digest.copy_from_slice(&c);
        StorePath::from_hash(&digest, name)
    }

    fn type_with_refs(&self, mut ty: String, refs: &BTreeSet<StorePath>, self_ref: bool) -> String {
        for r in refs {
            ty.push(':');
            ty.push_str(&self.display(r));
        }
        if self_ref {
            ty.push_str(":self");
        }
        ty
    }

    /// A text path (`.drv` files, `builtins.toFile`): `text` + references, over sha256 of
    /// the contents.
    pub fn make_text_path(
        &self,
        name: &str,
        content_sha256: &Hash,
        refs: &BTreeSet<StorePath>,
    ) -> Result<StorePath, StorePathError> {
        self.make_path(
            &self.type_with_refs("text".to_string(), refs, false),
            content_sha256,
            name,
        )
    }

    /// A fixed-output path. Recursive sha256 is a `source` path (which may have references
    /// and a self-reference); everything else hashes `fixed:out:<r:><algo>:<hex>:` as output
    /// `out` and may have no references.
    pub fn make_fixed_output_path(
        &self,
        name: &str,
        method: FileIngestion,
        hash: &Hash,
        refs: &BTreeSet<StorePath>,
        self_ref: bool,
    ) -> Result<StorePath, StorePathError> {
        if method == FileIngestion::Recursive && hash.algo() == HashAlgo::Sha256 {
            self.make_path(
                &self.type_with_refs("source".to_string(), refs, self_ref),
                hash,
                name,
            )
        } else {
            let inner = Hash::sha256(
                format!(
                    "fixed:out:{}{}:{}:",
                    method.prefix(),
                    hash.algo(),
                    hash.to_base16()
                )
                .as_bytes(),
            );
            self.make_path("output:out", &inner, name)
        }
    }

    /// The path of output `output` of a derivation named `drv_name` whose masked
    /// `hashDerivationModulo` is `drv_hash`.
    pub fn make_output_path(
        &self,
        output: &str,
        drv_hash: &Hash,
        drv_name: &str,
    ) -> Result<StorePath, StorePathError> {
        let name = output_path_name(drv_name, output);
        self.make_path(&format!("output:{output}"), drv_hash, &name)
    }
}

/// `<drvName>` for output `out`, else `<drvName>-<output>`.
pub fn output_path_name(drv_name: &str, output: &str) -> String {
    if output == "out" {
        drv_name.to_string()
    } else {
        format!("{drv_name}-{output}")
    }
}

/// How file-system data becomes the bytes that are hashed: the file's contents (flat) or its
/// NAR serialisation (recursive).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FileIngestion {
    Flat,
    Recursive,
}

impl FileIngestion {
    pub fn prefix(self) -> &'static str {
        match self {
            FileIngestion::Flat => "",
            FileIngestion::Recursive => "r:",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print() {
        let sd = StoreDir::default();
        let p = sd
            .parse("/nix/store/hv2lxdwpbmd9zfj87n6n7z5wxhnswizx-t")
            .unwrap();
        assert_eq!(p.hash_part(), "hv2lxdwpbmd9zfj87n6n7z5wxhnswizx");
        assert_eq!(p.name(), "t");
        assert_eq!(
            sd.display(&p),
            "/nix/store/hv2lxdwpbmd9zfj87n6n7z5wxhnswizx-t"
        );
        assert_eq!(
            StorePath::from_hash(&p.hash_bytes(), "t").unwrap(),
            p,
            "hash part round-trips"
        );
    }

    #[test]
    fn rejects() {
        let sd = StoreDir::default();
        let h = "hv2lxdwpbmd9zfj87n6n7z5wxhnswizx";
        for bad in [
            "/nix/store/../etc".to_string(),
            format!("/nix/store/{h}"),
            format!("/nix/store/{h}-"),
            format!("/nix/store/{h}x"),
            format!("/nix/store/{h}-a b"),
            format!("/nix/store/{h}-a/b"),
            format!("/nix/store/{h}-a\0"),
            format!("/nix/store//{h}-a"),
            format!("/nix/storex/{h}-a"),
            format!("/other/{h}-a"),
            format!("/nix/store/{}-a", &h[..31]),
            format!("/nix/store/e{}-a", &h[1..]),
            format!("/nix/store/{h}-.."),
            format!("/nix/store/{h}-{}", "a".repeat(212)),
        ] {
            assert!(sd.parse(&bad).is_err(), "{bad:?} accepted");
        }
        assert!(sd
            .parse(&format!("/nix/store/{h}-{}", "a".repeat(211)))
            .is_ok());
        assert!(sd.parse(&format!("/nix/store/{h}-.bashrc")).is_ok());
        assert!(sd.parse(&format!("/nix/store/{h}-a+-._?=Z9")).is_ok());
    }

    #[test]
    fn recursive_sha256_is_source() {
        let sd = StoreDir::default();
        let h = Hash::sha256(b"x");
        let a = sd
            .make_fixed_output_path("t", FileIngestion::Recursive, &h, &BTreeSet::new(), false)
            .unwrap();
        assert_eq!(a, sd.make_path("source", &h, "t").unwrap());
        let flat = sd
            .make_fixed_output_path("t", FileIngestion::Flat, &h, &BTreeSet::new(), false)
            .unwrap();
        assert_ne!(a, flat);
    }

    #[test]
    fn prefix_parse() {
        let sd = StoreDir::default();
        let (p, rest) = sd
            .parse_prefix("/nix/store/hv2lxdwpbmd9zfj87n6n7z5wxhnswizx-t/bin/sh")
            .unwrap();
        assert_eq!((p.name(), rest), ("t", "/bin/sh"));
    }
}
