//! `builtin:unpack-channel`: unpacks a channel tarball into the derivation's output and names
//! its one top-level entry after the channel, as Nix's `builtinUnpackChannel` does (2.8.0 and
//! 2.26.3 `src/libstore/builtins/unpack-channel.cc`, extraction as `src/libutil/tarfile.cc`
//! asks libarchive for it; messages in Nix's or libarchive's wording where they have one).
//!
//! It runs inside the build sandbox, in a process of its own, with the derivation's environment:
//! `out`, `src` (the tarball) and `channelName` are required. `out` is created as a directory,
//! `src` is read as a stream: a tar archive, plain or compressed with gzip, bzip2, xz or zstd
//! (told apart by their magic bytes, as libarchive does). Then `out` must hold exactly one
//! entry, which is renamed to `out/<channelName>`.
//!
//! Extraction follows libarchive's `SECURE_NODOTDOT` and `SECURE_SYMLINKS`: an entry with a
//! `..` component is refused, and so is one whose parent is a symlink (a final component that
//! is a symlink is replaced, never written through). Modes are the archive's (as
//! `ARCHIVE_EXTRACT_PERM` keeps them, umask ignored) less setuid and setgid, directories get
//! `u+rx` (Nix 2.26) and their modes and times are applied last, so a read-only directory
//! still receives its contents. Modification times are kept (`ARCHIVE_EXTRACT_TIME`).
//!
//! Differences from Nix, on purpose: absolute entry names are refused (Nix puts them under
//! `out`); hard links must name an entry inside `out` reached without a symlink; device nodes
//! and FIFOs are refused (a builder cannot make the former, the store cannot hold either);
//! a `channelName` of `.` or `..` or empty is refused; an existing `out` that is not a
//! directory (a symlink included) is refused. Not done: zip and the other archive formats and
//! filters libarchive reads, file flags (Nix 2.8's `ARCHIVE_EXTRACT_FFLAGS`), xattrs.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{self, File, FileTimes, OpenOptions, Permissions};
use std::io::{self, Read};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, SystemTime};

/// The mode bits an entry keeps: setuid and setgid are dropped (a builder may not make them and
/// the store would not keep them), the sticky bit is harmless.
const KEPT_MODE: u32 = 0o1777;

/// What Nix 2.26 adds to every directory entry's mode: sources do ship unreadable directories.
const DIR_MODE_FLOOR: u32 = 0o500;

/// What to unpack and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackRequest {
    /// The output directory; created here.
    pub out: PathBuf,
    /// The channel tarball.
    pub src: PathBuf,
    /// What the tarball's top-level entry is renamed to: a single path component.
    pub channel_name: String,
}

/// Why the unpacking failed.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("attribute '{0}' missing")]
    MissingAttr(&'static str),
    /// Nix 2.26's check (2.8 had none).
    #[error("channelName is not allowed to contain filesystem separators, got {0}")]
    ChannelNameSeparator(String),
    #[error("channelName '{0}' is not a valid file name")]
    ChannelNameInvalid(String),
    #[error("creating directory '{}': {source}", .path.display())]
    CreateOut { path: PathBuf, source: io::Error },
    /// Nix's message around libarchive's.
    #[error("failed to open archive: Failed to open '{}': {source}", .path.display())]
    Open { path: PathBuf, source: io::Error },
    /// The stream is not a readable (compressed) tar archive.
    #[error("failed to extract archive ({})", root_cause(.0))]
    Read(io::Error),
    #[error("failed to extract archive (Path contains '..': {})", .0.display())]
    DotDot(PathBuf),
    #[error("failed to extract archive (Path is absolute: {})", .0.display())]
    Absolute(PathBuf),
    #[error("failed to extract archive (Invalid empty pathname)")]
    EmptyName,
    #[error("failed to extract archive (Cannot extract through symlink {})", .0.display())]
    ThroughSymlink(PathBuf),
    #[error(
        "failed to extract archive (hard link '{}' points outside the output: '{}')",
        .name.display(), .target.display()
    )]
    HardLinkOutside { name: PathBuf, target: PathBuf },
    /// Nix 2.26's wording for a type it cannot take (its tar flag here, not libarchive's code).
    #[error("file '{}' in tarball has unsupported file type '{}'", .name.display(), char::from(*.kind))]
    UnsupportedType { name: PathBuf, kind: u8 },
    #[error("failed to extract archive (Can't create '{}': {})", .path.display(), root_cause(.source))]
    Create { path: PathBuf, source: io::Error },
    #[error("failed to read directory {}: {source}", .path.display())]
    ReadOut { path: PathBuf, source: io::Error },
    #[error("channel tarball '{}' contains more than one file", .0.display())]
    NotOneFile(PathBuf),
    #[error("failed to rename {} to {}: {source}", .from.display(), .to.display())]
    Rename {
        from: PathBuf,
        to: PathBuf,
        source: io::Error,
    },
    #[error("unrecognised flag '{0}'")]
    UnknownFlag(String),
}

