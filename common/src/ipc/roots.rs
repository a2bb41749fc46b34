//! The roots-reader's control channel (master ↔ `stockade-roots-reader`), and the checks every
//! runtime root it reports must pass, in the master that relays it and again in the
//! store-writer that uses it.
//!
//! The roots-reader reads `/proc` with `CAP_SYS_PTRACE` and `CAP_DAC_READ_SEARCH`, which the
//! store-writer must not hold, and answers one question: which `(target, link)` pairs of
//! running processes name paths under the store directory, in the order it found them (the
//! store-writer rebuilds nix-daemon's hash map iteration order from it). An answer may hold
//! more than one message fits, so it travels in chunks of at most [`CHUNK_BYTES`] of strings,
//! the last one marked `last`.
//!
//! bincode numbers variants by position: append new variants at the end.

use serde::{Deserialize, Serialize};

use super::Message;
use crate::lockdown::LockdownOptions;

/// Most pairs one answer may hold (after removing repeated pairs).
pub const MAX_RUNTIME_ROOTS: usize = 1 << 18;
/// Most bytes of strings one answer may hold.
pub const MAX_RUNTIME_ROOT_BYTES: usize = 64 << 20;
/// Longest target or link (`PATH_MAX`); longer targets cannot be store paths Nix would parse.
pub const MAX_ROOT_STRING: usize = 4096;
/// Bytes of strings in one chunk: with the largest pair on top it stays well under the
/// channels' message limit ([`super::DEFAULT_LIMIT`]).
pub const CHUNK_BYTES: usize = 40 << 10;

/// What one pair costs against [`CHUNK_BYTES`] and [`MAX_RUNTIME_ROOT_BYTES`]: its strings
/// and their length prefixes.
pub fn pair_cost(target: &str, link: &str) -> usize {
    target.len() + link.len() + 6
}

/// master → roots-reader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum MasterToRootsReader {
    Hello {
        version: u32,
    },
    /// First message after `Hello`. → `Ready` or `Failed`.
    Start(RootsReaderConfig),
    /// Scan `/proc` now. → `Roots { scan, .. }` chunks up to one with `last`, or `Error`.
    Find {
        scan: u64,
    },
    /// Exit.
    Shutdown,
}

/// What the roots-reader needs: the store directory to filter on and how to lock down.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootsReaderConfig {
    /// The logical store directory (`/nix/store` or `NIX_STORE_DIR`), as processes name it.
    pub store_dir: String,
    pub lockdown: LockdownOptions,
}

/// roots-reader → master.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum RootsReaderToMaster {
    Hello {
        version: u32,
    },
    /// Locked down (`confinement`: the lockdown report's summary) and waiting for `Find`.
    Ready {
        confinement: String,
    },
    /// Start-up failed; the reader exits after sending this.
    Failed {
        reason: String,
    },
    /// Part of the answer to `Find { scan }`: `(target, link)` pairs in the order found.
    Roots {
        scan: u64,
        pairs: Vec<(String, String)>,
        last: bool,
    },
    /// The scan failed (a bound was exceeded); nothing more comes for it.
    Error {
        scan: u64,
        reason: String,
    },
}

no_fds!(MasterToRootsReader, RootsReaderToMaster);

/// Why a reported pair was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PairError {
    #[error("a runtime root of {0} bytes (at most {MAX_ROOT_STRING})")]
    TooLong(usize),
    #[error("a runtime root with a NUL byte")]
    Nul,
    #[error("runtime root target '{0}' is not in the store")]
    NotInStore(String),
    #[error("'{0}' is not a /proc link Nix reads runtime roots from")]
    BadLink(String),
    #[error("more than {MAX_RUNTIME_ROOTS} runtime roots")]
    TooMany,
    #[error("more than {MAX_RUNTIME_ROOT_BYTES} bytes of runtime roots")]
    TooLarge,
}

/// Checks one pair as the roots-reader must report it: bounded strings without NULs, a target
/// under `store_dir`, and a link of one of the forms Nix's `findRuntimeRoots` reads:
/// `/proc/<pid>/{exe,cwd,maps,environ}`, `/proc/<pid>/fd/<n>`, or
/// `/proc/sys/kernel/{modprobe,fbsplash,poweroff_cmd}`. Whether the target names a valid
/// store path is the store-writer's to check.
pub fn check_pair(store_dir: &str, target: &str, link: &str) -> Result<(), PairError> {
    for s in [target, link] {
        if s.len() > MAX_ROOT_STRING {
            return Err(PairError::TooLong(s.len()));
        }
        if s.contains('\0') {
            return Err(PairError::Nul);
        }
    }
    let in_store = target
        .strip_prefix(store_dir)
        .is_some_and(|rest| rest.starts_with('/'));
    if !in_store {
        return Err(PairError::NotInStore(target.to_string()));
    }
    if !proc_link(link) {
        return Err(PairError::BadLink(link.to_string()));
    }
    Ok(())
}

