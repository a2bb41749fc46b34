//! Connection handshake (PROTOCOL.md §2), steps 1–6b. Step 7 (setup log messages, then
//! `STDERR_LAST`) belongs to the caller.

use std::collections::BTreeSet;
use std::io::{Read, Write};

use super::wire::{WireError, WireReader, WireWriter};
use super::{get_major, get_minor, MIN_CLIENT_VERSION, WORKER_MAGIC_1, WORKER_MAGIC_2};

/// Protocol features we offer in the minor ≥ 38 exchange (none are defined for 1.38).
pub const SUPPORTED_FEATURES: &[&str] = &[];

/// What the server tells the client about the client's trust (minor ≥ 35).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrustFlag {
    Trusted,
    NotTrusted,
}

impl TrustFlag {
    /// 0 = unknown (`None`), 1 = trusted, 2 = not trusted.
    pub fn to_wire(trust: Option<TrustFlag>) -> u64 {
        match trust {
            None => 0,
            Some(TrustFlag::Trusted) => 1,
            Some(TrustFlag::NotTrusted) => 2,
        }
    }

    pub fn from_wire(v: u64) -> Option<Option<TrustFlag>> {
        match v {
            0 => Some(None),
            1 => Some(Some(TrustFlag::Trusted)),
            2 => Some(Some(TrustFlag::NotTrusted)),
            _ => None,
        }
    }
}

/// The server's view of a client after the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    /// Negotiated version, `min(client, ours)`: gate every version-dependent field on this.
    pub version: u64,
    /// What the client announced.
    pub client_version: u64,
    /// Features both sides support (minor ≥ 38; empty otherwise).
    pub features: BTreeSet<String>,
}

impl ClientInfo {
    pub fn minor(&self) -> u8 {
        get_minor(self.version)
    }
}

/// The client's view of the daemon after the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonInfo {
    /// Negotiated version, `min(daemon, ours)`.
    pub version: u64,
    /// What the daemon announced.
    pub daemon_version: u64,
    /// The daemon's Nix version string (minor ≥ 33).
    pub nix_version: Option<String>,
    /// Whether the daemon trusts us (minor ≥ 35; `None` also when it said "unknown").
    pub trust: Option<TrustFlag>,
    /// Features both sides support (minor ≥ 38).
    pub features: BTreeSet<String>,
}

impl DaemonInfo {
    pub fn minor(&self) -> u8 {
        get_minor(self.version)
    }
}

fn read_features<R: Read>(r: &mut WireReader<R>) -> Result<BTreeSet<String>, WireError> {
    let limits = *r.limits();
    r.read_string_set("feature set", limits.max_features, limits.max_feature_len)
}

fn ours_only(theirs: BTreeSet<String>) -> BTreeSet<String> {
    theirs
        .into_iter()
        .filter(|f| SUPPORTED_FEATURES.contains(&f.as_str()))
        .collect()
}

/// Server side of steps 1–6b. Flushes at the points where the client waits for us. The caller
/// then sends any setup messages and `STDERR_LAST` (step 7).
///
/// Errors: wrong magic → [`WireError::ProtocolMismatch`] ("protocol mismatch"), client older
/// than 1.10 → [`WireError::ClientTooOld`] ("the Nix client version is too old"), and the usual
/// wire errors. `daemon_version_str` is bounded by the caller (normally [`super::DAEMON_VERSION`]).
pub fn server_handshake<R: Read, W: Write>(
    r: &mut WireReader<R>,
    w: &mut WireWriter<W>,
    our_version: u64,
    daemon_version_str: &str,
    trust: Option<TrustFlag>,
) -> Result<ClientInfo, WireError> {
    // 1. Any other first word, including one above 32 bits, is a mismatch.
    let magic = r.read_u64("client magic")?;
    if magic != WORKER_MAGIC_1 {
        return Err(WireError::ProtocolMismatch { got: magic });
    }
    // 2. Newer clients send their version without waiting for this; that is fine.
    w.write_u64(WORKER_MAGIC_2)?;
    w.write_u64(our_version)?;
    w.flush()?;
    // 3.
    let client_version = u64::from(r.read_u32("client version")?);
    if client_version < MIN_CLIENT_VERSION {
        return Err(WireError::ClientTooOld {
            version: client_version,
        });
    }
    let version = client_version.min(our_version);
    let minor = get_minor(version);
    // 3b. Client's set first, then ours.
    let mut features = BTreeSet::new();
    if minor >= 38 {
        features = ours_only(read_features(r)?);
        w.write_strings(SUPPORTED_FEATURES)?;
        w.flush()?;
    }
    // 4. Obsolete CPU affinity: a flag, and the CPU number if set.
    if minor >= 14 && r.read_u32("CPU affinity flag")? != 0 {
        r.read_u32("CPU affinity")?;
    }
    // 5. Obsolete reserveSpace.
    if minor >= 11 {
        r.read_u32("reserveSpace")?;
    }
    // 6. The client flushes before reading this, so nothing deadlocks.
    if minor >= 33 {
        w.write_string(daemon_version_str)?;
    }
    // 6b.
    if minor >= 35 {
        w.write_u64(TrustFlag::to_wire(trust))?;
    }
    w.flush()?;
    Ok(ClientInfo {
        version,
        client_version,
        features,
    })
}

