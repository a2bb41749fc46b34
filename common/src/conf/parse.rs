//! The `nix.conf` syntax, as Nix 2.8 reads it (`AbstractConfig::applyConfig`):
//!
//! - the text is cut into lines at `\n` only; there is no line continuation;
//! - everything from the first `#` on a line is a comment, wherever it is (also inside a value);
//! - the rest is split into words at space, tab, CR and LF (nothing else counts as blank);
//! - a line without words is skipped; one word alone is an illegal line;
//! - `include PATH` / `!include PATH` (exactly two words) read another file, PATH relative to the
//!   directory of the including file and normalised lexically (`.`/`..`, no symlinks);
//!   `include` of a missing file is an error, `!include` skips it;
//! - otherwise the second word must be `=`; the value is the remaining words joined by one space
//!   (so runs of blanks collapse and `a = = b` sets `a` to `= b`).
//!
//! Stockade adds limits Nix lacks (Nix recurses on an include loop until its stack overflows):
//! include depth, size per file, total size and number of files read.

use std::collections::BTreeMap;
use std::io::{self, Read};

use super::error::{ConfError, ErrorKind, Location};

/// Deepest chain of nested includes.
pub const MAX_INCLUDE_DEPTH: usize = 16;
/// Largest single configuration file.
pub const MAX_FILE_BYTES: usize = 1 << 20;
/// Most bytes read over one top-level parse, includes counted each time they are read.
pub const MAX_TOTAL_BYTES: usize = 8 << 20;
/// Most files read over one top-level parse.
pub const MAX_FILES: usize = 256;

/// Where included files come from, so the parser itself does no I/O.
pub trait FileSource {
    /// The contents of `path`, or `None` when it does not exist. An implementation may stop
    /// after `limit + 1` bytes: the parser rejects anything longer than `limit` anyway.
    fn read(&mut self, path: &str, limit: usize) -> io::Result<Option<Vec<u8>>>;
}

impl<F> FileSource for F
where
    F: FnMut(&str, usize) -> io::Result<Option<Vec<u8>>>,
{
    fn read(&mut self, path: &str, limit: usize) -> io::Result<Option<Vec<u8>>> {
        self(path, limit)
    }
}

/// Files from a map of absolute path to contents (tests, fuzzing).
#[derive(Clone, Debug, Default)]
pub struct MemorySource(pub BTreeMap<String, Vec<u8>>);

impl FileSource for MemorySource {
    fn read(&mut self, path: &str, _limit: usize) -> io::Result<Option<Vec<u8>>> {
        Ok(self.0.get(path).cloned())
    }
}

/// Files from the real filesystem. Only regular files are read (opened non-blocking so a FIFO
/// cannot hang the daemon); a missing file or a missing directory on the way is "not found".
#[derive(Clone, Copy, Debug, Default)]
pub struct Filesystem;

impl FileSource for Filesystem {
    fn read(&mut self, path: &str, limit: usize) -> io::Result<Option<Vec<u8>>> {
        use std::os::unix::fs::OpenOptionsExt;
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
            .open(path);
        let file = match opened {
            Ok(file) => file,
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(nix::libc::ENOTDIR) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        let meta = file.metadata()?;
        if meta.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "is a directory",
            ));
        }
        if !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        let mut buf = Vec::new();
        file.take(u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1))
            .read_to_end(&mut buf)?;
        Ok(Some(buf))
    }
}

/// One `NAME = VALUE` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub value: String,
    pub location: Location,
}

