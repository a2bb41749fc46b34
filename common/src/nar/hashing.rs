//! sha256 + byte count of a stream, for NAR hashes and sizes.

use std::io::{self, Read, Write};

use sha2::{Digest, Sha256};

/// Reader adaptor that hashes (sha256) and counts exactly the bytes handed to its caller.
///
/// Put it between the source and a [`NarReader`](super::NarReader): since the NAR reader never
/// reads past the end of the archive, the result is the NAR hash and size.
#[derive(Debug)]
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// Bytes read so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// sha256 of everything read so far, and its length.
    pub fn finish(self) -> ([u8; 32], u64) {
        (self.hasher.finalize().into(), self.count)
    }

    /// The wrapped reader (the hash is lost).
    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let got = buf
            .get(..n)
            .ok_or_else(|| io::Error::other("reader overran buffer"))?;
        self.hasher.update(got);
        self.count += n as u64;
        Ok(n)
    }
}

/// Writer adaptor that hashes (sha256) and counts exactly the bytes accepted by the inner writer.
#[derive(Debug)]
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl HashingWriter<io::Sink> {
    /// A writer that only hashes.
    pub fn sink() -> Self {
        HashingWriter::new(io::sink())
    }
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// Bytes written so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// sha256 of everything written so far, and its length.
    pub fn finish(self) -> ([u8; 32], u64) {
        (self.hasher.finalize().into(), self.count)
    }

    /// The wrapped writer (the hash is lost).
    pub fn into_inner(self) -> W {
        self.inner
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        let done = buf
            .get(..n)
            .ok_or_else(|| io::Error::other("writer overran buffer"))?;
        self.hasher.update(done);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
