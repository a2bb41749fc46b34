//! Turning a [`SandboxSpec`] into a [`Plan`]: every string, descriptor and filter the
//! containment routine will use, made before `clone` so that the routine itself only makes
//! system calls (see [`super::contain`]).
//!
//! Paths inside the new root are relative (the routine works from the new root as its current
//! directory); host sources are reached through `/proc/self/fd/<n>/...` on descriptors the
//! routine opens at fixed numbers before it changes uid.

use std::ffi::{CString, OsStr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::fcntl::{AtFlags, OFlag};
use nix::libc;
use nix::sys::stat::{Mode, SFlag};
use seccompiler::BpfProgram;

use super::landlock::LandlockPlan;
use super::spec::{IdMap, Network, SandboxSpec};
use super::sys;
use super::{SandboxError, Stdio};

/// The `/dev` nodes bound from the host.
pub const DEV_NODES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// A host object the routine opens (`O_PATH`) while it still has the helper's file-system
/// identity, then moves to descriptor `number`.
pub struct Source {
    pub path: CString,
    pub number: RawFd,
    pub optional: bool,
    /// `O_NOFOLLOW | O_DIRECTORY` for the directories the helper made itself.
    pub flags: OFlag,
}

/// A bind mount: `source` (a `/proc/self/fd/...` path) onto `target` (relative to the new
/// root), read-only or not, with the mounts below the source or not.
///
/// The build and staging directories are bound alone (not `MS_REC`): the new root's tmpfs is
/// mounted over the build directory's host path, and a recursive bind of that path would
/// carry the tmpfs along and show it at `/build`.
pub struct Bind {
    pub source: CString,
    pub target: CString,
    pub read_only: bool,
    pub recursive: bool,
}

/// A `sandbox-paths` entry: `source` is the index into [`Plan::sources`]; the mount point's
/// type (directory or file) follows the source's.
pub struct ExtraBind {
    pub source: usize,
    pub bind: Bind,
}

pub struct Plan {
    pub clone_flags: libc::c_int,
    pub cgroup_ns: bool,
    pub loopback: bool,
    pub new_proc: bool,
    pub set_uts: bool,
    pub pdeathsig: bool,
    pub ids: IdMap,
    pub stdio: [OwnedFd; 3],
    /// Read end of the parent's "go" pipe (EOF: the parent is gone).
    pub go: OwnedFd,
    /// Write end of the error pipe (closed by a successful execve).
    pub report: OwnedFd,
    pub sources: Vec<Source>,
    /// Where the new root's tmpfs is mounted in the sandbox's mount namespace (the host build
    /// directory's path, hidden only there) and its options.
    pub root_mount: CString,
    pub root_opts: CString,
    pub skeleton: Vec<CString>,
    /// The store directory: the staging directory bound read-write.
    pub store: Bind,
    pub inputs: Vec<Bind>,
    /// For each of `inputs`, its index in the spec's inputs (symlinks have no mount).
    pub input_items: Vec<usize>,
    pub build: Bind,
    pub dev_nodes: Vec<Bind>,
    pub dev_links: Vec<(CString, CString)>,
    pub dev_pts: CString,
    pub dev_pts_opts: CString,
    pub dev_shm: CString,
    pub dev_shm_opts: CString,
    pub proc_dir: CString,
    /// Without a pid namespace of its own the sandbox cannot mount a fresh `/proc`.
    pub proc_bind: Option<Bind>,
    pub extra: Vec<ExtraBind>,
    pub etc_files: Vec<(CString, Vec<u8>)>,
    pub hostname: Vec<u8>,
    pub domainname: Vec<u8>,
    pub inside_build_dir: CString,
    pub landlock: Option<LandlockPlan>,
    /// Landlock rules by inside path (absolute, after pivot_root), with their right masks.
    pub landlock_rules: Vec<(CString, u64)>,
    pub seccomp: Vec<BpfProgram>,
    pub no_new_privs: bool,
    pub drop_caps: bool,
    pub last_cap: u32,
    pub exec_path: CString,
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    pub argv_ptrs: Vec<*const libc::c_char>,
    pub envp_ptrs: Vec<*const libc::c_char>,
}

pub fn cstr(bytes: &[u8]) -> Result<CString, SandboxError> {
    CString::new(bytes).map_err(|_| SandboxError::Nul(String::from_utf8_lossy(bytes).into()))
}

fn path_c(p: &Path) -> Result<CString, SandboxError> {
    cstr(p.as_os_str().as_bytes())
}

/// `/nix/store` → `nix/store`.
fn relative(p: &Path) -> Result<CString, SandboxError> {
    let rel = p.strip_prefix("/").unwrap_or(p);
    path_c(rel)
}

/// The ancestors of `p` (relative, shortest first), without `p` itself.
fn ancestors(p: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut cur = PathBuf::new();
    let comps: Vec<_> = p
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect();
    for c in comps.iter().take(comps.len().saturating_sub(1)) {
        cur.push(c);
        out.push(cur.clone());
    }
    out
}

fn magic(number: RawFd, rel: Option<&OsStr>) -> Result<CString, SandboxError> {
    let mut s = format!("/proc/self/fd/{number}").into_bytes();
    if let Some(rel) = rel {
        s.push(b'/');
        s.extend_from_slice(rel.as_bytes());
    }
    cstr(&s)
}

/// Index of each fixed source in [`Plan::sources`].
pub const SRC_STORE: usize = 0;
pub const SRC_STAGING: usize = 1;
pub const SRC_BUILD: usize = 2;
pub const SRC_DEV: usize = 3;
pub const SRC_PROC: usize = 4;

pub fn make(
    spec: &SandboxSpec,
    stdio: Stdio,
    go: OwnedFd,
    report: OwnedFd,
    landlock: Option<LandlockPlan>,
    seccomp: Vec<BpfProgram>,
) -> Result<Plan, SandboxError> {
    spec.validate()?;
    let private_net = spec.network == Network::Private && !cfg!(feature = "without-netns");
    let pid_ns = !cfg!(feature = "without-pidns");
    let mut clone_flags = libc::CLONE_NEWUSER | libc::CLONE_NEWNS | libc::CLONE_NEWIPC;
    if private_net {
        clone_flags |= libc::CLONE_NEWNET;
    }
    if pid_ns {
        clone_flags |= libc::CLONE_NEWPID;
    }
    let set_uts = !cfg!(feature = "without-utsns");
    if set_uts {
        clone_flags |= libc::CLONE_NEWUTS;
    }

    // Descriptors the routine must keep until execve; sources go above them.
    let stdio = stdio.above_2()?;
    let mut highest = [go.as_raw_fd(), report.as_raw_fd()]
        .into_iter()
        .chain(stdio.iter().map(|f| f.as_raw_fd()))
        .chain(landlock.as_ref().map(|l| l.ruleset.as_raw_fd()))
        .max()
        .unwrap_or(2);
    let mut sources = Vec::new();
    let mut add_source =
        |path: &Path, optional: bool, flags: OFlag| -> Result<RawFd, SandboxError> {
            highest += 1;
            sources.push(Source {
                path: path_c(path)?,
                number: highest,
                optional,
                flags,
            });
            Ok(highest)
        };
    let own_dir = OFlag::O_NOFOLLOW | OFlag::O_DIRECTORY;
    let store_fd = add_source(&spec.host_store_dir, false, OFlag::O_DIRECTORY)?;
    let staging_fd = add_source(&spec.store_staging, false, own_dir)?;
    let build_fd = add_source(&spec.build_dir, false, own_dir)?;
    let dev_fd = add_source(Path::new("/dev"), false, OFlag::O_DIRECTORY)?;
    let proc_fd = add_source(Path::new("/proc"), false, OFlag::O_DIRECTORY)?;
    let mut extra_fds = Vec::new();
    for sp in &spec.sandbox_paths {
        extra_fds.push(add_source(&sp.source, sp.optional, OFlag::empty())?);
    }
    let nofile = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(1024);
    if u64::try_from(highest).unwrap_or(u64::MAX) >= nofile {
        return Err(SandboxError::TooManyDescriptors);
    }

    let mut skeleton = Vec::new();
    let mut want_dir = |p: &Path| -> Result<(), SandboxError> {
        let c = relative(p)?;
        if !skeleton.contains(&c) {
            skeleton.push(c);
        }
        Ok(())
    };
    for a in ancestors(&spec.store_dir) {
        want_dir(&a)?;
    }
    want_dir(&spec.store_dir)?;
    for a in ancestors(&spec.sandbox_build_dir) {
        want_dir(&a)?;
    }
    want_dir(&spec.sandbox_build_dir)?;
    for d in ["dev", "dev/pts", "dev/shm", "proc", "etc"] {
        want_dir(Path::new(d))?;
    }
    for sp in &spec.sandbox_paths {
        for a in ancestors(&sp.target) {
            want_dir(&a)?;
        }
    }

    let private_store = !cfg!(feature = "without-private-store");
    let store = Bind {
        source: if private_store {
            magic(staging_fd, None)?
        } else {
            magic(store_fd, None)?
        },
        target: relative(&spec.store_dir)?,
        read_only: false,
        recursive: false,
    };
    let mut inputs = Vec::new();
    let mut input_items = Vec::new();
    if private_store {
        let symlinks = make_mount_points(spec)?;
        for (item, name) in spec.inputs.iter().enumerate() {
            if symlinks.contains(name) {
                continue;
            }
            input_items.push(item);
            inputs.push(Bind {
                source: magic(store_fd, Some(OsStr::new(name)))?,
                target: relative(&spec.store_dir.join(name))?,
                read_only: !cfg!(feature = "without-ro-inputs"),
                recursive: true,
            });
        }
    }
    let build = Bind {
        source: magic(build_fd, None)?,
        target: relative(&spec.sandbox_build_dir)?,
        read_only: false,
        recursive: false,
    };
    let mut dev_nodes = Vec::new();
    for n in DEV_NODES {
        dev_nodes.push(Bind {
            source: magic(dev_fd, Some(OsStr::new(n)))?,
            target: cstr(format!("dev/{n}").as_bytes())?,
            read_only: false,
            recursive: false,
        });
    }
    let dev_links = [
        ("pts/ptmx", "dev/ptmx"),
        ("/proc/self/fd", "dev/fd"),
        ("/proc/self/fd/0", "dev/stdin"),
        ("/proc/self/fd/1", "dev/stdout"),
        ("/proc/self/fd/2", "dev/stderr"),
    ]
    .iter()
    .map(|(t, p)| Ok((cstr(t.as_bytes())?, cstr(p.as_bytes())?)))
    .collect::<Result<Vec<_>, SandboxError>>()?;
    let proc_bind = (!pid_ns)
        .then(|| {
            Ok::<_, SandboxError>(Bind {
                source: magic(proc_fd, None)?,
                target: cstr(b"proc")?,
                read_only: false,
                recursive: true,
            })
        })
        .transpose()?;
    let mut extra = Vec::new();
    for (i, sp) in spec.sandbox_paths.iter().enumerate() {
        extra.push(ExtraBind {
            source: SRC_PROC + 1 + i,
            bind: Bind {
                source: magic(extra_fds[i], None)?,
                target: relative(&sp.target)?,
                read_only: true,
                recursive: true,
            },
        });
    }

    let mut etc_files = vec![
        (cstr(b"etc/passwd")?, spec.etc.passwd.clone().into_bytes()),
        (cstr(b"etc/group")?, spec.etc.group.clone().into_bytes()),
    ];
    if let Some(hosts) = &spec.etc.hosts {
        etc_files.push((cstr(b"etc/hosts")?, hosts.clone().into_bytes()));
    }
    if let Some(nsswitch) = &spec.etc.nsswitch {
        etc_files.push((cstr(b"etc/nsswitch.conf")?, nsswitch.clone().into_bytes()));
    }

    let mut landlock_rules = Vec::new();
    if let Some(l) = &landlock {
        landlock_rules.push((cstr(b"/")?, l.read_exec));
        landlock_rules.push((path_c(&spec.sandbox_build_dir)?, l.write_tree));
        landlock_rules.push((path_c(&spec.store_dir)?, l.write_tree));
        landlock_rules.push((cstr(b"/dev/pts")?, l.dev_tree));
        landlock_rules.push((cstr(b"/dev/shm")?, l.dev_tree));
        for n in DEV_NODES {
            landlock_rules.push((cstr(format!("/dev/{n}").as_bytes())?, l.dev_file));
        }
    }

    let exec_path = path_c(&spec.builder)?;
    let mut argv = vec![exec_path.clone()];
    for a in &spec.args {
        argv.push(cstr(a.as_bytes())?);
    }
    let mut envp = Vec::new();
    for (k, v) in &spec.env {
        let mut kv = k.as_bytes().to_vec();
        if kv.is_empty() || kv.contains(&b'=') {
            return Err(SandboxError::Nul(k.to_string_lossy().into()));
        }
        kv.push(b'=');
        kv.extend_from_slice(v.as_bytes());
        envp.push(cstr(&kv)?);
    }
    let ptrs = |v: &[CString]| {
        v.iter()
            .map(|c| c.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect::<Vec<_>>()
    };
    let argv_ptrs = ptrs(&argv);
    let envp_ptrs = ptrs(&envp);

    let (uid, gid) = (spec.ids.inside_uid, spec.ids.inside_gid);
    Ok(Plan {
        clone_flags,
        cgroup_ns: true,
        loopback: private_net,
        new_proc: pid_ns,
        set_uts,
        pdeathsig: !cfg!(feature = "without-pdeathsig"),
        ids: spec.ids,
        stdio,
        go,
        report,
        sources,
        root_mount: path_c(&spec.build_dir)?,
        root_opts: cstr(format!("mode=0755,uid={uid},gid={gid},size=4m").as_bytes())?,
        skeleton,
        store,
        inputs,
        input_items,
        build,
        dev_nodes,
        dev_links,
        dev_pts: cstr(b"dev/pts")?,
        dev_pts_opts: cstr(b"newinstance,ptmxmode=0666,mode=0620")?,
        dev_shm: cstr(b"dev/shm")?,
        dev_shm_opts: cstr(format!("mode=1777,size={}", spec.dev_shm_size).as_bytes())?,
        proc_dir: cstr(b"proc")?,
        proc_bind,
        extra,
        etc_files,
        hostname: spec.hostname.as_bytes().to_vec(),
        domainname: spec.domainname.as_bytes().to_vec(),
        inside_build_dir: path_c(&spec.sandbox_build_dir)?,
        landlock: if cfg!(feature = "without-landlock") {
            None
        } else {
            landlock
        },
        landlock_rules,
        seccomp: if cfg!(feature = "without-seccomp") {
            Vec::new()
        } else {
            seccomp
        },
        no_new_privs: !cfg!(feature = "without-nnp"),
        drop_caps: !cfg!(feature = "without-caps"),
        last_cap: last_cap(),
        exec_path,
        argv,
        envp,
        argv_ptrs,
        envp_ptrs,
    })
}

/// The highest capability number the kernel knows.
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// Makes the inputs' mount points in the staging directory (an empty directory or file of the
/// input's type); inputs that are symlinks are copied as symlinks instead. Returns the names of
/// those. Runs as the helper, before the builder exists, on a descriptor of the staging
/// directory opened without following a symlink.
fn make_mount_points(spec: &SandboxSpec) -> Result<Vec<String>, SandboxError> {
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |e: nix::Error| SandboxError::Host {
            what,
            path,
            errno: e,
        }
    };
    let staging = sys::own(
        nix::fcntl::open(
            &spec.store_staging,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(io("opening the staging directory", &spec.store_staging))?,
    );
    let store = sys::own(
        nix::fcntl::open(
            &spec.host_store_dir,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(io("opening the store directory", &spec.host_store_dir))?,
    );
    let mut symlinks = Vec::new();
    for name in &spec.inputs {
        let host = spec.host_store_dir.join(name);
        let st = nix::sys::stat::fstatat(
            Some(store.as_raw_fd()),
            name.as_str(),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(io("reading an input", &host))?;
        let kind = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
        let target = spec.store_staging.join(name);
        if kind == SFlag::S_IFDIR {
            nix::sys::stat::mkdirat(
                Some(staging.as_raw_fd()),
                name.as_str(),
                Mode::from_bits_truncate(0o555),
            )
            .map_err(io("making a mount point", &target))?;
        } else if kind == SFlag::S_IFLNK {
            let link = nix::fcntl::readlinkat(Some(store.as_raw_fd()), name.as_str())
                .map_err(io("reading an input symlink", &host))?;
            nix::unistd::symlinkat(link.as_os_str(), Some(staging.as_raw_fd()), name.as_str())
                .map_err(io("copying an input symlink", &target))?;
            symlinks.push(name.clone());
        } else {
            let fd = nix::fcntl::openat(
                Some(staging.as_fd().as_raw_fd()),
                name.as_str(),
                OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o444),
            )
            .map_err(io("making a mount point", &target))?;
            drop(sys::own(fd));
        }
    }
    Ok(symlinks)
}
