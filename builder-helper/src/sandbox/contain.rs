//! The containment routine: what the sandbox's first process (pid 1 of its pid namespace, root
//! of its user namespace) does between `clone` and `execve`, in this order:
//!
//! 1. parent-death signal; wait for the parent to write the id maps and join the cgroup;
//! 2. cgroup namespace (rooted at the build's cgroup); every mount made private;
//! 3. open the host sources (`O_PATH`) with the helper's file-system identity;
//! 4. mount the new root's tmpfs over the build directory's path (hidden only here), step
//!    into it;
//! 5. become the build user (`setresgid`, `setresuid`; capabilities in the namespace kept for
//!    the mounts), parent-death signal again (a uid change clears it), parent still there?;
//! 6. the skeleton: store directory (the staging directory, read-write) with the input
//!    closure bound read-only on it, the build directory, `/dev` (host nodes bound, a new
//!    `devpts`, a tmpfs on `/dev/shm`), `/proc`, `sandbox-paths` (read-only), `/etc` files;
//! 7. host name, domain name, `lo` up;
//! 8. `pivot_root` and detach the old root; the new root read-only;
//! 9. into the build directory; no core dumps; every descriptor but 0-2 closed on exec;
//! 10. `no_new_privs`, Landlock (rules on the sandbox's own paths, then the domain), seccomp,
//!     every capability set emptied, `execve`.
//!
//! The first failing step is reported to the parent as (step, item, errno) and the process
//! exits; nothing here allocates (see [`super::plan`]).

use std::ffi::{CStr, OsStr};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::prctl;
use nix::sys::signal::Signal;
use nix::sys::stat::{Mode, SFlag};

use super::plan::{Bind, Plan, SRC_PROC};
use super::sys;

/// Declares [`Step`] (numbered from 1, in order) and the table that reads a number back.
macro_rules! steps {
    ($first:ident, $($name:ident),* $(,)?) => {
        /// Where the routine stopped. The numbers travel over the report pipe.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(u32)]
        pub enum Step {
            $first = 1,
            $($name),*
        }

        impl Step {
            pub fn from_u32(n: u32) -> Option<Step> {
                [Step::$first, $(Step::$name),*]
                    .into_iter()
                    .find(|s| *s as u32 == n)
            }
        }
    };
}

steps!(
    Stdio,
    ParentGone,
    CgroupNs,
    MakePrivate,
    OpenSource,
    RootTmpfs,
    EnterRoot,
    Identity,
    Skeleton,
    BindStore,
    BindInput,
    BindBuild,
    DevNode,
    DevPts,
    DevShm,
    DevLink,
    Proc,
    SandboxPath,
    EtcFile,
    HostName,
    DomainName,
    Loopback,
    PivotRoot,
    RootReadOnly,
    BuildDir,
    Limits,
    CloseFds,
    NoNewPrivs,
    Landlock,
    Seccomp,
    Capabilities,
    Exec,
);

/// Exit status of the sandbox's first process when setup failed (the report says why).
pub const SETUP_FAILED: i32 = 127;

/// Runs the routine; never returns.
pub fn contain(plan: &Plan) -> ! {
    match run(plan) {
        Ok(never) => match never {},
        Err((step, item, errno)) => {
            let mut msg = [0u8; 12];
            msg[0..4].copy_from_slice(&(step as u32).to_ne_bytes());
            msg[4..8].copy_from_slice(&item.to_ne_bytes());
            msg[8..12].copy_from_slice(&(errno as i32).to_ne_bytes());
            let _ = nix::unistd::write(plan.report.as_fd(), &msg);
            sys::exit_now(SETUP_FAILED)
        }
    }
}

enum Never {}

type Failure = (Step, u32, Errno);

trait At<T> {
    fn at(self, step: Step, item: usize) -> Result<T, Failure>;
}

impl<T> At<T> for nix::Result<T> {
    fn at(self, step: Step, item: usize) -> Result<T, Failure> {
        self.map_err(|e| (step, item as u32, e))
    }
}

