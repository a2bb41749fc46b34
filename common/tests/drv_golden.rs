//! Derivations against the real Nix 2.8: `nix-instantiate` writes a set of `.drv` files into a
//! throw-away store (a tmpfs over /nix in a private mount namespace, so the host /nix is never
//! touched), once with the default store directory and once with another one; then we check
//! that we parse and print every file byte for byte, compute the same `.drv` store path, the
//! same output paths (as `nix-store -q --outputs` reports them), and rebuild the final
//! derivation from the masked form the evaluator hashes.
//!
//! Without nix-instantiate the tests are skipped, unless the environment variable CI is set.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use stockade_common::derivation::{
    name_from_drv_path, read_basic_derivation, write_basic_derivation, Derivation,
    DerivationOutput, DerivationType, DrvError, DrvHashCache, DrvLimits,
};
use stockade_common::store_path::{StoreDir, StorePath};

const DRVS_NIX: &str = r#"
let
  sys = "x86_64-linux";
  mk = attrs: derivation ({ system = sys; builder = "/bin/sh"; } // attrs);
  # Half of a two-byte UTF-8 character: a Nix string that is not UTF-8.
  byte = builtins.substring 0 1 "é";
  fo = name: mode: algo: hash: extra:
    mk ({ inherit name; outputHashMode = mode; outputHashAlgo = algo; outputHash = hash; } // extra);
  h256 = builtins.hashString "sha256" "golden";
  foFlat = fo "fo-flat" "flat" "sha256" h256 {};
  foRec = fo "fo-rec" "recursive" "sha256" h256 {};
  foSha1 = fo "fo-sha1" "flat" "sha1" (builtins.hashString "sha1" "golden") {};
  foMd5 = fo "fo-md5" "recursive" "md5" (builtins.hashString "md5" "golden") {};
  foSha512 = fo "fo-sha512" "flat" "sha512" (builtins.hashString "sha512" "golden") {};
  foSri = mk { name = "fo-sri"; outputHashMode = "recursive"; outputHash = "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="; };
  foB32 = mk { name = "fo-b32"; outputHashAlgo = "sha1"; outputHash = "f8ic9l626q5cyx211r1h0jbkkv3ssc7c"; };
  # Two different derivations with the same fixed output: equal hashDerivationModulo.
  twinA = fo "twin" "flat" "sha256" h256 {};
  twinB = fo "twin" "flat" "sha256" h256 { builder = "/bin/bash"; };
  multi = mk { name = "multi"; outputs = [ "out" "dev" "lib" "doc" ]; };
  escapes = mk {
    name = "escapes";
    args = [ "-c" "q\"b\\s\nnl\ttab\rcr" "ünïcödé € 😀" byte "" "$out" ];
    "weird\"key\\with\nnewline" = "v\"\\\n\r\t";
    ${byte} = byte;
    unicode = "日本語";
    empty = "";
    spaces = "  a  b  ";
    bool = true;
    null = null;
    int = 42;
    list = [ "a" 1 true "b c" ];
  };
  oddsystem = derivation { name = "oddsystem"; system = "x86_64-linux\nwith\ttabs 'n' ünï"; builder = "/bin/sh"; };
  textFile = builtins.toFile "input.txt" "hello\n";
  dependent = mk {
    name = "dependent";
    outputs = [ "out" "bin" ];
    dev = multi.dev;
    lib = "${multi.lib}/lib";
    plain = multi;
    flat = foFlat;
    recursive = foRec;
    sha1 = foSha1;
    txt = textFile;
    src = ./src.txt;
    passAsFile = [ "big" ];
    big = "a large value\n";
  };
  sharer = mk { name = "sharer"; a = twinA; b = twinB; c = multi.out; };
  structured = mk {
    name = "structured";
    __structuredAttrs = true;
    outputs = [ "out" "bin" ];
    nested = { a = [ 1 2 "q\"uote\\" ]; b.c = null; };
    dep = dependent.bin;
  };
  deep = mk { name = "deep"; x = dependent; y = sharer; z = structured; s = "${escapes}"; };
  drvctx = mk { name = "drvctx"; p = dependent.drvPath; };
  longname = mk { name = builtins.concatStringsSep "" (builtins.genList (_: "n") 207); };
  argsorder = mk { name = "argsorder"; args = [ "z" "a" "m" "a" ]; };
in {
  inherit foFlat foRec foSha1 foMd5 foSha512 foSri foB32 twinA twinB multi escapes oddsystem
    dependent sharer structured deep drvctx longname argsorder;
}
"#;

/// Runs in a private mount namespace; `$T` is the temp dir. For each store directory, every
/// `.drv` is copied out with its output paths next to it, before the tmpfs goes away.
const SCRIPT: &str = r#"
set -eu
mount -t tmpfs none /nix
run() {
  out="$T/out/$1"
  mkdir -p "$out"
  if ! nix-instantiate "$T/drvs.nix" > "$out/instantiated" 2> "$out/stderr"; then
    cat "$out/stderr" >&2
    exit 1
  fi
  for d in "$NIX_STORE_DIR"/*.drv; do
    b=${d##*/}
    cp "$d" "$out/$b"
    nix-store -q --outputs "$d" > "$out/$b.outputs"
  done
}
NIX_STORE_DIR=/nix/store NIX_STATE_DIR=/nix/var/nix run default
NIX_STORE_DIR=/nix/alt/store NIX_STATE_DIR=/nix/alt/var run alt
"#;

const STORE_DIRS: [(&str, &str); 2] = [("default", "/nix/store"), ("alt", "/nix/alt/store")];

struct Golden {
    store_dir: StoreDir,
    /// `.drv` path → (file bytes, output paths Nix registered).
    drvs: BTreeMap<StorePath, (Vec<u8>, BTreeSet<String>)>,
}

impl Golden {
    fn resolver(&self) -> impl FnMut(&StorePath) -> Result<Derivation, DrvError> + '_ {
        move |p: &StorePath| {
            let (text, _) = self
                .drvs
                .get(p)
                .ok_or_else(|| DrvError::NotADrvPath(p.to_string()))?;
            Derivation::parse(&self.store_dir, text, name_from_drv_path(p)?)
        }
    }

    fn parsed(&self) -> impl Iterator<Item = (&StorePath, Derivation)> + '_ {
        self.drvs.iter().map(|(p, (text, _))| {
            let name = name_from_drv_path(p).unwrap();
            let drv = Derivation::parse(&self.store_dir, text, name)
                .unwrap_or_else(|e| panic!("{p}: {e}"));
            (p, drv)
        })
    }

    fn by_name(&self, name: &str) -> (StorePath, Derivation) {
        let mut found = self.parsed().filter(|(_, d)| d.name == name);
        let (p, d) = found
            .next()
            .unwrap_or_else(|| panic!("no derivation named {name}"));
        (p.clone(), d)
    }
}