/// Normalise an absolute path lexically, as Nix's `canonPath` without symlink resolution:
/// repeated and trailing slashes go, `.` goes, `..` removes the previous component (and stays
/// at `/`). `None` when `path` is not absolute.
pub fn canon_path(path: &str) -> Option<String> {
    if !path.starts_with('/') {
        return None;
    }
    let mut out = String::with_capacity(path.len());
    for component in path.split('/') {
        match component {
            "" | "." => {}
            ".." => {
                if let Some(i) = out.rfind('/') {
                    out.truncate(i);
                }
            }
            c => {
                out.push('/');
                out.push_str(c);
            }
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    Some(out)
}

/// The directory part of `path`, as Nix's `dirOf`: `.` without a slash, `/` for `/x`.
pub fn dir_of(path: &str) -> &str {
    match path.rfind('/') {
        None => ".",
        Some(0) => "/",
        Some(i) => path.get(..i).unwrap_or("."),
    }
}

/// The words of a value or line: split at space, tab, CR, LF (Nix's `tokenizeString` default).
pub fn tokenize(s: &str) -> impl Iterator<Item = &str> {
    s.split([' ', '\t', '\n', '\r']).filter(|w| !w.is_empty())
}

/// Parse `contents` (named `path`, which anchors relative includes), reading included files
/// from `source` and handing every assignment, in order, to `sink`. Stops at the first error,
/// from the syntax or from `sink`.
pub fn parse(
    contents: &[u8],
    path: &str,
    source: &mut dyn FileSource,
    sink: &mut dyn FnMut(Entry) -> Result<(), ConfError>,
) -> Result<(), ConfError> {
    let mut parser = Parser::new(source, sink);
    parser.account(path, contents.len())?;
    parser.text(contents, path, 0)
}

/// Parse the file at `path` (absolute). A missing file is `Ok(false)`: Nix runs on defaults
/// without a `nix.conf`.
pub fn parse_file(
    path: &str,
    source: &mut dyn FileSource,
    sink: &mut dyn FnMut(Entry) -> Result<(), ConfError>,
) -> Result<bool, ConfError> {
    let path =
        canon_path(path).ok_or_else(|| ConfError::bare(ErrorKind::NotAbsolute(path.into())))?;
    let mut parser = Parser::new(source, sink);
    match parser.read(&path)? {
        None => Ok(false),
        Some(contents) => parser.text(&contents, &path, 0).map(|()| true),
    }
}

/// [`parse`] collecting the assignments.
pub fn parse_entries(
    contents: &[u8],
    path: &str,
    source: &mut dyn FileSource,
) -> Result<Vec<Entry>, ConfError> {
    let mut entries = Vec::new();
    parse(contents, path, source, &mut |e| {
        entries.push(e);
        Ok(())
    })?;
    Ok(entries)
}

struct Parser<'a> {
    source: &'a mut dyn FileSource,
    sink: &'a mut dyn FnMut(Entry) -> Result<(), ConfError>,
    total_bytes: usize,
    files: usize,
}

impl<'a> Parser<'a> {
    fn new(
        source: &'a mut dyn FileSource,
        sink: &'a mut dyn FnMut(Entry) -> Result<(), ConfError>,
    ) -> Self {
        Parser {
            source,
            sink,
            total_bytes: 0,
            files: 0,
        }
    }

    /// Count one more file of `len` bytes against the limits.
    fn account(&mut self, path: &str, len: usize) -> Result<(), ConfError> {
        if len > MAX_FILE_BYTES {
            return Err(ConfError::bare(ErrorKind::FileTooLarge {
                path: path.into(),
                limit: MAX_FILE_BYTES,
            }));
        }
        self.files += 1;
        if self.files > MAX_FILES {
            return Err(ConfError::bare(ErrorKind::TooManyFiles {
                limit: MAX_FILES,
            }));
        }
        self.total_bytes = self.total_bytes.saturating_add(len);
        if self.total_bytes > MAX_TOTAL_BYTES {
            return Err(ConfError::bare(ErrorKind::TotalTooLarge {
                limit: MAX_TOTAL_BYTES,
            }));
        }
        Ok(())
    }

    fn read(&mut self, path: &str) -> Result<Option<Vec<u8>>, ConfError> {
        let contents = self.source.read(path, MAX_FILE_BYTES).map_err(|e| {
            ConfError::bare(ErrorKind::Read {
                path: path.into(),
                reason: e.to_string(),
            })
        })?;
        if let Some(c) = &contents {
            self.account(path, c.len())?;
        }
        Ok(contents)
    }

    fn text(&mut self, contents: &[u8], path: &str, depth: usize) -> Result<(), ConfError> {
        for (index, raw) in contents.split(|&b| b == b'\n').enumerate() {
            // Built only for lines that need it: blank and comment lines are most of a file.
            let location = || Location {
                file: path.to_owned(),
                line: index + 1,
            };
            let code = match raw.iter().position(|&b| b == b'#') {
                Some(hash) => raw.get(..hash).unwrap_or_default(),
                None => raw,
            };
            let line = std::str::from_utf8(code)
                .map_err(|_| ConfError::at(&location(), ErrorKind::NotUtf8))?;
            let words: Vec<&str> = tokenize(line).collect();
            let illegal = || ConfError::at(&location(), ErrorKind::IllegalLine(line.to_owned()));
            match words.as_slice() {
                [] => {}
                [_] => return Err(illegal()),
                [keyword @ ("include" | "!include"), rest @ ..] => {
                    let [target] = rest else {
                        return Err(illegal());
                    };
                    self.include(target, path, &location(), *keyword == "!include", depth)?;
                }
                [name, eq, value @ ..] => {
                    if *eq != "=" {
                        return Err(illegal());
                    }
                    (self.sink)(Entry {
                        name: (*name).to_owned(),
                        value: value.join(" "),
                        location: location(),
                    })?;
                }
            }
        }
        Ok(())
    }

    fn include(
        &mut self,
        target: &str,
        from: &str,
        location: &Location,
        ignore_missing: bool,
        depth: usize,
    ) -> Result<(), ConfError> {
        let joined = if target.starts_with('/') {
            target.to_owned()
        } else {
            format!("{}/{}", dir_of(from), target)
        };
        let path = canon_path(&joined)
            .ok_or_else(|| ConfError::at(location, ErrorKind::NotAbsolute(joined.clone())))?;
        if depth + 1 > MAX_INCLUDE_DEPTH {
            return Err(ConfError::at(
                location,
                ErrorKind::TooDeep {
                    path,
                    limit: MAX_INCLUDE_DEPTH,
                },
            ));
        }
        // Errors about the included file itself are reported at the include line.
        let contents = self.read(&path).map_err(|e| ConfError {
            location: Some(location.clone()),
            kind: e.kind,
        })?;
        match contents {
            Some(c) => self.text(&c, &path, depth + 1),
            None if ignore_missing => Ok(()),
            None => Err(ConfError::at(
                location,
                ErrorKind::IncludeNotFound {
                    path,
                    from: from.to_owned(),
                },
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(files: &[(&str, &str)]) -> MemorySource {
        MemorySource(
            files
                .iter()
                .map(|(p, c)| ((*p).to_owned(), c.as_bytes().to_vec()))
                .collect(),
        )
    }

    fn pairs(text: &str, files: &[(&str, &str)]) -> Result<Vec<(String, String)>, ConfError> {
        let mut src = mem(files);
        Ok(
            parse_entries(text.as_bytes(), "/etc/nix/nix.conf", &mut src)?
                .into_iter()
                .map(|e| (e.name, e.value))
                .collect(),
        )
    }

    fn p(name: &str, value: &str) -> (String, String) {
        (name.to_owned(), value.to_owned())
    }

    #[test]
    fn assignments_comments_and_blanks() {
        let text = "# a comment\n\n  \t\r\nfoo = bar\nbaz=  \nx = a   b\tc # trailing\r\ny = #only comment\nz = u#v w\n";
        let got = pairs(text, &[]);
        // `baz=` is one word: illegal.
        assert_eq!(
            got.unwrap_err().to_string(),
            "/etc/nix/nix.conf:5: illegal configuration line 'baz=  '"
        );
        let text = "# a comment\n\n  \t\r\nfoo = bar\nbaz =  \nx = a   b\tc # trailing\r\ny = #only comment\nz = u#v w";
        assert_eq!(
            pairs(text, &[]).unwrap(),
            vec![
                p("foo", "bar"),
                p("baz", ""),
                p("x", "a b c"),
                p("y", ""),
                p("z", "u")
            ]
        );
    }

    #[test]
    fn second_word_must_be_equals() {
        assert_eq!(pairs("a = = b\n", &[]).unwrap(), vec![p("a", "= b")]);
        for bad in ["a =b", "a b c", "a := b", "lonely", "a==b c"] {
            let e = pairs(bad, &[]).unwrap_err();
            assert_eq!(e.kind, ErrorKind::IllegalLine(bad.to_owned()), "{bad}");
            assert_eq!(e.location.unwrap().line, 1);
        }
    }

    #[test]
    fn only_ascii_blanks_separate_words() {
        // Vertical tab and form feed are not separators in Nix, nor is U+00A0.
        assert_eq!(pairs("a = x\x0by\n", &[]).unwrap(), vec![p("a", "x\x0by")]);
        assert_eq!(
            pairs("a = x\u{a0}y z\n", &[]).unwrap(),
            vec![p("a", "x\u{a0}y z")]
        );
        assert!(pairs("a\x0b= b\n", &[]).is_err());
    }

    #[test]
    fn no_line_continuation() {
        let e = pairs("a = b \\\n c\n", &[]).unwrap_err();
        assert_eq!(e.kind, ErrorKind::IllegalLine(" c".into()));
        assert_eq!(e.location.unwrap().line, 2);
    }

    #[test]
    fn utf8_only_outside_comments() {
        let mut src = MemorySource::default();
        let ok = parse_entries(b"a = b # caf\xe9\n", "/x", &mut src).unwrap();
        assert_eq!(ok.len(), 1);
        let e = parse_entries(b"\na = caf\xe9\n", "/x", &mut src).unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotUtf8);
        assert_eq!(e.location.unwrap().line, 2);
    }

    #[test]
    fn include_relative_absolute_and_nested() {
        let files = [
            ("/etc/nix/sub/a.conf", "a = 1\ninclude ../b.conf\n"),
            ("/etc/nix/b.conf", "b = 2\n!include /opt/c.conf\n"),
            ("/opt/c.conf", "c = 3\n"),
        ];
        let got = pairs("x = 0\ninclude sub/./a.conf\ny = 4\n", &files).unwrap();
        assert_eq!(
            got,
            vec![
                p("x", "0"),
                p("a", "1"),
                p("b", "2"),
                p("c", "3"),
                p("y", "4")
            ]
        );
        let mut src = mem(&files);
        let entries = parse_entries(b"include sub//a.conf", "/etc/nix/nix.conf", &mut src).unwrap();
        assert_eq!(entries[1].location.to_string(), "/etc/nix/b.conf:1");
    }

    #[test]
    fn include_missing() {
        assert_eq!(
            pairs("!include nope.conf\na = 1\n", &[]).unwrap(),
            vec![p("a", "1")]
        );
        let e = pairs("a = 1\ninclude nope.conf\n", &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/etc/nix/nix.conf:2: file '/etc/nix/nope.conf' included from '/etc/nix/nix.conf' not found"
        );
    }

    #[test]
    fn include_needs_exactly_one_path() {
        for bad in ["include", "!include", "include a b", "include = x"] {
            let e = pairs(bad, &[]).unwrap_err();
            assert!(matches!(e.kind, ErrorKind::IllegalLine(_)), "{bad}: {e}");
        }
    }

    #[test]
    fn include_from_relative_label_fails_cleanly() {
        let mut src = MemorySource::default();
        let e = parse_entries(b"include x.conf", "NIX_CONFIG", &mut src).unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotAbsolute("./x.conf".into()));
    }

    #[test]
    fn include_loop_is_bounded() {
        let files = [("/etc/nix/nix.conf", "a = 1\ninclude nix.conf\n")];
        let mut src = mem(&files);
        let e = parse_file("/etc/nix/nix.conf", &mut src, &mut |_| Ok(())).unwrap_err();
        assert!(
            matches!(
                e.kind,
                ErrorKind::TooDeep {
                    limit: MAX_INCLUDE_DEPTH,
                    ..
                }
            ),
            "{e}"
        );
        // A doubling loop stops at the depth limit, long before 2^16 reads.
        let files = [("/l.conf", "include l.conf\ninclude l.conf\n")];
        let mut src = mem(&files);
        let e = parse_file("/l.conf", &mut src, &mut |_| Ok(())).unwrap_err();
        assert!(matches!(e.kind, ErrorKind::TooDeep { .. }), "{e}");
        // Many small includes hit the file count.
        let files = [("/leaf", "a = 1\n")];
        let mut src = mem(&files);
        let top = "include leaf\n".repeat(MAX_FILES);
        let e = parse_entries(top.as_bytes(), "/top", &mut src).unwrap_err();
        assert_eq!(e.kind, ErrorKind::TooManyFiles { limit: MAX_FILES });
        assert_eq!(e.location.unwrap().line, MAX_FILES);
    }

    #[test]
    fn size_limits() {
        let big = "#".repeat(MAX_FILE_BYTES + 1);
        let mut src = MemorySource::default();
        let e = parse_entries(big.as_bytes(), "/big", &mut src).unwrap_err();
        assert!(matches!(e.kind, ErrorKind::FileTooLarge { .. }));
        let half = "#".repeat(MAX_FILE_BYTES);
        let mut files = vec![];
        let mut top = String::new();
        for i in 0..(MAX_TOTAL_BYTES / MAX_FILE_BYTES + 1) {
            files.push((format!("/f{i}"), half.clone()));
            top.push_str(&format!("include f{i}\n"));
        }
        let files: Vec<(&str, &str)> = files
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        let mut src = mem(&files);
        let e = parse_entries(top.as_bytes(), "/top", &mut src).unwrap_err();
        assert_eq!(
            e.kind,
            ErrorKind::TotalTooLarge {
                limit: MAX_TOTAL_BYTES
            }
        );
        assert_eq!(e.location.unwrap().line, MAX_TOTAL_BYTES / MAX_FILE_BYTES);
    }

    #[test]
    fn sink_error_stops_parsing() {
        let mut src = MemorySource::default();
        let mut seen = 0;
        let e = parse(b"a = 1\nb = 2\nc = 3\n", "/x", &mut src, &mut |e| {
            seen += 1;
            if e.name == "b" {
                Err(ConfError::at(
                    &e.location,
                    ErrorKind::IllegalLine("sink".into()),
                ))
            } else {
                Ok(())
            }
        })
        .unwrap_err();
        assert_eq!(seen, 2);
        assert_eq!(e.to_string(), "/x:2: illegal configuration line 'sink'");
    }

    #[test]
    fn canon_and_dir() {
        assert_eq!(canon_path("/").as_deref(), Some("/"));
        assert_eq!(canon_path("//a//b/../c/./").as_deref(), Some("/a/c"));
        assert_eq!(canon_path("/../..").as_deref(), Some("/"));
        assert_eq!(
            canon_path("/a/.../..x/.y").as_deref(),
            Some("/a/.../..x/.y")
        );
        assert_eq!(canon_path("a/b"), None);
        assert_eq!(canon_path(""), None);
        assert_eq!(dir_of("/etc/nix/nix.conf"), "/etc/nix");
        assert_eq!(dir_of("/nix.conf"), "/");
        assert_eq!(dir_of("nix.conf"), ".");
    }

    #[test]
    fn filesystem_source() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        std::fs::write(
            format!("{d}/main.conf"),
            "include sub/inc.conf\n!include gone.conf\nb = 2\n",
        )
        .unwrap();
        std::fs::create_dir(format!("{d}/sub")).unwrap();
        std::fs::write(format!("{d}/sub/inc.conf"), "a = 1\n").unwrap();
        let mut entries = vec![];
        let found = parse_file(&format!("{d}/main.conf"), &mut Filesystem, &mut |e| {
            entries.push((e.name, e.value));
            Ok(())
        })
        .unwrap();
        assert!(found);
        assert_eq!(entries, vec![p("a", "1"), p("b", "2")]);
        // Missing top-level file and missing directory on the way are "not found".
        assert!(!parse_file(&format!("{d}/none.conf"), &mut Filesystem, &mut |_| Ok(())).unwrap());
        assert!(!parse_file(
            &format!("{d}/main.conf/x"),
            &mut Filesystem,
            &mut |_| Ok(())
        )
        .unwrap());
        // A directory and a FIFO are read errors, not hangs or silent skips.
        let e = parse_file(&format!("{d}/sub"), &mut Filesystem, &mut |_| Ok(())).unwrap_err();
        assert!(matches!(e.kind, ErrorKind::Read { .. }), "{e}");
        nix::unistd::mkfifo(
            format!("{d}/fifo").as_str(),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        std::fs::write(format!("{d}/f.conf"), "include fifo\n").unwrap();
        let e = parse_file(&format!("{d}/f.conf"), &mut Filesystem, &mut |_| Ok(())).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        assert_eq!(e.location.unwrap().line, 1);
        // Reads stop just past the limit.
        std::fs::write(format!("{d}/big"), vec![b'#'; 100]).unwrap();
        let got = Filesystem.read(&format!("{d}/big"), 10).unwrap().unwrap();
        assert_eq!(got.len(), 11);
    }
}
