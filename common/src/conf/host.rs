//! Facts about the machine and environment that Nix 2.8's defaults depend on.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::parse::canon_path;

/// Inputs of the machine-dependent defaults. [`HostFacts::detect`] reads them the way Nix 2.8
/// does; [`HostFacts::generic`] is a fixed machine for tests and fuzzing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFacts {
    /// Online CPUs (`std::thread::hardware_concurrency`): default `cores`, `max-jobs = auto`.
    pub cpus: u32,
    /// Nix system type of this build of Stockade, e.g. `x86_64-linux`.
    pub system: String,
    /// Default `extra-platforms`.
    pub extra_platforms: BTreeSet<String>,
    /// Default `system-features`.
    pub system_features: BTreeSet<String>,
    /// Running as root: then `build-users-group` defaults to `nixbld`, else to empty.
    pub is_root: bool,
    /// WSL1 kernel: no SQLite WAL, no `i686-linux`.
    pub wsl1: bool,
    /// Default `store`: `$NIX_REMOTE` or `auto`.
    pub store_uri: String,
    /// `$NIX_LIBEXEC_DIR` or Debian's `/usr/libexec`, for the default `build-hook`.
    pub libexec_dir: String,
}

impl HostFacts {
    /// A fixed machine: 1 CPU, `x86_64-linux` with `i686-linux`, no kvm, root.
    pub fn generic() -> Self {
        HostFacts {
            cpus: 1,
            system: "x86_64-linux".into(),
            extra_platforms: ["i686-linux".to_string()].into(),
            system_features: base_system_features(),
            is_root: true,
            wsl1: false,
            store_uri: "auto".into(),
            libexec_dir: "/usr/libexec".into(),
        }
    }

    /// Look at this machine (reads `/sys`, `/proc`, `/dev/kvm` access and the environment).
    pub fn detect() -> Self {
        let system = this_system();
        let wsl1 = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|r| r.trim_end().ends_with("-Microsoft"))
            .unwrap_or(false);
        let mut extra_platforms = BTreeSet::new();
        if system == "x86_64-linux" && !wsl1 {
            extra_platforms.insert("i686-linux".to_string());
        }
        if cfg!(target_arch = "x86_64") {
            if let Ok(cpuinfo) = std::fs::read_to_string("/proc/cpuinfo") {
                for level in x86_64_levels(&cpuinfo) {
                    extra_platforms.insert(format!("{level}-linux"));
                }
            }
        }
        let mut system_features = base_system_features();
        let rw = nix::unistd::AccessFlags::R_OK | nix::unistd::AccessFlags::W_OK;
        if nix::unistd::access("/dev/kvm", rw).is_ok() {
            system_features.insert("kvm".into());
        }
        let env_path = |var: &str, default: &str| {
            std::env::var(var)
                .ok()
                .and_then(|v| canon_path(&v))
                .unwrap_or_else(|| default.to_owned())
        };
        HostFacts {
            cpus: online_cpus(),
            system,
            extra_platforms,
            system_features,
            is_root: nix::unistd::getuid().is_root(),
            wsl1,
            store_uri: std::env::var("NIX_REMOTE").unwrap_or_else(|_| "auto".into()),
            libexec_dir: env_path("NIX_LIBEXEC_DIR", "/usr/libexec"),
        }
    }
}

/// Features Nix always claims, for Nixpkgs' routing of builds to machines.
fn base_system_features() -> BTreeSet<String> {
    ["benchmark", "big-parallel", "nixos-test"]
        .into_iter()
        .map(String::from)
        .collect()
}

/// Nix's `SYSTEM` for the architecture this was compiled for.
fn this_system() -> String {
    let arch = match std::env::consts::ARCH {
        "x86" => "i686",
        "arm" => "armv7l",
        "powerpc64" if cfg!(target_endian = "little") => "powerpc64le",
        other => other,
    };
    format!("{arch}-{}", std::env::consts::OS)
}

