//! `builtin:buildenv`, the builder of `nix-env`'s user environments (profiles): a tree of
//! symlinks to the installed packages' files, merged by priority, as Nix's `buildProfile`
//! makes it (2.8.0 `src/libstore/builtins/buildenv.cc`; the rules and messages are Nix's).
//!
//! It runs in the helper itself, not in a sandbox: it only reads store paths and writes
//! symlinks and directories into a fresh output directory of the helper's own. What it reads
//! is confined to the store: a package's symlink that leads outside the store is treated as
//! dangling (skipped with Nix's warning), exactly what a builder in Nix's sandbox sees, so no
//! directory outside the store is ever listed on a client's behalf.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

/// Why the environment could not be made (Nix's messages where it has them).
#[derive(Debug, thiserror::Error)]
pub enum BuildEnvError {
    #[error("attribute '{0}' missing")]
    MissingAttr(&'static str),
    #[error("invalid 'derivations' attribute: {0}")]
    BadDerivations(String),
    #[error("collision between '{0}' and non-directory '{1}'")]
    NonDirectory(String, String),
    #[error("collision between non-directory '{0}' and directory '{1}'")]
    Directory(String, String),
    #[error("packages '{0}' and '{1}' have the same priority {2}; use 'nix-env --set-flag priority NUMBER INSTALLED_PKGNAME' to change the priority of one of the conflicting packages (0 being the highest priority)")]
    SamePriority(String, String, i64),
    #[error("{what} '{path}': {source}")]
    Io {
        what: &'static str,
        path: String,
        source: io::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a str) -> impl FnOnce(io::Error) -> BuildEnvError + 'a {
    move |source| BuildEnvError::Io {
        what,
        path: path.to_string(),
        source,
    }
}

/// The store as the builder names it (`/nix/store`) and where it is on the host.
pub struct StoreView<'a> {
    pub logical: &'a str,
    pub host: &'a Path,
}

impl StoreView<'_> {
    /// The host path of a logical path inside the store; `None` outside it.
    fn host_of(&self, logical: &str) -> Option<PathBuf> {
        let rest = logical.strip_prefix(self.logical)?.strip_prefix('/')?;
        Some(self.host.join(rest))
    }

    /// `logical` with every symlink resolved, when it stays inside the store; `None` when it
    /// leads outside it, does not exist, or loops.
    fn resolve(&self, logical: &str) -> Option<String> {
        let mut path = logical.to_string();
        for _ in 0..40 {
            let host = self.host_of(&path)?;
            // Resolve the first component below the store that is a symlink, if any.
            let rest = path.strip_prefix(self.logical)?.trim_start_matches('/');
            let mut prefix = self.logical.to_string();
            let mut host_prefix = self.host.to_path_buf();
            let mut changed = false;
            let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
            for (i, part) in parts.iter().enumerate() {
                host_prefix.push(part);
                let next = format!("{prefix}/{part}");
                let meta = fs::symlink_metadata(&host_prefix).ok()?;
                if meta.file_type().is_symlink() {
                    let target = fs::read_link(&host_prefix).ok()?;
                    let target = target.to_str()?.to_string();
                    let base = if target.starts_with('/') {
                        target
                    } else {
                        format!("{prefix}/{target}")
                    };
                    let tail: Vec<&str> = parts[i + 1..].to_vec();
                    path = normalize(&if tail.is_empty() {
                        base
                    } else {
                        format!("{base}/{}", tail.join("/"))
                    });
                    changed = true;
                    break;
                }
                prefix = next;
            }
            if !changed {
                return host.exists().then_some(path);
            }
        }
        None
    }
}

/// `.` and `..` folded, as Nix's `canonPath` does (without following links).
fn normalize(p: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for part in p.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            x => out.push(x),
        }
    }
    format!("/{}", out.join("/"))
}

struct State<'a> {
    store: &'a StoreView<'a>,
    /// By destination (a path in the output), the priority of what is linked there.
    priorities: BTreeMap<PathBuf, i64>,
    symlinks: u64,
    log: &'a mut dyn Write,
}

/// Files and directories Nix leaves out of profiles.
const SKIPPED_SUFFIXES: [&str; 7] = [
    "/propagated-build-inputs",
    "/nix-support",
    "/perllocal.pod",
    "/info/dir",
    "/log",
    "/manifest.nix",
    "/manifest.json",
];

