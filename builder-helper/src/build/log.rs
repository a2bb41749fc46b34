//! Supervision of a running builder: its merged stdout and stderr copied to the log sink
//! line by line, `timeout`, `max-silent-time` and `max-build-log-size` enforced as Nix's
//! worker loop and `handleChildOutput` do (silence is checked before the total time; the log
//! limit is exceeded when more than the limit has been written), and the store's floors
//! (A43) looked at every [`FLOOR_INTERVAL`] on the same loop.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use stockade_common::floor::{Crossed, Floors, FsFree};

use crate::sandbox::{BuildExit, Sandbox, SandboxError};

/// How often a build held to the floors looks at its file systems: a `statvfs` each, cheap;
/// a builder writes at most a second's worth past the floor before it is stopped.
pub const FLOOR_INTERVAL: Duration = Duration::from_secs(1);

/// The limits of one build; `None` / 0: none.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    pub max_silent_time: Option<Duration>,
    pub timeout: Option<Duration>,
    pub max_log_size: u64,
    pub floor: Option<FloorWatch>,
}

/// The store's floors (A43) and the directories whose file systems the build writes to.
#[derive(Debug, Clone)]
pub struct FloorWatch {
    pub floors: Floors,
    pub dirs: Vec<std::path::PathBuf>,
}

impl FloorWatch {
    /// The first floor one of the file systems is below (one that cannot be asked is not).
    pub fn crossed(&self) -> Option<Crossed> {
        self.dirs
            .iter()
            .filter_map(|d| FsFree::of_path(d).ok())
            .find_map(|fs| self.floors.crossed(&fs, 0, 0))
    }
}

/// How supervision ended. In every case the builder and all its processes are gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Exited(BuildExit),
    /// `max-silent-time` (`silence`) or `timeout` fired.
    TimedOut {
        silence: bool,
    },
    LogLimit,
    /// The cancel descriptor became readable (or hung up): nobody wants the build any more.
    Cancelled,
    /// A file system it writes to went below the store's floor (A43).
    Floor(Crossed),
}

#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error("reading the build log: {0}")]
    Read(io::Error),
    #[error("writing the build log: {0}")]
    Sink(io::Error),
}

/// The last lines of the log, as Nix keeps them for its error message (`log-lines`): a
/// carriage return restarts the current line.
#[derive(Debug, Default)]
pub struct LogTail {
    lines: VecDeque<Vec<u8>>,
    current: Vec<u8>,
    pos: usize,
    max: usize,
}

impl LogTail {
    pub fn new(max: usize) -> Self {
        LogTail {
            max,
            ..Default::default()
        }
    }

    fn feed(&mut self, data: &[u8]) {
        for &c in data {
            match c {
                b'\r' => self.pos = 0,
                b'\n' => self.flush(),
                _ => {
                    if self.pos >= self.current.len() {
                        self.current.resize(self.pos + 1, 0);
                    }
                    self.current[self.pos] = c;
                    self.pos += 1;
                }
            }
        }
    }

    fn flush(&mut self) {
        let line = std::mem::take(&mut self.current);
        self.pos = 0;
        if self.max == 0 {
            return;
        }
        self.lines.push_back(line);
        if self.lines.len() > self.max {
            self.lines.pop_front();
        }
    }

    /// The lines, oldest first (the unfinished one too, as Nix flushes it at the end).
    pub fn into_lines(mut self) -> Vec<String> {
        if !self.current.is_empty() {
            self.flush();
        }
        self.lines
            .into_iter()
            .map(|l| String::from_utf8_lossy(&l).into_owned())
            .collect()
    }
}

/// Copies the log until the builder is gone, or kills it when a limit fires or `cancel` (a
/// pipe's read end, closed or written on the other side to cancel) becomes readable.
/// A running builder, sandboxed or not, as supervision sees it.
pub trait Builder {
    /// SIGKILL to the builder and everything it started.
    fn kill(&mut self) -> Result<(), SandboxError>;
    /// Its exit once it has ended (reaped), `None` while it runs.
    fn try_wait(&mut self) -> Result<Option<BuildExit>, SandboxError>;
    fn wait(&mut self) -> Result<BuildExit, SandboxError>;
}

