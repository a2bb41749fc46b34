//! What the master decides for builds: the builder-helper's configuration, its builds
//! directory, and the build uids it hands out on `NeedUid`.
//!
//! Build uids, as root: the members of `build-users-group` (each with the group's gid) when
//! that group exists and has members, as nix-daemon builds; otherwise one uid per build from
//! `build-uid-range` (gid = uid), like Nix's `auto-allocate-uids`. Either way they come from
//! a [`UidPool`] with its own lock directory, so two masters never share one and a uid is
//! reused only once no process runs under it. Started by an ordinary user, the daemon builds
//! as itself.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use stockade_common::conf::SandboxMode;
use stockade_common::ipc::builder::{BuilderConfig, SandboxSetting};

use crate::daemon::Ctx;
use crate::error::{Error, Result};
use crate::uids::{UidPool, BUILD_LOCK_DIR};

/// The helper's configuration from nix.conf and the paths.
pub fn builder_config(ctx: &Ctx) -> BuilderConfig {
    let s = &ctx.cfg.settings;
    let store_dir = ctx.paths.store_dir.to_string_lossy().into_owned();
    let secs = |v: i64| u64::try_from(v).unwrap_or(0);
    BuilderConfig {
        real_store_dir: store_dir.clone(),
        store_dir,
        state_dir: ctx.paths.state_dir.to_string_lossy().into_owned(),
        // Nix 2.30's default: on the store's filesystem, so outputs are moved in.
        builds_dir: ctx
            .paths
            .state_dir
            .join("builds")
            .to_string_lossy()
            .into_owned(),
        sandbox: match s.sandbox {
            SandboxMode::Enabled => SandboxSetting::Enabled,
            SandboxMode::Relaxed => SandboxSetting::Relaxed,
            SandboxMode::Disabled => SandboxSetting::Disabled,
        },
        sandbox_paths: s.sandbox_paths.iter().cloned().collect(),
        sandbox_build_dir: s.sandbox_build_dir.clone(),
        max_jobs: ctx.cfg.max_jobs(),
        max_builds_per_uid: ctx.cfg.max_builds_per_uid(),
        cores: s.cores,
        max_silent_time: secs(s.max_silent_time),
        timeout: secs(s.timeout),
        max_build_log_size: s.max_build_log_size,
        keep_failed: s.keep_failed,
        system: s.system.clone(),
        extra_platforms: s.extra_platforms.iter().cloned().collect(),
        system_features: s.system_features.iter().cloned().collect(),
        post_build_hook: Some(s.post_build_hook.clone()).filter(|h| !h.is_empty()),
        allow_new_privileges: s.allow_new_privileges,
        filter_syscalls: s.filter_syscalls,
        as_root: ctx.as_root,
        impure_env: Vec::new(),
        ssl_cert_file: ssl_cert_file(),
        hashed_mirrors: s.hashed_mirrors.clone(),
        repeat: s.repeat,
        enforce_determinism: s.enforce_determinism,
        build_memory_max: ctx.cfg.build_memory_max(),
        build_pids_max: ctx.cfg.stockade.build_pids_max,
        broker_memory_max: ctx.cfg.broker_memory_max(),
        broker_pids_max: ctx.cfg.broker_pids_max(),
        store_floors: ctx.cfg.store_floors(),
        audit_socket: ctx
            .cfg
            .audit_socket()
            .map(|p| p.to_string_lossy().into_owned()),
    }
}

/// Nix's `caFile`: `NIX_SSL_CERT_FILE`, `SSL_CERT_FILE`, else the first CA bundle that exists.
fn ssl_cert_file() -> Option<String> {
    let from_env = ["NIX_SSL_CERT_FILE", "SSL_CERT_FILE"]
        .into_iter()
        .find_map(|v| std::env::var(v).ok().filter(|f| !f.is_empty()));
    from_env.or_else(|| {
        [
            "/etc/ssl/certs/ca-certificates.crt",
            "/nix/var/nix/profiles/default/etc/ssl/certs/ca-bundle.crt",
        ]
        .into_iter()
        .find(|f| Path::new(f).exists())
        .map(String::from)
    })
}

