//! Tests of the tables: they compile, and the lists keep their promises.

use super::*;

const ROOT_MASTER: SeccompProfile = SeccompProfile::Master {
    store_writer_restarts: false,
};

#[test]
fn profiles_compile() {
    for profile in [
        SeccompProfile::Broker,
        SeccompProfile::StoreWriter,
        SeccompProfile::Master {
            store_writer_restarts: false,
        },
        SeccompProfile::Master {
            store_writer_restarts: true,
        },
        SeccompProfile::RootsReader { control_fd: 3 },
    ] {
        for mode in [SeccompMode::Enforce, SeccompMode::Log] {
            let programs = compile(profile, mode, 1234).unwrap();
            assert_eq!(programs.len(), 3);
            for p in &programs {
                assert!(!p.is_empty() && p.len() < 4096);
            }
        }
    }
}

#[test]
fn lists_do_not_overlap_wrongly() {
    for profile in [
        SeccompProfile::Broker,
        SeccompProfile::StoreWriter,
        SeccompProfile::Master {
            store_writer_restarts: false,
        },
        SeccompProfile::Master {
            store_writer_restarts: true,
        },
        SeccompProfile::RootsReader { control_fd: 3 },
    ] {
        let deny = deny_list(profile).unwrap();
        let allow = allow_list(profile, 1).unwrap();
        for nr in deny.map.keys() {
            // clone is in both: namespace flags kill, CLONE_THREAD is allowed.
            if *nr != libc::SYS_clone {
                assert!(
                    !allow.map.contains_key(nr),
                    "syscall {nr} allowed and denied"
                );
            }
        }
    }
    let broker = allow_list(SeccompProfile::Broker, 1).unwrap();
    for nr in [
        libc::SYS_socket,
        libc::SYS_clone,
        libc::SYS_connect,
        libc::SYS_mkdirat,
    ] {
        assert!(!broker.map.contains_key(&nr));
    }
}

#[test]
fn duplicates_are_refused() {
    let mut r = Rules::default();
    r.allow(libc::SYS_read).unwrap();
    assert!(r.allow(libc::SYS_read).is_err());
}

#[test]
fn the_master_keeps_exec_and_identity_calls_and_nothing_that_writes_files() {
    let deny = deny_list(ROOT_MASTER).unwrap();
    let allow = allow_list(ROOT_MASTER, 1).unwrap();
    for nr in [
        libc::SYS_execve,
        libc::SYS_setresuid,
        libc::SYS_setresgid,
        libc::SYS_setgroups,
    ] {
        assert!(
            !deny.map.contains_key(&nr),
            "{nr} on the master's deny-list"
        );
        assert!(
            allow.map.contains_key(&nr),
            "{nr} not allowed to the master"
        );
    }
    // Still killed: the services' deny-list minus the four above.
    for nr in [
        libc::SYS_ptrace,
        libc::SYS_mount,
        libc::SYS_bpf,
        libc::SYS_execveat,
        libc::SYS_setuid,
        libc::SYS_unshare,
    ] {
        assert!(
            deny.map.contains_key(&nr),
            "{nr} not on the master's deny-list"
        );
    }
    // The services' deny-lists keep them.
    let broker_deny = deny_list(SeccompProfile::Broker).unwrap();
    assert!(broker_deny.map.contains_key(&libc::SYS_execve));
    assert!(broker_deny.map.contains_key(&libc::SYS_setresuid));
    // Nothing that changes the file system, nor openat2 (flags out of reach), nor bind.
    for nr in [
        libc::SYS_openat2,
        libc::SYS_mkdirat,
        libc::SYS_unlinkat,
        libc::SYS_renameat2,
        libc::SYS_linkat,
        libc::SYS_symlinkat,
        libc::SYS_fchmod,
        libc::SYS_fchmodat,
        libc::SYS_fchown,
        libc::SYS_fchownat,
        libc::SYS_truncate,
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_memfd_secret,
    ] {
        assert!(!allow.map.contains_key(&nr), "{nr} allowed to the master");
    }
    // A master that may start a new store-writer lets it do its work.
    let user = allow_list(
        SeccompProfile::Master {
            store_writer_restarts: true,
        },
        1,
    )
    .unwrap();
    for nr in [libc::SYS_mkdirat, libc::SYS_renameat2, libc::SYS_openat2] {
        assert!(
            user.map.contains_key(&nr),
            "{nr} refused to a user's master"
        );
    }
}