impl Builder for Sandbox {
    fn kill(&mut self) -> Result<(), SandboxError> {
        Sandbox::kill(self)
    }
    fn try_wait(&mut self) -> Result<Option<BuildExit>, SandboxError> {
        Sandbox::try_wait(self)
    }
    fn wait(&mut self) -> Result<BuildExit, SandboxError> {
        Sandbox::wait(self)
    }
}

pub fn supervise(
    sandbox: &mut dyn Builder,
    log: OwnedFd,
    limits: Limits,
    sink: &mut dyn Write,
    tail: &mut LogTail,
    cancel: Option<BorrowedFd<'_>>,
) -> Result<Ended, SuperviseError> {
    let started = Instant::now();
    let mut last_output = started;
    let mut log_size: u64 = 0;
    let mut pending: Vec<u8> = Vec::new();
    let mut log = Some(File::from(log));
    let mut buf = vec![0u8; 64 * 1024];
    let kill = |sandbox: &mut dyn Builder, e: Ended| -> Result<Ended, SuperviseError> {
        sandbox.kill()?;
        sandbox.wait()?;
        Ok(e)
    };
    let mut idle = Duration::from_millis(1);
    // Looked at once before the first wait: a build that starts below the floor stops at once.
    let mut next_floor = started;
    loop {
        let now = Instant::now();
        if let Some(w) = &limits.floor {
            if now >= next_floor {
                if let Some(c) = w.crossed() {
                    return kill(sandbox, Ended::Floor(c));
                }
                next_floor = now + FLOOR_INTERVAL;
            }
        }
        if let Some(m) = limits.max_silent_time {
            if now >= last_output + m {
                return kill(sandbox, Ended::TimedOut { silence: true });
            }
        }
        if let Some(t) = limits.timeout {
            if now >= started + t {
                return kill(sandbox, Ended::TimedOut { silence: false });
            }
        }
        let deadline = [
            limits.max_silent_time.map(|m| last_output + m),
            limits.timeout.map(|t| started + t),
            limits.floor.as_ref().map(|_| next_floor),
        ]
        .into_iter()
        .flatten()
        .min();
        let wait = deadline.map(|d| d.saturating_duration_since(now));

        let Some(file) = log.as_mut() else {
            // EOF: every process that held the log is gone or closed it; the builder may
            // still run (it closed its output), and the limits still apply.
            if let Some(exit) = sandbox.try_wait()? {
                return Ok(Ended::Exited(exit));
            }
            let nap = wait.map_or(idle, |w| w.min(idle));
            idle = (idle * 2).min(Duration::from_millis(50));
            match cancel {
                Some(c) => {
                    let nap = PollTimeout::try_from(nap).unwrap_or(PollTimeout::MAX);
                    let mut fds = [PollFd::new(c, PollFlags::POLLIN)];
                    if matches!(poll(&mut fds, nap), Ok(n) if n > 0) {
                        return kill(sandbox, Ended::Cancelled);
                    }
                }
                None => std::thread::sleep(nap),
            }
            continue;
        };
        let timeout = match wait {
            None => PollTimeout::NONE,
            // Rounded up, so the loop does not spin just before a deadline.
            Some(w) => {
                PollTimeout::try_from(w + Duration::from_millis(1)).unwrap_or(PollTimeout::MAX)
            }
        };
        let mut fds = vec![PollFd::new(file.as_fd(), PollFlags::POLLIN)];
        if let Some(c) = cancel {
            fds.push(PollFd::new(c, PollFlags::POLLIN));
        }
        match poll(&mut fds, timeout) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => return Err(SuperviseError::Read(e.into())),
        }
        if fds
            .get(1)
            .and_then(|f| f.revents())
            .is_some_and(|r| !r.is_empty())
        {
            return kill(sandbox, Ended::Cancelled);
        }
        if fds[0].revents().is_none_or(|r| r.is_empty()) {
            continue;
        }
        let n = match file.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = kill(sandbox, Ended::LogLimit);
                return Err(SuperviseError::Read(e));
            }
        };
        if n == 0 {
            log = None;
            if !pending.is_empty() {
                if let Err(e) = sink.write_all(&pending) {
                    return sink_failed(sandbox, &limits, e);
                }
                pending.clear();
            }
            continue;
        }
        let data = &buf[..n];
        log_size += n as u64;
        if limits.max_log_size != 0 && log_size > limits.max_log_size {
            return kill(sandbox, Ended::LogLimit);
        }
        last_output = Instant::now();
        tail.feed(data);
        if let Err(e) = write_lines(sink, &mut pending, data) {
            return sink_failed(sandbox, &limits, e);
        }
    }
}

