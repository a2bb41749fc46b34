//! Hashes as Nix names and prints them: md5, sha1, sha256, sha512, in base16, Nix base32,
//! base64 and SRI form.

use std::fmt;
use std::io;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use md5::Md5;
use serde::{Deserialize, Serialize};
use sha1::Sha1;
use sha2::{Digest, Sha256, Sha512};
use thiserror::Error;

use crate::base32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum HashAlgo {
    Md5,
    Sha1,
    Sha256,
    Sha512,
}

impl HashAlgo {
    pub const ALL: [HashAlgo; 4] = [Self::Md5, Self::Sha1, Self::Sha256, Self::Sha512];

    pub const fn size(self) -> usize {
        match self {
            Self::Md5 => 16,
            Self::Sha1 => 20,
            Self::Sha256 => 32,
            Self::Sha512 => 64,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::Md5 => "md5",
            Self::Sha1 => "sha1",
            Self::Sha256 => "sha256",
            Self::Sha512 => "sha512",
        }
    }

    pub fn base16_len(self) -> usize {
        self.size() * 2
    }

    pub fn base32_len(self) -> usize {
        base32::encoded_len(self.size())
    }

    pub fn base64_len(self) -> usize {
        self.size().div_ceil(3) * 4
    }
}

impl fmt::Display for HashAlgo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for HashAlgo {
    type Err = HashError;
    fn from_str(s: &str) -> Result<Self, HashError> {
        match s {
            "md5" => Ok(Self::Md5),
            "sha1" => Ok(Self::Sha1),
            "sha256" => Ok(Self::Sha256),
            "sha512" => Ok(Self::Sha512),
            _ => Err(HashError::UnknownAlgo(s.to_string())),
        }
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum HashError {
    #[error("unknown hash algorithm '{0}'")]
    UnknownAlgo(String),
    #[error("hash '{0}' does not include a type")]
    NoAlgo(String),
    #[error("hash '{hash}' has wrong length for hash type '{algo}'")]
    BadLength { hash: String, algo: HashAlgo },
    #[error("invalid base-16 hash '{0}'")]
    BadBase16(String),
    #[error("invalid base-32 hash '{0}'")]
    BadBase32(String),
    #[error("invalid base-64 hash '{0}'")]
    BadBase64(String),
    #[error("hash '{hash}' should have type '{expected}'")]
    WrongAlgo { hash: String, expected: HashAlgo },
}

/// Text encodings Nix prints hashes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Base16,
    Base32,
    Base64,
    Sri,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash {
    algo: HashAlgo,
    bytes: [u8; 64],
}

impl Hash {
    /// Builds a hash from raw digest bytes; `None` if the length does not fit the algorithm.
    pub fn from_bytes(algo: HashAlgo, digest: &[u8]) -> Option<Hash> {
        if digest.len() != algo.size() {
            return None;
        }
        let mut bytes = [0u8; 64];
        bytes[..digest.len()].copy_from_slice(digest);
        Some(Hash { algo, bytes })
    }

    pub fn algo(&self) -> HashAlgo {
        self.algo
    }

    pub fn digest(&self) -> &[u8] {
        &self.bytes[..self.algo.size()]
    }

    pub fn of(algo: HashAlgo, data: &[u8]) -> Hash {
        let mut h = Hasher::new(algo);
        h.update(data);
        h.finish()
    }

    pub fn sha256(data: &[u8]) -> Hash {
        Self::of(HashAlgo::Sha256, data)
    }

    pub fn to_base16(&self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(self.algo.base16_len());
        for b in self.digest() {
            s.push(HEX[(b >> 4) as usize] as char);
            s.push(HEX[(b & 15) as usize] as char);
        }
        s
    }

    pub fn to_base32(&self) -> String {
        base32::encode(self.digest())
    }

    pub fn to_base64(&self) -> String {
        B64.encode(self.digest())
    }

    pub fn encode(&self, enc: Encoding) -> String {
        match enc {
            Encoding::Base16 => self.to_base16(),
            Encoding::Base32 => self.to_base32(),
            Encoding::Base64 => self.to_base64(),
            Encoding::Sri => self.to_sri(),
        }
    }

    /// `algo:digest` in the given encoding (SRI has its own prefix form).
    pub fn to_typed(&self, enc: Encoding) -> String {
        match enc {
            Encoding::Sri => self.to_sri(),
            _ => format!("{}:{}", self.algo, self.encode(enc)),
        }
    }

    pub fn to_sri(&self) -> String {
        format!("{}-{}", self.algo, self.to_base64())
    }

    /// Parses a bare digest whose algorithm is known; the encoding is chosen by length, as
    /// Nix does (base16, then Nix base32, then base64).
    pub fn parse_digest(algo: HashAlgo, s: &str) -> Result<Hash, HashError> {
        let bytes = if s.len() == algo.base16_len() {
            decode_base16(s).ok_or_else(|| HashError::BadBase16(s.to_string()))?
        } else if s.len() == algo.base32_len() {
            base32::decode(s, algo.size()).map_err(|_| HashError::BadBase32(s.to_string()))?
        } else if s.len() == algo.base64_len() {
            B64.decode(s)
                .map_err(|_| HashError::BadBase64(s.to_string()))?
        } else {
            return Err(HashError::BadLength {
                hash: s.to_string(),
                algo,
            });
        };
        Hash::from_bytes(algo, &bytes).ok_or_else(|| HashError::BadLength {
            hash: s.to_string(),
            algo,
        })
    }

    /// Parses `algo:digest`, `algo-base64` (SRI) or, when `default` is given, a bare digest.
    /// A prefix that names another algorithm than `default` is an error.
    pub fn parse(s: &str, default: Option<HashAlgo>) -> Result<Hash, HashError> {
        let (algo, rest, sri) = if let Some((a, rest)) = s.split_once(':') {
            (a.parse::<HashAlgo>()?, rest, false)
        } else if let Some((a, rest)) = s.split_once('-') {
            match a.parse::<HashAlgo>() {
                Ok(algo) => (algo, rest, true),
                Err(e) => match default {
                    Some(d) => (d, s, false),
                    None => return Err(e),
                },
            }
        } else {
            match default {
                Some(d) => (d, s, false),
                None => return Err(HashError::NoAlgo(s.to_string())),
            }
        };
        if let Some(d) = default {
            if d != algo {
                return Err(HashError::WrongAlgo {
                    hash: s.to_string(),
                    expected: d,
                });
            }
        }
        if sri {
            let bytes = B64
                .decode(rest)
                .map_err(|_| HashError::BadBase64(s.to_string()))?;
            return Hash::from_bytes(algo, &bytes).ok_or_else(|| HashError::BadLength {
                hash: s.to_string(),
                algo,
            });
        }
        Hash::parse_digest(algo, rest)
    }

    /// Parses a string that must carry its algorithm (`algo:…` or SRI).
    pub fn parse_typed(s: &str) -> Result<Hash, HashError> {
        Self::parse(s, None)
    }
}

fn decode_base16(s: &str) -> Option<Vec<u8>> {
    fn nib(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    s.as_bytes()
        .chunks(2)
        .map(|p| match p {
            [a, b] => Some(nib(*a)? << 4 | nib(*b)?),
            _ => None,
        })
        .collect()
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algo, self.to_base16())
    }
}

/// `algo:base32`, the form Nix uses in narinfo, signatures and content addresses.
impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algo, self.to_base32())
    }
}

