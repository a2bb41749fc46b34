//! SetOptions (op 19, PROTOCOL.md §4.1) payload.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use super::stderr::Verbosity;
use super::wire::{WireError, WireReader, WireWriter};

/// The client's settings as sent with SetOptions. Obsolete fields (useBuildHook, logType,
/// printBuildTrace) are read and dropped. Every fixed field is a 32-bit `readInt` in Nix, so
/// larger values are errors here too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientOptions {
    pub keep_failed: bool,
    pub keep_going: bool,
    pub try_fallback: bool,
    pub verbosity: Verbosity,
    pub max_build_jobs: u32,
    pub max_silent_time: u32,
    /// Wire value 0 (lvlError) means verbose, anything else not (as nix-daemon decides).
    pub verbose_build: bool,
    pub build_cores: u32,
    pub use_substitutes: bool,
    /// Overridden settings (minor ≥ 12). A repeated name keeps its first value, as nix-daemon's
    /// `std::map::emplace` does; applying them (trust filtering) is the caller's business.
    pub overrides: BTreeMap<String, String>,
}

impl Default for ClientOptions {
    /// What a 2.8 client with no configuration sends.
    fn default() -> Self {
        ClientOptions {
            keep_failed: false,
            keep_going: false,
            try_fallback: false,
            verbosity: Verbosity::Info,
            max_build_jobs: 1,
            max_silent_time: 0,
            verbose_build: false,
            build_cores: 0,
            use_substitutes: true,
            overrides: BTreeMap::new(),
        }
    }
}

impl ClientOptions {
    /// Decodes the payload following the op number, for a connection at `minor`. Overrides are
    /// bounded by the reader's limits (count, name, value, and total bytes).
    pub fn read<R: Read>(r: &mut WireReader<R>, minor: u8) -> Result<ClientOptions, WireError> {
        let keep_failed = r.read_u32("SetOptions keepFailed")? != 0;
        let keep_going = r.read_u32("SetOptions keepGoing")? != 0;
        let try_fallback = r.read_u32("SetOptions tryFallback")? != 0;
        let verbosity = Verbosity::from_wire(r.read_u32("SetOptions verbosity")?);
        let max_build_jobs = r.read_u32("SetOptions maxBuildJobs")?;
        let max_silent_time = r.read_u32("SetOptions maxSilentTime")?;
        r.read_u32("SetOptions useBuildHook")?;
        let verbose_build = r.read_u32("SetOptions verboseBuild")? == 0;
        r.read_u32("SetOptions logType")?;
        r.read_u32("SetOptions printBuildTrace")?;
        let build_cores = r.read_u32("SetOptions buildCores")?;
        let use_substitutes = r.read_u32("SetOptions useSubstitutes")? != 0;
        let mut overrides = BTreeMap::new();
        if minor >= 12 {
            let l = *r.limits();
            let offset = r.position();
            let count = u64::from(r.read_u32("SetOptions override count")?);
            if count > l.max_overrides {
                return Err(WireError::TooMany {
                    what: "SetOptions override count",
                    offset,
                    count,
                    max: l.max_overrides,
                });
            }
            let mut total: u64 = 0;
            for _ in 0..count {
                let name = r.read_string_max("SetOptions override name", l.max_option_name)?;
                let value = r.read_string_max("SetOptions override value", l.max_option_value)?;
                total = total.saturating_add(name.len() as u64 + value.len() as u64 + 32);
                if total > l.max_overrides_bytes {
                    return Err(WireError::TotalTooLarge {
                        what: "SetOptions overrides",
                        offset,
                        max: l.max_overrides_bytes,
                    });
                }
                overrides.entry(name).or_insert(value);
            }
        }
        Ok(ClientOptions {
            keep_failed,
            keep_going,
            try_fallback,
            verbosity,
            max_build_jobs,
            max_silent_time,
            verbose_build,
            build_cores,
            use_substitutes,
            overrides,
        })
    }