/// Whether `prog` is on PATH. Never run a Nix command to find out: even `--version` opens the
/// host's store database.
fn on_path(prog: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
}

fn run_nix() -> Option<Vec<Golden>> {
    if !on_path("nix-instantiate") {
        if std::env::var_os("CI").is_some() {
            panic!("nix-instantiate is not installed, and CI is set");
        }
        eprintln!("skipping: nix-instantiate is not installed");
        return None;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    std::fs::create_dir_all(t.join("conf")).unwrap();
    std::fs::create_dir_all(t.join("home")).unwrap();
    std::fs::write(
        t.join("conf/nix.conf"),
        "sandbox = false\nbuild-users-group =\nstore = local\nsubstituters =\n",
    )
    .unwrap();
    std::fs::write(t.join("drvs.nix"), DRVS_NIX).unwrap();
    std::fs::write(t.join("src.txt"), "a source file\n").unwrap();

    let mut cmd = Command::new("unshare");
    if !nix::unistd::geteuid().is_root() {
        // Map ourselves to root in a user namespace so we may mount.
        cmd.arg("-r");
    }
    let out = cmd
        .args(["-m", "--propagation", "private", "sh", "-c", SCRIPT])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("T", t)
        .env("HOME", t.join("home"))
        .env("NIX_CONF_DIR", t.join("conf"))
        .output()
        .expect("running unshare");
    assert!(
        out.status.success(),
        "nix-instantiate in a private namespace failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let goldens = STORE_DIRS
        .iter()
        .map(|(sub, dir)| {
            let store_dir = StoreDir::new(dir).unwrap();
            (store_dir, read_dir(&t.join("out").join(sub)))
        })
        .map(|(store_dir, drvs)| Golden { store_dir, drvs })
        .collect();
    Some(goldens)
}

fn read_dir(dir: &Path) -> BTreeMap<StorePath, (Vec<u8>, BTreeSet<String>)> {
    let mut drvs = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if !name.ends_with(".drv") {
            continue;
        }
        let text = std::fs::read(dir.join(&name)).unwrap();
        let outputs = std::fs::read_to_string(dir.join(format!("{name}.outputs")))
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        drvs.insert(name.parse().unwrap(), (text, outputs));
    }
    drvs
}

fn goldens() -> Option<&'static [Golden]> {
    static G: OnceLock<Option<Vec<Golden>>> = OnceLock::new();
    G.get_or_init(run_nix).as_deref()
}

