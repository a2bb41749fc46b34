//! Hashing what flows through the store-writer: the NAR hash (sha256) and, for content
//! addresses, the requested algorithm, optionally "modulo" the path's own hash part as Nix's
//! `HashModuloSink` computes it for self-referencing fixed-output paths.

use std::io::{self, Read};

use stockade_common::hash::{Hash, HashAlgo, Hasher};

/// Most self-references recorded by a [`ModuloHasher`]: each costs 8 bytes until the end, so a
/// NAR made of nothing but hash parts cannot make us allocate without bound.
pub const MAX_SELF_REFS: usize = 1 << 20;

/// Nix's `HashModuloSink`: occurrences of `modulus` (a store path's 32-character hash part) are
/// replaced by NUL bytes before hashing, and their offsets are hashed after the data as
/// `|<offset>` each. Without occurrences the result is the plain hash.
pub struct ModuloHasher {
    hasher: Hasher,
    modulus: Vec<u8>,
    /// The last `modulus.len() - 1` bytes seen, which may start an occurrence.
    carry: Vec<u8>,
    /// Bytes passed to the hasher so far.
    pos: u64,
    matches: Vec<u64>,
    overflow: bool,
}

impl ModuloHasher {
    pub fn new(algo: HashAlgo, modulus: &str) -> ModuloHasher {
        ModuloHasher {
            hasher: Hasher::new(algo),
            modulus: modulus.as_bytes().to_vec(),
            carry: Vec::new(),
            pos: 0,
            matches: Vec::new(),
            overflow: false,
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        let m = self.modulus.len();
        if m == 0 {
            self.hasher.update(data);
            self.pos += data.len() as u64;
            return;
        }
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(data);
        let mut j = 0;
        while let Some(k) = find(buf.get(j..).unwrap_or_default(), &self.modulus) {
            let at = j + k;
            if self.matches.len() < MAX_SELF_REFS {
                self.matches.push(self.pos + at as u64);
            } else {
                self.overflow = true;
            }
            if let Some(hit) = buf.get_mut(at..at + m) {
                hit.fill(0);
            }
            j = at + m;
        }
        let keep = buf.len().min(m - 1);
        let emit = buf.len() - keep;
        self.hasher.update(buf.get(..emit).unwrap_or_default());
        self.pos += emit as u64;
        self.carry = buf.get(emit..).unwrap_or_default().to_vec();
    }

    /// The hash, or `None` if there were more than [`MAX_SELF_REFS`] occurrences.
    pub fn finish(mut self) -> Option<Hash> {
        let rest = std::mem::take(&mut self.carry);
        self.hasher.update(&rest);
        for m in &self.matches {
            self.hasher.update(format!("|{m}").as_bytes());
        }
        (!self.overflow).then(|| self.hasher.finish())
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let first = *needle.first()?;
    let mut i = 0;
    while i + needle.len() <= hay.len() {
        let rel = hay.get(i..)?.iter().position(|&b| b == first)?;
        i += rel;
        if hay.get(i..i + needle.len())? == needle {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// A reader that hashes (sha256) and counts every byte it hands out, and optionally feeds a
/// content-address hasher too. Sits between a buffered source and the NAR reader, which reads
/// exactly the archive's bytes, so the result is the NAR hash and size.
pub struct Tee<R> {
    inner: R,
    nar: Hasher,
    count: u64,
    ca: Option<CaHasher>,
}

pub enum CaHasher {
    Plain(Hasher),
    Modulo(ModuloHasher),
}

impl CaHasher {
    fn update(&mut self, data: &[u8]) {
        match self {
            CaHasher::Plain(h) => h.update(data),
            CaHasher::Modulo(h) => h.update(data),
        }
    }

    pub fn finish(self) -> Option<Hash> {
        match self {
            CaHasher::Plain(h) => Some(h.finish()),
            CaHasher::Modulo(h) => h.finish(),
        }
    }
}

impl<R: Read> Tee<R> {
    pub fn new(inner: R, ca: Option<CaHasher>) -> Tee<R> {
        Tee {
            inner,
            nar: Hasher::new(HashAlgo::Sha256),
            count: 0,
            ca,
        }
    }

    /// (NAR sha256, bytes, content-address hash if one was asked for).
    pub fn finish(self) -> (Hash, u64, Option<CaHasher>) {
        (self.nar.finish(), self.count, self.ca)
    }
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let got = buf
            .get(..n)
            .ok_or_else(|| io::Error::other("reader overran buffer"))?;
        self.nar.update(got);
        if let Some(ca) = &mut self.ca {
            ca.update(got);
        }
        self.count += n as u64;
        Ok(n)
    }
}

/// Hashes everything `r` yields (up to `max` bytes) with a [`ModuloHasher`].
pub fn hash_modulo_reader<R: Read>(
    mut r: R,
    algo: HashAlgo,
    modulus: &str,
    max: u64,
) -> io::Result<Option<Hash>> {
    let mut h = ModuloHasher::new(algo, modulus);
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        total += n as u64;
        if total > max {
            return Err(io::Error::other("file grew while it was being hashed"));
        }
        h.update(buf.get(..n).unwrap_or_default());
    }
    Ok(h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one-shot definition: replace all occurrences, then append the offsets.
    fn reference(data: &[u8], modulus: &str) -> Hash {
        let m = modulus.as_bytes();
        let mut d = data.to_vec();
        let mut offsets = Vec::new();
        let mut i = 0;
        while i + m.len() <= d.len() {
            if &d[i..i + m.len()] == m {
                offsets.push(i);
                d[i..i + m.len()].fill(0);
                i += m.len();
            } else {
                i += 1;
            }
        }
        let mut h = Hasher::new(HashAlgo::Sha256);
        h.update(&d);
        for o in offsets {
            h.update(format!("|{o}").as_bytes());
        }
        h.finish()
    }

    #[test]
    fn modulo_matches_across_chunks() {
        let modulus = "hv2lxdwpbmd9zfj87n6n7z5wxhnswizx";
        let mut data = b"head ".to_vec();
        data.extend_from_slice(modulus.as_bytes());
        data.extend_from_slice(b" middle ");
        data.extend_from_slice(modulus.as_bytes());
        data.extend_from_slice(modulus.as_bytes());
        data.extend_from_slice(b" tail");
        let want = reference(&data, modulus);
        assert_ne!(want, Hash::sha256(&data), "self-references change the hash");
        for chunk in [1, 3, 7, 31, 32, 33, 1000] {
            let mut h = ModuloHasher::new(HashAlgo::Sha256, modulus);
            for c in data.chunks(chunk) {
                h.update(c);
            }
            assert_eq!(h.finish(), Some(want), "chunk size {chunk}");
        }
    }

    #[test]
    fn without_occurrences_it_is_the_plain_hash() {
        let data = b"no self reference in here at all, really".repeat(100);
        let mut h = ModuloHasher::new(HashAlgo::Sha1, "hv2lxdwpbmd9zfj87n6n7z5wxhnswizx");
        for c in data.chunks(13) {
            h.update(c);
        }
        assert_eq!(h.finish(), Some(Hash::of(HashAlgo::Sha1, &data)));
    }
}
