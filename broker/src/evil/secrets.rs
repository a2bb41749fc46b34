//! A61: a compromised broker after a secret it is not given, here the daemon's signing key
//! (`secret-key-files`, which only the store-writer reads).
//!
//! `read-secret <path> [<pid>…]` tries the file by its path, and for each `<pid>` (the
//! store-writer's, the master's, the helper's, as the test names them) through that
//! process's view: `/proc/<pid>/root<path>`, every descriptor `/proc/<pid>/fd/<n>` it could
//! hold (0–255, whether or not it is open), `/proc/<pid>/environ` and `/proc/<pid>/mem`.
//! Answers `refused <label>: <errno> | …` when nothing could be opened (one errno list per
//! label), else `SUCCEEDED <label>: <bytes read>`.

use std::collections::BTreeSet;
use std::io::Read;

use nix::errno::Errno;

use super::{verdict, Attempt};

/// Descriptor numbers tried through `/proc/<pid>/fd`.
const FDS: u32 = 256;

pub fn read_secret(args: &str) -> String {
    let mut words = args.split(' ');
    let Some(path) = words.next().filter(|p| p.starts_with('/')) else {
        return "bad argument: an absolute path first".into();
    };
    let mut parts: Vec<(String, Attempt)> = vec![("path".into(), read(path))];
    for pid in words.filter_map(|w| w.parse::<u32>().ok()) {
        parts.push((
            format!("root-{pid}"),
            read(&format!("/proc/{pid}/root{path}")),
        ));
        let fds = (0..FDS).map(|n| read(&format!("/proc/{pid}/fd/{n}")));
        parts.push((format!("fd-{pid}"), any_of(fds)));
        for what in ["environ", "mem"] {
            parts.push((
                format!("{what}-{pid}"),
                read(&format!("/proc/{pid}/{what}")),
            ));
        }
    }
    let parts: Vec<(&str, Attempt)> = parts.iter().map(|(l, a)| (l.as_str(), a.clone())).collect();
    verdict(&parts)
}

/// Opens and reads `path`: `Ok` (opening is enough) saying how many bytes came, else the
/// errno.
fn read(path: &str) -> Attempt {
    let errno = |e: std::io::Error| format!("{:?}", Errno::from_raw(e.raw_os_error().unwrap_or(0)));
    let mut file = std::fs::File::open(path).map_err(errno)?;
    let mut bytes = Vec::new();
    match file.read_to_end(&mut bytes) {
        Ok(n) => Ok(format!("{path}: read {n} bytes")),
        Err(e) => Ok(format!("{path}: opened, read failed: {}", errno(e))),
    }
}

/// The first success of `attempts`, else the distinct errors.
fn any_of(attempts: impl Iterator<Item = Attempt>) -> Attempt {
    let mut errors = BTreeSet::new();
    for a in attempts {
        match a {
            Ok(what) => return Ok(what),
            Err(e) => {
                errors.insert(e);
            }
        }
    }
    Err(errors.into_iter().collect::<Vec<_>>().join(","))
}