    /// Encodes the payload (without the op number) the way a 2.8 client does.
    pub fn write<W: Write>(&self, w: &mut WireWriter<W>, minor: u8) -> Result<(), WireError> {
        w.write_bool(self.keep_failed)?;
        w.write_bool(self.keep_going)?;
        w.write_bool(self.try_fallback)?;
        w.write_u64(self.verbosity.to_wire())?;
        w.write_u64(self.max_build_jobs.into())?;
        w.write_u64(self.max_silent_time.into())?;
        w.write_u64(1)?; // useBuildHook
        let verbose_level = if self.verbose_build {
            Verbosity::Error
        } else {
            Verbosity::Vomit
        };
        w.write_u64(verbose_level.to_wire())?;
        w.write_u64(0)?; // logType
        w.write_u64(0)?; // printBuildTrace
        w.write_u64(self.build_cores.into())?;
        w.write_bool(self.use_substitutes)?;
        if minor >= 12 {
            w.write_string_map(&self.overrides)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::wire::Limits;
    use super::*;

    fn u(v: u64) -> Vec<u8> {
        v.to_le_bytes().to_vec()
    }

    fn enc(o: &ClientOptions, minor: u8) -> Vec<u8> {
        let mut out = Vec::new();
        let mut w = WireWriter::new(&mut out);
        o.write(&mut w, minor).unwrap();
        w.flush().unwrap();
        drop(w);
        out
    }

    fn fixed(vals: [u64; 12]) -> Vec<u8> {
        vals.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn byte_exact_encoding_of_defaults_with_one_override() {
        let mut o = ClientOptions::default();
        o.overrides.insert("connect-timeout".into(), "5".into());
        let mut expect = fixed([0, 0, 0, 3, 1, 0, 1, 7, 0, 0, 0, 1]);
        expect.extend(u(1));
        expect.extend(u(15));
        expect.extend(b"connect-timeout\0");
        expect.extend(u(1));
        expect.extend(b"5\0\0\0\0\0\0\0");
        assert_eq!(enc(&o, 34), expect);
        assert_eq!(enc(&o, 11), expect[..96]);
    }

    #[test]
    fn round_trip() {
        let o = ClientOptions {
            keep_failed: true,
            keep_going: true,
            try_fallback: true,
            verbosity: Verbosity::Debug,
            max_build_jobs: 8,
            max_silent_time: 3600,
            verbose_build: true,
            build_cores: 4,
            use_substitutes: false,
            overrides: [("a".into(), "x y".into()), ("b".into(), "".into())].into(),
        };
        let bytes = enc(&o, 34);
        let mut r = WireReader::new(&bytes[..]);
        assert_eq!(ClientOptions::read(&mut r, 34).unwrap(), o);
        assert_eq!(r.position(), bytes.len() as u64);
        // Below 12 there are no overrides on the wire.
        let bytes = enc(&o, 11);
        let mut r = WireReader::new(&bytes[..]);
        let got = ClientOptions::read(&mut r, 11).unwrap();
        assert!(got.overrides.is_empty());
        assert_eq!(r.position(), 96);
    }

    #[test]
    fn daemon_semantics_of_fixed_fields() {
        // Non-zero booleans are true; verboseBuild is "== 0"; verbosity saturates.
        let mut bytes = fixed([5, 0, 9, 100, 0, 0, 0, 3, 0, 0, 0, 2]);
        bytes.extend(u(0));
        let o = ClientOptions::read(&mut WireReader::new(&bytes[..]), 34).unwrap();
        assert!(o.keep_failed && !o.keep_going && o.try_fallback && o.use_substitutes);
        assert_eq!(o.verbosity, Verbosity::Vomit);
        assert!(!o.verbose_build);
    }

    #[test]
    fn narrow_fields_reject_large_values() {
        for i in 0..12 {
            let mut vals = [0u64; 12];
            vals[i] = 1 << 32;
            let bytes = [fixed(vals), u(0)].concat();
            let e = ClientOptions::read(&mut WireReader::new(&bytes[..]), 34).unwrap_err();
            assert!(
                matches!(e, WireError::IntTooLarge { offset, .. } if offset == 8 * i as u64),
                "{i}: {e:?}"
            );
        }
    }

    #[test]
    fn override_limits() {
        let base = fixed([0, 0, 0, 3, 1, 0, 1, 7, 0, 0, 0, 1]);
        let read = |tail: Vec<u8>, limits: Limits| {
            let bytes = [base.clone(), tail].concat();
            ClientOptions::read(&mut WireReader::with_limits(&bytes[..], limits), 34)
        };
        let l = Limits::default();
        // Count: 4097, 2^32 (narrow), 2^63.
        assert!(matches!(
            read(u(4097), l),
            Err(WireError::TooMany {
                count: 4097,
                max: 4096,
                ..
            })
        ));
        assert!(matches!(
            read(u(1 << 32), l),
            Err(WireError::IntTooLarge { .. })
        ));
        assert!(matches!(
            read(u(1 << 63), l),
            Err(WireError::IntTooLarge { .. })
        ));
        // Name over 1 KiB, value over 1 MiB: rejected from the length alone.
        assert!(matches!(
            read([u(1), u(1025)].concat(), l),
            Err(WireError::TooLong {
                what: "SetOptions override name",
                len: 1025,
                ..
            })
        ));
        assert!(matches!(
            read(
                [u(1), u(1), b"n\0\0\0\0\0\0\0".to_vec(), u((1 << 20) + 1)].concat(),
                l
            ),
            Err(WireError::TooLong {
                what: "SetOptions override value",
                ..
            })
        ));
        // Total bound.
        let small = Limits {
            max_overrides_bytes: 40,
            ..l
        };
        let two = [
            u(2),
            u(1),
            b"a\0\0\0\0\0\0\0".to_vec(),
            u(0),
            u(1),
            b"b\0\0\0\0\0\0\0".to_vec(),
            u(0),
        ]
        .concat();
        assert!(matches!(
            read(two.clone(), small),
            Err(WireError::TotalTooLarge { .. })
        ));
        assert_eq!(read(two, l).unwrap().overrides.len(), 2);
        // Repeated name: first wins.
        let dup = [
            u(2),
            u(1),
            b"a\0\0\0\0\0\0\0".to_vec(),
            u(1),
            b"1\0\0\0\0\0\0\0".to_vec(),
        ]
        .concat();
        let dup = [
            dup,
            u(1),
            b"a\0\0\0\0\0\0\0".to_vec(),
            u(1),
            b"2\0\0\0\0\0\0\0".to_vec(),
        ]
        .concat();
        assert_eq!(read(dup, l).unwrap().overrides["a"], "1");
    }
}
