//! The stderr/logger channel (PROTOCOL.md §3): messages the server sends while an op runs.

use std::io::{Read, Write};

use super::wire::{WireError, WireReader, WireWriter};
use super::StderrCode;

/// Nix log levels. Values above 7 on the wire saturate to [`Verbosity::Vomit`]: every
/// comparison Nix makes against them gives the same answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(u8)]
pub enum Verbosity {
    #[default]
    Error = 0,
    Warn = 1,
    Notice = 2,
    Info = 3,
    Talkative = 4,
    Chatty = 5,
    Debug = 6,
    Vomit = 7,
}

impl Verbosity {
    pub fn from_wire(v: u32) -> Verbosity {
        match v {
            0 => Verbosity::Error,
            1 => Verbosity::Warn,
            2 => Verbosity::Notice,
            3 => Verbosity::Info,
            4 => Verbosity::Talkative,
            5 => Verbosity::Chatty,
            6 => Verbosity::Debug,
            _ => Verbosity::Vomit,
        }
    }

    pub fn to_wire(self) -> u64 {
        self as u64
    }
}

/// Activity type of `STDERR_START_ACTIVITY` (PROTOCOL.md §3). Kept open: unknown numbers from a
/// newer daemon pass through a proxy unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ActivityType(pub u32);

impl ActivityType {
    pub const UNKNOWN: Self = Self(0);
    pub const COPY_PATH: Self = Self(100);
    pub const FILE_TRANSFER: Self = Self(101);
    pub const REALISE: Self = Self(102);
    pub const COPY_PATHS: Self = Self(103);
    pub const BUILDS: Self = Self(104);
    pub const BUILD: Self = Self(105);
    pub const OPTIMISE_STORE: Self = Self(106);
    pub const VERIFY_PATHS: Self = Self(107);
    pub const SUBSTITUTE: Self = Self(108);
    pub const QUERY_PATH_INFO: Self = Self(109);
    pub const POST_BUILD_HOOK: Self = Self(110);
    pub const BUILD_WAITING: Self = Self(111);
}

/// Result type of `STDERR_RESULT` (PROTOCOL.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResultType(pub u32);

impl ResultType {
    pub const FILE_LINKED: Self = Self(100);
    pub const BUILD_LOG_LINE: Self = Self(101);
    pub const UNTRUSTED_PATH: Self = Self(102);
    pub const CORRUPTED_PATH: Self = Self(103);
    pub const SET_PHASE: Self = Self(104);
    pub const PROGRESS: Self = Self(105);
    pub const SET_EXPECTED: Self = Self(106);
    pub const POST_BUILD_LOG_LINE: Self = Self(107);
}

/// An activity/result field: kind 0 is a `u64`, kind 1 a `str` (bytes: log lines need not be
/// UTF-8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    Int(u64),
    String(Vec<u8>),
}

impl Field {
    pub fn string(s: impl Into<Vec<u8>>) -> Field {
        Field::String(s.into())
    }
}

/// An error as carried by `STDERR_ERROR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorInfo {
    pub level: Verbosity,
    /// The rendered message (Nix puts ANSI colour escapes in it).
    pub message: Vec<u8>,
    /// Trace texts (minor ≥ 26 only; older clients get the message alone).
    pub traces: Vec<Vec<u8>>,
    /// Only sent to clients with minor < 26 (the structured form has no status).
    pub exit_status: u32,
}

impl ErrorInfo {
    /// An error at level Error with exit status 1, like most daemon errors.
    pub fn new(message: impl Into<Vec<u8>>) -> ErrorInfo {
        ErrorInfo {
            level: Verbosity::Error,
            message: message.into(),
            traces: Vec::new(),
            exit_status: 1,
        }
    }
}

