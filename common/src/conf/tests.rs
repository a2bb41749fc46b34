use std::collections::BTreeSet;
use std::path::Path;

use super::*;

fn generic() -> Settings {
    Settings::defaults(&HostFacts::generic(), "/etc/nix")
}

fn mem(files: &[(&str, &str)]) -> MemorySource {
    MemorySource(
        files
            .iter()
            .map(|(p, c)| ((*p).to_owned(), c.as_bytes().to_vec()))
            .collect(),
    )
}

fn kinds(w: Vec<Warning>) -> Vec<WarningKind> {
    w.into_iter().map(|w| w.kind).collect()
}

#[test]
fn names_are_unique_and_aliases_distinct() {
    let mut seen = BTreeSet::new();
    for d in Settings::DEFINITIONS {
        assert!(seen.insert(d.name), "duplicate {}", d.name);
        for a in d.aliases {
            assert!(seen.insert(*a), "duplicate alias {a}");
        }
    }
    // 91 settings, as `nix show-config` lists them for Nix 2.8.0 on Linux.
    assert_eq!(Settings::DEFINITIONS.len(), 91);
    let appendable: Vec<_> = Settings::DEFINITIONS
        .iter()
        .filter(|d| d.appendable)
        .map(|d| d.name)
        .collect();
    assert!(appendable.contains(&"substituters") && appendable.contains(&"access-tokens"));
    assert!(!appendable.contains(&"sandbox") && !appendable.contains(&"builders"));
}

#[test]
fn defaults_as_nix_2_8() {
    let s = generic();
    let get = |n: &str| s.get(n).unwrap();
    assert_eq!(get("substituters"), "https://cache.nixos.org/");
    assert_eq!(get("trusted-public-keys"), CACHE_NIXOS_ORG_KEY);
    assert_eq!(get("trusted-users"), "root");
    assert_eq!(get("allowed-users"), "*");
    assert_eq!(get("build-users-group"), "nixbld");
    assert_eq!(get("builders"), "@/etc/nix/machines");
    assert_eq!(get("netrc-file"), "/etc/nix/netrc");
    assert_eq!(get("sandbox"), "true");
    assert_eq!(get("max-free"), "18446744073709551615");
    assert_eq!(get("gc-reserved-space"), "8388608");
    assert_eq!(get("narinfo-cache-positive-ttl"), "2592000");
    assert_eq!(get("system-features"), "benchmark big-parallel nixos-test");
    assert_eq!(get("ignored-acls"), "security.selinux system.nfs4_acl");
    assert_eq!(get("build-hook"), "/usr/libexec/nix/build-remote");
    assert_eq!(get("diff-hook"), "");
    assert!(s.require_sigs && s.substitute && !s.keep_failed);
    assert_eq!(s.max_jobs, MaxJobs(1));

    let user = HostFacts {
        is_root: false,
        wsl1: true,
        cpus: 12,
        ..HostFacts::generic()
    };
    let s = Settings::defaults(&user, "/x");
    assert_eq!(s.build_users_group, "");
    assert!(!s.use_sqlite_wal);
    assert_eq!(s.cores, 12);
    assert_eq!(s.netrc_file, "/x/netrc");
}

#[test]
fn show_config_is_sorted_name_equals_value() {
    let text = generic().show_config();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), Settings::DEFINITIONS.len());
    let names: Vec<&str> = lines
        .iter()
        .map(|l| l.split(" = ").next().unwrap())
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    assert_eq!(lines.first(), Some(&"accept-flake-config = false"));
    assert!(lines.contains(&"diff-hook = "));
    assert!(text.ends_with("warn-dirty = true\n"));
}

