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
}

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
            match fs::DirBuilder::new().mode(0o700).create(&top) {
                Ok(()) => break top,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 100_000 => n += 1,
                Err(e) => return Err(err("creating the build directory", &top)(e)),
            }
        };
        let dir = BuildDir { top, armed: true };
        fs::set_permissions(&dir.top, fs::Permissions::from_mode(0o700))
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
    /// mode), its contents keep their owner and modes.
    pub fn keep(mut self) -> PathBuf {
        self.armed = false;
        let _ = fs::remove_dir_all(self.staging());
        let build = self.build();
        let me = nix::unistd::geteuid().as_raw();
        let _ = std::os::unix::fs::lchown(&build, Some(me), None);
        for d in [&self.top, &build] {
            let _ = fs::set_permissions(d, fs::Permissions::from_mode(0o755));
        }
        build
    }

    /// Removes the build directory, keeping the staging directory (after a success).
    pub fn remove_build(&self) {
        let _ = fs::remove_dir_all(self.build());
    }
}

impl Drop for BuildDir {
    fn drop(&mut self) {
        if self.armed {
            // remove_dir_all does not follow symlinks (it works on directory descriptors).
            let _ = fs::remove_dir_all(&self.top);
        }
    }
}
