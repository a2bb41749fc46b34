//! Adding paths: AddToStore (the store-writer computes the address) and AddNar (the client
//! claims the metadata; the store-writer checks all of it against the client's trust).
//!
//! Every add follows the same steps:
//! 1. hold the GC lock shared, so no Nix GC deletes what is being staged or registered;
//! 2. stream the data from the broker's pipe into a private 0700 staging directory inside the
//!    real store directory (same file system, so the final rename is atomic), parsing the NAR
//!    ourselves and hashing while reading — nothing is held in memory but text contents;
//! 3. check hashes, size, content address and signatures;
//! 4. canonicalise the staged tree (owner, modes, mtime 1, no xattrs);
//! 5. under the in-process path lock: if the path became valid meanwhile, stop; otherwise rename
//!    it into place (exchanging with any leftover) and register it in one transaction; a failed
//!    registration undoes the rename.
//!
//! The staging directory is deleted on every exit path (its `Drop`).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{Flock, OFlag, RenameFlags};
use nix::sys::stat::{Mode, SFlag};

use stockade_common::content_address::{ContentAddress, ContentAddressMethod};
use stockade_common::derivation::{name_from_drv_path, Derivation, DrvError, DrvHashCache};
use stockade_common::hash::{Encoding, Hash, HashAlgo, Hasher};
use stockade_common::ipc::msg::ClientIdentity;
use stockade_common::nar::{self, Limits, NarErrorKind, NarReader};
use stockade_common::narinfo::PathInfo;
use stockade_common::store_path::{check_name, FileIngestion, StorePath};

use crate::audit::Severity;
use crate::canon::{self, Owner};
use crate::error::{hl, not_valid, ReqError};
use crate::hashing::{hash_modulo_reader, CaHasher, ModuloHasher, Tee};
use crate::roots::{add_temp_root, TempRoots};
use crate::store::Store;
use crate::sys::{self, PipeReader};

/// Most bytes of a text added with AddToStore (held in memory to compute its address).
pub const MAX_TEXT: u64 = 64 << 20;
/// A broker that sends nothing for this long loses the request.
pub const PIPE_IDLE: Duration = Duration::from_secs(300);
/// Name of the node inside a staging directory.
const NODE: &str = "x";
/// Buffer between the pipe and the NAR parser (which reads token by token).
const BUF: usize = 256 * 1024;
/// Open batches per connection.
pub const MAX_BATCHES: usize = 16;
/// Paths staged in one batch.
pub const MAX_BATCH_PATHS: usize = 1 << 18;

/// Who is asking, as the master told us, and their temporary roots.
pub struct Ctx<'a> {
    pub store: &'a Arc<Store>,
    pub client: &'a ClientIdentity,
    pub roots: &'a Mutex<TempRoots>,
}

impl Ctx<'_> {
    fn temp_root(&self, p: &StorePath) -> Result<(), ReqError> {
        let mut roots = self.roots.lock().unwrap_or_else(|e| e.into_inner());
        add_temp_root(self.store, &mut roots, p)?;
        Ok(())
    }

    fn refuse(&self, op: &str, path: &str, reason: &str) {
        self.store.audit.client_event(
            Severity::Warning,
            self.client,
            &[
                ("op", op),
                ("outcome", "refused"),
                ("path", path),
                ("reason", reason),
            ],
        );
    }

    fn added(&self, op: &str, info: &PathInfo, evidence: &str) {
        let full = self.store.full(&info.path);
        let hash = info.nar_hash.to_typed(Encoding::Base32);
        self.store.audit.client_event(
            Severity::Notice,
            self.client,
            &[
                ("op", op),
                ("outcome", "added"),
                ("path", &full),
                ("narHash", &hash),
                ("evidence", evidence),
            ],
        );
    }
}

/// A private directory `<real store>/.stockade-tmp-<pid>-<n>` (0700) holding one node `x`.
pub struct Staging {
    store: Arc<Store>,
    name: String,
    /// Closed while the staged tree waits in a batch, so a large batch holds no descriptors.
    dir: Option<OwnedFd>,
}

