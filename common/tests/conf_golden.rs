//! Golden test: our `Settings` against real Nix 2.8's `nix show-config`, for the defaults, for a
//! configuration full of includes, aliases and `extra-` settings, for `--option` overrides,
//! and for bad values.
//!
//! Nix runs in a private mount namespace with a tmpfs over `/nix`, with `NIX_CONF_DIR` set to
//! a temporary directory and `HOME`/`XDG_*` pointing at an empty one, so neither the host's
//! store nor any user configuration is involved. Needs root and `nix` on PATH: without them
//! the test fails when `CI` is set and is skipped otherwise.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use stockade_common::conf::{Filesystem, HostFacts, Settings, WarningKind};

fn nix_usable() -> bool {
    let why = if !nix::unistd::geteuid().is_root() {
        Some("not running as root (needed for unshare -m)")
    } else if !Path::new("/nix").is_dir() {
        Some("/nix does not exist to mount a tmpfs over")
    } else if !Command::new("nix")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        Some("`nix` is not on PATH")
    } else {
        None
    };
    match why {
        None => true,
        Some(why) if std::env::var_os("CI").is_some() => panic!("golden test cannot run: {why}"),
        Some(why) => {
            eprintln!("skipping the nix.conf golden test: {why}");
            false
        }
    }
}

struct NixRun {
    ok: bool,
    values: BTreeMap<String, String>,
    stderr: String,
}

/// `nix show-config` with `conf_dir` as NIX_CONF_DIR, an empty home, and `args` after the
/// subcommand, inside a throw-away mount namespace.
fn nix_show_config(conf_dir: &Path, home: &Path, args: &[&str]) -> NixRun {
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c"])
        .arg("mount -t tmpfs none /nix && exec nix \"$@\"")
        .arg("sh")
        .args([
            "--extra-experimental-features",
            "nix-command",
            "show-config",
        ])
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("NIX_CONF_DIR", conf_dir)
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home)
        .env("XDG_CONFIG_DIRS", home)
        .output()
        .expect("spawn unshare");
    let stdout = String::from_utf8(out.stdout).expect("utf-8 show-config");
    let values = stdout
        .lines()
        .filter_map(|l| l.split_once(" = "))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    NixRun {
        ok: out.status.success(),
        values,
        stderr: strip_ansi(&String::from_utf8_lossy(&out.stderr)),
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The host as the Nix process sees it: detected, with the environment Nix got (cleared).
fn host() -> HostFacts {
    HostFacts {
        store_uri: "auto".into(),
        libexec_dir: "/usr/libexec".into(),
        ..HostFacts::detect()
    }
}

/// Ours for a conf dir, with the same command line applied: `--extra-experimental-features
/// nix-command`, then `options` as `--option` pairs. The `nix` command also turns `pure-eval` on
/// for itself (src/nix/main.cc), which nix-daemon does not.
fn ours(conf_dir: &Path, options: &[(&str, &str)]) -> (Settings, BTreeSet<String>) {
    let loaded = Settings::load_with(conf_dir, host(), &mut Filesystem).expect("our load");
    let mut s = loaded.settings;
    s.set("extra-experimental-features", "nix-command").unwrap();
    for (name, value) in options {
        let w = s.set(name, value).unwrap();
        // The `nix` command does not warn about unknown `--option` names; we do.
        let unknown = Settings::resolve(name).is_none();
        let warned = w
            .iter()
            .any(|w| matches!(w.kind, WarningKind::UnknownSetting(_)));
        assert_eq!(warned, unknown, "{name}: {w:?}");
    }
    s.set("pure-eval", "true").unwrap();
    // The file warnings Nix also prints (it has no alias or map-entry warnings).
    let nix_like = loaded
        .warnings
        .into_iter()
        .filter_map(|w| match w.kind {
            WarningKind::UnknownSetting(_) | WarningKind::UnknownExperimentalFeature(_) => {
                Some(format!("warning: {}", w.kind))
            }
            _ => None,
        })
        .collect();
    (s, nix_like)
}

fn nix_warnings(stderr: &str) -> BTreeSet<String> {
    stderr
        .lines()
        .filter(|l| l.starts_with("warning: "))
        .map(str::to_owned)
        .collect()
}

fn compare(label: &str, settings: &Settings, nix: &NixRun) {
    assert!(nix.ok, "{label}: nix show-config failed: {}", nix.stderr);
    let mine: BTreeMap<String, String> = settings
        .key_values()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    let mut problems = vec![];
    for (name, value) in &nix.values {
        match mine.get(name) {
            None => problems.push(format!("{name}: Nix has it, we do not")),
            Some(v) if v != value => problems.push(format!("{name}: Nix '{value}', ours '{v}'")),
            Some(_) => {}
        }
    }
    for name in mine.keys() {
        if !nix.values.contains_key(name) {
            problems.push(format!("{name}: ours, not in Nix's output"));
        }
    }
    assert!(problems.is_empty(), "{label}:\n  {}", problems.join("\n  "));
    assert_eq!(
        nix.values.len(),
        91,
        "{label}: Nix 2.8.0 prints 91 settings"
    );
}

const MAIN_CONF: &str = "\
# golden test: comments, aliases, extra-, includes
cores = 3 # trailing comment
build-max-jobs = 5
binary-caches = https://a.example/ https://b.example/
extra-binary-caches = https://c.example/
extra-substituters   =   https://a.example/
trusted-binary-caches = https://z.example/ https://y.example/
extra-trusted-substituters = https://y.example/ https://x.example/
binary-cache-public-keys = a:1 b:2
extra-trusted-public-keys = c:3
build-chroot-dirs = /bin/sh=/x /usr
extra-sandbox-paths = /etc/ssl
build-use-sandbox = relaxed
require-sigs = no
keep-going = 1
max-silent-time = -5
build-timeout = +60
build-max-log-size = 1000000
gc-reserved-space = 007
max-free = 18446744073709551615
access-tokens = github.com=abc bogus x=y=z
extra-access-tokens = github.com=def gitlab.com=ghi
experimental-features = flakes ca-derivations nosuch
diff-hook = /usr/bin/../bin//diff
build-hook =
trusted-users = root @wheel   alice
allowed-users = @users root
extra-allowed-users = bob
extra-platforms = aarch64-linux
extra-extra-platforms = riscv64-linux
system-features = kvm big-parallel
extra-system-features = nixos-test
bash-prompt =   a   b\t
post-build-hook = /etc/nix/upload.sh
netrc-file = /secrets/netrc
builders =
unknown-thing = 1
extra-sandbox = true
\r
include sub/a.conf
!include does/not/exist.conf
ignored-acls =
gc-keep-outputs = yes
env-keep-derivations = true
nix-path = nixpkgs=/x
";

const SUB_CONF: &str = "\
build-use-substitutes = false
connect-timeout = 5
include ../b.conf
";

const B_CONF: &str = "\
binary-caches-parallel-connections = 7
build-cores = 4
trusted-binary-caches = https://w.example/
";

fn write_confs(dir: &Path) {
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("nix.conf"), MAIN_CONF).unwrap();
    std::fs::write(dir.join("sub/a.conf"), SUB_CONF).unwrap();
    std::fs::write(dir.join("b.conf"), B_CONF).unwrap();
}