#[test]
fn set_by_name_alias_and_extra() {
    let mut s = generic();
    assert!(s.set("keep-failed", "true").unwrap().is_empty());
    assert!(s.keep_failed);

    let w = s.set("build-max-jobs", "4").unwrap();
    assert_eq!(
        kinds(w),
        vec![WarningKind::DeprecatedAlias {
            alias: "build-max-jobs".into(),
            canonical: "max-jobs"
        }]
    );
    assert_eq!(s.max_jobs, MaxJobs(4));
    assert_eq!(s.get("build-max-jobs").as_deref(), Some("4"));

    s.set("extra-substituters", "https://a/ https://b/")
        .unwrap();
    assert_eq!(
        s.substituters,
        ["https://cache.nixos.org/", "https://a/", "https://b/"]
    );
    let w = s.set("extra-binary-caches", "https://c/").unwrap();
    assert_eq!(w.len(), 1, "alias warning through extra-");
    assert_eq!(s.substituters.len(), 4);
    s.set("substituters", "").unwrap();
    assert!(s.substituters.is_empty());

    s.set("extra-trusted-public-keys", "k:1").unwrap();
    assert_eq!(s.trusted_public_keys, [CACHE_NIXOS_ORG_KEY, "k:1"]);
    s.set("extra-sandbox-paths", "/bin/sh=/x").unwrap();
    s.set("extra-build-chroot-dirs", "/usr").unwrap();
    assert_eq!(s.get("sandbox-paths").unwrap(), "/bin/sh=/x /usr");

    // `extra-platforms` is a setting of its own; `extra-extra-platforms` appends to it.
    s.set("extra-platforms", "aarch64-linux").unwrap();
    s.set("extra-extra-platforms", "riscv64-linux").unwrap();
    assert_eq!(
        s.get("extra-platforms").unwrap(),
        "aarch64-linux riscv64-linux"
    );

    // Not appendable, or unknown: a warning, nothing changes.
    let before = s.clone();
    for name in [
        "extra-sandbox",
        "extra-builders",
        "frobnicate",
        "extra-frob",
        "",
        "extra-",
    ] {
        let w = s.set(name, "x").unwrap();
        assert_eq!(kinds(w), vec![WarningKind::UnknownSetting(name.into())]);
    }
    assert_eq!(s, before);
    assert_eq!(s.get("extra-substituters"), None);
    assert_eq!(s.get("frobnicate"), None);
}

#[test]
fn resolve_names() {
    let r = Settings::resolve("extra-binary-caches").unwrap();
    assert_eq!(
        (r.def.name, r.append, r.alias),
        ("substituters", true, Some("binary-caches"))
    );
    let r = Settings::resolve("timeout").unwrap();
    assert_eq!((r.def.name, r.append, r.alias), ("timeout", false, None));
    assert_eq!(
        Settings::resolve("build-timeout").unwrap().def.name,
        "timeout"
    );
    assert_eq!(Settings::resolve("extra-timeout"), None);
}

#[test]
fn bad_values_name_setting_and_value_and_change_nothing() {
    let mut s = generic();
    let cases = [
        ("cores", "many", "setting 'cores' has invalid value 'many'"),
        (
            "build-cores",
            "-1",
            "setting 'cores' has invalid value '-1'",
        ),
        (
            "keep-going",
            "maybe",
            "Boolean setting 'keep-going' has invalid value 'maybe'",
        ),
        ("sandbox", "yes", "option 'sandbox' has invalid value 'yes'"),
        (
            "max-jobs",
            "lots",
            "configuration setting 'max-jobs' should be 'auto' or an integer",
        ),
        ("diff-hook", "diff.sh", "not an absolute path: 'diff.sh'"),
        (
            "min-free",
            "1G",
            "setting 'min-free' has invalid value '1G'",
        ),
    ];
    for (name, value, message) in cases {
        let before = s.clone();
        let e = s.set(name, value).unwrap_err();
        assert!(e.to_string().starts_with(message), "{name}: {e}");
        assert_eq!(e.location, None);
        assert_eq!(s, before);
    }
}

#[test]
fn max_jobs_auto_uses_cpus() {
    let host = HostFacts {
        cpus: 7,
        ..HostFacts::generic()
    };
    let mut s = Settings::defaults(&host, "/etc/nix");
    s.set("max-jobs", "auto").unwrap();
    assert_eq!(s.max_jobs, MaxJobs(7));
    assert_eq!(s.get("max-jobs").unwrap(), "7");
}