impl Staging {
    pub fn new(store: &Arc<Store>) -> Result<Staging, ReqError> {
        loop {
            let name = store.staging_name();
            match nix::sys::stat::mkdirat(
                Some(store.store_fd().as_raw_fd()),
                name.as_str(),
                Mode::from_bits_truncate(0o700),
            ) {
                Ok(()) => {}
                Err(Errno::EEXIST) => continue,
                Err(e) => {
                    return Err(ReqError::failed(format!(
                        "creating a staging directory: {e}"
                    )))
                }
            }
            let staging = Staging {
                store: store.clone(),
                name: name.clone(),
                dir: match sys::open_dir_at(store.store_fd(), name.as_str()) {
                    Ok(fd) => Some(fd),
                    Err(e) => {
                        let _ = sys::remove_tree(store.store_fd(), OsStr::new(&name));
                        return Err(e.into());
                    }
                },
            };
            nix::sys::stat::fchmod(staging.fd()?.as_raw_fd(), Mode::from_bits_truncate(0o700))?;
            return Ok(staging);
        }
    }

    fn fd(&self) -> Result<BorrowedFd<'_>, ReqError> {
        self.dir
            .as_ref()
            .map(|d| d.as_fd())
            .ok_or_else(|| ReqError::failed("staging directory is not open"))
    }

    /// Closes the directory descriptor while the tree waits.
    fn park(&mut self) {
        self.dir = None;
    }

    fn unpark(&mut self) -> Result<(), ReqError> {
        if self.dir.is_none() {
            self.dir = Some(sys::open_dir_at(self.store.store_fd(), self.name.as_str())?);
        }
        Ok(())
    }

    fn create_file(&self) -> Result<File, ReqError> {
        let fd = sys::openat(
            self.fd()?,
            NODE,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW,
            Mode::from_bits_truncate(0o444),
        )?;
        Ok(File::from(fd))
    }

    /// Opens the staged node for reading; it must be a regular file.
    fn open_file(&self) -> Result<(File, u64), ReqError> {
        let fd = sys::openat(
            self.fd()?,
            NODE,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::ELOOP | Errno::EISDIR => ReqError::failed("regular file expected"),
            e => e.into(),
        })?;
        let st = sys::fstat(fd.as_fd())?;
        if sys::file_type(&st) != SFlag::S_IFREG {
            return Err(ReqError::failed("regular file expected"));
        }
        Ok((File::from(fd), u64::try_from(st.st_size).unwrap_or(0)))
    }

    fn canonicalise(&self, display: &str) -> Result<(), ReqError> {
        let s = &self.store;
        let owner = Owner {
            uid: s.euid,
            gid: s.egid,
            chown: s.cfg.as_root,
        };
        canon::canonicalise(self.fd()?, OsStr::new(NODE), &owner, display)
            .map_err(|e| ReqError::failed(e.to_string()))
    }

    /// NAR hash and size of the staged node.
    fn nar_hash(&self) -> Result<(Hash, u64), ReqError> {
        let mut h = nar::HashingWriter::sink(HashAlgo::Sha256);
        nar::dump_at(self.fd()?, OsStr::new(NODE), &mut h)
            .map_err(|e| ReqError::failed(e.to_string()))?;
        let (hash, size, _) = h.finish();
        Ok((hash, size))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Err(e) = sys::remove_tree(self.store.store_fd(), OsStr::new(&self.name)) {
            log::warn!("cannot remove staging directory {}: {e}", self.name);
        }
    }
}

/// How a staged path was put in place, so a failed registration can undo it.
enum Installed {
    New(StorePath),
    /// An old tree was exchanged out; it now sits in the staging directory.
    Replaced(StorePath),
}

fn install(store: &Store, staging: &Staging, path: &StorePath) -> Result<Installed, ReqError> {
    let base = path.base_name();
    let (from, to) = (staging.fd()?.as_raw_fd(), store.store_fd().as_raw_fd());
    let rename = |flags| nix::fcntl::renameat2(Some(from), NODE, Some(to), base, flags);
    match rename(RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => Ok(Installed::New(path.clone())),
        Err(Errno::EEXIST) => {
            // A leftover (an invalid path's garbage) or the old copy being repaired: swap it
            // out atomically; it is deleted with the staging directory.
            rename(RenameFlags::RENAME_EXCHANGE)?;
            Ok(Installed::Replaced(path.clone()))
        }
        Err(Errno::EINVAL) => {
            // A file system without RENAME_NOREPLACE; we hold the path lock.
            match sys::lstat_at(store.store_fd(), base) {
                Err(Errno::ENOENT) => {
                    nix::fcntl::renameat(Some(from), NODE, Some(to), base)?;
                    Ok(Installed::New(path.clone()))
                }
                _ => {
                    rename(RenameFlags::RENAME_EXCHANGE)?;
                    Ok(Installed::Replaced(path.clone()))
                }
            }
        }
        Err(e) => Err(ReqError::failed(format!(
            "moving '{}' into place: {e}",
            hl(store.full(path))
        ))),
    }
}

