//! The Redis protocol (RESP2) as a server reads it: commands from a byte stream, and the
//! reply types it writes.
//!
//! A command is a multibulk (`*<n>\r\n` then n times `$<len>\r\n<bytes>\r\n`, what every
//! client library sends) or an inline line (`SET k v\r\n`, as typed into telnet, with
//! Redis' quoting rules). The parser is the server's own rather than a general RESP crate's
//! because a server needs what those decoders, written for clients, do not give: inline
//! commands; limits on counts and lengths checked before anything is allocated; flat,
//! iterative parsing (a request is never nested, so a nested array is an error, not a
//! recursion); and resumption, so a large command arriving in many reads is scanned once,
//! not again from its start at every read.
//!
//! Arguments are slices of the connection's input buffer (no copy); errors carry Redis'
//! own texts, and after one the connection is closed, as Redis does.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Longest inline command line, as Redis (PROTO_INLINE_MAX_SIZE).
pub const INLINE_BYTES_MAX: usize = 64 << 10;

/// What a connection may send, checked before memory is committed to it.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most arguments in one command (the command name included).
    pub args_max: usize,
    /// Most bytes one command may take on the wire (`limits.frame_bytes_max`).
    pub command_bytes_max: usize,
}

/// A malformed or oversized command: the text of the `-ERR Protocol error: ...` reply.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("Protocol error: {0}")]
pub struct ProtocolError(pub String);

fn bad<T>(why: impl Into<String>) -> Result<T, ProtocolError> {
    Err(ProtocolError(why.into()))
}

/// The parse of the command at the front of the input, kept across reads.
#[derive(Debug, Default)]
pub struct Parser {
    /// Arguments announced by `*<n>` (None: the header is not read yet).
    count: Option<usize>,
    /// Each complete argument's bytes, as offsets into the input.
    args: Vec<(usize, usize)>,
    /// Where parsing continues.
    pos: usize,
    /// The input length the next step needs (0: unknown); less input cannot make progress.
    needed: usize,
}

impl Parser {
    /// Takes the next complete command off the front of `input`. `Ok(None)`: the command is
    /// not complete yet ([`Parser::bytes_needed`] says how much must arrive). An inline
    /// line that is empty is skipped, as Redis does.
    pub fn take(&mut self, input: &mut BytesMut, limits: Limits) -> Result<Option<Vec<Bytes>>, ProtocolError> {
        loop {
            if input.is_empty() || input.len() < self.needed {
                return Ok(None);
            }
            if input[0] != b'*' {
                return match self.inline(input, limits)? {
                    Some(args) if args.is_empty() => continue,
                    other => Ok(other),
                };
            }
            if !self.multibulk(input, limits)? {
                return Ok(None);
            }
            let end = self.pos;
            let frame = input.split_to(end).freeze();
            let args = self.args.drain(..).map(|(s, e)| frame.slice(s..e)).collect();
            *self = Parser {
                args: std::mem::take(&mut self.args),
                ..Parser::default()
            };
            return Ok(Some(args));
        }
    }

    /// How many bytes the input must hold for the command at its front to make progress:
    /// a read buffer sized from this grows once for a large argument, not step by step.
    pub fn bytes_needed(&self) -> usize {
        self.needed
    }

    /// Advances through a multibulk; true once it is complete.
    fn multibulk(&mut self, input: &[u8], limits: Limits) -> Result<bool, ProtocolError> {
        if self.count.is_none() {
            let Some((n, next)) = number_line(input, 1)? else {
                return self.wait(input.len() + 1);
            };
            if n < 0 || n as usize > limits.args_max {
                return bad("invalid multibulk length");
            }
            self.count = Some(n as usize);
            self.args.reserve((n as usize).min(1024));
            self.pos = next;
        }
        let count = self.count.unwrap_or(0);
        while self.args.len() < count {
            let Some(&first) = input.get(self.pos) else {
                return self.wait(self.pos + 1);
            };
            if first != b'$' {
                return bad(format!("expected '$', got '{}'", char::from(first).escape_default()));
            }
            let Some((len, start)) = number_line(input, self.pos + 1)? else {
                return self.wait(input.len() + 1);
            };
            if len < 0 || len as usize > limits.command_bytes_max {
                return bad("invalid bulk length");
            }
            let end = start + len as usize;
            // The whole command counts, whether or not its bytes are here yet.
            if end > limits.command_bytes_max {
                return bad(format!(
                    "command exceeds limits.frame_bytes_max ({})",
                    limits.command_bytes_max
                ));
            }
            if input.len() < end + 2 {
                return self.wait(end + 2);
            }
            if &input[end..end + 2] != b"\r\n" {
                return bad("expected CRLF after a bulk string");
            }
            self.args.push((start, end));
            self.pos = end + 2;
        }
        self.needed = 0;
        Ok(true)
    }

