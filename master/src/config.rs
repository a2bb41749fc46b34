//! The daemon's configuration: `$NIX_CONF_DIR/nix.conf` ([`Settings`]) and
//! `$NIX_CONF_DIR/stockade.conf` ([`StockadeSettings`]), then `--option NAME VALUE` in order.
//!
//! `--option` names a setting of either file (nix.conf's first); a name neither knows is a
//! warning (`unknown setting 'NAME'`), as with nix-daemon, and a bad value is an error. Missing
//! files mean defaults, so a fresh machine needs no configuration at all.

use std::path::{Path, PathBuf};

use stockade_common::conf::{
    AutoCount, AutoSize, ExperimentalFeature, Settings, StockadeSettings, UidRange,
};
use stockade_common::lockdown::{ConfinementPolicy, LockdownOptions, SeccompMode};

use crate::error::{Error, Result};

/// Loaded configuration plus what was worth a warning.
#[derive(Debug, Clone)]
pub struct Config {
    pub settings: Settings,
    pub stockade: StockadeSettings,
    /// Human-readable warnings, printed once at start.
    pub warnings: Vec<String>,
}

impl Config {
    /// Read both files from `conf_dir` and apply `options`.
    pub fn load(conf_dir: &Path, options: &[(String, String)]) -> Result<Config> {
        let nix = Settings::load(conf_dir).map_err(|e| Error::Config(e.to_string()))?;
        let stockade =
            StockadeSettings::load(conf_dir).map_err(|e| Error::Config(e.to_string()))?;
        let mut cfg = Config {
            settings: nix.settings,
            stockade: stockade.settings,
            warnings: Vec::new(),
        };
        cfg.warnings
            .extend(nix.warnings.iter().map(ToString::to_string));
        cfg.warnings
            .extend(stockade.warnings.iter().map(ToString::to_string));
        for (name, value) in options {
            cfg.set_option(name, value)?;
        }
        Ok(cfg)
    }

    /// Apply one `--option NAME VALUE`.
    pub fn set_option(&mut self, name: &str, value: &str) -> Result<()> {
        let bad =
            |e: stockade_common::conf::ConfError| Error::Config(format!("--option {name}: {e}"));
        let warnings = if Settings::resolve(name).is_some() {
            self.settings.set(name, value).map_err(bad)?
        } else if StockadeSettings::resolve(name).is_some() {
            self.stockade.set(name, value).map_err(bad)?
        } else {
            self.warnings.push(format!("unknown setting '{name}'"));
            return Ok(());
        };
        self.warnings
            .extend(warnings.iter().map(|w| format!("--option: {w}")));
        Ok(())
    }

    /// Refuse configurations Stockade does not run with.
    pub fn check(&self) -> Result<()> {
        if self.settings.has_feature(ExperimentalFeature::RecursiveNix)
            && !cfg!(feature = "without-v13")
        {
            // V13: recursive Nix gave builders a daemon socket; Stockade has no such broker yet.
            return Err(Error::Config(
                "experimental feature 'recursive-nix' is not supported by Stockade".into(),
            ));
        }
        let st = &self.stockade;
        if st.max_connections > 0 && st.trusted_connections_reserved >= st.max_connections {
            return Err(Error::Config(format!(
                "trusted-connections-reserved ({}) must be less than max-connections ({}): \
                 untrusted users would have no connection at all",
                st.trusted_connections_reserved, st.max_connections
            )));
        }
        Ok(())
    }

    /// `max-builds-per-uid` resolved against `max-jobs` (0: no limit).
    pub fn max_builds_per_uid(&self) -> u32 {
        match self.stockade.max_builds_per_uid {
            AutoCount::Auto => self.max_jobs().div_ceil(2),
            AutoCount::Fixed(n) => n,
        }
    }

    /// `build-memory-max` in bytes (0: no limit); `auto` is the machine's memory divided by
    /// `max-jobs`.
    pub fn build_memory_max(&self) -> u64 {
        match self.stockade.build_memory_max {
            AutoSize::Auto => total_memory().map_or(0, |m| m / u64::from(self.max_jobs().max(1))),
            AutoSize::Fixed(n) => n,
        }
    }

    /// `broker-memory-max` in bytes (0: no limit). A test build with the defence off
    /// (`without-broker-cgroup`) gives brokers no budget at all.
    pub fn broker_memory_max(&self) -> u64 {
        if cfg!(feature = "without-broker-cgroup") {
            return 0;
        }
        self.stockade.broker_memory_max.0
    }

