//! What an operation answers after `STDERR_LAST`, and how it goes on the wire.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufWriter, Write};
use std::os::fd::AsFd;

use stockade_common::nar;
use stockade_common::narinfo::PathInfo;
use stockade_common::store_path::{StoreDir, StorePath};
use stockade_common::worker::request::DerivedPath;
use stockade_common::worker::WireWriter;

use crate::error::{OpError, OpResult};

/// An operation's answer.
#[derive(Debug)]
pub enum Reply {
    /// Nothing follows `STDERR_LAST`.
    Nothing,
    Bool(bool),
    /// A number (`1` for the operations that only acknowledge).
    Int(u64),
    Str(String),
    Strings(Vec<String>),
    /// A path set, in order.
    Paths(BTreeSet<StorePath>),
    /// A path list, in the order given.
    PathList(Vec<StorePath>),
    /// A path or the empty string.
    OptPath(Option<StorePath>),
    /// Pairs of a name and a path: outputs of a derivation, or roots and their targets.
    Pairs(Vec<(String, StorePath)>),
    /// CollectGarbage: paths (sorted, as Nix's `std::set`), bytes freed, and a retired 0.
    Gc {
        paths: Vec<String>,
        bytes_freed: u64,
    },
    /// QueryPathInfo: from 1.17 a flag says whether the path is valid.
    PathInfo(Option<Box<PathInfo>>),
    /// AddToStore from 1.25: the new path's info, with its path.
    Added(Box<PathInfo>),
    /// QueryMissing without substituters.
    Missing {
        will_build: BTreeSet<StorePath>,
        unknown: BTreeSet<StorePath>,
    },
    /// BuildPathsWithResults.
    BuildResults(Vec<BuildResult>),
    /// BuildDerivation (no target in the result).
    BuildResult(Box<BuildResult>),
    /// NarFromPath: the path's NAR, dumped from the store.
    Nar(StorePath),
}

/// Nix's BuildResult (§4.4).
#[derive(Debug, Default)]
pub struct BuildResult {
    /// Written first in BuildPathsWithResults' form; BuildDerivation's has none.
    pub target: Option<DerivedPath>,
    pub status: u64,
    pub error: String,
    pub times_built: u64,
    pub non_deterministic: bool,
    pub start_time: u64,
    pub stop_time: u64,
    /// Microseconds.
    pub cpu_user: Option<u64>,
    pub cpu_system: Option<u64>,
    /// The outputs' realisations: id, and the realisation in JSON.
    pub realisations: Vec<(String, String)>,
}

/// A derivation's outputs, by name.
impl From<BTreeMap<String, StorePath>> for Reply {
    fn from(map: BTreeMap<String, StorePath>) -> Reply {
        Reply::Pairs(map.into_iter().collect())
    }
}

/// Where a reply is written, and what it needs to render paths and dump NARs.
pub struct ReplyOut<'a, W: Write> {
    pub w: &'a mut WireWriter<W>,
    pub sd: &'a StoreDir,
    pub minor: u8,
    /// Where the store really is on disk, for NARs.
    pub real_store_dir: &'a str,
}

impl Reply {
    pub fn write<W: Write>(self, out: ReplyOut<'_, W>) -> OpResult<()> {
        let ReplyOut {
            w,
            sd,
            minor,
            real_store_dir,
        } = out;
        match self {
            Reply::Nothing => {}
            Reply::Bool(b) => w.write_bool(b)?,
            Reply::Int(n) => w.write_u64(n)?,
            Reply::Str(s) => w.write_string(&s)?,
            Reply::Strings(v) => w.write_strings(&v)?,
            Reply::Paths(paths) => write_paths(w, sd, &paths)?,
            Reply::PathList(paths) => write_paths(w, sd, &paths)?,
            Reply::OptPath(p) => write_opt_path(w, sd, p.as_ref())?,
            Reply::Pairs(pairs) => {
                w.write_u64(pairs.len() as u64)?;
                for (name, p) in &pairs {
                    w.write_string(name)?;
                    w.write_string(&sd.display(p))?;
                }
            }
            Reply::Gc { paths, bytes_freed } => {
                w.write_strings(&paths)?;
                w.write_u64(bytes_freed)?;
                w.write_u64(0)?;
            }
            Reply::PathInfo(Some(info)) => {
                if minor >= 17 {
                    w.write_u64(1)?;
                }
                write_path_info(w, sd, &info, minor, false)?;
            }
            Reply::PathInfo(None) => w.write_u64(0)?,
            Reply::Added(info) => write_path_info(w, sd, &info, minor, true)?,
            Reply::Missing {
                will_build,
                unknown,
            } => {
                write_paths(w, sd, &will_build)?;
                write_paths(w, sd, &BTreeSet::new())?;
                write_paths(w, sd, &unknown)?;
                w.write_u64(0)?;
                w.write_u64(0)?;
            }
            Reply::BuildResults(results) => {
                w.write_u64(results.len() as u64)?;
                for r in &results {
                    write_build_result(w, sd, minor, r)?;
                }
            }
            Reply::BuildResult(r) => write_build_result(w, sd, minor, &r)?,
            Reply::Nar(path) => {
                w.flush()?;
                dump(w.get_mut(), sd, real_store_dir, &path)?;
            }
        }
        Ok(())
    }
}

