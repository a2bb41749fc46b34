//! The declarative description of one build sandbox: plain data, no I/O. [`super::spawn`]
//! turns it into processes; nothing here decides how.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Who the builder is, inside its user namespace and on the host. Nix's defaults inside are
/// uid 1000 (`nixbld`) and gid 100; one id of each is mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdMap {
    pub inside_uid: u32,
    pub inside_gid: u32,
    /// The build uid on the host (the one a build user or the uid allocator handed out).
    pub host_uid: u32,
    pub host_gid: u32,
}

impl IdMap {
    /// Nix's sandbox ids (1000:100) mapped to `host_uid:host_gid`.
    pub fn nix(host_uid: u32, host_gid: u32) -> Self {
        IdMap {
            inside_uid: 1000,
            inside_gid: 100,
            host_uid,
            host_gid,
        }
    }
}

/// One `sandbox-paths` / `extra-sandbox-paths` entry: `target=source`, or `path` for both,
/// with a trailing `?` when a missing source is skipped instead of failing the build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxPath {
    /// Where it appears inside the sandbox (absolute).
    pub target: PathBuf,
    /// What is bound there, on the host (absolute; symlinks are followed).
    pub source: PathBuf,
    pub optional: bool,
}

impl SandboxPath {
    /// Parses one whitespace-free entry of `sandbox-paths` as Nix does: `/bin/sh=/nix/store/…`,
    /// `/dev/kvm?`, `/etc/ssl=/etc/ssl?`. Both sides must be absolute.
    pub fn parse(entry: &str) -> Result<Self, SpecError> {
        let (body, optional) = match entry.strip_suffix('?') {
            Some(b) => (b, true),
            None => (entry, false),
        };
        let (target, source) = match body.split_once('=') {
            Some((t, s)) => (t, s),
            None => (body, body),
        };
        if !target.starts_with('/') || !source.starts_with('/') {
            return Err(SpecError::SandboxPath(entry.to_string()));
        }
        Ok(SandboxPath {
            target: PathBuf::from(target),
            source: PathBuf::from(source),
            optional,
        })
    }
}

/// Where a fixed-output builder finds the host's CA bundle.
pub const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Whether the builder gets a network namespace of its own (only `lo`) or shares the host's
/// (fixed-output derivations, which may fetch). Landlock scoping still keeps a shared-network
/// builder away from the host's abstract unix sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    Private,
    Host,
}

/// The files the sandbox's `/etc` is given: `passwd` and `group` always, `hosts` unless the
/// host's is bound instead (a builder on the host network), `nsswitch.conf` for such a builder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcFiles {
    pub passwd: String,
    pub group: String,
    pub hosts: Option<String>,
    pub nsswitch: Option<String>,
}

impl EtcFiles {
    /// What Nix writes: `root`, the build user `nixbld` (home = the build directory) and
    /// `nobody`; groups `root`, `nixbld`, `nogroup`; `localhost` on both loopback addresses.
    pub fn nix(ids: &IdMap, build_dir: &Path) -> Self {
        let home = build_dir.display();
        EtcFiles {
            passwd: format!(
                "root:x:0:0:Nix build user:{home}:/noshell\n\
                 nixbld:x:{}:{}:Nix build user:{home}:/noshell\n\
                 nobody:x:65534:65534:Nobody:/:/noshell\n",
                ids.inside_uid, ids.inside_gid
            ),
            group: format!(
                "root:x:0:\nnixbld:!:{}:\nnogroup:x:65534:\n",
                ids.inside_gid
            ),
            hosts: Some("127.0.0.1 localhost\n::1 localhost\n".to_string()),
            nsswitch: None,
        }
    }
}

/// Everything one sandboxed build needs. Paths named "inside" are as the builder sees them;
/// the others are host paths, opened by the sandbox's first process before it changes uid
/// (so they may sit below directories only the helper can search).
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    pub ids: IdMap,
    /// The store directory inside (normally `/nix/store`).
    pub store_dir: PathBuf,
    /// Where the input paths live on the host (normally the same as `store_dir`).
    pub host_store_dir: PathBuf,
    /// The input closure: base names of store paths (`<hash>-<name>`) in `host_store_dir`,
    /// each bound read-only at `store_dir/<name>`. Nothing else of the store is visible.
    pub inputs: Vec<String>,
    /// A fresh, empty host directory, writable by the build uid, that the builder sees as
    /// `store_dir`: outputs are created in it (and stay there for the store-writer); the
    /// inputs' mount points are made in it too (empty entries the helper ignores afterwards).
    pub store_staging: PathBuf,
    /// The outputs' paths inside (each directly in `store_dir`); they do not exist yet.
    pub outputs: Vec<PathBuf>,
    /// The build directory on the host (owned by the build uid), seen as `sandbox_build_dir`.
    pub build_dir: PathBuf,
    /// Normally `/build`.
    pub sandbox_build_dir: PathBuf,
    pub sandbox_paths: Vec<SandboxPath>,
    pub network: Network,
    pub hostname: String,
    pub domainname: String,
    pub etc: EtcFiles,
    /// The builder's whole environment (nothing is inherited).
    pub env: Vec<(OsString, OsString)>,
    /// The builder, as a path inside the sandbox, and its arguments (without `argv[0]`,
    /// which is the builder path).
    pub builder: PathBuf,
    pub args: Vec<OsString>,
    /// The cgroup directories (one per hierarchy, v1 or v2) the build joins before its cgroup
    /// namespace is made.
    pub cgroups: Vec<PathBuf>,
    /// Size limit of `/dev/shm` (a tmpfs of its own), e.g. `50%`, as Nix's `sandbox-dev-shm-size`.
    pub dev_shm_size: String,
}