/// Client side of steps 1–6b (for tests and proxies). The caller then reads stderr messages up
/// to `STDERR_LAST` (step 7).
pub fn client_handshake<R: Read, W: Write>(
    r: &mut WireReader<R>,
    w: &mut WireWriter<W>,
    our_version: u64,
) -> Result<DaemonInfo, WireError> {
    // The 2.8 client waits for the daemon's greeting before sending its version; newer
    // ones send both at once. Sending both works with either kind of daemon.
    w.write_u64(WORKER_MAGIC_1)?;
    w.write_u64(our_version)?;
    w.flush()?;
    let magic = r.read_u64("daemon magic")?;
    if magic != WORKER_MAGIC_2 {
        return Err(WireError::DaemonMismatch { got: magic });
    }
    let daemon_version = u64::from(r.read_u32("daemon version")?);
    if get_major(daemon_version) != get_major(our_version) {
        return Err(WireError::DaemonUnsupported {
            version: daemon_version,
        });
    }
    if get_minor(daemon_version) < 10 {
        return Err(WireError::DaemonTooOld {
            version: daemon_version,
        });
    }
    let version = daemon_version.min(our_version);
    let minor = get_minor(version);
    let mut features = BTreeSet::new();
    if minor >= 38 {
        w.write_strings(SUPPORTED_FEATURES)?;
        w.flush()?;
        features = ours_only(read_features(r)?);
    }
    if minor >= 14 {
        w.write_u64(0)?;
    }
    if minor >= 11 {
        w.write_u64(0)?;
    }
    w.flush()?;
    let nix_version = if minor >= 33 {
        Some(r.read_string_max("daemon Nix version", 1024)?)
    } else {
        None
    };
    let mut trust = None;
    if minor >= 35 {
        let offset = r.position();
        let v = r.read_u64("trust flag")?;
        trust = TrustFlag::from_wire(v).ok_or(WireError::InvalidValue {
            what: "trust flag",
            offset,
            value: v,
        })?;
    }
    Ok(DaemonInfo {
        version,
        daemon_version,
        nix_version,
        trust,
        features,
    })
}

#[cfg(test)]
mod tests {
    use super::super::{protocol_version, DAEMON_VERSION, PROTOCOL_VERSION};
    use super::*;
    use std::os::unix::net::UnixStream;

    fn u(v: u64) -> Vec<u8> {
        v.to_le_bytes().to_vec()
    }

    /// A string as the wire writes it: length, bytes, zero padding to 8.
    fn string(s: &str) -> Vec<u8> {
        let mut v = u(s.len() as u64);
        v.extend(s.as_bytes());
        v.resize(v.len() + (8 - s.len() % 8) % 8, 0);
        v
    }

    /// Runs the server against scripted client bytes; returns the result, the bytes the server
    /// sent, and how many input bytes it consumed.
    fn serve(
        input: &[u8],
        ours: u64,
        trust: Option<TrustFlag>,
    ) -> (Result<ClientInfo, WireError>, Vec<u8>, u64) {
        let mut out = Vec::new();
        let mut r = WireReader::new(input);
        let mut w = WireWriter::new(&mut out);
        let res = server_handshake(&mut r, &mut w, ours, DAEMON_VERSION, trust);
        let _ = w.flush();
        drop(w);
        (res, out, r.position())
    }

    /// What a 2.8 client sends: magic, version, affinity 0, reserveSpace 0.
    fn client_2_8() -> Vec<u8> {
        [u(WORKER_MAGIC_1), u(0x122), u(0), u(0)].concat()
    }