    /// `broker-pids-max` (0: no limit), as [`Config::broker_memory_max`].
    pub fn broker_pids_max(&self) -> u64 {
        if cfg!(feature = "without-broker-cgroup") {
            return 0;
        }
        self.stockade.broker_pids_max
    }

    /// `store-free-space-floor` and `store-free-inodes-floor` (A43), for the store-writer and
    /// the builder-helper, which resolve them against the file system they look at.
    pub fn store_floors(&self) -> stockade_common::floor::Floors {
        stockade_common::floor::Floors {
            space: self.stockade.store_free_space_floor,
            inodes: self.stockade.store_free_inodes_floor,
        }
    }

    /// The idle timeout of a connection (seconds, 0: none).
    pub fn idle_timeout(&self, trusted: bool) -> u64 {
        if trusted {
            self.stockade.trusted_idle_timeout
        } else {
            self.stockade.idle_timeout
        }
    }

    /// `build-users-group`, `None` when empty.
    pub fn build_users_group(&self) -> Option<&str> {
        Some(self.settings.build_users_group.as_str()).filter(|g| !g.is_empty())
    }

    /// The extra audit destination: `audit-socket` unless empty or the syslog socket itself
    /// (its default), which the audit handle always uses.
    pub fn audit_socket(&self) -> Option<PathBuf> {
        let s = self.stockade.audit_socket.as_str();
        if s.is_empty() || s == stockade_common::audit::DEV_LOG {
            None
        } else {
            Some(PathBuf::from(s))
        }
    }

    pub fn broker_uid_range(&self) -> UidRange {
        self.stockade.broker_uid_range
    }

    /// How the store-writer and the brokers lock down: `allow-unconfined`, and the seccomp mode
    /// the command line chose (never the environment, A76).
    pub fn lockdown(&self, seccomp: SeccompMode) -> LockdownOptions {
        LockdownOptions {
            confinement: ConfinementPolicy::from_allow_unconfined(self.stockade.allow_unconfined),
            seccomp,
        }
    }

    /// `trusted-substituters` as a list.
    pub fn trusted_substituters(&self) -> Vec<String> {
        self.settings.trusted_substituters.iter().cloned().collect()
    }

    /// Configured `max-jobs`.
    pub fn max_jobs(&self) -> u32 {
        self.settings.max_jobs.0
    }

    /// The effective security-relevant settings, for the start-up audit line.
    pub fn security_summary(&self) -> Vec<(&'static str, String)> {
        let s = &self.settings;
        let st = &self.stockade;
        let show = |name: &str| s.get(name).unwrap_or_default();
        vec![
            ("allowed-users", show("allowed-users")),
            ("trusted-users", show("trusted-users")),
            ("build-users-group", s.build_users_group.clone()),
            ("require-sigs", show("require-sigs")),
            ("trusted-public-keys", show("trusted-public-keys")),
            ("substituters", show("substituters")),
            ("trusted-substituters", show("trusted-substituters")),
            ("sandbox", show("sandbox")),
            ("max-connections", st.max_connections.to_string()),
            (
                "max-connections-per-uid",
                st.max_connections_per_uid.to_string(),
            ),
            (
                "trusted-connections-reserved",
                st.trusted_connections_reserved.to_string(),
            ),
            ("idle-timeout", st.idle_timeout.to_string()),
            ("trusted-idle-timeout", st.trusted_idle_timeout.to_string()),
            ("max-builds-per-uid", self.max_builds_per_uid().to_string()),
            ("build-memory-max", self.build_memory_max().to_string()),
            ("build-pids-max", st.build_pids_max.to_string()),
            ("broker-memory-max", self.broker_memory_max().to_string()),
            ("broker-pids-max", self.broker_pids_max().to_string()),
            (
                "store-free-space-floor",
                st.get("store-free-space-floor").unwrap_or_default(),
            ),
            (
                "store-free-inodes-floor",
                st.get("store-free-inodes-floor").unwrap_or_default(),
            ),
            (
                "broker-uid-range",
                st.get("broker-uid-range").unwrap_or_default(),
            ),
            (
                "broker-reads-database",
                st.get("broker-reads-database").unwrap_or_default(),
            ),
        ]
    }
}