fn create_links(
    st: &mut State<'_>,
    src_dir: &str,
    dst_dir: &Path,
    priority: i64,
) -> Result<(), BuildEnvError> {
    let entries = match st.store.resolve(src_dir).and_then(|r| st.store.host_of(&r)) {
        Some(host) if host.is_dir() => {
            let mut names: Vec<String> = fs::read_dir(&host)
                .map_err(io_err("reading directory", src_dir))?
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect();
            names.sort();
            names
        }
        _ => {
            let _ = writeln!(
                st.log,
                "warning: not including '{src_dir}' in the user environment because it's not a directory"
            );
            return Ok(());
        }
    };
    for name in entries {
        if name.starts_with('.') {
            continue;
        }
        let src = format!("{src_dir}/{name}");
        let dst = dst_dir.join(&name);
        let Some(resolved) = st.store.resolve(&src) else {
            let _ = writeln!(
                st.log,
                "warning: skipping dangling symlink '{}'",
                dst.display()
            );
            continue;
        };
        if SKIPPED_SUFFIXES.iter().any(|s| src.ends_with(s)) {
            continue;
        }
        let src_is_dir = st.store.host_of(&resolved).is_some_and(|h| h.is_dir());
        let dst_meta = fs::symlink_metadata(&dst).ok();
        if src_is_dir {
            if let Some(m) = &dst_meta {
                if m.is_dir() {
                    create_links(st, &src, &dst, priority)?;
                    continue;
                }
                if m.file_type().is_symlink() {
                    let target = fs::read_link(&dst)
                        .map_err(io_err("reading link", &dst.display().to_string()))?;
                    let target = target.to_string_lossy().into_owned();
                    let target_is_dir = st
                        .store
                        .resolve(&target)
                        .and_then(|r| st.store.host_of(&r))
                        .is_some_and(|h| h.is_dir());
                    if !target_is_dir {
                        return Err(BuildEnvError::NonDirectory(src, target));
                    }
                    let shown = dst.display().to_string();
                    fs::remove_file(&dst).map_err(io_err("unlinking", &shown))?;
                    fs::DirBuilder::new()
                        .mode(0o755)
                        .create(&dst)
                        .map_err(io_err("creating directory", &shown))?;
                    let prev = st.priorities.get(&dst).copied().unwrap_or(0);
                    create_links(st, &target, &dst, prev)?;
                    create_links(st, &src, &dst, priority)?;
                    continue;
                }
            }
        } else if let Some(m) = &dst_meta {
            if m.file_type().is_symlink() {
                let prev = st.priorities.get(&dst).copied().unwrap_or(0);
                if prev == priority {
                    let existing = fs::read_link(&dst)
                        .map(|t| t.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    return Err(BuildEnvError::SamePriority(src, existing, priority));
                }
                if prev < priority {
                    continue;
                }
                fs::remove_file(&dst).map_err(io_err("unlinking", &dst.display().to_string()))?;
            } else if m.is_dir() {
                return Err(BuildEnvError::Directory(src, dst.display().to_string()));
            }
        }
        std::os::unix::fs::symlink(&src, &dst)
            .map_err(io_err("creating symlink", &dst.display().to_string()))?;
        st.priorities.insert(dst, priority);
        st.symlinks += 1;
    }
    Ok(())
}

/// One package of the `derivations` attribute.
struct Package {
    path: String,
    active: bool,
    priority: i64,
}

/// Parses `derivations`: per package `active priority n path1 … pathn`.
fn packages(attr: &str) -> Result<Vec<Package>, BuildEnvError> {
    let mut words = attr.split_whitespace();
    let mut out = Vec::new();
    let bad = |w: &str| BuildEnvError::BadDerivations(format!("'{w}' is not a number"));
    while let Some(active) = words.next() {
        let prio = words.next().ok_or_else(|| bad("(end)"))?;
        let priority: i64 = prio.parse().map_err(|_| bad(prio))?;
        let count = words.next().ok_or_else(|| bad("(end)"))?;
        let n: usize = count.parse().map_err(|_| bad(count))?;
        for _ in 0..n {
            let path = words
                .next()
                .ok_or_else(|| BuildEnvError::BadDerivations("too few paths".into()))?;
            out.push(Package {
                path: path.to_string(),
                active: active != "false",
                priority,
            });
        }
    }
    Ok(out)
}

/// Makes the profile at `out` (a fresh directory's path on the host, not yet existing) from
/// the derivation's `derivations` and `manifest` attributes.
pub fn build_env(
    store: &StoreView<'_>,
    env: &BTreeMap<Vec<u8>, Vec<u8>>,
    out: &Path,
    log: &mut dyn Write,
) -> Result<(), BuildEnvError> {
    let attr = |name: &'static str| {
        env.get(name.as_bytes())
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .ok_or(BuildEnvError::MissingAttr(name))
    };
    let manifest = attr("manifest")?;
    let mut pkgs = packages(&attr("derivations")?)?;
    let shown = out.display().to_string();
    fs::DirBuilder::new()
        .mode(0o755)
        .recursive(true)
        .create(out)
        .map_err(io_err("creating directory", &shown))?;
    let mut st = State {
        store,
        priorities: BTreeMap::new(),
        symlinks: 0,
        log,
    };
    pkgs.sort_by(|a, b| (a.priority, &a.path).cmp(&(b.priority, &b.path)));
    let mut done = BTreeSet::new();
    let mut postponed = BTreeSet::new();
    let mut add = |st: &mut State<'_>,
                   dir: &str,
                   priority: i64,
                   postponed: &mut BTreeSet<String>|
     -> Result<(), BuildEnvError> {
        if !done.insert(dir.to_string()) {
            return Ok(());
        }
        create_links(st, dir, out, priority)?;
        let propagated = format!("{dir}/nix-support/propagated-user-env-packages");
        if let Some(text) = st
            .store
            .resolve(&propagated)
            .and_then(|r| st.store.host_of(&r))
            .and_then(|h| fs::read_to_string(h).ok())
        {
            postponed.extend(text.split_whitespace().map(str::to_string));
        }
        Ok(())
    };
    for p in pkgs.iter().filter(|p| p.active) {
        add(&mut st, &p.path, p.priority, &mut postponed)?;
    }
    let mut counter = 1000;
    while !postponed.is_empty() {
        let batch = std::mem::take(&mut postponed);
        for dir in batch {
            add(&mut st, &dir, counter, &mut postponed)?;
            counter += 1;
        }
    }
    std::os::unix::fs::symlink(&manifest, out.join("manifest.nix"))
        .map_err(io_err("creating symlink", &format!("{shown}/manifest.nix")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derivations_attribute() {
        let p = packages("true 5 2 /s/a-x /s/b-x false 0 1 /s/c-y").unwrap();
        assert_eq!(p.len(), 3);
        assert!(p[0].active && p[0].priority == 5 && p[1].path == "/s/b-x");
        assert!(!p[2].active);
        assert!(packages("true x 1 /s/a").is_err());
        assert!(packages("true 1 2 /s/a").is_err());
    }

    #[test]
    fn merges_by_priority_and_stays_in_the_store() {
        let t = tempfile::tempdir().unwrap();
        let store = t.path().join("store");
        let mk = |rel: &str, data: &str| {
            let p = store.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, data).unwrap();
        };
        mk("aaa-one/bin/tool", "one");
        mk("aaa-one/share/doc/one", "d1");
        mk("bbb-two/bin/tool", "two");
        mk("bbb-two/bin/other", "x");
        mk("bbb-two/share/doc/two", "d2");
        mk("ccc-manifest", "[]");
        // A link out of the store is skipped, not followed.
        std::os::unix::fs::symlink("/etc", store.join("bbb-two/etc")).unwrap();
        let view = StoreView {
            logical: "/nix/store",
            host: &store,
        };
        let env: BTreeMap<Vec<u8>, Vec<u8>> = [
            (
                b"derivations".to_vec(),
                b"true 5 1 /nix/store/aaa-one true 3 1 /nix/store/bbb-two".to_vec(),
            ),
            (b"manifest".to_vec(), b"/nix/store/ccc-manifest".to_vec()),
        ]
        .into();
        let out = t.path().join("out");
        let mut log = Vec::new();
        build_env(&view, &env, &out, &mut log).unwrap();
        let link = |rel: &str| fs::read_link(out.join(rel)).unwrap();
        // Priority 3 (two) wins over 5 (one).
        assert_eq!(
            link("bin/tool"),
            PathBuf::from("/nix/store/bbb-two/bin/tool")
        );
        assert_eq!(
            link("bin/other"),
            PathBuf::from("/nix/store/bbb-two/bin/other")
        );
        // share/doc is merged into a real directory.
        assert_eq!(
            link("share/doc/one"),
            PathBuf::from("/nix/store/aaa-one/share/doc/one")
        );
        assert!(fs::symlink_metadata(out.join("share/doc"))
            .unwrap()
            .is_dir());
        assert_eq!(
            link("manifest.nix"),
            PathBuf::from("/nix/store/ccc-manifest")
        );
        assert!(fs::symlink_metadata(out.join("etc")).is_err());
        assert!(String::from_utf8_lossy(&log).contains("skipping dangling symlink"));
    }
}
