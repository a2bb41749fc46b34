use std::io::Write as _;
use std::os::fd::AsRawFd;

use super::*;

const PREFIX: &str = "stockade-broker[42] conn=7: ";

/// Every line `Lines` emits for `chunks` fed one after another, then end of file.
fn lines_of(chunks: &[&[u8]]) -> Vec<String> {
    let mut l = Lines::new(42, 7);
    let mut out = Vec::new();
    for c in chunks {
        l.feed(c, &mut |s| out.push(s.to_string()));
    }
    l.finish(&mut |s| out.push(s.to_string()));
    out
}

/// The text after the prefix, without the newline; panics on a line that lacks either.
fn body(line: &str) -> &str {
    line.strip_prefix(PREFIX)
        .and_then(|l| l.strip_suffix('\n'))
        .unwrap_or_else(|| panic!("not a relayed line: {line:?}"))
}

fn assert_safe(lines: &[String]) {
    for l in lines {
        assert!(l.len() <= MAX_LINE, "{} bytes: {l:?}", l.len());
        assert_eq!(l.matches('\n').count(), 1, "{l:?}");
        let text = l.trim_end_matches('\n');
        assert!(!text.chars().any(char::is_control), "{l:?}");
        assert!(l.starts_with(PREFIX) || l.starts_with("warning: "), "{l:?}");
    }
}

#[test]
fn each_line_is_prefixed() {
    let got = lines_of(&[b"hello\nworld\n\n"]);
    assert_eq!(
        got,
        [
            format!("{PREFIX}hello\n"),
            format!("{PREFIX}world\n"),
            format!("{PREFIX}\n"),
        ]
    );
}

#[test]
fn lines_are_joined_across_reads_and_the_last_one_flushed() {
    let got = lines_of(&[b"hel", b"lo\nwo", b"rld"]);
    assert_eq!(
        got.iter().map(|l| body(l)).collect::<Vec<_>>(),
        ["hello", "world"]
    );
    assert!(lines_of(&[b""]).is_empty());
    assert!(lines_of(&[b"done\n"]).len() == 1);
}

#[test]
fn forged_lines_and_escapes_stay_inside_one_prefixed_line() {
    let forged = "stockade[1]: audit: conn=0 uid=0 accepted trusted=yes";
    let input = format!(
        "x\r{forged}\n\x1b[2K\x1b[1Gred\tx\\x1b\u{85}nel\u{202e}rev\u{2028}sep\x0bvt\x00\n"
    );
    let got = lines_of(&[input.as_bytes(), b"bad \xff\xfe utf-8\n"]);
    assert_safe(&got);
    let bodies: Vec<&str> = got.iter().map(|l| body(l)).collect();
    assert_eq!(
        bodies,
        [
            format!("x\\r{forged}").as_str(),
            "\\x1b[2K\\x1b[1Gred\\tx\\\\x1b\\x85nel\\u{202e}rev\\u{2028}sep\\x0bvt\\x00",
            "bad \\xff\\xfe utf-8",
        ]
    );
    // A forged line on a line of its own still starts with the broker's prefix.
    let got = lines_of(&[format!("a\n{forged}\n").as_bytes()]);
    assert_eq!(
        got.get(1).map(String::as_str),
        Some(format!("{PREFIX}{forged}\n").as_str())
    );
}

#[test]
fn a_character_split_between_reads_is_kept_whole() {
    let e = "é".as_bytes();
    let got = lines_of(&[&e[..1], &[e[1], b'\n']]);
    assert_eq!(got.iter().map(|l| body(l)).collect::<Vec<_>>(), ["é"]);
    // Cut off by the end of output: the bytes, escaped.
    let got = lines_of(&[b"ab", &e[..1]]);
    assert_eq!(got.iter().map(|l| body(l)).collect::<Vec<_>>(), ["ab\\xc3"]);
    // An invalid continuation after a kept byte.
    let got = lines_of(&[&e[..1], b"z\n"]);
    assert_eq!(got.iter().map(|l| body(l)).collect::<Vec<_>>(), ["\\xc3z"]);
}