fn run(plan: &Plan) -> Result<Never, Failure> {
    // 1.
    for (i, fd) in plan.stdio.iter().enumerate() {
        nix::unistd::dup2(fd.as_raw_fd(), i as RawFd).at(Step::Stdio, i)?;
    }
    if plan.pdeathsig {
        prctl::set_pdeathsig(Signal::SIGKILL).at(Step::ParentGone, 0)?;
    }
    let mut byte = [0u8; 1];
    match nix::unistd::read(plan.go.as_raw_fd(), &mut byte) {
        Ok(1) => {}
        Ok(_) => return Err((Step::ParentGone, 0, Errno::EPIPE)),
        Err(e) => return Err((Step::ParentGone, 0, e)),
    }

    // 2.
    if plan.cgroup_ns {
        nix::sched::unshare(CloneFlags::CLONE_NEWCGROUP).at(Step::CgroupNs, 0)?;
    }
    mount(
        None::<&CStr>,
        c"/",
        None::<&CStr>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&CStr>,
    )
    .at(Step::MakePrivate, 0)?;

    // 3.
    for (i, src) in plan.sources.iter().enumerate() {
        let fd = match nix::fcntl::open(
            src.path.as_c_str(),
            src.flags | OFlag::O_PATH | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) if src.optional => {
                // Its number may hold a descriptor another thread of the helper had open at
                // the clone: make sure it is free, so step 6 sees the source as missing.
                let _ = nix::unistd::close(src.number);
                continue;
            }
            Err(e) => return Err((Step::OpenSource, i as u32, e)),
        };
        if fd != src.number {
            nix::unistd::dup3(fd, src.number, OFlag::O_CLOEXEC).at(Step::OpenSource, i)?;
            nix::unistd::close(fd).at(Step::OpenSource, i)?;
        }
    }

    // 4.
    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount(
        Some(c"tmpfs"),
        plan.root_mount.as_c_str(),
        Some(c"tmpfs"),
        nosuid_nodev,
        Some(plan.root_opts.as_c_str()),
    )
    .at(Step::RootTmpfs, 0)?;
    nix::unistd::chdir(plan.root_mount.as_c_str()).at(Step::EnterRoot, 0)?;

    // 5.
    become_build_user(plan)?;

    // 6.
    for (i, dir) in plan.skeleton.iter().enumerate() {
        match nix::unistd::mkdir(dir.as_c_str(), Mode::from_bits_truncate(0o755)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err((Step::Skeleton, i as u32, e)),
        }
    }
    bind(&plan.store, Step::BindStore, 0)?;
    for (input, item) in plan.inputs.iter().zip(&plan.input_items) {
        bind(input, Step::BindInput, *item)?;
    }
    bind(&plan.build, Step::BindBuild, 0)?;
    for (i, node) in plan.dev_nodes.iter().enumerate() {
        make_file(node.target.as_c_str()).at(Step::DevNode, i)?;
        bind(node, Step::DevNode, i)?;
    }
    let hardened = nosuid_nodev | MsFlags::MS_NOEXEC;
    mount(
        Some(c"devpts"),
        plan.dev_pts.as_c_str(),
        Some(c"devpts"),
        hardened,
        Some(plan.dev_pts_opts.as_c_str()),
    )
    .at(Step::DevPts, 0)?;
    mount(
        Some(c"tmpfs"),
        plan.dev_shm.as_c_str(),
        Some(c"tmpfs"),
        nosuid_nodev,
        Some(plan.dev_shm_opts.as_c_str()),
    )
    .at(Step::DevShm, 0)?;
    for (i, (target, path)) in plan.dev_links.iter().enumerate() {
        nix::unistd::symlinkat(target.as_c_str(), None, path.as_c_str()).at(Step::DevLink, i)?;
    }
    match &plan.proc_bind {
        None => mount(
            Some(c"proc"),
            plan.proc_dir.as_c_str(),
            Some(c"proc"),
            hardened,
            None::<&CStr>,
        )
        .at(Step::Proc, 0)?,
        Some(b) => bind(b, Step::Proc, SRC_PROC)?,
    }
    for (i, extra) in plan.extra.iter().enumerate() {
        let number = plan.sources[extra.source].number;
        let st = match nix::sys::stat::fstat(number) {
            Ok(st) => st,
            // An optional source that was missing was never opened.
            Err(Errno::EBADF) if plan.sources[extra.source].optional => continue,
            Err(e) => return Err((Step::SandboxPath, i as u32, e)),
        };
        let target = extra.bind.target.as_c_str();
        if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFDIR {
            match nix::unistd::mkdir(target, Mode::from_bits_truncate(0o755)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err((Step::SandboxPath, i as u32, e)),
            }
        } else {
            make_file(target).at(Step::SandboxPath, i)?;
        }
        bind(&extra.bind, Step::SandboxPath, i)?;
    }
    for (i, (path, contents)) in plan.etc_files.iter().enumerate() {
        write_file(path.as_c_str(), contents).at(Step::EtcFile, i)?;
    }

    // 7.
    if plan.set_uts {
        nix::unistd::sethostname(OsStr::from_bytes(&plan.hostname)).at(Step::HostName, 0)?;
        sys::set_domainname(&plan.domainname).at(Step::DomainName, 0)?;
    }
    if plan.loopback {
        sys::loopback_up().at(Step::Loopback, 0)?;
    }

    // 8.
    nix::unistd::pivot_root(c".", c".").at(Step::PivotRoot, 0)?;
    umount2(c".", MntFlags::MNT_DETACH).at(Step::PivotRoot, 1)?;
    nix::unistd::chdir(c"/").at(Step::PivotRoot, 2)?;
    sys::make_read_only(c"/", false).at(Step::RootReadOnly, 0)?;

    // 9.
    nix::unistd::chdir(plan.inside_build_dir.as_c_str()).at(Step::BuildDir, 0)?;
    nix::sys::resource::setrlimit(
        nix::sys::resource::Resource::RLIMIT_CORE,
        0,
        nix::sys::resource::RLIM_INFINITY,
    )
    .at(Step::Limits, 0)?;
    sys::cloexec_from(3).at(Step::CloseFds, 0)?;

    // 10.
    if plan.no_new_privs {
        prctl::set_no_new_privs().at(Step::NoNewPrivs, 0)?;
    }
    if let Some(l) = &plan.landlock {
        for (i, (path, access)) in plan.landlock_rules.iter().enumerate() {
            let fd = nix::fcntl::open(
                path.as_c_str(),
                OFlag::O_PATH | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .at(Step::Landlock, i)?;
            let fd = sys::own(fd);
            sys::landlock_add_path_rule(l.ruleset.as_raw_fd(), fd.as_raw_fd(), *access)
                .at(Step::Landlock, i)?;
        }
        sys::landlock_restrict_self(l.ruleset.as_raw_fd()).at(Step::Landlock, usize::MAX)?;
    }
    for (i, program) in plan.seccomp.iter().enumerate() {
        sys::install_seccomp(program).at(Step::Seccomp, i)?;
    }
    if plan.drop_caps {
        sys::drop_all_capabilities(plan.last_cap).at(Step::Capabilities, 0)?;
    }
    Err((
        Step::Exec,
        0,
        sys::execve(&plan.exec_path, &plan.argv_ptrs, &plan.envp_ptrs),
    ))
}