/// One message on the stderr channel. Text payloads are the exact wire bytes: a log line sent
/// with `Next` carries its trailing `\n` (see [`StderrMsg::log_line`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StderrMsg {
    Next(Vec<u8>),
    /// The server asks the client for up to `n` bytes of data.
    Read(u64),
    /// A chunk for the client's sink.
    Write(Vec<u8>),
    Last,
    Error(ErrorInfo),
    StartActivity {
        id: u64,
        level: Verbosity,
        activity_type: ActivityType,
        text: Vec<u8>,
        fields: Vec<Field>,
        parent: u64,
    },
    StopActivity(u64),
    Result {
        id: u64,
        result_type: ResultType,
        fields: Vec<Field>,
    },
}

/// The `"Error"` tag of the structured error form; a 2.8 client asserts it.
const ERROR_TAG: &[u8] = b"Error";

fn write_fields<W: Write>(w: &mut WireWriter<W>, fields: &[Field]) -> Result<(), WireError> {
    w.write_u64(fields.len() as u64)?;
    for f in fields {
        match f {
            Field::Int(i) => {
                w.write_u64(0)?;
                w.write_u64(*i)?;
            }
            Field::String(s) => {
                w.write_u64(1)?;
                w.write_bytes(s)?;
            }
        }
    }
    Ok(())
}

fn read_fields<R: Read>(r: &mut WireReader<R>) -> Result<Vec<Field>, WireError> {
    let offset = r.position();
    let max = r.limits().max_fields;
    let count = u64::from(r.read_u32("activity field count")?);
    if count > max {
        return Err(WireError::TooMany {
            what: "activity field count",
            offset,
            count,
            max,
        });
    }
    let mut fields = Vec::new();
    for _ in 0..count {
        let offset = r.position();
        match r.read_u32("activity field kind")? {
            0 => fields.push(Field::Int(r.read_u64("activity field")?)),
            1 => fields.push(Field::String(r.read_bytes("activity field")?)),
            kind => {
                return Err(WireError::InvalidValue {
                    what: "activity field kind",
                    offset,
                    value: kind.into(),
                })
            }
        }
    }
    Ok(fields)
}

impl StderrMsg {
    /// A log line as the daemon's logger sends it: `text` plus a newline.
    pub fn log_line(text: impl Into<Vec<u8>>) -> StderrMsg {
        let mut t = text.into();
        t.push(b'\n');
        StderrMsg::Next(t)
    }

    /// The wire code this message starts with.
    pub fn code(&self) -> u64 {
        match self {
            StderrMsg::Next(_) => StderrCode::NEXT,
            StderrMsg::Read(_) => StderrCode::READ,
            StderrMsg::Write(_) => StderrCode::WRITE,
            StderrMsg::Last => StderrCode::LAST,
            StderrMsg::Error(_) => StderrCode::ERROR,
            StderrMsg::StartActivity { .. } => StderrCode::START_ACTIVITY,
            StderrMsg::StopActivity(_) => StderrCode::STOP_ACTIVITY,
            StderrMsg::Result { .. } => StderrCode::RESULT,
        }
    }

