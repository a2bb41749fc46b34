//! Brokers' standard output and error, relayed by the master line by line.
//!
//! A broker parses one client's bytes and may be compromised. Were its standard error the
//! daemon's (a dup, as for the services), it could write anything into the daemon's log or
//! journal: a line that passes for the master's or an audit line (`stockade[1]: audit: conn=0
//! …`), terminal escapes, a flood. So each broker gets the write end of a pipe as fds 1 and 2
//! ([`pipe`]) and the master reads the other end from its poll loop ([`Relay`]):
//!
//! - each line goes to the master's standard error in one write as
//!   `stockade-broker[<pid>] conn=<id>: <line>`, escaped with
//!   [`stockade_common::audit::push_escaped`] (control characters, bidi and zero-width
//!   characters; bytes that are not UTF-8 as `\xNN`), so nothing it writes can start a line of
//!   its own or hide the prefix;
//! - a line is at most [`MAX_LINE`] bytes as written (PIPE_BUF: one write is atomic even when
//!   standard error is a pipe shared with the services); a longer one is written in pieces,
//!   each but the last ending in [`CONTINUES`], so a partial line waits in at most that much
//!   memory;
//! - a broker may write [`MAX_TOTAL`] bytes in all; past that the master writes one line of
//!   its own saying so (it starts with `warning:`, which no relayed line can) and reads and
//!   discards the rest, so a broker never blocks forever on a full pipe;
//! - the read end is non-blocking and each wakeup reads at most [`READ_BUDGET`] bytes per
//!   broker, so nothing a broker writes holds up the loop (accepting, signals, other brokers).
//!   A broker that writes without pause costs the master reads, never its other work;
//! - the stream ends when the broker is reaped ([`Relay::exited`]: what is left in the pipe is
//!   read, at most [`EXIT_BUDGET`], and the read end closed), or earlier at end of file. Not
//!   at end of file only: a broker may pass its descriptor to its client, which must not keep
//!   a descriptor of the master's open after its connection is gone.
//!
//! The daemon's loop (mod.rs) and the `--stdio` loop (stdio.rs) relay alike.
//!
//! # Which children
//!
//! Only brokers. The store-writer, the builder-helper and the roots-reader keep the master's
//! standard error:
//! - they are trusted and privileged: one that is compromised owns the store, the build uids
//!   or every process's `/proc`, and its log lines are the least of it;
//! - they live as long as the daemon, so a bound per process like [`MAX_TOTAL`] would
//!   silence them for good;
//! - their lines keep their own form: the store-writer's audit fallback without syslog
//!   (`stockade-store-writer[<pid>]: audit: conn=… uid=…`) is read from the daemon's log by
//!   tools and tests, and must not gain a prefix;
//! - their messages reach the log even when the master is stuck or gone.
//!
//! What they write that others chose (store paths, user names) is escaped where they write it
//! (A73). Builders and post-build hooks never see any of these descriptors: their output goes to
//! the builder-helper's log pipes.

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use stockade_common::audit::{push_escaped, push_hex_byte};

/// Longest line written, prefix and newline included: PIPE_BUF, so that each write of a line
/// is atomic even on a pipe.
pub const MAX_LINE: usize = 4096;
/// What one broker may write in all (its connection's lifetime); the rest is discarded.
pub const MAX_TOTAL: u64 = 1 << 20;
/// Bytes read from one broker per wakeup of the loop.
pub const READ_BUDGET: usize = 64 * 1024;
/// Bytes read when a broker has exited: a pipe whose writer is gone holds at most
/// `fs.pipe-max-size` (1 MiB by default, what an unprivileged process may ask for).
pub const EXIT_BUDGET: usize = 1 << 20;
/// The end of a piece of a line longer than [`MAX_LINE`].
pub const CONTINUES: &str = " …[continued]";
/// The end of the line that was being written when [`MAX_TOTAL`] was reached.
pub const CUT: &str = " …[cut]";
/// One read's size.
const CHUNK: usize = 16 * 1024;