/// Makes the builds directory (if missing) and gives it to the helper's `uid`, `0711`: the
/// sandbox opens the build directories below it with the helper's uid and no capability;
/// others may pass through but not list it, so a directory kept by `keep-failed` (made
/// `0755`) can be read by whoever knows its printed name, while a running build's own
/// directory stays `0700`.
pub fn prepare_builds_dir(dir: &Path, uid: u32) -> Result<()> {
    // V7: nobody but the helper may make entries here. The defence off leaves it as world-
    // writable as `/tmp` (test builds only, to show tests/tests/build_dir_attacks.rs fails).
    let mode = if cfg!(feature = "without-private-builds-dir") {
        0o1777
    } else {
        0o711
    };
    // The state directory normally exists (the store-writer made it); its mode is Nix's.
    if let Some(parent) = dir.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(Error::io(format!("creating {}", parent.display())))?;
    }
    match std::fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::io(format!("creating {}", dir.display()))(e)),
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECTORY | nix::libc::O_NOFOLLOW)
        .open(dir)
        .map_err(Error::io(format!("opening {}", dir.display())))?;
    std::os::unix::fs::fchown(&f, Some(uid), Some(uid)).map_err(Error::io(format!(
        "handing {} to the builder-helper",
        dir.display()
    )))?;
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(Error::io(format!("setting the mode of {}", dir.display())))
}

/// Where build uids come from.
pub enum BuildUids {
    /// A root daemon: the pool, and the build users' group when it is one.
    Pool {
        pool: Box<UidPool>,
        group: Option<u32>,
    },
    /// An ordinary user's daemon: builds run as that user.
    Own,
}

impl BuildUids {
    pub fn new(ctx: &Ctx) -> Result<BuildUids> {
        if !ctx.as_root {
            return Ok(BuildUids::Own);
        }
        let lock_dir = Path::new(BUILD_LOCK_DIR);
        if let Some(name) = ctx.cfg.build_users_group() {
            if let Ok(Some(g)) = nix::unistd::Group::from_name(name) {
                let members: Vec<u32> = g
                    .mem
                    .iter()
                    .filter_map(|m| nix::unistd::User::from_name(m).ok().flatten())
                    .map(|u| u.uid.as_raw())
                    .filter(|&u| u != 0)
                    .collect();
                if !members.is_empty() {
                    return Ok(BuildUids::Pool {
                        pool: Box::new(UidPool::new_in(members, lock_dir)?),
                        group: Some(g.gid.as_raw()),
                    });
                }
            }
        }
        let r = ctx.cfg.stockade.build_uid_range;
        Ok(BuildUids::Pool {
            pool: Box::new(UidPool::new_in((r.first..=r.last).collect(), lock_dir)?),
            group: None,
        })
    }

    /// For the start-up audit line.
    pub fn describe(&self) -> String {
        match self {
            BuildUids::Pool { group: Some(g), .. } => format!("build-users-group (gid {g})"),
            BuildUids::Pool { group: None, .. } => "build-uid-range".into(),
            BuildUids::Own => "daemon's own".into(),
        }
    }

    /// A uid and gid for one build; `own_uid` is the daemon's.
    pub fn allocate(&mut self, own_uid: u32) -> std::result::Result<(u32, u32), String> {
        match self {
            BuildUids::Pool { pool, group } => match pool.allocate() {
                Some(uid) => Ok((uid, group.unwrap_or(uid))),
                None => Err("no free build uid".into()),
            },
            BuildUids::Own => Ok((own_uid, nix::unistd::getegid().as_raw())),
        }
    }

    pub fn release(&mut self, uid: u32) {
        if let BuildUids::Pool { pool, .. } = self {
            pool.release(uid);
        }
    }

    pub fn has_unverified(&self) -> bool {
        matches!(self, BuildUids::Pool { pool, .. } if pool.has_unverified())
    }

    pub fn verify_released(&mut self) {
        if let BuildUids::Pool { pool, .. } = self {
            pool.verify_released();
        }
    }
}
