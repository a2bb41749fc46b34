//! Framed streams (PROTOCOL.md §1): unpadded chunks `u64 len` + `len` bytes, `len = 0` ends.

use std::io::{self, Read, Write};

use super::wire::{Limits, WireError};

/// Chunk size the writer uses by default (what the 2.8 client produces in practice).
pub const DEFAULT_FRAME_CHUNK: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Inside the stream; `remaining` bytes of the current chunk are unread.
    Open,
    /// The terminator was read.
    Done,
    /// A framing error or I/O failure: the peer's position in the stream is unknown.
    Failed,
}

/// Reads the payload of a framed stream; `read` returns 0 once the terminator is consumed.
///
/// The protocol requires the receiver to consume the stream up to its terminator even when it
/// stops caring about the data (error in the payload, path already valid): call
/// [`drain`](Self::drain) in that case. If `drain` fails (chunk over the limit, total over the
/// limit, EOF, I/O error) the connection cannot be resynchronised and must be closed.
#[derive(Debug)]
pub struct FramedReader<R> {
    inner: R,
    max_chunk: u64,
    max_total: u64,
    remaining: u64,
    total: u64,
    /// Bytes of framing and payload consumed, for error positions.
    pos: u64,
    state: State,
}

impl<R: Read> FramedReader<R> {
    /// `max_chunk` bounds each chunk, `max_total` the sum of all payload bytes.
    pub fn new(inner: R, max_chunk: u64, max_total: u64) -> Self {
        FramedReader {
            inner,
            max_chunk,
            max_total,
            remaining: 0,
            total: 0,
            pos: 0,
            state: State::Open,
        }
    }

    /// Chunk bound from [`Limits::max_frame_chunk`].
    pub fn with_limits(inner: R, limits: &Limits, max_total: u64) -> Self {
        Self::new(inner, limits.max_frame_chunk, max_total)
    }

    /// True once the terminating empty chunk has been read.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Payload bytes received so far (including drained ones).
    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    fn fail(&mut self, e: WireError) -> WireError {
        self.state = State::Failed;
        e
    }

    /// Reads a chunk header. Afterwards either `remaining > 0` or the stream is done.
    fn next_chunk(&mut self) -> Result<(), WireError> {
        const WHAT: &str = "framed stream chunk length";
        let offset = self.pos;
        let mut b = [0u8; 8];
        if let Err(e) = self.inner.read_exact(&mut b) {
            return Err(self.fail(WireError::from_io(e, WHAT, offset)));
        }
        self.pos += 8;
        let len = u64::from_le_bytes(b);
        if len == 0 {
            self.state = State::Done;
            return Ok(());
        }
        if len > self.max_chunk {
            return Err(self.fail(WireError::TooLong {
                what: "framed stream chunk",
                offset,
                len,
                max: self.max_chunk,
            }));
        }
        match self.total.checked_add(len) {
            Some(t) if t <= self.max_total => {}
            _ => {
                return Err(self.fail(WireError::TotalTooLarge {
                    what: "framed stream",
                    offset,
                    max: self.max_total,
                }))
            }
        }
        self.total += len;
        self.remaining = len;
        Ok(())
    }

    /// Like `Read::read` but with a typed error.
    fn read_payload(&mut self, buf: &mut [u8]) -> Result<usize, WireError> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match self.state {
                State::Failed => return Err(WireError::FramedFailed),
                State::Done => return Ok(0),
                State::Open if self.remaining == 0 => self.next_chunk()?,
                State::Open => break,
            }
        }
        let want = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let offset = self.pos;
        let dst = buf.get_mut(..want).unwrap_or_default();
        let n = loop {
            match self.inner.read(dst) {
                Ok(0) => {
                    return Err(self.fail(WireError::Eof {
                        what: "framed stream chunk",
                        offset,
                    }))
                }
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(self.fail(WireError::from_io(e, "framed stream chunk", offset)))
                }
            }
        };
        self.remaining -= n as u64;
        self.pos += n as u64;
        Ok(n)
    }

    /// Moves the rest of the payload with `step(inner, max)`, which moves at most `max` bytes
    /// of the current chunk out of `inner` to wherever the caller wants them and returns how
    /// many (0: the peer's stream ended): for moving payload without copying it through this
    /// process (splice). Chunk headers are read here, with the limits of [`FramedReader::new`].
    pub fn pump(
        &mut self,
        mut step: impl FnMut(&mut R, u64) -> io::Result<u64>,
    ) -> Result<(), WireError> {
        loop {
            match self.state {
                State::Failed => return Err(WireError::FramedFailed),
                State::Done => return Ok(()),
                State::Open if self.remaining == 0 => {
                    self.next_chunk()?;
                    continue;
                }
                State::Open => {}
            }
            let offset = self.pos;
            let n = match step(&mut self.inner, self.remaining) {
                Ok(0) => {
                    return Err(self.fail(WireError::Eof {
                        what: "framed stream chunk",
                        offset,
                    }))
                }
                Ok(n) if n <= self.remaining => n,
                Ok(_) => {
                    return Err(self.fail(WireError::from_io(
                        io::Error::other("moved more than the chunk holds"),
                        "framed stream chunk",
                        offset,
                    )))
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(self.fail(WireError::from_io(e, "framed stream chunk", offset)))
                }
            };
            self.remaining -= n;
            self.pos += n;
        }
    }

    /// Discards everything up to and including the terminator; returns the number of payload
    /// bytes discarded. Limits still apply, so a peer cannot make us read forever.
    pub fn drain(&mut self) -> Result<u64, WireError> {
        let mut scratch = [0u8; 8192];
        let mut discarded = 0u64;
        loop {
            let n = self.read_payload(&mut scratch)?;
            if n == 0 {
                return Ok(discarded);
            }
            discarded += n as u64;
        }
    }
}