#[test]
fn every_attribute_was_instantiated() {
    let Some(goldens) = goldens() else { return };
    for g in goldens {
        // One per attribute, nothing else.
        assert_eq!(g.drvs.len(), 19, "{:?}", g.drvs.keys().collect::<Vec<_>>());
    }
}

#[test]
fn byte_identical_round_trip() {
    let Some(goldens) = goldens() else { return };
    for g in goldens {
        for (p, drv) in g.parsed() {
            let (text, _) = &g.drvs[p];
            let printed = drv.to_aterm(&g.store_dir).unwrap();
            assert!(
                printed == *text,
                "{p}:\nnix: {}\nus:  {}",
                String::from_utf8_lossy(text),
                String::from_utf8_lossy(&printed)
            );
        }
    }
}

#[test]
fn drv_store_paths() {
    let Some(goldens) = goldens() else { return };
    for g in goldens {
        for (p, drv) in g.parsed() {
            assert_eq!(drv.drv_path(&g.store_dir).unwrap(), *p);
        }
    }
}

#[test]
fn output_paths_match_nix() {
    let Some(goldens) = goldens() else { return };
    for g in goldens {
        let mut cache = DrvHashCache::new(g.store_dir.clone());
        let mut resolver = g.resolver();
        for (p, drv) in g.parsed() {
            let computed: BTreeSet<String> = drv
                .compute_output_paths(&mut cache, &mut resolver)
                .unwrap_or_else(|e| panic!("{p}: {e}"))
                .values()
                .map(|o| g.store_dir.display(o.as_ref().expect("known output path")))
                .collect();
            assert_eq!(computed, g.drvs[p].1, "{p}");
            let declared: BTreeSet<String> = drv
                .static_output_paths(&g.store_dir)
                .unwrap()
                .values()
                .map(|o| g.store_dir.display(o.as_ref().unwrap()))
                .collect();
            assert_eq!(declared, g.drvs[p].1, "{p}");
            drv.check_output_paths(&mut cache, &mut resolver)
                .unwrap_or_else(|e| panic!("{p}: {e}"));
        }
        // Exactly the derivations used as inputs were hashed and memoised: fo-flat, fo-rec,
        // fo-sha1, both twins, multi, escapes, dependent, sharer, structured.
        assert_eq!(cache.len(), 10);
    }
}

/// The evaluator hashes the derivation with empty output paths and output variables, then
/// fills them in; doing the same must give Nix's file.
#[test]
fn fill_from_masked_form() {
    let Some(goldens) = goldens() else { return };
    for g in goldens {
        let mut cache = DrvHashCache::new(g.store_dir.clone());
        let mut resolver = g.resolver();
        for (p, drv) in g.parsed() {
            let mut masked = drv.clone();
            match drv.drv_type().unwrap() {
                DerivationType::InputAddressed { deferred: false } => {
                    for (name, out) in masked.outputs.iter_mut() {
                        *out = DerivationOutput::Deferred;
                        masked.env.insert(name.clone().into_bytes(), Vec::new());
                    }
                }
                DerivationType::ContentAddressed { fixed: true } => {
                    masked.env.remove(b"out".as_slice());
                }
                other => panic!("{p}: unexpected type {other:?}"),
            }
            assert_ne!(masked, drv);
            masked
                .fill_output_paths(&mut cache, &mut resolver)
                .unwrap_or_else(|e| panic!("{p}: {e}"));
            assert_eq!(masked, drv, "{p}");
        }
    }
}

