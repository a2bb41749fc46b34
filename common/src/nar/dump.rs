//! Serialising a file-system tree as a NAR, byte-identical to `nix-store --dump`.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::dir::{Dir, Type};
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{Mode, SFlag};

use super::{sys, HashingWriter, Limits, NarWriter};
use crate::hash::{Hash, HashAlgo};

/// Read size for file contents: large enough to keep syscalls rare, small enough to stay in L2
/// between the read and the hash.
const CHUNK: usize = 256 * 1024;

/// Why a tree could not be dumped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DumpError {
    /// A device, fifo or socket (Nix's message).
    #[error("file '{}' has an unsupported type", .0.display())]
    Unsupported(PathBuf),
    #[error("{op} '{}': {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A file shrank or changed type between listing and reading.
    #[error("file '{}' changed while it was being dumped", .0.display())]
    Changed(PathBuf),
    /// Deeper than the NAR reader would accept.
    #[error("directory nesting at '{}' exceeds the depth limit of {limit}", path.display())]
    TooDeep { path: PathBuf, limit: usize },
    /// The output writer failed.
    #[error("writing NAR: {0}")]
    Write(#[source] io::Error),
}

/// Writes the NAR serialisation of `path` (not following it if it is a symlink) to `w`, exactly as
/// `nix-store --dump` does. Output is buffered internally. Returns the NAR size.
pub fn dump<W: Write>(path: &Path, w: W) -> Result<u64, DumpError> {
    let mut out = BufWriter::with_capacity(CHUNK, Counting { inner: w, count: 0 });
    dump_path_to(path, &mut out)?;
    let counting = out
        .into_inner()
        .map_err(|e| DumpError::Write(e.into_error()))?;
    Ok(counting.count)
}

/// [`dump`] of the entry `name` of the directory `parent`, never following symlinks (for trees
/// the caller holds by fd).
pub fn dump_at<W: Write>(parent: BorrowedFd<'_>, name: &OsStr, w: W) -> Result<u64, DumpError> {
    let mut out = BufWriter::with_capacity(CHUNK, Counting { inner: w, count: 0 });
    let mut nar = NarWriter::new(&mut out).map_err(DumpError::Write)?;
    Dumper::new(PathBuf::from(name)).run(&mut nar, Root::At(parent, name))?;
    drop(nar);
    let counting = out
        .into_inner()
        .map_err(|e| DumpError::Write(e.into_error()))?;
    Ok(counting.count)
}

/// sha256 and size of the NAR serialisation of `path` (the NAR hash `nix-hash --type sha256`
/// prints), computed while streaming.
pub fn dump_and_hash(path: &Path) -> Result<(Hash, u64), DumpError> {
    let mut hasher = HashingWriter::sink(HashAlgo::Sha256);
    dump_path_to(path, &mut hasher)?;
    let (hash, size, _) = hasher.finish();
    Ok((hash, size))
}

fn dump_path_to<W: Write>(path: &Path, w: &mut W) -> Result<(), DumpError> {
    let mut nar = NarWriter::new(w).map_err(DumpError::Write)?;
    let dumper = Dumper::new(path.to_path_buf());
    match path.file_name() {
        Some(name) => {
            let parent = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            // The parent is the caller's path and may go through symlinks; nothing below does.
            let dir = File::open(parent).map_err(|e| DumpError::Io {
                op: "opening directory",
                path: parent.to_path_buf(),
                source: e,
            })?;
            dumper.run(&mut nar, Root::At(dir.as_fd(), name))
        }
        // "/", "..", ...: necessarily a directory.
        None => {
            let dir = Dir::open(
                path,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| DumpError::Io {
                op: "opening directory",
                path: path.to_path_buf(),
                source: e.into(),
            })?;
            dumper.run(&mut nar, Root::Dir(dir))
        }
    }
}

enum Root<'a> {
    At(BorrowedFd<'a>, &'a OsStr),
    Dir(Dir),
}

/// An open directory being dumped.
struct Frame {
    dir: Dir,
    /// Entries sorted byte-wise, with the type readdir reported when it did.
    entries: Vec<(Vec<u8>, Option<Type>)>,
    next: usize,
}

struct Dumper {
    /// Path of the current node, for error messages.
    path: PathBuf,
    buf: Vec<u8>,
}

impl Dumper {
    fn new(root: PathBuf) -> Self {
        Dumper {
            path: root,
            buf: Vec::new(),
        }
    }

    fn run<W: Write>(mut self, nar: &mut NarWriter<W>, root: Root<'_>) -> Result<(), DumpError> {
        let mut stack: Vec<Frame> = Vec::new();
        match root {
            Root::At(parent, name) => {
                if let Some(frame) = self.node(nar, parent, name.as_bytes(), None)? {
                    stack.push(frame);
                }
            }
            Root::Dir(dir) => {
                nar.directory().map_err(DumpError::Write)?;
                stack.push(self.frame(dir)?);
            }
        }
        // Iterative walk: a hostile tree can be arbitrarily deep, the stack must not be.
        while let Some(top) = stack.last_mut() {
            let Some((name, hint)) = top.entries.get_mut(top.next) else {
                stack.pop();
                nar.end_directory().map_err(DumpError::Write)?;
                if !stack.is_empty() {
                    self.path.pop();
                }
                continue;
            };
            top.next += 1;
            let name = std::mem::take(name);
            let hint = *hint;
            self.path.push(OsStr::from_bytes(&name));
            if stack.len() > Limits::DEFAULT_MAX_DEPTH {
                return Err(DumpError::TooDeep {
                    path: self.path.clone(),
                    limit: Limits::DEFAULT_MAX_DEPTH,
                });
            }
            nar.entry(&name).map_err(DumpError::Write)?;
            let Some(top) = stack.last() else { break };
            match self.node(nar, sys::dir_fd(&top.dir), &name, hint)? {
                Some(frame) => stack.push(frame),
                None => {
                    self.path.pop();
                }
            }
        }
        Ok(())
    }