    /// Records that the input must hold `needed` bytes before parsing can go on.
    fn wait(&mut self, needed: usize) -> Result<bool, ProtocolError> {
        self.needed = needed;
        Ok(false)
    }

    /// One inline line, split as Redis' sdssplitargs does.
    fn inline(&mut self, input: &mut BytesMut, limits: Limits) -> Result<Option<Vec<Bytes>>, ProtocolError> {
        let Some(nl) = input.iter().position(|&b| b == b'\n') else {
            if input.len() > INLINE_BYTES_MAX {
                return bad("too big inline request");
            }
            self.needed = input.len() + 1;
            return Ok(None);
        };
        if nl > INLINE_BYTES_MAX {
            return bad("too big inline request");
        }
        self.needed = 0;
        let line = input.split_to(nl + 1);
        let line = line.strip_suffix(b"\n").unwrap_or(&line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let args = split_args(line)?;
        if args.len() > limits.args_max {
            return bad("too many arguments in inline request");
        }
        Ok(Some(args))
    }
}

/// Reads `<integer>\r\n` at `at`; `Ok(None)` until the line is complete. Returns the number
/// and where the next line begins.
fn number_line(input: &[u8], at: usize) -> Result<Option<(i64, usize)>, ProtocolError> {
    // 20 digits and a sign are the most an i64 takes.
    let window = &input[at.min(input.len())..input.len().min(at + 24)];
    let Some(cr) = window.iter().position(|&b| b == b'\r') else {
        if window.len() >= 24 {
            return bad("invalid length line");
        }
        return Ok(None);
    };
    let Some(&lf) = window.get(cr + 1) else {
        return Ok(None);
    };
    if lf != b'\n' {
        return bad("invalid length line");
    }
    let text = std::str::from_utf8(&window[..cr]).ok();
    match text.and_then(|t| t.parse::<i64>().ok()) {
        Some(n) => Ok(Some((n, at + cr + 2))),
        None => bad("invalid length line"),
    }
}

/// Splits an inline line into arguments: spaces separate them; "..." may hold escapes
/// (\n, \r, \t, \b, \a, \\, \", \xHH) and '...' only \'; a closing quote must be followed
/// by a space or the end.
pub fn split_args(line: &[u8]) -> Result<Vec<Bytes>, ProtocolError> {
    let mut args = Vec::new();
    let mut i = 0;
    let unbalanced = || bad("unbalanced quotes in request");
    loop {
        while i < line.len() && line[i].is_ascii_whitespace() {
            i += 1;
        }
        if i == line.len() {
            return Ok(args);
        }
        let mut arg = Vec::new();
        match line[i] {
            quote @ (b'"' | b'\'') => {
                i += 1;
                let double = quote == b'"';
                loop {
                    match line.get(i..) {
                        None | Some([]) => return unbalanced(),
                        Some([b'\\', b'x', h, l, ..]) if double && h.is_ascii_hexdigit() && l.is_ascii_hexdigit() => {
                            let hex = std::str::from_utf8(&line[i + 2..i + 4]).unwrap_or("0");
                            arg.push(u8::from_str_radix(hex, 16).unwrap_or(0));
                            i += 4;
                        }
                        Some([b'\\', c, ..]) if double => {
                            arg.push(match c {
                                b'n' => b'\n',
                                b'r' => b'\r',
                                b't' => b'\t',
                                b'b' => 8,
                                b'a' => 7,
                                other => *other,
                            });
                            i += 2;
                        }
                        Some([b'\\', b'\'', ..]) => {
                            arg.push(b'\'');
                            i += 2;
                        }
                        Some([c, rest @ ..]) if *c == quote => {
                            if rest.first().is_some_and(|c| !c.is_ascii_whitespace()) {
                                return unbalanced();
                            }
                            i += 1;
                            break;
                        }
                        Some([c, ..]) => {
                            arg.push(*c);
                            i += 1;
                        }
                    }
                }
            }
            _ => {
                while i < line.len() && !line[i].is_ascii_whitespace() {
                    arg.push(line[i]);
                    i += 1;
                }
            }
        }
        args.push(Bytes::from(arg));
    }
}

/// Appends a simple string reply (`+OK`).
pub fn simple(out: &mut Vec<u8>, s: &str) {
    out.put_u8(b'+');
    out.put_slice(s.as_bytes());
    out.put_slice(b"\r\n");
}

/// Appends an error reply; `text` starts with its code (`ERR ...`, `WRONGTYPE ...`). Line
/// breaks in it would end the reply early, so they become spaces.
pub fn error(out: &mut Vec<u8>, text: &str) {
    out.put_u8(b'-');
    out.extend(text.bytes().map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }));
    out.put_slice(b"\r\n");
}