    #[test]
    fn server_side_bytes_for_a_2_8_client() {
        let input = client_2_8();
        let (res, out, used) = serve(&input, PROTOCOL_VERSION, Some(TrustFlag::Trusted));
        let info = res.unwrap();
        assert_eq!(info.version, 0x122);
        assert_eq!(info.client_version, 0x122);
        assert_eq!(info.minor(), 34);
        assert!(info.features.is_empty());
        assert_eq!(used, input.len() as u64);
        // oixd, our version, the version string; no trust word below 35.
        let mut expect = b"oixd\0\0\0\0".to_vec();
        expect.extend(u(PROTOCOL_VERSION));
        expect.extend(string(DAEMON_VERSION));
        assert_eq!(out, expect);
    }

    #[test]
    fn bad_magic_is_protocol_mismatch() {
        for magic in [0u64, WORKER_MAGIC_2, WORKER_MAGIC_1 | 1 << 32, u64::MAX] {
            let (res, out, _) = serve(&u(magic), PROTOCOL_VERSION, None);
            let e = res.unwrap_err();
            assert!(matches!(e, WireError::ProtocolMismatch { got } if got == magic));
            assert_eq!(e.to_string(), "protocol mismatch");
            assert!(out.is_empty(), "nothing is sent after a bad magic");
        }
    }

    #[test]
    fn old_clients_are_refused() {
        for v in [0u64, 0x100, 0x109, 0xff] {
            let input = [u(WORKER_MAGIC_1), u(v)].concat();
            let e = serve(&input, PROTOCOL_VERSION, None).0.unwrap_err();
            assert!(matches!(e, WireError::ClientTooOld { version } if version == v));
            assert_eq!(e.to_string(), "the Nix client version is too old");
        }
        let input = [u(WORKER_MAGIC_1), u(1 << 32)].concat();
        assert!(matches!(
            serve(&input, PROTOCOL_VERSION, None).0,
            Err(WireError::IntTooLarge {
                what: "client version",
                offset: 8,
                ..
            })
        ));
    }

    #[test]
    fn version_is_min_of_both_and_gates_the_steps() {
        // 1.10: no affinity, reserveSpace, version string.
        let (res, out, used) = serve(&[u(WORKER_MAGIC_1), u(0x10a)].concat(), 0x122, None);
        assert_eq!(res.unwrap().version, 0x10a);
        assert_eq!(out.len(), 16);
        assert_eq!(used, 16);
        // 1.11: reserveSpace only.
        let (res, _, used) = serve(&[u(WORKER_MAGIC_1), u(0x10b), u(0)].concat(), 0x122, None);
        assert_eq!(res.unwrap().version, 0x10b);
        assert_eq!(used, 24);
        // 1.14 with affinity set: flag, cpu, reserveSpace.
        let input = [u(WORKER_MAGIC_1), u(0x10e), u(1), u(3), u(0)].concat();
        let (res, out, used) = serve(&input, 0x122, None);
        assert_eq!(res.unwrap().version, 0x10e);
        assert_eq!(used, 40);
        assert_eq!(out.len(), 16, "no version string below 33");
        // A much newer client (0xffff) is held to our version.
        let (res, _, _) = serve(
            &[u(WORKER_MAGIC_1), u(0xffff), u(0), u(0)].concat(),
            0x122,
            None,
        );
        let info = res.unwrap();
        assert_eq!((info.version, info.client_version), (0x122, 0xffff));
    }

    #[test]
    fn trust_and_features_at_newer_versions() {
        // 1.35: trust word after the version string.
        let (res, out, _) = serve(&client_2_8(), 0x123, Some(TrustFlag::NotTrusted));
        assert_eq!(res.unwrap().version, 0x122, "client is still 1.34");
        assert_eq!(out.len(), 16 + string(DAEMON_VERSION).len());
        let input = [u(WORKER_MAGIC_1), u(0x123), u(0), u(0)].concat();
        let (res, out, _) = serve(&input, 0x123, Some(TrustFlag::NotTrusted));
        assert_eq!(res.unwrap().version, 0x123);
        assert_eq!(&out[16 + string(DAEMON_VERSION).len()..], u(2));
        // 1.38: client feature set after its version, then ours (empty) before affinity.
        let mut input = [u(WORKER_MAGIC_1), u(0x126), u(2)].concat();
        for f in ["fancy", "other"] {
            input.extend(u(f.len() as u64));
            input.extend(f.as_bytes());
            input.resize(input.len() + (8 - f.len() % 8) % 8, 0);
        }
        input.extend([u(0), u(0)].concat());
        let (res, out, used) = serve(&input, 0x126, None);
        let info = res.unwrap();
        assert_eq!(info.version, 0x126);
        assert!(info.features.is_empty(), "we support none of them");
        assert_eq!(used, input.len() as u64);
        let mut expect = b"oixd\0\0\0\0".to_vec();
        expect.extend(u(0x126));
        expect.extend(u(0)); // our empty feature set
        expect.extend(string(DAEMON_VERSION));
        expect.extend(u(0)); // trust unknown
        assert_eq!(out, expect);
        // A hostile feature set is bounded.
        let input = [u(WORKER_MAGIC_1), u(0x126), u(1 << 40)].concat();
        assert!(matches!(
            serve(&input, 0x126, None).0,
            Err(WireError::TooMany { .. })
        ));
    }

