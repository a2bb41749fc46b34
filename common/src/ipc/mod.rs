//! Typed messages and file descriptors between Stockade's own processes (master, broker,
//! store-writer, builder-helper).
//!
//! # Transport
//!
//! A [`Channel`] is one end of an `AF_UNIX` / `SOCK_SEQPACKET` socket. Seqpacket was chosen over a
//! stream socket because the kernel keeps message boundaries: one `sendmsg` is one message, the
//! descriptors sent with it (`SCM_RIGHTS`) arrive with exactly that message, and there is no
//! length prefix to parse, no partial read to resume and no way for a peer to desynchronise the
//! framing. A message larger than the receiver's limit is cut off by the kernel (we learn its real
//! size through `MSG_TRUNC`) and the next message starts cleanly. Seqpacket messages are limited by
//! the sender's socket buffer, so [`MAX_LIMIT`] stays well under the default `wmem_default`; bulk
//! data (NARs, logs) belongs in a pipe or memfd passed as a descriptor, not in a message.
//!
//! # Encoding
//!
//! bincode 1.3 with `DefaultOptions` (varint integers, little endian), a byte limit equal to the
//! channel's message limit, and trailing bytes rejected; the same options encode and decode.
//! The receive buffer is allocated once at `limit + 1` bytes, so nothing a peer sends can make us
//! allocate more, and bincode's own limit stops a length field inside the payload from doing so.
//!
//! # Descriptors
//!
//! Received descriptors become [`OwnedFd`] before anything else is checked, so every error path
//! closes them. They are received with `MSG_CMSG_CLOEXEC`. The control buffer has room for the
//! kernel's per-message maximum (`SCM_MAX_FD` = 253; the kernel refuses to send more), and
//! `SO_PASSCRED` is off, so `MSG_CTRUNC` cannot occur. That matters: nix's `cmsgs()` refuses to
//! parse truncated control data, so descriptors in such a message could not be closed; should the
//! flag appear anyway the message is refused. A message with more descriptors than its type
//! declares, or any control data that is not `SCM_RIGHTS`, is an error.

/// `Message` for types that never carry descriptors (declared before the modules that use it).
macro_rules! no_fds {
    ($($t:ty),* $(,)?) => {$(
        impl Message for $t {
            const MAX_FDS: usize = 0;
            fn fd_count(&self) -> usize {
                0
            }
        }
    )*};
}

pub mod builder;
pub mod msg;
pub mod roots;
pub mod writer;

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use bincode::Options;
use nix::errno::Errno;
use nix::sys::socket::{
    getsockopt, recvmsg, sendmsg, setsockopt, socketpair as nix_socketpair, sockopt, AddressFamily,
    ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
};
use nix::sys::time::TimeVal;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io::{IoSlice, IoSliceMut};

/// Default limit on one encoded message, in bytes.
pub const DEFAULT_LIMIT: usize = 64 * 1024;

/// Largest limit a channel accepts: below the default socket send buffer (212992 bytes), so a
/// message within the limit always fits in one seqpacket.
pub const MAX_LIMIT: usize = 128 * 1024;

/// Most descriptors the kernel lets one `sendmsg` carry (`SCM_MAX_FD`).
pub const MAX_FDS: usize = 253;

/// Header byte of a message on a spilling channel: the payload follows inline.
const SPILL_INLINE: u8 = 0;
/// Header byte of a message on a spilling channel: a `u64` length follows, and the payload is
/// in a sealed memfd passed as the last descriptor.
const SPILL_MEMFD: u8 = 1;