/// Streams the NAR of a path to the client, read beneath the store directory.
fn dump(
    out: &mut impl Write,
    sd: &StoreDir,
    real_store_dir: &str,
    path: &StorePath,
) -> OpResult<()> {
    let store = std::fs::File::open(real_store_dir)?;
    let name = std::ffi::OsStr::new(path.base_name());
    let mut out = BufWriter::with_capacity(256 * 1024, out);
    nar::dump_at(store.as_fd(), name, &mut out)
        .map_err(|e| OpError::fatal(format!("error dumping '{}': {e}", sd.display(path))))?;
    out.flush()?;
    Ok(())
}

fn write_paths<'a, W: Write>(
    w: &mut WireWriter<W>,
    sd: &StoreDir,
    paths: impl IntoIterator<Item = &'a StorePath>,
) -> OpResult<()> {
    let v: Vec<String> = paths.into_iter().map(|p| sd.display(p)).collect();
    w.write_strings(&v)?;
    Ok(())
}

fn write_opt_path<W: Write>(
    w: &mut WireWriter<W>,
    sd: &StoreDir,
    p: Option<&StorePath>,
) -> OpResult<()> {
    w.write_string(&p.map(|p| sd.display(p)).unwrap_or_default())?;
    Ok(())
}

/// ValidPathInfo as the daemon writes it (§4.2); `with_path` for AddToStore's reply.
fn write_path_info<W: Write>(
    w: &mut WireWriter<W>,
    sd: &StoreDir,
    info: &PathInfo,
    minor: u8,
    with_path: bool,
) -> OpResult<()> {
    if with_path {
        w.write_string(&sd.display(&info.path))?;
    }
    write_opt_path(w, sd, info.deriver.as_ref())?;
    w.write_string(&info.nar_hash.to_base16())?;
    write_paths(w, sd, &info.references)?;
    w.write_u64(info.registration_time)?;
    w.write_u64(info.nar_size)?;
    if minor >= 16 {
        w.write_bool(info.ultimate)?;
        w.write_strings(&info.sigs)?;
        w.write_string(&info.ca.as_ref().map(|c| c.to_string()).unwrap_or_default())?;
    }
    Ok(())
}

/// A BuildResult; BuildDerivation's form (no target) has fewer fields at older minors.
fn write_build_result<W: Write>(
    w: &mut WireWriter<W>,
    sd: &StoreDir,
    minor: u8,
    r: &BuildResult,
) -> OpResult<()> {
    if let Some(t) = &r.target {
        w.write_string(&t.render(sd))?;
    }
    w.write_u64(r.status)?;
    w.write_string(&r.error)?;
    if minor >= 29 {
        w.write_u64(r.times_built)?;
        w.write_bool(r.non_deterministic)?;
        w.write_u64(r.start_time)?;
        w.write_u64(r.stop_time)?;
    }
    if minor >= 37 {
        for t in [r.cpu_user, r.cpu_system] {
            match t {
                Some(us) => {
                    w.write_u64(1)?;
                    w.write_u64(us)?;
                }
                None => w.write_u64(0)?,
            }
        }
    }
    if minor >= 28 {
        w.write_u64(r.realisations.len() as u64)?;
        for (k, v) in &r.realisations {
            w.write_string(k)?;
            w.write_string(v)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use stockade_common::worker::{StderrCode, StderrMsg};

    /// The NAR goes out after everything buffered before it (`STDERR_LAST` above all).
    #[test]
    fn nar_follows_what_is_buffered() {
        let sd = StoreDir::default();
        let path = sd
            .parse("/nix/store/00000000000000000000000000000000-f")
            .unwrap();
        let dir = std::env::temp_dir().join(format!("stockade-reply-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(path.base_name()), b"hello").unwrap();
        let mut w = WireWriter::new(Vec::new());
        StderrMsg::Last.write(&mut w, 34).unwrap();
        let res = Reply::Nar(path).write(ReplyOut {
            w: &mut w,
            sd: &sd,
            minor: 34,
            real_store_dir: dir.to_str().unwrap(),
        });
        std::fs::remove_dir_all(&dir).unwrap();
        res.unwrap();
        let bytes = w.into_inner().unwrap();
        assert_eq!(&bytes[..8], &StderrCode::LAST.to_le_bytes());
        let nar = stockade_common::nar::write_flat_nar(Vec::new(), false, b"hello").unwrap();
        assert_eq!(&bytes[8..], &nar[..]);
    }
}