    /// Encodes for a client speaking `minor` (not flushed). Below minor 20 activities and
    /// results do not exist: a start with non-empty text becomes the log line `"<text>..."` and
    /// the rest is dropped; a caller reproducing nix-daemon exactly also drops that line when its
    /// level is above the client's verbosity, as for any `Next`.
    pub fn write<W: Write>(&self, w: &mut WireWriter<W>, minor: u8) -> Result<(), WireError> {
        match self {
            StderrMsg::StartActivity { text, .. } if minor < 20 => {
                if !text.is_empty() {
                    let mut line = text.clone();
                    line.extend_from_slice(b"...\n");
                    w.write_u64(StderrCode::NEXT)?;
                    w.write_bytes(&line)?;
                }
                return Ok(());
            }
            StderrMsg::StopActivity(_) | StderrMsg::Result { .. } if minor < 20 => return Ok(()),
            _ => {}
        }
        w.write_u64(self.code())?;
        match self {
            StderrMsg::Next(text) | StderrMsg::Write(text) => w.write_bytes(text),
            StderrMsg::Read(n) => w.write_u64(*n),
            StderrMsg::Last => Ok(()),
            StderrMsg::Error(e) if minor >= 26 => {
                w.write_bytes(ERROR_TAG)?;
                w.write_u64(e.level.to_wire())?;
                w.write_bytes(ERROR_TAG)?;
                w.write_bytes(&e.message)?;
                w.write_u64(0)?; // no position
                w.write_u64(e.traces.len() as u64)?;
                for t in &e.traces {
                    w.write_u64(0)?; // no position
                    w.write_bytes(t)?;
                }
                Ok(())
            }
            StderrMsg::Error(e) => {
                w.write_bytes(&e.message)?;
                w.write_u64(e.exit_status.into())
            }
            StderrMsg::StartActivity {
                id,
                level,
                activity_type,
                text,
                fields,
                parent,
            } => {
                w.write_u64(*id)?;
                w.write_u64(level.to_wire())?;
                w.write_u64(activity_type.0.into())?;
                w.write_bytes(text)?;
                write_fields(w, fields)?;
                w.write_u64(*parent)
            }
            StderrMsg::StopActivity(id) => w.write_u64(*id),
            StderrMsg::Result {
                id,
                result_type,
                fields,
            } => {
                w.write_u64(*id)?;
                w.write_u64(result_type.0.into())?;
                write_fields(w, fields)
            }
        }
    }

    /// Decodes one message as a client speaking `minor` would, with the reader's limits
    /// (texts bounded by `max_string`, fields by `max_fields`, traces by `max_traces`).
    pub fn read<R: Read>(r: &mut WireReader<R>, minor: u8) -> Result<StderrMsg, WireError> {
        let code = r.read_u64("stderr message code")?;
        Ok(match code {
            StderrCode::NEXT => StderrMsg::Next(r.read_bytes("log message")?),
            StderrCode::READ => StderrMsg::Read(r.read_u64("STDERR_READ length")?),
            StderrCode::WRITE => StderrMsg::Write(r.read_bytes("STDERR_WRITE data")?),
            StderrCode::LAST => StderrMsg::Last,
            StderrCode::ERROR if minor >= 26 => StderrMsg::Error(read_structured_error(r)?),
            StderrCode::ERROR => {
                let message = r.read_bytes("error message")?;
                let exit_status = r.read_u32("error exit status")?;
                StderrMsg::Error(ErrorInfo {
                    level: Verbosity::Error,
                    message,
                    traces: Vec::new(),
                    exit_status,
                })
            }
            StderrCode::START_ACTIVITY => {
                let id = r.read_u64("activity id")?;
                let level = Verbosity::from_wire(r.read_u32("activity level")?);
                let activity_type = ActivityType(r.read_u32("activity type")?);
                let text = r.read_bytes("activity text")?;
                let fields = read_fields(r)?;
                let parent = r.read_u64("activity parent")?;
                StderrMsg::StartActivity {
                    id,
                    level,
                    activity_type,
                    text,
                    fields,
                    parent,
                }
            }
            StderrCode::STOP_ACTIVITY => StderrMsg::StopActivity(r.read_u64("activity id")?),
            StderrCode::RESULT => {
                let id = r.read_u64("activity id")?;
                let result_type = ResultType(r.read_u32("result type")?);
                let fields = read_fields(r)?;
                StderrMsg::Result {
                    id,
                    result_type,
                    fields,
                }
            }
            code => return Err(WireError::UnknownStderr { code }),
        })
    }
}

