//! Content addresses: the `ca` column and field (`text:sha256:<b32>`, `fixed:[r:]<algo>:<b32>`)
//! and the method strings AddToStore carries (`text:sha256`, `fixed:[r:]<algo>`).

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::hash::{Encoding, Hash, HashAlgo, HashError};
use crate::store_path::{FileIngestion, StoreDir, StorePath, StorePathError};

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ContentAddressError {
    #[error("'{0}' is not a content address because it is not in the form '<prefix>:<rest>'")]
    Form(String),
    #[error(
        "content address prefix '{0}' is unrecognized; recognized prefixes are 'text' and 'fixed'"
    )]
    Prefix(String),
    #[error("text content address hash should use sha256, but '{0}' does not")]
    TextNotSha256(String),
    #[error("bad hash in content address '{0}': {1}")]
    Hash(String, HashError),
    #[error(transparent)]
    Path(#[from] StorePathError),
    #[error("a {0} content address cannot have references")]
    RefsNotAllowed(&'static str),
}

/// How an AddToStore request wants its data addressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContentAddressMethod {
    Text,
    Fixed(FileIngestion),
}

impl ContentAddressMethod {
    /// Parses `text:sha256` or `fixed:[r:]<algo>` as sent by AddToStore (minor ≥ 25).
    pub fn parse_with_algo(s: &str) -> Result<(Self, HashAlgo), ContentAddressError> {
        let (m, rest) = split_method(s)?;
        let algo: HashAlgo = rest
            .parse()
            .map_err(|e| ContentAddressError::Hash(s.to_string(), e))?;
        if m == ContentAddressMethod::Text && algo != HashAlgo::Sha256 {
            return Err(ContentAddressError::TextNotSha256(s.to_string()));
        }
        Ok((m, algo))
    }

    pub fn render_with_algo(self, algo: HashAlgo) -> String {
        format!("{}{}", self.prefix(), algo)
    }

    fn prefix(self) -> &'static str {
        match self {
            ContentAddressMethod::Text => "text:",
            ContentAddressMethod::Fixed(FileIngestion::Flat) => "fixed:",
            ContentAddressMethod::Fixed(FileIngestion::Recursive) => "fixed:r:",
        }
    }
}

/// Splits `text:…` / `fixed:r:…` / `fixed:…` into method and remainder.
fn split_method(s: &str) -> Result<(ContentAddressMethod, &str), ContentAddressError> {
    let (prefix, rest) = s
        .split_once(':')
        .ok_or_else(|| ContentAddressError::Form(s.to_string()))?;
    match prefix {
        "text" => Ok((ContentAddressMethod::Text, rest)),
        "fixed" => match rest.strip_prefix("r:") {
            Some(r) => Ok((ContentAddressMethod::Fixed(FileIngestion::Recursive), r)),
            None => Ok((ContentAddressMethod::Fixed(FileIngestion::Flat), rest)),
        },
        other => Err(ContentAddressError::Prefix(other.to_string())),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentAddress {
    pub method: ContentAddressMethod,
    pub hash: Hash,
}

impl ContentAddress {
    pub fn text(sha256: Hash) -> Self {
        ContentAddress {
            method: ContentAddressMethod::Text,
            hash: sha256,
        }
    }

    pub fn fixed(ingestion: FileIngestion, hash: Hash) -> Self {
        ContentAddress {
            method: ContentAddressMethod::Fixed(ingestion),
            hash,
        }
    }

    /// Parses the `ca` form; the hash must carry its algorithm.
    pub fn parse(s: &str) -> Result<Self, ContentAddressError> {
        let (method, rest) = split_method(s)?;
        let hash =
            Hash::parse_typed(rest).map_err(|e| ContentAddressError::Hash(s.to_string(), e))?;
        if method == ContentAddressMethod::Text && hash.algo() != HashAlgo::Sha256 {
            return Err(ContentAddressError::TextNotSha256(s.to_string()));
        }
        Ok(ContentAddress { method, hash })
    }

    /// Parses the optional form used on the wire and in the database (empty = none).
    pub fn parse_opt(s: &str) -> Result<Option<Self>, ContentAddressError> {
        if s.is_empty() {
            Ok(None)
        } else {
            Self::parse(s).map(Some)
        }
    }

    /// The store path this address yields for `name` with `refs`. Only text and recursive
    /// sha256 addresses may have references.
    pub fn store_path(
        &self,
        store_dir: &StoreDir,
        name: &str,
        refs: &BTreeSet<StorePath>,
        self_ref: bool,
    ) -> Result<StorePath, ContentAddressError> {
        match self.method {
            ContentAddressMethod::Text => {
                if self_ref {
                    return Err(ContentAddressError::RefsNotAllowed("self-referencing text"));
                }
                Ok(store_dir.make_text_path(name, &self.hash, refs)?)
            }
            ContentAddressMethod::Fixed(ingestion) => {
                let source =
                    ingestion == FileIngestion::Recursive && self.hash.algo() == HashAlgo::Sha256;
                if !source && (self_ref || !refs.is_empty()) {
                    return Err(ContentAddressError::RefsNotAllowed("fixed-output"));
                }
                Ok(
                    store_dir
                        .make_fixed_output_path(name, ingestion, &self.hash, refs, self_ref)?,
                )
            }
        }
    }
}

impl fmt::Display for ContentAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}{}",
            self.method.prefix(),
            self.hash.to_typed(Encoding::Base32)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let h = Hash::sha256(b"abc");
        for ca in [
            ContentAddress::text(h),
            ContentAddress::fixed(FileIngestion::Recursive, h),
            ContentAddress::fixed(FileIngestion::Flat, Hash::of(HashAlgo::Sha1, b"x")),
            ContentAddress::fixed(FileIngestion::Recursive, Hash::of(HashAlgo::Md5, b"x")),
        ] {
            let s = ca.to_string();
            assert_eq!(ContentAddress::parse(&s).unwrap(), ca, "{s}");
        }
        assert!(
            ContentAddress::to_string(&ContentAddress::fixed(FileIngestion::Recursive, h))
                .starts_with("fixed:r:sha256:")
        );
    }

    #[test]
    fn methods() {
        assert_eq!(
            ContentAddressMethod::parse_with_algo("fixed:r:sha256").unwrap(),
            (
                ContentAddressMethod::Fixed(FileIngestion::Recursive),
                HashAlgo::Sha256
            )
        );
        assert_eq!(
            ContentAddressMethod::parse_with_algo("fixed:md5").unwrap(),
            (
                ContentAddressMethod::Fixed(FileIngestion::Flat),
                HashAlgo::Md5
            )
        );
        assert!(ContentAddressMethod::parse_with_algo("text:sha1").is_err());
        assert!(ContentAddressMethod::parse_with_algo("nar:sha256").is_err());
        assert!(ContentAddressMethod::parse_with_algo("fixed").is_err());
    }

    #[test]
    fn refs_only_where_allowed() {
        let sd = StoreDir::default();
        let r: BTreeSet<StorePath> = ["hv2lxdwpbmd9zfj87n6n7z5wxhnswizx-t".parse().unwrap()].into();
        let flat = ContentAddress::fixed(FileIngestion::Flat, Hash::sha256(b"x"));
        assert!(flat.store_path(&sd, "n", &r, false).is_err());
        assert!(ContentAddress::text(Hash::sha256(b"x"))
            .store_path(&sd, "n", &r, false)
            .is_ok());
    }
}
