use super::*;

const HYBRID_MOUNTS: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
const HYBRID_OWN: &str = "\
9:name=systemd:/
8:pids:/
6:freezer:/
4:memory:/process_api/abc
2:cpuacct:/
1:cpu:/
0::/
";

#[test]
fn hybrid_uses_v1_controllers() {
    let h = Hierarchies::from_texts(HYBRID_MOUNTS, HYBRID_OWN, |_| Some(String::new()));
    assert!(!h.is_v2());
    assert_eq!(
        h.v1.get("memory"),
        Some(&PathBuf::from("/sys/fs/cgroup/memory/process_api/abc"))
    );
    assert_eq!(
        h.v1.get("pids"),
        Some(&PathBuf::from("/sys/fs/cgroup/pids"))
    );
    assert!(h.v1.contains_key("cpuacct") && h.v1.contains_key("freezer"));
    assert!(h.missing().is_empty());
    assert_eq!(
        h.parents(Group::Builds),
        [
            "/sys/fs/cgroup/memory/process_api/abc/stockade-builds",
            "/sys/fs/cgroup/pids/stockade-builds",
            "/sys/fs/cgroup/cpuacct/stockade-builds",
            "/sys/fs/cgroup/freezer/stockade-builds",
        ]
        .map(PathBuf::from)
    );
    // Brokers: memory and pids only, under a parent of their own.
    assert!(h.any_for(Group::Brokers));
    assert_eq!(
        h.parents(Group::Brokers),
        [
            "/sys/fs/cgroup/memory/process_api/abc/stockade-brokers",
            "/sys/fs/cgroup/pids/stockade-brokers",
        ]
        .map(PathBuf::from)
    );
    assert_eq!(h.describe(Group::Brokers), "cgroup v1 (memory, pids)");
}

#[test]
fn unified_only() {
    let mounts = "25 20 0:22 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
    let own = "0::/system.slice/stockade.service\n";
    let h = Hierarchies::from_texts(mounts, own, |p| {
        assert_eq!(
            p,
            Path::new("/sys/fs/cgroup/system.slice/stockade.service/cgroup.controllers")
        );
        Some("cpu io memory pids\n".into())
    });
    assert_eq!(
        h.v2,
        Some(PathBuf::from(
            "/sys/fs/cgroup/system.slice/stockade.service"
        ))
    );
    assert!(h.missing().is_empty());
    assert_eq!(
        h.describe(Group::Builds),
        "cgroup v2 at /sys/fs/cgroup/system.slice/stockade.service/stockade-builds"
    );
    assert_eq!(
        h.parents(Group::Brokers),
        [PathBuf::from(
            "/sys/fs/cgroup/system.slice/stockade.service/stockade-brokers"
        )]
    );
}

/// Inside a container whose cgroup mount shows only its own subtree.
#[test]
fn mount_root_below_the_hierarchy_root() {
    let mounts = "25 20 0:22 /ctr /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
    let own = "0::/ctr/inner\n";
    let h = Hierarchies::from_texts(mounts, own, |_| Some("memory pids".into()));
    assert_eq!(
        h.parents(Group::Builds),
        [PathBuf::from("/sys/fs/cgroup/inner/stockade-builds")]
    );
}

#[test]
fn nothing_mounted() {
    let h = Hierarchies::from_texts("", "0::/\n", |_| None);
    assert!(!h.any() && !h.any_for(Group::Brokers));
    assert_eq!(h.missing(), &WANTED);
    assert_eq!(h.describe(Group::Brokers), "no cgroups");
    assert!(h.parents(Group::Brokers).is_empty());
}

#[test]
fn escaped_mount_points() {
    assert_eq!(unescape("/a\\040b"), "/a b");
    assert_eq!(unescape("/plain"), "/plain");
    assert_eq!(unescape("/trailing\\04"), "/trailing\\04");
}

/// A broker cgroup in a directory tree laid out as each kind of hierarchy: the limit files
/// it writes, what it reports enforced, and the events it reads back (a plain directory
/// stands for cgroupfs, which makes a file where the kernel would have one).
mod layouts {
    use super::*;