/// The minor ≥ 26 error layout; rejects what the 2.8 client would assert on.
fn read_structured_error<R: Read>(r: &mut WireReader<R>) -> Result<ErrorInfo, WireError> {
    let offset = r.position();
    if r.read_bytes_max("error type", 64)? != ERROR_TAG {
        return Err(WireError::Unexpected {
            what: "error type",
            offset,
            expected: "Error",
        });
    }
    let level = Verbosity::from_wire(r.read_u32("error level")?);
    r.skip_bytes("error name", r.limits().max_string)?;
    let message = r.read_bytes("error message")?;
    let offset = r.position();
    let has_pos = r.read_u64("error position")?;
    if has_pos != 0 {
        return Err(WireError::InvalidValue {
            what: "error position",
            offset,
            value: has_pos,
        });
    }
    let offset = r.position();
    let max = r.limits().max_traces;
    let count = r.read_u64("error trace count")?;
    if count > max {
        return Err(WireError::TooMany {
            what: "error trace count",
            offset,
            count,
            max,
        });
    }
    let mut traces = Vec::new();
    let mut total: u64 = 0;
    let max_total = r.limits().max_collection_bytes;
    for _ in 0..count {
        let offset = r.position();
        let has_pos = r.read_u64("error trace position")?;
        if has_pos != 0 {
            return Err(WireError::InvalidValue {
                what: "error trace position",
                offset,
                value: has_pos,
            });
        }
        let t = r.read_bytes("error trace")?;
        total = total.saturating_add(t.len() as u64);
        if total > max_total {
            return Err(WireError::TotalTooLarge {
                what: "error traces",
                offset,
                max: max_total,
            });
        }
        traces.push(t);
    }
    Ok(ErrorInfo {
        level,
        message,
        traces,
        exit_status: 1,
    })
}

#[cfg(test)]
mod tests {
    use super::super::wire::Limits;
    use super::*;

    fn enc(msg: &StderrMsg, minor: u8) -> Vec<u8> {
        let mut out = Vec::new();
        let mut w = WireWriter::new(&mut out);
        msg.write(&mut w, minor).unwrap();
        w.flush().unwrap();
        drop(w);
        out
    }

    fn dec(bytes: &[u8], minor: u8) -> Result<StderrMsg, WireError> {
        let mut r = WireReader::new(bytes);
        let m = StderrMsg::read(&mut r, minor)?;
        assert_eq!(r.position(), bytes.len() as u64, "trailing bytes");
        Ok(m)
    }

    /// Hand-written encoding helpers (independent of WireWriter).
    fn u(v: u64) -> Vec<u8> {
        v.to_le_bytes().to_vec()
    }
    fn s(b: &[u8]) -> Vec<u8> {
        let mut v = u(b.len() as u64);
        v.extend_from_slice(b);
        v.resize(v.len() + (8 - b.len() % 8) % 8, 0);
        v
    }

    fn samples() -> Vec<StderrMsg> {
        vec![
            StderrMsg::log_line("hello"),
            StderrMsg::Read(32768),
            StderrMsg::Write(vec![0, 1, 2, 255]),
            StderrMsg::Last,
            StderrMsg::Error(ErrorInfo {
                level: Verbosity::Error,
                message: b"\x1b[31;1merror:\x1b[0m boom".to_vec(),
                traces: vec![b"while doing x".to_vec(), Vec::new()],
                exit_status: 1,
            }),
            StderrMsg::StartActivity {
                id: (1234 << 32) + 5,
                level: Verbosity::Info,
                activity_type: ActivityType::BUILD,
                text: b"building '/nix/store/x.drv'".to_vec(),
                fields: vec![
                    Field::string("/nix/store/x.drv"),
                    Field::string(""),
                    Field::Int(1),
                    Field::Int(1),
                ],
                parent: 0,
            },
            StderrMsg::StopActivity(7),
            StderrMsg::Result {
                id: 7,
                result_type: ResultType::BUILD_LOG_LINE,
                fields: vec![Field::String(vec![0xff, b'x'])],
            },
        ]
    }

    #[test]
    fn round_trip_at_current_minor() {
        for m in samples() {
            assert_eq!(dec(&enc(&m, 34), 34).unwrap(), m);
        }
    }