pub fn integer(out: &mut Vec<u8>, n: i64) {
    out.put_u8(b':');
    out.put_slice(itoa::Buffer::new().format(n).as_bytes());
    out.put_slice(b"\r\n");
}

pub fn bulk(out: &mut Vec<u8>, b: &[u8]) {
    out.put_u8(b'$');
    out.put_slice(itoa::Buffer::new().format(b.len()).as_bytes());
    out.put_slice(b"\r\n");
    out.put_slice(b);
    out.put_slice(b"\r\n");
}

/// The null bulk string (a missing key).
pub fn nil(out: &mut Vec<u8>) {
    out.put_slice(b"$-1\r\n");
}

pub fn array_header(out: &mut Vec<u8>, len: usize) {
    out.put_u8(b'*');
    out.put_slice(itoa::Buffer::new().format(len).as_bytes());
    out.put_slice(b"\r\n");
}

/// Reads a RESP2 reply off the front of `buf` (for clients and tests): `Ok(None)` until it
/// is complete.
pub fn take_reply(buf: &mut BytesMut) -> Result<Option<Reply>, ProtocolError> {
    let mut at = 0;
    let Some(reply) = reply_at(buf, &mut at, 0)? else {
        return Ok(None);
    };
    buf.advance(at);
    Ok(Some(reply))
}

/// A reply as a client sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Integer(i64),
    Bulk(Option<Bytes>),
    Array(Option<Vec<Reply>>),
}

/// Nesting a reply may have before it is refused (replies of this server nest once).
const REPLY_DEPTH_MAX: usize = 8;