/// Whether `link` is one of the `/proc` names of [`check_pair`].
fn proc_link(link: &str) -> bool {
    const KERNEL: [&str; 3] = [
        "/proc/sys/kernel/modprobe",
        "/proc/sys/kernel/fbsplash",
        "/proc/sys/kernel/poweroff_cmd",
    ];
    if KERNEL.contains(&link) {
        return true;
    }
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let Some((pid, what)) = link
        .strip_prefix("/proc/")
        .and_then(|rest| rest.split_once('/'))
    else {
        return false;
    };
    digits(pid)
        && (matches!(what, "exe" | "cwd" | "maps" | "environ")
            || what.strip_prefix("fd/").is_some_and(digits))
}

/// Running totals of one answer, against [`MAX_RUNTIME_ROOTS`] and [`MAX_RUNTIME_ROOT_BYTES`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub pairs: usize,
    pub bytes: usize,
}

impl Tally {
    /// Checks `pairs` ([`check_pair`]) and adds them; an error refuses the whole answer.
    pub fn add(&mut self, store_dir: &str, pairs: &[(String, String)]) -> Result<(), PairError> {
        for (target, link) in pairs {
            check_pair(store_dir, target, link)?;
            self.pairs += 1;
            self.bytes += pair_cost(target, link);
            if self.pairs > MAX_RUNTIME_ROOTS {
                return Err(PairError::TooMany);
            }
            if self.bytes > MAX_RUNTIME_ROOT_BYTES {
                return Err(PairError::TooLarge);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_are_checked() {
        let s = "/nix/store";
        let ok = |t: &str, l: &str| check_pair(s, t, l).is_ok();
        assert!(ok("/nix/store/abc-x/bin/sh", "/proc/12/exe"));
        assert!(ok("/nix/store/abc-x", "/proc/12/cwd"));
        assert!(ok("/nix/store/abc-x/lib/l.so", "/proc/1/maps"));
        assert!(ok("/nix/store/abc-x", "/proc/99/environ"));
        assert!(ok("/nix/store/abc-x", "/proc/99/fd/3"));
        assert!(ok(
            "/nix/store/abc-x/bin/modprobe\n",
            "/proc/sys/kernel/modprobe"
        ));
        assert!(!ok("/nix/storex/abc", "/proc/1/exe"));
        assert!(!ok("/nix/store", "/proc/1/exe"));
        assert!(!ok("/etc/shadow", "/proc/1/exe"));
        assert!(!ok("/nix/store/abc-x", "/proc/1/root"));
        assert!(!ok("/nix/store/abc-x", "/proc/self/exe"));
        assert!(!ok("/nix/store/abc-x", "/proc/1/fd/x"));
        assert!(!ok("/nix/store/abc-x", "/proc/1/fd/"));
        assert!(!ok("/nix/store/abc-x", "/proc//exe"));
        assert!(!ok("/nix/store/abc-x", "/proc/sys/kernel/hostname"));
        assert!(!ok("/nix/store/abc-x", "a secret"));
        assert!(!ok("/nix/store/a\0b", "/proc/1/exe"));
        let long = format!("/nix/store/{}", "a".repeat(MAX_ROOT_STRING));
        assert_eq!(
            check_pair(s, &long, "/proc/1/exe"),
            Err(PairError::TooLong(long.len()))
        );
    }

    #[test]
    fn an_answer_is_bounded() {
        let mut t = Tally::default();
        let pair = ("/nix/store/abc-x".to_string(), "/proc/1/exe".to_string());
        let many = vec![pair; MAX_RUNTIME_ROOTS];
        t.add("/nix/store", &many).unwrap();
        assert_eq!(t.pairs, MAX_RUNTIME_ROOTS);
        let one = vec![("/nix/store/y".to_string(), "/proc/2/cwd".to_string())];
        assert_eq!(t.add("/nix/store", &one), Err(PairError::TooMany));
    }

    #[test]
    fn a_full_chunk_fits_in_a_message() {
        let big = "x".repeat(MAX_ROOT_STRING - 11);
        let target = format!("/nix/store/{big}");
        let link = format!("/proc/{}/fd/{}", u32::MAX, u32::MAX);
        let mut pairs = Vec::new();
        let mut bytes = 0;
        while bytes + pair_cost(&target, &link) <= CHUNK_BYTES {
            bytes += pair_cost(&target, &link);
            pairs.push((target.clone(), link.clone()));
        }
        // One more, as a chunk may overshoot by one pair.
        pairs.push((target.clone(), link.clone()));
        let msg = RootsReaderToMaster::Roots {
            scan: u64::MAX,
            pairs: pairs.clone(),
            last: true,
        };
        super::super::encode(&msg, super::super::DEFAULT_LIMIT).expect("fits");
        let fwd = super::super::msg::MasterToStoreWriter::RuntimeRoots {
            id: u64::MAX,
            roots: pairs,
            error: None,
            last: true,
        };
        super::super::encode(&fwd, super::super::DEFAULT_LIMIT).expect("fits");
    }
}
