//! The `Derive(...)` ATerm. The grammar has a fixed shape (lists nest at most two deep), so the
//! parser is a flat sequence of steps over a byte cursor: no recursion, no backtracking.

use std::collections::{BTreeMap, BTreeSet};

use super::{
    check_drv_name, parse_output_name, parse_path, Derivation, DerivationOutput, DrvError,
    DrvLimits, DRV_EXTENSION,
};
use crate::store_path::StoreDir;

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn rest(&self) -> &'a [u8] {
        self.buf.get(self.pos..).unwrap_or_default()
    }

    fn expect(&mut self, lit: &'static str) -> Result<(), DrvError> {
        if self.rest().starts_with(lit.as_bytes()) {
            self.pos += lit.len();
            Ok(())
        } else {
            Err(DrvError::Expected {
                offset: self.pos,
                expected: lit,
            })
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.rest().first() == Some(&c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    /// A string Nix writes without escaping: the bytes up to the next `"`, which may not
    /// contain `\` (Nix would read it as an escape and get a different value back).
    fn raw(&mut self) -> Result<&'a [u8], DrvError> {
        let start = self.pos;
        self.expect("\"")?;
        let rest = self.rest();
        let end = rest
            .iter()
            .position(|&c| c == b'"' || c == b'\\')
            .ok_or(DrvError::UnterminatedString { offset: start })?;
        if rest.get(end) == Some(&b'\\') {
            return Err(DrvError::BadRawField {
                offset: self.pos + end,
            });
        }
        let s = rest.get(..end).unwrap_or_default();
        self.pos += end + 1;
        Ok(s)
    }

    /// An escaped string. Only the escapes Nix's printer produces are accepted (`\"`, `\\`,
    /// `\n`, `\r`, `\t`), and LF, CR and TAB must be escaped: anything else would not print
    /// back to the same bytes.
    fn escaped(&mut self, limit: usize) -> Result<Vec<u8>, DrvError> {
        let start = self.pos;
        self.expect("\"")?;
        let mut out = Vec::new();
        loop {
            let rest = self.rest();
            let i = rest
                .iter()
                .position(|&c| matches!(c, b'"' | b'\\' | b'\n' | b'\r' | b'\t'))
                .ok_or(DrvError::UnterminatedString { offset: start })?;
            if out.len() + i > limit {
                return Err(DrvError::StringTooLong {
                    offset: start,
                    limit,
                });
            }
            out.extend_from_slice(rest.get(..i).unwrap_or_default());
            self.pos += i;
            let special = rest.get(i).copied();
            let next = rest.get(i + 1).copied();
            match (special, next) {
                (Some(b'"'), _) => {
                    self.pos += 1;
                    return Ok(out);
                }
                (Some(b'\\'), Some(c)) => {
                    let decoded = match c {
                        b'"' | b'\\' => c,
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        _ => return Err(DrvError::NonCanonicalString { offset: self.pos }),
                    };
                    if out.len() >= limit {
                        return Err(DrvError::StringTooLong {
                            offset: start,
                            limit,
                        });
                    }
                    out.push(decoded);
                    self.pos += 2;
                }
                (Some(b'\\'), None) => return Err(DrvError::UnterminatedString { offset: start }),
                _ => return Err(DrvError::NonCanonicalString { offset: self.pos }),
            }
        }
    }

    /// `[` elem (`,` elem)* `]` or `[]`, at most `max` elements.
    fn list(
        &mut self,
        what: &'static str,
        max: usize,
        mut elem: impl FnMut(&mut Self) -> Result<(), DrvError>,
    ) -> Result<(), DrvError> {
        self.expect("[")?;
        if self.eat(b']') {
            return Ok(());
        }
        let mut n = 0usize;
        loop {
            n += 1;
            if n > max {
                return Err(DrvError::TooMany {
                    offset: self.pos,
                    what,
                    limit: max,
                });
            }
            elem(self)?;
            if self.eat(b']') {
                return Ok(());
            }
            if !self.eat(b',') {
                return Err(DrvError::Expected {
                    offset: self.pos,
                    expected: "',' or ']'",
                });
            }
        }
    }
}

/// Inserts into a map that must be built in strictly increasing key order.
fn push_sorted<K: Ord, V>(
    map: &mut BTreeMap<K, V>,
    key: K,
    value: V,
    offset: usize,
    what: &'static str,
) -> Result<(), DrvError> {
    if map.last_key_value().is_some_and(|(last, _)| *last >= key) {
        return Err(DrvError::NotSorted { offset, what });
    }
    map.insert(key, value);
    Ok(())
}

fn push_sorted_set<K: Ord>(
    set: &mut BTreeSet<K>,
    key: K,
    offset: usize,
    what: &'static str,
) -> Result<(), DrvError> {
    if set.last().is_some_and(|last| *last >= key) {
        return Err(DrvError::NotSorted { offset, what });
    }
    set.insert(key);
    Ok(())
}

pub(super) fn parse(
    store_dir: &StoreDir,
    text: &[u8],
    name: &str,
    limits: &DrvLimits,
) -> Result<Derivation, DrvError> {
    if text.len() > limits.max_size {
        return Err(DrvError::TooLarge {
            limit: limits.max_size,
        });
    }
    check_drv_name(name)?;
    let mut c = Cursor { buf: text, pos: 0 };
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

    c.expect("Derive(")?;
    c.list("outputs", limits.max_outputs, |c| {
        let at = c.pos;
        c.expect("(")?;
        let out_name = parse_output_name(c.raw()?, at + 1)?;
        let mut fields: [&[u8]; 3] = [b""; 3];
        for f in &mut fields {
            c.expect(",")?;
            *f = c.raw()?;
        }
        c.expect(")")?;
        let [path, algo, hash] = fields;
        let out =
            DerivationOutput::from_fields(store_dir, name, &out_name, (path, algo, hash), at)?;
        push_sorted(&mut drv.outputs, out_name, out, at, "outputs")
    })?;

    c.expect(",")?;
    c.list("input derivations", limits.max_input_drvs, |c| {
        let at = c.pos;
        c.expect("(")?;
        let path = parse_path(store_dir, c.raw()?, at + 1)?;
        if !path.name().ends_with(DRV_EXTENSION) {
            return Err(DrvError::NotADerivation {
                offset: at + 1,
                path: store_dir.display(&path),
            });
        }
        c.expect(",")?;
        let mut outs = BTreeSet::new();
        c.list("input derivation outputs", limits.max_outputs, |c| {
            let at = c.pos;
            let o = parse_output_name(c.raw()?, at)?;
            push_sorted_set(&mut outs, o, at, "input derivation outputs")
        })?;
        c.expect(")")?;
        push_sorted(&mut drv.input_drvs, path, outs, at, "input derivations")
    })?;

    c.expect(",")?;
    c.list("input sources", limits.max_input_srcs, |c| {
        let at = c.pos;
        let p = parse_path(store_dir, c.raw()?, at)?;
        push_sorted_set(&mut drv.input_srcs, p, at, "input sources")
    })?;

    c.expect(",")?;
    let at = c.pos;
    drv.system = c.raw()?.to_vec();
    if drv.system.len() > limits.max_string {
        return Err(DrvError::StringTooLong {
            offset: at,
            limit: limits.max_string,
        });
    }

    c.expect(",")?;
    drv.builder = c.escaped(limits.max_string)?;

    c.expect(",")?;
    c.list("arguments", limits.max_args, |c| {
        drv.args.push(c.escaped(limits.max_string)?);
        Ok(())
    })?;

    c.expect(",")?;
    c.list("environment variables", limits.max_env, |c| {
        let at = c.pos;
        c.expect("(")?;
        let key = c.escaped(limits.max_string)?;
        c.expect(",")?;
        let value = c.escaped(limits.max_string)?;
        c.expect(")")?;
        push_sorted(&mut drv.env, key, value, at, "environment variables")
    })?;

    c.expect(")")?;
    if c.pos != text.len() {
        return Err(DrvError::TrailingData { offset: c.pos });
    }
    Ok(drv)
}

fn push_raw(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    out.extend_from_slice(s);
    out.push(b'"');
}

fn push_escaped(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    for &c in s {
        match c {
            b'"' | b'\\' => out.extend_from_slice(&[b'\\', c]),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => out.push(c),
        }
    }
    out.push(b'"');
}

fn push_list<I, T>(out: &mut Vec<u8>, items: I, mut each: impl FnMut(&mut Vec<u8>, T))
where
    I: IntoIterator<Item = T>,
{
    out.push(b'[');
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        each(out, item);
    }
    out.push(b']');
}

