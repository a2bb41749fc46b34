//! The runtime-roots scan: which store paths running processes use, as Nix's
//! `findRuntimeRoots` finds them and in its order: the absolute targets of
//! `/proc/<pid>/{exe,cwd,fd/*}`, the files of `/proc/<pid>/maps` lines (six fields, the last a
//! path), store paths named in `/proc/<pid>/environ`, and the kernel settings
//! `/proc/sys/kernel/{modprobe,fbsplash,poweroff_cmd}`. What the process may not read is
//! skipped, as Nix skips `EACCES`: a process whose `fd` directory or `maps` cannot be read is
//! left there, as in Nix.
//!
//! Only pairs whose target is under the store directory are kept, each once (the first time it
//! is found: inserting it again into Nix's maps and sets changes nothing), in the order found.
//! Nix also puts the other targets into its map before dropping them, which can change the
//! relative order of the runtime roots it reports; that order depends on every process on the
//! machine anyway. Everything is bounded: bytes read per `/proc` file, pairs, bytes of pairs
//! ([`stockade_common::ipc::roots`]).
//!
//! The roots-reader runs this with `CAP_SYS_PTRACE` and `CAP_DAC_READ_SEARCH`; the
//! store-writer runs it itself, without them, when there is no roots-reader to ask.

use std::collections::HashSet;
use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;

use stockade_common::ipc::roots::{
    check_pair, pair_cost, MAX_RUNTIME_ROOTS, MAX_RUNTIME_ROOT_BYTES,
};

/// Bytes read from one `/proc` file (maps and environ of a process can be large).
pub const MAX_PROC_FILE: u64 = 16 << 20;

/// `(target, link)`: a path a process uses, and the `/proc` file that says so.
pub type Pair = (String, String);

/// Why a scan has no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScanError {
    #[error("more than {MAX_RUNTIME_ROOTS} runtime roots")]
    TooMany,
    #[error("more than {MAX_RUNTIME_ROOT_BYTES} bytes of runtime roots")]
    TooLarge,
}

/// The pairs found so far.
struct Found<'a> {
    store_dir: &'a str,
    /// `<store dir>/`.
    prefix: &'a str,
    seen: HashSet<Pair>,
    pairs: Vec<Pair>,
    bytes: usize,
}

impl Found<'_> {
    /// Keeps `(target, link)` if the target is in the store and the pair is one the master
    /// accepts ([`check_pair`]: a longer target cannot be a store path Nix parses).
    fn note(&mut self, target: String, link: &str) -> Result<(), ScanError> {
        if !target.starts_with(self.prefix) || check_pair(self.store_dir, &target, link).is_err() {
            return Ok(());
        }
        let pair = (target, link.to_string());
        if self.seen.contains(&pair) {
            return Ok(());
        }
        self.bytes += pair_cost(&pair.0, &pair.1);
        if self.pairs.len() >= MAX_RUNTIME_ROOTS {
            return Err(ScanError::TooMany);
        }
        if self.bytes > MAX_RUNTIME_ROOT_BYTES {
            return Err(ScanError::TooLarge);
        }
        self.seen.insert(pair.clone());
        self.pairs.push(pair);
        Ok(())
    }

    /// Nix's `readProcLink`: only absolute targets count (not `socket:[…]`, `pipe:[…]`).
    fn proc_link(&mut self, link: &str) -> Result<(), ScanError> {
        match std::fs::read_link(link) {
            Ok(t) if t.as_os_str().as_bytes().first() == Some(&b'/') => {
                self.note(t.to_string_lossy().into_owned(), link)
            }
            _ => Ok(()),
        }
    }
}

/// The runtime roots under `store_dir` (`/nix/store`), in the order found.
pub fn runtime_roots(store_dir: &str) -> Result<Vec<Pair>, ScanError> {
    let prefix = format!("{store_dir}/");
    let mut found = Found {
        store_dir,
        prefix: &prefix,
        seen: HashSet::new(),
        pairs: Vec::new(),
        bytes: 0,
    };
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for ent in dir.flatten() {
            let name = ent.file_name();
            let Some(pid) = name
                .to_str()
                .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            process(&mut found, pid)?;
        }
    }
    for f in [
        "/proc/sys/kernel/modprobe",
        "/proc/sys/kernel/fbsplash",
        "/proc/sys/kernel/poweroff_cmd",
    ] {
        if let Some(text) = read_proc(f) {
            found.note(String::from_utf8_lossy(&text).into_owned(), f)?;
        }
    }
    Ok(found.pairs)
}

