//! Data that follows an operation's arguments on the connection: a marker in the request says
//! which form it takes, and turns into the one handle that reads it. Reading the client's
//! socket directly is never needed: the handles stop where the stream stops, so the connection
//! stays in step for the next operation.
//!
//! - [`Framed`]: a framed stream (AddToStore from 1.25, AddToStoreNar from 1.23,
//!   AddMultipleToStore, AddBuildLog) read with a [`FramedReader`].
//! - [`RawNar`]: one bare NAR (AddToStore before 1.25, AddToStoreNar before 1.21), read with a
//!   [`NarStream`], which parses it to find where it ends.
//! - [`Tunnelled`]: data the server asks for with `STDERR_READ` (AddToStoreNar 1.21–1.22,
//!   ImportPaths), read with a [`TunnelReader`].

use std::collections::BTreeSet;
use std::io::{self, Read, Write};

use crate::nar::{self, NarError, NarReader};
use crate::narinfo::PathInfo;
use crate::store_path::{StoreDir, StorePath};
use crate::worker::{FramedReader, Limits, StderrMsg, WireError, WireReader, WireWriter};

use super::fields::{read_opt_path, read_path, read_path_info, read_paths};

/// What went wrong reading a stream that follows a request.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Nar(#[from] NarError),
    /// ImportPaths: an entry without the export format's magic (nix-daemon's words).
    #[error("Nix archive cannot be imported; wrong format")]
    WrongFormat,
    /// A flat AddToStore whose NAR holds no regular file.
    #[error("regular file expected")]
    NotRegular,
}

/// A framed stream follows the request. Only the request reader makes one.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "the stream must be read to its end to keep the connection in step"]
pub struct Framed {
    max_chunk: u64,
    max_total: u64,
}

impl Framed {
    pub(super) fn new(limits: &Limits, max_total: u64) -> Framed {
        Framed {
            max_chunk: limits.max_frame_chunk,
            max_total,
        }
    }

    /// The stream's payload, read from `r` (the connection, positioned after the request).
    pub fn open<R: Read>(self, r: R) -> FramedReader<R> {
        FramedReader::new(r, self.max_chunk, self.max_total)
    }
}

/// A bare NAR follows the request. Only the request reader makes one.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "the NAR must be read to its end to keep the connection in step"]
pub struct RawNar(());

impl RawNar {
    pub(super) fn new() -> RawNar {
        RawNar(())
    }

    pub fn open<R: Read>(self, r: R) -> NarStream<R> {
        NarStream::new(r)
    }
}

/// The server pulls the data with `STDERR_READ` while it works. Only the request reader makes
/// one.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "the tunnelled data must be read to keep the connection in step"]
pub struct Tunnelled(());

impl Tunnelled {
    pub(super) fn new() -> Tunnelled {
        Tunnelled(())
    }

    /// The data, asked for on `w` and read from `r`, at protocol `minor`.
    pub fn open<'a, R: Read, W: Write>(
        self,
        r: &'a mut WireReader<R>,
        w: &'a mut WireWriter<W>,
        minor: u8,
    ) -> TunnelReader<'a, R, W> {
        TunnelReader { r, w, minor }
    }
}

/// Copies everything read through it into a sink that may fail: after the first write error
/// the data is still read (and the error dropped), so the source is consumed to its end.
struct Tee<'a, R, W> {
    inner: R,
    out: &'a mut W,
    failed: bool,
}

impl<R: Read, W: Write> Read for Tee<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if !self.failed {
            self.failed = self
                .out
                .write_all(buf.get(..n).unwrap_or_default())
                .is_err();
        }
        Ok(n)
    }
}

/// One NAR read from a longer stream: parsed as it passes, so reading stops exactly at its
/// end. A sink that fails (a store-writer that stopped reading) does not stop the reading;
/// whoever reads the sink learns why.
#[derive(Debug)]
pub struct NarStream<R> {
    inner: R,
}

impl<R: Read> NarStream<R> {
    /// The NAR that `inner` continues with (a tunnel, say; the connection's own bare NARs come
    /// from a [`RawNar`]).
    pub fn new(inner: R) -> NarStream<R> {
        NarStream { inner }
    }

    /// Reads the whole NAR, copying its bytes to `out`.
    pub fn copy_to(self, out: &mut impl Write) -> Result<(), NarError> {
        let tee = Tee {
            inner: self.inner,
            out,
            failed: false,
        };
        NarReader::new(tee).skip_to_end()
    }