    const LIMITS: Limits = Limits {
        memory_bytes: Some(64 << 20),
        pids: Some(16),
    };

    fn read(p: PathBuf) -> String {
        fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    #[test]
    fn v2_broker_cgroup() {
        let root = tempfile::tempdir().unwrap();
        let own = root.path().join("stockade.service");
        let h = Hierarchies {
            v2: Some(own.clone()),
            ..Hierarchies::default()
        };
        let cg = h.create_in(Group::Brokers, "conn-7", LIMITS).unwrap();
        let dir = own.join("stockade-brokers/conn-7");
        assert_eq!(cg.dirs(), std::slice::from_ref(&dir));
        assert_eq!(read(dir.join("memory.max")), (64u64 << 20).to_string());
        assert_eq!(read(dir.join("memory.swap.max")), "0");
        assert_eq!(read(dir.join("pids.max")), "16");
        assert_eq!(
            read(own.join("stockade-brokers/cgroup.subtree_control")),
            "+memory +pids +cpu"
        );
        assert_eq!(
            cg.enforced(),
            Enforced {
                memory: true,
                pids: true
            }
        );
        fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 9\noom 1\noom_kill 1\n",
        )
        .unwrap();
        fs::write(dir.join("pids.events"), "max 3\n").unwrap();
        let u = cg.usage();
        assert_eq!((u.oom_kills, u.pids_refused), (Some(1), Some(3)));
    }

    #[test]
    fn v1_broker_cgroup() {
        let root = tempfile::tempdir().unwrap();
        let mut v1 = BTreeMap::new();
        for c in WANTED {
            v1.insert(c, root.path().join(c));
        }
        let h = Hierarchies {
            v1,
            ..Hierarchies::default()
        };
        let cg = h.create_in(Group::Brokers, "conn-8", LIMITS).unwrap();
        let mem = root.path().join("memory/stockade-brokers/conn-8");
        let pids = root.path().join("pids/stockade-brokers/conn-8");
        assert_eq!(cg.dirs(), [mem.clone(), pids.clone()]);
        // No directory in the hierarchies brokers do not use.
        assert!(!root.path().join("freezer/stockade-brokers").exists());
        assert!(!root.path().join("cpuacct/stockade-brokers").exists());
        assert_eq!(
            read(mem.join("memory.limit_in_bytes")),
            (64u64 << 20).to_string()
        );
        assert_eq!(read(pids.join("pids.max")), "16");
        assert!(cg.enforced().memory && cg.enforced().pids);
        fs::write(
            mem.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .unwrap();
        fs::write(pids.join("pids.events"), "max 4\n").unwrap();
        let u = cg.usage();
        assert_eq!((u.oom_kills, u.pids_refused), (Some(2), Some(4)));
    }

    /// v1 with the pids controller only: memory is reported not enforced (the broker then
    /// takes an rlimit for it).
    #[test]
    fn a_missing_controller_is_not_enforced() {
        let root = tempfile::tempdir().unwrap();
        let h = Hierarchies {
            v1: BTreeMap::from([("pids", root.path().join("pids"))]),
            ..Hierarchies::default()
        };
        let cg = h.create_in(Group::Brokers, "conn-9", LIMITS).unwrap();
        assert_eq!(
            cg.enforced(),
            Enforced {
                memory: false,
                pids: true
            }
        );
    }

    /// v2 where the parent's `subtree_control` could not enable memory (the daemon's cgroup
    /// holds processes): the child has no `memory.max`, here a directory to make the write
    /// fail as cgroupfs does.
    #[test]
    fn v2_without_the_memory_controller() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("stockade-brokers/conn-10");
        fs::create_dir_all(dir.join("memory.max")).unwrap();
        let h = Hierarchies {
            v2: Some(root.path().to_path_buf()),
            ..Hierarchies::default()
        };
        let cg = h.create_in(Group::Brokers, "conn-10", LIMITS).unwrap();
        assert_eq!(
            cg.enforced(),
            Enforced {
                memory: false,
                pids: true
            }
        );
    }
}