    #[test]
    fn last_and_next_are_byte_exact() {
        assert_eq!(enc(&StderrMsg::Last, 34), b"stla\0\0\0\0");
        let mut expect = b"gmlo\0\0\0\0".to_vec();
        expect.extend(s(b"hi\n"));
        assert_eq!(enc(&StderrMsg::log_line("hi"), 34), expect);
        let mut expect = u(0x6461_7461);
        expect.extend(u(4096));
        assert_eq!(enc(&StderrMsg::Read(4096), 34), expect);
    }

    #[test]
    fn structured_error_is_byte_exact() {
        let e = StderrMsg::Error(ErrorInfo {
            level: Verbosity::Error,
            message: b"oops".to_vec(),
            traces: vec![b"t1".to_vec()],
            exit_status: 100,
        });
        let mut expect = u(0x6378_7470);
        expect.extend(s(b"Error"));
        expect.extend(u(0)); // level
        expect.extend(s(b"Error"));
        expect.extend(s(b"oops"));
        expect.extend(u(0)); // has-pos
        expect.extend(u(1)); // traces
        expect.extend(u(0));
        expect.extend(s(b"t1"));
        assert_eq!(enc(&e, 26), expect);
        assert_eq!(enc(&e, 34), expect);
    }

    #[test]
    fn old_error_form_below_26() {
        let e = StderrMsg::Error(ErrorInfo {
            traces: vec![b"dropped".to_vec()],
            exit_status: 100,
            ..ErrorInfo::new("oops")
        });
        let mut expect = u(0x6378_7470);
        expect.extend(s(b"oops"));
        expect.extend(u(100));
        let bytes = enc(&e, 25);
        assert_eq!(bytes, expect);
        let StderrMsg::Error(got) = dec(&bytes, 25).unwrap() else {
            panic!()
        };
        assert_eq!(got.message, b"oops");
        assert_eq!(got.exit_status, 100);
        assert!(got.traces.is_empty());
    }

    #[test]
    fn activity_encoding_is_byte_exact() {
        let m = StderrMsg::StartActivity {
            id: 9,
            level: Verbosity::Info,
            activity_type: ActivityType::BUILD,
            text: b"building".to_vec(),
            fields: vec![Field::string("/d.drv"), Field::Int(2)],
            parent: 3,
        };
        let mut expect = u(0x5354_5254);
        expect.extend(u(9));
        expect.extend(u(3));
        expect.extend(u(105));
        expect.extend(s(b"building"));
        expect.extend(u(2));
        expect.extend(u(1));
        expect.extend(s(b"/d.drv"));
        expect.extend(u(0));
        expect.extend(u(2));
        expect.extend(u(3));
        assert_eq!(enc(&m, 20), expect);

        let r = StderrMsg::Result {
            id: 9,
            result_type: ResultType::PROGRESS,
            fields: vec![Field::Int(1), Field::Int(2), Field::Int(0), Field::Int(0)],
        };
        let mut expect = u(0x5253_4c54);
        expect.extend(u(9));
        expect.extend(u(105));
        expect.extend(u(4));
        for v in [1, 2, 0, 0] {
            expect.extend(u(0));
            expect.extend(u(v));
        }
        assert_eq!(enc(&r, 34), expect);
        let mut expect = u(0x5354_4f50);
        expect.extend(u(9));
        assert_eq!(enc(&StderrMsg::StopActivity(9), 34), expect);
    }

    #[test]
    fn activities_below_minor_20() {
        let start = |text: &str| StderrMsg::StartActivity {
            id: 1,
            level: Verbosity::Info,
            activity_type: ActivityType::BUILD,
            text: text.as_bytes().to_vec(),
            fields: vec![],
            parent: 0,
        };
        let mut expect = u(0x6f6c_6d67);
        expect.extend(s(b"building x...\n"));
        assert_eq!(enc(&start("building x"), 19), expect);
        assert!(enc(&start(""), 19).is_empty());
        assert!(enc(&StderrMsg::StopActivity(1), 19).is_empty());
        let r = StderrMsg::Result {
            id: 1,
            result_type: ResultType::BUILD_LOG_LINE,
            fields: vec![],
        };
        assert!(enc(&r, 19).is_empty());
        assert!(!enc(&r, 20).is_empty());
    }

