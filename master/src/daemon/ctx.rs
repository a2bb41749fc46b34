//! What the master decides at start: the configuration of each child, how it is confined, the
//! start audit line, and the ids taken from just below the broker range.

use super::*;
use crate::roots::RootsReader;
use stockade_common::ipc::msg::GcSettings;
use stockade_common::ipc::roots::RootsReaderConfig;
use stockade_common::lockdown::{LockdownOptions, SeccompMode};

/// Everything decided at start.
pub struct Ctx {
    pub paths: Paths,
    pub cfg: Config,
    pub args: DaemonArgs,
    pub audit: Audit,
    pub as_root: bool,
    pub uid: u32,
    pub launcher: Launcher,
}

impl Ctx {
    /// The store-writer's configuration.
    pub fn store_writer_config(&self) -> StoreWriterConfig {
        let s = &self.cfg.settings;
        let store_dir = self.paths.store_dir.to_string_lossy().into_owned();
        StoreWriterConfig {
            real_store_dir: store_dir.clone(),
            store_dir,
            state_dir: self.paths.state_dir.to_string_lossy().into_owned(),
            log_dir: self.paths.log_dir.to_string_lossy().into_owned(),
            require_sigs: s.require_sigs,
            trusted_public_keys: s.trusted_public_keys.clone(),
            use_sqlite_wal: s.use_sqlite_wal,
            fsync_metadata: s.fsync_metadata,
            compress_build_log: s.compress_build_log,
            as_root: self.as_root,
            audit_socket: self
                .cfg
                .audit_socket()
                .map(|p| p.to_string_lossy().into_owned()),
            db_group: self.broker_db_group(),
            secret_key_files: s.secret_key_files.clone(),
            lockdown: self.lockdown(),
            untrusted_max_nar_size: self.cfg.stockade.untrusted_max_nar_size.0,
            untrusted_bytes_per_hour: self.cfg.stockade.untrusted_bytes_per_hour.0,
            store_floors: self.cfg.store_floors(),
            gc: GcSettings {
                keep_outputs: s.keep_outputs,
                keep_derivations: s.keep_derivations,
                min_free: s.min_free,
                max_free: s.max_free,
                min_free_check_interval: s.min_free_check_interval,
            },
            // Only the daemon's loop relays runtime roots (not `--stdio`, which has no reader).
            runtime_roots_from_master: !self.args.stdio
                && self.launcher.programs.roots_reader.is_some(),
            auto_optimise_store: s.auto_optimise_store,
            untrusted_temp_roots: self.cfg.stockade.untrusted_temp_roots,
            untrusted_temp_roots_per_uid: self.cfg.stockade.untrusted_temp_roots_per_uid,
        }
    }

    /// How the store-writer and brokers lock down (stockade.conf and the command line).
    pub fn lockdown(&self) -> LockdownOptions {
        self.cfg.lockdown(self.args.seccomp_mode())
    }

    /// The supplementary group brokers get to read the database, when they read it.
    pub fn broker_db_group(&self) -> Option<u32> {
        (self.as_root && self.cfg.stockade.broker_reads_database)
            .then(|| db_reader_gid(&self.cfg.broker_uid_range()))
    }

    /// How the store-writer is confined.
    pub fn store_writer_confinement(&self) -> Confinement {
        if self.as_root {
            let id = store_writer_uid(&self.cfg.broker_uid_range());
            Confinement::StoreWriterCaps { uid: id, gid: id }
        } else {
            Confinement::SameUid
        }
    }

    /// Start the store-writer.
    pub fn start_store_writer(&self) -> Result<StoreWriter> {
        StoreWriter::start(
            &self.launcher.programs.store_writer,
            self.store_writer_confinement(),
            self.store_writer_config(),
        )
    }