/// One process's links, maps and environment.
fn process(found: &mut Found<'_>, pid: &str) -> Result<(), ScanError> {
    let base = format!("/proc/{pid}");
    found.proc_link(&format!("{base}/exe"))?;
    found.proc_link(&format!("{base}/cwd"))?;
    let Ok(fds) = std::fs::read_dir(format!("{base}/fd")) else {
        return Ok(());
    };
    for fd in fds.flatten() {
        let fd_name = fd.file_name();
        if fd_name.as_bytes().first() != Some(&b'.') {
            found.proc_link(&format!("{base}/fd/{}", fd_name.to_string_lossy()))?;
        }
    }
    let maps = format!("{base}/maps");
    let Some(text) = read_proc(&maps) else {
        return Ok(());
    };
    for line in text.split(|b| *b == b'\n') {
        // Nix's `^\s*\S+\s+\S+\s+\S+\s+\S+\s+\S+\s+(/\S+)\s*$`: exactly six fields, the last a
        // path (so not "… (deleted)").
        let line = String::from_utf8_lossy(line);
        let fields: Vec<&str> = line.split_whitespace().collect();
        if let [_, _, _, _, _, file] = fields[..] {
            if file.starts_with('/') {
                found.note(file.to_string(), &maps)?;
            }
        }
    }
    let environ = format!("{base}/environ");
    let Some(text) = read_proc(&environ) else {
        return Ok(());
    };
    for p in store_paths_in(&text, found.prefix.as_bytes()) {
        found.note(p, &environ)?;
    }
    Ok(())
}

fn read_proc(path: &str) -> Option<Vec<u8>> {
    let f = File::open(path).ok()?;
    let mut buf = Vec::new();
    f.take(MAX_PROC_FILE).read_to_end(&mut buf).ok()?;
    Some(buf)
}

/// Every `<store>/<hash-and-name>` in `text` (Nix's `<store>/[0-9a-z]+[0-9a-zA-Z+\-._?=]*`);
/// `prefix` is `<store>/`.
pub fn store_paths_in(text: &[u8], prefix: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(pos) = find(text.get(i..).unwrap_or_default(), prefix) {
        let start = i + pos;
        let mut end = start + prefix.len();
        let first = end;
        while end < text.len() && (text[end].is_ascii_digit() || text[end].is_ascii_lowercase()) {
            end += 1;
        }
        if end > first {
            while end < text.len()
                && (text[end].is_ascii_alphanumeric() || b"+-._?=".contains(&text[end]))
            {
                end += 1;
            }
            out.push(String::from_utf8_lossy(&text[start..end]).into_owned());
        }
        i = end.max(start + 1);
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    #[test]
    fn store_paths_in_text() {
        let env = b"PATH=/s/abc-x/bin:/s/def/bin\0X=/s/\0Y=/s/Upper\0Z=/s/q1-a+b.c?=d!e";
        assert_eq!(
            store_paths_in(env, b"/s/"),
            ["/s/abc-x", "/s/def", "/s/q1-a+b.c?=d"]
        );
        assert!(store_paths_in(b"nothing here", b"/s/").is_empty());
    }

    /// A child of this test (same uid: no capability needed) with its working directory, an
    /// environment variable and an open descriptor in a directory standing in for the store.
    #[test]
    fn a_childs_roots_are_found_in_order() {
        let store = tempfile::tempdir().unwrap();
        let store_dir = store.path().to_str().unwrap().to_string();
        let cwd = store.path().join("aaa-cwd");
        std::fs::create_dir(&cwd).unwrap();
        let held = store.path().join("bbb-held");
        std::fs::write(&held, b"x").unwrap();
        let mut child = Command::new("sleep")
            .arg("30")
            .current_dir(&cwd)
            .env("HOLD", format!("{store_dir}/ccc-env:{store_dir}/ccc-env"))
            .stdin(Stdio::from(File::open(&held).unwrap()))
            .spawn()
            .unwrap();
        let pid = child.id();
        let pairs = runtime_roots(&store_dir);
        let _ = child.kill();
        let _ = child.wait();
        let pairs = pairs.unwrap();
        let mine: Vec<&Pair> = pairs
            .iter()
            .filter(|(_, l)| l.starts_with(&format!("/proc/{pid}/")))
            .collect();
        let want = [
            (
                cwd.to_str().unwrap().to_string(),
                format!("/proc/{pid}/cwd"),
            ),
            (
                held.to_str().unwrap().to_string(),
                format!("/proc/{pid}/fd/0"),
            ),
            (
                format!("{store_dir}/ccc-env"),
                format!("/proc/{pid}/environ"),
            ),
        ];
        assert_eq!(mine, want.iter().collect::<Vec<_>>(), "{pairs:?}");
        for (t, l) in &pairs {
            stockade_common::ipc::roots::check_pair(&store_dir, t, l).unwrap();
        }
    }
}