fn uninstall(store: &Store, staging: &Staging, how: Installed) {
    let res = match &how {
        Installed::New(p) => sys::remove_tree(store.store_fd(), OsStr::new(p.base_name())),
        Installed::Replaced(p) => match staging.fd() {
            Ok(fd) => nix::fcntl::renameat2(
                Some(fd.as_raw_fd()),
                NODE,
                Some(store.store_fd().as_raw_fd()),
                p.base_name(),
                RenameFlags::RENAME_EXCHANGE,
            )
            .map_err(Into::into),
            Err(e) => Err(std::io::Error::other(e.to_string())),
        },
    };
    if let Err(e) = res {
        log::error!(
            "cannot undo the installation of {how_path}: {e}",
            how_path = match &how {
                Installed::New(p) | Installed::Replaced(p) => p.base_name(),
            }
        );
    }
}

fn sync_store_dir(store: &Store) {
    if store.cfg.fsync_metadata {
        let _ = nix::unistd::fsync(store.store_fd().as_raw_fd());
    }
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The outputs to record in `DerivationOutputs` for a `.drv` being registered.
/// Largest `.drv` file the store-writer parses.
const MAX_DRV: u64 = 64 << 20;

fn read_bounded(mut f: File, what: &str) -> Result<Vec<u8>, ReqError> {
    let mut text = Vec::new();
    (&mut f)
        .take(MAX_DRV + 1)
        .read_to_end(&mut text)
        .map_err(|e| ReqError::failed(format!("reading {what}: {e}")))?;
    if text.len() as u64 > MAX_DRV {
        return Err(ReqError::failed(format!("{what} is too large")));
    }
    Ok(text)
}

/// Reads a valid `.drv` from the store, beneath the store descriptor.
fn read_store_drv(store: &Store, p: &StorePath) -> Result<Vec<u8>, ReqError> {
    let fd = sys::openat(
        store.store_fd(),
        p.base_name(),
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK,
        Mode::empty(),
    )?;
    read_bounded(File::from(fd), &store.full(p))
}

/// For a `.drv` being added: parse it, check its output paths as Nix's
/// checkDerivationOutputs does (an input-addressed output path must be the one its inputs
/// determine, V17), and return the outputs to record in DerivationOutputs. Input derivations
/// come from the store, or from `staged` (earlier members of the same batch).
fn derivation_outputs(
    staging: &Staging,
    info: &PathInfo,
    staged: &dyn Fn(&StorePath) -> Option<Vec<u8>>,
) -> Result<BTreeMap<String, StorePath>, ReqError> {
    if !info.path.is_derivation() {
        return Ok(BTreeMap::new());
    }
    let store = &staging.store;
    let sd = store.store_dir.clone();
    let (file, _) = staging.open_file()?;
    let text = read_bounded(file, &store.full(&info.path))?;
    let bad = |e: DrvError| ReqError::failed(e.to_string());
    let name = name_from_drv_path(&info.path).map_err(bad)?;
    let drv = Derivation::parse(&sd, &text, name).map_err(|e| {
        ReqError::failed(format!(
            "error parsing derivation '{}': {e}",
            hl(store.full(&info.path))
        ))
    })?;
    let mut cache = DrvHashCache::new(sd.clone());
    let mut resolver = |p: &StorePath| -> Result<Derivation, DrvError> {
        let text = match staged(p) {
            Some(t) => t,
            None => read_store_drv(store, p)
                .map_err(|e| DrvError::Io(std::io::Error::other(e.to_string())))?,
        };
        Derivation::parse(&sd, &text, name_from_drv_path(p)?)
    };
    drv.check_output_paths(&mut cache, &mut resolver)
        .map_err(bad)?;
    Ok(drv
        .static_output_paths(&sd)
        .map_err(bad)?
        .into_iter()
        .filter_map(|(name, p)| p.map(|p| (name, p)))
        .collect())
}

/// Nothing is staged outside a batch.
fn no_staged(_: &StorePath) -> Option<Vec<u8>> {
    None
}

/// References must be valid already, be the path itself, or (in a batch) be staged in it.
fn check_references(
    ctx: &Ctx<'_>,
    info: &PathInfo,
    staged: &BTreeSet<StorePath>,
) -> Result<(), ReqError> {
    let db = ctx.store.db();
    for r in &info.references {
        if r != &info.path && !staged.contains(r) && !db.is_valid(r)? {
            return Err(not_valid(&ctx.store.full(r)));
        }
    }
    Ok(())
}

/// AddToStore: the store-writer hashes the data and computes the path. → the registered info.
pub fn add_to_store(
    ctx: &Ctx<'_>,
    name: &str,
    method: ContentAddressMethod,
    algo: HashAlgo,
    references: Vec<StorePath>,
    repair: bool,
    fd: OwnedFd,
) -> Result<PathInfo, ReqError> {
    let res = add_to_store_inner(ctx, name, method, algo, references, repair, fd);
    if let Err(ReqError::Failed(msg)) = &res {
        ctx.refuse("addToStore", name, msg);
    }
    res
}

fn add_to_store_inner(
    ctx: &Ctx<'_>,
    name: &str,
    method: ContentAddressMethod,
    algo: HashAlgo,
    references: Vec<StorePath>,
    repair: bool,
    fd: OwnedFd,
) -> Result<PathInfo, ReqError> {
    let store = ctx.store;
    check_name(name, name).map_err(|e| ReqError::failed(e.to_string()))?;
    let refs: BTreeSet<StorePath> = references.into_iter().collect();
    match method {
        ContentAddressMethod::Text if algo != HashAlgo::Sha256 => {
            return Err(ReqError::failed(
                "text content address hash should use sha256",
            ))
        }
        ContentAddressMethod::Fixed(FileIngestion::Flat) if !refs.is_empty() => {
            return Err(ReqError::failed(
                "a flat fixed-output path cannot have references",
            ))
        }
        ContentAddressMethod::Fixed(FileIngestion::Recursive)
            if algo != HashAlgo::Sha256 && !refs.is_empty() =>
        {
            return Err(ReqError::failed(
                "only recursive sha256 paths can have references",
            ))
        }
        _ => {}
    }
    let probe = PathInfo::new(
        // Any path will do: only the references are checked here.
        StorePath::from_hash(&[0; 20], name).map_err(|e| ReqError::failed(e.to_string()))?,
        Hash::sha256(b""),
        0,
    );
    check_references(
        ctx,
        &PathInfo {
            references: refs.clone(),
            ..probe
        },
        &BTreeSet::new(),
    )?;

    let _gc = store.gc_shared()?;
    let mut input = PipeReader::new(fd, PIPE_IDLE)?;
    let staging = Staging::new(store)?;
    let (ca_hash, nar_hash, nar_size) = match method {
        ContentAddressMethod::Text => {
            let mut data = Vec::new();
            (&mut input).take(MAX_TEXT + 1).read_to_end(&mut data)?;
            if data.len() as u64 > MAX_TEXT {
                return Err(ReqError::failed(format!(
                    "text of '{}' is larger than {MAX_TEXT} bytes",
                    hl(name)
                )));
            }
            let mut f = staging.create_file()?;
            f.write_all(&data)?;
            drop(f);
            let sink =
                nar::write_flat_nar(nar::HashingWriter::sink(HashAlgo::Sha256), false, &data)?;
            let (nar_hash, size, _) = sink.finish();
            (Hash::sha256(&data), nar_hash, size)
        }
        ContentAddressMethod::Fixed(FileIngestion::Flat) => {
            let mut f = staging.create_file()?;
            let mut h = Hasher::new(algo);
            let mut buf = vec![0u8; BUF];
            loop {
                let n = match input.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e.into()),
                };
                let chunk = buf.get(..n).unwrap_or_default();
                h.update(chunk);
                f.write_all(chunk)?;
            }
            drop(f);
            let (nar_hash, nar_size) = staging.nar_hash()?;
            (h.finish(), nar_hash, nar_size)
        }
        ContentAddressMethod::Fixed(FileIngestion::Recursive) => {
            let ca = (algo != HashAlgo::Sha256).then(|| CaHasher::Plain(Hasher::new(algo)));
            let tee = Tee::new(BufReader::with_capacity(BUF, input), ca);
            let mut reader = NarReader::with_limits(tee, Limits::default());
            nar::restore(&mut reader, staging.fd()?, OsStr::new(NODE))
                .and_then(|()| reader.finish_at_eof())
                .map_err(|e| ReqError::failed(e.to_string()))?;
            let (nar_hash, size, ca) = reader.into_inner().finish();
            let ca_hash = match ca {
                Some(c) => c.finish().ok_or_else(|| ReqError::failed("bad digest"))?,
                None => nar_hash,
            };
            (ca_hash, nar_hash, size)
        }
    };
    let ca = ContentAddress {
        method,
        hash: ca_hash,
    };
    let path = ca
        .store_path(&store.store_dir, name, &refs, false)
        .map_err(|e| ReqError::failed(e.to_string()))?;
    let full = store.full(&path);
    ctx.temp_root(&path)?;
    staging.canonicalise(&full)?;
    let info = PathInfo {
        path: path.clone(),
        deriver: None,
        nar_hash,
        references: refs,
        registration_time: now(),
        nar_size,
        ultimate: false,
        sigs: BTreeSet::new(),
        ca: Some(ca),
    };

    let _lock = store.locks.lock([path.clone()]);
    if !repair {
        if let Some(existing) = store.db().query_path_info(&path)? {
            return Ok(existing);
        }
    }
    let outputs = derivation_outputs(&staging, &info, &no_staged)?;
    let how = install(store, &staging, &path)?;
    if let Err(e) = store
        .db()
        .register(&[(info.clone(), outputs)], info.registration_time)
    {
        uninstall(store, &staging, how);
        return Err(e.into());
    }
    sync_store_dir(store);
    ctx.added("addToStore", &info, "ca");
    Ok(info)
}

