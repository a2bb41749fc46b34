//! Hardened reader and buffered writer for the primitives of PROTOCOL.md §1.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, BufWriter, Read, Write};

/// Variable-length data is read in pieces of at most this size, so the memory held is bounded by
/// what the peer actually sent (plus one piece), never by the length it claimed.
const READ_PIECE: usize = 64 * 1024;

/// Bytes charged per collection element on top of its length: a rough cost of the `String`
/// header and tree node, so a million empty strings are not free.
const ELEMENT_OVERHEAD: u64 = 32;

/// Bounds for everything read from a peer. Nix has almost none; these are the values from
/// PROTOCOL.md §1 ("Limits to add in a hardened reader").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Default bound of a `str` when the call does not give one.
    pub max_string: u64,
    /// Paths other than store paths (symlink targets, gc roots) and store paths before full
    /// validation.
    pub max_path: u64,
    /// Element count of a list, set or map (path sets).
    pub max_list: u64,
    /// Total bytes of one list/set/map, counting 32 bytes of overhead per element.
    pub max_collection_bytes: u64,
    /// One chunk of a framed stream.
    pub max_frame_chunk: u64,
    /// SetOptions override count.
    pub max_overrides: u64,
    /// SetOptions override name.
    pub max_option_name: u64,
    /// SetOptions override value.
    pub max_option_value: u64,
    /// All SetOptions overrides together (names + values + overhead).
    pub max_overrides_bytes: u64,
    /// Fields of one activity or result message.
    pub max_fields: u64,
    /// Traces of one error message.
    pub max_traces: u64,
    /// Entries in a feature set (handshake, minor ≥ 38).
    pub max_features: u64,
    /// Length of one feature name.
    pub max_feature_len: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_string: 1 << 20,
            max_path: 4096,
            max_list: 1 << 20,
            max_collection_bytes: 128 << 20,
            max_frame_chunk: 8 << 20,
            max_overrides: 4096,
            max_option_name: 1024,
            max_option_value: 1 << 20,
            max_overrides_bytes: 16 << 20,
            max_fields: 64,
            max_traces: 1024,
            max_features: 64,
            max_feature_len: 256,
        }
    }
}

