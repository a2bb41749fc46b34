//! What a broker may ask in each phase of its session, and which build settings its client's
//! trust lets it choose. [`permitted`] is the one place that decides; trust comes from the
//! master's `NewClient` and is judged by the `policy` crate, never by the broker.

use stockade_common::ipc::builder::{BrokerToBuilder, BuildKind, BuildSettings, BuilderConfig};
use stockade_policy::{
    clamp_cores, filter_override, op_allowed, BuildMode, Op, OverrideDecision, SubstituterPolicy,
};

/// Where a broker's session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    BeforeHello,
    Ready,
}

/// A request's kind (`BrokerToBuilder` is open to new variants; an unknown one is `None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Hello,
    Build(BuildKind),
    Cancel,
}

pub fn kind_of(req: &BrokerToBuilder) -> Option<Kind> {
    match req {
        BrokerToBuilder::Hello { .. } => Some(Kind::Hello),
        BrokerToBuilder::Build { kind, .. } => Some(Kind::Build(*kind)),
        BrokerToBuilder::Cancel { .. } => Some(Kind::Cancel),
        _ => None,
    }
}

/// What to do with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Handle,
    /// Answer the build with this failure (nix-daemon's words), audited.
    Refuse(&'static str),
    /// The broker broke the protocol: `Error`, then the channel closes.
    Violation(&'static str),
}

/// Whether a request of `kind` is permitted in `phase` for a client of this trust.
/// Exhaustive on purpose: a new kind does not compile until every phase decides it.
pub fn permitted(phase: Phase, kind: Kind, trusted: bool) -> Verdict {
    let trust = |op: Op| match op_allowed(op, trusted) {
        Ok(()) => Verdict::Handle,
        Err(d) => Verdict::Refuse(d.0),
    };
    match phase {
        Phase::BeforeHello => match kind {
            Kind::Hello => Verdict::Handle,
            Kind::Build(_) | Kind::Cancel => Verdict::Violation("request before Hello"),
        },
        Phase::Ready => match kind {
            Kind::Hello => Verdict::Violation("second Hello"),
            Kind::Build(BuildKind::Normal) => trust(Op::BuildPaths {
                mode: BuildMode::Normal,
            }),
            Kind::Build(BuildKind::Repair) => trust(Op::BuildPaths {
                mode: BuildMode::Repair,
            }),
            Kind::Build(BuildKind::Check) => trust(Op::BuildPaths {
                mode: BuildMode::Check,
            }),
            Kind::Cancel => Verdict::Handle,
        },
    }
}

/// The settings one build runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Effective {
    pub max_silent_time: u64,
    pub timeout: u64,
    pub max_build_log_size: u64,
    pub keep_failed: bool,
    pub cores: u32,
    /// Extra rounds of each normal build, and whether a difference fails it.
    pub repeat: u64,
    pub enforce_determinism: bool,
    /// A trusted client's `post-build-hook`, in place of the daemon's (`Some("")`: none).
    pub post_build_hook: Option<String>,
    /// Stopped when the store's file system goes below its floors (A43): an untrusted
    /// client's build. A trusted client's may use the room the floors keep.
    pub held_to_floors: bool,
}

impl Effective {
    /// The hook to run once the build's outputs are valid: the client's if it set one, else
    /// the daemon's.
    pub fn hook<'a>(&'a self, daemon: Option<&'a str>) -> Option<&'a str> {
        match self.post_build_hook.as_deref() {
            Some(h) => Some(h).filter(|h| !h.is_empty()),
            None => daemon,
        }
    }
}

/// A limit (0 = none) a client may lower but not raise.
fn lower(daemon: u64, client: u64) -> u64 {
    match (daemon, client) {
        (0, c) => c,
        (d, 0) => d,
        (d, c) => d.min(c),
    }
}