/// A NAR staged for a batch, registered by `CommitBatch`.
pub struct StagedPath {
    info: PathInfo,
    repair: bool,
    evidence: String,
    staging: Staging,
}

/// The paths of one batch (AddMultipleToStore), all registered in one transaction.
pub struct Batch {
    /// Keeps the GC away from the staged trees for the life of the batch.
    _gc: Flock<File>,
    staged: Vec<StagedPath>,
    /// An add in this batch failed; everything staged was dropped.
    failed: bool,
}

impl Batch {
    pub fn new(store: &Store) -> Result<Batch, ReqError> {
        Ok(Batch {
            _gc: store.gc_shared()?,
            staged: Vec::new(),
            failed: false,
        })
    }

    /// Whether an add in this batch failed (the batch can then only be aborted).
    pub fn failed(&self) -> bool {
        self.failed
    }

    fn staged_paths(&self) -> BTreeSet<StorePath> {
        self.staged.iter().map(|s| s.info.path.clone()).collect()
    }
}

/// AddNar: adds a NAR with client-claimed metadata, or stages it into `batch`.
pub fn add_nar(
    ctx: &Ctx<'_>,
    info: PathInfo,
    repair: bool,
    dont_check_sigs: bool,
    batch: Option<&mut Batch>,
    fd: OwnedFd,
) -> Result<(), ReqError> {
    let full = ctx.store.full(&info.path);
    let in_batch = batch.is_some();
    let res = add_nar_inner(ctx, info, repair, dont_check_sigs, batch, fd);
    if let Err(ReqError::Failed(msg)) = &res {
        ctx.refuse(
            if in_batch { "addNar(batch)" } else { "addNar" },
            &full,
            msg,
        );
    }
    res
}

