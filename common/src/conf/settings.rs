//! Every setting Nix 2.8 knows, with its 2.8 name, aliases, type and default on Linux
//! (`libstore/globals.hh`, `filetransfer.hh`, `libexpr/eval.hh`, `libfetchers/fetch-settings.hh`,
//! `libutil/archive.cc`, `logging.hh`, `nix/develop.cc` at tag 2.8.0).
//!
//! All of them are here, client-side ones included, so that a `nix.conf` Nix accepts loads
//! without "unknown setting" noise and `nix show-config` output can be compared line by line.
//! Settings the daemon does not act on are marked "(client)" or "(unused by Stockade)".

use std::collections::BTreeSet;

use super::host::HostFacts;
use super::schema::define_settings;
use super::value::{AccessTokens, Ctx, ExperimentalFeature, MaxJobs, OptionalPath, SandboxMode};

/// The key of cache.nixos.org, trusted by default.
pub const CACHE_NIXOS_ORG_KEY: &str =
    "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";

fn strings<const N: usize>(items: [&str; N]) -> Vec<String> {
    items.into_iter().map(String::from).collect()
}

fn string_set<const N: usize>(items: [&str; N]) -> BTreeSet<String> {
    items.into_iter().map(String::from).collect()
}

define_settings! {
    /// The `nix.conf` settings. Build with [`Settings::defaults`] or [`Settings::load`]; change
    /// by name with [`Settings::set`]. Cloning is cheap enough to give each connection its own
    /// copy for SetOptions overrides.
    pub struct Settings;
    fn defaults(host: &HostFacts, conf_dir: &str);
    private { host: HostFacts = host.clone() }
    settings {
        // --- Who may connect -------------------------------------------------------------
        /// Users (names, `@group`, `*`) allowed to connect.
        allowed_users: Vec<String> = "allowed-users" => strings(["*"]);
        /// Users (names, `@group`, `*`) whose connections are trusted.
        trusted_users: Vec<String> = "trusted-users" => strings(["root"]);
        /// Group whose members are the build users; empty = build as the daemon's user.
        /// Its members may not connect.
        build_users_group: String = "build-users-group" =>
            if host.is_root { "nixbld".into() } else { String::new() };

        // --- Building ------------------------------------------------------------------
        /// Concurrent local builds (`auto` = CPUs); 0 = only remote builds.
        max_jobs: MaxJobs = "max-jobs" | "build-max-jobs" => MaxJobs(1);
        /// `NIX_BUILD_CORES` for builders; 0 = all cores.
        cores: u32 = "cores" | "build-cores" => host.cpus;
        /// Kill a build after this many seconds without output; 0 = never.
        max_silent_time: i64 = "max-silent-time" | "build-max-silent-time" => 0;
        /// Kill a build after this many seconds; 0 = never.
        timeout: i64 = "timeout" | "build-timeout" => 0;
        /// Kill a build whose log exceeds this many bytes; 0 = no limit.
        max_build_log_size: u64 = "max-build-log-size" | "build-max-log-size" => 0;
        /// Lines of log tail shown when a build fails (client).
        log_lines: u64 = "log-lines" => 10;
        /// Keep build directories of failed builds.
        keep_failed: bool = "keep-failed" => false;
        /// Keep building other derivations when one fails.
        keep_going: bool = "keep-going" => false;
        /// Build from source when substitution fails.
        fallback: bool = "fallback" | "build-fallback" => false;
        /// Nix system type of this machine.
        system: String = "system" => host.system.clone();
        /// Other system types this machine can build for.
        extra_platforms: BTreeSet<String> = "extra-platforms" => host.extra_platforms.clone();
        /// Features this machine offers to `requiredSystemFeatures`.
        system_features: BTreeSet<String> = "system-features" => host.system_features.clone();
        /// Remote builders (a spec or `@FILE`).
        builders: String = "builders" => format!("@{conf_dir}/machines");
        /// Remote builders fetch from substituters themselves.
        builders_use_substitutes: bool = "builders-use-substitutes" => false;
        /// Helper for remote builds (unused by Stockade).
        build_hook: OptionalPath = "build-hook" =>
            OptionalPath(Some(format!("{}/nix/build-remote", host.libexec_dir)));
        /// Build each derivation this many extra times and compare.
        repeat: u64 = "repeat" | "build-repeat" => 0;
        /// With `repeat`: fail when outputs differ.
        enforce_determinism: bool = "enforce-determinism" => true;
        /// Report Linux 2.6 from `uname` inside builds.
        impersonate_linux_26: bool = "impersonate-linux-26" | "build-impersonate-linux-26" => false;
        /// Seconds between polls for locks.
        build_poll_interval: u32 = "build-poll-interval" => 5;
        /// Program run before each build to add sandbox paths; empty = none.
        pre_build_hook: String = "pre-build-hook" => String::new();
        /// Program run after each successful build; empty = none.
        post_build_hook: String = "post-build-hook" => String::new();
        /// Program run when a repeated build differs; empty = none.
        diff_hook: OptionalPath = "diff-hook" => OptionalPath(None);
        /// Run `diff-hook`.
        run_diff_hook: bool = "run-diff-hook" => false;

        // --- Sandbox -------------------------------------------------------------------
        /// Build in a sandbox.
        sandbox: SandboxMode = "sandbox" | "build-use-chroot" | "build-use-sandbox" =>
            SandboxMode::Enabled;
        /// Host paths made visible in the sandbox (`PATH`, `TARGET=SOURCE`, `PATH?`).
        sandbox_paths: BTreeSet<String> = "sandbox-paths" | "build-chroot-dirs" | "build-sandbox-paths" =>
            BTreeSet::new();
        /// Build unsandboxed when the kernel cannot sandbox.
        sandbox_fallback: bool = "sandbox-fallback" => true;
        /// The build directory's path inside the sandbox.
        sandbox_build_dir: String = "sandbox-build-dir" => "/build".into();
        /// Size of the sandbox's `/dev/shm`.
        sandbox_dev_shm_size: String = "sandbox-dev-shm-size" => "50%".into();
        /// Prefixes derivations may ask to see with `__impureHostDeps` (Darwin).
        allowed_impure_host_deps: BTreeSet<String> = "allowed-impure-host-deps" => BTreeSet::new();
        /// Install the seccomp filter in builds.
        filter_syscalls: bool = "filter-syscalls" => true;
        /// Let builders gain privileges (setuid) instead of setting `no_new_privs`.
        allow_new_privileges: bool = "allow-new-privileges" => false;
        /// Extended attributes ignored when canonicalising outputs.
        ignored_acls: BTreeSet<String> = "ignored-acls" =>
            string_set(["security.selinux", "system.nfs4_acl"]);

        // --- Substitution and signatures ---------------------------------------------------
        /// Use substituters.
        substitute: bool = "substitute" | "build-use-substitutes" => true;
        /// Binary caches, in order of preference.
        substituters: Vec<String> = "substituters" | "binary-caches" =>
            strings(["https://cache.nixos.org/"]);
        /// Further caches untrusted clients may choose.
        trusted_substituters: BTreeSet<String> = "trusted-substituters" | "trusted-binary-caches" =>
            BTreeSet::new();
        /// Keys whose signatures make paths acceptable.
        trusted_public_keys: Vec<String> = "trusted-public-keys" | "binary-cache-public-keys" =>
            strings([CACHE_NIXOS_ORG_KEY]);
        /// Paths need a trusted signature (or a content address) to be added.
        require_sigs: bool = "require-sigs" => true;
        /// Secret keys that sign locally built paths.
        secret_key_files: Vec<String> = "secret-key-files" => Vec::new();
        /// Credentials for HTTP(S) downloads.
        netrc_file: String = "netrc-file" => format!("{conf_dir}/netrc");
        /// `host=token` pairs for fetchers. Secret: see [`Settings::without_secrets`].
        access_tokens: AccessTokens = "access-tokens" => AccessTokens::default();
        /// Seconds a cached "no such narinfo" stays valid.
        narinfo_cache_negative_ttl: u32 = "narinfo-cache-negative-ttl" => 3600;
        /// Seconds a cached narinfo stays valid.
        narinfo_cache_positive_ttl: u32 = "narinfo-cache-positive-ttl" => 30 * 24 * 3600;
        /// Mirrors that serve files by hash.
        hashed_mirrors: Vec<String> = "hashed-mirrors" => Vec::new();

        // --- HTTP ------------------------------------------------------------------------
        /// Use HTTP/2.
        http2: bool = "http2" => true;
        /// Appended to the User-Agent.
        user_agent_suffix: String = "user-agent-suffix" => String::new();
        /// Parallel connections.
        http_connections: u64 = "http-connections" | "binary-caches-parallel-connections" => 25;
        /// Seconds to wait for a connection; 0 = the library default.
        connect_timeout: u64 = "connect-timeout" => 0;
        /// Seconds without data before a download is abandoned.
        stalled_download_timeout: u64 = "stalled-download-timeout" => 300;
        /// Attempts per download.
        download_attempts: u32 = "download-attempts" => 5;
        /// Seconds downloaded tarballs stay cached (client).
        tarball_ttl: u32 = "tarball-ttl" => 3600;

        // --- Store and garbage collection ------------------------------------------------
        /// The store to use (client; the daemon serves its local store).
        store: String = "store" => host.store_uri.clone();
        /// GC roots keep the outputs of their derivations.
        keep_outputs: bool = "keep-outputs" | "gc-keep-outputs" => false;
        /// GC roots keep their derivations.
        keep_derivations: bool = "keep-derivations" | "gc-keep-derivations" => true;
        /// Profiles keep the derivations of their elements (client).
        keep_env_derivations: bool = "keep-env-derivations" | "env-keep-derivations" => false;
        /// Keep build logs.
        keep_build_log: bool = "keep-build-log" | "build-keep-log" => true;
        /// bzip2 build logs.
        compress_build_log: bool = "compress-build-log" | "build-compress-log" => true;
        /// Bytes reserved so the GC can run on a full disk.
        gc_reserved_space: i64 = "gc-reserved-space" => 8 * 1024 * 1024;
        /// Hard-link identical files when adding paths.
        auto_optimise_store: bool = "auto-optimise-store" => false;
        /// Collect garbage during builds when free space drops below this many bytes; 0 = never.
        min_free: u64 = "min-free" => 0;
        /// ... until this many bytes are free.
        max_free: u64 = "max-free" => u64::MAX;
        /// Seconds between free-space checks.
        min_free_check_interval: u64 = "min-free-check-interval" => 5;
        /// Sync what is written to the store: SQLite's commits, and Stockade's syncer (a
        /// `syncfs` of the store within a second of each registration, see store-writer's
        /// durable.rs). `false`: nothing is synced.
        fsync_metadata: bool = "fsync-metadata" => true;
        /// `sync()` before registering paths.
        sync_before_registering: bool = "sync-before-registering" => false;
        /// SQLite write-ahead logging.
        use_sqlite_wal: bool = "use-sqlite-wal" => !host.wsl1;
        /// NARs larger than this many bytes are spooled to disk.
        nar_buffer_size: u64 = "nar-buffer-size" => 32 * 1024 * 1024;
        /// Accept a store directory reached through a symlink.
        allow_symlinked_store: bool = "allow-symlinked-store" => false;
        /// Darwin case-collision hack for NARs.
        use_case_hack: bool = "use-case-hack" => false;
        /// `fallocate` files of known size while unpacking NARs.
        preallocate_contents: bool = "preallocate-contents" => false;

        // --- Misc ------------------------------------------------------------------------
        /// Enabled experimental features. Clients cannot change the daemon's (ignored in
        /// SetOptions).
        experimental_features: BTreeSet<ExperimentalFeature> = "experimental-features" =>
            BTreeSet::new();
        /// Plugins to load (unused by Stockade, which loads no code from configuration).
        plugin_files: Vec<String> = "plugin-files" => Vec::new();
        /// Print what will be built or fetched (client).
        print_missing: bool = "print-missing" => true;
        /// Stack traces for evaluation errors (client).
        show_trace: bool = "show-trace" => false;

        // --- Evaluation and flakes (client) ----------------------------------------------
        /// `<...>` search path. Nix derives the default from `NIX_PATH` and channel
        /// directories; the daemon never evaluates, so Stockade's default is empty.
        nix_path: Vec<String> = "nix-path" => Vec::new();
        /// (client)
        allow_unsafe_native_code_during_evaluation: bool =
            "allow-unsafe-native-code-during-evaluation" => false;
        /// (client)
        restrict_eval: bool = "restrict-eval" => false;
        /// (client; the `nix` command turns it on for itself)
        pure_eval: bool = "pure-eval" => false;
        /// (client)
        allow_import_from_derivation: bool = "allow-import-from-derivation" => true;
        /// (client)
        allowed_uris: Vec<String> = "allowed-uris" => Vec::new();
        /// (client)
        trace_function_calls: bool = "trace-function-calls" => false;
        /// (client)
        eval_cache: bool = "eval-cache" => true;
        /// (client)
        allow_dirty: bool = "allow-dirty" => true;
        /// (client)
        warn_dirty: bool = "warn-dirty" => true;
        /// (client)
        flake_registry: String = "flake-registry" =>
            "https://github.com/NixOS/flake-registry/raw/master/flake-registry.json".into();
        /// (client)
        use_registries: bool = "use-registries" => true;
        /// (client)
        accept_flake_config: bool = "accept-flake-config" => false;
        /// (client)
        commit_lockfile_summary: String = "commit-lockfile-summary" => String::new();
        /// (client)
        bash_prompt: String = "bash-prompt" => String::new();
        /// (client)
        bash_prompt_suffix: String = "bash-prompt-suffix" => String::new();
    }
}

impl Settings {
    /// The machine facts the defaults were computed from.
    pub fn host(&self) -> &HostFacts {
        &self.host
    }

    /// Whether an experimental feature is on.
    pub fn has_feature(&self, feature: ExperimentalFeature) -> bool {
        self.experimental_features.contains(&feature)
    }

    /// A copy without credentials, for processes that must not hold them (brokers): empties
    /// `access-tokens`. (`netrc-file` and `secret-key-files` are only paths; those processes
    /// cannot read the files.)
    pub fn without_secrets(&self) -> Settings {
        let mut copy = self.clone();
        copy.access_tokens = AccessTokens::default();
        copy
    }

    fn value_ctx(&self) -> Ctx {
        Ctx {
            cpus: self.host.cpus,
        }
    }
}
