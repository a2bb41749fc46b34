//! `builtin:fetchurl`: downloads the derivation's `url` into its output, as Nix's
//! `builtinFetchurl` does (2.8.0 and 2.26.3 `src/libstore/builtins/fetchurl.cc`; transfers as
//! `filetransfer.cc` makes them, messages in Nix's wording where Nix has one).
//!
//! It runs inside the build sandbox, in a process of its own, with the derivation's environment:
//! `out` and `url` are required; `unpack=1` makes the download a NAR (xz-compressed when the
//! main `url` ends in `.xz`) restored at `out`, otherwise it is written to `out` as a file;
//! `executable=1` makes `out` mode 0755. For a flat fixed-output derivation each hashed mirror
//! is tried first as `<mirror>/<algo>/<base16 hash>`, any failure falling through to the next
//! and finally to `url`. Schemes: http, https, file.
//!
//! Differences from Nix, on purpose: TLS is always verified (Nix 2.8 turned it off and relied on
//! the output hash); `out` is created with `O_EXCL | O_NOFOLLOW` (an existing path is refused,
//! never truncated or followed), and what a failed attempt left there is removed before the
//! next one; the body of a download is read to its end after its NAR, so a truncated or corrupt
//! xz stream fails the fetch. Not done: netrc credentials, proxies, retrying transient
//! failures.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{self, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use stockade_common::hash::{Hash, HashAlgo};
use stockade_common::nar::{self, NarError, NarErrorKind, NarReader};

use super::transfer::{self, CurlCode, Transfer};

/// Chunk size for copying a download to disk.
const CHUNK: usize = 64 * 1024;

/// What to fetch and where to put it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchRequest {
    /// The output path; must not exist yet.
    pub out: PathBuf,
    /// The main URL, tried after the hashed mirrors.
    pub url: String,
    /// The download is a NAR to restore at `out`.
    pub unpack: bool,
    /// `out` is made mode 0755.
    pub executable: bool,
    /// Nix's `hashed-mirrors`, tried only when `flat_hash` is known.
    pub hashed_mirrors: Vec<String>,
    /// The expected hash of a flat fixed output (what the hashed mirrors are indexed by).
    pub flat_hash: Option<Hash>,
    /// PEM file of the certificate authorities to trust instead of the bundled roots.
    pub ca_file: Option<PathBuf>,
}