/// What went wrong at the bottom of `e`: the `tar` crate wraps the system's reason in
/// descriptions that repeat the path.
fn root_cause(e: &io::Error) -> String {
    let mut cause: &dyn std::error::Error = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

impl UnpackRequest {
    /// The request the derivation's environment `env` describes.
    pub fn from_env(env: &BTreeMap<String, String>) -> Result<Self, UnpackError> {
        let required = |name: &'static str| env.get(name).ok_or(UnpackError::MissingAttr(name));
        // Nix's order of lookups.
        let out = PathBuf::from(required("out")?);
        let channel_name = required("channelName")?.clone();
        let src = PathBuf::from(required("src")?);
        check_channel_name(&channel_name)?;
        Ok(UnpackRequest {
            out,
            src,
            channel_name,
        })
    }
}

fn check_channel_name(name: &str) -> Result<(), UnpackError> {
    if name.contains('/') {
        return Err(UnpackError::ChannelNameSeparator(name.to_string()));
    }
    if matches!(name, "" | "." | "..") {
        return Err(UnpackError::ChannelNameInvalid(name.to_string()));
    }
    Ok(())
}

/// Performs `req`: `out` created, `src` extracted into it, its one entry renamed.
pub fn unpack(req: &UnpackRequest) -> Result<(), UnpackError> {
    check_channel_name(&req.channel_name)?;
    create_out(&req.out)?;
    let file = File::open(&req.src).map_err(|source| UnpackError::Open {
        path: req.src.clone(),
        source,
    })?;
    extract(decompressed(file)?, &req.out)?;
    let top = single_entry(&req.out, &req.src)?;
    let target = req.out.join(&req.channel_name);
    fs::rename(&top, &target).map_err(|source| UnpackError::Rename {
        from: top,
        to: target,
        source,
    })
}

/// `out` as a new directory (its parents as needed); an existing directory is accepted as Nix
/// does, anything else there (a symlink included) is refused.
fn create_out(out: &Path) -> Result<(), UnpackError> {
    let fail = |source| UnpackError::CreateOut {
        path: out.to_path_buf(),
        source,
    };
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(fail)?;
    }
    match fs::create_dir(out) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => match fs::symlink_metadata(out) {
            Ok(meta) if meta.is_dir() => Ok(()),
            _ => Err(fail(e)),
        },
        Err(e) => Err(fail(e)),
    }
}

/// The compressions told apart by their magic bytes; anything else is read as a plain tar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compression {
    None,
    Gzip,
    Bzip2,
    Xz,
    Zstd,
}

impl Compression {
    fn detect(head: &[u8]) -> Self {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(b"BZh") {
            Compression::Bzip2
        } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
            Compression::Xz
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}

/// The longest magic [`Compression::detect`] looks at.
const MAGIC_LEN: usize = 6;

/// `file` decompressed as its first bytes say, as a stream. Concatenated streams (as `pigz`
/// and `pbzip2` write them) are read to the end, as libarchive does.
fn decompressed(mut file: File) -> Result<Box<dyn Read>, UnpackError> {
    let mut head = [0u8; MAGIC_LEN];
    let mut len = 0;
    while len < MAGIC_LEN {
        let rest = head.get_mut(len..).unwrap_or_default();
        match file.read(rest) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(UnpackError::Read(e)),
        }
    }
    let head = head.get(..len).unwrap_or_default();
    let stream = io::Cursor::new(head.to_vec()).chain(file);
    Ok(match Compression::detect(head) {
        Compression::None => Box::new(stream),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(stream)),
        Compression::Bzip2 => Box::new(bzip2::read::MultiBzDecoder::new(stream)),
        Compression::Xz => Box::new(xz2::read::XzDecoder::new_multi_decoder(stream)),
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::new(stream).map_err(UnpackError::Read)?)
        }
    })
}

/// A directory entry's mode and time, applied once everything is in it.
struct DirMeta {
    mode: u32,
    mtime: u64,
}

