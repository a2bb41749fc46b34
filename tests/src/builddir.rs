//! Helpers for the build-directory attacks (tests/tests/build_dir_attacks.rs,
//! build_keep_failed.rs): the builds directory of an instance, the build uid the audit log
//! names, processes and files of a uid, and the static swapper (tests/probe/swapper.c).

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::Daemon;

/// Where the daemon makes build directories, as it names it.
pub const BUILDS_DIR: &str = "/nix/var/nix/builds";

/// Puts the static swapper into the store as `swapper/bin/swapper`; returns its store path.
pub fn add_swapper(d: &Daemon) -> String {
    let dir = d.work_dir().join("swapper-src/swapper/bin");
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/probe/swapper.c");
    let st = Command::new("cc")
        .args(["-static", "-O2", "-o"])
        .arg(dir.join("swapper"))
        .arg(src)
        .status()
        .expect("cc (libc6-dev)");
    assert!(st.success(), "cc -static failed");
    let top = d.work_dir().join("swapper-src/swapper");
    d.run_ok([
        OsStr::new("nix-store"),
        OsStr::new("--add"),
        top.as_os_str(),
    ])
}

/// A derivation run by busybox's `sh -c script` with busybox's `bin` on `PATH` and `extra`
/// attributes (Nix text, e.g. `SW = builtins.storePath "…";`).
pub fn expr(bb: &str, name: &str, script: &str, extra: &str) -> String {
    format!(
        "let bb = builtins.storePath \"{bb}\"; in derivation {{ name = \"{name}\"; \
         system = builtins.currentSystem; builder = \"${{bb}}/bin/sh\"; \
         PATH = \"${{bb}}/bin\"; args = [ \"-c\" {script} ]; {extra} }}",
        script = crate::nix_string(script)
    )
}

/// The build uid of the last build of a derivation named `name`, from its `build-start`
/// audit line.
pub fn build_uid(d: &Daemon, name: &str) -> u32 {
    let log = d
        .wait_for_log(Duration::from_secs(30), |l| {
            l.lines()
                .any(|l| l.contains("build-start") && l.contains(name))
        })
        .unwrap_or_else(|| panic!("no build-start line for {name}:\n{}", d.log()));
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("build-start") && l.contains(name))
        .unwrap_or_default();
    let at = line
        .find("build-uid")
        .expect("build-uid in the build-start line")
        + 9;
    let digits: String = line[at..]
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(char::is_ascii_digit)
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no uid in {line}"))
}

/// Every process whose real uid is `uid`.
pub fn pids_of_uid(uid: u32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let status = fs::read_to_string(e.path().join("status")).unwrap_or_default();
        let real = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|u| u.parse::<u32>().ok());
        if real == Some(uid) {
            out.push(pid);
        }
    }
    out
}

/// The host path of the first entry of `dir` whose name starts with `prefix` and below which
/// `rel` exists, once one does (polled: a file appearing is the signal), or a panic after a
/// minute.
pub fn wait_for_entry(dir: &Path, prefix: &str, rel: &str) -> PathBuf {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for e in fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if e.file_name().to_string_lossy().starts_with(prefix) && p.join(rel).exists() {
                return p;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no {prefix}*/{rel} in {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Entries below `root` (not following symlinks, not crossing into `skip`, at most `depth`
/// levels down) owned by `uid`.
pub fn owned_by(uid: u32, root: &Path, skip: &Path, depth: usize) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if root.starts_with(skip) {
        return out;
    }
    let Ok(md) = fs::symlink_metadata(root) else {
        return out;
    };
    if md.uid() == uid {
        out.push(root.to_path_buf());
    }
    if md.is_dir() && depth > 0 {
        for e in fs::read_dir(root).into_iter().flatten().flatten() {
            out.extend(owned_by(uid, &e.path(), skip, depth - 1));
        }
    }
    out
}
