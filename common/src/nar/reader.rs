//! Streaming, canonical-only NAR parser.

use std::io::{self, Read};

use super::error::{show, NarError, NarErrorKind};
use super::{
    is_valid_name, is_valid_target, padding, Limits, MAX_NAME_LEN, MAX_TAG_LEN, MAX_TARGET_LEN,
    NAR_MAGIC,
};

/// The longest string a canonical NAR holds outside file contents.
const LONGEST_TOKEN: usize = {
    let names = if MAX_NAME_LEN > MAX_TAG_LEN {
        MAX_NAME_LEN
    } else {
        MAX_TAG_LEN
    };
    if MAX_TARGET_LEN > names {
        MAX_TARGET_LEN
    } else {
        names
    }
};

/// One step of a NAR, in archive order.
///
/// The root node comes first. A [`Event::Directory`] is followed by zero or more
/// `Entry { name }` + (that entry's node events), then [`Event::EndDirectory`]. After a
/// [`Event::Regular`] the file's contents can be read with [`NarReader::read_contents`]; whatever
/// is left unread is skipped (and still validated) by the next call to [`NarReader::next_event`].
/// [`Event::End`] follows the root node; it is repeated if asked again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    /// A directory node starts.
    Directory,
    /// The next node is the directory entry `name` (already validated: a single, sorted,
    /// unique component).
    Entry { name: &'a [u8] },
    /// The innermost open directory ends.
    EndDirectory,
    /// A symlink node (target validated: not empty, no NUL, at most 4095 bytes).
    Symlink { target: &'a [u8] },
    /// A regular file node of `size` bytes; the contents follow.
    Regular { executable: bool, size: u64 },
    /// The archive is complete; nothing more has been read.
    End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the magic.
    Start,
    /// A node ("(" "type" ...) comes next.
    Node,
    /// Inside the contents of a regular file.
    Contents {
        size: u64,
        remaining: u64,
    },
    /// A node has been read completely.
    NodeDone,
    /// Inside a directory, before "entry" or ")".
    DirBody,
    Finished,
    Failed,
}

/// Pull parser for one NAR read from `R`.
///
/// It reads exactly the archive's bytes, straight from `R` with no buffering of its own (wrap an
/// unbuffered source in a `BufReader`, remembering that the `BufReader` itself reads ahead), so it
/// can parse a NAR embedded in a longer stream and leave the source positioned right after it.
///
/// Once a method has returned an error, the reader stays failed.
#[derive(Debug)]
pub struct NarReader<R> {
    inner: R,
    limits: Limits,
    state: State,
    /// Bytes consumed so far.
    offset: u64,
    /// Offset of the token being examined, for error locations.
    token_start: u64,
    /// Path of the current node: "/a/b", empty for the root.
    path: Vec<u8>,
    /// For each entry on the path: length of `path` before it was pushed.
    path_marks: Vec<usize>,
    /// For each open directory: the name of its last entry (empty before the first one).
    prev_names: Vec<Vec<u8>>,
    /// Nodes seen so far.
    nodes: u64,
    /// Scratch buffer for the current token (bounded by MAX_TARGET_LEN).
    token: Vec<u8>,
    /// Target of the last symlink read.
    target: Vec<u8>,
}

impl<R: Read> NarReader<R> {
    /// A reader with default [`Limits`].
    pub fn new(inner: R) -> Self {
        Self::with_limits(inner, Limits::default())
    }

    pub fn with_limits(inner: R, limits: Limits) -> Self {
        NarReader {
            inner,
            limits,
            state: State::Start,
            offset: 0,
            token_start: 0,
            path: Vec::new(),
            path_marks: Vec::new(),
            prev_names: Vec::new(),
            nodes: 0,
            token: Vec::with_capacity(64),
            target: Vec::new(),
        }
    }

    /// Bytes of the archive consumed so far (the NAR size once [`Event::End`] was returned).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Path inside the archive of the current node (empty for the root; components are joined
    /// with `/` and start with one).
    pub fn path(&self) -> &[u8] {
        &self.path
    }

    /// Current nesting depth (number of path components of the current node).
    pub fn depth(&self) -> usize {
        self.path_marks.len()
    }

    /// The underlying reader, positioned wherever parsing stopped.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// The underlying reader. Reading from it mid-archive desynchronises the parser.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Next step of the archive. Skips (while validating) any unread file contents first.
    pub fn next_event(&mut self) -> Result<Event<'_>, NarError> {
        if self.state == State::Failed {
            return Err(self.error(NarErrorKind::Poisoned));
        }
        match self.step() {
            Ok(ev) => Ok(match ev {
                Step::Directory => Event::Directory,
                Step::Entry => Event::Entry {
                    name: self.current_name(),
                },
                Step::EndDirectory => Event::EndDirectory,
                Step::Symlink => Event::Symlink {
                    target: &self.target,
                },
                Step::Regular { executable, size } => Event::Regular { executable, size },
                Step::End => Event::End,
            }),
            Err(e) => {
                self.state = State::Failed;
                Err(e)
            }
        }
    }

    /// Reads up to `buf.len()` bytes of the current regular file's contents. Returns 0 once they
    /// are exhausted (or when not inside a regular file).
    pub fn read_contents(&mut self, buf: &mut [u8]) -> Result<usize, NarError> {
        let State::Contents { size, remaining } = self.state else {
            return if self.state == State::Failed {
                Err(self.error(NarErrorKind::Poisoned))
            } else {
                Ok(0)
            };
        };
        let want = usize::try_from(remaining)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        if want == 0 {
            return Ok(0);
        }
        let dst = buf.get_mut(..want).unwrap_or_default();
        let n = loop {
            match self.inner.read(dst) {
                Ok(0) => {
                    self.state = State::Failed;
                    return Err(self.io_error(io::ErrorKind::UnexpectedEof.into()));
                }
                Ok(n) => break n.min(want),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.state = State::Failed;
                    return Err(self.io_error(e));
                }
            }
        };
        self.offset += n as u64;
        self.state = State::Contents {
            size,
            remaining: remaining - n as u64,
        };
        Ok(n)
    }

    /// Reads (and validates) the rest of the archive.
    pub fn skip_to_end(&mut self) -> Result<(), NarError> {
        while self.next_event()? != Event::End {}
        Ok(())
    }

    /// Reads the rest of the archive, then checks that the input ends there too (A25). Use this
    /// only when the NAR is the whole input; it reads one byte past the archive.
    pub fn finish_at_eof(&mut self) -> Result<(), NarError> {
        self.skip_to_end()?;
        let mut byte = [0u8; 1];
        loop {
            match self.inner.read(&mut byte) {
                Ok(0) => return Ok(()),
                Ok(_) => {
                    self.token_start = self.offset;
                    self.state = State::Failed;
                    return Err(self.error(NarErrorKind::TrailingData));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.io_error(e)),
            }
        }
    }

    /// An error located at the current node and token (used by the restorer too).
    pub(crate) fn error(&self, kind: NarErrorKind) -> NarError {
        NarError::new(kind, &self.path, self.token_start)
    }

    fn io_error(&self, e: io::Error) -> NarError {
        let kind = if e.kind() == io::ErrorKind::UnexpectedEof {
            NarErrorKind::UnexpectedEof
        } else {
            NarErrorKind::Read(e)
        };
        NarError::new(kind, &self.path, self.offset)
    }

    fn current_name(&self) -> &[u8] {
        let start = self.path_marks.last().map_or(0, |m| m + 1);
        self.path.get(start..).unwrap_or_default()
    }

    fn step(&mut self) -> Result<Step, NarError> {
        loop {
            match self.state {
                State::Start => {
                    self.token_start = self.offset;
                    let len = self.read_u64()?;
                    if len != NAR_MAGIC.len() as u64 {
                        return Err(self.error(NarErrorKind::NotANar));
                    }
                    self.read_string_body(len)?;
                    if self.token != NAR_MAGIC {
                        return Err(self.error(NarErrorKind::NotANar));
                    }
                    self.state = State::Node;
                }
                State::Node => return self.read_node(),
                State::Contents { size, remaining } => {
                    if remaining > 0 {
                        self.skip_contents(remaining)?;
                    }
                    self.token_start = self.offset;
                    self.read_padding(size)?;
                    self.expect(")")?;
                    self.state = State::NodeDone;
                }
                State::NodeDone => {
                    let Some(mark) = self.path_marks.pop() else {
                        self.state = State::Finished;
                        return Ok(Step::End);
                    };
                    // The node was a directory entry: close the entry.
                    self.expect(")")?;
                    self.path.truncate(mark);
                    self.state = State::DirBody;
                }
                State::DirBody => {
                    let tag = self.read_tag("entry")?;
                    if tag == Tag::Close {
                        self.prev_names.pop();
                        self.state = State::NodeDone;
                        return Ok(Step::EndDirectory);
                    }
                    if tag != Tag::Entry {
                        return Err(self.unexpected("entry"));
                    }
                    self.expect("(")?;
                    self.expect("name")?;
                    self.read_entry_name()?;
                    self.expect("node")?;
                    self.state = State::Node;
                    return Ok(Step::Entry);
                }
                State::Finished => return Ok(Step::End),
                State::Failed => return Err(self.error(NarErrorKind::Poisoned)),
            }
        }
    }

    fn read_node(&mut self) -> Result<Step, NarError> {
        self.nodes += 1;
        if self.nodes > self.limits.max_entries {
            self.token_start = self.offset;
            return Err(self.error(NarErrorKind::TooManyEntries(self.limits.max_entries)));
        }
        self.expect("(")?;
        self.expect("type")?;
        self.token_start = self.offset;
        let len = self.read_u64()?;
        if len > MAX_TAG_LEN as u64 && !cfg!(feature = "without-nar-limits") {
            return Err(self.error(NarErrorKind::UnknownFileType(format!(
                "<string of {len} bytes>"
            ))));
        }
        self.read_string_body(len)?;
        match self.token.as_slice() {
            b"regular" => {
                let mut tag = self.read_tag("contents")?;
                let executable = tag == Tag::Executable;
                if executable {
                    self.token_start = self.offset;
                    let len = self.read_u64()?;
                    if len != 0 {
                        return Err(self.error(NarErrorKind::ExecutableNotEmpty));
                    }
                    tag = self.read_tag("contents")?;
                }
                if tag != Tag::Contents {
                    return Err(self.unexpected("contents"));
                }
                self.token_start = self.offset;
                let size = self.read_u64()?;
                // The contents, their padding and the closing ")" token (16 bytes) must fit.
                let end = size
                    .checked_add(padding(size))
                    .and_then(|n| n.checked_add(16))
                    .and_then(|n| n.checked_add(self.offset));
                match end {
                    Some(end) if end <= self.limits.max_nar_size => {}
                    _ => return Err(self.error(NarErrorKind::TooLarge(self.limits.max_nar_size))),
                }
                self.state = State::Contents {
                    size,
                    remaining: size,
                };
                Ok(Step::Regular { executable, size })
            }
            b"symlink" => {
                self.expect("target")?;
                self.token_start = self.offset;
                let len = self.read_u64()?;
                if len > MAX_TARGET_LEN as u64 && !cfg!(feature = "without-nar-limits") {
                    return Err(self.error(NarErrorKind::TargetTooLong(len)));
                }
                self.read_string_body(len)?;
                if !is_valid_target(&self.token) {
                    return Err(self.error(NarErrorKind::InvalidTarget(show(&self.token))));
                }
                std::mem::swap(&mut self.token, &mut self.target);
                self.expect(")")?;
                self.state = State::NodeDone;
                Ok(Step::Symlink)
            }
            b"directory" => {
                self.prev_names.push(Vec::new());
                self.state = State::DirBody;
                Ok(Step::Directory)
            }
            other => Err(self.error(NarErrorKind::UnknownFileType(show(other)))),
        }
    }

    /// Reads and validates an entry name, pushing it onto the path.
    fn read_entry_name(&mut self) -> Result<(), NarError> {
        self.token_start = self.offset;
        let len = self.read_u64()?;
        if len > MAX_NAME_LEN as u64 && !cfg!(feature = "without-nar-limits") {
            return Err(self.error(NarErrorKind::NameTooLong(len)));
        }
        self.read_string_body(len)?;
        if !is_valid_name(&self.token) && !cfg!(feature = "without-nar-names") {
            return Err(self.error(NarErrorKind::InvalidName(show(&self.token))));
        }
        let Some(prev) = self.prev_names.last_mut() else {
            return Err(self.unexpected("entry"));
        };
        // Strictly increasing byte-wise: also rejects duplicates. The first entry compares with
        // the empty string, which no valid name equals.
        if self.token.as_slice() <= prev.as_slice() && !cfg!(feature = "without-nar-names") {
            return Err(self.error(NarErrorKind::NotSorted));
        }
        prev.clear();
        prev.extend_from_slice(&self.token);
        if self.path_marks.len() >= self.limits.max_depth && !cfg!(feature = "without-nar-limits") {
            return Err(self.error(NarErrorKind::TooDeep(self.limits.max_depth)));
        }
        self.path_marks.push(self.path.len());
        self.path.push(b'/');
        self.path.extend_from_slice(&self.token);
        Ok(())
    }

    /// Reads a keyword where `expected` is the canonical one, classifying it.
    fn read_tag(&mut self, expected: &'static str) -> Result<Tag, NarError> {
        self.token_start = self.offset;
        let len = self.read_u64()?;
        if len > MAX_TAG_LEN as u64 && !cfg!(feature = "without-nar-limits") {
            return Err(self.error(NarErrorKind::TagTooLong { expected, len }));
        }
        self.read_string_body(len)?;
        Ok(match self.token.as_slice() {
            b")" => Tag::Close,
            b"entry" => Tag::Entry,
            b"executable" => Tag::Executable,
            b"contents" => Tag::Contents,
            _ => Tag::Other,
        })
    }

    /// Requires the keyword `expected`.
    fn expect(&mut self, expected: &'static str) -> Result<(), NarError> {
        self.token_start = self.offset;
        let len = self.read_u64()?;
        if len > MAX_TAG_LEN as u64 && !cfg!(feature = "without-nar-limits") {
            return Err(self.error(NarErrorKind::TagTooLong { expected, len }));
        }
        self.read_string_body(len)?;
        if self.token != expected.as_bytes() {
            return Err(self.unexpected(expected));
        }
        Ok(())
    }

    fn unexpected(&self, expected: &'static str) -> NarError {
        self.error(NarErrorKind::ExpectedTag {
            expected,
            got: show(&self.token),
        })
    }

    /// Reads `len` (already bounded by the caller) bytes plus padding into `self.token`.
    fn read_string_body(&mut self, len: u64) -> Result<(), NarError> {
        // Every caller has checked `len` against its own limit; this is the backstop that keeps
        // a forgotten check from allocating what a client names (V10).
        if len > LONGEST_TOKEN as u64 && !cfg!(feature = "without-nar-limits") {
            return Err(self.error(NarErrorKind::TooLarge(len)));
        }
        let n = usize::try_from(len).map_err(|_| self.error(NarErrorKind::TooLarge(len)))?;
        self.token.clear();
        self.token.resize(n, 0);
        let mut token = std::mem::take(&mut self.token);
        let res = self.read_exact(&mut token);
        self.token = token;
        res?;
        self.read_padding(len)
    }

    fn read_padding(&mut self, len: u64) -> Result<(), NarError> {
        let pad = padding(len) as usize;
        if pad == 0 {
            return Ok(());
        }
        let mut buf = [0u8; 8];
        let dst = buf.get_mut(..pad).unwrap_or_default();
        self.read_exact(dst)?;
        if dst.iter().any(|&b| b != 0) {
            return Err(self.error(NarErrorKind::NonZeroPadding));
        }
        Ok(())
    }

    fn read_u64(&mut self) -> Result<u64, NarError> {
        let mut buf = [0u8; 8];
        self.read_exact(&mut buf)?;
        Ok(u64::from_le_bytes(buf))
    }

    /// Fails if reading `n` more bytes would cross the size limit.
    fn charge(&self, n: u64) -> Result<(), NarError> {
        match self.offset.checked_add(n) {
            Some(end) if end <= self.limits.max_nar_size => Ok(()),
            _ => Err(self.error(NarErrorKind::TooLarge(self.limits.max_nar_size))),
        }
    }

    /// `read_exact` that counts bytes and respects the size limit.
    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), NarError> {
        self.charge(buf.len() as u64)?;
        self.inner.read_exact(buf).map_err(|e| self.io_error(e))?;
        self.offset += buf.len() as u64;
        Ok(())
    }

    /// Discards `n` bytes of file contents (already charged against the limit).
    fn skip_contents(&mut self, n: u64) -> Result<(), NarError> {
        let copied = io::copy(&mut (&mut self.inner).take(n), &mut io::sink())
            .map_err(|e| self.io_error(e))?;
        self.offset += copied;
        if copied != n {
            return Err(self.io_error(io::ErrorKind::UnexpectedEof.into()));
        }
        Ok(())
    }
}

/// Parses a whole NAR from `r` without writing anything and checks nothing follows it. Returns
/// the NAR size.
pub fn validate<R: Read>(r: R, limits: Limits) -> Result<u64, NarError> {
    let mut nar = NarReader::with_limits(r, limits);
    nar.finish_at_eof()?;
    Ok(nar.offset())
}

/// Event kinds without borrowed data (so `step` can mutate freely).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Directory,
    Entry,
    EndDirectory,
    Symlink,
    Regular { executable: bool, size: u64 },
    End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tag {
    Close,
    Entry,
    Executable,
    Contents,
    Other,
}