/// A reader that keeps the first error read through it.
struct Tap<R> {
    inner: R,
    failure: Rc<RefCell<Option<io::Error>>>,
}

impl<R: Read> Read for Tap<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).inspect_err(|e| {
            let mut failure = self.failure.borrow_mut();
            if failure.is_none() && e.kind() != io::ErrorKind::Interrupted {
                *failure = Some(io::Error::new(e.kind(), root_cause(e)));
            }
        })
    }
}

/// Extracts the tar stream `reader` into the directory `out`.
fn extract(reader: impl Read, out: &Path) -> Result<(), UnpackError> {
    let failure = Rc::new(RefCell::new(None));
    let reader = Tap {
        inner: reader,
        failure: Rc::clone(&failure),
    };
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_mask(!KEPT_MODE);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    // Keyed by path: a directory listed twice gets its last entry's metadata.
    let mut dirs = BTreeMap::new();
    let entries = archive.entries().map_err(UnpackError::Read)?;
    for entry in entries {
        let result = entry
            .map_err(UnpackError::Read)
            .and_then(|mut entry| extract_entry(&mut entry, out, &mut dirs));
        if let Err(e) = result {
            // A failure to read the stream, however the `tar` crate reported it.
            return Err(failure.borrow_mut().take().map_or(e, UnpackError::Read));
        }
    }
    for (path, meta) in &dirs {
        finish_dir(path, meta)?;
    }
    Ok(())
}

fn extract_entry<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    out: &Path,
    dirs: &mut BTreeMap<PathBuf, DirMeta>,
) -> Result<(), UnpackError> {
    use tar::EntryType;
    let kind = entry.header().entry_type();
    if matches!(
        kind,
        EntryType::XGlobalHeader
            | EntryType::XHeader
            | EntryType::GNULongName
            | EntryType::GNULongLink
    ) {
        return Ok(());
    }
    let name = entry.path().map_err(UnpackError::Read)?.into_owned();
    if cfg!(feature = "without-v11") {
        return unchecked(entry, out, &name);
    }
    let rel = relative(&name)?;
    // Old (pre-ustar) archives mark a directory by a trailing slash on a file entry.
    let old_dir = kind == EntryType::Regular
        && entry.header().as_ustar().is_none()
        && entry.path_bytes().ends_with(b"/");
    if kind == EntryType::Directory || old_dir {
        if rel.as_os_str().is_empty() {
            // `./`: `out` itself, which keeps its own metadata.
            return Ok(());
        }
        make_parents(out, &rel, &name)?;
        let dst = out.join(&rel);
        make_dir(&dst)?;
        let header = entry.header();
        let meta = DirMeta {
            mode: (header.mode().map_err(UnpackError::Read)? & KEPT_MODE) | DIR_MODE_FLOOR,
            mtime: header.mtime().map_err(UnpackError::Read)?,
        };
        dirs.insert(dst, meta);
        return Ok(());
    }
    match kind {
        EntryType::Regular
        | EntryType::Continuous
        | EntryType::GNUSparse
        | EntryType::Symlink
        | EntryType::Link => {}
        _ => {
            return Err(UnpackError::UnsupportedType {
                name,
                kind: kind.as_byte(),
            })
        }
    }
    if rel.as_os_str().is_empty() {
        return Err(UnpackError::EmptyName);
    }
    make_parents(out, &rel, &name)?;
    if kind == EntryType::Link {
        let target = entry
            .link_name()
            .map_err(UnpackError::Read)?
            .map(|t| t.into_owned())
            .unwrap_or_default();
        check_hard_link(out, &name, &target)?;
    }
    // The `tar` crate writes a new file (an existing one unlinked, never written through) and
    // checks again that the canonical parent, and a hard link's target, are inside `out`.
    let dst = out.join(&rel);
    match entry.unpack_in(out) {
        Ok(true) => Ok(()),
        Ok(false) => Err(UnpackError::DotDot(name)),
        Err(source) => Err(UnpackError::Create { path: dst, source }),
    }
}

/// Test-only (V11's defence off): the member is written at `out` joined with its name as it
/// stands (`..`, absolute names and symlinked parents followed), as the unpacker of
/// CVE-2026-44029 did, so tests/tests/build_attacks.rs can be seen to fail.
fn unchecked<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    out: &Path,
    name: &Path,
) -> Result<(), UnpackError> {
    let dst = out.join(name);
    let made = dst
        .parent()
        .map_or(Ok(()), fs::create_dir_all)
        .and_then(|()| entry.unpack(&dst).map(|_| ()));
    made.map_err(|source| UnpackError::Create { path: dst, source })
}

