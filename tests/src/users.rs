//! Local test users, created on demand on the host (`useradd`), always named `st-*`.

use std::ffi::CString;
use std::process::Command;
use std::sync::Mutex;

use nix::unistd::{Gid, Uid};

use crate::HarnessError;

/// A local account a client command can run as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, as `initgroups` would set them.
    pub groups: Vec<u32>,
}

impl User {
    /// The account the harness itself runs as (root in the namespace tests).
    pub fn current() -> Result<User, HarnessError> {
        let uid = Uid::current();
        let u = nix::unistd::User::from_uid(uid)
            .map_err(|e| HarnessError::User(format!("looking up uid {uid}: {e}")))?
            .ok_or_else(|| HarnessError::User(format!("uid {uid} has no passwd entry")))?;
        Self::from_passwd(u)
    }

    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    fn from_passwd(u: nix::unistd::User) -> Result<User, HarnessError> {
        let cname = CString::new(u.name.clone())
            .map_err(|_| HarnessError::User(format!("bad user name {:?}", u.name)))?;
        let groups = nix::unistd::getgrouplist(&cname, u.gid)
            .map_err(|e| HarnessError::User(format!("groups of {}: {e}", u.name)))?;
        Ok(User {
            name: u.name,
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
            groups: groups.into_iter().map(Gid::as_raw).collect(),
        })
    }

    pub(crate) fn ids(&self) -> (Uid, Gid, Vec<Gid>) {
        (
            Uid::from_raw(self.uid),
            Gid::from_raw(self.gid),
            self.groups.iter().map(|g| Gid::from_raw(*g)).collect(),
        )
    }
}

/// Serialises `useradd` calls from parallel tests of one test binary.
static USERADD: Mutex<()> = Mutex::new(());

/// Returns the local user `name`, creating it (system account, own group, no home, no login
/// shell) if it does not exist. Only `st-*` names are accepted so that a test can never alter
/// a real account. Safe to call from parallel tests and processes.
pub fn ensure_user(name: &str) -> Result<User, HarnessError> {
    let valid = name.strip_prefix("st-").is_some_and(|rest| {
        !rest.is_empty()
            && rest.len() <= 28
            && rest
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    });
    if !valid {
        return Err(HarnessError::User(format!(
            "test user names must look like st-[a-z0-9-]+, not {name:?}"
        )));
    }
    let lookup = || {
        nix::unistd::User::from_name(name)
            .map_err(|e| HarnessError::User(format!("looking up {name}: {e}")))
    };
    if let Some(u) = lookup()? {
        return User::from_passwd(u);
    }
    let _guard = USERADD.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(u) = lookup()? {
        return User::from_passwd(u);
    }
    let out = Command::new("useradd")
        .args([
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            "--comment",
            "Stockade test user",
            name,
        ])
        .output()
        .map_err(|e| HarnessError::User(format!("running useradd: {e}")))?;
    // Another process may have created it meanwhile; that is success too.
    match lookup()? {
        Some(u) => User::from_passwd(u),
        None => Err(HarnessError::User(format!(
            "useradd {name} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
    }
}
