//! Writing NARs token by token, canonical by construction.

use std::io::{self, Write};

use super::error::show;
use super::{is_valid_name, is_valid_target, padding, Limits, NAR_MAGIC};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// A node must come next.
    Node,
    /// Inside a regular file, `remaining` bytes still to come.
    Contents { size: u64, remaining: u64 },
    /// Inside a directory: an entry or its end must come next.
    DirBody,
    /// The root node is complete.
    Done,
}

/// Builds a NAR on `W` from calls in archive order: a node is one of [`NarWriter::regular`] (then
/// exactly `size` bytes through [`NarWriter::contents`]), [`NarWriter::symlink`], or
/// [`NarWriter::directory`] … [`NarWriter::end_directory`] with [`NarWriter::entry`] before each
/// child node.
///
/// It refuses to write anything the reader would reject (invalid or unsorted names, bad symlink
/// targets, nesting beyond the default depth limit, calls out of order) with an
/// `io::ErrorKind::InvalidInput` error. Writes are passed straight to `W`, most of them small:
/// give it a buffered or hashing writer.
#[derive(Debug)]
pub struct NarWriter<W: Write> {
    w: W,
    state: State,
    /// One per open directory: the last entry name written in it.
    dirs: Vec<Vec<u8>>,
}

impl<W: Write> NarWriter<W> {
    /// Starts a NAR (writes the magic).
    pub fn new(mut w: W) -> io::Result<Self> {
        write_str(&mut w, NAR_MAGIC)?;
        Ok(NarWriter {
            w,
            state: State::Node,
            dirs: Vec::new(),
        })
    }

    /// A regular file of `size` bytes; follow with [`NarWriter::contents`] totalling `size`.
    pub fn regular(&mut self, executable: bool, size: u64) -> io::Result<()> {
        self.require(State::Node, "regular file")?;
        let w = &mut self.w;
        write_str(w, b"(")?;
        write_str(w, b"type")?;
        write_str(w, b"regular")?;
        if executable {
            write_str(w, b"executable")?;
            write_str(w, b"")?;
        }
        write_str(w, b"contents")?;
        w.write_all(&size.to_le_bytes())?;
        self.state = State::Contents {
            size,
            remaining: size,
        };
        if size == 0 {
            self.end_contents()?;
        }
        Ok(())
    }

    /// Next piece of the current regular file's contents.
    pub fn contents(&mut self, data: &[u8]) -> io::Result<()> {
        let State::Contents { size, remaining } = self.state else {
            return Err(invalid("NAR writer: contents outside a regular file"));
        };
        let len = data.len() as u64;
        if len > remaining {
            return Err(invalid("NAR writer: more contents than the declared size"));
        }
        self.w.write_all(data)?;
        self.state = State::Contents {
            size,
            remaining: remaining - len,
        };
        if remaining == len {
            self.end_contents()?;
        }
        Ok(())
    }

    /// A symlink node.
    pub fn symlink(&mut self, target: &[u8]) -> io::Result<()> {
        self.require(State::Node, "symlink")?;
        if !is_valid_target(target) {
            return Err(invalid(&format!(
                "NAR writer: invalid symlink target '{}'",
                show(target)
            )));
        }
        let w = &mut self.w;
        write_str(w, b"(")?;
        write_str(w, b"type")?;
        write_str(w, b"symlink")?;
        write_str(w, b"target")?;
        write_str(w, target)?;
        write_str(w, b")")?;
        self.node_done()
    }

    /// Starts a directory node.
    pub fn directory(&mut self) -> io::Result<()> {
        self.require(State::Node, "directory")?;
        let w = &mut self.w;
        write_str(w, b"(")?;
        write_str(w, b"type")?;
        write_str(w, b"directory")?;
        self.dirs.push(Vec::new());
        self.state = State::DirBody;
        Ok(())
    }