/// The entry name `name` as a path of normal components (empty for `.`), or its refusal.
fn relative(name: &Path) -> Result<PathBuf, UnpackError> {
    let mut rel = PathBuf::new();
    for part in name.components() {
        match part {
            Component::Normal(p) => rel.push(p),
            Component::CurDir => {}
            Component::ParentDir => return Err(UnpackError::DotDot(name.to_path_buf())),
            Component::RootDir | Component::Prefix(_) => {
                return Err(UnpackError::Absolute(name.to_path_buf()))
            }
        }
    }
    Ok(rel)
}

/// Creates the directories above `out/rel` that are missing; one that is a symlink is refused.
fn make_parents(out: &Path, rel: &Path, name: &Path) -> Result<(), UnpackError> {
    let mut dir = out.to_path_buf();
    let Some(parent) = rel.parent() else {
        return Ok(());
    };
    for part in parent.components() {
        dir.push(part);
        let created = match fs::symlink_metadata(&dir) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(UnpackError::ThroughSymlink(name.to_path_buf()))
            }
            Ok(meta) if meta.is_dir() => Ok(()),
            Ok(_) => Err(io::Error::from_raw_os_error(libc::ENOTDIR)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir(&dir),
            Err(e) => Err(e),
        };
        created.map_err(|source| UnpackError::Create {
            path: dir.clone(),
            source,
        })?;
    }
    Ok(())
}

/// `dst` as a directory: an existing one is kept, anything else there is replaced.
fn make_dir(dst: &Path) -> Result<(), UnpackError> {
    let made = match fs::symlink_metadata(dst) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => fs::remove_file(dst).and_then(|()| fs::create_dir(dst)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir(dst),
        Err(e) => Err(e),
    };
    made.map_err(|source| UnpackError::Create {
        path: dst.to_path_buf(),
        source,
    })
}

/// A hard link must name a path inside `out` that no symlink leads to.
fn check_hard_link(out: &Path, name: &Path, target: &Path) -> Result<(), UnpackError> {
    let outside = || UnpackError::HardLinkOutside {
        name: name.to_path_buf(),
        target: target.to_path_buf(),
    };
    let rel = relative(target).map_err(|_| outside())?;
    if rel.as_os_str().is_empty() {
        return Err(outside());
    }
    let mut dir = out.to_path_buf();
    for part in rel.parent().into_iter().flat_map(Path::components) {
        dir.push(part);
        if fs::symlink_metadata(&dir).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(outside());
        }
    }
    Ok(())
}

/// A directory entry's time and mode, on the directory itself (never through a symlink).
fn finish_dir(path: &Path, meta: &DirMeta) -> Result<(), UnpackError> {
    let apply = || -> io::Result<()> {
        let dir = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)?;
        if let Some(mtime) = SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(meta.mtime)) {
            dir.set_times(FileTimes::new().set_accessed(mtime).set_modified(mtime))?;
        }
        dir.set_permissions(Permissions::from_mode(meta.mode))
    };
    apply().map_err(|source| UnpackError::Create {
        path: path.to_path_buf(),
        source,
    })
}

/// The one entry directly in `out`, or Nix's error (also when there is none).
fn single_entry(out: &Path, src: &Path) -> Result<PathBuf, UnpackError> {
    let read_fail = |source| UnpackError::ReadOut {
        path: out.to_path_buf(),
        source,
    };
    let mut entries = fs::read_dir(out).map_err(read_fail)?;
    let first = entries.next().transpose().map_err(read_fail)?;
    let second = entries.next().transpose().map_err(read_fail)?;
    match (first, second) {
        (Some(only), None) => Ok(only.path()),
        _ => Err(UnpackError::NotOneFile(src.to_path_buf())),
    }
}

/// Entry point of `stockade-builder-helper --builtin unpack-channel`: `args` are the arguments
/// after `unpack-channel` (none is accepted), the request is read from the process environment.
/// A failure is printed as `error: MESSAGE`; returns the exit code.
pub fn main(args: &[OsString]) -> i32 {
    super::run_main(|env| run(args, env))
}

fn run(args: &[OsString], env: &BTreeMap<String, String>) -> Result<(), UnpackError> {
    if let Some(arg) = args.first() {
        return Err(UnpackError::UnknownFlag(arg.to_string_lossy().into_owned()));
    }
    unpack(&UnpackRequest::from_env(env)?)
}

#[cfg(test)]
mod tests;