fn add_nar_inner(
    ctx: &Ctx<'_>,
    mut info: PathInfo,
    repair: bool,
    dont_check_sigs: bool,
    batch: Option<&mut Batch>,
    fd: OwnedFd,
) -> Result<(), ReqError> {
    let store = ctx.store;
    let sd = &store.store_dir;
    let full = store.full(&info.path);
    // The broker already forces these for untrusted clients; a compromised one would not.
    let trusted = ctx.client.trusted;
    let dont_check_sigs = dont_check_sigs && trusted;
    if !trusted {
        info.ultimate = false;
    }
    if info.nar_hash.algo() != HashAlgo::Sha256 {
        return Err(ReqError::failed(format!(
            "NAR hash of path '{}' is not SHA-256",
            hl(&full)
        )));
    }
    // As Nix: a valid content address is evidence of its own; otherwise a trusted client
    // may skip the signature check, and everyone else needs a trusted signature.
    let ca_ok = info.is_content_addressed(sd);
    let evidence = if ca_ok {
        "ca".to_string()
    } else if dont_check_sigs {
        "trusted".to_string()
    } else if let Some(key) = info.signed_by(sd, &store.keys) {
        format!("sig:{key}")
    } else if !store.cfg.require_sigs {
        "unchecked".to_string()
    } else {
        return Err(ReqError::failed(format!(
            "cannot add path '{}' because it lacks a valid signature",
            hl(&full)
        )));
    };
    if info.ca.is_some() && !ca_ok {
        return Err(ReqError::failed(format!(
            "cannot add path '{}' to the Nix store because it claims to be content-addressed but isn't",
            hl(&full)
        )));
    }

    let mut input = PipeReader::new(fd, PIPE_IDLE)?;
    let drain_limit = info.nar_size.saturating_add(1);
    let staged = batch
        .as_deref()
        .map(Batch::staged_paths)
        .unwrap_or_default();
    if staged.contains(&info.path) {
        sys::drain(&mut input, drain_limit)?;
        return Ok(());
    }
    check_references(ctx, &info, &staged)?;

    match batch {
        Some(b) => {
            if !repair && store.db().is_valid(&info.path)? {
                sys::drain(&mut input, drain_limit)?;
                return Ok(());
            }
            ctx.temp_root(&info.path)?;
            if b.staged.len() >= MAX_BATCH_PATHS {
                return Err(ReqError::failed(format!(
                    "too many paths in one batch (at most {MAX_BATCH_PATHS})"
                )));
            }
            let mut staging = stage_nar(store, &info, input)?;
            staging.canonicalise(&full)?;
            staging.park();
            b.staged.push(StagedPath {
                info,
                repair,
                evidence,
                staging,
            });
            Ok(())
        }
        None => {
            let _gc = store.gc_shared()?;
            ctx.temp_root(&info.path)?;
            let _lock = store.locks.lock([info.path.clone()]);
            if !repair && store.db().is_valid(&info.path)? {
                sys::drain(&mut input, drain_limit)?;
                return Ok(());
            }
            let staging = stage_nar(store, &info, input)?;
            staging.canonicalise(&full)?;
            let outputs = derivation_outputs(&staging, &info, &no_staged)?;
            let how = install(store, &staging, &info.path)?;
            if let Err(e) = store.db().register(&[(info.clone(), outputs)], now()) {
                uninstall(store, &staging, how);
                return Err(e.into());
            }
            sync_store_dir(store);
            ctx.added("addNar", &info, &evidence);
            Ok(())
        }
    }
}