/// Why the fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("attribute '{0}' missing")]
    MissingAttr(&'static str),
    /// A response with a status Nix does not accept (Nix 2.26's wording, which drops 2.8's
    /// reason phrase, since HTTP/2 has none), with a short response body as Nix shows it.
    #[error("unable to download '{url}': HTTP error {status}{}", show_body(.body))]
    Http {
        url: String,
        status: u16,
        body: Option<String>,
    },
    /// Anything else that stopped the transfer, named like the curl error Nix would print.
    #[error("unable to download '{url}': {what} ({code}) {detail}")]
    Transfer {
        url: String,
        code: u32,
        what: &'static str,
        detail: String,
    },
    #[error("failed to read compressed data ({0})")]
    Decompress(String),
    #[error("output path '{}' already exists", .0.display())]
    OutputExists(PathBuf),
    #[error("opening file '{}': {source}", .path.display())]
    Create { path: PathBuf, source: io::Error },
    #[error("writing file '{}': {source}", .path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("unpacking NAR into '{}': {source}", .path.display())]
    Restore { path: PathBuf, source: NarError },
    #[error("making '{}' executable: {source}", .path.display())]
    Chmod { path: PathBuf, source: io::Error },
    #[error("reading CA file '{}': {reason}", .path.display())]
    CaFile { path: PathBuf, reason: String },
    #[error("unrecognised flag '{0}'")]
    UnknownFlag(String),
    #[error("flag '{0}' requires 1 argument(s)")]
    MissingArgument(&'static str),
    #[error("argument of flag '{0}' is not valid UTF-8")]
    BadArgument(&'static str),
}

impl FetchError {
    pub(super) fn transfer(url: &str, code: CurlCode, detail: String) -> Self {
        FetchError::Transfer {
            url: url.to_string(),
            code: code.0,
            what: code.1,
            detail,
        }
    }
}

fn show_body(body: &Option<String>) -> String {
    body.as_ref()
        .map(|b| format!("\n\nresponse body:\n\n{b}"))
        .unwrap_or_default()
}

impl FetchRequest {
    /// The request the derivation's environment `env` describes.
    ///
    /// `outputHashMode` missing counts as flat (a fixed output's default). A missing, empty or
    /// unparsable `outputHash` only means no hashed mirror is tried: Nix 2.8 catches that
    /// error with the mirrors' own.
    pub fn from_env(
        env: &BTreeMap<String, String>,
        ca_file: Option<PathBuf>,
        hashed_mirrors: Vec<String>,
    ) -> Result<Self, FetchError> {
        let required = |name: &'static str| env.get(name).ok_or(FetchError::MissingAttr(name));
        let out = PathBuf::from(required("out")?);
        let url = required("url")?.clone();
        let is_one = |name: &str| env.get(name).map(String::as_str) == Some("1");
        let flat = !matches!(env.get("outputHashMode"), Some(mode) if mode != "flat");
        Ok(FetchRequest {
            out,
            url,
            unpack: is_one("unpack"),
            executable: is_one("executable"),
            hashed_mirrors,
            flat_hash: if flat { output_hash(env) } else { None },
            ca_file,
        })
    }
}

fn output_hash(env: &BTreeMap<String, String>) -> Option<Hash> {
    let hash = env.get("outputHash").filter(|h| !h.is_empty())?;
    let algo = match env.get("outputHashAlgo").map(String::as_str) {
        None | Some("") => None,
        Some(name) => match name.parse::<HashAlgo>() {
            Ok(algo) => Some(algo),
            Err(e) => {
                log::debug!("no hashed mirrors: {e}");
                return None;
            }
        },
    };
    Hash::parse(hash, algo)
        .map_err(|e| log::debug!("no hashed mirrors: {e}"))
        .ok()
}

/// Where the hashed mirror `mirror` keeps the file of hash `hash`.
pub fn mirror_url(mirror: &str, hash: &Hash) -> String {
    let sep = if mirror.ends_with('/') { "" } else { "/" };
    format!("{mirror}{sep}{}/{}", hash.algo(), hash.to_base16())
}

/// Performs `req`: the hashed mirrors first (flat outputs), then the main URL.
pub fn fetch(req: &FetchRequest) -> Result<(), FetchError> {
    refuse_existing(&req.out)?;
    let transfer = Transfer::new(req.ca_file.as_deref())?;
    // Nix decides by the main URL, whichever URL is being fetched.
    let xz = req.unpack && req.url.ends_with(".xz");
    if let Some(hash) = &req.flat_hash {
        for mirror in &req.hashed_mirrors {
            match fetch_one(&transfer, req, &mirror_url(mirror, hash), xz) {
                Ok(()) => return Ok(()),
                Err(e @ FetchError::OutputExists(_)) => return Err(e),
                Err(e) => log::debug!("{e}"),
            }
        }
    }
    fetch_one(&transfer, req, &req.url, xz)
}

/// One attempt; on failure, what it created at `out` is gone again.
fn fetch_one(
    transfer: &Transfer,
    req: &FetchRequest,
    url: &str,
    xz: bool,
) -> Result<(), FetchError> {
    let download = transfer.open(url)?;
    let result = if req.unpack {
        unpack(download, url, xz, &req.out)
    } else {
        write_flat(download, url, &req.out)
    };
    let result = result.and_then(|()| {
        if req.executable {
            make_executable(&req.out)
        } else {
            Ok(())
        }
    });
    match &result {
        Ok(()) | Err(FetchError::OutputExists(_)) => {}
        Err(_) => remove_partial(&req.out),
    }
    result
}

fn refuse_existing(out: &Path) -> Result<(), FetchError> {
    match fs::symlink_metadata(out) {
        Ok(_) => Err(FetchError::OutputExists(out.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(FetchError::Create {
            path: out.to_path_buf(),
            source,
        }),
    }
}

/// The download as the regular file `out`, mode 0666 less the umask (Nix's `writeFile`).
fn write_flat(download: transfer::Download, url: &str, out: &Path) -> Result<(), FetchError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o666)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(out)
        .map_err(|source| match source.kind() {
            io::ErrorKind::AlreadyExists => FetchError::OutputExists(out.to_path_buf()),
            _ => FetchError::Create {
                path: out.to_path_buf(),
                source,
            },
        })?;
    let mut reader = download.reader;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(transfer::read_error(url, download.file, &e)),
        };
        file.write_all(buf.get(..n).unwrap_or_default())
            .map_err(|source| FetchError::Write {
                path: out.to_path_buf(),
                source,
            })?;
    }
    Ok(())
}

