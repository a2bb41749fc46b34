//! Locking the process down once it is set up (after the database, the directories and the
//! audit sockets are open, before the first broker request is read).

use nix::errno::Errno;

/// `no_new_privs` (nothing exec'd could gain privileges) and not dumpable (no core dumps, no
/// ptrace by same-uid processes, /proc/<pid>/ files owned by root).
pub fn lock_down() -> Result<(), Errno> {
    nix::sys::prctl::set_no_new_privs()?;
    nix::sys::prctl::set_dumpable(false)?;
    // Seccomp and landlock go here (a separate change): an allow-list without execve, socket
    // creation or the mount family, and landlock rules granting read-write access to the
    // real store directory, the state directory and the log directory only. Everything the
    // store-writer opens later (temproots files, gc.lock, gc-socket, log files, database
    // readers, /etc/passwd for per-user directories) must stay inside those rules.
    Ok(())
}