/// Restores the NAR from `input` into a new staging directory while hashing it, then checks
/// the NAR hash, size and content address against `info`.
fn stage_nar(store: &Arc<Store>, info: &PathInfo, input: PipeReader) -> Result<Staging, ReqError> {
    let full = store.full(&info.path);
    let staging = Staging::new(store)?;
    let ca_hasher = match &info.ca {
        Some(ContentAddress {
            method: ContentAddressMethod::Fixed(FileIngestion::Recursive),
            hash,
        }) => Some(CaHasher::Modulo(ModuloHasher::new(
            hash.algo(),
            info.path.hash_part(),
        ))),
        _ => None,
    };
    let tee = Tee::new(BufReader::with_capacity(BUF, input), ca_hasher);
    let limits = Limits {
        max_nar_size: info.nar_size,
        ..Limits::default()
    };
    let mut reader = NarReader::with_limits(tee, limits);
    let res = nar::restore(&mut reader, staging.fd()?, OsStr::new(NODE))
        .and_then(|()| reader.finish_at_eof());
    if let Err(e) = res {
        return Err(match e.kind() {
            NarErrorKind::TooLarge(_) => ReqError::failed(format!(
                "size mismatch importing path '{}';\n  specified: {}\n  got:       {}",
                hl(&full),
                hl(info.nar_size),
                hl(format!("more than {}", info.nar_size))
            )),
            _ => ReqError::failed(format!("importing path '{}': {e}", hl(&full))),
        });
    }
    let (nar_hash, nar_size, ca_tee) = reader.into_inner().finish();
    if nar_hash != info.nar_hash {
        return Err(ReqError::failed(format!(
            "hash mismatch importing path '{}';\n  specified: {}\n  got:       {}",
            hl(&full),
            hl(info.nar_hash.to_typed(Encoding::Base32)),
            hl(nar_hash.to_typed(Encoding::Base32))
        )));
    }
    if nar_size != info.nar_size {
        return Err(ReqError::failed(format!(
            "size mismatch importing path '{}';\n  specified: {}\n  got:       {}",
            hl(&full),
            hl(info.nar_size),
            hl(nar_size)
        )));
    }
    if let Some(ca) = &info.ca {
        let got = match ca.method {
            ContentAddressMethod::Fixed(FileIngestion::Recursive) => {
                ca_tee.and_then(CaHasher::finish)
            }
            ContentAddressMethod::Fixed(FileIngestion::Flat) => {
                let (f, size) = staging.open_file()?;
                hash_modulo_reader(f, ca.hash.algo(), info.path.hash_part(), size)?
            }
            ContentAddressMethod::Text => {
                let (f, size) = staging.open_file()?;
                hash_modulo_reader(f, HashAlgo::Sha256, "", size)?
            }
        };
        let got = got.ok_or_else(|| {
            ReqError::failed(format!("path '{}' has too many self-references", hl(&full)))
        })?;
        if got != ca.hash {
            return Err(ReqError::failed(format!(
                "ca hash mismatch importing path '{}';\n  specified: {}\n  got:       {}",
                hl(&full),
                hl(ca.hash.to_typed(Encoding::Base32)),
                hl(got.to_typed(Encoding::Base32))
            )));
        }
    }
    Ok(staging)
}