/// Run `call` in a forked child under `profile`'s filters; how the child ended: `Ok(0)` when
/// the call succeeded, `Ok(errno)` when it failed, `Err(signal)` when the child was killed.
fn in_filtered_child(profile: SeccompProfile, call: fn() -> libc::c_long) -> Result<i32, i32> {
    // Compiled before forking: the child only makes system calls.
    let programs = compile(profile, SeccompMode::Enforce, 0).unwrap();
    // SAFETY: the child installs prepared filters, makes one system call and `_exit`s; it
    // allocates nothing and takes no lock another test thread could hold.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        for p in &programs {
            if seccompiler::apply_filter(p).is_err() {
                // SAFETY: ends the forked child without running the parent's cleanup.
                unsafe { libc::_exit(200) };
            }
        }
        let rc = call();
        let code = if rc >= 0 {
            0
        } else {
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(201)
        };
        // SAFETY: as above.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for the child just forked; `status` is a valid out-pointer.
    let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(waited, pid);
    if libc::WIFEXITED(status) {
        Ok(libc::WEXITSTATUS(status))
    } else {
        Err(libc::WTERMSIG(status))
    }
}

#[test]
fn the_master_filter_refuses_in_the_kernel() {
    use std::ptr::null;
    let m = ROOT_MASTER;
    // SAFETY (each closure): raw system calls with null or scalar arguments; the kernel
    // validates them (and the filter answers first).
    let ptrace: fn() -> libc::c_long =
        || unsafe { libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0) };
    let mount: fn() -> libc::c_long = || unsafe {
        libc::syscall(
            libc::SYS_mount,
            null::<u8>(),
            null::<u8>(),
            null::<u8>(),
            0,
            null::<u8>(),
        )
    };
    let bpf: fn() -> libc::c_long = || unsafe { libc::syscall(libc::SYS_bpf, 0, 0, 0) };
    for (name, call) in [("ptrace", ptrace), ("mount", mount), ("bpf", bpf)] {
        assert_eq!(
            in_filtered_child(m, call),
            Err(libc::SIGSYS),
            "{name} must kill"
        );
    }
    let inet: fn() -> libc::c_long =
        || unsafe { libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0) };
    let inet6: fn() -> libc::c_long =
        || unsafe { libc::syscall(libc::SYS_socket, libc::AF_INET6, libc::SOCK_DGRAM, 0) };
    let netlink: fn() -> libc::c_long =
        || unsafe { libc::syscall(libc::SYS_socket, libc::AF_NETLINK, libc::SOCK_RAW, 0) };
    // An address (any non-null pointer) in sendto: refused before the kernel looks at it.
    let sendto_addr: fn() -> libc::c_long =
        || unsafe { libc::syscall(libc::SYS_sendto, -1, null::<u8>(), 0, 0, 8usize, 16) };
    let write_open: fn() -> libc::c_long = || unsafe {
        libc::syscall(
            libc::SYS_openat,
            libc::AT_FDCWD,
            c"/dev/null".as_ptr(),
            libc::O_WRONLY,
            0,
        )
    };
    let trunc_open: fn() -> libc::c_long = || unsafe {
        libc::syscall(
            libc::SYS_openat,
            libc::AT_FDCWD,
            c"/dev/null".as_ptr(),
            libc::O_RDONLY | libc::O_TRUNC,
            0,
        )
    };
    let exec_mmap: fn() -> libc::c_long = || unsafe {
        libc::syscall(
            libc::SYS_mmap,
            0,
            4096,
            libc::PROT_READ | libc::PROT_EXEC,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    let group_kill: fn() -> libc::c_long = || unsafe { libc::syscall(libc::SYS_kill, 0, 0) };
    for (name, call) in [
        ("socket(AF_INET)", inet),
        ("socket(AF_INET6)", inet6),
        ("socket(AF_NETLINK)", netlink),
        ("sendto with an address", sendto_addr),
        ("openat O_WRONLY", write_open),
        ("openat O_TRUNC", trunc_open),
        ("mmap PROT_EXEC", exec_mmap),
        ("kill(0)", group_kill),
    ] {
        assert_eq!(
            in_filtered_child(m, call),
            Ok(libc::EPERM),
            "{name} must fail with EPERM"
        );
    }
    // What the master needs still works.
    let unix: fn() -> libc::c_long =
        || unsafe { libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0) };
    let read_open: fn() -> libc::c_long = || unsafe {
        libc::syscall(
            libc::SYS_openat,
            libc::AT_FDCWD,
            c"/dev/null".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
            0,
        )
    };
    let signal_self: fn() -> libc::c_long =
        || unsafe { libc::syscall(libc::SYS_kill, libc::getpid(), 0) };
    let fork: fn() -> libc::c_long = || unsafe {
        let pid = libc::fork();
        if pid == 0 {
            libc::_exit(0);
        }
        if pid > 0 {
            let mut st = 0;
            libc::waitpid(pid, &mut st, 0);
        }
        libc::c_long::from(pid)
    };
    for (name, call) in [
        ("socket(AF_UNIX)", unix),
        ("openat O_RDONLY", read_open),
        ("kill(own pid, 0)", signal_self),
        ("fork", fork),
    ] {
        assert_eq!(in_filtered_child(m, call), Ok(0), "{name} must work");
    }
    // The services' filters kill on what the master may do.
    assert_eq!(
        in_filtered_child(SeccompProfile::Broker, fork),
        Ok(libc::EPERM)
    );
}