/// Everything that can go wrong on the wire. `what` names the field being read, `offset` is the
/// byte position (from the start of the reader, or of the framed stream) where that field began.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("unexpected end-of-file reading {what} at byte {offset}")]
    Eof { what: &'static str, offset: u64 },
    #[error("error reading {what} at byte {offset}: {source}")]
    Read {
        what: &'static str,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("error writing to the peer: {0}")]
    Write(#[source] io::Error),
    /// Nix's `readInt` on a value that does not fit its 32-bit target.
    #[error(
        "serialised integer {value} is too large for type 'unsigned int' ({what} at byte {offset})"
    )]
    IntTooLarge {
        what: &'static str,
        offset: u64,
        value: u64,
    },
    #[error("{what} at byte {offset}: length {len} exceeds the limit of {max} bytes")]
    TooLong {
        what: &'static str,
        offset: u64,
        len: u64,
        max: u64,
    },
    #[error("{what} at byte {offset}: {count} elements exceed the limit of {max}")]
    TooMany {
        what: &'static str,
        offset: u64,
        count: u64,
        max: u64,
    },
    #[error("{what} at byte {offset}: more than {max} bytes in total")]
    TotalTooLarge {
        what: &'static str,
        offset: u64,
        max: u64,
    },
    /// Nix's exact text: a client sees this message.
    #[error("non-zero padding")]
    NonZeroPadding { what: &'static str, offset: u64 },
    #[error("{what} at byte {offset}: not valid UTF-8")]
    NotUtf8 { what: &'static str, offset: u64 },
    #[error("{what} at byte {offset}: invalid value {value}")]
    InvalidValue {
        what: &'static str,
        offset: u64,
        value: u64,
    },
    #[error("{what} at byte {offset}: expected {expected:?}")]
    Unexpected {
        what: &'static str,
        offset: u64,
        expected: &'static str,
    },
    /// A value read whole that does not parse (a store path outside the store, a bad hash, an
    /// unknown operation): `message` is what the client is told, in nix-daemon's words.
    #[error("{message}")]
    Invalid {
        what: &'static str,
        offset: u64,
        message: String,
    },
    /// A framed stream hit an error it cannot recover from; the connection is out of sync.
    #[error("framed stream already failed; the connection cannot be resynchronised")]
    FramedFailed,
    #[error("protocol mismatch")]
    ProtocolMismatch { got: u64 },
    #[error("the Nix client version is too old")]
    ClientTooOld { version: u64 },
    #[error("nix-daemon protocol mismatch")]
    DaemonMismatch { got: u64 },
    #[error("Nix daemon protocol version not supported")]
    DaemonUnsupported { version: u64 },
    #[error("the Nix daemon version is too old")]
    DaemonTooOld { version: u64 },
    #[error("got unknown message type {code:x} from Nix daemon")]
    UnknownStderr { code: u64 },
}

impl WireError {
    /// Maps an I/O error from reading `what`; a `WireError` wrapped by a
    /// [`FramedReader`](crate::worker::FramedReader) inside the `io::Error` comes back out unchanged.
    pub fn from_io(e: io::Error, what: &'static str, offset: u64) -> WireError {
        if e.get_ref().is_some_and(|inner| inner.is::<WireError>()) {
            if let Some(inner) = e.into_inner() {
                return match inner.downcast::<WireError>() {
                    Ok(w) => *w,
                    Err(other) => WireError::Read {
                        what,
                        offset,
                        source: io::Error::other(other),
                    },
                };
            }
            return WireError::FramedFailed;
        }
        if e.kind() == io::ErrorKind::UnexpectedEof {
            WireError::Eof { what, offset }
        } else {
            WireError::Read {
                what,
                offset,
                source: e,
            }
        }
    }

    /// Wraps this error in an `io::Error` (for `Read` impls) so [`WireError::from_io`] can
    /// recover it.
    pub fn into_io(self) -> io::Error {
        let kind = match &self {
            WireError::Eof { .. } => io::ErrorKind::UnexpectedEof,
            WireError::Read { source, .. } => source.kind(),
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, self)
    }
}

/// Number of zero bytes that follow a string of `len` bytes.
pub(crate) fn padding_len(len: u64) -> usize {
    ((8 - (len % 8)) % 8) as usize
}

/// Reads protocol values from `R`, counting bytes for error positions.
///
/// Unbuffered: give it a `BufReader` for sockets. It also implements [`Read`] (raw bytes, e.g. a
/// bare NAR, or a [`FramedReader`](crate::worker::FramedReader) on top of it).
#[derive(Debug)]
pub struct WireReader<R> {
    inner: R,
    limits: Limits,
    pos: u64,
}

impl<R: Read> WireReader<R> {
    pub fn new(inner: R) -> Self {
        Self::with_limits(inner, Limits::default())
    }

    pub fn with_limits(inner: R, limits: Limits) -> Self {
        WireReader {
            inner,
            limits,
            pos: 0,
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    /// `read_exact` with error mapping; `start` is where the field being read began.
    fn fill(&mut self, buf: &mut [u8], what: &'static str, start: u64) -> Result<(), WireError> {
        let mut done = 0;
        while let Some(rest) = buf.get_mut(done..).filter(|r| !r.is_empty()) {
            match self.inner.read(rest) {
                Ok(0) => {
                    return Err(WireError::Eof {
                        what,
                        offset: start,
                    })
                }
                Ok(n) => {
                    done += n;
                    self.pos += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(WireError::from_io(e, what, start)),
            }
        }
        Ok(())
    }

    /// A full 64-bit little-endian number.
    pub fn read_u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        let start = self.pos;
        let mut b = [0u8; 8];
        self.fill(&mut b, what, start)?;
        Ok(u64::from_le_bytes(b))
    }

    /// A number Nix reads with `readInt` (32-bit): larger values are an error, as in Nix.
    pub fn read_u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        let offset = self.pos;
        let value = self.read_u64(what)?;
        u32::try_from(value).map_err(|_| WireError::IntTooLarge {
            what,
            offset,
            value,
        })
    }

    /// A `u64` where any non-zero value is true (Nix semantics).
    pub fn read_bool(&mut self, what: &'static str) -> Result<bool, WireError> {
        Ok(self.read_u64(what)? != 0)
    }

    /// Reads the length prefix of a `str` or collection and checks it against `max` before
    /// anything is allocated.
    fn read_len(&mut self, what: &'static str, max: u64) -> Result<(u64, u64), WireError> {
        let offset = self.pos;
        let len = self.read_u64(what)?;
        if len > max {
            return Err(WireError::TooLong {
                what,
                offset,
                len,
                max,
            });
        }
        Ok((offset, len))
    }

    fn read_padding(&mut self, what: &'static str, len: u64) -> Result<(), WireError> {
        let offset = self.pos;
        let mut pad = [0u8; 8];
        let pad = pad.get_mut(..padding_len(len)).unwrap_or_default();
        self.fill(pad, what, offset)?;
        if pad.iter().any(|&b| b != 0) {
            return Err(WireError::NonZeroPadding { what, offset });
        }
        Ok(())
    }

    /// A padded string of at most `max` bytes, as raw bytes.
    pub fn read_bytes_max(&mut self, what: &'static str, max: u64) -> Result<Vec<u8>, WireError> {
        let (offset, len) = self.read_len(what, max)?;
        let len = usize::try_from(len).map_err(|_| WireError::TooLong {
            what,
            offset,
            len,
            max,
        })?;
        let mut buf = Vec::with_capacity(len.min(READ_PIECE));
        while buf.len() < len {
            let old = buf.len();
            buf.resize(old + (len - old).min(READ_PIECE), 0);
            let piece = buf.get_mut(old..).unwrap_or_default();
            self.fill(piece, what, offset)?;
        }
        self.read_padding(what, len as u64)?;
        Ok(buf)
    }

    /// A padded string bounded by [`Limits::max_string`].
    pub fn read_bytes(&mut self, what: &'static str) -> Result<Vec<u8>, WireError> {
        self.read_bytes_max(what, self.limits.max_string)
    }

    /// Skips a padded string of at most `max` bytes without keeping it; returns its length.
    pub fn skip_bytes(&mut self, what: &'static str, max: u64) -> Result<u64, WireError> {
        let (offset, len) = self.read_len(what, max)?;
        let mut left = len;
        let mut scratch = [0u8; 4096];
        while left > 0 {
            let n = left.min(scratch.len() as u64) as usize;
            let piece = scratch.get_mut(..n).unwrap_or_default();
            self.fill(piece, what, offset)?;
            left -= n as u64;
        }
        self.read_padding(what, len)?;
        Ok(len)
    }

    /// A padded string of at most `max` bytes that must be UTF-8.
    pub fn read_string_max(&mut self, what: &'static str, max: u64) -> Result<String, WireError> {
        let offset = self.pos;
        let bytes = self.read_bytes_max(what, max)?;
        String::from_utf8(bytes).map_err(|_| WireError::NotUtf8 { what, offset })
    }

    /// A UTF-8 string bounded by [`Limits::max_string`].
    pub fn read_string(&mut self, what: &'static str) -> Result<String, WireError> {
        self.read_string_max(what, self.limits.max_string)
    }

    /// A path-like UTF-8 string bounded by [`Limits::max_path`] (no path validation here).
    pub fn read_path(&mut self, what: &'static str) -> Result<String, WireError> {
        self.read_string_max(what, self.limits.max_path)
    }

    /// Reads a collection count and checks it against `max_count`.
    fn read_count(&mut self, what: &'static str, max_count: u64) -> Result<u64, WireError> {
        let offset = self.pos;
        let count = self.read_u64(what)?;
        if count > max_count {
            return Err(WireError::TooMany {
                what,
                offset,
                count,
                max: max_count,
            });
        }
        Ok(count)
    }

    /// Reads `count` strings, handing each to `push`, enforcing the total-size bound.
    fn read_strings_into(
        &mut self,
        what: &'static str,
        max_count: u64,
        max_len: u64,
        mut push: impl FnMut(String),
    ) -> Result<(), WireError> {
        let offset = self.pos;
        let count = self.read_count(what, max_count)?;
        let max_total = self.limits.max_collection_bytes;
        let mut total: u64 = 0;
        for _ in 0..count {
            let s = self.read_string_max(what, max_len)?;
            total = total.saturating_add(s.len() as u64 + ELEMENT_OVERHEAD);
            if total > max_total {
                return Err(WireError::TotalTooLarge {
                    what,
                    offset,
                    max: max_total,
                });
            }
            push(s);
        }
        Ok(())
    }

    /// `[str]`: at most `max_count` UTF-8 strings of at most `max_len` bytes each.
    pub fn read_string_list(
        &mut self,
        what: &'static str,
        max_count: u64,
        max_len: u64,
    ) -> Result<Vec<String>, WireError> {
        let mut out = Vec::new();
        self.read_strings_into(what, max_count, max_len, |s| out.push(s))?;
        Ok(out)
    }

    /// `{str}`: like a list; duplicates collapse, order is not checked (as in Nix).
    pub fn read_string_set(
        &mut self,
        what: &'static str,
        max_count: u64,
        max_len: u64,
    ) -> Result<BTreeSet<String>, WireError> {
        let mut out = BTreeSet::new();
        self.read_strings_into(what, max_count, max_len, |s| {
            out.insert(s);
        })?;
        Ok(out)
    }

    /// A set of paths bounded by [`Limits::max_list`] and [`Limits::max_path`].
    pub fn read_path_set(&mut self, what: &'static str) -> Result<BTreeSet<String>, WireError> {
        self.read_string_set(what, self.limits.max_list, self.limits.max_path)
    }

    /// A set of paths bounded as [`read_path_set`](Self::read_path_set), each turned into a
    /// `T` by `parse` as it is read, so that a large set is never held twice (as strings and
    /// parsed). The first error (in wire order, as Nix parses) is returned once the whole set
    /// has been read.
    pub fn read_path_set_parsed<T: Ord>(
        &mut self,
        what: &'static str,
        mut parse: impl FnMut(&str) -> Result<T, WireError>,
    ) -> Result<BTreeSet<T>, WireError> {
        let mut out = BTreeSet::new();
        let mut first_err = None;
        let (max_count, max_len) = (self.limits.max_list, self.limits.max_path);
        self.read_strings_into(what, max_count, max_len, |s| {
            if first_err.is_none() {
                match parse(&s) {
                    Ok(v) => {
                        out.insert(v);
                    }
                    Err(e) => first_err = Some(e),
                }
            }
        })?;
        match first_err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// `map<str, str>`. A repeated key keeps its first value (`std::map::emplace` in Nix).
    pub fn read_string_map(
        &mut self,
        what: &'static str,
        max_count: u64,
        max_key: u64,
        max_value: u64,
    ) -> Result<BTreeMap<String, String>, WireError> {
        let max_total = self.limits.max_collection_bytes;
        self.read_string_map_total(what, max_count, max_key, max_value, max_total)
    }

    /// [`read_string_map`](Self::read_string_map) with an explicit total-size bound.
    pub fn read_string_map_total(
        &mut self,
        what: &'static str,
        max_count: u64,
        max_key: u64,
        max_value: u64,
        max_total: u64,
    ) -> Result<BTreeMap<String, String>, WireError> {
        let offset = self.pos;
        let count = self.read_count(what, max_count)?;
        let mut total: u64 = 0;
        let mut out = BTreeMap::new();
        for _ in 0..count {
            let k = self.read_string_max(what, max_key)?;
            let v = self.read_string_max(what, max_value)?;
            total = total.saturating_add(k.len() as u64 + v.len() as u64 + ELEMENT_OVERHEAD);
            if total > max_total {
                return Err(WireError::TotalTooLarge {
                    what,
                    offset,
                    max: max_total,
                });
            }
            out.entry(k).or_insert(v);
        }
        Ok(out)
    }
}

impl<R: Read> Read for WireReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Buffered writer of protocol values. Nothing reaches the peer until [`flush`](Self::flush)
/// (or the buffer fills), so callers choose the flush points the protocol needs: end of the
/// handshake greeting, end of a reply, before blocking on a read.
#[derive(Debug)]
pub struct WireWriter<W: Write> {
    inner: BufWriter<W>,
}

const ZEROS: [u8; 8] = [0; 8];

impl<W: Write> WireWriter<W> {
    pub fn new(inner: W) -> Self {
        WireWriter {
            inner: BufWriter::with_capacity(32 * 1024, inner),
        }
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), WireError> {
        self.inner.write_all(bytes).map_err(WireError::Write)
    }

    pub fn write_u64(&mut self, v: u64) -> Result<(), WireError> {
        self.put(&v.to_le_bytes())
    }

    pub fn write_bool(&mut self, b: bool) -> Result<(), WireError> {
        self.write_u64(u64::from(b))
    }

    /// A padded string.
    pub fn write_bytes(&mut self, data: &[u8]) -> Result<(), WireError> {
        self.write_u64(data.len() as u64)?;
        self.put(data)?;
        let pad = ZEROS
            .get(..padding_len(data.len() as u64))
            .unwrap_or_default();
        self.put(pad)
    }

    pub fn write_string(&mut self, s: &str) -> Result<(), WireError> {
        self.write_bytes(s.as_bytes())
    }

    /// A list or set: count then each element. Sets must be given in sorted order
    /// (a `BTreeSet` iterates sorted).
    pub fn write_strings<I>(&mut self, items: I) -> Result<(), WireError>
    where
        I: IntoIterator,
        I::IntoIter: ExactSizeIterator,
        I::Item: AsRef<[u8]>,
    {
        let iter = items.into_iter();
        self.write_u64(iter.len() as u64)?;
        for s in iter {
            self.write_bytes(s.as_ref())?;
        }
        Ok(())
    }

    /// `map<str, str>` in key order.
    pub fn write_string_map<K: AsRef<[u8]>, V: AsRef<[u8]>>(
        &mut self,
        map: &BTreeMap<K, V>,
    ) -> Result<(), WireError> {
        self.write_u64(map.len() as u64)?;
        for (k, v) in map {
            self.write_bytes(k.as_ref())?;
            self.write_bytes(v.as_ref())?;
        }
        Ok(())
    }

    /// Sends everything buffered to the peer.
    pub fn flush(&mut self) -> Result<(), WireError> {
        self.inner.flush().map_err(WireError::Write)
    }

    /// The underlying writer. Bytes still buffered are not in it yet.
    pub fn get_ref(&self) -> &W {
        self.inner.get_ref()
    }

    /// The underlying writer; flush first or buffered bytes end up after whatever is written
    /// here directly.
    pub fn get_mut(&mut self) -> &mut W {
        self.inner.get_mut()
    }

    /// Flushes and returns the underlying writer.
    pub fn into_inner(self) -> Result<W, WireError> {
        self.inner
            .into_inner()
            .map_err(|e| WireError::Write(e.into_error()))
    }
}

/// Raw bytes through the buffer (framed streams, bare NARs).
impl<W: Write> Write for WireWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rd(bytes: &[u8]) -> WireReader<&[u8]> {
        WireReader::new(bytes)
    }

    fn enc(f: impl FnOnce(&mut WireWriter<&mut Vec<u8>>) -> Result<(), WireError>) -> Vec<u8> {
        let mut out = Vec::new();
        let mut w = WireWriter::new(&mut out);
        f(&mut w).unwrap();
        w.flush().unwrap();
        drop(w);
        out
    }

    fn u(v: u64) -> Vec<u8> {
        v.to_le_bytes().to_vec()
    }

    #[test]
    fn u64_is_little_endian() {
        let bytes = enc(|w| w.write_u64(0x0102_0304_0506_0708));
        assert_eq!(bytes, [8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(rd(&bytes).read_u64("x").unwrap(), 0x0102_0304_0506_0708);
    }

    #[test]
    fn bool_encoding_and_any_nonzero_is_true() {
        assert_eq!(enc(|w| w.write_bool(true)), [1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(enc(|w| w.write_bool(false)), [0; 8]);
        assert!(rd(&u(2)).read_bool("b").unwrap());
        assert!(rd(&u(1 << 63)).read_bool("b").unwrap());
        assert!(!rd(&u(0)).read_bool("b").unwrap());
    }

    #[test]
    fn narrow_int_accepts_u32_max_and_rejects_more() {
        assert_eq!(rd(&u(u32::MAX as u64)).read_u32("n").unwrap(), u32::MAX);
        let e = rd(&u(1 << 32)).read_u32("verbosity").unwrap_err();
        assert!(
            matches!(e, WireError::IntTooLarge { what: "verbosity", offset: 0, value } if value == 1 << 32),
            "{e:?}"
        );
        assert!(e
            .to_string()
            .starts_with("serialised integer 4294967296 is too large for type"));
        assert!(matches!(
            rd(&u(u64::MAX)).read_u32("n"),
            Err(WireError::IntTooLarge { .. })
        ));
    }

    #[test]
    fn string_encodings_are_byte_exact() {
        assert_eq!(enc(|w| w.write_string("")), [0; 8]);
        assert_eq!(
            enc(|w| w.write_string("abc")),
            [3, 0, 0, 0, 0, 0, 0, 0, b'a', b'b', b'c', 0, 0, 0, 0, 0]
        );
        let eight = enc(|w| w.write_string("12345678"));
        assert_eq!(eight.len(), 16);
        assert_eq!(&eight[8..], b"12345678");
        // "2.8.0": the version string of handshake step 6.
        assert_eq!(
            enc(|w| w.write_string("2.8.0")),
            [5, 0, 0, 0, 0, 0, 0, 0, b'2', b'.', b'8', b'.', b'0', 0, 0, 0]
        );
    }

    #[test]
    fn string_round_trips_every_padding() {
        for len in 0..=17usize {
            let s: Vec<u8> = (0..len as u8).map(|i| i.wrapping_mul(37) | 1).collect();
            let bytes = enc(|w| w.write_bytes(&s));
            assert_eq!(bytes.len(), 8 + len.div_ceil(8) * 8);
            let mut r = rd(&bytes);
            assert_eq!(r.read_bytes_max("s", 64).unwrap(), s);
            assert_eq!(r.position(), bytes.len() as u64);
        }
    }

    #[test]
    fn large_string_is_read_in_pieces() {
        let s = vec![0x5a; READ_PIECE * 3 + 5];
        let bytes = enc(|w| w.write_bytes(&s));
        let mut r = rd(&bytes);
        assert_eq!(r.read_bytes_max("s", 1 << 20).unwrap(), s);
        let mut r = rd(&bytes);
        assert_eq!(r.skip_bytes("s", 1 << 20).unwrap(), s.len() as u64);
        assert_eq!(r.position(), bytes.len() as u64);
    }

    #[test]
    fn absurd_lengths_are_rejected_before_reading() {
        for len in [1u64 << 63, u64::MAX - 7, u64::MAX, (1 << 20) + 1] {
            let mut bytes = u(len);
            bytes.extend_from_slice(b"abc");
            let mut r = rd(&bytes);
            let e = r.read_bytes("name").unwrap_err();
            assert!(
                matches!(e, WireError::TooLong { what: "name", offset: 0, len: l, max } if l == len && max == 1 << 20),
                "{e:?}"
            );
            // Only the length was consumed.
            assert_eq!(r.position(), 8);
        }
    }

    #[test]
    fn per_call_limit_overrides_default() {
        let bytes = enc(|w| w.write_string("abcdef"));
        assert!(matches!(
            rd(&bytes).read_string_max("s", 5),
            Err(WireError::TooLong { len: 6, max: 5, .. })
        ));
        assert_eq!(rd(&bytes).read_string_max("s", 6).unwrap(), "abcdef");
        let long = enc(|w| w.write_bytes(&[b'a'; 4097]));
        assert!(matches!(
            rd(&long).read_path("p"),
            Err(WireError::TooLong { max: 4096, .. })
        ));
    }

    #[test]
    fn non_zero_padding_is_rejected() {
        let mut bytes = enc(|w| w.write_string("abc"));
        bytes[15] = 1;
        let e = rd(&bytes).read_bytes("s").unwrap_err();
        assert!(
            matches!(
                e,
                WireError::NonZeroPadding {
                    what: "s",
                    offset: 11
                }
            ),
            "{e:?}"
        );
        assert!(matches!(
            rd(&bytes).skip_bytes("s", 10),
            Err(WireError::NonZeroPadding { .. })
        ));
    }

    #[test]
    fn truncation_is_an_eof_error_at_the_right_field() {
        let bytes = enc(|w| w.write_string("abcdefghij"));
        for cut in 0..bytes.len() {
            let e = rd(&bytes[..cut]).read_bytes("field").unwrap_err();
            let WireError::Eof { what, offset } = e else {
                panic!("{e:?}")
            };
            assert_eq!(what, "field");
            // Length and body report where the string began, padding where it began.
            let expect = if cut < 18 { 0 } else { 18 };
            assert_eq!(offset, expect, "cut {cut}");
        }
        assert!(matches!(
            rd(&[1, 2, 3]).read_u64("n"),
            Err(WireError::Eof {
                what: "n",
                offset: 0
            })
        ));
    }

    #[test]
    fn utf8_is_required_only_for_strings() {
        let bytes = enc(|w| w.write_bytes(&[0xff, 0xfe]));
        assert_eq!(rd(&bytes).read_bytes("b").unwrap(), [0xff, 0xfe]);
        assert!(matches!(
            rd(&bytes).read_string("s"),
            Err(WireError::NotUtf8 {
                what: "s",
                offset: 0
            })
        ));
    }

    #[test]
    fn list_set_map_round_trip_and_byte_exact() {
        let list = vec!["b".to_string(), "a".to_string(), "b".to_string()];
        let bytes = enc(|w| w.write_strings(&list));
        let mut expect = u(3);
        for s in ["b", "a", "b"] {
            expect.extend(u(1));
            expect.extend([s.as_bytes()[0], 0, 0, 0, 0, 0, 0, 0]);
        }
        assert_eq!(bytes, expect);
        assert_eq!(rd(&bytes).read_string_list("l", 10, 10).unwrap(), list);
        let set = rd(&bytes).read_string_set("s", 10, 10).unwrap();
        assert_eq!(set.into_iter().collect::<Vec<_>>(), ["a", "b"]);

        let map: BTreeMap<String, String> = [
            ("out".into(), "/nix/store/x".into()),
            ("dev".into(), "".into()),
        ]
        .into();
        let bytes = enc(|w| w.write_string_map(&map));
        let mut expect = u(2);
        expect.extend(u(3));
        expect.extend(b"dev\0\0\0\0\0");
        expect.extend(u(0));
        expect.extend(u(3));
        expect.extend(b"out\0\0\0\0\0");
        expect.extend(u(12));
        expect.extend(b"/nix/store/x\0\0\0\0");
        assert_eq!(bytes, expect);
        assert_eq!(rd(&bytes).read_string_map("m", 10, 10, 20).unwrap(), map);
        assert_eq!(enc(|w| w.write_strings(&[] as &[&str])), u(0));
    }

    #[test]
    fn map_keeps_first_value_of_a_repeated_key() {
        let mut bytes = u(2);
        for v in ["1", "2"] {
            bytes.extend(enc(|w| {
                w.write_string("k")?;
                w.write_string(v)
            }));
        }
        let m = rd(&bytes).read_string_map("m", 10, 10, 10).unwrap();
        assert_eq!(m.get("k").map(String::as_str), Some("1"));
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn list_counts_are_capped_before_reading_elements() {
        for count in [1u64 << 32, 1 << 63, u64::MAX, 11] {
            let bytes = u(count);
            let mut r = rd(&bytes);
            let e = r.read_string_list("paths", 10, 100).unwrap_err();
            assert!(
                matches!(e, WireError::TooMany { what: "paths", offset: 0, count: c, max: 10 } if c == count),
                "{e:?}"
            );
            assert!(matches!(
                rd(&u(count)).read_string_map("m", 10, 1, 1),
                Err(WireError::TooMany { .. })
            ));
        }
        // Default path-set cap.
        assert!(matches!(
            rd(&u(1 << 32)).read_path_set("paths"),
            Err(WireError::TooMany { max, .. }) if max == 1 << 20
        ));
        // A list element too long is reported as TooLong for the same field.
        let bytes = enc(|w| w.write_strings(["ok", "toolong"]));
        assert!(matches!(
            rd(&bytes).read_string_list("l", 10, 3),
            Err(WireError::TooLong {
                what: "l",
                len: 7,
                max: 3,
                ..
            })
        ));
    }

    #[test]
    fn collection_total_is_bounded() {
        let limits = Limits {
            max_collection_bytes: 100,
            ..Limits::default()
        };
        // Three empty strings cost 3 × 32 = 96; the fourth exceeds 100.
        let bytes = enc(|w| w.write_strings(["", "", "", ""]));
        let mut r = WireReader::with_limits(&bytes[..], limits);
        assert!(matches!(
            r.read_string_list("l", 10, 10),
            Err(WireError::TotalTooLarge { max: 100, .. })
        ));
        let bytes = enc(|w| w.write_strings(["", "", ""]));
        let mut r = WireReader::with_limits(&bytes[..], limits);
        assert_eq!(r.read_string_list("l", 10, 10).unwrap().len(), 3);
    }

    #[test]
    fn writer_buffers_until_flush() {
        let mut out = Vec::new();
        {
            let mut w = WireWriter::new(&mut out);
            w.write_u64(1).unwrap();
            assert!(w.get_ref().is_empty());
            w.flush().unwrap();
            assert_eq!(w.get_ref().len(), 8);
        }
        assert_eq!(out, u(1));
    }

    #[test]
    fn from_io_recovers_a_wrapped_wire_error() {
        let io = WireError::TooLong {
            what: "x",
            offset: 3,
            len: 9,
            max: 8,
        }
        .into_io();
        assert_eq!(io.kind(), io::ErrorKind::InvalidData);
        assert!(matches!(
            WireError::from_io(io, "outer", 0),
            WireError::TooLong {
                what: "x",
                offset: 3,
                ..
            }
        ));
        let eof = io::Error::from(io::ErrorKind::UnexpectedEof);
        assert!(matches!(
            WireError::from_io(eof, "outer", 5),
            WireError::Eof {
                what: "outer",
                offset: 5
            }
        ));
    }

    #[test]
    fn raw_reads_count_position() {
        let data = [1u8, 2, 3, 4, 5, 6, 7, 8, 9];
        let mut r = rd(&data);
        let mut b = [0u8; 4];
        r.read_exact(&mut b).unwrap();
        assert_eq!(r.position(), 4);
        assert!(matches!(
            r.read_u64("n"),
            Err(WireError::Eof { offset: 4, .. })
        ));
    }
}