impl<R: Read> Read for FramedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_payload(buf).map_err(WireError::into_io)
    }
}

/// Writes a framed stream in chunks of at most `chunk` bytes. Call [`finish`](Self::finish) to
/// send the rest and the terminator; dropping the writer without it leaves the stream open.
///
/// `flush` sends the pending chunk and flushes `W`; `finish` does not flush `W`, so the caller
/// keeps control of when the bytes go out.
#[derive(Debug)]
pub struct FramedWriter<W: Write> {
    inner: W,
    buf: Vec<u8>,
    chunk: usize,
}

impl<W: Write> FramedWriter<W> {
    pub fn new(inner: W) -> Self {
        Self::with_chunk_size(inner, DEFAULT_FRAME_CHUNK)
    }

    /// `chunk` is clamped to at least 1 (an empty chunk would end the stream).
    pub fn with_chunk_size(inner: W, chunk: usize) -> Self {
        let chunk = chunk.max(1);
        FramedWriter {
            inner,
            buf: Vec::with_capacity(chunk.min(DEFAULT_FRAME_CHUNK)),
            chunk,
        }
    }

    fn emit(inner: &mut W, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        inner.write_all(&(data.len() as u64).to_le_bytes())?;
        inner.write_all(data)
    }

    fn emit_pending(&mut self) -> io::Result<()> {
        Self::emit(&mut self.inner, &self.buf)?;
        self.buf.clear();
        Ok(())
    }

    /// Sends pending data and the terminating empty chunk; returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.emit_pending()?;
        self.inner.write_all(&0u64.to_le_bytes())?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for FramedWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        // Whole chunks straight from the caller's buffer, without copying.
        if self.buf.is_empty() && data.len() >= self.chunk {
            let whole = data.get(..self.chunk).unwrap_or_default();
            Self::emit(&mut self.inner, whole)?;
            return Ok(whole.len());
        }
        let n = data.len().min(self.chunk - self.buf.len());
        self.buf
            .extend_from_slice(data.get(..n).unwrap_or_default());
        if self.buf.len() == self.chunk {
            self.emit_pending()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.emit_pending()?;
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(chunks: &[&[u8]]) -> Vec<u8> {
        let mut v = Vec::new();
        for c in chunks {
            v.extend((c.len() as u64).to_le_bytes());
            v.extend_from_slice(c);
        }
        v.extend(0u64.to_le_bytes());
        v
    }

    fn reader(bytes: &[u8]) -> FramedReader<&[u8]> {
        FramedReader::new(bytes, 1 << 20, 1 << 30)
    }

    #[test]
    fn writer_output_is_byte_exact_and_unpadded() {
        let mut out = Vec::new();
        let mut w = FramedWriter::with_chunk_size(&mut out, 4);
        w.write_all(b"abcdefghij").unwrap();
        w.finish().unwrap();
        let mut expect = Vec::new();
        expect.extend([4, 0, 0, 0, 0, 0, 0, 0]);
        expect.extend(b"abcd");
        expect.extend([4, 0, 0, 0, 0, 0, 0, 0]);
        expect.extend(b"efgh");
        expect.extend([2, 0, 0, 0, 0, 0, 0, 0]);
        expect.extend(b"ij");
        expect.extend([0; 8]);
        assert_eq!(out, expect);
    }

    #[test]
    fn pump_moves_every_chunk_in_steps_and_stops_at_the_terminator() {
        let mut bytes = frame(&[b"abcde", b"fg", b"hijkl"]);
        bytes.extend(b"after");
        let mut r = reader(&bytes);
        let mut got = Vec::new();
        // At most 3 bytes a step, never past the chunk.
        r.pump(|inner, max| {
            let n = max.min(3) as usize;
            got.extend_from_slice(&inner[..n]);
            *inner = &inner[n..];
            Ok(n as u64)
        })
        .unwrap();
        assert_eq!(got, b"abcdefghijkl");
        assert!(r.is_done());
        assert_eq!(r.total(), 12);
        assert_eq!(r.into_inner(), b"after");
        // A peer that stops mid-chunk, or a step that claims too much, fails the stream.
        let cut = &frame(&[b"abcde"])[..10];
        let mut r = reader(cut);
        let e = r.pump(|inner, max| {
            let n = (max as usize).min(inner.len());
            *inner = &inner[n..];
            Ok(n as u64)
        });
        assert!(matches!(e, Err(WireError::Eof { .. })), "{e:?}");
        let bytes = frame(&[b"abc"]);
        let mut r = reader(&bytes);
        assert!(r.pump(|_, max| Ok(max + 1)).is_err());
        assert!(matches!(
            r.pump(|_, max| Ok(max)),
            Err(WireError::FramedFailed)
        ));
    }

    #[test]
    fn empty_stream_is_just_the_terminator() {
        let mut out = Vec::new();
        FramedWriter::new(&mut out).finish().unwrap();
        assert_eq!(out, [0; 8]);
        let mut r = reader(&out);
        let mut v = Vec::new();
        r.read_to_end(&mut v).unwrap();
        assert!(v.is_empty());
        assert!(r.is_done());
    }

    #[test]
    fn flush_emits_the_pending_chunk() {
        let mut out = Vec::new();
        let mut w = FramedWriter::new(&mut out);
        w.write_all(b"xy").unwrap();
        w.flush().unwrap();
        w.write_all(b"z").unwrap();
        w.finish().unwrap();
        assert_eq!(out, frame(&[b"xy", b"z"]));
    }

    #[test]
    fn round_trip_with_default_chunks_and_consumes_exactly_the_stream() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut out = Vec::new();
        let mut w = FramedWriter::new(&mut out);
        w.write_all(&data[..10]).unwrap();
        w.write_all(&data[10..]).unwrap();
        w.finish().unwrap();
        out.extend(b"after");
        let mut src = &out[..];
        let mut r = FramedReader::new(&mut src, DEFAULT_FRAME_CHUNK as u64, 1 << 20);
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        assert_eq!(got, data);
        assert!(r.is_done());
        assert_eq!(r.total(), data.len() as u64);
        let _ = r.into_inner();
        assert_eq!(src, b"after");
    }

