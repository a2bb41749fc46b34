//! BasicDerivation as BuildDerivation (op 36) carries it (PROTOCOL.md §8.4):
//! `u64 n` + n × (`str name, str path, str hashAlgo, str hash`), `{path} inputSrcs`,
//! `str system`, `str builder`, `[str] args`, `u64 m` + m × (`str key, str value`).
//!
//! The u64-LE and padded-string primitives are implemented here, bounded, so this module does not
//! depend on the worker-protocol module; they can be swapped for the shared wire reader later.
//! Input derivations are not part of this form: reading gives an empty `input_drvs`, writing
//! ignores it.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};

use super::{
    check_drv_name, check_raw_field, parse_output_name, parse_path, Derivation, DerivationOutput,
    DrvError, DrvLimits,
};
use crate::store_path::{StoreDir, MAX_NAME_LEN};

/// Bytes read per step: a string's declared length is never allocated before its bytes arrive.
const CHUNK: usize = 64 * 1024;

struct WireReader<'r, R> {
    r: &'r mut R,
    pos: usize,
    limit: usize,
}

impl<R: Read> WireReader<'_, R> {
    fn take(&mut self, n: usize) -> Result<usize, DrvError> {
        let start = self.pos;
        match self.pos.checked_add(n) {
            Some(end) if end <= self.limit => {
                self.pos = end;
                Ok(start)
            }
            _ => Err(DrvError::TooLarge { limit: self.limit }),
        }
    }

    fn u64(&mut self) -> Result<u64, DrvError> {
        self.take(8)?;
        let mut b = [0u8; 8];
        self.r.read_exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn count(&mut self, what: &'static str, max: usize) -> Result<usize, DrvError> {
        let offset = self.pos;
        let n = self.u64()?;
        usize::try_from(n)
            .ok()
            .filter(|n| *n <= max)
            .ok_or(DrvError::TooMany {
                offset,
                what,
                limit: max,
            })
    }

    /// A padded string of at most `max` bytes; returns it with the offset of its length field.
    fn string(&mut self, max: usize) -> Result<(Vec<u8>, usize), DrvError> {
        let offset = self.pos;
        let len = self.u64()?;
        let len = usize::try_from(len)
            .ok()
            .filter(|l| *l <= max)
            .ok_or(DrvError::StringTooLong { offset, limit: max })?;
        let pad = (8 - len % 8) % 8;
        self.take(len + pad)?;
        let mut out = Vec::new();
        let mut left = len;
        while left > 0 {
            let n = left.min(CHUNK);
            let old = out.len();
            out.resize(old + n, 0);
            self.r.read_exact(out.get_mut(old..).unwrap_or_default())?;
            left -= n;
        }
        let mut padding = [0u8; 8];
        let padding = padding.get_mut(..pad).unwrap_or_default();
        self.r.read_exact(padding)?;
        if padding.iter().any(|&b| b != 0) {
            return Err(DrvError::BadPadding {
                offset: self.pos - pad,
            });
        }
        Ok((out, offset))
    }
}

/// Longest full store path: `<storeDir>/` + 32 + `-` + name.
fn max_path_len(store_dir: &StoreDir) -> usize {
    store_dir.as_str().len() + 1 + 32 + 1 + MAX_NAME_LEN
}