#[test]
fn experimental_features_warn_on_unknown() {
    let mut s = generic();
    let w = s.set("experimental-features", "nix-command bogus").unwrap();
    assert_eq!(
        kinds(w),
        vec![WarningKind::UnknownExperimentalFeature("bogus".into())]
    );
    s.set("extra-experimental-features", "flakes").unwrap();
    assert!(
        s.has_feature(ExperimentalFeature::Flakes)
            && s.has_feature(ExperimentalFeature::NixCommand)
    );
    assert_eq!(
        s.get("experimental-features").unwrap(),
        "flakes nix-command"
    );
}

#[test]
fn every_value_round_trips_through_its_printed_form() {
    let mut s = generic();
    let text =
        "bash-prompt = a  b\nsandbox = relaxed\nmax-silent-time = -3\naccess-tokens = h=t g=u=v\n\
                diff-hook = /x/../y\nexperimental-features = flakes\nsubstituters = b a b\n";
    s.apply_text(text.as_bytes(), "/t", &mut MemorySource::default())
        .unwrap();
    let mut copy = Settings::defaults(
        &HostFacts {
            cpus: 3,
            ..HostFacts::generic()
        },
        "/elsewhere",
    );
    for (name, value) in s.key_values() {
        assert!(copy.set(name, &value).unwrap().is_empty(), "{name}");
    }
    assert_eq!(copy.key_values(), s.key_values());
}

#[test]
fn files_errors_carry_location_and_leave_settings_alone() {
    let mut s = generic();
    let before = s.clone();
    let text = "cores = 3\n# fine\n\ntimeout = soon\n";
    let e = s
        .apply_text(
            text.as_bytes(),
            "/etc/nix/nix.conf",
            &mut MemorySource::default(),
        )
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "/etc/nix/nix.conf:4: setting 'timeout' has invalid value 'soon'"
    );
    assert_eq!(
        e.location,
        Some(Location {
            file: "/etc/nix/nix.conf".into(),
            line: 4
        })
    );
    assert_eq!(s, before, "all or nothing");
}

#[test]
fn warnings_carry_location() {
    let mut s = generic();
    let files = [(
        "/etc/nix/more.conf",
        "\nbinary-caches = https://x/\nfoo = 1\n",
    )];
    let w = s
        .apply_text(
            b"include more.conf\nkeep-going = true\n",
            "/etc/nix/nix.conf",
            &mut mem(&files),
        )
        .unwrap();
    let texts: Vec<String> = w.iter().map(ToString::to_string).collect();
    assert_eq!(
        texts,
        [
            "/etc/nix/more.conf:2: 'binary-caches' is a deprecated alias of 'substituters'",
            "/etc/nix/more.conf:3: unknown setting 'foo'",
        ]
    );
    assert_eq!(s.substituters, ["https://x/"]);
    assert!(s.keep_going);
}

#[test]
fn later_lines_win_including_through_aliases() {
    let mut s = generic();
    let text = "build-timeout = 5\ntimeout = 6\nbuild-max-silent-time = 9\n";
    s.apply_text(text.as_bytes(), "/c", &mut MemorySource::default())
        .unwrap();
    assert_eq!((s.timeout, s.max_silent_time), (6, 9));
}

#[test]
fn load_reads_nix_conf_in_conf_dir() {
    let files = [
        (
            "/cfg/nix.conf",
            "trusted-users = root @wheel\n!include local.conf\n",
        ),
        (
            "/cfg/local.conf",
            "extra-allowed-users = alice\nsandbox = false\n",
        ),
    ];
    let loaded =
        Settings::load_with(Path::new("/cfg/"), HostFacts::generic(), &mut mem(&files)).unwrap();
    assert!(loaded.found);
    assert!(loaded.warnings.is_empty());
    let s = loaded.settings;
    assert_eq!(s.trusted_users, ["root", "@wheel"]);
    assert_eq!(s.allowed_users, ["*", "alice"]);
    assert_eq!(s.sandbox, SandboxMode::Disabled);
    assert_eq!(s.builders, "@/cfg/machines");
    assert_eq!(s.host(), &HostFacts::generic());

    let missing =
        Settings::load_with(Path::new("/none"), HostFacts::generic(), &mut mem(&[])).unwrap();
    assert!(!missing.found);
    assert_eq!(
        missing.settings,
        Settings::defaults(&HostFacts::generic(), "/none")
    );

    let e =
        Settings::load_with(Path::new("etc/nix"), HostFacts::generic(), &mut mem(&[])).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotAbsolute("etc/nix".into()));
}