impl SandboxSpec {
    /// A spec with Nix's defaults: `/build`, `localhost`, `(none)`, private network, Nix's
    /// `/etc` files, no sandbox paths, no cgroup, `/dev/shm` of 50%.
    pub fn new(
        ids: IdMap,
        store_dir: impl Into<PathBuf>,
        store_staging: impl Into<PathBuf>,
        build_dir: impl Into<PathBuf>,
        builder: impl Into<PathBuf>,
    ) -> Self {
        let store_dir = store_dir.into();
        let sandbox_build_dir = PathBuf::from("/build");
        SandboxSpec {
            etc: EtcFiles::nix(&ids, &sandbox_build_dir),
            ids,
            host_store_dir: store_dir.clone(),
            store_dir,
            inputs: Vec::new(),
            store_staging: store_staging.into(),
            outputs: Vec::new(),
            build_dir: build_dir.into(),
            sandbox_build_dir,
            sandbox_paths: Vec::new(),
            network: Network::Private,
            hostname: "localhost".to_string(),
            domainname: "(none)".to_string(),
            env: Vec::new(),
            builder: builder.into(),
            args: Vec::new(),
            cgroups: Vec::new(),
            dev_shm_size: "50%".to_string(),
        }
    }

    /// What Nix gives a fixed-output builder: the host's network, an `nsswitch.conf` that
    /// resolves hosts and services only from files and DNS, the host's `/etc/resolv.conf`,
    /// `/etc/services` and `/etc/hosts` where they exist, and (as Nix 2.26 does) the CA bundle
    /// `ca_file` at `/etc/ssl/certs/ca-certificates.crt`.
    pub fn share_host_network(&mut self, ca_file: Option<&Path>) {
        self.network = Network::Host;
        self.etc.hosts = None;
        self.etc.nsswitch = Some("hosts: files dns\nservices: files\n".to_string());
        for f in ["/etc/resolv.conf", "/etc/services", "/etc/hosts"] {
            self.sandbox_paths.push(SandboxPath {
                target: PathBuf::from(f),
                source: PathBuf::from(f),
                optional: true,
            });
        }
        if let Some(ca) = ca_file {
            self.sandbox_paths.push(SandboxPath {
                target: PathBuf::from(CA_BUNDLE),
                source: ca.to_path_buf(),
                optional: true,
            });
        }
    }

    /// Checks what can be checked without touching the file system: absolute paths, inputs
    /// and outputs that are single names directly in the store directory, no target that
    /// climbs out with `..`.
    pub fn validate(&self) -> Result<(), SpecError> {
        for p in [
            &self.store_dir,
            &self.host_store_dir,
            &self.store_staging,
            &self.build_dir,
            &self.sandbox_build_dir,
            &self.builder,
        ] {
            plain_absolute(p)?;
        }
        for name in &self.inputs {
            if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                return Err(SpecError::Input(name.clone()));
            }
        }
        for out in &self.outputs {
            plain_absolute(out)?;
            if out.parent() != Some(self.store_dir.as_path()) {
                return Err(SpecError::Output(out.clone()));
            }
        }
        for sp in &self.sandbox_paths {
            plain_absolute(&sp.target)?;
            plain_absolute(&sp.source)?;
            if sp.target == Path::new("/") {
                return Err(SpecError::Path(sp.target.clone()));
            }
        }
        if self.hostname.len() > 64 || self.domainname.len() > 64 {
            return Err(SpecError::Name);
        }
        Ok(())
    }
}

fn plain_absolute(p: &Path) -> Result<(), SpecError> {
    use std::path::Component;
    let ok = p.is_absolute()
        && p.components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if ok {
        Ok(())
    } else {
        Err(SpecError::Path(p.to_path_buf()))
    }
}

/// A description that cannot be turned into a sandbox.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("'{0}' is not a valid sandbox-paths entry (both sides must be absolute)")]
    SandboxPath(String),
    #[error("'{}' must be an absolute path without '.' or '..'", .0.display())]
    Path(PathBuf),
    #[error("input '{0}' is not the name of a store path")]
    Input(String),
    #[error("output '{}' is not directly in the store directory", .0.display())]
    Output(PathBuf),
    #[error("host or domain name longer than 64 bytes")]
    Name,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_paths_parse_as_nix_does() {
        assert_eq!(
            SandboxPath::parse("/bin/sh=/nix/store/x-bash/bin/sh").unwrap(),
            SandboxPath {
                target: "/bin/sh".into(),
                source: "/nix/store/x-bash/bin/sh".into(),
                optional: false
            }
        );
        let kvm = SandboxPath::parse("/dev/kvm?").unwrap();
        assert_eq!(
            (kvm.target.clone(), kvm.optional),
            ("/dev/kvm".into(), true)
        );
        assert_eq!(kvm.source, kvm.target);
        assert!(SandboxPath::parse("/etc/ssl=/etc/ssl?").unwrap().optional);
        assert!(SandboxPath::parse("bin/sh").is_err());
        assert!(SandboxPath::parse("/bin/sh=sh").is_err());
    }

    #[test]
    fn validate_refuses_escapes() {
        let mut s = SandboxSpec::new(IdMap::nix(1, 1), "/nix/store", "/s", "/b", "/x");
        s.validate().unwrap();
        s.inputs.push("../etc".into());
        assert!(s.validate().is_err());
        s.inputs.clear();
        s.outputs.push("/nix/store/a/b".into());
        assert!(s.validate().is_err());
        s.outputs = vec!["/nix/store/abc-out".into()];
        s.validate().unwrap();
        s.sandbox_paths
            .push(SandboxPath::parse("/bin/../etc=/etc").unwrap());
        assert!(s.validate().is_err());
    }
}
