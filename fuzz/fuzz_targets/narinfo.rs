#![no_main]
//! Hostile substituter text: narinfo, nix-cache-info, keys and signatures. Whatever parses must
//! print and parse back to the same value; nothing may panic.

use libfuzzer_sys::fuzz_target;
use stockade_common::narinfo::{CacheInfo, Limits, NarInfo};
use stockade_common::signature::{PublicKey, SecretKey, Signature, TrustedKeys};
use stockade_common::store_path::StoreDir;

// Generated once for the fuzzer; a fixed key keeps runs reproducible.
const SEC: &str = "fuzz-1:iExlok3z/ABEcAJwMbt2BpSZjTX3d94mstUxFFHP9gdJLavN9c6eydPJEHqIJIfmT/Ft9MxI3qo2CT8WsZt+fA==";

fuzz_target!(|data: &[u8]| {
    let sd = StoreDir::default();
    let key = SecretKey::parse(SEC).expect("built-in key");
    let keys: TrustedKeys = [key.to_public()].into_iter().collect();

    if let Ok(ni) = NarInfo::parse(&sd, data) {
        let text = ni.render(&sd).expect("a parsed narinfo prints");
        // Printing may add the defaulted lines (Compression, FileSize, References) and widen
        // a base16 hash to base32, so the second parse gets a little more room.
        let roomy = Limits {
            max_bytes: data.len() + 4096,
            max_lines: Limits::default().max_lines + 8,
            ..Limits::default()
        };
        let again = NarInfo::parse_with_limits(&sd, text.as_bytes(), &roomy)
            .expect("a printed narinfo parses");
        assert_eq!(again, ni);
        assert_eq!(again.render(&sd).expect("prints again"), text);

        let mut info = ni.info.clone();
        let _ = info.is_content_addressed(&sd);
        let _ = info.check_signatures(&sd, &keys);
        if info.sign(&sd, &key).is_ok() {
            assert!(info.signed_by(&sd, &keys).is_some());
        }
    }

    if let Ok(ci) = CacheInfo::parse(data) {
        assert_eq!(CacheInfo::parse(ci.render().as_bytes()).as_ref(), Ok(&ci));
    }

    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(sig) = Signature::parse(s) {
            assert_eq!(Signature::parse(&sig.to_string()).as_ref(), Ok(&sig));
            let _ = keys.verify(data, s);
        }
        if let Ok(pk) = PublicKey::parse(s) {
            assert_eq!(PublicKey::parse(&pk.to_string()).as_ref(), Ok(&pk));
        }
        if let Ok(sk) = SecretKey::parse(s) {
            let again = SecretKey::parse(&sk.to_text()).expect("printed secret key parses");
            assert_eq!(again.to_public(), sk.to_public());
            assert!(sk.to_public().verify(data, &sk.sign(data)));
        }
        if let Ok(tk) = TrustedKeys::parse_list(s) {
            let _ = tk.verify_any(data, s.split_whitespace());
        }
    }
});
