//! File-system helpers: the host-/nix fingerprint and robust removal of throw-away trees.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// A digest of every entry under `root` (path, type and mode, size, mtime to the nanosecond,
/// symlink target), not following symlinks. Equal fingerprints before and after a test mean the
/// test did not create, delete, resize, chmod or touch anything there. Returns "absent" when
/// `root` does not exist.
pub fn tree_fingerprint(root: &Path) -> io::Result<String> {
    let meta = match fs::symlink_metadata(root) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok("absent".into()),
        Err(e) => return Err(e),
    };
    let mut lines = Vec::new();
    walk(root, &meta, &mut lines)?;
    lines.sort();
    let mut h = Sha256::new();
    for l in &lines {
        h.update(l.as_bytes());
        h.update(b"\n");
    }
    Ok(format!("{:x} ({} entries)", h.finalize(), lines.len()))
}

fn walk(path: &Path, meta: &fs::Metadata, out: &mut Vec<String>) -> io::Result<()> {
    let target = if meta.file_type().is_symlink() {
        fs::read_link(path)?.to_string_lossy().into_owned()
    } else {
        String::new()
    };
    out.push(format!(
        "{} {:o} {} {}.{:09} {}:{} {}",
        path.display(),
        meta.mode(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.uid(),
        meta.gid(),
        target
    ));
    if meta.is_dir() {
        for entry in fs::read_dir(path)? {
            let entry = entry?;
            let p = entry.path();
            let m = fs::symlink_metadata(&p)?;
            walk(&p, &m, out)?;
        }
    }
    Ok(())
}

/// The fingerprint of the host's real `/nix`.
pub fn host_nix_fingerprint() -> io::Result<String> {
    tree_fingerprint(Path::new("/nix"))
}

/// Removes a tree that may contain read-only directories (store paths are r-x), making
/// directories writable as needed. Does not follow symlinks.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(_) => {}
    }
    make_dirs_writable(path)?;
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn make_dirs_writable(path: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    if !meta.is_dir() {
        return Ok(());
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o700 != 0o700 {
        fs::set_permissions(path, fs::Permissions::from_mode(mode | 0o700))?;
    }
    for entry in fs::read_dir(path)? {
        make_dirs_writable(&entry?.path())?;
    }
    Ok(())
}

/// Creates `path` (and parents) and sets its mode.
pub(crate) fn mkdir_mode(path: &Path, mode: u32) -> io::Result<PathBuf> {
    fs::create_dir_all(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(path.to_path_buf())
}

/// The last `max_lines` lines of a text file, for error messages.
pub(crate) fn tail(path: &Path, max_lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(max_lines);
            lines.get(start..).unwrap_or(&[]).join("\n")
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}
