//! Ed25519 keys and detached signatures in Nix's text forms, and the path fingerprint they sign.
//!
//! - secret key: `name:base64(64 bytes)`, libsodium layout: 32-byte seed ‖ 32-byte public key;
//! - public key: `name:base64(32 bytes)`;
//! - signature: `name:base64(64 bytes)`, over a fingerprint such as [`fingerprint_path`].
//!
//! The name is everything before the first `:`. A signature only counts against the trusted key
//! of the same name. Signing is deterministic (RFC 8032), so the same key signs the same
//! fingerprint to the same bytes libsodium produces.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use thiserror::Error;
use zeroize::Zeroizing;

use crate::hash::{Encoding, Hash, HashAlgo};
use crate::store_path::{StoreDir, StorePath};

/// Bytes of a libsodium secret key (seed ‖ public key).
pub const SECRET_KEY_BYTES: usize = 64;
/// Bytes of a public key.
pub const PUBLIC_KEY_BYTES: usize = 32;
/// Bytes of a detached signature.
pub const SIGNATURE_BYTES: usize = 64;

/// Standard alphabet; Nix always pads, but a missing pad changes nothing about the bytes.
/// Non-zero trailing bits are refused so that every accepted text has exactly one meaning.
const B64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum KeyError {
    #[error("{0} is not of the form '<name>:<base64>'")]
    Form(&'static str),
    #[error("{0} has an empty name or one containing whitespace or control characters")]
    BadName(&'static str),
    #[error("{0} is not valid base64")]
    Base64(&'static str),
    #[error("{what} is {got} bytes long, expected {expected}")]
    Length {
        what: &'static str,
        got: usize,
        expected: usize,
    },
    #[error("secret key is not valid: its public half does not belong to its seed")]
    PublicMismatch,
    #[error("public key is not a valid ed25519 point")]
    BadPoint,
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FingerprintError {
    #[error("cannot calculate fingerprint of path '{0}' because its size is not known")]
    NoNarSize(String),
    #[error("cannot calculate fingerprint of path '{0}': its NAR hash is {1}, not sha256")]
    NotSha256(String, HashAlgo),
}

const SECRET: &str = "secret key";
const PUBLIC: &str = "public key";
const SIGNATURE: &str = "signature";

/// Key names end up in whitespace-separated settings (`trusted-public-keys`) and in the
/// space-separated `sigs` column, so whitespace and control characters would not survive.
fn check_name(name: &str, what: &'static str) -> Result<(), KeyError> {
    if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(KeyError::BadName(what));
    }
    Ok(())
}

/// Splits `name:base64` and decodes the payload, which must be exactly `N` bytes. The length is
/// checked on the text before decoding, so hostile input never makes a large allocation here.
fn split_decode<'a, const N: usize>(
    s: &'a str,
    what: &'static str,
) -> Result<(&'a str, Zeroizing<[u8; N]>), KeyError> {
    let (name, data) = s.split_once(':').ok_or(KeyError::Form(what))?;
    check_name(name, what)?;
    if data.is_empty() {
        return Err(KeyError::Form(what));
    }
    let max_text = N.div_ceil(3) * 4;
    if data.len() > max_text {
        return Err(KeyError::Length {
            what,
            got: data.len() / 4 * 3,
            expected: N,
        });
    }
    let mut buf = Zeroizing::new([0u8; 66]);
    let n = B64
        .decode_slice(data, &mut buf[..])
        .map_err(|_| KeyError::Base64(what))?;
    if n != N {
        return Err(KeyError::Length {
            what,
            got: n,
            expected: N,
        });
    }
    let mut out = Zeroizing::new([0u8; N]);
    out.copy_from_slice(&buf[..N]);
    Ok((name, out))
}

/// Key files are often written with a trailing newline; Nix's decoder skips newlines.
fn trim_key_text(s: &str) -> &str {
    s.trim_end_matches(['\n', '\r', ' ', '\t'])
}

/// An ed25519 signing key with its name. The key material is wiped when dropped.
#[derive(Clone)]
pub struct SecretKey {
    name: String,
    key: SigningKey,
}

impl SecretKey {
    /// Parses `name:base64(seed ‖ public)`; the public half must be the one the seed yields.
    pub fn parse(s: &str) -> Result<SecretKey, KeyError> {
        let (name, bytes) = split_decode::<SECRET_KEY_BYTES>(trim_key_text(s), SECRET)?;
        let key = SigningKey::from_keypair_bytes(&bytes).map_err(|_| KeyError::PublicMismatch)?;
        Ok(SecretKey {
            name: name.to_string(),
            key,
        })
    }

    /// A fresh key from the operating system's CSPRNG.
    pub fn generate(name: &str) -> Result<SecretKey, KeyError> {
        check_name(name, SECRET)?;
        let key = SigningKey::generate(&mut rand_core::OsRng);
        Ok(SecretKey {
            name: name.to_string(),
            key,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn to_public(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// The text form `name:base64(seed ‖ public)`. Not a `Display` impl, so that secret
    /// material is never printed by accident; the returned string is wiped when dropped.
    pub fn to_text(&self) -> Zeroizing<String> {
        let bytes = Zeroizing::new(self.key.to_keypair_bytes());
        let mut s = Zeroizing::new(String::with_capacity(self.name.len() + 1 + 88));
        s.push_str(&self.name);
        s.push(':');
        B64.encode_string(&bytes[..], &mut s);
        s
    }

    pub fn sign(&self, fingerprint: impl AsRef<[u8]>) -> Signature {
        Signature {
            name: self.name.clone(),
            bytes: self.key.sign(fingerprint.as_ref()).to_bytes(),
        }
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({}, public {})", self.name, self.to_public())
    }
}

/// An ed25519 verifying key with its name.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: VerifyingKey,
}

impl PublicKey {
    /// Parses `name:base64(32 bytes)`. Bytes that are not a curve point, or a point of small
    /// order, are refused: such a key could never verify anything under strict verification.
    pub fn parse(s: &str) -> Result<PublicKey, KeyError> {
        let (name, bytes) = split_decode::<PUBLIC_KEY_BYTES>(trim_key_text(s), PUBLIC)?;
        let key = VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::BadPoint)?;
        if key.is_weak() {
            return Err(KeyError::BadPoint);
        }
        Ok(PublicKey {
            name: name.to_string(),
            key,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn as_bytes(&self) -> &[u8; PUBLIC_KEY_BYTES] {
        self.key.as_bytes()
    }

    /// True if `sig` carries this key's name and is a valid signature of `fingerprint` by it.
    /// Strict verification (no small-order keys or R, canonical S), as libsodium does.
    pub fn verify(&self, fingerprint: impl AsRef<[u8]>, sig: &Signature) -> bool {
        sig.name == self.name
            && self
                .key
                .verify_strict(
                    fingerprint.as_ref(),
                    &ed25519_dalek::Signature::from_bytes(&sig.bytes),
                )
                .is_ok()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, B64.encode(self.key.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        PublicKey::parse(s)
    }
}

/// A detached signature `name:base64(64 bytes)`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Signature {
    name: String,
    bytes: [u8; SIGNATURE_BYTES],
}

impl Signature {
    pub fn parse(s: &str) -> Result<Signature, KeyError> {
        let (name, bytes) = split_decode::<SIGNATURE_BYTES>(s, SIGNATURE)?;
        Ok(Signature {
            name: name.to_string(),
            bytes: *bytes,
        })
    }

    /// The name of the key that claims to have made this signature.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn bytes(&self) -> &[u8; SIGNATURE_BYTES] {
        &self.bytes
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, B64.encode(self.bytes))
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({self})")
    }
}

impl FromStr for Signature {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        Signature::parse(s)
    }
}

/// A set of trusted public keys, looked up by name. As in Nix, when two keys share a name the
/// first one added is kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedKeys {
    keys: BTreeMap<String, PublicKey>,
}

impl TrustedKeys {
    pub fn new() -> TrustedKeys {
        TrustedKeys::default()
    }

    /// Parses a whitespace-separated list, the form of the `trusted-public-keys` setting.
    pub fn parse_list(s: &str) -> Result<TrustedKeys, KeyError> {
        let mut keys = TrustedKeys::new();
        for word in s.split_ascii_whitespace() {
            keys.insert(PublicKey::parse(word)?);
        }
        Ok(keys)
    }

    /// Adds a key; false (and the set unchanged) if a key of that name is already present.
    pub fn insert(&mut self, key: PublicKey) -> bool {
        if self.keys.contains_key(&key.name) {
            return false;
        }
        self.keys.insert(key.name.clone(), key);
        true
    }

    pub fn get(&self, name: &str) -> Option<&PublicKey> {
        self.keys.get(name)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &PublicKey> {
        self.keys.values()
    }

    /// True if `sig` (text form) is a valid signature of `fingerprint` by the trusted key of
    /// its name. Unknown names and malformed signatures are simply not valid.
    pub fn verify(&self, fingerprint: impl AsRef<[u8]>, sig: &str) -> bool {
        let Ok(sig) = Signature::parse(sig) else {
            return false;
        };
        self.keys
            .get(&sig.name)
            .is_some_and(|k| k.verify(fingerprint.as_ref(), &sig))
    }

    /// The name of the first trusted key (in `sigs` order) that validly signed `fingerprint`.
    pub fn verify_any<I, S>(&self, fingerprint: impl AsRef<[u8]>, sigs: I) -> Option<&str>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let fp = fingerprint.as_ref();
        sigs.into_iter().find_map(|s| {
            let sig = Signature::parse(s.as_ref()).ok()?;
            let key = self.keys.get(&sig.name)?;
            key.verify(fp, &sig).then_some(key.name.as_str())
        })
    }
}

impl FromIterator<PublicKey> for TrustedKeys {
    fn from_iter<T: IntoIterator<Item = PublicKey>>(iter: T) -> Self {
        let mut keys = TrustedKeys::new();
        for k in iter {
            keys.insert(k);
        }
        keys
    }
}

/// True if `sig` is a valid signature of `fingerprint` by the trusted key of the same name.
pub fn verify(fingerprint: impl AsRef<[u8]>, sig: &str, keys: &TrustedKeys) -> bool {
    keys.verify(fingerprint, sig)
}

/// What a store path signature covers:
/// `1;<path>;sha256:<b32 narHash>;<narSize>;<refs as full paths, sorted, joined by ",">`.
/// A path without a known size (0) or with a non-sha256 NAR hash has no fingerprint.
pub fn fingerprint_path(
    store_dir: &StoreDir,
    path: &StorePath,
    nar_hash: &Hash,
    nar_size: u64,
    references: &BTreeSet<StorePath>,
) -> Result<String, FingerprintError> {
    let full = store_dir.display(path);
    if nar_size == 0 {
        return Err(FingerprintError::NoNarSize(full));
    }
    if nar_hash.algo() != HashAlgo::Sha256 {
        return Err(FingerprintError::NotSha256(full, nar_hash.algo()));
    }
    // Every full path has the same prefix, so base-name order is full-path order.
    let refs: Vec<String> = references.iter().map(|r| store_dir.display(r)).collect();
    Ok(format!(
        "1;{};{};{};{}",
        full,
        nar_hash.to_typed(Encoding::Base32),
        nar_size,
        refs.join(",")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Made by `nix-store --generate-binary-cache-key test-1 sec pub` (Nix 2.8.0).
    const NIX_SEC: &str = "test-1:Rq0Em03BmJbm88MzHTkL3W8u7rQkIC8BHURrz7nVFoZGfSO+hzYUoeOH9EW9YN/dLxDV+vUyDMEUakU3+Ft1bg==";
    const NIX_PUB: &str = "test-1:Rn0jvoc2FKHjh/RFvWDf3S8Q1fr1MgzBFGpFN/hbdW4=";
    // `nix store sign` with that key on `nix-store --add` of a file containing "hello\n".
    const NIX_PATH: &str = "/nix/store/6h9lcbx523532ax1c5g2351w9bm8ykhy-f.txt";
    const NIX_NAR_HASH: &str = "sha256-HDfQGvQL4ugGkd48w99EN3ppmvuxfGjwgJZLL9Bx/BM=";
    const NIX_SIG: &str = "test-1:I1roKQmjvkB2BXn9bJ53LujvOR/CpvVOOOT0Pvp9DbJmgDzgoE8anzdgGjujmOUNWYkXpAeJ/+OsR3h0NcUWAg==";

    fn nix_fingerprint() -> String {
        let sd = StoreDir::default();
        let p = sd.parse(NIX_PATH).unwrap();
        let h = Hash::parse_typed(NIX_NAR_HASH).unwrap();
        fingerprint_path(&sd, &p, &h, 120, &BTreeSet::new()).unwrap()
    }

    #[test]
    fn nix_key_pair() {
        let sk = SecretKey::parse(NIX_SEC).unwrap();
        assert_eq!(sk.to_public().to_string(), NIX_PUB);
        assert_eq!(sk.to_text().as_str(), NIX_SEC);
        assert_eq!(PublicKey::parse(NIX_PUB).unwrap(), sk.to_public());
        assert_eq!(sk.name(), "test-1");
        // A key file with a trailing newline still parses.
        assert!(SecretKey::parse(&format!("{NIX_SEC}\n")).is_ok());
    }

    #[test]
    fn nix_signature_is_reproduced_and_verified() {
        let fp = nix_fingerprint();
        assert_eq!(
            fp,
            "1;/nix/store/6h9lcbx523532ax1c5g2351w9bm8ykhy-f.txt;\
             sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw;120;"
        );
        let sk = SecretKey::parse(NIX_SEC).unwrap();
        assert_eq!(sk.sign(&fp).to_string(), NIX_SIG);
        let keys = TrustedKeys::parse_list(&format!("  {NIX_PUB}\n")).unwrap();
        assert!(verify(&fp, NIX_SIG, &keys));
        assert!(!verify(format!("{fp}x"), NIX_SIG, &keys));
        assert_eq!(keys.verify_any(&fp, ["junk", NIX_SIG]), Some("test-1"));
        assert_eq!(keys.verify_any(&fp, ["junk"]), None);
    }

    #[test]
    fn name_must_match() {
        let fp = nix_fingerprint();
        let sk = SecretKey::parse(NIX_SEC).unwrap();
        // Same key bytes under another name: not trusted for "test-1" signatures.
        let renamed = PublicKey::parse(&NIX_PUB.replace("test-1", "other")).unwrap();
        let keys: TrustedKeys = [renamed.clone()].into_iter().collect();
        assert!(!verify(&fp, NIX_SIG, &keys));
        assert!(!renamed.verify(&fp, &sk.sign(&fp)));
        let resigned = NIX_SIG.replace("test-1", "other");
        assert!(verify(&fp, &resigned, &keys));
    }

    #[test]
    fn generated_keys_sign_and_verify() {
        let a = SecretKey::generate("a-1").unwrap();
        let b = SecretKey::generate("a-1").unwrap();
        assert_ne!(a.to_public(), b.to_public());
        let again = SecretKey::parse(&a.to_text()).unwrap();
        assert_eq!(again.to_public(), a.to_public());
        let sig = a.sign("data");
        assert_eq!(Signature::parse(&sig.to_string()).unwrap(), sig);
        assert!(a.to_public().verify("data", &sig));
        assert!(!b.to_public().verify("data", &sig));
        // First key of a name wins, as in Nix.
        let mut keys = TrustedKeys::new();
        assert!(keys.insert(a.to_public()));
        assert!(!keys.insert(b.to_public()));
        assert!(keys.verify("data", &sig.to_string()));
        assert!(SecretKey::generate("").is_err());
        assert!(SecretKey::generate("a b").is_err());
    }

    #[test]
    fn malformed() {
        let sk_bytes = B64.decode(NIX_SEC.split_once(':').unwrap().1).unwrap();
        // Public half from another seed.
        let mut wrong = sk_bytes.clone();
        wrong[40] ^= 1;
        assert_eq!(
            SecretKey::parse(&format!("x:{}", B64.encode(&wrong))).unwrap_err(),
            KeyError::PublicMismatch
        );
        for bad in [
            "",
            "nocolon",
            ":abcd",
            "name:",
            "na me:Rn0jvoc2FKHjh/RFvWDf3S8Q1fr1MgzBFGpFN/hbdW4=",
            "n:Rn0jvoc2FKHjh/RFvWDf3S8Q1fr1MgzBFGpFN/hbdW4=AAAA",
            "n:!n0jvoc2FKHjh/RFvWDf3S8Q1fr1MgzBFGpFN/hbdW4=",
            "n:Rn0jvoc2FKHjh/RFvWDf3S8Q1fr1MgzBFGpFN/hbdW5=",
        ] {
            assert!(PublicKey::parse(bad).is_err(), "{bad:?}");
            assert!(SecretKey::parse(bad).is_err(), "{bad:?}");
            assert!(Signature::parse(bad).is_err(), "{bad:?}");
        }
        // Unpadded is the same key.
        assert!(PublicKey::parse(NIX_PUB.trim_end_matches('=')).is_ok());
        // A 32-byte text that is no curve point.
        let mut y2 = [0u8; 32];
        y2[0] = 2;
        let not_point = format!("n:{}", B64.encode(y2));
        assert_eq!(PublicKey::parse(&not_point), Err(KeyError::BadPoint));
        // The identity (y = 1) is a point, but of small order: it signs nothing.
        y2[0] = 1;
        let weak = format!("n:{}", B64.encode(y2));
        assert_eq!(PublicKey::parse(&weak), Err(KeyError::BadPoint));
        let long = format!("n:{}", "A".repeat(10_000));
        assert!(matches!(
            Signature::parse(&long),
            Err(KeyError::Length { .. })
        ));
        let keys = TrustedKeys::parse_list(NIX_PUB).unwrap();
        assert!(!verify("x", "test-1:AAAA", &keys));
        assert!(!verify("x", "test-1", &keys));
        assert!(TrustedKeys::parse_list("good:bad").is_err());
    }

    #[test]
    fn fingerprint_rules() {
        let sd = StoreDir::default();
        let p = sd.parse(NIX_PATH).unwrap();
        let h = Hash::parse_typed(NIX_NAR_HASH).unwrap();
        assert!(matches!(
            fingerprint_path(&sd, &p, &h, 0, &BTreeSet::new()),
            Err(FingerprintError::NoNarSize(_))
        ));
        let h512 = Hash::of(HashAlgo::Sha512, b"x");
        assert!(matches!(
            fingerprint_path(&sd, &p, &h512, 1, &BTreeSet::new()),
            Err(FingerprintError::NotSha256(..))
        ));
        let r1: StorePath = "hv2lxdwpbmd9zfj87n6n7z5wxhnswizx-t".parse().unwrap();
        let r0: StorePath = "0v2lxdwpbmd9zfj87n6n7z5wxhnswizx-z".parse().unwrap();
        let fp = fingerprint_path(&sd, &p, &h, 5, &[r1, r0].into()).unwrap();
        assert!(fp.ends_with(
            ";5;/nix/store/0v2lxdwpbmd9zfj87n6n7z5wxhnswizx-z,\
             /nix/store/hv2lxdwpbmd9zfj87n6n7z5wxhnswizx-t"
        ));
    }
}