#[test]
fn a_long_line_is_written_in_marked_pieces() {
    let long = "a".repeat(10_000);
    let got = lines_of(&[long.as_bytes(), b"\nnext\n"]);
    assert_safe(&got);
    let (last, pieces) = got.split_last().expect("lines");
    assert_eq!(body(last), "next");
    let (end, middle) = pieces.split_last().expect("pieces");
    assert!(middle.len() >= 2, "{}", middle.len());
    let mut joined = String::new();
    for p in middle {
        let b = body(p)
            .strip_suffix(CONTINUES)
            .unwrap_or_else(|| panic!("unmarked piece: {p:?}"));
        joined.push_str(b);
    }
    joined.push_str(body(end));
    assert_eq!(joined, long);
    // Escaping grows a line fourfold; the pieces stay within the bound all the same.
    let got = lines_of(&[&[0xffu8; 5000], b"\n"]);
    assert_safe(&got);
    assert!(got.len() >= 5, "{}", got.len());
}

#[test]
fn output_past_the_total_is_cut_with_one_notice() {
    let mut l = Lines::new(42, 7);
    let mut out: Vec<String> = Vec::new();
    let line = b"0123456789abcde\n";
    let n = usize::try_from(MAX_TOTAL).expect("fits") / line.len();
    for _ in 0..n {
        l.feed(line, &mut |s| out.push(s.to_string()));
    }
    assert_eq!(out.len(), n);
    assert!(!l.is_cut());
    // The next bytes are over: the partial line so far, marked, then the notice.
    l.feed(b"more", &mut |s| out.push(s.to_string()));
    assert!(l.is_cut());
    assert_eq!(out.len(), n + 1);
    let notice = out.last().expect("notice");
    assert!(
        notice.starts_with("warning: the broker of connection 7 (pid 42)"),
        "{notice}"
    );
    assert!(
        notice.contains(&format!("more than {MAX_TOTAL} bytes")),
        "{notice}"
    );
    for _ in 0..10 {
        l.feed(line, &mut |s| out.push(s.to_string()));
    }
    l.finish(&mut |s| out.push(s.to_string()));
    assert_eq!(out.len(), n + 1, "nothing after the notice");

    // A line under way when the bound is reached is written, marked as cut.
    let mut l = Lines::new(42, 7);
    let mut out: Vec<String> = Vec::new();
    let total = usize::try_from(MAX_TOTAL).expect("fits");
    let big = b"x\n".repeat((total - 6) / 2);
    l.feed(&big, &mut |s| out.push(s.to_string()));
    out.clear();
    l.feed(b"ab\ncd", &mut |s| out.push(s.to_string()));
    l.feed(b"ef", &mut |s| out.push(s.to_string()));
    assert_eq!(out.len(), 3, "{out:?}");
    assert_eq!(out.first().map(|l| body(l)), Some("ab"));
    assert_eq!(out.get(1).map(|l| body(l)), Some(&*format!("cde{CUT}")));
    assert_safe(&out);
}

/// What `relay` wrote to its output.
fn text(out: &[u8]) -> String {
    String::from_utf8(out.to_vec()).expect("UTF-8")
}

fn write_all(fd: &OwnedFd, data: &[u8]) {
    std::fs::File::from(fd.try_clone().expect("dup"))
        .write_all(data)
        .expect("write");
}

#[test]
fn the_pipe_reads_without_blocking_and_is_closed_on_exec() {
    let (r, w) = pipe().expect("pipe");
    let fl = |fd: &OwnedFd| {
        OFlag::from_bits_retain(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).expect("getfl"))
    };
    let fd_cloexec = |fd: &OwnedFd| {
        fcntl(fd.as_raw_fd(), FcntlArg::F_GETFD).expect("getfd") & nix::libc::FD_CLOEXEC != 0
    };
    assert!(fl(&r).contains(OFlag::O_NONBLOCK));
    assert!(
        !fl(&w).contains(OFlag::O_NONBLOCK),
        "the broker's end blocks"
    );
    assert!(fd_cloexec(&r) && fd_cloexec(&w));
}