/// Prints the ATerm. `mask` empties output paths and output-named environment values;
/// `inputs` replaces the input derivations (by hash-modulo hex) when hashing.
pub(super) fn print(
    drv: &Derivation,
    store_dir: &StoreDir,
    mask: bool,
    inputs: Option<&BTreeMap<String, BTreeSet<String>>>,
) -> Result<Vec<u8>, DrvError> {
    let mut out = Vec::with_capacity(4096);
    out.extend_from_slice(b"Derive(");

    let mut fields = Vec::with_capacity(drv.outputs.len());
    for (name, o) in &drv.outputs {
        fields.push((name, o.fields(store_dir, &drv.name, name, mask)?));
    }
    push_list(&mut out, fields, |out, (name, (path, algo, hash))| {
        out.push(b'(');
        push_raw(out, name.as_bytes());
        for f in [path, algo, hash] {
            out.push(b',');
            push_raw(out, f.as_bytes());
        }
        out.push(b')');
    });

    out.push(b',');
    let input_pair = |out: &mut Vec<u8>, key: &[u8], outs: &BTreeSet<String>| {
        out.push(b'(');
        push_raw(out, key);
        out.push(b',');
        push_list(out, outs, |out, o| push_raw(out, o.as_bytes()));
        out.push(b')');
    };
    match inputs {
        Some(map) => push_list(&mut out, map, |out, (k, v)| {
            input_pair(out, k.as_bytes(), v)
        }),
        None => push_list(&mut out, &drv.input_drvs, |out, (k, v)| {
            input_pair(out, store_dir.display(k).as_bytes(), v)
        }),
    }

    out.push(b',');
    push_list(&mut out, &drv.input_srcs, |out, p| {
        push_raw(out, store_dir.display(p).as_bytes())
    });

    out.push(b',');
    push_raw(&mut out, &drv.system);
    out.push(b',');
    push_escaped(&mut out, &drv.builder);
    out.push(b',');
    push_list(&mut out, &drv.args, |out, a| push_escaped(out, a));
    out.push(b',');
    push_list(&mut out, &drv.env, |out, (k, v)| {
        out.push(b'(');
        push_escaped(out, k);
        out.push(b',');
        let masked = mask && std::str::from_utf8(k).is_ok_and(|k| drv.outputs.contains_key(k));
        push_escaped(out, if masked { b"" } else { v });
        out.push(b')');
    });
    out.push(b')');
    Ok(out)
}