impl Serialize for Hash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (self.algo, self.digest()).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Hash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (algo, digest): (HashAlgo, Vec<u8>) = Deserialize::deserialize(d)?;
        Hash::from_bytes(algo, &digest)
            .ok_or_else(|| serde::de::Error::custom("hash digest length does not match its type"))
    }
}

/// XOR-folds a digest into `size` bytes (Nix's `compressHash`).
pub fn compress(digest: &[u8], size: usize) -> Vec<u8> {
    let mut out = vec![0u8; size];
    if size == 0 {
        return out;
    }
    for (i, b) in digest.iter().enumerate() {
        out[i % size] ^= b;
    }
    out
}

/// Incremental hasher for any of the four algorithms; also an `io::Write` sink.
#[derive(Clone)]
pub enum Hasher {
    Md5(Md5),
    Sha1(Sha1),
    Sha256(Sha256),
    Sha512(Sha512),
}

impl Hasher {
    pub fn new(algo: HashAlgo) -> Hasher {
        match algo {
            HashAlgo::Md5 => Hasher::Md5(Md5::new()),
            HashAlgo::Sha1 => Hasher::Sha1(Sha1::new()),
            HashAlgo::Sha256 => Hasher::Sha256(Sha256::new()),
            HashAlgo::Sha512 => Hasher::Sha512(Sha512::new()),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Md5(h) => h.update(data),
            Hasher::Sha1(h) => h.update(data),
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    pub fn finish(self) -> Hash {
        let (algo, v): (HashAlgo, Vec<u8>) = match self {
            Hasher::Md5(h) => (HashAlgo::Md5, h.finalize().to_vec()),
            Hasher::Sha1(h) => (HashAlgo::Sha1, h.finalize().to_vec()),
            Hasher::Sha256(h) => (HashAlgo::Sha256, h.finalize().to_vec()),
            Hasher::Sha512(h) => (HashAlgo::Sha512, h.finalize().to_vec()),
        };
        let mut bytes = [0u8; 64];
        bytes[..v.len()].copy_from_slice(&v);
        Hash { algo, bytes }
    }
}

impl io::Write for Hasher {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A writer that hashes and counts everything written through it before passing it on.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Hasher,
    count: u64,
}

impl HashingWriter<io::Sink> {
    /// Hashes and counts without passing the bytes on.
    pub fn sink(algo: HashAlgo) -> Self {
        HashingWriter::new(algo, io::sink())
    }
}

impl<W: io::Write> HashingWriter<W> {
    pub fn new(algo: HashAlgo, inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Hasher::new(algo),
            count: 0,
        }
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn finish(self) -> (Hash, u64, W) {
        (self.hasher.finish(), self.count, self.inner)
    }
}

impl<W: io::Write> io::Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        let written = buf.get(..n).unwrap_or(buf);
        self.hasher.update(written);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that hashes and counts every byte read through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Hasher,
    count: u64,
}

impl<R: io::Read> HashingReader<R> {
    pub fn new(algo: HashAlgo, inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Hasher::new(algo),
            count: 0,
        }
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn finish(self) -> (Hash, u64, R) {
        (self.hasher.finish(), self.count, self.inner)
    }
}

impl<R: io::Read> io::Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(read) = buf.get(..n) {
            self.hasher.update(read);
        }
        self.count += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ABC_SHA256: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn known_digests() {
        assert_eq!(Hash::sha256(b"abc").to_base16(), ABC_SHA256);
        assert_eq!(
            Hash::of(HashAlgo::Md5, b"abc").to_base16(),
            "900150983cd24fb0d6963f7d28e17f72"
        );
        assert_eq!(
            Hash::of(HashAlgo::Sha1, b"abc").to_base16(),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
        assert!(Hash::of(HashAlgo::Sha512, b"abc")
            .to_base16()
            .starts_with("ddaf35a193617aba"));
    }

    #[test]
    fn parse_every_form() {
        let h = Hash::sha256(b"abc");
        for enc in [Encoding::Base16, Encoding::Base32, Encoding::Base64] {
            assert_eq!(Hash::parse_typed(&h.to_typed(enc)).unwrap(), h);
            assert_eq!(
                Hash::parse(&h.encode(enc), Some(HashAlgo::Sha256)).unwrap(),
                h
            );
        }
        assert_eq!(Hash::parse_typed(&h.to_sri()).unwrap(), h);
        assert_eq!(
            Hash::parse(&ABC_SHA256.to_uppercase(), Some(HashAlgo::Sha256)).unwrap(),
            h
        );
        for algo in HashAlgo::ALL {
            let h = Hash::of(algo, b"x");
            for enc in [
                Encoding::Base16,
                Encoding::Base32,
                Encoding::Base64,
                Encoding::Sri,
            ] {
                assert_eq!(Hash::parse_typed(&h.to_typed(enc)).unwrap(), h, "{enc:?}");
            }
        }
    }

    #[test]
    fn parse_errors() {
        assert!(matches!(
            Hash::parse_typed("sha257:abc"),
            Err(HashError::UnknownAlgo(_))
        ));
        assert!(matches!(
            Hash::parse_typed(ABC_SHA256),
            Err(HashError::NoAlgo(_))
        ));
        assert!(matches!(
            Hash::parse_typed("sha256:abcd"),
            Err(HashError::BadLength { .. })
        ));
        let bad16 = "g".repeat(64);
        assert!(matches!(
            Hash::parse(&bad16, Some(HashAlgo::Sha256)),
            Err(HashError::BadBase16(_))
        ));
        assert!(matches!(
            Hash::parse(&format!("md5:{ABC_SHA256}"), Some(HashAlgo::Sha256)),
            Err(HashError::WrongAlgo { .. })
        ));
    }

    #[test]
    fn compress_folds() {
        let digest: Vec<u8> = (0..32).collect();
        let c = compress(&digest, 20);
        assert_eq!(c[0], 20);
        assert_eq!(c[11], 11 ^ 31);
        assert_eq!(c[12], 12);
    }

    #[test]
    fn hashing_io() {
        use std::io::{Read, Write};
        let mut w = HashingWriter::new(HashAlgo::Sha256, Vec::new());
        w.write_all(b"abc").unwrap();
        let (h, n, v) = w.finish();
        assert_eq!(
            (h.to_base16().as_str(), n, v.as_slice()),
            (ABC_SHA256, 3, &b"abc"[..])
        );
        let mut r = HashingReader::new(HashAlgo::Sha256, &b"abc"[..]);
        let mut s = Vec::new();
        r.read_to_end(&mut s).unwrap();
        assert_eq!(r.finish().0.to_base16(), ABC_SHA256);
    }
}