    /// Start the builder-helper, connected to `writer` by a channel of its own.
    pub fn start_builder(&self, writer: &mut StoreWriter) -> Result<BuilderHelper> {
        let (writer_end, helper_end) = ipc::socketpair().map_err(Error::ipc("socketpair"))?;
        writer.builder_helper(writer_end)?;
        let config = crate::builders::builder_config(self);
        let confinement = if self.as_root {
            let id = builder_uid(&self.cfg.broker_uid_range());
            crate::builders::prepare_builds_dir(Path::new(&config.builds_dir), id)?;
            Confinement::BuilderCaps { uid: id, gid: id }
        } else {
            Confinement::SameUid
        };
        BuilderHelper::start(
            &self.launcher.programs.builder_helper,
            confinement,
            config,
            helper_end.into_fd(),
        )
    }

    /// Start the roots-reader, when it is installed (roots.rs: once, before the master's
    /// lockdown).
    pub fn start_roots_reader(&self) -> Result<Option<RootsReader>> {
        let Some(program) = &self.launcher.programs.roots_reader else {
            log::warn!(
                "no stockade-roots-reader next to the master: runtime roots of other users' \
                 processes are not found"
            );
            return Ok(None);
        };
        let confinement = if self.as_root {
            let id = roots_reader_uid(&self.cfg.broker_uid_range());
            Confinement::RootsReaderCaps { uid: id, gid: id }
        } else {
            Confinement::SameUid
        };
        let config = RootsReaderConfig {
            store_dir: self.paths.store_dir.to_string_lossy().into_owned(),
            lockdown: self.lockdown(),
        };
        RootsReader::start(program, confinement, config).map(Some)
    }

    /// The start-up audit line: effective security settings.
    pub fn audit_start(&self, mode: &str, extra: &[(&str, String)]) {
        let mut fields: Vec<(&str, String)> = vec![
            ("version", env!("CARGO_PKG_VERSION").to_string()),
            ("mode", mode.to_string()),
            ("root", yes_no(self.as_root).to_string()),
            ("store", self.paths.store_dir.to_string_lossy().into_owned()),
            ("state", self.paths.state_dir.to_string_lossy().into_owned()),
            (
                "trust-override",
                format!("{:?}", self.args.trust_override()),
            ),
        ];
        fields.extend(extra.iter().cloned());
        // The services' confinement as decided here; each service's own start line says what
        // the kernel then enforced.
        let lockdown = self.lockdown();
        fields.push(("confinement", lockdown.confinement.audit_word().to_string()));
        let seccomp = match lockdown.seccomp {
            SeccompMode::Enforce => "on",
            SeccompMode::Log => "log",
        };
        fields.push(("seccomp", seccomp.to_string()));
        fields.extend(self.cfg.security_summary());
        let refs: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        self.audit.event_at(
            Facility::Daemon,
            Severity::Notice,
            0,
            self.uid,
            "start",
            &refs,
        );
    }
}

/// The one line a daemon started by an ordinary user prints about what it cannot do.
pub fn unprivileged_notice(uid: u32) -> String {
    format!(
        "running as uid {uid}, not root: the store-writer and brokers share this uid, so uid \
         separation and capability dropping are unavailable (no_new_privs and each process's own \
         seccomp/landlock confinement still apply)"
    )
}

pub fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// The store-writer's uid (and gid) when the daemon runs as root: the one just below the
/// broker range, so it never collides with a broker and needs no passwd entry.
pub fn store_writer_uid(brokers: &stockade_common::conf::UidRange) -> u32 {
    brokers.first.saturating_sub(1).max(1)
}

/// The builder-helper's uid (and gid) when the daemon runs as root: the third just below the
/// broker range (after the store-writer's uid and the database readers' gid).
pub fn builder_uid(brokers: &stockade_common::conf::UidRange) -> u32 {
    brokers.first.saturating_sub(3).max(1)
}

/// The roots-reader's uid (and gid) when the daemon runs as root: the fourth just below the
/// broker range (after the store-writer's uid, the database readers' gid and the
/// builder-helper's uid).
pub fn roots_reader_uid(brokers: &stockade_common::conf::UidRange) -> u32 {
    brokers.first.saturating_sub(4).max(1)
}

/// The group that may enter the database directory: only brokers hold it (A69). Like the
/// store-writer's uid, it is taken from just below the broker range, which must be free.
pub fn db_reader_gid(brokers: &stockade_common::conf::UidRange) -> u32 {
    brokers.first.saturating_sub(2).max(1)
}
