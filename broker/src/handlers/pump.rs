//! Moving a client's framed upload into the store-writer's pipe without copying the payload
//! through the broker: `splice` from the client's socket into the pipe, chunk by chunk, with
//! the chunk headers still read and bounded by the framing reader. What the client reader had
//! already buffered goes by `write`. Re-adding a gigabyte that is already valid costs nix-daemon
//! one read of it; this keeps Stockade's broker hop from adding two more copies.

use std::fs::File;
use std::io::{self, BufRead, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};

use nix::errno::Errno;
use nix::fcntl::{splice, SpliceFFlags};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use stockade_common::worker::{FramedReader, WireError};

use crate::ctx::ClientIn;
use crate::error::{OpError, OpResult};
use crate::store::UploadTx;

/// Most bytes one splice moves.
const STEP: usize = 1 << 20;

/// Copies `fr`'s payload into `tx` to the stream's terminator. A pipe the store-writer stopped
/// reading (or a refused upload) does not stop the reading: the rest is read and dropped, so
/// the client's stream stays in step; the reply says why.
pub fn pump_framed(mut fr: FramedReader<&mut ClientIn>, tx: &mut UploadTx) -> OpResult<()> {
    let mut out: Option<&File> = match tx {
        UploadTx::Pipe(w) => w.flush().is_ok().then(|| w.get_ref()),
        UploadTx::Refused => None,
    };
    let mut can_splice = true;
    let mut scratch: Vec<u8> = Vec::new();
    let res = fr.pump(|inner, max| {
        let max = usize::try_from(max).unwrap_or(usize::MAX);
        let buffered = inner.buffer();
        if !buffered.is_empty() {
            let k = max.min(buffered.len());
            if let Some(mut f) = out {
                if f.write_all(buffered.get(..k).unwrap_or_default()).is_err() {
                    out = None;
                }
            }
            inner.consume(k);
            return Ok(k as u64);
        }
        if let (Some(f), true) = (out, can_splice) {
            // Non-blocking: a blocking splice waits for the socket while holding the pipe's
            // lock, so the store-writer could not read what was already moved until the
            // client sent the rest of its chunk. Wait with poll instead, for each side.
            let sock = inner.get_ref();
            let flags = SpliceFFlags::SPLICE_F_NONBLOCK;
            match splice(sock, None, f, None, max.min(STEP), flags) {
                Ok(n) => return Ok(n as u64),
                Err(Errno::EINTR) => return Err(io::ErrorKind::Interrupted.into()),
                Err(Errno::EAGAIN) => {
                    wait_for(sock.as_fd(), PollFlags::POLLIN)?;
                    wait_for(f.as_fd(), PollFlags::POLLOUT)?;
                    // Nothing moved yet: the pump calls again.
                    return Err(io::ErrorKind::Interrupted.into());
                }
                // The store-writer stopped reading: the rest is dropped below.
                Err(Errno::EPIPE) => out = None,
                // Not possible here (an old kernel, a filter): copy instead.
                Err(_) => can_splice = false,
            }
        }
        if scratch.is_empty() {
            scratch.resize(64 << 10, 0);
        }
        let want = max.min(scratch.len());
        let n = inner.read(scratch.get_mut(..want).unwrap_or_default())?;
        if let Some(mut f) = out {
            if f.write_all(scratch.get(..n).unwrap_or_default()).is_err() {
                out = None;
            }
        }
        Ok(n as u64)
    });
    // Whatever breaks a frame leaves the client's stream out of step: report it, then close.
    res.map_err(|e: WireError| OpError::fatal(e.to_string()))
}

/// Waits until `fd` is ready for `what` (or has hung up: the next call then says so).
fn wait_for(fd: BorrowedFd<'_>, what: PollFlags) -> io::Result<()> {
    let mut fds = [PollFd::new(fd, what)];
    match poll(&mut fds, PollTimeout::NONE) {
        Ok(_) | Err(Errno::EINTR) => Ok(()),
        Err(e) => Err(e.into()),
    }
}