/// The log could not be written: the builder is killed. When that is because the file system
/// went below a floor (the log is kept in the builds directory, so it runs out of room with
/// the build), that is what stopped it.
fn sink_failed(
    sandbox: &mut dyn Builder,
    limits: &Limits,
    e: io::Error,
) -> Result<Ended, SuperviseError> {
    sandbox.kill()?;
    sandbox.wait()?;
    match limits.floor.as_ref().and_then(FloorWatch::crossed) {
        Some(c) => Ok(Ended::Floor(c)),
        None => Err(SuperviseError::Sink(e)),
    }
}

/// A log line as Nix's `handleChildOutput` hands it to clients: a carriage return moves back
/// to the start of the line and what follows overwrites it (`10%\r100%` is `100%`). The
/// stored log keeps the builder's bytes, as Nix's does.
pub fn overwritten(line: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if !line.contains(&b'\r') {
        return std::borrow::Cow::Borrowed(line);
    }
    let mut out: Vec<u8> = Vec::with_capacity(line.len());
    let mut pos = 0;
    for &c in line {
        if c == b'\r' {
            pos = 0;
            continue;
        }
        match out.get_mut(pos) {
            Some(slot) => *slot = c,
            None => out.push(c),
        }
        pos += 1;
    }
    std::borrow::Cow::Owned(out)
}

/// Writes every completed line (with its `\n`) and keeps the unfinished rest in `pending`.
fn write_lines(sink: &mut dyn Write, pending: &mut Vec<u8>, data: &[u8]) -> io::Result<()> {
    let mut rest = data;
    while let Some(i) = rest.iter().position(|&c| c == b'\n') {
        if pending.is_empty() {
            sink.write_all(&rest[..=i])?;
        } else {
            pending.extend_from_slice(&rest[..=i]);
            sink.write_all(pending)?;
            pending.clear();
        }
        rest = &rest[i + 1..];
    }
    pending.extend_from_slice(rest);
    sink.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_written_whole() {
        let mut sink = Vec::new();
        let mut pending = Vec::new();
        write_lines(&mut sink, &mut pending, b"one\ntw").unwrap();
        assert_eq!(sink, b"one\n");
        write_lines(&mut sink, &mut pending, b"o\nthree").unwrap();
        assert_eq!(sink, b"one\ntwo\n");
        assert_eq!(pending, b"three");
    }

    #[test]
    fn carriage_returns_overwrite_the_line() {
        assert_eq!(
            &*overwritten(b"progress 10%\rprogress 100%"),
            b"progress 100%"
        );
        assert_eq!(&*overwritten(b"abcdef\rXY"), b"XYcdef");
        assert_eq!(&*overwritten(b"a\r\rb\r"), b"b");
        assert_eq!(&*overwritten(b"plain"), b"plain");
    }

    #[test]
    fn tail_keeps_the_last_lines_and_honours_carriage_returns() {
        let mut t = LogTail::new(2);
        t.feed(b"a\nb\n10%\r100%\nlast");
        assert_eq!(t.into_lines(), ["100%", "last"]);
    }
}