/// CommitBatch: registers every staged path of `batch` in one transaction (all or nothing).
pub fn commit_batch(ctx: &Ctx<'_>, batch: Batch) -> Result<(), ReqError> {
    let store = ctx.store;
    if batch.failed {
        return Err(ReqError::failed(
            "cannot commit a batch in which a path failed to import",
        ));
    }
    let paths: Vec<StorePath> = batch.staged.iter().map(|s| s.info.path.clone()).collect();
    let _lock = store.locks.lock(paths);
    // Paths another client registered meanwhile are left as they are.
    let mut todo = Vec::new();
    {
        let db = store.db();
        for s in batch.staged {
            if s.repair || !db.is_valid(&s.info.path)? {
                todo.push(s);
            }
        }
    }
    for s in &mut todo {
        s.staging.unpark()?;
    }
    let in_batch: BTreeSet<StorePath> = todo.iter().map(|s| s.info.path.clone()).collect();
    for s in &todo {
        check_references(ctx, &s.info, &in_batch)?;
    }
    let staged_drv = |p: &StorePath| -> Option<Vec<u8>> {
        let s = todo.iter().find(|s| &s.info.path == p)?;
        let (file, _) = s.staging.open_file().ok()?;
        read_bounded(file, "staged derivation").ok()
    };
    let mut regs = Vec::with_capacity(todo.len());
    for s in &todo {
        regs.push((
            s.info.clone(),
            derivation_outputs(&s.staging, &s.info, &staged_drv)?,
        ));
    }
    let mut done: Vec<(usize, Installed)> = Vec::new();
    let undo = |done: Vec<(usize, Installed)>| {
        for (i, how) in done.into_iter().rev() {
            if let Some(s) = todo.get(i) {
                uninstall(store, &s.staging, how);
            }
        }
    };
    for (i, s) in todo.iter().enumerate() {
        match install(store, &s.staging, &s.info.path) {
            Ok(how) => done.push((i, how)),
            Err(e) => {
                undo(done);
                return Err(e);
            }
        }
    }
    if let Err(e) = store.db().register(&regs, now()) {
        undo(done);
        return Err(e.into());
    }
    sync_store_dir(store);
    for s in &todo {
        ctx.added("addNar(batch)", &s.info, &s.evidence);
    }
    Ok(())
}

/// Marks a batch failed after one of its adds failed: the staged trees are deleted now.
pub fn fail_batch(batch: &mut Batch) {
    batch.staged.clear();
    batch.failed = true;
}