    #[test]
    fn truncated_client_input_fails_at_every_point() {
        let input = client_2_8();
        for cut in 0..input.len() {
            let (res, _, _) = serve(&input[..cut], PROTOCOL_VERSION, None);
            assert!(matches!(res, Err(WireError::Eof { .. })), "cut {cut}");
        }
    }

    #[test]
    fn narrow_affinity_and_reserve_fields() {
        let input = [u(WORKER_MAGIC_1), u(0x122), u(1 << 32)].concat();
        assert!(matches!(
            serve(&input, PROTOCOL_VERSION, None).0,
            Err(WireError::IntTooLarge {
                what: "CPU affinity flag",
                ..
            })
        ));
        let input = [u(WORKER_MAGIC_1), u(0x122), u(0), u(1 << 33)].concat();
        assert!(matches!(
            serve(&input, PROTOCOL_VERSION, None).0,
            Err(WireError::IntTooLarge {
                what: "reserveSpace",
                ..
            })
        ));
    }

    fn pair_run(
        server_version: u64,
        client_version: u64,
        trust: Option<TrustFlag>,
    ) -> (ClientInfo, DaemonInfo) {
        let (a, b) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            let mut r = WireReader::new(&a);
            let mut w = WireWriter::new(&a);
            server_handshake(&mut r, &mut w, server_version, DAEMON_VERSION, trust)
        });
        let mut r = WireReader::new(&b);
        let mut w = WireWriter::new(&b);
        let d = client_handshake(&mut r, &mut w, client_version).unwrap();
        let c = server.join().unwrap().unwrap();
        (c, d)
    }

    #[test]
    fn client_and_server_agree_over_a_socket() {
        for (sv, cv) in [
            (0x122, 0x122),
            (0x122, 0x118),
            (0x126, 0x122),
            (0x126, 0x126),
            (0x123, 0x125),
        ] {
            let (c, d) = pair_run(sv, cv, Some(TrustFlag::Trusted));
            assert_eq!(c.version, d.version);
            assert_eq!(c.version, sv.min(cv));
            assert_eq!(d.daemon_version, sv);
            assert_eq!(c.client_version, cv);
            let minor = get_minor(c.version);
            assert_eq!(
                d.nix_version.as_deref(),
                (minor >= 33).then_some(DAEMON_VERSION)
            );
            assert_eq!(d.trust, (minor >= 35).then_some(TrustFlag::Trusted));
        }
    }

    #[test]
    fn client_side_rejections() {
        let run = |input: Vec<u8>| {
            let mut out = Vec::new();
            let mut r = WireReader::new(&input[..]);
            let mut w = WireWriter::new(&mut out);
            client_handshake(&mut r, &mut w, PROTOCOL_VERSION)
        };
        assert!(matches!(
            run(u(WORKER_MAGIC_1)),
            Err(WireError::DaemonMismatch { .. })
        ));
        assert!(matches!(
            run([u(WORKER_MAGIC_2), u(0x222)].concat()),
            Err(WireError::DaemonUnsupported { .. })
        ));
        assert!(matches!(
            run([u(WORKER_MAGIC_2), u(0x109)].concat()),
            Err(WireError::DaemonTooOld { .. })
        ));
        let mut bad_trust = [u(WORKER_MAGIC_2), u(protocol_version(1, 35))].concat();
        bad_trust.extend([u(1), b"x\0\0\0\0\0\0\0".to_vec(), u(3)].concat());
        let mut out = Vec::new();
        let mut r = WireReader::new(&bad_trust[..]);
        let mut w = WireWriter::new(&mut out);
        assert!(matches!(
            client_handshake(&mut r, &mut w, protocol_version(1, 35)),
            Err(WireError::InvalidValue {
                what: "trust flag",
                value: 3,
                ..
            })
        ));
    }
}