fn reply_at(buf: &[u8], at: &mut usize, depth: usize) -> Result<Option<Reply>, ProtocolError> {
    let Some(&kind) = buf.get(*at) else { return Ok(None) };
    let line_end = match buf[*at + 1..].windows(2).position(|w| w == b"\r\n") {
        Some(p) => *at + 1 + p,
        None => return Ok(None),
    };
    let line = &buf[*at + 1..line_end];
    let text = String::from_utf8_lossy(line).into_owned();
    let number = || {
        text.parse::<i64>()
            .map_err(|_| ProtocolError(format!("bad number {text:?}")))
    };
    let next = line_end + 2;
    let reply = match kind {
        b'+' => Reply::Simple(text),
        b'-' => Reply::Error(text),
        b':' => Reply::Integer(number()?),
        b'$' => match number()? {
            -1 => Reply::Bulk(None),
            n if n < 0 => return bad("bad bulk length"),
            n => {
                let end = next + n as usize;
                if buf.len() < end + 2 {
                    return Ok(None);
                }
                *at = end + 2;
                return Ok(Some(Reply::Bulk(Some(Bytes::copy_from_slice(&buf[next..end])))));
            }
        },
        b'*' => match number()? {
            -1 => Reply::Array(None),
            n if n < 0 || depth >= REPLY_DEPTH_MAX => return bad("bad array"),
            n => {
                let mut items = Vec::new();
                let mut pos = next;
                for _ in 0..n {
                    match reply_at(buf, &mut pos, depth + 1)? {
                        Some(r) => items.push(r),
                        None => return Ok(None),
                    }
                }
                *at = pos;
                return Ok(Some(Reply::Array(Some(items))));
            }
        },
        other => return bad(format!("unknown reply type {:?}", char::from(other))),
    };
    *at = next;
    Ok(Some(reply))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        args_max: 16,
        command_bytes_max: 1024,
    };

    fn all(input: &[u8]) -> Result<Vec<Vec<Bytes>>, ProtocolError> {
        let mut buf = BytesMut::from(input);
        let mut p = Parser::default();
        let mut out = Vec::new();
        while let Some(c) = p.take(&mut buf, LIMITS)? {
            out.push(c);
        }
        Ok(out)
    }

    fn args(v: &[&str]) -> Vec<Bytes> {
        v.iter().map(|s| Bytes::copy_from_slice(s.as_bytes())).collect()
    }

    // Goal: multibulk and inline commands parse into their arguments, pipelined; a command
    // split at every byte boundary comes out the same; empty lines are skipped.
    #[test]
    fn commands_parse_whole_or_split() {
        let stream = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\nPING\r\n\r\nset \"a b\" 'c\\'d' \"\\x41\\n\"\n*1\r\n$4\r\nPING\r\n";
        let expected = vec![
            args(&["SET", "k", ""]),
            args(&["PING"]),
            args(&["set", "a b", "c'd", "A\n"]),
            args(&["PING"]),
        ];
        assert_eq!(all(stream).unwrap(), expected);
        let mut buf = BytesMut::new();
        let mut p = Parser::default();
        let mut got = Vec::new();
        for &b in stream.iter() {
            buf.put_u8(b);
            while let Some(c) = p.take(&mut buf, LIMITS).unwrap() {
                got.push(c);
            }
        }
        assert_eq!(got, expected);
        assert!(buf.is_empty());
    }

    // Goal: bad input gets Redis' protocol errors, and limits are checked from the headers,
    // before the bytes they announce arrive or anything is allocated for them.
    #[test]
    fn bad_input_and_limits() {
        let err = |input: &[u8]| all(input).unwrap_err().0;
        assert_eq!(err(b"*17\r\n"), "invalid multibulk length");
        assert_eq!(err(b"*-2\r\n"), "invalid multibulk length");
        assert_eq!(err(b"*1\r\n$2000\r\n"), "invalid bulk length");
        assert_eq!(err(b"*1\r\n+PING\r\n"), "expected '$', got '+'");
        assert_eq!(err(b"*1\r\n$4\r\nPINGxx"), "expected CRLF after a bulk string");
        assert_eq!(err(b"*x\r\n"), "invalid length line");
        assert_eq!(err(b"*99999999999999999999999999\r\n"), "invalid length line");
        assert_eq!(err(b"set \"a\n"), "unbalanced quotes in request");
        assert_eq!(err(b"set \"a\"b\n"), "unbalanced quotes in request");
        assert_eq!(err(&vec![b'a'; INLINE_BYTES_MAX + 1]), "too big inline request");
        assert_eq!(
            err(&[&b"a ".repeat(17)[..], b"\n"].concat()),
            "too many arguments in inline request"
        );
        assert!(err(b"*2\r\n$1020\r\n").contains("frame_bytes_max"));
        // A partial command says what it needs next.
        let mut p = Parser::default();
        let mut buf = BytesMut::from(&b"*1\r\n$100\r\nab"[..]);
        assert_eq!(p.take(&mut buf, LIMITS).unwrap(), None);
        assert_eq!(p.bytes_needed(), 4 + 6 + 100 + 2);
    }

    // Goal: replies encode as RESP2 and a client reads them back.
    #[test]
    fn replies_round_trip() {
        let mut out = Vec::new();
        simple(&mut out, "OK");
        error(&mut out, "ERR bad\r\nthing");
        integer(&mut out, -42);
        bulk(&mut out, b"v\r\n");
        nil(&mut out);
        array_header(&mut out, 2);
        bulk(&mut out, b"a");
        nil(&mut out);
        let mut buf = BytesMut::from(&out[..]);
        let mut got = Vec::new();
        while let Some(r) = take_reply(&mut buf).unwrap() {
            got.push(r);
        }
        assert_eq!(
            got,
            vec![
                Reply::Simple("OK".into()),
                Reply::Error("ERR bad  thing".into()),
                Reply::Integer(-42),
                Reply::Bulk(Some(Bytes::from_static(b"v\r\n"))),
                Reply::Bulk(None),
                Reply::Array(Some(vec![
                    Reply::Bulk(Some(Bytes::from_static(b"a"))),
                    Reply::Bulk(None)
                ])),
            ]
        );
    }
}