/// What can go wrong relaying.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("making a pipe for a broker's output: {0}")]
    Pipe(#[source] Errno),
    #[error("making a broker's output pipe non-blocking: {0}")]
    NonBlocking(#[source] Errno),
    #[error("reading the output of the broker of connection {conn_id}: {source}")]
    Read {
        conn_id: u64,
        #[source]
        source: Errno,
    },
}

/// A pipe for a broker's output: `(read end, write end)`, both close-on-exec, the read end
/// non-blocking (the write end stays blocking: the broker waits while the pipe is full).
pub fn pipe() -> Result<(OwnedFd, OwnedFd), RelayError> {
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(RelayError::Pipe)?;
    let flags = fcntl(read.as_raw_fd(), FcntlArg::F_GETFL).map_err(RelayError::NonBlocking)?;
    let flags = OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK;
    fcntl(read.as_raw_fd(), FcntlArg::F_SETFL(flags)).map_err(RelayError::NonBlocking)?;
    Ok((read, write))
}

/// One broker's output cut into lines, escaped and bounded; no I/O (the relay feeds it what it
/// reads). Each finished line, newline included, is handed to `emit` whole.
#[derive(Debug)]
pub struct Lines {
    pid: i32,
    conn_id: u64,
    /// The prefix and the escaped text of the current line.
    line: String,
    prefix_len: usize,
    /// An incomplete UTF-8 sequence at the end of the last read (at most 3 bytes).
    carry: Vec<u8>,
    /// Bytes taken so far, at most [`MAX_TOTAL`].
    taken: u64,
    /// [`MAX_TOTAL`] was reached: everything else is discarded.
    cut: bool,
}

impl Lines {
    pub fn new(pid: i32, conn_id: u64) -> Lines {
        let line = format!("stockade-broker[{pid}] conn={conn_id}: ");
        let prefix_len = line.len();
        Lines {
            pid,
            conn_id,
            line,
            prefix_len,
            carry: Vec::new(),
            taken: 0,
            cut: false,
        }
    }

    /// Whether [`MAX_TOTAL`] was reached.
    pub fn is_cut(&self) -> bool {
        self.cut
    }

    /// Take `bytes` the broker wrote.
    pub fn feed(&mut self, bytes: &[u8], emit: &mut dyn FnMut(&str)) {
        if self.cut || bytes.is_empty() {
            return;
        }
        let room = usize::try_from(MAX_TOTAL.saturating_sub(self.taken)).unwrap_or(usize::MAX);
        let (take, rest) = bytes.split_at(bytes.len().min(room));
        self.taken += take.len() as u64;
        self.decode(take, emit);
        if !rest.is_empty() {
            self.cut = true;
            self.flush(CUT, emit);
            emit(&format!(
                "warning: the broker of connection {} (pid {}) wrote more than {MAX_TOTAL} \
                 bytes of output; the rest is discarded\n",
                self.conn_id, self.pid
            ));
        }
    }

    /// End of output: what is left becomes a last line.
    pub fn finish(&mut self, emit: &mut dyn FnMut(&str)) {
        if !self.cut {
            self.flush("", emit);
        }
    }

    /// Write out the current line (and an incomplete sequence, as bytes) when there is one.
    fn flush(&mut self, marker: &str, emit: &mut dyn FnMut(&str)) {
        for b in std::mem::take(&mut self.carry) {
            self.push(emit, |s| push_hex_byte(s, b));
        }
        if self.line.len() > self.prefix_len {
            self.emit_line(marker, emit);
        }
    }

    fn decode(&mut self, bytes: &[u8], emit: &mut dyn FnMut(&str)) {
        let joined;
        let mut rest = if self.carry.is_empty() {
            bytes
        } else {
            let mut v = std::mem::take(&mut self.carry);
            v.extend_from_slice(bytes);
            joined = v;
            joined.as_slice()
        };
        while !rest.is_empty() {
            match std::str::from_utf8(rest) {
                Ok(text) => {
                    self.text(text, emit);
                    return;
                }
                Err(e) => {
                    let (valid, bad) = rest.split_at(e.valid_up_to());
                    if let Ok(text) = std::str::from_utf8(valid) {
                        self.text(text, emit);
                    }
                    match e.error_len() {
                        Some(n) => {
                            let (invalid, after) = bad.split_at(n.min(bad.len()));
                            for &b in invalid {
                                self.push(emit, |s| push_hex_byte(s, b));
                            }
                            rest = after;
                        }
                        // A sequence the next read may complete.
                        None => {
                            self.carry = bad.to_vec();
                            return;
                        }
                    }
                }
            }
        }
    }

    fn text(&mut self, text: &str, emit: &mut dyn FnMut(&str)) {
        for c in text.chars() {
            if c == '\n' {
                self.emit_line("", emit);
            } else {
                self.push(emit, |s| push_escaped(s, c));
            }
        }
    }

    /// Append one escaped character or byte; when the line would grow past [`MAX_LINE`], the
    /// line so far is written first, marked [`CONTINUES`].
    fn push(&mut self, emit: &mut dyn FnMut(&str), escape: impl FnOnce(&mut String)) {
        let before = self.line.len();
        escape(&mut self.line);
        if self.line.len() > MAX_LINE - 1 - CONTINUES.len() {
            let piece = self.line.split_off(before);
            self.emit_line(CONTINUES, emit);
            self.line.push_str(&piece);
        }
    }

    fn emit_line(&mut self, marker: &str, emit: &mut dyn FnMut(&str)) {
        self.line.push_str(marker);
        self.line.push('\n');
        emit(&self.line);
        self.line.truncate(self.prefix_len);
    }
}

/// A broker's output pipe and what came through it so far.
#[derive(Debug)]
struct Stream {
    fd: OwnedFd,
    lines: Lines,
}

/// Every broker's output, keyed by connection id (a broker's pid may be reused once it is
/// reaped; a connection id never is).
#[derive(Debug, Default)]
pub struct Relay {
    streams: HashMap<u64, Stream>,
    buf: Vec<u8>,
}

/// How a read pass ended.
enum Pass {
    /// Nothing more to read now, or the budget is spent.
    Open,
    /// End of file, or a read error: the stream is done.
    Done(Result<(), RelayError>),
}

impl Relay {
    pub fn new() -> Relay {
        Relay::default()
    }

    /// Relay `fd`, the read end of [`pipe`], for the broker `pid` of connection `conn_id`.
    pub fn add(&mut self, conn_id: u64, pid: i32, fd: OwnedFd) {
        let lines = Lines::new(pid, conn_id);
        self.streams.insert(conn_id, Stream { fd, lines });
    }

    /// Number of streams open.
    #[cfg(test)]
    fn open_streams(&self) -> usize {
        self.streams.len()
    }

    /// The descriptors to poll for reading, each with its connection id.
    pub fn fds(&self) -> impl Iterator<Item = (u64, BorrowedFd<'_>)> {
        self.streams.iter().map(|(id, s)| (*id, s.fd.as_fd()))
    }

    /// The stream of `conn_id` is readable (or hung up): relay at most [`READ_BUDGET`] bytes;
    /// at end of file, the rest, and drop the stream.
    pub fn ready(&mut self, conn_id: u64, out: &mut dyn Write) -> Result<(), RelayError> {
        self.pass(conn_id, READ_BUDGET, out)
    }

    /// The broker of `conn_id` has exited: relay what is left in its pipe (at most
    /// [`EXIT_BUDGET`]), then drop the stream whatever remains.
    pub fn exited(&mut self, conn_id: u64, out: &mut dyn Write) -> Result<(), RelayError> {
        let r = self.pass(conn_id, EXIT_BUDGET, out);
        if let Some(mut s) = self.streams.remove(&conn_id) {
            s.lines.finish(&mut |l| write_line(out, l));
        }
        r
    }

    fn pass(&mut self, conn_id: u64, budget: usize, out: &mut dyn Write) -> Result<(), RelayError> {
        let Some(s) = self.streams.get_mut(&conn_id) else {
            return Ok(());
        };
        self.buf.resize(CHUNK, 0);
        let mut left = budget;
        let pass = loop {
            if left == 0 {
                break Pass::Open;
            }
            let want = left.min(self.buf.len());
            let Some(buf) = self.buf.get_mut(..want) else {
                break Pass::Open;
            };
            match nix::unistd::read(s.fd.as_raw_fd(), buf) {
                Ok(0) => break Pass::Done(Ok(())),
                Ok(n) => {
                    left = left.saturating_sub(n);
                    // Past the bound, only draining: nothing to decode or write.
                    if !s.lines.is_cut() {
                        let got = buf.get(..n).unwrap_or_default();
                        s.lines.feed(got, &mut |l| write_line(out, l));
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => break Pass::Open,
                Err(source) => break Pass::Done(Err(RelayError::Read { conn_id, source })),
            }
        };
        match pass {
            Pass::Open => Ok(()),
            Pass::Done(r) => {
                if let Some(mut s) = self.streams.remove(&conn_id) {
                    s.lines.finish(&mut |l| write_line(out, l));
                }
                r
            }
        }
    }
}

/// One line, one write (a line is at most [`MAX_LINE`] bytes). Nothing useful can be done
/// when the master's own standard error fails.
fn write_line(out: &mut dyn Write, line: &str) {
    let _ = out.write_all(line.as_bytes());
}

#[cfg(test)]
mod tests;
