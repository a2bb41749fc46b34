//! What the helper's own binary needs to run somewhere else: the executable, its ELF
//! interpreter, and the shared libraries mapped into this process. A builtin builder that
//! runs in the sandbox (`builtin:fetchurl`) is this binary exec'd there, so these files are
//! bound read-only into a root that otherwise holds only the input closure; the loader finds
//! the libraries through `LD_LIBRARY_PATH` (there is no `ld.so.cache` in the sandbox).
//!
//! Computed once: the mappings are read before any build, while they are exactly what the
//! loader put there at exec.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The helper's binary and the files it needs, as host paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfImage {
    pub exe: PathBuf,
    /// The ELF interpreter as the binary names it (`/lib64/ld-linux-x86-64.so.2`), which may
    /// be a symlink on the host; `None` for a static binary.
    pub interpreter: Option<PathBuf>,
    /// Every other regular file mapped into this process (shared libraries), by real path.
    pub libraries: Vec<PathBuf>,
    /// The names the loader looks libraries up by (`liblzma.so.5`), symlinks beside the real
    /// files (`liblzma.so.5.4.1`): (name, real file).
    pub aliases: Vec<(PathBuf, PathBuf)>,
}

impl SelfImage {
    /// Every file to make visible, as (path in the sandbox, file on the host).
    pub fn files(&self) -> Vec<(PathBuf, PathBuf)> {
        let mut all = vec![(self.exe.clone(), self.exe.clone())];
        all.extend(self.interpreter.iter().map(|i| (i.clone(), i.clone())));
        all.extend(self.libraries.iter().map(|l| (l.clone(), l.clone())));
        all.extend(self.aliases.iter().cloned());
        all
    }

    /// `LD_LIBRARY_PATH` for the binary in a root without a loader cache: the libraries'
    /// directories.
    pub fn library_path(&self) -> OsString {
        let dirs: BTreeSet<&Path> = self.libraries.iter().filter_map(|l| l.parent()).collect();
        let joined: Vec<&str> = dirs.iter().filter_map(|d| d.to_str()).collect();
        OsString::from(joined.join(":"))
    }
}

/// The helper's image, read once.
pub fn self_image() -> Result<&'static SelfImage, String> {
    static IMAGE: OnceLock<Result<SelfImage, String>> = OnceLock::new();
    IMAGE
        .get_or_init(|| read_self_image().map_err(|e| format!("the helper's own binary: {e}")))
        .as_ref()
        .map_err(Clone::clone)
}

fn read_self_image() -> io::Result<SelfImage> {
    let exe = fs::read_link("/proc/self/exe")?;
    if exe.to_string_lossy().ends_with(" (deleted)") || !exe.is_absolute() {
        return Err(io::Error::other(format!(
            "'{}' has been replaced since the helper started",
            exe.display()
        )));
    }
    let mut head = Vec::new();
    fs::File::open("/proc/self/exe")?
        .take(64 * 1024)
        .read_to_end(&mut head)?;
    let interpreter = elf_interpreter(&head).map(PathBuf::from);
    let maps = fs::read("/proc/self/maps")?;
    let interp_real = interpreter.as_ref().and_then(|i| fs::canonicalize(i).ok());
    let libraries: Vec<PathBuf> = mapped_files(&maps)
        .into_iter()
        .filter(|p| *p != exe && Some(p) != interp_real.as_ref())
        .filter(|p| fs::metadata(p).map(|m| m.is_file()).unwrap_or(false))
        .collect();
    let aliases = libraries.iter().flat_map(|l| aliases_of(l)).collect();
    Ok(SelfImage {
        exe,
        interpreter,
        libraries,
        aliases,
    })
}

/// Symlinks beside `lib` that name it by a prefix of its name (`libx.so.5` for
/// `libx.so.5.4.1`), as sonames do.
fn aliases_of(lib: &Path) -> Vec<(PathBuf, PathBuf)> {
    let (Some(dir), Some(name)) = (lib.parent(), lib.file_name()) else {
        return Vec::new();
    };
    let name = name.as_encoded_bytes();
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| {
            let n = e.file_name();
            let n = n.as_encoded_bytes();
            n.len() < name.len() && name.starts_with(n) && n.windows(3).any(|w| w == b".so")
        })
        .filter(|e| e.file_type().map(|t| t.is_symlink()).unwrap_or(false))
        .filter(|e| fs::canonicalize(e.path()).ok().as_deref() == Some(lib))
        .map(|e| (e.path(), lib.to_path_buf()))
        .collect()
}