    /// Starts the entry `name` of the current directory; its node must follow. Names must come
    /// in strictly increasing byte order.
    pub fn entry(&mut self, name: &[u8]) -> io::Result<()> {
        self.require(State::DirBody, "directory entry")?;
        if !is_valid_name(name) {
            return Err(invalid(&format!(
                "NAR writer: invalid file name '{}'",
                show(name)
            )));
        }
        if self.dirs.len() > Limits::DEFAULT_MAX_DEPTH {
            return Err(invalid(&format!(
                "NAR writer: nesting exceeds the depth limit of {}",
                Limits::DEFAULT_MAX_DEPTH
            )));
        }
        let Some(prev) = self.dirs.last_mut() else {
            return Err(invalid("NAR writer: entry outside a directory"));
        };
        if name <= prev.as_slice() {
            return Err(invalid(&format!(
                "NAR writer: entry '{}' is not sorted after '{}'",
                show(name),
                show(prev)
            )));
        }
        prev.clear();
        prev.extend_from_slice(name);
        let w = &mut self.w;
        write_str(w, b"entry")?;
        write_str(w, b"(")?;
        write_str(w, b"name")?;
        write_str(w, name)?;
        write_str(w, b"node")?;
        self.state = State::Node;
        Ok(())
    }

    /// Ends the current directory.
    pub fn end_directory(&mut self) -> io::Result<()> {
        self.require(State::DirBody, "end of directory")?;
        write_str(&mut self.w, b")")?;
        self.dirs.pop();
        self.node_done()
    }

    /// Checks the archive is complete and returns the writer (not flushed).
    pub fn finish(self) -> io::Result<W> {
        if self.state != State::Done {
            return Err(invalid("NAR writer: archive is incomplete"));
        }
        Ok(self.w)
    }

    /// The underlying writer.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.w
    }

    fn end_contents(&mut self) -> io::Result<()> {
        if let State::Contents { size, .. } = self.state {
            let pad = padding(size) as usize;
            self.w.write_all(ZEROS.get(..pad).unwrap_or_default())?;
        }
        write_str(&mut self.w, b")")?;
        self.node_done()
    }

    /// After a node: close the directory entry it belonged to, if any.
    fn node_done(&mut self) -> io::Result<()> {
        if self.dirs.is_empty() {
            self.state = State::Done;
        } else {
            write_str(&mut self.w, b")")?;
            self.state = State::DirBody;
        }
        Ok(())
    }

    fn require(&self, state: State, what: &str) -> io::Result<()> {
        if self.state == state {
            Ok(())
        } else {
            Err(invalid(&format!("NAR writer: {what} not allowed here")))
        }
    }
}

/// Writes the NAR of a single regular file holding `data` (what the worker protocol calls a
/// "flat" file wrapped in a NAR).
pub fn write_flat_nar<W: Write>(w: W, executable: bool, data: &[u8]) -> io::Result<W> {
    let mut nar = NarWriter::new(w)?;
    nar.regular(executable, data.len() as u64)?;
    // An empty file's contents end with its declaration.
    if !data.is_empty() {
        nar.contents(data)?;
    }
    nar.finish()
}

const ZEROS: [u8; 8] = [0; 8];

/// Writes one NAR string: length, bytes, zero padding. Short strings go out in a single write.
fn write_str<W: Write>(w: &mut W, s: &[u8]) -> io::Result<()> {
    const SMALL: usize = 256;
    let len = s.len() as u64;
    let pad = padding(len) as usize;
    if s.len() <= SMALL {
        let mut buf = [0u8; 8 + SMALL + 8];
        let total = 8 + s.len() + pad;
        buf[..8].copy_from_slice(&len.to_le_bytes());
        if let Some(body) = buf.get_mut(8..8 + s.len()) {
            body.copy_from_slice(s);
        }
        return w.write_all(buf.get(..total).unwrap_or_default());
    }
    w.write_all(&len.to_le_bytes())?;
    w.write_all(s)?;
    w.write_all(ZEROS.get(..pad).unwrap_or_default())
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.to_string())
}