/// Errors of the IPC layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("IPC system call failed: {0}")]
    Sys(#[from] Errno),
    #[error("IPC peer closed the channel")]
    Closed,
    #[error("IPC peer did not respond before the timeout")]
    Timeout,
    #[error("IPC message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("IPC message is empty")]
    Empty,
    #[error("IPC message carries {got} file descriptors, at most {max} allowed")]
    TooManyFds { got: usize, max: usize },
    #[error("IPC message carries {got} file descriptors, its contents require {expected}")]
    FdCountMismatch { got: usize, expected: usize },
    #[error("IPC control data was truncated")]
    ControlTruncated,
    #[error("IPC message carries control data other than SCM_RIGHTS")]
    UnexpectedControl,
    #[error("malformed IPC message: {0}")]
    Decode(#[source] bincode::Error),
    #[error("cannot encode IPC message: {0}")]
    Encode(#[source] bincode::Error),
    #[error("IPC sent {sent} of {len} bytes")]
    ShortSend { sent: usize, len: usize },
    #[error("file descriptor is not a SOCK_SEQPACKET socket")]
    NotSeqPacket,
    #[error("message limit must be between 1 and {MAX_LIMIT} bytes")]
    InvalidLimit,
    #[error("a timeout must be longer than zero")]
    InvalidTimeout,
    #[error("socket has no peer credentials")]
    NoPeer,
    #[error("IPC message refused before decoding: {0}")]
    Refused(String),
    #[error("malformed spilled IPC message: {0}")]
    BadSpill(&'static str),
}

/// A value that can travel over a [`Channel`], together with the number of descriptors it
/// carries. Each channel's enum in [`msg`] implements this; the count is part of the type's
/// contract, so a descriptor can never be attributed to the wrong message.
pub trait Message: Serialize + DeserializeOwned {
    /// The most descriptors any value of this type carries.
    const MAX_FDS: usize;
    /// The exact number of descriptors this value carries.
    fn fd_count(&self) -> usize;
}

fn codec(limit: usize) -> impl Options {
    bincode::DefaultOptions::new()
        .with_limit(limit as u64)
        .reject_trailing_bytes()
}

/// Encode `value` as a channel with `limit` would send it (for tests and size checks).
pub fn encode<T: Serialize + ?Sized>(value: &T, limit: usize) -> Result<Vec<u8>, Error> {
    // Size first without a limit, so an oversize message reports its size.
    let size = bincode::DefaultOptions::new()
        .serialized_size(value)
        .map_err(Error::Encode)?;
    let size = usize::try_from(size).unwrap_or(usize::MAX);
    if size > limit {
        return Err(Error::TooLarge { size, limit });
    }
    codec(limit).serialize(value).map_err(Error::Encode)
}

/// Decode one message as a channel with `limit` would.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], limit: usize) -> Result<T, Error> {
    if bytes.len() > limit {
        return Err(Error::TooLarge {
            size: bytes.len(),
            limit,
        });
    }
    codec(limit).deserialize(bytes).map_err(Error::Decode)
}

/// Take ownership of a descriptor the kernel installed for us in `recvmsg`.
fn own_received_fd(raw: RawFd) -> OwnedFd {
    // SAFETY: `raw` comes from an SCM_RIGHTS control message just returned by recvmsg; the kernel
    // installed it in our table for this call only, so nothing else owns or will close it.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

/// One end of a seqpacket channel between two Stockade processes.
pub struct Channel {
    fd: OwnedFd,
    limit: usize,
    /// When set, messages larger than `limit` travel in a memfd of at most this many bytes
    /// (and every message carries a one-byte header saying which way it came).
    spill: Option<usize>,
    /// Receive buffer, `limit + 1` bytes once used.
    buf: Vec<u8>,
    /// Control buffer with room for `MAX_FDS` descriptors (nix uses its capacity).
    cmsg: Vec<u8>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("fd", &self.fd.as_raw_fd())
            .field("limit", &self.limit)
            .finish()
    }
}

/// A connected pair of channels (`SOCK_SEQPACKET`, close-on-exec).
pub fn socketpair() -> Result<(Channel, Channel), Error> {
    let (a, b) = nix_socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    Ok((Channel::new_unchecked(a), Channel::new_unchecked(b)))
}

impl Channel {
    fn new_unchecked(fd: OwnedFd) -> Self {
        Channel {
            fd,
            limit: DEFAULT_LIMIT,
            spill: None,
            buf: Vec::new(),
            cmsg: nix::cmsg_space!([RawFd; MAX_FDS]),
        }
    }

    /// Wrap an inherited or received descriptor. It must be a `SOCK_SEQPACKET` socket: a stream
    /// socket would lose message boundaries (and `MSG_TRUNC` means "discard" there). `SO_PASSCRED` is switched off so that no
    /// control data other than `SCM_RIGHTS` can arrive.
    pub fn from_fd(fd: OwnedFd) -> Result<Self, Error> {
        let ty = getsockopt(&fd, sockopt::SockType).map_err(|e| match e {
            Errno::ENOTSOCK => Error::NotSeqPacket,
            e => Error::Sys(e),
        })?;
        if ty != SockType::SeqPacket {
            return Err(Error::NotSeqPacket);
        }
        setsockopt(&fd, sockopt::PassCred, &false)?;
        Ok(Channel::new_unchecked(fd))
    }

    /// Give back the socket.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// The largest encoded message this end sends or accepts.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Change the message limit (1 ..= [`MAX_LIMIT`]). Both ends should agree.
    pub fn set_limit(&mut self, limit: usize) -> Result<(), Error> {
        if limit == 0 || limit > MAX_LIMIT {
            return Err(Error::InvalidLimit);
        }
        self.limit = limit;
        self.buf = Vec::new();
        Ok(())
    }

    /// Let messages up to `max` bytes through by spilling those over the message limit into a
    /// sealed memfd. Both ends must enable it: it adds a header byte to every message. Meant
    /// for replies such as a path set, whose size a request cannot bound.
    pub fn enable_spill(&mut self, max: usize) {
        self.spill = Some(max);
    }

    /// Fail a receive with [`Error::Timeout`] after `timeout` without a message (`SO_RCVTIMEO`);
    /// `None` waits forever. A privileged service sets this so a stuck peer cannot hang it.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> Result<(), Error> {
        setsockopt(&self.fd, sockopt::ReceiveTimeout, &timeval(timeout)?)?;
        Ok(())
    }

    /// Fail a send with [`Error::Timeout`] if the peer's queue stays full (`SO_SNDTIMEO`).
    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> Result<(), Error> {
        setsockopt(&self.fd, sockopt::SendTimeout, &timeval(timeout)?)?;
        Ok(())
    }

    /// Credentials of the process that created the other end.
    pub fn peer_cred(&self) -> Result<PeerCred, Error> {
        peer_cred(&self.fd)
    }

    /// Send a typed message; `fds` must be exactly as many as the message declares.
    pub fn send<M: Message>(&mut self, msg: &M, fds: &[BorrowedFd<'_>]) -> Result<(), Error> {
        let expected = msg.fd_count();
        if fds.len() != expected || expected > M::MAX_FDS {
            return Err(Error::FdCountMismatch {
                got: fds.len(),
                expected,
            });
        }
        self.send_value(msg, fds)
    }

    /// Receive a typed message and exactly the descriptors it declares.
    pub fn recv<M: Message>(&mut self) -> Result<(M, Vec<OwnedFd>), Error> {
        let (msg, fds) = self.recv_value::<M>(M::MAX_FDS)?;
        let expected = msg.fd_count();
        if fds.len() != expected {
            // `fds` is dropped here, closing them.
            return Err(Error::FdCountMismatch {
                got: fds.len(),
                expected,
            });
        }
        Ok((msg, fds))
    }

    /// Send any serialisable value with `fds` attached.
    pub fn send_value<T: Serialize + ?Sized>(
        &mut self,
        value: &T,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), Error> {
        let Some(max) = self.spill else {
            let payload = encode(value, self.limit)?;
            return self.send_bytes(&payload, fds);
        };
        let payload = encode(value, max)?;
        if payload.len() < self.limit {
            let mut framed = Vec::with_capacity(payload.len() + 1);
            framed.push(SPILL_INLINE);
            framed.extend_from_slice(&payload);
            return self.send_bytes(&framed, fds);
        }
        let memfd = spill_to_memfd(&payload)?;
        let mut all: Vec<BorrowedFd<'_>> = fds.to_vec();
        all.push(memfd.as_fd());
        let mut header = vec![SPILL_MEMFD];
        header.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        self.send_bytes(&header, &all)
    }

    /// Receive a value with at most `max_fds` descriptors.
    pub fn recv_value<T: DeserializeOwned>(
        &mut self,
        max_fds: usize,
    ) -> Result<(T, Vec<OwnedFd>), Error> {
        if let Some(max) = self.spill {
            return self.recv_spilling(max_fds, max);
        }
        let (len, fds) = self.recv_bytes(max_fds)?;
        let payload = self.buf.get(..len).ok_or(Error::TooLarge {
            size: len,
            limit: self.limit,
        })?;
        let value = codec(self.limit)
            .deserialize(payload)
            .map_err(Error::Decode)?;
        Ok((value, fds))
    }

    /// Receives a typed message on a spilling channel, but first shows `admit` the payload's
    /// first bytes (at most [`ADMIT_HEAD`]: enough for the variant tag). `admit` returns the
    /// most bytes this message may have, or why it is refused; only then is a spilled payload
    /// read and anything decoded, within that limit (A68).
    pub fn recv_admitted<M: Message>(
        &mut self,
        admit: impl FnOnce(&[u8]) -> Result<usize, String>,
    ) -> Result<(M, Vec<OwnedFd>), Error> {
        let max = self.spill.unwrap_or(self.limit);
        let (body, fds) = self.recv_body(M::MAX_FDS)?;
        let limit = match &body {
            Body::Inline(r) => {
                let head = self
                    .buf
                    .get(r.start..r.start + ADMIT_HEAD.min(r.len()))
                    .unwrap_or_default();
                admit(head)
            }
            Body::Spilled(memfd, size) => admit(&read_spill_head(memfd.as_fd(), *size)?),
        }
        .map_err(Error::Refused)?
        .min(max);
        let value: M = self.decode_body(body, limit)?;
        let expected = value.fd_count();
        if fds.len() != expected {
            return Err(Error::FdCountMismatch {
                got: fds.len(),
                expected,
            });
        }
        Ok((value, fds))
    }

    fn recv_spilling<T: DeserializeOwned>(
        &mut self,
        max_fds: usize,
        max: usize,
    ) -> Result<(T, Vec<OwnedFd>), Error> {
        let (body, fds) = self.recv_body(max_fds)?;
        Ok((self.decode_body(body, max)?, fds))
    }

    /// Receives one message's bytes and descriptors (at most `max_fds` besides a spill memfd)
    /// and says where its payload is.
    fn recv_body(&mut self, max_fds: usize) -> Result<(Body, Vec<OwnedFd>), Error> {
        let spilling = self.spill.is_some();
        let (len, mut fds) = self.recv_bytes(max_fds.saturating_add(usize::from(spilling)))?;
        let msg = self.buf.get(..len).ok_or(Error::BadSpill("length"))?;
        let body = match (spilling, msg.first()) {
            (false, _) => Body::Inline(0..len),
            (true, Some(&SPILL_INLINE)) => Body::Inline(1..len),
            (true, Some(&SPILL_MEMFD)) => {
                let size: [u8; 8] = msg
                    .get(1..)
                    .and_then(|r| r.try_into().ok())
                    .ok_or(Error::BadSpill("header"))?;
                let size = usize::try_from(u64::from_le_bytes(size)).unwrap_or(usize::MAX);
                let memfd = fds.pop().ok_or(Error::BadSpill("no memfd"))?;
                Body::Spilled(memfd, size)
            }
            _ => return Err(Error::BadSpill("header")),
        };
        if fds.len() > max_fds {
            return Err(Error::TooManyFds {
                got: fds.len(),
                max: max_fds,
            });
        }
        Ok((body, fds))
    }

    /// Decodes a payload of at most `limit` bytes (a spilled one is read only if it fits).
    fn decode_body<T: DeserializeOwned>(&self, body: Body, limit: usize) -> Result<T, Error> {
        match body {
            Body::Inline(r) => {
                if r.len() > limit {
                    return Err(Error::TooLarge {
                        size: r.len(),
                        limit,
                    });
                }
                let payload = self.buf.get(r).unwrap_or_default();
                codec(limit).deserialize(payload).map_err(Error::Decode)
            }
            Body::Spilled(memfd, size) => {
                if size > limit {
                    return Err(Error::TooLarge { size, limit });
                }
                let payload = read_spill(memfd, size)?;
                codec(limit).deserialize(&payload).map_err(Error::Decode)
            }
        }
    }

    fn send_bytes(&mut self, payload: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), Error> {
        if payload.is_empty() {
            // A zero-length seqpacket message is indistinguishable from end of file.
            return Err(Error::Empty);
        }
        if payload.len() > self.limit {
            return Err(Error::TooLarge {
                size: payload.len(),
                limit: self.limit,
            });
        }
        if fds.len() > MAX_FDS {
            return Err(Error::TooManyFds {
                got: fds.len(),
                max: MAX_FDS,
            });
        }
        let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
        let rights = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
        let iov = [IoSlice::new(payload)];
        loop {
            match sendmsg::<()>(
                self.fd.as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(sent) if sent == payload.len() => return Ok(()),
                Ok(sent) => {
                    return Err(Error::ShortSend {
                        sent,
                        len: payload.len(),
                    })
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Err(Error::Timeout),
                Err(Errno::EPIPE) | Err(Errno::ECONNRESET) => return Err(Error::Closed),
                Err(e) => return Err(Error::Sys(e)),
            }
        }
    }

    /// Receive one message into `self.buf`; returns its length and descriptors.
    fn recv_bytes(&mut self, max_fds: usize) -> Result<(usize, Vec<OwnedFd>), Error> {
        let want = self.limit.saturating_add(1);
        if self.buf.len() != want {
            self.buf = vec![0; want];
        }
        let raw = self.fd.as_raw_fd();
        let (bytes, flags, fds, foreign) = loop {
            let mut iov = [IoSliceMut::new(&mut self.buf)];
            // MSG_TRUNC makes recvmsg report the message's real length even when it is longer
            // than our buffer (the excess is discarded by the kernel, never copied).
            let res = recvmsg::<()>(
                raw,
                &mut iov,
                Some(&mut self.cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_TRUNC,
            );
            match res {
                Ok(msg) => {
                    let mut fds = Vec::new();
                    let mut foreign = false;
                    // cmsgs() refuses to iterate when MSG_CTRUNC is set; with room for
                    // SCM_MAX_FD descriptors and SO_PASSCRED off that cannot happen, and if it
                    // did we report it below.
                    if let Ok(cmsgs) = msg.cmsgs() {
                        for cmsg in cmsgs {
                            match cmsg {
                                ControlMessageOwned::ScmRights(list) => {
                                    fds.extend(list.into_iter().map(own_received_fd))
                                }
                                _ => foreign = true,
                            }
                        }
                    }
                    break (msg.bytes, msg.flags, fds, foreign);
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Err(Error::Timeout),
                Err(Errno::ECONNRESET) => return Err(Error::Closed),
                Err(e) => return Err(Error::Sys(e)),
            }
        };
        // From here on every early return drops `fds`, closing them.
        if flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err(Error::ControlTruncated);
        }
        if foreign {
            return Err(Error::UnexpectedControl);
        }
        if bytes == 0 {
            return Err(if fds.is_empty() {
                Error::Closed
            } else {
                Error::Empty
            });
        }
        if bytes > self.limit || flags.contains(MsgFlags::MSG_TRUNC) {
            return Err(Error::TooLarge {
                size: bytes,
                limit: self.limit,
            });
        }
        if fds.len() > max_fds {
            return Err(Error::TooManyFds {
                got: fds.len(),
                max: max_fds,
            });
        }
        Ok((bytes, fds))
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Writes `payload` into a new memfd and seals it, so the receiver reads exactly these bytes.
fn spill_to_memfd(payload: &[u8]) -> Result<OwnedFd, Error> {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    use std::io::{Seek, SeekFrom, Write};
    let fd = memfd_create(
        c"stockade-ipc",
        MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
    )?;
    let mut file = std::fs::File::from(fd);
    file.write_all(payload)
        .and_then(|_| file.seek(SeekFrom::Start(0)).map(|_| ()))
        .map_err(|e| Error::Sys(Errno::from_raw(e.raw_os_error().unwrap_or(0))))?;
    let seals = SealFlag::F_SEAL_SHRINK
        | SealFlag::F_SEAL_GROW
        | SealFlag::F_SEAL_WRITE
        | SealFlag::F_SEAL_SEAL;
    fcntl(file.as_raw_fd(), FcntlArg::F_ADD_SEALS(seals))?;
    Ok(OwnedFd::from(file))
}

/// Reads a spilled payload of exactly `size` bytes. The descriptor must be a regular file of
/// that size (a memfd); a pipe or socket could block us forever.
/// Where a received message's payload is: in the receive buffer, or in a spilled memfd of the
/// stated size.
enum Body {
    Inline(std::ops::Range<usize>),
    Spilled(OwnedFd, usize),
}

/// How many leading bytes of a payload [`Channel::recv_admitted`] shows its `admit` function.
pub const ADMIT_HEAD: usize = 8;

/// The first bytes of a spilled payload of `size` bytes, without reading the rest.
fn read_spill_head(fd: BorrowedFd<'_>, size: usize) -> Result<Vec<u8>, Error> {
    let mut buf = vec![0u8; ADMIT_HEAD.min(size)];
    let n = nix::sys::uio::pread(fd, &mut buf, 0).map_err(|_| Error::BadSpill("short memfd"))?;
    if n != buf.len() {
        return Err(Error::BadSpill("short memfd"));
    }
    Ok(buf)
}

fn read_spill(fd: OwnedFd, size: usize) -> Result<Vec<u8>, Error> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::from(fd);
    let meta = file
        .metadata()
        .map_err(|_| Error::BadSpill("cannot stat memfd"))?;
    if !meta.is_file() || meta.len() != size as u64 {
        return Err(Error::BadSpill(
            "memfd is not a regular file of the stated size",
        ));
    }
    let mut buf = vec![0u8; size];
    file.read_exact_at(&mut buf, 0)
        .map_err(|_| Error::BadSpill("short memfd"))?;
    Ok(buf)
}

fn timeval(timeout: Option<Duration>) -> Result<TimeVal, Error> {
    match timeout {
        // A zero SO_RCVTIMEO means "wait forever".
        None => Ok(TimeVal::new(0, 0)),
        Some(d) if d.is_zero() => Err(Error::InvalidTimeout),
        Some(d) => {
            use nix::libc::{suseconds_t, time_t};
            let secs = time_t::try_from(d.as_secs()).unwrap_or(time_t::MAX);
            // Below 1_000_000, so it fits suseconds_t on every target.
            let usecs = d.subsec_micros() as suseconds_t;
            // Round a sub-microsecond timeout up rather than down to "forever".
            let usecs = if secs == 0 && usecs == 0 { 1 } else { usecs };
            Ok(TimeVal::new(secs, usecs))
        }
    }
}

/// Who is on the other end of a unix socket, as the kernel recorded it at `connect` /
/// `socketpair` time (`SO_PEERCRED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// Read `SO_PEERCRED` from a connected unix socket (stream or seqpacket).
pub fn peer_cred<F: AsFd>(sock: &F) -> Result<PeerCred, Error> {
    let cred = getsockopt(sock, sockopt::PeerCredentials)?;
    // An unconnected socket reports pid 0 and the overflow uid; that is nobody's identity.
    if cred.pid() <= 0 {
        return Err(Error::NoPeer);
    }
    Ok(PeerCred {
        pid: cred.pid(),
        uid: cred.uid(),
        gid: cred.gid(),
    })
}

/// A pidfd for the process that connected (`SO_PEERPIDFD`, Linux ≥ 6.5). Unlike the pid number
/// it cannot come to name another process after the peer exits (A4). `Ok(None)` when the
/// kernel does not support it; an error if the peer is already gone.
pub fn peer_pidfd<F: AsFd>(sock: &F) -> Result<Option<OwnedFd>, Error> {
    match getsockopt_int(sock.as_fd(), nix::libc::SOL_SOCKET, nix::libc::SO_PEERPIDFD) {
        Ok(raw) if raw >= 0 => Ok(Some(own_pidfd(raw))),
        Ok(_) => Err(Error::NoPeer),
        Err(Errno::ENOPROTOOPT) => Ok(None),
        Err(Errno::ENODATA) => Err(Error::NoPeer),
        Err(e) => Err(Error::Sys(e)),
    }
}

fn own_pidfd(raw: RawFd) -> OwnedFd {
    // SAFETY: SO_PEERPIDFD just installed `raw` (close-on-exec) as a new descriptor for us.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

/// `getsockopt` for an `int`-valued option nix does not wrap.
fn getsockopt_int(fd: BorrowedFd<'_>, level: i32, name: i32) -> Result<i32, Errno> {
    let mut value: nix::libc::c_int = -1;
    let mut len = std::mem::size_of::<nix::libc::c_int>() as nix::libc::socklen_t;
    // SAFETY: `value` and `len` are live, writable locals and `len` holds `value`'s size, so the
    // kernel writes at most that many bytes into `value`.
    let rc = unsafe {
        nix::libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut value as *mut nix::libc::c_int).cast(),
            &mut len,
        )
    };
    Errno::result(rc)?;
    if len as usize != std::mem::size_of::<nix::libc::c_int>() {
        return Err(Errno::EINVAL);
    }
    Ok(value)
}