    /// Writes the node `name` of `parent`; returns the frame to descend into for a directory.
    fn node<W: Write>(
        &mut self,
        nar: &mut NarWriter<W>,
        parent: BorrowedFd<'_>,
        name: &[u8],
        hint: Option<Type>,
    ) -> Result<Option<Frame>, DumpError> {
        let kind = match hint {
            Some(t) => t,
            None => {
                let st = nix::sys::stat::fstatat(
                    Some(parent.as_raw_fd()),
                    name,
                    AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .map_err(|e| self.io("getting status of", e.into()))?;
                type_of(st.st_mode)
            }
        };
        match kind {
            Type::File => {
                let fd = sys::openat(
                    parent,
                    name,
                    // O_NONBLOCK: should the file have become a fifo, do not hang opening it.
                    OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY,
                    Mode::empty(),
                )
                .map_err(|e| self.io("opening file", e.into()))?;
                let st = nix::sys::stat::fstat(fd.as_raw_fd())
                    .map_err(|e| self.io("getting status of", e.into()))?;
                match type_of(st.st_mode) {
                    Type::File => {}
                    Type::Directory | Type::Symlink => {
                        return Err(DumpError::Changed(self.path.clone()))
                    }
                    _ => return Err(DumpError::Unsupported(self.path.clone())),
                }
                // Nix: executable iff the owner may execute.
                let executable = st.st_mode & 0o100 != 0;
                let size =
                    u64::try_from(st.st_size).map_err(|_| DumpError::Changed(self.path.clone()))?;
                nar.regular(executable, size).map_err(DumpError::Write)?;
                self.copy(nar, File::from(fd), size)?;
                Ok(None)
            }
            Type::Directory => {
                let fd = sys::openat(
                    parent,
                    name,
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
                    Mode::empty(),
                )
                .map_err(|e| self.io("opening directory", e.into()))?;
                let dir = Dir::from(fd).map_err(|e| self.io("opening directory", e.into()))?;
                nar.directory().map_err(DumpError::Write)?;
                Ok(Some(self.frame(dir)?))
            }
            Type::Symlink => {
                let target = nix::fcntl::readlinkat(Some(parent.as_raw_fd()), name)
                    .map_err(|e| self.io("reading symbolic link", e.into()))?;
                nar.symlink(target.as_bytes()).map_err(DumpError::Write)?;
                Ok(None)
            }
            _ => Err(DumpError::Unsupported(self.path.clone())),
        }
    }

    fn frame(&self, mut dir: Dir) -> Result<Frame, DumpError> {
        let mut entries = Vec::new();
        for entry in dir.iter() {
            let entry = entry.map_err(|e| self.io("reading directory", e.into()))?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            entries.push((name.to_vec(), entry.file_type()));
        }
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Ok(Frame {
            dir,
            entries,
            next: 0,
        })
    }

    /// Streams exactly `size` bytes of `file` into the NAR.
    fn copy<W: Write>(
        &mut self,
        nar: &mut NarWriter<W>,
        mut file: File,
        size: u64,
    ) -> Result<(), DumpError> {
        if size == 0 {
            return Ok(());
        }
        if self.buf.is_empty() {
            self.buf = vec![0u8; CHUNK];
        }
        let mut left = size;
        while left > 0 {
            let want = usize::try_from(left)
                .unwrap_or(usize::MAX)
                .min(self.buf.len());
            let dst = self.buf.get_mut(..want).unwrap_or_default();
            let n = match file.read(dst) {
                Ok(0) => return Err(DumpError::Changed(self.path.clone())),
                Ok(n) => n.min(want),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.io("reading file", e)),
            };
            nar.contents(dst.get(..n).unwrap_or_default())
                .map_err(DumpError::Write)?;
            left -= n as u64;
        }
        Ok(())
    }

    fn io(&self, op: &'static str, source: io::Error) -> DumpError {
        DumpError::Io {
            op,
            path: self.path.clone(),
            source,
        }
    }
}

fn type_of(mode: nix::libc::mode_t) -> Type {
    match SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFREG => Type::File,
        SFlag::S_IFDIR => Type::Directory,
        SFlag::S_IFLNK => Type::Symlink,
        SFlag::S_IFIFO => Type::Fifo,
        SFlag::S_IFSOCK => Type::Socket,
        SFlag::S_IFCHR => Type::CharacterDevice,
        _ => Type::BlockDevice,
    }
}

/// Counts bytes passed to the inner writer.
struct Counting<W> {
    inner: W,
    count: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
