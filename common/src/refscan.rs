//! Which store paths a byte stream mentions, as Nix decides a build output's references: a
//! candidate is referenced when its 32-character base32 hash part occurs anywhere in the
//! output's NAR serialisation (file contents, symlink targets, names alike). Pure and
//! streaming: feed the NAR in chunks of any size; an occurrence split across chunks is found.

use std::collections::{BTreeSet, HashSet};

use crate::base32::ALPHABET;

/// Length of a store path's hash part.
pub const HASH_PART_LEN: usize = 32;

/// Whether `b` is a letter of Nix's base32 alphabet (a lookup table built at compile time).
fn is_base32(b: u8) -> bool {
    const TABLE: [bool; 256] = {
        let mut t = [false; 256];
        let mut i = 0;
        while i < ALPHABET.len() {
            t[ALPHABET[i] as usize] = true;
            i += 1;
        }
        t
    };
    TABLE[usize::from(b)]
}

/// Finds occurrences of candidate hash parts in a stream.
pub struct RefScanner {
    wanted: HashSet<Box<[u8]>>,
    found: BTreeSet<String>,
    /// The last `HASH_PART_LEN - 1` bytes seen, which may begin an occurrence.
    tail: Vec<u8>,
}

impl RefScanner {
    /// A scanner for these hash parts; anything that is not 32 base32 characters can never
    /// occur and is ignored.
    pub fn new<'a>(hash_parts: impl IntoIterator<Item = &'a str>) -> RefScanner {
        let wanted = hash_parts
            .into_iter()
            .map(str::as_bytes)
            .filter(|h| h.len() == HASH_PART_LEN && h.iter().all(|&b| is_base32(b)))
            .map(Box::from)
            .collect();
        RefScanner {
            wanted,
            found: BTreeSet::new(),
            tail: Vec::with_capacity(HASH_PART_LEN),
        }
    }

    /// Scans the next chunk of the stream.
    pub fn update(&mut self, data: &[u8]) {
        if self.wanted.is_empty() || data.is_empty() {
            return;
        }
        let keep = HASH_PART_LEN - 1;
        // The previous chunk's last bytes and this one's first: occurrences across the seam.
        let mut seam = std::mem::take(&mut self.tail);
        let old = seam.len();
        seam.extend_from_slice(data.get(..keep).unwrap_or(data));
        if old > 0 {
            self.scan(&seam);
        }
        self.scan(data);
        // The last bytes of the whole stream so far.
        self.tail = if data.len() >= keep {
            data.get(data.len() - keep..).unwrap_or_default().to_vec()
        } else {
            seam.get(seam.len().saturating_sub(keep)..)
                .unwrap_or_default()
                .to_vec()
        };
    }

    /// Nix's search: look at a window's last character first and jump past any character
    /// outside the alphabet, so text without hashes is crossed in strides of 32.
    fn scan(&mut self, s: &[u8]) {
        let mut i = 0;
        'windows: while i + HASH_PART_LEN <= s.len() {
            for j in (0..HASH_PART_LEN).rev() {
                let b = s.get(i + j).copied().unwrap_or(0);
                if !is_base32(b) {
                    i += j + 1;
                    continue 'windows;
                }
            }
            if let Some(w) = s.get(i..i + HASH_PART_LEN) {
                if self.wanted.contains(w) {
                    // Base32 letters are ASCII.
                    self.found.insert(String::from_utf8_lossy(w).into_owned());
                }
            }
            i += 1;
        }
    }

    /// The hash parts found so far.
    pub fn found(&self) -> &BTreeSet<String> {
        &self.found
    }

    pub fn into_found(self) -> BTreeSet<String> {
        self.found
    }
}

impl std::io::Write for RefScanner {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "hv2lxdwpbmd9zfj87n6n7z5wxhnswizx";
    const B: &str = "0c7c5ra5y5h2mfrimggbxi4j7prlr8wr";
    const C: &str = "7lrn8qnsv8hnvymyqybf1mvzz5khyyag";

    fn scan_in_chunks(data: &[u8], chunk: usize) -> BTreeSet<String> {
        let mut s = RefScanner::new([A, B, C]);
        for c in data.chunks(chunk) {
            s.update(c);
        }
        s.into_found()
    }

    #[test]
    fn finds_hash_parts_wherever_they_are_split() {
        let data = format!(
            "#!/bin/sh\nexec /nix/store/{A}-hello/bin/hello \"$@\"\0\0\x01symlink/nix/store/{B}"
        );
        let want: BTreeSet<String> = [A, B].iter().map(|s| s.to_string()).collect();
        for chunk in 1..=data.len() {
            assert_eq!(
                scan_in_chunks(data.as_bytes(), chunk),
                want,
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn partial_and_neighbouring_hashes_are_not_references() {
        // A hash part cut short, one with a letter outside the alphabet, and C inside a longer
        // run of base32 letters (Nix counts that one: any 32-letter window).
        let cut = &A[..31];
        let bad = format!("{}e", &B[..31]);
        let data = format!("{cut}-x {bad} zz{C}zz");
        let found = scan_in_chunks(data.as_bytes(), 7);
        assert_eq!(found.into_iter().collect::<Vec<_>>(), vec![C.to_string()]);
        // Nothing wanted: nothing found, whatever the data.
        let mut s = RefScanner::new(["not-a-hash"]);
        s.update(A.as_bytes());
        assert!(s.found().is_empty());
    }
}
