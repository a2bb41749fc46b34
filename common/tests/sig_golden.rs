//! Golden tests against the real Nix 2.8: keys made by Nix parse here, signatures made here are
//! byte-identical to Nix's and accepted by `nix store verify`, and narinfos written by
//! `nix copy` parse and print back byte for byte.
//!
//! Everything that needs a store runs in a private mount namespace over a throw-away tmpfs
//! `/nix`, so the host store is never touched. Without `nix-store` (or without the privilege to
//! make a mount namespace) the tests skip, unless `CI` is set, where they fail.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use stockade_common::content_address::ContentAddress;
use stockade_common::hash::Hash;
use stockade_common::narinfo::{CacheInfo, NarInfo, PathInfo};
use stockade_common::signature::{PublicKey, SecretKey, TrustedKeys};
use stockade_common::store_path::StoreDir;
use tempfile::TempDir;

struct Nix {
    dir: TempDir,
}

fn skip(why: &str) -> Option<Nix> {
    if std::env::var_os("CI").is_some() {
        panic!("{why}, and CI is set: the golden tests must run");
    }
    eprintln!("skipping Nix golden test: {why}");
    None
}

/// Whether `prog` is on PATH. Never run a Nix command to find out: even `--version` opens the
/// host's store database.
fn on_path(prog: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
}

fn succeeded(cmd: &mut Command) -> bool {
    cmd.output().is_ok_and(|o| o.status.success())
}

impl Nix {
    fn setup() -> Option<Nix> {
        if !on_path("nix-store") {
            return skip("nix-store is not installed");
        }
        if !Path::new("/nix").is_dir() {
            return skip("there is no /nix to mount a throw-away store over");
        }
        if !succeeded(Command::new("unshare").args(["-m", "--propagation", "private", "true"])) {
            return skip("cannot make a private mount namespace (needs root)");
        }
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("conf");
        fs::create_dir(&conf).unwrap();
        fs::create_dir(dir.path().join("home")).unwrap();
        fs::write(
            conf.join("nix.conf"),
            "sandbox = false\nbuild-users-group =\nsubstituters =\n\
             experimental-features = nix-command\n",
        )
        .unwrap();
        Some(Nix { dir })
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// A command with only our configuration in effect (no user or host settings, no daemon).
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        for var in [
            "NIX_REMOTE",
            "NIX_STORE_DIR",
            "NIX_STORE",
            "NIX_STATE_DIR",
            "NIX_LOG_DIR",
            "NIX_DATA_DIR",
            "NIX_DAEMON_SOCKET_PATH",
            "NIX_PATH",
            "XDG_CONFIG_DIRS",
        ] {
            c.env_remove(var);
        }
        let home = self.path("home");
        c.env("NIX_CONF_DIR", self.path("conf"))
            .env("NIX_USER_CONF_FILES", self.path("conf/none.conf"))
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env("XDG_CACHE_HOME", home.join(".cache"))
            .env("XDG_DATA_HOME", home.join(".local/share"))
            .env("XDG_STATE_HOME", home.join(".local/state"))
            .env("T", self.dir.path());
        c
    }