#[test]
fn golden_against_nix_show_config() {
    if !nix_usable() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let empty = tmp.path().join("empty-conf");
    let full = tmp.path().join("full-conf");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::create_dir_all(&empty).unwrap();
    write_confs(&full);

    // Defaults: no nix.conf at all.
    let nix = nix_show_config(&empty, &home, &[]);
    let (s, _) = ours(&empty, &[]);
    compare("defaults", &s, &nix);

    // Includes, aliases, extra-, odd spellings of values, unknown settings.
    let nix = nix_show_config(&full, &home, &[]);
    let (s, warnings) = ours(&full, &[]);
    compare("full config", &s, &nix);
    assert_eq!(
        warnings,
        nix_warnings(&nix.stderr),
        "warnings; Nix stderr: {}",
        nix.stderr
    );
    assert!(warnings.contains("warning: unknown setting 'extra-sandbox'"));
    // The values really moved away from the defaults (the comparison is not vacuous).
    assert_eq!(s.cores, 4);
    assert_eq!(s.http_connections, 7);
    assert_eq!(s.trusted_substituters.len(), 1);

    // --option on top, as SetOptions overrides apply.
    let options = [
        ("cores", "2"),
        ("extra-substituters", "https://q.example/"),
        ("build-timeout", "9"),
        ("sandbox", "false"),
        ("extra-trusted-users", "carol  dave"),
        ("bash-prompt", "  spaced  out "),
        ("max-jobs", "auto"),
        ("not-a-setting", "x"),
    ];
    let mut args = vec![];
    for (n, v) in &options {
        args.extend(["--option", n, v]);
    }
    let nix = nix_show_config(&full, &home, &args);
    let (s, warnings) = ours(&full, &options);
    compare("--option overrides", &s, &nix);
    assert_eq!(
        warnings,
        nix_warnings(&nix.stderr),
        "warnings; Nix stderr: {}",
        nix.stderr
    );
}

#[test]
fn golden_errors_match_nix() {
    if !nix_usable() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let cases = [
        "cores = x\n",
        "cores = -1\n",
        "log-lines = 10K\n",
        "keep-going = maybe\n",
        "build-use-sandbox = yes\n",
        "max-jobs = lots\n",
        "diff-hook = relative/diff\n",
        "timeout = 9223372036854775808\n",
        "a=b\n",
        "lonely\n",
        "include a b\n",
        "# fine\ninclude missing.conf\n",
    ];
    for (i, text) in cases.iter().enumerate() {
        let dir = tmp.path().join(format!("case{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("nix.conf"), text).unwrap();
        let nix = nix_show_config(&dir, &home, &[]);
        assert!(!nix.ok, "Nix accepted {text:?}");
        let nix_msg = nix
            .stderr
            .lines()
            .find_map(|l| l.strip_prefix("error: "))
            .unwrap_or_else(|| panic!("no error line for {text:?}: {}", nix.stderr))
            .to_owned();
        let e = Settings::load_with(&dir, host(), &mut Filesystem).expect_err(text);
        let loc = e.location.clone().expect("errors in files have a location");
        assert_eq!(loc.file, dir.join("nix.conf").to_str().unwrap());
        assert_eq!(loc.line, text.lines().count(), "{text:?}");
        let ours = e.kind.to_string();
        // Nix says "... in 'FILE'" where we prefix FILE:LINE; we add expected values.
        assert!(
            ours.starts_with(&nix_msg) || nix_msg.starts_with(&ours),
            "{text:?}\n  Nix:  {nix_msg}\n  ours: {ours}"
        );
    }
}