#[test]
fn load_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("nix.conf"),
        "cores = 3\ninclude conf.d/x.conf\n",
    )
    .unwrap();
    std::fs::create_dir(dir.path().join("conf.d")).unwrap();
    std::fs::write(dir.path().join("conf.d/x.conf"), "require-sigs = false\n").unwrap();
    let loaded = Settings::load(dir.path()).unwrap();
    assert!(loaded.found);
    assert_eq!(loaded.settings.cores, 3);
    assert!(!loaded.settings.require_sigs);

    std::fs::write(dir.path().join("nix.conf"), "include conf.d\n").unwrap();
    let e = Settings::load(dir.path()).unwrap_err();
    assert!(e.to_string().contains("is a directory"), "{e}");
}

#[test]
fn stockade_conf() {
    let d = StockadeSettings::default();
    assert_eq!(
        d.broker_uid_range,
        UidRange {
            first: 800_000,
            last: 865_535
        }
    );
    assert_eq!(d.get("broker-uid-range").unwrap(), "800000-865535");
    assert_eq!(d.idle_timeout, 3600);
    assert_eq!(d.trusted_idle_timeout, 0);
    assert_eq!(d.trusted_connections_reserved, 16);
    assert_eq!(d.max_builds_per_uid, AutoCount::Auto);
    assert_eq!(d.get("max-builds-per-uid").unwrap(), "auto");
    let mut c = d.clone();
    c.set("max-builds-per-uid", "3").unwrap();
    assert_eq!(c.max_builds_per_uid, AutoCount::Fixed(3));
    assert_eq!(c.get("max-builds-per-uid").unwrap(), "3");
    c.set("max-builds-per-uid", "auto").unwrap();
    assert_eq!(c.max_builds_per_uid, AutoCount::Auto);
    for bad in ["-1", "Auto", "half"] {
        let e = c.set("max-builds-per-uid", bad).unwrap_err();
        assert!(
            e.to_string().contains("should be 'auto' or an integer"),
            "{e}"
        );
    }

    let files = [(
        "/etc/nix/stockade.conf",
        "# ours\nbroker-uid-range = 70000-70099\nmax-connections = 10\nsandbox = false\n",
    )];
    let loaded = StockadeSettings::load_with(Path::new("/etc/nix"), &mut mem(&files)).unwrap();
    let s = loaded.settings;
    assert_eq!(s.broker_uid_range.len(), 100);
    assert_eq!(s.max_connections, 10);
    assert_eq!(
        loaded
            .warnings
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["/etc/nix/stockade.conf:4: unknown setting 'sandbox'"]
    );

    let files = [("/etc/nix/stockade.conf", "broker-uid-range = 0-100\n")];
    let e = StockadeSettings::load_with(Path::new("/etc/nix"), &mut mem(&files)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "/etc/nix/stockade.conf:1: setting 'broker-uid-range' has invalid value '0-100': \
         the range must not include root (uid 0)"
    );
    let none = StockadeSettings::load_with(Path::new("/etc/nix"), &mut mem(&[])).unwrap();
    assert!(!none.found);
    assert_eq!(none.settings, d);
}

#[test]
fn settings_cross_process_boundaries() {
    let mut s = generic();
    s.set("access-tokens", "github.com=tok3n").unwrap();
    let bytes = bincode::serialize(&s).unwrap();
    let back: Settings = bincode::deserialize(&bytes).unwrap();
    assert_eq!(back, s);
    assert!(!format!("{s:?}").contains("tok3n"));
    let clean = s.without_secrets();
    assert!(clean.access_tokens.0.is_empty());
    assert_eq!(clean.get("access-tokens").unwrap(), "");
    assert_eq!(s.get("access-tokens").unwrap(), "github.com=tok3n");
}
