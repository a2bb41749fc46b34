//! Uploads (A70): the store-writer makes the pipe an upload's data arrives in and hands the
//! broker only its write end, so it knows exactly what it reads from. It reads against a
//! deadline that grows with the data received: after a grace period the upload must have kept
//! an average of [`MIN_RATE`] bytes a second, and no gap may exceed [`MAX_GAP`]. A client that
//! paces an upload to hold resources is cut off; one on a slow link is not. No lock is held
//! while an upload arrives (the staging directory and a temp root protect the work).

use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// Time any upload gets before its average rate counts.
pub const GRACE: Duration = Duration::from_secs(120);
/// Slowest average rate accepted after [`GRACE`] (a 256 kbit/s link).
pub const MIN_RATE: u64 = 32 << 10;
/// Longest silence accepted at any point.
pub const MAX_GAP: Duration = Duration::from_secs(300);
/// Capacity asked for the pipe, so the broker can read ahead while we hash and write.
const PIPE_SIZE: i32 = 1 << 20;

/// A new upload pipe: (read end for us, write end for the broker).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (rx, tx) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    // Best effort: past the per-user pipe budget the kernel refuses, and 64 KiB still works.
    let _ = nix::fcntl::fcntl(tx.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
    Ok((rx, tx))
}

/// The read end of an upload pipe, with its deadline.
pub struct Upload {
    fd: OwnedFd,
    start: Instant,
    received: u64,
    grace: Duration,
    min_rate: u64,
    max_gap: Duration,
}

impl Upload {
    pub fn new(fd: OwnedFd) -> Upload {
        Upload::with_pace(fd, GRACE, MIN_RATE, MAX_GAP)
    }

    pub fn with_pace(fd: OwnedFd, grace: Duration, min_rate: u64, max_gap: Duration) -> Upload {
        Upload {
            fd,
            start: Instant::now(),
            received: 0,
            grace,
            min_rate: min_rate.max(1),
            max_gap,
        }
    }

    /// How long the next read may wait: until the average rate would fall too low, or the
    /// longest gap, whichever is first. `None`: the deadline has passed.
    fn wait_allowed(&self) -> Option<Duration> {
        let credit = Duration::from_secs(self.received / self.min_rate);
        let deadline = self.start + self.grace + credit;
        let left = deadline.checked_duration_since(Instant::now())?;
        Some(left.min(self.max_gap))
    }

    fn too_slow(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the upload is too slow: {} bytes in {} s (at least {} KiB/s after {} s, and no pause over {} s)",
                self.received,
                self.start.elapsed().as_secs(),
                self.min_rate >> 10,
                self.grace.as_secs(),
                self.max_gap.as_secs()
            ),
        )
    }
}

impl Read for Upload {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let Some(wait) = self.wait_allowed() else {
                return Err(self.too_slow());
            };
            let ms = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX).max(1);
            let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
            match poll(
                &mut fds,
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
            ) {
                Ok(0) => return Err(self.too_slow()),
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
            match nix::unistd::read(self.fd.as_raw_fd(), buf) {
                Ok(n) => {
                    self.received += n as u64;
                    return Ok(n);
                }
                Err(Errno::EINTR) | Err(Errno::EAGAIN) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_paced_upload_is_cut_off_and_a_steady_one_is_not() {
        let (rx, tx) = pipe().unwrap();
        let mut up = Upload::with_pace(rx, Duration::from_millis(50), 1 << 20, MAX_GAP);
        let mut w = std::fs::File::from(tx);
        w.write_all(&[0u8; 1024]).unwrap();
        let mut buf = [0u8; 4096];
        assert_eq!(up.read(&mut buf).unwrap(), 1024);
        // Nothing more comes: after the grace period (and 1 KiB of credit) it gives up.
        let err = up.read(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(err.to_string().contains("too slow"), "{err}");

        let (rx, tx) = pipe().unwrap();
        let mut up = Upload::with_pace(rx, Duration::from_secs(60), 1 << 20, MAX_GAP);
        let mut w = std::fs::File::from(tx);
        w.write_all(b"data").unwrap();
        drop(w);
        let mut all = Vec::new();
        up.read_to_end(&mut all).unwrap();
        assert_eq!(all, b"data");
    }
}