    /// Runs `script` in a private mount namespace whose /nix is a fresh tmpfs. The mount comes
    /// first and `set -e` stops the script if it fails, so nothing can reach the host's /nix.
    fn in_namespace(&self, script: &str) -> Output {
        self.command("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c"])
            .arg(format!("set -eu\nmount -t tmpfs none /nix\n{script}"))
            .output()
            .unwrap()
    }

    fn must(&self, script: &str) -> String {
        let out = self.in_namespace(script);
        assert!(
            out.status.success(),
            "script failed ({}):\n{script}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Nix makes a key pair (`sec`, `pub` in the temp dir). It needs no store, but nix-store
    /// opens the local database anyway, so it runs in the namespace too.
    fn generate_key(&self, name: &str) -> (String, String) {
        let out = self
            .command("unshare")
            .args(["-m", "--propagation", "private", "--", "sh", "-c"])
            .arg("mount -t tmpfs none /nix && exec nix-store \"$@\"")
            .arg("nix-store")
            .arg("--generate-binary-cache-key")
            .arg(name)
            .arg(self.path("sec"))
            .arg(self.path("pub"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            fs::read_to_string(self.path("sec")).unwrap(),
            fs::read_to_string(self.path("pub")).unwrap(),
        )
    }
}

#[test]
fn nix_key_pair() {
    let Some(nix) = Nix::setup() else { return };
    for name in ["cache.example.org-1", "k"] {
        let (sec, public) = nix.generate_key(name);
        let sk = SecretKey::parse(&sec).unwrap();
        let pk = PublicKey::parse(&public).unwrap();
        assert_eq!(sk.name(), name);
        assert_eq!(
            sk.to_public(),
            pk,
            "public key derived from Nix's secret key"
        );
        assert_eq!(sk.to_public().to_string(), public);
        assert_eq!(sk.to_text().as_str(), sec);
    }
}

/// One `nix path-info --json` entry as a `PathInfo`.
fn path_info_from_json(sd: &StoreDir, v: &Value) -> PathInfo {
    let s = |k: &str| v[k].as_str().unwrap_or_else(|| panic!("{k} in {v}"));
    let mut info = PathInfo::new(
        sd.parse(s("path")).unwrap(),
        Hash::parse_typed(s("narHash")).unwrap(),
        v["narSize"].as_u64().unwrap(),
    );
    for r in v["references"].as_array().unwrap() {
        info.references
            .insert(sd.parse(r.as_str().unwrap()).unwrap());
    }
    if let Some(d) = v["deriver"].as_str() {
        info.deriver = Some(sd.parse(d).unwrap());
    }
    if let Some(ca) = v["ca"].as_str() {
        info.ca = Some(ContentAddress::parse(ca).unwrap());
    }
    for sig in v["signatures"].as_array().unwrap() {
        info.sigs.insert(sig.as_str().unwrap().to_string());
    }
    info
}

/// Copies the cache, rewriting every narinfo: no CA (so the signature is what makes it
/// trusted) and `sign`'s signature as the only one.
fn rewrite_cache(from: &Path, to: &Path, sd: &StoreDir, sign: impl Fn(&PathInfo) -> String) {
    assert!(Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap()
        .success());
    for entry in fs::read_dir(to).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "narinfo") {
            let mut ni = NarInfo::parse(sd, &fs::read(&p).unwrap()).unwrap();
            ni.info.ca = None;
            ni.info.sigs = [sign(&ni.info)].into();
            fs::write(&p, ni.render(sd).unwrap()).unwrap();
        }
    }
}

