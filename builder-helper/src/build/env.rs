//! The builder's environment, as Nix's `initEnv` / `initTmpDir` compute it (2.8.0
//! `src/libstore/build/local-derivation-goal.cc`, 2.26.3
//! `src/libstore/unix/build/local-derivation-goal.cc`), in the same order, so that later
//! assignments override earlier ones exactly as they do there:
//!
//! 1. `PATH=/path-not-set`, `HOME=/homeless-shelter`, `NIX_STORE`, `NIX_BUILD_CORES`;
//! 2. the derivation's `env` (these may override step 1), except the names listed in
//!    `passAsFile`: each of those is written to `.attr-<nix32 sha256(name)>` in the build
//!    directory and `<name>Path` points to it;
//! 3. `NIX_BUILD_TOP`, `TMPDIR`, `TEMPDIR`, `TMP`, `TEMP`, `PWD` = the build directory as the
//!    builder sees it (`/build`);
//! 4. fixed-output only: `NIX_OUTPUT_CHECKED=1`, and each name of the `impureEnvVars`
//!    attribute with its value in the daemon's environment (empty when unset);
//! 5. `NIX_LOG_FD=2`, `TERM=xterm-256color`.
//!
//! Each output's variable (`out=/nix/store/…`) comes from the derivation's `env` (step 2),
//! where the registration check ("has incorrect output") guarantees it holds the output path.
//!
//! Where 2.8.0 and 2.26.3 differ: the list and order are the same. 2.26 adds the
//! `impure-env` setting (experimental feature `configurable-impure-env`): a value given
//! there for a name in `impureEnvVars` wins over the daemon's environment
//! ([`EnvParams::impure_env`]); 2.8 reads only the daemon's environment. 2.26 also puts the
//! build directory one level deeper on the host (`nix-build-<drv>-<n>/build`, the top `0700`
//! and root's), which the builder cannot see: `/build` inside either way.

use std::collections::BTreeMap;

use stockade_common::derivation::Derivation;
use stockade_common::hash::Hash;

/// What the environment depends on besides the derivation.
pub struct EnvParams<'a> {
    /// The store directory (`NIX_STORE`), e.g. `/nix/store`.
    pub store_dir: &'a str,
    pub build_cores: u32,
    /// The build directory as the builder sees it, normally `/build`.
    pub build_dir: &'a str,
    /// Fixed-output (not sandboxed): `NIX_OUTPUT_CHECKED` and `impureEnvVars` apply.
    pub fixed_output: bool,
    /// Nix 2.26's `impure-env` setting: values for `impureEnvVars` names that override the
    /// daemon's environment.
    pub impure_env: &'a BTreeMap<String, String>,
    /// The daemon's environment (`getEnv`), for `impureEnvVars`.
    pub host_env: &'a dyn Fn(&str) -> Option<Vec<u8>>,
    /// Strings replaced in every variable and `passAsFile` file ([`rewrite`]): each output's
    /// placeholder by its path ([`output_rewrites`]).
    pub rewrites: &'a Rewrites,
    /// Each output's path, by name (`outputs` of structured attributes).
    pub output_paths: &'a BTreeMap<String, String>,
}

/// Replacements applied to what a builder is given, in key order (Nix's `rewriteStrings`
/// over a `std::map`).
pub type Rewrites = BTreeMap<Vec<u8>, Vec<u8>>;

/// Each output's placeholder (`builtins.placeholder "out"`) → its store path, as Nix's
/// `inputRewrites` has them for outputs whose paths are known before the build.
pub fn output_rewrites<'a>(outputs: impl IntoIterator<Item = (&'a str, String)>) -> Rewrites {
    outputs
        .into_iter()
        .map(|(name, path)| {
            (
                stockade_common::derivation::hash_placeholder(name).into_bytes(),
                path.into_bytes(),
            )
        })
        .collect()
}

/// Every occurrence of each key of `rewrites` in `s` replaced by its value, one key after
/// the other.
pub fn rewrite(s: &[u8], rewrites: &Rewrites) -> Vec<u8> {
    let mut out = s.to_vec();
    for (from, to) in rewrites {
        if from.is_empty() || !out.windows(from.len()).any(|w| w == from.as_slice()) {
            continue;
        }
        let mut next = Vec::with_capacity(out.len());
        let mut i = 0;
        while i < out.len() {
            if out[i..].starts_with(from) {
                next.extend_from_slice(to);
                i += from.len();
            } else {
                next.push(out[i]);
                i += 1;
            }
        }
        out = next;
    }
    out
}

/// The environment and the files that go with it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BuilderEnv {
    pub vars: BTreeMap<Vec<u8>, Vec<u8>>,
    /// `passAsFile` files: name in the build directory, contents.
    pub files: Vec<(String, Vec<u8>)>,
}