#[test]
fn the_roots_reader_filter_refuses_in_the_kernel() {
    use std::ptr::null;
    let p = SeccompProfile::RootsReader { control_fd: 3 };
    // SAFETY (each closure): raw system calls with null or scalar arguments; the kernel
    // validates them (and the filter answers first).
    let ptrace: fn() -> libc::c_long =
        || unsafe { libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0) };
    let vm_read: fn() -> libc::c_long = || unsafe {
        libc::syscall(
            libc::SYS_process_vm_readv,
            1,
            null::<u8>(),
            0,
            null::<u8>(),
            0,
            0,
        )
    };
    let by_handle: fn() -> libc::c_long =
        || unsafe { libc::syscall(libc::SYS_open_by_handle_at, -1, null::<u8>(), 0) };
    for (name, call) in [
        ("ptrace", ptrace),
        ("process_vm_readv", vm_read),
        ("open_by_handle_at", by_handle),
    ] {
        assert_eq!(
            in_filtered_child(p, call),
            Err(libc::SIGSYS),
            "{name} must kill"
        );
    }
    let unix: fn() -> libc::c_long =
        || unsafe { libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0) };
    let write_open: fn() -> libc::c_long = || unsafe {
        libc::syscall(
            libc::SYS_openat,
            libc::AT_FDCWD,
            c"/dev/null".as_ptr(),
            libc::O_WRONLY,
            0,
        )
    };
    let creat: fn() -> libc::c_long = || unsafe {
        libc::syscall(
            libc::SYS_openat,
            libc::AT_FDCWD,
            c"/tmp/stockade-roots-reader-seccomp-test".as_ptr(),
            libc::O_RDONLY | libc::O_CREAT,
            0o600,
        )
    };
    let openat2: fn() -> libc::c_long =
        || unsafe { libc::syscall(libc::SYS_openat2, libc::AT_FDCWD, null::<u8>(), 0, 0) };
    let write_other: fn() -> libc::c_long =
        || unsafe { libc::syscall(libc::SYS_write, 5, null::<u8>(), 0) };
    let send_other: fn() -> libc::c_long =
        || unsafe { libc::syscall(libc::SYS_sendmsg, 4, null::<u8>(), 0) };
    let fork: fn() -> libc::c_long = || unsafe { libc::fork() as libc::c_long };
    let signal: fn() -> libc::c_long = || unsafe { libc::syscall(libc::SYS_kill, 1, 0) };
    for (name, call) in [
        ("socket(AF_UNIX)", unix),
        ("openat O_WRONLY", write_open),
        ("openat O_CREAT", creat),
        ("openat2", openat2),
        ("write to fd 5", write_other),
        ("sendmsg on fd 4", send_other),
        ("fork", fork),
        ("kill", signal),
    ] {
        assert_eq!(
            in_filtered_child(p, call),
            Ok(libc::EPERM),
            "{name} must fail with EPERM"
        );
    }
    let read_open: fn() -> libc::c_long = || unsafe {
        libc::syscall(
            libc::SYS_openat,
            libc::AT_FDCWD,
            c"/proc/self/maps".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
            0,
        )
    };
    let write_err: fn() -> libc::c_long =
        || unsafe { libc::syscall(libc::SYS_write, 2, null::<u8>(), 0) };
    for (name, call) in [("openat O_RDONLY", read_open), ("write to fd 2", write_err)] {
        assert_eq!(in_filtered_child(p, call), Ok(0), "{name} must work");
    }
}