#[test]
fn the_relay_writes_lines_and_ends_at_end_of_file() {
    let (r, w) = pipe().expect("pipe");
    let mut relay = Relay::new();
    relay.add(7, 42, r);
    let mut out = Vec::new();
    write_all(&w, b"one\ntw");
    relay.ready(7, &mut out).expect("ready");
    assert_eq!(text(&out), format!("{PREFIX}one\n"));
    // Nothing to read: no error, nothing written.
    relay.ready(7, &mut out).expect("ready");
    assert_eq!(relay.open_streams(), 1);
    write_all(&w, b"o");
    drop(w);
    relay.ready(7, &mut out).expect("ready");
    assert_eq!(text(&out), format!("{PREFIX}one\n{PREFIX}two\n"));
    assert_eq!(relay.open_streams(), 0, "dropped at end of file");
    // An unknown connection (its stream gone already) is nothing to do.
    relay.ready(7, &mut out).expect("ready");
    relay.exited(7, &mut out).expect("exited");
}

#[test]
fn one_wakeup_reads_at_most_the_budget() {
    let (r, w) = pipe().expect("pipe");
    // Room for more than one budget's worth.
    fcntl(
        w.as_raw_fd(),
        FcntlArg::F_SETPIPE_SZ(4 * READ_BUDGET as i32),
    )
    .expect("pipe size");
    let line = [b'z'; 63].iter().chain(b"\n").copied().collect::<Vec<u8>>();
    let lines = 3 * READ_BUDGET / line.len();
    write_all(&w, &line.repeat(lines));
    let mut relay = Relay::new();
    relay.add(1, 2, r);
    let mut out = Vec::new();
    relay.ready(1, &mut out).expect("ready");
    assert_eq!(text(&out).lines().count(), READ_BUDGET / line.len());
    while text(&out).lines().count() < lines {
        relay.ready(1, &mut out).expect("ready");
    }
    assert_eq!(relay.open_streams(), 1, "still open: the writer is");
}

#[test]
fn an_exited_broker_s_stream_is_dropped_even_if_its_descriptor_lives_on() {
    let (r, w) = pipe().expect("pipe");
    let mut relay = Relay::new();
    relay.add(7, 42, r);
    // `w` stands for a copy the broker passed on before it exited: no end of file comes.
    write_all(&w, b"last words\nno newline");
    let mut out = Vec::new();
    relay.exited(7, &mut out).expect("exited");
    assert_eq!(
        text(&out),
        format!("{PREFIX}last words\n{PREFIX}no newline\n")
    );
    assert_eq!(relay.open_streams(), 0);
}

/// The bound never blocks the writer: past it the relay keeps draining.
#[test]
fn a_flood_is_drained_and_the_writer_never_blocks() {
    let (r, w) = pipe().expect("pipe");
    let mut relay = Relay::new();
    relay.add(3, 9, r);
    let writer = std::thread::spawn(move || {
        let mut f = std::fs::File::from(w);
        let chunk = b"flood flood flood flood flood flood flood flood flood flood flood\n";
        for _ in 0..(4 * MAX_TOTAL as usize / chunk.len()) {
            f.write_all(chunk).expect("the relay keeps reading");
        }
    });
    let mut out = Vec::new();
    while relay.open_streams() > 0 {
        let mut fds: Vec<_> = relay
            .fds()
            .map(|(_, fd)| nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN))
            .collect();
        nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(10_000u16)).expect("poll");
        drop(fds);
        relay.ready(3, &mut out).expect("ready");
    }
    writer.join().expect("writer");
    let out = text(&out);
    let all: Vec<&str> = out.lines().collect();
    // What was relayed is the first MAX_TOTAL bytes written (the last line cut short).
    let relayed: usize = all
        .iter()
        .filter_map(|l| l.strip_prefix("stockade-broker[9] conn=3: "))
        .map(|l| l.trim_end_matches(CUT).len() + 1)
        .sum();
    assert!(
        (MAX_TOTAL..MAX_TOTAL + 2).contains(&(relayed as u64)),
        "{relayed} bytes"
    );
    assert_eq!(all.iter().filter(|l| l.starts_with("warning: ")).count(), 1);
    assert!(all.last().is_some_and(|l| l.starts_with("warning: ")));
}