/// The download, a NAR (xz-compressed when `xz`), restored at `out`.
fn unpack(download: transfer::Download, url: &str, xz: bool, out: &Path) -> Result<(), FetchError> {
    // The restorer sees only an io::Error; the taps keep what it meant.
    let failure = Rc::new(RefCell::new(None));
    let (file, owned_url) = (download.file, url.to_string());
    let body = Tap {
        inner: download.reader,
        failure: Rc::clone(&failure),
        blame: move |e: &io::Error| transfer::read_error(&owned_url, file, e),
    };
    let reader: Box<dyn Read> = if xz {
        Box::new(Tap {
            inner: xz2::read::XzDecoder::new_multi_decoder(body),
            failure: Rc::clone(&failure),
            blame: |e: &io::Error| FetchError::Decompress(e.to_string()),
        })
    } else {
        Box::new(body)
    };
    let mut nar = NarReader::new(reader);
    if let Err(source) = nar::restore_path(&mut nar, out) {
        if let Some(f) = failure.borrow_mut().take() {
            return Err(f);
        }
        return Err(match source.kind() {
            NarErrorKind::Restore { source: e, .. }
                if source.path().is_empty() && e.kind() == io::ErrorKind::AlreadyExists =>
            {
                FetchError::OutputExists(out.to_path_buf())
            }
            _ => FetchError::Restore {
                path: out.to_path_buf(),
                source,
            },
        });
    }
    // To the end, so that a transfer or xz stream that fails after the NAR fails the fetch;
    // what follows the NAR is ignored, as Nix does.
    if let Err(e) = io::copy(nar.get_mut(), &mut io::sink()) {
        let f = failure.borrow_mut().take();
        return Err(f.unwrap_or_else(|| transfer::read_error(url, file, &e)));
    }
    Ok(())
}

/// A reader that remembers, as a [`FetchError`], the first error read through it.
struct Tap<R, F> {
    inner: R,
    failure: Rc<RefCell<Option<FetchError>>>,
    blame: F,
}

impl<R: Read, F: Fn(&io::Error) -> FetchError> Read for Tap<R, F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).inspect_err(|e| {
            let mut failure = self.failure.borrow_mut();
            if failure.is_none() && e.kind() != io::ErrorKind::Interrupted {
                *failure = Some((self.blame)(e));
            }
        })
    }
}

/// Mode 0755 on `out` itself, never on what a symlink there points to.
fn make_executable(out: &Path) -> Result<(), FetchError> {
    let chmod = || -> io::Result<()> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(out)?;
        file.set_permissions(Permissions::from_mode(0o755))
    };
    chmod().map_err(|source| FetchError::Chmod {
        path: out.to_path_buf(),
        source,
    })
}

/// Removes what a failed attempt left at `out` (without following a symlink there).
fn remove_partial(out: &Path) {
    let removed = match fs::symlink_metadata(out) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(out),
        Ok(_) => fs::remove_file(out),
        Err(_) => Ok(()),
    };
    if let Err(e) = removed {
        log::debug!("removing '{}': {e}", out.display());
    }
}

/// Entry point of `stockade-builder-helper --builtin fetchurl [--ca-file PATH]
/// [--hashed-mirror URL]...`: `args` are the arguments after `fetchurl`, the request is read
/// from the process environment. A failure is printed as `error: MESSAGE`; returns the exit
/// code.
pub fn main(args: &[OsString]) -> i32 {
    super::run_main(|env| run(args, env))
}

fn run(args: &[OsString], env: &BTreeMap<String, String>) -> Result<(), FetchError> {
    let (ca_file, hashed_mirrors) = parse_args(args)?;
    fetch(&FetchRequest::from_env(env, ca_file, hashed_mirrors)?)
}

/// `--ca-file PATH` (the last one counts) and `--hashed-mirror URL` (in order).
fn parse_args(args: &[OsString]) -> Result<(Option<PathBuf>, Vec<String>), FetchError> {
    let (mut ca_file, mut mirrors) = (None, Vec::new());
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("--ca-file") => {
                let path = args
                    .next()
                    .ok_or(FetchError::MissingArgument("--ca-file"))?;
                ca_file = Some(PathBuf::from(path));
            }
            Some("--hashed-mirror") => {
                let url = args
                    .next()
                    .ok_or(FetchError::MissingArgument("--hashed-mirror"))?;
                let url = url
                    .to_str()
                    .ok_or(FetchError::BadArgument("--hashed-mirror"))?;
                mirrors.push(url.to_string());
            }
            _ => return Err(FetchError::UnknownFlag(arg.to_string_lossy().into_owned())),
        }
    }
    Ok((ca_file, mirrors))
}

#[cfg(test)]
mod tests;
