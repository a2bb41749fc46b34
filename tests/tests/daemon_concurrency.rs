//! Sixteen real clients at once, of four users (root and st-alice trusted, st-bob and
//! st-mallory not), each adding a file of its own and one file they all add, and querying
//! both: every client succeeds, and afterwards the database holds exactly the expected paths.
//!
//! Needs root (namespaces, useradd); fails loudly in CI without it.

use std::collections::BTreeSet;

use stockade_common::hash::Hash;
use stockade_common::store_path::{FileIngestion, StoreDir};
use stockade_tests::raw::{flat_nar, RawConn};
use stockade_tests::sec::{builder, staging_leftovers};
use stockade_tests::{ensure_user, skip_unless_root, DaemonKind, User};

const CLIENTS: usize = 16;

/// The path `nix-store --add` gives a regular, non-executable file.
fn added_path(name: &str, contents: &[u8]) -> String {
    let sd = StoreDir::new("/nix/store").unwrap();
    let p = sd
        .make_fixed_output_path(
            name,
            FileIngestion::Recursive,
            &Hash::sha256(&flat_nar(contents)),
            &BTreeSet::new(),
            false,
        )
        .unwrap();
    sd.display(&p)
}

#[test]
fn sixteen_clients_at_once() {
    skip_unless_root!();
    let users: Vec<Option<User>> = vec![
        None,
        Some(ensure_user("st-alice").unwrap()),
        Some(ensure_user("st-bob").unwrap()),
        Some(ensure_user("st-mallory").unwrap()),
    ];
    let d = builder(DaemonKind::Stockade)
        .conf_line("trusted-users = root st-alice")
        .start()
        .expect("stockade");
    let shared = b"every client adds this\n";
    let shared_file = d.write_work_file("shared.txt", shared);
    let mut expected = BTreeSet::from([added_path("shared.txt", shared)]);
    let mut files = Vec::new();
    for i in 0..CLIENTS {
        let contents = format!("client {i}\n");
        let name = format!("own-{i}.txt");
        files.push(d.write_work_file(&name, contents.as_bytes()));
        expected.insert(added_path(&name, contents.as_bytes()));
    }
    // The harness creates a user's home on first use, and two threads doing that at once
    // race (one may start before the other has chowned it): create them one by one first.
    for u in users.iter().flatten() {
        d.run_as_ok(u, ["true"]);
    }
    // A raw client holds a connection open throughout, as a bystander.
    let mut bystander = RawConn::connect(&d).expect("bystander");
    bystander.handshake().expect("handshake");

    let script = "set -e
        own=$(nix-store --add \"$OWN\")
        shared=$(nix-store --add \"$SHARED\")
        nix-store --check-validity \"$own\" \"$shared\"
        nix-store -q --hash \"$own\" >/dev/null
        nix-store -q --references \"$shared\" >/dev/null
        echo \"$own\"
        echo \"$shared\"";
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|i| {
                let d = &d;
                let user = users[i % users.len()].clone();
                let own = files[i].clone();
                let shared_file = shared_file.clone();
                s.spawn(move || {
                    let mut c = d
                        .cmd("sh")
                        .args(["-c", script])
                        .env("OWN", &own)
                        .env("SHARED", &shared_file);
                    if let Some(u) = &user {
                        c = c.as_user(u);
                    }
                    c.output()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    });
    let mut seen = BTreeSet::new();
    for (i, r) in results.iter().enumerate() {
        assert!(r.success(), "client {i} failed: {r}\n{}", d.log_tail(30));
        let lines: Vec<String> = r.stdout_str().lines().map(str::to_string).collect();
        assert_eq!(lines.len(), 2, "client {i}: {r}");
        assert_eq!(
            lines[0],
            added_path(&format!("own-{i}.txt"), format!("client {i}\n").as_bytes())
        );
        assert_eq!(lines[1], added_path("shared.txt", shared));
        seen.extend(lines);
    }
    assert_eq!(seen, expected);

    // The database holds exactly these paths, each once, as every kind of client sees it.
    let all = bystander
        .query_all_valid_paths()
        .expect("QueryAllValidPaths");
    assert_eq!(all, expected, "QueryAllValidPaths");
    let listed: BTreeSet<String> = d
        .cmd("nix")
        .args(["path-info", "--all"])
        .env("NIX_CONFIG", "experimental-features = nix-command")
        .ok()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(listed, expected, "nix path-info --all");
    let out = d
        .cmd("nix-store")
        .args(["--verify", "--check-contents"])
        .as_user(users[2].as_ref().unwrap())
        .output();
    assert!(out.success(), "{out}");
    assert!(staging_leftovers(&d).is_empty());
}