/// The client's settings as its trust allows. A trusted client's stand (nix-daemon applies
/// them). An untrusted client may only lower a limit, never raise it or switch it off, its
/// `cores` are clamped (`policy`), and named settings count as `policy`'s override filter
/// (nix-daemon's) says.
pub fn effective(cfg: &BuilderConfig, s: &BuildSettings, trusted: bool) -> Effective {
    let may = |name: &str| {
        trusted
            || matches!(
                filter_override(name, "", trusted, &SubstituterPolicy::default()),
                OverrideDecision::Apply { .. }
            )
    };
    // Lowering a limit is harmless whoever asks: an untrusted client gets the lower of the
    // two (nix-daemon ignores `max-build-log-size` from it, which only ever raises it).
    let limit = |daemon: u64, client: Option<u64>| match client {
        Some(c) if trusted => c,
        Some(c) => lower(daemon, c),
        None => daemon,
    };
    // `keep-failed` travels in SetOptions' fixed fields, which nix-daemon applies for every
    // client (SECURITY.md A55): the kept directory is the build user's, readable, never
    // handed to the client, and its name is printed only to the client that asked.
    let keep_failed = s.keep_failed.unwrap_or(cfg.keep_failed);
    let cores = match s.cores {
        Some(c) if trusted => c,
        Some(c) => u32::try_from(clamp_cores(u64::from(c), u64::from(cfg.cores))).unwrap_or(1),
        None => cfg.cores,
    };
    Effective {
        max_silent_time: limit(cfg.max_silent_time, s.max_silent_time),
        timeout: limit(cfg.timeout, s.timeout),
        max_build_log_size: limit(cfg.max_build_log_size, s.max_build_log_size),
        keep_failed,
        cores,
        // As nix-daemon 2.8: `repeat` from anyone (it costs no more than asking for the
        // builds again), `enforce-determinism` only from trusted clients.
        repeat: s.repeat.filter(|_| may("repeat")).unwrap_or(cfg.repeat),
        enforce_determinism: s
            .enforce_determinism
            .filter(|_| may("enforce-determinism"))
            .unwrap_or(cfg.enforce_determinism),
        // A54: nix-daemon runs a trusted client's hook (as root; here unprivileged, see
        // `hook`); an untrusted client's is ignored, whatever its broker says.
        post_build_hook: s
            .post_build_hook
            .clone()
            .filter(|_| trusted || cfg!(feature = "without-a54")),
        held_to_floors: !trusted && !cfg!(feature = "without-a43"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_and_trust() {
        assert_eq!(
            permitted(Phase::BeforeHello, Kind::Build(BuildKind::Normal), true),
            Verdict::Violation("request before Hello")
        );
        assert_eq!(
            permitted(Phase::Ready, Kind::Hello, true),
            Verdict::Violation("second Hello")
        );
        assert_eq!(
            permitted(Phase::Ready, Kind::Build(BuildKind::Repair), false),
            Verdict::Refuse("repairing is not allowed because you are not in 'trusted-users'")
        );
        assert_eq!(
            permitted(Phase::Ready, Kind::Build(BuildKind::Repair), true),
            Verdict::Handle
        );
        assert_eq!(
            permitted(Phase::Ready, Kind::Build(BuildKind::Check), false),
            Verdict::Handle
        );
    }

    #[test]
    fn untrusted_clients_only_lower_limits() {
        let cfg = BuilderConfig {
            store_dir: "/nix/store".into(),
            real_store_dir: "/nix/store".into(),
            state_dir: "/nix/var/nix".into(),
            builds_dir: "/nix/var/nix/builds".into(),
            sandbox: stockade_common::ipc::builder::SandboxSetting::Enabled,
            sandbox_paths: vec![],
            sandbox_build_dir: "/build".into(),
            max_jobs: 1,
            max_builds_per_uid: 0,
            cores: 4,
            max_silent_time: 100,
            timeout: 0,
            max_build_log_size: 1000,
            keep_failed: false,
            system: "x86_64-linux".into(),
            extra_platforms: vec![],
            system_features: vec![],
            post_build_hook: None,
            allow_new_privileges: false,
            filter_syscalls: true,
            as_root: true,
            impure_env: vec![],
            ssl_cert_file: None,
            hashed_mirrors: vec![],
            repeat: 0,
            enforce_determinism: true,
            build_memory_max: 0,
            build_pids_max: 0,
            broker_memory_max: 0,
            store_floors: stockade_common::floor::Floors::NONE,
            broker_pids_max: 0,
            audit_socket: None,
        };
        let asked = BuildSettings {
            max_silent_time: Some(0),
            timeout: Some(50),
            max_build_log_size: Some(5000),
            keep_failed: Some(true),
            cores: Some(64),
            repeat: None,
            enforce_determinism: None,
            post_build_hook: Some("/tmp/hook".into()),
        };
        let u = effective(&cfg, &asked, false);
        assert_eq!(
            u,
            Effective {
                max_silent_time: 100,
                timeout: 50,
                max_build_log_size: 1000,
                keep_failed: true,
                cores: 4,
                repeat: 0,
                enforce_determinism: true,
                post_build_hook: None,
                held_to_floors: !cfg!(feature = "without-a43"),
            }
        );
        assert_eq!(u.hook(Some("/daemon")), Some("/daemon"));
        let t = effective(&cfg, &asked, true);
        assert_eq!(t.hook(Some("/daemon")), Some("/tmp/hook"));
        let off = BuildSettings {
            post_build_hook: Some(String::new()),
            ..Default::default()
        };
        assert_eq!(effective(&cfg, &off, true).hook(Some("/daemon")), None);
        assert_eq!(t.max_silent_time, 0);
        assert_eq!(t.max_build_log_size, 5000);
        assert!(t.keep_failed);
        assert_eq!(t.cores, 64);
        assert!(!t.held_to_floors);
        let lower = BuildSettings {
            max_build_log_size: Some(10),
            ..Default::default()
        };
        assert_eq!(effective(&cfg, &lower, false).max_build_log_size, 10);
    }
}
