//! A build's directories on the host, as Nix 2.26 lays them out:
//! `<builds dir>/nix-build-<drv name>-<n>/` (`0700`, the helper's), holding `build/` (`0700`,
//! the build uid's; `/build` inside) and `store/`, the staging directory the builder sees as
//! the store directory, where its outputs are left for the store-writer.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The directories of one build; removed when dropped unless [`BuildDir::keep`] was called.
#[derive(Debug)]
pub struct BuildDir {
    top: PathBuf,
    armed: bool,
    /// The build user, who owns `build/` and `store/`.
    uid: u32,
}

/// The mode of `nix-build-<name>-<n>`: only the helper may pass (V3: a builder that opens its
/// own directory to everyone opens it to nobody).
const TOP_MODE: u32 = if cfg!(feature = "without-private-build-top") {
    0o755
} else {
    0o700
};

/// What failed while making or filling the directories.
#[derive(Debug, thiserror::Error)]
#[error("{what} '{}': {source}", path.display())]
pub struct DirError {
    pub what: &'static str,
    pub path: PathBuf,
    pub source: io::Error,
}

fn err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> DirError + 'a {
    move |source| DirError {
        what,
        path: path.to_path_buf(),
        source,
    }
}

impl BuildDir {
    /// Makes the first free `nix-build-<drv_name>-<n>` in `builds_dir` (which the helper owns
    /// and nobody else may write; made `0700` if missing) with `build/` and `store/` owned by
    /// `uid:gid`. `mkdir` never follows a symlink planted at the name.
    pub fn create(builds_dir: &Path, drv_name: &str, uid: u32, gid: u32) -> Result<Self, DirError> {
        match fs::DirBuilder::new().mode(0o700).create(builds_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(err("creating the builds directory", builds_dir)(e)),
        }
        let mut n = 0u32;
        let top = loop {
            let top = builds_dir.join(format!("nix-build-{drv_name}-{n}"));
            match fs::DirBuilder::new().mode(TOP_MODE).create(&top) {
                Ok(()) => break top,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 100_000 => n += 1,
                Err(e) => return Err(err("creating the build directory", &top)(e)),
            }
        };
        let dir = BuildDir {
            top,
            armed: true,
            uid,
        };
        fs::set_permissions(&dir.top, fs::Permissions::from_mode(TOP_MODE))
            .map_err(err("setting the mode of", &dir.top))?;
        for (sub, mode) in [(dir.build(), 0o700), (dir.staging(), 0o755)] {
            fs::DirBuilder::new()
                .mode(mode)
                .create(&sub)
                .map_err(err("creating", &sub))?;
            fs::set_permissions(&sub, fs::Permissions::from_mode(mode))
                .map_err(err("setting the mode of", &sub))?;
            std::os::unix::fs::lchown(&sub, Some(uid), Some(gid))
                .map_err(err("handing to the build user", &sub))?;
        }
        Ok(dir)
    }

    /// `nix-build-<drv name>-<n>`.
    pub fn top(&self) -> &Path {
        &self.top
    }

    /// The build directory (`/build` inside).
    pub fn build(&self) -> PathBuf {
        self.top.join("build")
    }

    /// The staging directory (the store directory inside).
    pub fn staging(&self) -> PathBuf {
        self.top.join("store")
    }

    /// Writes a new file (never through a symlink, never over an existing one) into the build
    /// directory, owned by `uid:gid`, as Nix writes `passAsFile` files (`0644`).
    pub fn write_file(
        &self,
        name: &str,
        contents: &[u8],
        uid: u32,
        gid: u32,
    ) -> Result<(), DirError> {
        let path = self.build().join(name);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(err("creating", &path))?;
        f.write_all(contents).map_err(err("writing", &path))?;
        std::os::unix::fs::fchown(&f, Some(uid), Some(gid))
            .map_err(err("handing to the build user", &path))
    }

    /// Keeps the build directory (`keep-failed`) and returns it; the staging directory goes.
    /// Every process of the build must be gone. As Nix does, the kept directory becomes
    /// readable by others (`0755`), so the user who asked can look into it: the build
    /// directory is taken back from the build user first (its owner alone may change its
    /// mode), its contents keep their owner but lose group and other write bits ([`keep`]),
    /// so nobody else can change them (A55). Nothing is handed to the client (V14). `None`
    /// (and the directory removed) when it cannot be made read-only.
    ///
    /// [`keep`]: super::keep
    pub fn keep(mut self) -> Option<PathBuf> {
        remove_tree(&self.staging());
        let build = self.build();
        let me = nix::unistd::geteuid().as_raw();
        let owners = super::keep::Owners {
            build_uid: self.uid,
            helper_uid: me,
        };
        // The top directory is the helper's own (0700): nobody can swap `build` meanwhile.
        let f = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(&build)
            .ok()?;
        std::os::unix::fs::fchown(&f, Some(me), None).ok()?;
        let fd = std::os::fd::OwnedFd::from(f);
        #[cfg(feature = "without-nofollow-keep")]
        let sealed: Result<(), nix::errno::Errno> = {
            let _ = &fd;
            super::keep::seal_by_path(&build, owners, 0);
            Ok(())
        };
        #[cfg(not(feature = "without-nofollow-keep"))]
        let sealed = if cfg!(feature = "without-read-only-kept-dir") {
            Ok(())
        } else {
            super::keep::seal(&fd, owners)
        };
        if let Err(e) = sealed {
            log::warn!("not keeping {}: {e}", build.display());
            return None;
        }
        for d in [&self.top, &build] {
            let _ = fs::set_permissions(d, fs::Permissions::from_mode(0o755));
        }
        self.armed = false;
        Some(build)
    }

    /// Removes the build directory, keeping the staging directory (after a success).
    pub fn remove_build(&self) {
        remove_tree(&self.build());
    }
}

impl Drop for BuildDir {
    fn drop(&mut self) {
        if self.armed {
            remove_tree(&self.top);
        }
    }
}

/// Removes a tree the build user may have shaped (V5). `remove_dir_all` works from directory
/// descriptors (`openat` with `O_NOFOLLOW`, `unlinkat`), so a directory swapped for a symlink
/// midway is removed as a link, never followed.
fn remove_tree(path: &Path) {
    if cfg!(feature = "without-fd-delete") {
        delete_by_path(path);
    } else {
        let _ = fs::remove_dir_all(path);
    }
}

/// The defence off (`without-fd-delete`): Nix's old `deletePath`, by name: `lstat`, then
/// list and recurse by path, so a directory swapped for a symlink after the `lstat` is
/// listed through the link. Only for showing V5's test fails.
fn delete_by_path(path: &Path) {
    let Ok(md) = fs::symlink_metadata(path) else {
        return;
    };
    if md.is_dir() {
        if let Ok(entries) = fs::read_dir(path) {
            for e in entries.flatten() {
                delete_by_path(&e.path());
            }
        }
        let _ = fs::remove_dir(path);
    } else {
        let _ = fs::remove_file(path);
    }
}