#[test]
fn signatures_and_narinfo_against_real_nix() {
    let Some(nix) = Nix::setup() else { return };
    let sd = StoreDir::default();
    let (sec, public) = nix.generate_key("test-1");
    fs::write(nix.path("f.txt"), "hello\n").unwrap();

    // A source path, text paths with references, and a built (input-addressed) path with a
    // deriver and a reference; Nix signs them all, describes them and copies them to a cache.
    nix.must(
        r#"
F=$(nix-store --add "$T/f.txt")
B=$(nix eval --raw --expr 'builtins.toFile "b" "${builtins.toFile "a1" "x"} ${builtins.toFile "a2" "y"}"')
D=$(nix-build --no-out-link -E 'derivation { name = "d"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo ${builtins.toFile "b" "${builtins.toFile "a1" "x"} ${builtins.toFile "a2" "y"}"} > $out" ]; }')
nix store sign --key-file "$T/sec" -r "$F" "$B" "$D"
nix path-info --json -r "$F" "$B" "$D" > "$T/pi.json"
nix copy --to "file://$T/cache" "$F" "$B" "$D"
printf '%s\n' "$F" "$B" "$D" > "$T/paths"
"#,
    );

    let sk = SecretKey::parse(&sec).unwrap();
    let nix_keys = TrustedKeys::parse_list(&public).unwrap();
    let json: Value = serde_json::from_slice(&fs::read(nix.path("pi.json")).unwrap()).unwrap();
    let infos: BTreeMap<String, PathInfo> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            let info = path_info_from_json(&sd, v);
            (info.path.base_name().to_string(), info)
        })
        .collect();
    assert_eq!(infos.len(), 5, "f.txt, a1, a2, b, d");
    let mut with_refs = 0;
    let mut with_deriver = 0;
    for info in infos.values() {
        let fp = info.fingerprint(&sd).unwrap();
        let [nix_sig] = info.sigs.iter().collect::<Vec<_>>()[..] else {
            panic!("one signature expected: {info:?}")
        };
        // Ed25519 is deterministic: our signature must be Nix's, byte for byte.
        assert_eq!(&sk.sign(&fp).to_string(), nix_sig, "{fp}");
        assert!(nix_keys.verify(&fp, nix_sig));
        assert_eq!(info.signed_by(&sd, &nix_keys), Some("test-1"));
        // Everything but the built path is content-addressed, and we must agree with Nix.
        assert_eq!(
            info.is_content_addressed(&sd),
            info.ca.is_some(),
            "{info:?}"
        );
        let mut unaddressed = info.clone();
        unaddressed.ca = None;
        assert_eq!(unaddressed.check_signatures(&sd, &nix_keys), 1);
        with_refs += usize::from(!info.references.is_empty());
        with_deriver += usize::from(info.deriver.is_some());
    }
    assert_eq!((with_refs, with_deriver), (2, 1));

    // Nix's narinfos: parse, compare with path-info, print back byte for byte.
    let mut narinfos = 0;
    for entry in fs::read_dir(nix.path("cache")).unwrap() {
        let p = entry.unwrap().path();
        if p.extension() != Some(OsStr::new("narinfo")) {
            continue;
        }
        let text = fs::read(&p).unwrap();
        let ni = NarInfo::parse(&sd, &text).unwrap();
        let expected = &infos[ni.info.path.base_name()];
        assert_eq!(ni.info.nar_hash, expected.nar_hash);
        assert_eq!(ni.info.nar_size, expected.nar_size);
        assert_eq!(ni.info.references, expected.references);
        assert_eq!(ni.info.deriver, expected.deriver);
        assert_eq!(ni.info.sigs, expected.sigs);
        assert_eq!(ni.info.ca, expected.ca);
        assert_eq!(
            ni.render(&sd).unwrap(),
            String::from_utf8(text).unwrap(),
            "{p:?}"
        );
        narinfos += 1;
    }
    assert_eq!(narinfos, 5);
    let cache_info = fs::read(nix.path("cache/nix-cache-info")).unwrap();
    let ci = CacheInfo::parse(&cache_info).unwrap();
    ci.check_store_dir(&sd).unwrap();

    // Our key signs; Nix must accept the signature (CA dropped so only the signature counts),
    // and must refuse one over a wrong fingerprint, so the acceptance means something.
    let ours = SecretKey::generate("stockade-test-1").unwrap();
    rewrite_cache(&nix.path("cache"), &nix.path("cache-ours"), &sd, |i| {
        ours.sign(i.fingerprint(&sd).unwrap()).to_string()
    });
    rewrite_cache(&nix.path("cache"), &nix.path("cache-bad"), &sd, |i| {
        let mut wrong = i.clone();
        wrong.references.clear();
        wrong.nar_size += 1;
        ours.sign(wrong.fingerprint(&sd).unwrap()).to_string()
    });
    fs::write(nix.path("ourpub"), ours.to_public().to_string()).unwrap();
    let verify = |cache: &str, key_file: &str| {
        nix.in_namespace(&format!(
            r#"nix store verify --store "file://$T/{cache}" --trusted-public-keys "$(cat "$T/{key_file}")" --sigs-needed 1 $(cat "$T/paths")"#
        ))
    };
    let good = verify("cache-ours", "ourpub");
    assert!(
        good.status.success(),
        "Nix refused our signatures:\n{}",
        String::from_utf8_lossy(&good.stderr)
    );
    let bad = verify("cache-bad", "ourpub");
    assert!(!bad.status.success(), "Nix accepted wrong signatures");
    let bad_err = String::from_utf8_lossy(&bad.stderr);
    let untrusted: BTreeSet<&str> = bad_err
        .lines()
        .filter(|l| l.contains("is untrusted"))
        .collect();
    assert_eq!(untrusted.len(), 3, "{bad_err}");
    // Our signatures are not trusted under Nix's key either.
    assert!(!verify("cache-ours", "pub").status.success());
}