/// Why no environment could be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvError {
    #[error("invalid __json attribute (structured attributes): {0}")]
    BadStructuredAttrs(String),
    /// The references graph of structured attributes is not written yet.
    #[error("exportReferencesGraph with __structuredAttrs is not supported by this daemon yet")]
    ExportReferencesGraph,
}

/// Nix's whitespace tokenizer (`tokenizeString` with " \t\n\r").
fn tokens(s: &[u8]) -> impl Iterator<Item = &[u8]> {
    s.split(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r'))
        .filter(|t| !t.is_empty())
}

/// The file a `passAsFile` attribute is written to: `.attr-` + nix32 of sha256(name).
pub fn pass_as_file_name(name: &[u8]) -> String {
    format!(".attr-{}", Hash::sha256(name).to_base32())
}

/// Computes the builder's environment for `drv`.
pub fn builder_env(drv: &Derivation, p: &EnvParams) -> Result<BuilderEnv, EnvError> {
    // Structured attributes reach the builder as files, not variables (nor passAsFile).
    let structured = match drv.env.get(b"__json".as_slice()) {
        Some(text) => Some(super::structured::attrs(text, p.output_paths)?),
        None => None,
    };
    let mut out = BuilderEnv::default();
    let set = |out: &mut BuilderEnv, k: &str, v: &[u8]| {
        out.vars.insert(k.as_bytes().to_vec(), v.to_vec());
    };
    set(&mut out, "PATH", b"/path-not-set");
    set(&mut out, "HOME", b"/homeless-shelter");
    set(&mut out, "NIX_STORE", p.store_dir.as_bytes());
    set(
        &mut out,
        "NIX_BUILD_CORES",
        p.build_cores.to_string().as_bytes(),
    );

    let pass_as_file: std::collections::BTreeSet<&[u8]> = drv
        .env
        .get(b"passAsFile".as_slice())
        .map(|v| tokens(v).collect())
        .unwrap_or_default();
    for (k, v) in drv.env.iter().filter(|_| structured.is_none()) {
        if pass_as_file.contains(k.as_slice()) {
            let file = pass_as_file_name(k);
            let mut key = k.clone();
            key.extend_from_slice(b"Path");
            out.vars
                .insert(key, format!("{}/{file}", p.build_dir).into_bytes());
            out.files.push((file, rewrite(v, p.rewrites)));
        } else {
            out.vars.insert(k.clone(), v.clone());
        }
    }

    for k in ["NIX_BUILD_TOP", "TMPDIR", "TEMPDIR", "TMP", "TEMP", "PWD"] {
        set(&mut out, k, p.build_dir.as_bytes());
    }
    if p.fixed_output {
        set(&mut out, "NIX_OUTPUT_CHECKED", b"1");
        let names: Vec<Vec<u8>> = match &structured {
            Some(a) => super::structured::strings(a, "impureEnvVars")
                .into_iter()
                .map(String::into_bytes)
                .collect(),
            None => drv
                .env
                .get(b"impureEnvVars".as_slice())
                .map(|v| tokens(v).map(<[u8]>::to_vec).collect())
                .unwrap_or_default(),
        };
        for name in names {
            let name_str = String::from_utf8_lossy(&name).into_owned();
            let value = match p.impure_env.get(&name_str) {
                Some(v) => v.clone().into_bytes(),
                None => (p.host_env)(&name_str).unwrap_or_default(),
            };
            out.vars.insert(name, value);
        }
    }
    set(&mut out, "NIX_LOG_FD", b"2");
    set(&mut out, "TERM", b"xterm-256color");
    if let Some(a) = &structured {
        // Where the builder finds them (2.8 names the host's path here, which a sandboxed
        // builder cannot open; later Nix names the sandbox's, as here).
        let files = super::structured::files(a, p.rewrites);
        for (name, var, contents) in [
            (".attrs.json", "NIX_ATTRS_JSON_FILE", files.json),
            (".attrs.sh", "NIX_ATTRS_SH_FILE", files.sh),
        ] {
            set(&mut out, var, format!("{}/{name}", p.build_dir).as_bytes());
            out.files.push((name.to_string(), contents));
        }
    }
    // Nix rewrites each `name=value` as the environment is handed to the builder.
    out.vars = out
        .vars
        .into_iter()
        .map(|(k, v)| (rewrite(&k, p.rewrites), rewrite(&v, p.rewrites)))
        .collect();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn drv(env: &[(&str, &str)]) -> Derivation {
        Derivation {
            name: "t".into(),
            outputs: BTreeMap::new(),
            input_drvs: BTreeMap::new(),
            input_srcs: BTreeSet::new(),
            system: b"x86_64-linux".to_vec(),
            builder: b"/bin/sh".to_vec(),
            args: vec![],
            env: env
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect(),
        }
    }

    fn params<'a>(
        fixed: bool,
        impure: &'a BTreeMap<String, String>,
        host: &'a dyn Fn(&str) -> Option<Vec<u8>>,
    ) -> EnvParams<'a> {
        EnvParams {
            store_dir: "/nix/store",
            build_cores: 4,
            build_dir: "/build",
            fixed_output: fixed,
            impure_env: impure,
            host_env: host,
            rewrites: &NO_REWRITES,
            output_paths: &NO_OUTPUTS,
        }
    }

    static NO_REWRITES: Rewrites = BTreeMap::new();
    static NO_OUTPUTS: BTreeMap<String, String> = BTreeMap::new();

    #[test]
    fn placeholders_become_output_paths() {
        let none = BTreeMap::new();
        let host = |_: &str| None;
        let ph = stockade_common::derivation::hash_placeholder("out");
        let d = drv(&[
            ("where", &format!("{ph}/sub")),
            ("file", &format!("x {ph} y")),
            ("passAsFile", "file"),
        ]);
        let rw = output_rewrites([("out", "/nix/store/abc-x".to_string())]);
        let p = EnvParams {
            rewrites: &rw,
            ..params(false, &none, &host)
        };
        let e = builder_env(&d, &p).unwrap();
        assert_eq!(get(&e, "where"), Some("/nix/store/abc-x/sub"));
        assert_eq!(e.files[0].1, b"x /nix/store/abc-x y");
        assert_eq!(
            rewrite(b"aXbXc", &[(b"X".to_vec(), b"YY".to_vec())].into()),
            b"aYYbYYc"
        );
    }

    fn get<'a>(e: &'a BuilderEnv, k: &str) -> Option<&'a str> {
        e.vars
            .get(k.as_bytes())
            .map(|v| std::str::from_utf8(v).unwrap())
    }

    #[test]
    fn order_of_overrides_is_nixs() {
        let none = BTreeMap::new();
        let host = |_: &str| Some(b"host".to_vec());
        let d = drv(&[
            ("PATH", "/mine"),
            ("TMPDIR", "/elsewhere"),
            ("TERM", "dumb"),
            ("http_proxy", "x"),
            ("impureEnvVars", "http_proxy"),
        ]);
        let e = builder_env(&d, &params(false, &none, &host)).unwrap();
        assert_eq!(get(&e, "PATH"), Some("/mine"));
        assert_eq!(get(&e, "TMPDIR"), Some("/build"));
        assert_eq!(get(&e, "TERM"), Some("xterm-256color"));
        assert_eq!(get(&e, "http_proxy"), Some("x"));
        assert_eq!(get(&e, "NIX_OUTPUT_CHECKED"), None);
        assert_eq!(get(&e, "NIX_BUILD_CORES"), Some("4"));

        let impure = BTreeMap::from([("FOO".to_string(), "set".to_string())]);
        let d = drv(&[("impureEnvVars", "http_proxy FOO\tBAR")]);
        let host = |k: &str| (k == "http_proxy").then(|| b"proxy".to_vec());
        let e = builder_env(&d, &params(true, &impure, &host)).unwrap();
        assert_eq!(get(&e, "http_proxy"), Some("proxy"));
        assert_eq!(get(&e, "FOO"), Some("set"));
        assert_eq!(get(&e, "BAR"), Some(""));
        assert_eq!(get(&e, "NIX_OUTPUT_CHECKED"), Some("1"));
    }

    #[test]
    fn pass_as_file_becomes_a_path() {
        let none = BTreeMap::new();
        let host = |_: &str| None;
        let d = drv(&[("big", "contents"), ("passAsFile", " big missing ")]);
        let e = builder_env(&d, &params(false, &none, &host)).unwrap();
        assert_eq!(get(&e, "big"), None);
        let file = pass_as_file_name(b"big");
        assert_eq!(
            get(&e, "bigPath").map(str::to_string),
            Some(format!("/build/{file}"))
        );
        assert_eq!(get(&e, "missingPath"), None);
        assert_eq!(e.files, vec![(file, b"contents".to_vec())]);
        assert_eq!(get(&e, "passAsFile"), Some(" big missing "));
    }

    #[test]
    fn structured_attrs_become_files() {
        let none = BTreeMap::new();
        let host = |_: &str| None;
        let d = drv(&[("__json", r#"{"x":"y"}"#), ("out", "/nix/store/abc-t")]);
        let outs = [("out".to_string(), "/nix/store/abc-t".to_string())].into();
        let p = EnvParams {
            output_paths: &outs,
            ..params(false, &none, &host)
        };
        let e = builder_env(&d, &p).unwrap();
        assert_eq!(get(&e, "out"), None, "attributes are not variables");
        assert_eq!(get(&e, "NIX_ATTRS_JSON_FILE"), Some("/build/.attrs.json"));
        assert_eq!(get(&e, "NIX_ATTRS_SH_FILE"), Some("/build/.attrs.sh"));
        assert_eq!(
            e.files[0],
            (
                ".attrs.json".to_string(),
                br#"{"outputs":{"out":"/nix/store/abc-t"},"x":"y"}"#.to_vec()
            )
        );
    }
}