/// The distinct absolute paths of file mappings in a `/proc/<pid>/maps` text (deleted files
/// and pseudo-files such as `[vdso]` left out).
pub fn mapped_files(maps: &[u8]) -> Vec<PathBuf> {
    let mut seen = BTreeSet::new();
    for line in maps.split(|&b| b == b'\n') {
        // address perms offset dev inode, then the path (which may contain spaces).
        let mut rest = line;
        for _ in 0..5 {
            let Some(at) = rest.iter().position(|&b| b == b' ') else {
                rest = &[];
                break;
            };
            rest = &rest[at + 1..];
            while rest.first() == Some(&b' ') {
                rest = &rest[1..];
            }
        }
        if rest.first() != Some(&b'/') || rest.ends_with(b" (deleted)") {
            continue;
        }
        seen.insert(PathBuf::from(OsString::from_vec(rest.to_vec())));
    }
    seen.into_iter().collect()
}

/// The `PT_INTERP` path of a little-endian 64-bit ELF image whose program headers lie in
/// `head`; `None` for anything else (a static binary has none).
pub fn elf_interpreter(head: &[u8]) -> Option<String> {
    let u16_at = |o: usize| -> Option<u16> {
        Some(u16::from_le_bytes(head.get(o..o + 2)?.try_into().ok()?))
    };
    let u32_at = |o: usize| -> Option<u32> {
        Some(u32::from_le_bytes(head.get(o..o + 4)?.try_into().ok()?))
    };
    let u64_at = |o: usize| -> Option<usize> {
        usize::try_from(u64::from_le_bytes(head.get(o..o + 8)?.try_into().ok()?)).ok()
    };
    // ELFCLASS64, ELFDATA2LSB.
    if head.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let (phoff, phentsize, phnum) = (u64_at(32)?, usize::from(u16_at(54)?), u16_at(56)?);
    for i in 0..usize::from(phnum) {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        const PT_INTERP: u32 = 3;
        if u32_at(ph)? != PT_INTERP {
            continue;
        }
        let (off, size) = (u64_at(ph + 8)?, u64_at(ph + 32)?);
        let raw = head.get(off..off.checked_add(size)?)?;
        let path = raw.split(|&b| b == 0).next()?;
        return String::from_utf8(path.to_vec())
            .ok()
            .filter(|p| p.starts_with('/'));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines_give_their_files() {
        let maps = b"55d0-55d1 r--p 00000000 08:01 123  /usr/bin/stockade-builder-helper\n\
            7f00-7f01 r-xp 00001000 08:01 456                      /usr/lib/x86_64-linux-gnu/libc.so.6\n\
            7f02-7f03 rw-p 00000000 00:00 0 \n\
            7f04-7f05 r--p 00000000 00:01 9 /memfd:log (deleted)\n\
            7f06-7f07 r--p 00000000 08:01 457 /opt/a dir/libx.so\n\
            7ffd-7ffe r-xp 00000000 00:00 0                          [vdso]\n";
        assert_eq!(
            mapped_files(maps),
            vec![
                PathBuf::from("/opt/a dir/libx.so"),
                PathBuf::from("/usr/bin/stockade-builder-helper"),
                PathBuf::from("/usr/lib/x86_64-linux-gnu/libc.so.6"),
            ]
        );
    }

    #[test]
    fn this_binary_runs_where_its_files_are() {
        let image = read_self_image().expect("own image");
        assert!(image.exe.is_absolute());
        // A test binary of this crate is dynamic on glibc targets: its loader and libc are
        // among the files.
        if cfg!(all(target_env = "gnu", not(target_feature = "crt-static"))) {
            let interp = image.interpreter.as_ref().expect("PT_INTERP");
            assert!(interp.exists(), "{}", interp.display());
            assert!(
                image
                    .libraries
                    .iter()
                    .any(|l| l.to_string_lossy().contains("libc.so")),
                "{image:?}"
            );
            assert!(!image.library_path().is_empty());
        }
        assert_eq!(elf_interpreter(b"#!/bin/sh\n"), None);
    }
}
