//! Nix's base32: a 32-letter alphabet without `e o u t`, written most significant digit first
//! over the bytes read as one little-endian bit string.

use thiserror::Error;

pub const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum Base32Error {
    #[error("invalid base-32 length {len} for {expected} bytes")]
    Length { len: usize, expected: usize },
    #[error("invalid character {0:?} in base-32 string")]
    Char(char),
    #[error("base-32 string sets bits beyond the hash")]
    Overflow,
}

/// Number of base32 characters for `bytes` bytes of hash.
pub const fn encoded_len(bytes: usize) -> usize {
    if bytes == 0 {
        0
    } else {
        (bytes * 8 - 1) / 5 + 1
    }
}

pub fn encode(data: &[u8]) -> String {
    let n = encoded_len(data.len());
    let mut out = String::with_capacity(n);
    for k in (0..n).rev() {
        let bit = k * 5;
        let i = bit / 8;
        let j = bit % 8;
        let lo = data.get(i).map_or(0, |b| (*b as u16) >> j);
        let hi = data.get(i + 1).map_or(0, |b| (*b as u16) << (8 - j));
        out.push(ALPHABET[((lo | hi) & 31) as usize] as char);
    }
    out
}

fn digit(c: u8) -> Option<u8> {
    ALPHABET.iter().position(|a| *a == c).map(|p| p as u8)
}

/// Decodes into exactly `size` bytes; the string must be exactly `encoded_len(size)` long.
pub fn decode(s: &str, size: usize) -> Result<Vec<u8>, Base32Error> {
    let bytes = s.as_bytes();
    if bytes.len() != encoded_len(size) {
        return Err(Base32Error::Length {
            len: bytes.len(),
            expected: size,
        });
    }
    let mut out = vec![0u8; size];
    for (n, &c) in bytes.iter().rev().enumerate() {
        let d = digit(c).ok_or(Base32Error::Char(c as char))? as u16;
        let bit = n * 5;
        let i = bit / 8;
        let j = bit % 8;
        let v = d << j;
        if let Some(b) = out.get_mut(i) {
            *b |= (v & 0xff) as u8;
        }
        let carry = (v >> 8) as u8;
        match out.get_mut(i + 1) {
            Some(b) => *b |= carry,
            None if carry != 0 => return Err(Base32Error::Overflow),
            None => {}
        }
    }
    Ok(out)
}

/// True if every byte of `s` is in the alphabet.
pub fn is_valid_str(s: &str) -> bool {
    s.bytes().all(|c| digit(c).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths() {
        assert_eq!(encoded_len(16), 26);
        assert_eq!(encoded_len(20), 32);
        assert_eq!(encoded_len(32), 52);
        assert_eq!(encoded_len(64), 103);
    }

    #[test]
    fn known_vector() {
        // sha256 of the empty string, as `nix-hash --type sha256 --to-base32` prints it.
        let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let bytes: Vec<u8> = (0..32)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let s = encode(&bytes);
        assert_eq!(s, "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73");
        assert_eq!(decode(&s, 32).unwrap(), bytes);
    }

    #[test]
    fn round_trip_all_sizes() {
        for size in [1usize, 2, 5, 16, 20, 32, 64] {
            let data: Vec<u8> = (0..size).map(|i| (i * 37 + 11) as u8).collect();
            assert_eq!(decode(&encode(&data), size).unwrap(), data);
        }
    }

    #[test]
    fn rejects() {
        assert!(matches!(decode("abc", 20), Err(Base32Error::Length { .. })));
        let bad = "e".repeat(32);
        assert_eq!(decode(&bad, 20), Err(Base32Error::Char('e')));
        // 52 chars for 32 bytes carry 260 bits: a leading digit >= 16 would set bit 256+.
        let mut over = "z".to_string();
        over.push_str(&"0".repeat(51));
        assert_eq!(decode(&over, 32), Err(Base32Error::Overflow));
    }
}