/// The machine's memory (`MemTotal` of /proc/meminfo), in bytes.
fn total_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf_dir(nix: &str, stockade: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::write(d.path().join("nix.conf"), nix).expect("write");
        std::fs::write(d.path().join("stockade.conf"), stockade).expect("write");
        d
    }

    #[test]
    fn no_files_means_defaults() {
        let d = tempfile::tempdir().expect("tempdir");
        let c = Config::load(d.path(), &[]).expect("load");
        assert_eq!(c.settings.allowed_users, ["*"]);
        assert_eq!(c.settings.trusted_users, ["root"]);
        assert!(c.warnings.is_empty());
        assert!(c.audit_socket().is_none());
    }

    #[test]
    fn options_reach_both_files_and_unknown_warns() {
        let d = conf_dir(
            "trusted-users = root alice\nbuild-users-group =\n",
            "max-connections = 9\n",
        );
        let opts = vec![
            ("allowed-users".to_string(), "alice @dev".to_string()),
            ("max-connections-per-uid".to_string(), "3".to_string()),
            ("no-such-setting".to_string(), "1".to_string()),
        ];
        let c = Config::load(d.path(), &opts).expect("load");
        assert_eq!(c.settings.trusted_users, ["root", "alice"]);
        assert_eq!(c.settings.allowed_users, ["alice", "@dev"]);
        assert_eq!(c.stockade.max_connections, 9);
        assert_eq!(c.stockade.max_connections_per_uid, 3);
        assert_eq!(c.build_users_group(), None);
        assert_eq!(c.warnings, ["unknown setting 'no-such-setting'"]);
    }

    #[test]
    fn builds_per_uid_follow_max_jobs_unless_set() {
        for (jobs, auto) in [(0, 0), (1, 1), (2, 1), (5, 3), (8, 4)] {
            let d = conf_dir(&format!("max-jobs = {jobs}\n"), "");
            let c = Config::load(d.path(), &[]).expect("load");
            assert_eq!(c.max_builds_per_uid(), auto, "max-jobs {jobs}");
        }
        let d = conf_dir("max-jobs = 8\n", "max-builds-per-uid = 0\n");
        let c = Config::load(d.path(), &[]).expect("load");
        assert_eq!(c.max_builds_per_uid(), 0);
        let opts = vec![("max-builds-per-uid".to_string(), "6".to_string())];
        let c = Config::load(d.path(), &opts).expect("load");
        assert_eq!(c.max_builds_per_uid(), 6);
        assert_eq!(c.idle_timeout(false), 3600);
        assert_eq!(c.idle_timeout(true), 0);
    }

    #[test]
    fn bad_values_and_recursive_nix_are_errors() {
        let d = conf_dir("", "");
        let bad = vec![("cores".to_string(), "many".to_string())];
        assert!(Config::load(d.path(), &bad).is_err());
        let d = conf_dir("experimental-features = recursive-nix\n", "");
        let c = Config::load(d.path(), &[]).expect("load");
        assert!(c.check().is_err());
        let d = conf_dir(
            "",
            "max-connections = 4\ntrusted-connections-reserved = 4\n",
        );
        let c = Config::load(d.path(), &[]).expect("load");
        let e = c.check().expect_err("reserving every slot");
        assert!(
            e.to_string().contains("must be less than max-connections"),
            "{e}"
        );
        let d = conf_dir(
            "",
            "max-connections = 0\ntrusted-connections-reserved = 4\n",
        );
        let c = Config::load(d.path(), &[]).expect("load");
        assert!(
            c.check().is_ok(),
            "no connection limit, nothing to reserve from"
        );
        let d = conf_dir("", "audit-socket = /run/audit.sock\n");
        let c = Config::load(d.path(), &[]).expect("load");
        assert_eq!(c.audit_socket(), Some(PathBuf::from("/run/audit.sock")));
    }

    #[test]
    fn confinement_is_required_unless_allowed() {
        let d = conf_dir("", "");
        let c = Config::load(d.path(), &[]).expect("load");
        assert_eq!(
            c.lockdown(SeccompMode::Enforce),
            LockdownOptions {
                confinement: ConfinementPolicy::Required,
                seccomp: SeccompMode::Enforce
            }
        );
        let d = conf_dir("", "allow-unconfined = true\n");
        let c = Config::load(d.path(), &[]).expect("load");
        let o = c.lockdown(SeccompMode::Log);
        assert_eq!(o.confinement, ConfinementPolicy::AllowUnconfined);
        assert_eq!(o.seccomp, SeccompMode::Log);
        let opts = vec![("allow-unconfined".to_string(), "false".to_string())];
        let c = Config::load(d.path(), &opts).expect("load");
        assert_eq!(
            c.lockdown(SeccompMode::Enforce).confinement,
            ConfinementPolicy::Required
        );
    }
}