    #[test]
    fn unknown_code_and_bad_error_forms_are_rejected() {
        assert!(matches!(
            dec(&u(0x1234), 34),
            Err(WireError::UnknownStderr { code: 0x1234 })
        ));
        // Wrong tag.
        let mut b = u(StderrCode::ERROR);
        b.extend(s(b"Oops!"));
        assert!(matches!(dec(&b, 34), Err(WireError::Unexpected { .. })));
        // Non-zero position.
        let mut b = u(StderrCode::ERROR);
        b.extend(s(b"Error"));
        b.extend(u(0));
        b.extend(s(b"Error"));
        b.extend(s(b"m"));
        b.extend(u(1));
        assert!(matches!(
            dec(&b, 34),
            Err(WireError::InvalidValue {
                what: "error position",
                ..
            })
        ));
        // Absurd trace count.
        let mut b = u(StderrCode::ERROR);
        b.extend(s(b"Error"));
        b.extend(u(0));
        b.extend(s(b"Error"));
        b.extend(s(b"m"));
        b.extend(u(0));
        b.extend(u(1 << 32));
        assert!(matches!(dec(&b, 34), Err(WireError::TooMany { .. })));
        // Narrow level.
        let mut b = u(StderrCode::ERROR);
        b.extend(s(b"Error"));
        b.extend(u(1 << 32));
        assert!(matches!(dec(&b, 34), Err(WireError::IntTooLarge { .. })));
    }

    #[test]
    fn field_limits_and_kinds() {
        let mut b = u(StderrCode::RESULT);
        b.extend(u(1));
        b.extend(u(101));
        b.extend(u(65));
        assert!(matches!(
            dec(&b, 34),
            Err(WireError::TooMany { max: 64, .. })
        ));
        let mut b = u(StderrCode::RESULT);
        b.extend(u(1));
        b.extend(u(101));
        b.extend(u(1 << 32));
        assert!(matches!(dec(&b, 34), Err(WireError::IntTooLarge { .. })));
        let mut b = u(StderrCode::RESULT);
        b.extend(u(1));
        b.extend(u(101));
        b.extend(u(1));
        b.extend(u(2));
        assert!(matches!(
            dec(&b, 34),
            Err(WireError::InvalidValue {
                what: "activity field kind",
                value: 2,
                ..
            })
        ));
    }

    #[test]
    fn text_limits_apply() {
        let mut b = u(StderrCode::NEXT);
        b.extend(u(1 << 63));
        assert!(matches!(dec(&b, 34), Err(WireError::TooLong { .. })));
        let limits = Limits {
            max_string: 4,
            ..Limits::default()
        };
        let bytes = enc(&StderrMsg::Write(b"12345".to_vec()), 34);
        let mut r = WireReader::with_limits(&bytes[..], limits);
        assert!(matches!(
            StderrMsg::read(&mut r, 34),
            Err(WireError::TooLong { len: 5, max: 4, .. })
        ));
    }

    #[test]
    fn truncated_messages_fail_cleanly() {
        for m in samples() {
            let bytes = enc(&m, 34);
            for cut in 0..bytes.len() {
                assert!(
                    matches!(dec(&bytes[..cut], 34), Err(WireError::Eof { .. })),
                    "{m:?} {cut}"
                );
            }
        }
    }

    #[test]
    fn verbosity_saturates() {
        assert_eq!(Verbosity::from_wire(3), Verbosity::Info);
        assert_eq!(Verbosity::from_wire(7), Verbosity::Vomit);
        assert_eq!(Verbosity::from_wire(u32::MAX), Verbosity::Vomit);
        assert!(Verbosity::Debug > Verbosity::Info);
        assert_eq!(Verbosity::Talkative.to_wire(), 4);
    }
}