/// glibc's `get_nprocs` (behind `hardware_concurrency`) counts `/sys/devices/system/cpu/online`,
/// which ignores affinity masks and cgroup quotas, unlike `available_parallelism`.
fn online_cpus() -> u32 {
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|s| count_cpu_list(s.trim()))
        .or_else(|| {
            std::thread::available_parallelism()
                .ok()
                .and_then(|n| u32::try_from(n.get()).ok())
        })
        .unwrap_or(1)
        .max(1)
}

/// Count a kernel CPU list such as `0-3,5,7-8`.
fn count_cpu_list(list: &str) -> Option<u32> {
    let mut n: u32 = 0;
    for part in list.split(',') {
        let count = match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                b.checked_sub(a)?.checked_add(1)?
            }
            None => {
                part.parse::<u32>().ok()?;
                1
            }
        };
        n = n.checked_add(count)?;
    }
    (n > 0).then_some(n)
}

/// The x86-64 micro-architecture levels Nix 2.8 (`computeLevels`, via libcpuid) reports, from
/// the first `flags` line of `/proc/cpuinfo`. libcpuid up to 0.6.2 (the one Debian's nix 2.8
/// links) reads the AVX-512 bits only on Intel CPUs, so `x86_64-v4` needs `GenuineIntel`: we
/// reproduce that, since this decides which derivations count as buildable here.
fn x86_64_levels(cpuinfo: &str) -> Vec<&'static str> {
    let field = |key: &str| {
        cpuinfo.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == key).then(|| v.trim())
        })
    };
    let Some(flags) = field("flags") else {
        return vec![];
    };
    let flags: BTreeSet<&str> = flags.split_whitespace().collect();
    let all = |wanted: &[&str]| wanted.iter().all(|f| flags.contains(f));
    let intel = field("vendor_id") == Some("GenuineIntel");
    let mut levels = vec![];
    if !all(&["cmov", "cx8", "fpu", "fxsr", "mmx", "sse", "sse2"]) {
        return levels;
    }
    levels.push("x86_64-v1");
    if !all(&[
        "cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2",
    ]) {
        return levels;
    }
    levels.push("x86_64-v2");
    // `abm` is how Linux names LZCNT.
    if !all(&["avx", "avx2", "f16c", "fma", "abm", "movbe"]) {
        return levels;
    }
    levels.push("x86_64-v3");
    if intel && all(&["avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"]) {
        levels.push("x86_64-v4");
    }
    levels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(count_cpu_list("0"), Some(1));
        assert_eq!(count_cpu_list("0-1"), Some(2));
        assert_eq!(count_cpu_list("0-3,5,7-8"), Some(7));
        assert_eq!(count_cpu_list(""), None);
        assert_eq!(count_cpu_list("3-1"), None);
        assert_eq!(count_cpu_list("0-4294967295"), None);
    }

    const V3: &str = "fpu cx8 cmov mmx fxsr sse sse2 pni ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt avx f16c lahf_lm abm avx2";
    const V4: &str = "avx512f avx512dq avx512cd avx512bw avx512vl";

    #[test]
    fn levels() {
        let amd = format!(
            "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: {V3} {V4}\n\nprocessor\t: 1\n"
        );
        assert_eq!(x86_64_levels(&amd), ["x86_64-v1", "x86_64-v2", "x86_64-v3"]);
        let intel = amd.replace("AuthenticAMD", "GenuineIntel");
        assert_eq!(x86_64_levels(&intel).last(), Some(&"x86_64-v4"));
        let no_abm = format!("vendor_id: GenuineIntel\nflags: {}", V3.replace(" abm", ""));
        assert_eq!(x86_64_levels(&no_abm), ["x86_64-v1", "x86_64-v2"]);
        assert!(x86_64_levels("flags: sse sse2").is_empty());
        assert!(x86_64_levels("nothing here").is_empty());
    }

    #[test]
    fn detect_is_sane() {
        let h = HostFacts::detect();
        assert!(h.cpus >= 1);
        assert!(h.system.ends_with("-linux"), "{}", h.system);
        assert!(h.system_features.contains("big-parallel"));
        assert!(h.libexec_dir.starts_with('/'));
    }
}