    #[test]
    fn drain_reads_to_the_terminator_after_a_partial_read() {
        let mut bytes = frame(&[b"hello", b"world", b"!"]);
        bytes.extend(b"next-op");
        let mut src = &bytes[..];
        let mut r = FramedReader::new(&mut src, 100, 100);
        let mut two = [0u8; 2];
        r.read_exact(&mut two).unwrap();
        assert_eq!(&two, b"he");
        assert_eq!(r.drain().unwrap(), 9);
        assert!(r.is_done());
        assert_eq!(r.drain().unwrap(), 0);
        let _ = r.into_inner();
        assert_eq!(src, b"next-op");
    }

    #[test]
    fn oversize_chunk_is_rejected_and_poisons_the_stream() {
        for len in [101u64, 1 << 32, 1 << 63, u64::MAX - 7, u64::MAX] {
            let mut bytes = len.to_le_bytes().to_vec();
            bytes.extend([0u8; 16]);
            let mut r = FramedReader::new(&bytes[..], 100, 1000);
            let mut buf = [0u8; 8];
            let e = r.read(&mut buf).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData);
            assert!(matches!(
                WireError::from_io(e, "nar", 0),
                WireError::TooLong { what: "framed stream chunk", offset: 0, len: l, max: 100 } if l == len
            ));
            assert!(matches!(r.drain(), Err(WireError::FramedFailed)));
        }
    }

    #[test]
    fn total_limit_is_enforced_across_chunks() {
        let bytes = frame(&[&[1; 60], &[2; 60]]);
        let mut r = FramedReader::new(&bytes[..], 100, 100);
        let mut v = Vec::new();
        let e = r.read_to_end(&mut v).unwrap_err();
        assert!(matches!(
            WireError::from_io(e, "x", 0),
            WireError::TotalTooLarge {
                what: "framed stream",
                offset: 68,
                max: 100
            }
        ));
        assert_eq!(v.len(), 60);
        let mut r = FramedReader::new(&bytes[..], 100, 100);
        assert!(matches!(r.drain(), Err(WireError::TotalTooLarge { .. })));
    }

    #[test]
    fn truncated_streams_are_eof_errors() {
        let bytes = frame(&[b"abcdef"]);
        for cut in 0..bytes.len() {
            let mut r = reader(&bytes[..cut]);
            let e = r.drain().unwrap_err();
            assert!(matches!(e, WireError::Eof { .. }), "cut {cut}: {e:?}");
            let mut r = reader(&bytes[..cut]);
            let mut v = Vec::new();
            assert_eq!(
                r.read_to_end(&mut v).unwrap_err().kind(),
                io::ErrorKind::UnexpectedEof
            );
        }
    }

    #[test]
    fn chunk_size_is_clamped_to_one() {
        let mut out = Vec::new();
        let mut w = FramedWriter::with_chunk_size(&mut out, 0);
        w.write_all(b"ab").unwrap();
        w.finish().unwrap();
        assert_eq!(out, frame(&[b"a", b"b"]));
    }
}