#[test]
fn tampering_is_detected() {
    let Some(goldens) = goldens() else { return };
    for g in goldens {
        let mut cache = DrvHashCache::new(g.store_dir.clone());
        let mut resolver = g.resolver();
        let (_, mut drv) = g.by_name("dependent");
        drv.env.insert(b"big".to_vec(), b"another value".to_vec());
        assert!(matches!(
            drv.check_output_paths(&mut cache, &mut resolver),
            Err(DrvError::IncorrectOutput { .. })
        ));
        // Pointing an input at another output of the same derivation changes the hash too.
        let (_, mut drv) = g.by_name("sharer");
        let multi = g.by_name("multi").0;
        drv.input_drvs
            .insert(multi, BTreeSet::from(["dev".to_string()]));
        assert!(drv.check_output_paths(&mut cache, &mut resolver).is_err());
    }
}

/// The rare case of §8.3: two inputs whose hashes are equal become one entry.
#[test]
fn equal_input_hashes_are_merged() {
    let Some(goldens) = goldens() else { return };
    for g in goldens {
        let mut cache = DrvHashCache::new(g.store_dir.clone());
        let mut resolver = g.resolver();
        let (_, sharer) = g.by_name("sharer");
        let twins: Vec<_> = sharer
            .input_drvs
            .keys()
            .filter(|p| p.name() == "twin.drv")
            .collect();
        assert_eq!(twins.len(), 2);
        let hashes: Vec<_> = twins
            .iter()
            .map(|p| {
                resolver(p)
                    .unwrap()
                    .hash_modulo(false, &mut cache, &mut resolver)
                    .unwrap()
            })
            .collect();
        assert_eq!(hashes[0], hashes[1]);
        // sharer's output paths agreeing with Nix (checked above) depends on the merge.
        sharer
            .check_output_paths(&mut cache, &mut resolver)
            .unwrap();
    }
}

#[test]
fn bytes_that_are_not_utf8_survive() {
    let Some(goldens) = goldens() else { return };
    for g in goldens {
        let (_, escapes) = g.by_name("escapes");
        assert_eq!(escapes.env.get(b"\xc3".as_slice()).unwrap(), b"\xc3");
        assert!(escapes.args.contains(&b"q\"b\\s\nnl\ttab\rcr".to_vec()));
        assert_eq!(escapes.args.last().unwrap(), b"$out");
        let (_, odd) = g.by_name("oddsystem");
        assert_eq!(odd.system, "x86_64-linux\nwith\ttabs 'n' ünï".as_bytes());
        let (_, args) = g.by_name("argsorder");
        assert_eq!(args.args, [&b"z"[..], b"a", b"m", b"a"]);
    }
}

#[test]
fn wire_form_round_trips() {
    let Some(goldens) = goldens() else { return };
    for g in goldens {
        for (p, drv) in g.parsed() {
            let mut buf = Vec::new();
            write_basic_derivation(&mut buf, &g.store_dir, &drv).unwrap();
            let back = read_basic_derivation(
                &mut buf.as_slice(),
                &g.store_dir,
                &drv.name,
                &DrvLimits::default(),
            )
            .unwrap_or_else(|e| panic!("{p}: {e}"));
            let mut expected = drv.clone();
            expected.input_drvs.clear();
            assert_eq!(back, expected, "{p}");
        }
    }
}

/// The same expression under another store directory gives other paths, which we compute too.
#[test]
fn store_dir_is_honoured() {
    let Some(goldens) = goldens() else { return };
    let [a, b] = goldens else {
        panic!("two store directories")
    };
    let names =
        |g: &Golden| -> BTreeSet<String> { g.drvs.keys().map(|p| p.name().to_string()).collect() };
    assert_eq!(names(a), names(b));
    let hashes = |g: &Golden| -> BTreeSet<String> {
        g.drvs.keys().map(|p| p.hash_part().to_string()).collect()
    };
    assert!(hashes(a).is_disjoint(&hashes(b)));
    for (p, (text, _)) in &b.drvs {
        assert!(
            Derivation::parse(&a.store_dir, text, name_from_drv_path(p).unwrap()).is_err(),
            "{p} parses under the wrong store directory"
        );
    }
}