/// Reads a BasicDerivation named `name` (the drv path's name without `.drv`). Applies the same
/// rules as the ATerm parser: sorted, unique keys; valid output names and paths; fixed-output
/// paths that match their hash; no `"` or `\` in `system` (so the derivation can be written as
/// an ATerm and read back unchanged).
pub fn read_basic_derivation<R: Read>(
    r: &mut R,
    store_dir: &StoreDir,
    name: &str,
    limits: &DrvLimits,
) -> Result<Derivation, DrvError> {
    check_drv_name(name)?;
    let mut w = WireReader {
        r,
        pos: 0,
        limit: limits.max_size,
    };
    let path_max = max_path_len(store_dir);
    let mut drv = Derivation {
        name: name.to_string(),
        outputs: BTreeMap::new(),
        input_drvs: BTreeMap::new(),
        input_srcs: BTreeSet::new(),
        system: Vec::new(),
        builder: Vec::new(),
        args: Vec::new(),
        env: BTreeMap::new(),
    };

    let n = w.count("outputs", limits.max_outputs)?;
    for _ in 0..n {
        let (out_name, at) = w.string(MAX_NAME_LEN)?;
        let out_name = parse_output_name(&out_name, at)?;
        let (path, _) = w.string(path_max)?;
        let (algo, _) = w.string(16)?;
        let (hash, _) = w.string(128)?;
        let out =
            DerivationOutput::from_fields(store_dir, name, &out_name, (&path, &algo, &hash), at)?;
        if drv
            .outputs
            .last_key_value()
            .is_some_and(|(k, _)| *k >= out_name)
        {
            return Err(DrvError::NotSorted {
                offset: at,
                what: "outputs",
            });
        }
        drv.outputs.insert(out_name, out);
    }

    let n = w.count("input sources", limits.max_input_srcs)?;
    for _ in 0..n {
        let (s, at) = w.string(path_max)?;
        let p = parse_path(store_dir, &s, at)?;
        if drv.input_srcs.last().is_some_and(|last| *last >= p) {
            return Err(DrvError::NotSorted {
                offset: at,
                what: "input sources",
            });
        }
        drv.input_srcs.insert(p);
    }

    let (system, at) = w.string(limits.max_string)?;
    check_raw_field(&system, at)?;
    drv.system = system;
    drv.builder = w.string(limits.max_string)?.0;

    let n = w.count("arguments", limits.max_args)?;
    for _ in 0..n {
        drv.args.push(w.string(limits.max_string)?.0);
    }

    let n = w.count("environment variables", limits.max_env)?;
    for _ in 0..n {
        let (key, at) = w.string(limits.max_string)?;
        let (value, _) = w.string(limits.max_string)?;
        if drv.env.last_key_value().is_some_and(|(k, _)| *k >= key) {
            return Err(DrvError::NotSorted {
                offset: at,
                what: "environment variables",
            });
        }
        drv.env.insert(key, value);
    }
    Ok(drv)
}

fn put_u64<W: Write>(w: &mut W, n: u64) -> std::io::Result<()> {
    w.write_all(&n.to_le_bytes())
}

fn put_len<W: Write>(w: &mut W, n: usize) -> std::io::Result<()> {
    put_u64(w, n as u64)
}

fn put_str<W: Write>(w: &mut W, s: &[u8]) -> std::io::Result<()> {
    put_len(w, s.len())?;
    w.write_all(s)?;
    let pad = (8 - s.len() % 8) % 8;
    w.write_all([0u8; 8].get(..pad).unwrap_or_default())
}

/// Writes the BasicDerivation form (what the client sends with BuildDerivation).
pub fn write_basic_derivation<W: Write>(
    w: &mut W,
    store_dir: &StoreDir,
    drv: &Derivation,
) -> Result<(), DrvError> {
    put_len(w, drv.outputs.len())?;
    for (name, out) in &drv.outputs {
        let (path, algo, hash) = out.fields(store_dir, &drv.name, name, false)?;
        put_str(w, name.as_bytes())?;
        put_str(w, path.as_bytes())?;
        put_str(w, algo.as_bytes())?;
        put_str(w, hash.as_bytes())?;
    }
    put_len(w, drv.input_srcs.len())?;
    for p in &drv.input_srcs {
        put_str(w, store_dir.display(p).as_bytes())?;
    }
    put_str(w, &drv.system)?;
    put_str(w, &drv.builder)?;
    put_len(w, drv.args.len())?;
    for a in &drv.args {
        put_str(w, a)?;
    }
    put_len(w, drv.env.len())?;
    for (k, v) in &drv.env {
        put_str(w, k)?;
        put_str(w, v)?;
    }
    Ok(())
}