    /// Reads the whole NAR, copying only the contents of its regular files to `out` (flat
    /// ingestion: the NAR holds a single file).
    pub fn copy_contents_to(self, out: &mut impl Write) -> Result<(), StreamError> {
        let mut nar = NarReader::new(self.inner);
        let mut regular = false;
        let mut buf = vec![0u8; 64 * 1024];
        let mut out_ok = true;
        loop {
            match nar.next_event()? {
                nar::Event::Regular { .. } => {
                    regular = true;
                    loop {
                        let n = nar.read_contents(&mut buf)?;
                        if n == 0 {
                            break;
                        }
                        if out_ok && out.write_all(buf.get(..n).unwrap_or_default()).is_err() {
                            out_ok = false;
                        }
                    }
                }
                nar::Event::End => break,
                _ => {}
            }
        }
        if regular {
            Ok(())
        } else {
            Err(StreamError::NotRegular)
        }
    }
}

/// Data pulled from the client with `STDERR_READ` (protocol 1.21–1.22 AddToStoreNar, and
/// ImportPaths): each `read` asks for at most the buffer's size and reads what comes back.
pub struct TunnelReader<'a, R, W: Write> {
    r: &'a mut WireReader<R>,
    w: &'a mut WireWriter<W>,
    minor: u8,
}

impl<R: Read, W: Write> Read for TunnelReader<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        StderrMsg::Read(buf.len() as u64)
            .write(self.w, self.minor)
            .and_then(|_| self.w.flush())
            .map_err(WireError::into_io)?;
        let data = self
            .r
            .read_bytes_max("tunnelled data", buf.len() as u64)
            .map_err(WireError::into_io)?;
        let n = data.len();
        if let Some(dst) = buf.get_mut(..n) {
            dst.copy_from_slice(&data);
        }
        Ok(n)
    }
}

/// The magic before each path's metadata in the export format.
pub const EXPORT_MAGIC: u64 = 0x4558_494e;

/// A path's metadata in the export format (ImportPaths), read after its NAR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedPath {
    pub path: StorePath,
    pub references: BTreeSet<StorePath>,
    pub deriver: Option<StorePath>,
}

/// The export format (ImportPaths, PROTOCOL.md §4): entries of `1`, NAR, magic, metadata,
/// ended by `0`.
pub struct ImportReader<R> {
    r: WireReader<R>,
    sd: StoreDir,
}

impl<R: Read> ImportReader<R> {
    /// Reads from `inner` (buffer a tunnel: each read of it is a round trip).
    pub fn new(inner: R, limits: Limits, sd: &StoreDir) -> ImportReader<R> {
        ImportReader {
            r: WireReader::with_limits(inner, limits),
            sd: sd.clone(),
        }
    }

    /// Whether another entry follows (reads its marker).
    pub fn next_entry(&mut self) -> Result<bool, StreamError> {
        Ok(self.r.read_u64("export marker")? != 0)
    }

    /// The entry whose marker was just read: its NAR goes to `nar_out`, then its metadata.
    pub fn read_entry(&mut self, nar_out: &mut impl Write) -> Result<ExportedPath, StreamError> {
        NarStream { inner: &mut self.r }.copy_to(nar_out)?;
        if self.r.read_u64("export magic")? != EXPORT_MAGIC {
            return Err(StreamError::WrongFormat);
        }
        let path = read_path(&mut self.r, &self.sd, "path")?;
        let references = read_paths(&mut self.r, &self.sd, "references")?;
        let deriver = read_opt_path(&mut self.r, &self.sd, "deriver")?;
        if self.r.read_u64("signature flag")? == 1 {
            self.r.read_string_max("legacy signature", 4096)?;
        }
        Ok(ExportedPath {
            path,
            references,
            deriver,
        })
    }
}

/// AddMultipleToStore's framed payload: a count, then for each path its info and its NAR.
pub struct MultipleReader<R> {
    r: WireReader<FramedReader<R>>,
    sd: StoreDir,
    /// Entries still to come; `None` before the count is read.
    left: Option<u64>,
}

impl<R: Read> MultipleReader<R> {
    pub fn new(framed: FramedReader<R>, limits: Limits, sd: &StoreDir) -> MultipleReader<R> {
        MultipleReader {
            r: WireReader::with_limits(framed, limits),
            sd: sd.clone(),
            left: None,
        }
    }

    /// The next entry's path info (`ultimate` as the client claims it), or `None` after the
    /// last. Its NAR must be read with [`copy_nar`](Self::copy_nar) before the next call.
    pub fn next_info(&mut self) -> Result<Option<PathInfo>, StreamError> {
        let left = match self.left {
            Some(n) => n,
            None => self.r.read_u64("path count")?,
        };
        if left == 0 {
            self.left = Some(0);
            return Ok(None);
        }
        self.left = Some(left - 1);
        Ok(Some(read_path_info(&mut self.r, &self.sd)?))
    }

    /// The NAR of the entry just read, copied to `out`.
    pub fn copy_nar(&mut self, out: &mut impl Write) -> Result<(), NarError> {
        NarStream { inner: &mut self.r }.copy_to(out)
    }

    /// Reads the framed stream to its terminator, whatever is left of it. An error here leaves
    /// the connection out of step.
    pub fn drain(&mut self) -> Result<u64, WireError> {
        self.r.get_mut().drain()
    }
}