/// Step 5: the build user's ids (inside the namespace), with the namespace's capabilities kept
/// for the mounts still to come; dumpable again (a uid change clears it, and `/proc/self/fd`
/// is only ours to follow while dumpable); the parent-death signal again, and a check that the
/// parent did not die in between.
fn become_build_user(plan: &Plan) -> Result<(), Failure> {
    // Supplementary groups of the helper go when the parent could allow setgroups (EPERM
    // otherwise, which is ignored).
    prctl::set_keepcaps(true).at(Step::Identity, 1)?;
    sys::set_ids(plan.ids.inside_uid, plan.ids.inside_gid, true)
        .map_err(|(i, e)| (Step::Identity, i as u32, e))?;
    sys::raise_permitted().at(Step::Identity, 4)?;
    prctl::set_keepcaps(false).at(Step::Identity, 5)?;
    prctl::set_dumpable(true).at(Step::Identity, 6)?;
    if plan.pdeathsig {
        prctl::set_pdeathsig(Signal::SIGKILL).at(Step::ParentGone, 1)?;
        let mut fds = [nix::poll::PollFd::new(
            plan.go.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let ready =
            nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).at(Step::ParentGone, 1)?;
        let hup = fds[0]
            .revents()
            .is_some_and(|r| r.contains(nix::poll::PollFlags::POLLHUP));
        if ready > 0 && hup {
            return Err((Step::ParentGone, 1, Errno::EPIPE));
        }
    }
    Ok(())
}

fn bind(b: &Bind, step: Step, item: usize) -> Result<(), Failure> {
    let mut flags = MsFlags::MS_BIND;
    if b.recursive {
        flags |= MsFlags::MS_REC;
    }
    mount(
        Some(b.source.as_c_str()),
        b.target.as_c_str(),
        None::<&CStr>,
        flags,
        None::<&CStr>,
    )
    .at(step, item)?;
    if b.read_only {
        sys::make_read_only(b.target.as_c_str(), b.recursive).at(step, item)?;
    }
    Ok(())
}

/// An empty file to bind a non-directory onto.
fn make_file(path: &CStr) -> nix::Result<()> {
    match nix::fcntl::open(
        path,
        OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o444),
    ) {
        Ok(fd) => {
            drop(sys::own(fd));
            Ok(())
        }
        Err(Errno::EEXIST) => Ok(()),
        Err(e) => Err(e),
    }
}

fn write_file(path: &CStr, contents: &[u8]) -> nix::Result<()> {
    let fd = sys::own(nix::fcntl::open(
        path,
        OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o444),
    )?);
    let mut rest = contents;
    while !rest.is_empty() {
        let n = nix::unistd::write(fd.as_fd(), rest)?;
        rest = &rest[n..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Step;

    #[test]
    fn step_numbers_read_back() {
        assert_eq!(Step::from_u32(0), None);
        assert_eq!(Step::from_u32(1), Some(Step::Stdio));
        assert_eq!(Step::from_u32(Step::Exec as u32), Some(Step::Exec));
        assert_eq!(Step::from_u32(Step::Exec as u32 + 1), None);
        for n in 1..=Step::Exec as u32 {
            assert_eq!(Step::from_u32(n).map(|s| s as u32), Some(n));
        }
    }
}
