//! The Redis protocol (RESP2) as far as the RESP front door needs it: commands in, replies out.
//! Pure: bytes in, values out, no I/O.
//!
//! ```text
//!  command = "*" N CRLF ( "$" LEN CRLF bytes CRLF ){N}      (what every Redis client sends)
//!          | a line of words separated by spaces, ending in LF or CRLF  (inline: telnet, nc)
//!  replies: "+OK"  "-ERR message"  ":42"  "$3 CRLF abc"  "$-1" (nil)  "*N" then N replies
//! ```
//!
//! A command is parsed where it lies in the read buffer: [`parse_command`] answers the byte
//! ranges of its arguments, nothing is copied. Every size is bounded before anything is
//! buffered for it (B1): [`ARGS_MAX`] arguments, [`ARG_BYTES_MAX`] bytes per argument,
//! [`COMMAND_BYTES_MAX`] bytes per command, [`INLINE_BYTES_MAX`] per inline line. A declared
//! size over a limit is a protocol error at once, so an unterminated bulk string that claims
//! gigabytes costs nothing.

use std::ops::Range;

/// Most arguments of one command (the command name included): an `MGET` of up to
/// `seq.batch_ids_max` keys fits.
pub const ARGS_MAX: usize = 16_384;
/// Most bytes of one argument. Keys are `namespace:id`; tokens (`AUTH`) are the longest.
pub const ARG_BYTES_MAX: usize = 4_096;
/// Most bytes of one whole command, headers included.
pub const COMMAND_BYTES_MAX: usize = 1 << 20;
/// Most bytes of one inline command line (Redis's own limit is 64 KiB).
pub const INLINE_BYTES_MAX: usize = 64 * 1024;
/// Most bytes of a `*N` or `$LEN` header line before its CRLF.
const HEADER_BYTES_MAX: usize = 32;

/// Parses one command at the start of `input`. `Ok(None)`: incomplete, read more.
/// `Ok(Some(used))`: a command of `used` bytes whose arguments are the ranges now in `args`
/// (an empty `args` is an empty command: skip it). `Err(reason)`: the stream cannot be trusted
/// any more; answer `-ERR Protocol error: reason` and close, as Redis does.
pub fn parse_command(input: &[u8], args: &mut Vec<Range<usize>>) -> Result<Option<usize>, String> {
    args.clear();
    match input.first() {
        None => Ok(None),
        Some(b'*') => parse_multibulk(input, args),
        Some(_) => parse_inline(input, args),
    }
}

/// The position just past the CRLF of the line starting at `from`, and the line's content;
/// `Ok(None)` while the line is incomplete.
fn header_line(input: &[u8], from: usize, what: &str) -> Result<Option<(usize, i64)>, String> {
    let window = &input[from..input.len().min(from + HEADER_BYTES_MAX + 2)];
    let Some(at) = window.windows(2).position(|pair| pair == b"\r\n") else {
        if window.len() >= HEADER_BYTES_MAX + 2 {
            return Err(format!("too big {what} header"));
        }
        return Ok(None);
    };
    let text =
        std::str::from_utf8(&window[1..at]).map_err(|_| format!("invalid {what} length"))?;
    let value: i64 = text.parse().map_err(|_| format!("invalid {what} length"))?;
    Ok(Some((from + at + 2, value)))
}

fn parse_multibulk(input: &[u8], args: &mut Vec<Range<usize>>) -> Result<Option<usize>, String> {
    let Some((mut at, count)) = header_line(input, 0, "multibulk")? else {
        return Ok(None);
    };
    if count <= 0 {
        // `*0` and `*-1`: an empty command, skipped (as Redis does).
        return Ok(Some(at));
    }
    let count = usize::try_from(count).unwrap_or(usize::MAX);
    if count > ARGS_MAX {
        return Err(format!(
            "invalid multibulk length {count}: at most {ARGS_MAX} arguments (ARGS_MAX)"
        ));
    }
    for _ in 0..count {
        match input.get(at) {
            None => return Ok(None),
            Some(b'$') => {}
            Some(&other) => {
                return Err(format!(
                    "expected '$', got '{}'",
                    char::from(other).escape_default()
                ));
            }
        }
        let Some((start, len)) = header_line(input, at, "bulk")? else {
            return Ok(None);
        };
        let len = usize::try_from(len).map_err(|_| format!("invalid bulk length {len}"))?;
        if len > ARG_BYTES_MAX {
            return Err(format!(
                "invalid bulk length {len}: an argument is at most {ARG_BYTES_MAX} bytes \
                 (ARG_BYTES_MAX)"
            ));
        }
        let end = start + len;
        if end + 2 > COMMAND_BYTES_MAX {
            return Err(format!(
                "a command over {COMMAND_BYTES_MAX} bytes (COMMAND_BYTES_MAX)"
            ));
        }
        if input.len() < end + 2 {
            return Ok(None);
        }
        if &input[end..end + 2] != b"\r\n" {
            return Err("a bulk string not followed by CRLF".into());
        }
        args.push(start..end);
        at = end + 2;
    }
    Ok(Some(at))
}

fn parse_inline(input: &[u8], args: &mut Vec<Range<usize>>) -> Result<Option<usize>, String> {
    let window = &input[..input.len().min(INLINE_BYTES_MAX + 1)];
    let Some(newline) = window.iter().position(|&byte| byte == b'\n') else {
        if window.len() > INLINE_BYTES_MAX {
            return Err(format!(
                "too big inline request: at most {INLINE_BYTES_MAX} bytes (INLINE_BYTES_MAX)"
            ));
        }
        return Ok(None);
    };
    let line_end = if newline > 0 && input[newline - 1] == b'\r' {
        newline - 1
    } else {
        newline
    };
    let mut at = 0;
    while at < line_end {
        while at < line_end && input[at].is_ascii_whitespace() {
            at += 1;
        }
        let start = at;
        while at < line_end && !input[at].is_ascii_whitespace() {
            at += 1;
        }
        if at > start {
            if args.len() == ARGS_MAX {
                return Err(format!("more than {ARGS_MAX} arguments (ARGS_MAX)"));
            }
            args.push(start..at);
        }
    }
    Ok(Some(newline + 1))
}

/// Appends `+text`.
pub fn simple(out: &mut Vec<u8>, text: &str) {
    out.push(b'+');
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends an error reply. `message` starts with its code word (`ERR`, `NOAUTH`,
/// `WRONGPASS`, ...); line breaks in it become spaces, so a message can never break framing.
pub fn error(out: &mut Vec<u8>, message: &str) {
    out.push(b'-');
    out.extend(message.bytes().map(|byte| {
        if byte == b'\r' || byte == b'\n' {
            b' '
        } else {
            byte
        }
    }));
    out.extend_from_slice(b"\r\n");
}

/// Appends `:value`.
pub fn integer(out: &mut Vec<u8>, value: u64) {
    out.push(b':');
    out.extend_from_slice(value.to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends a bulk string.
pub fn bulk(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(b'$');
    out.extend_from_slice(bytes.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
}

/// Appends the nil bulk string (`$-1`).
pub fn nil(out: &mut Vec<u8>) {
    out.extend_from_slice(b"$-1\r\n");
}

/// Appends an array header of `len` elements (the elements follow).
pub fn array(out: &mut Vec<u8>, len: usize) {
    out.push(b'*');
    out.extend_from_slice(len.to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn encode(args: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        array(&mut out, args.len());
        for arg in args {
            bulk(&mut out, arg);
        }
        out
    }

    /// Every command of `input`, as owned arguments; panics on a protocol error.
    fn all(input: &[u8]) -> (Vec<Vec<Vec<u8>>>, usize) {
        let mut args = Vec::new();
        let mut at = 0;
        let mut commands = Vec::new();
        while let Some(used) = parse_command(&input[at..], &mut args).unwrap() {
            commands.push(
                args.iter()
                    .map(|r| input[at..][r.clone()].to_vec())
                    .collect(),
            );
            at += used;
        }
        (commands, at)
    }

    #[test]
    fn multibulk_and_inline_commands_parse_to_their_arguments() {
        let mut input = encode(&[b"INCRBY", b"counter:7", b"10"]);
        input.extend_from_slice(b"PING\r\n  get   k  \n*0\r\n");
        let (commands, used) = all(&input);
        assert_eq!(used, input.len());
        assert_eq!(
            commands,
            vec![
                vec![b"INCRBY".to_vec(), b"counter:7".to_vec(), b"10".to_vec()],
                vec![b"PING".to_vec()],
                vec![b"get".to_vec(), b"k".to_vec()],
                vec![],
            ]
        );
    }

    #[test]
    fn bad_frames_are_named_and_huge_declared_sizes_are_refused_before_buffering() {
        let mut args = Vec::new();
        let cases: [(&[u8], &str); 6] = [
            (b"*2\r\n$3\r\nGET\r\n:1\r\n", "expected '$'"),
            (b"*x\r\n", "invalid multibulk length"),
            (b"*99999999\r\n", "ARGS_MAX"),
            (b"*1\r\n$999999999\r\n", "ARG_BYTES_MAX"),
            (b"*1\r\n$-5\r\n", "invalid bulk length"),
            (b"*1\r\n$3\r\nGETXX", "not followed by CRLF"),
        ];
        for (input, expected) in cases {
            let error = parse_command(input, &mut args).unwrap_err();
            assert!(error.contains(expected), "{input:?}: {error}");
        }
        // A header that never ends, and an inline line that never ends.
        let error = parse_command(&[b'*'; 100], &mut args).unwrap_err();
        assert!(error.contains("too big multibulk"), "{error}");
        let error = parse_command(&vec![b'a'; INLINE_BYTES_MAX + 10], &mut args).unwrap_err();
        assert!(error.contains("INLINE_BYTES_MAX"), "{error}");
        // A whole command over COMMAND_BYTES_MAX, refused from its headers alone.
        let mut input = b"*1000\r\n".to_vec();
        for _ in 0..300 {
            input.extend_from_slice(format!("${ARG_BYTES_MAX}\r\n").as_bytes());
            input.extend(std::iter::repeat_n(b'x', ARG_BYTES_MAX));
            input.extend_from_slice(b"\r\n");
        }
        let error = parse_command(&input, &mut args).unwrap_err();
        assert!(error.contains("COMMAND_BYTES_MAX"), "{error}");
    }

    #[test]
    fn an_error_message_cannot_break_the_framing() {
        let mut out = Vec::new();
        error(&mut out, "ERR a\r\n+OK");
        assert_eq!(out, b"-ERR a  +OK\r\n");
    }

    proptest! {
        /// A pipeline of commands cut anywhere: every prefix parses to a prefix of the
        /// commands and waits for the rest, never an error.
        #[test]
        fn every_cut_of_a_pipeline_waits_or_parses_a_prefix(
            commands in proptest::collection::vec(
                proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 1..5),
                1..6,
            ),
        ) {
            let mut input = Vec::new();
            for command in &commands {
                let args: Vec<&[u8]> = command.iter().map(Vec::as_slice).collect();
                input.extend(encode(&args));
            }
            let (parsed, used) = all(&input);
            prop_assert_eq!(used, input.len());
            prop_assert_eq!(&parsed, &commands);
            for cut in 0..input.len() {
                let (parsed, used) = all(&input[..cut]);
                prop_assert!(used <= cut);
                prop_assert_eq!(&parsed[..], &commands[..parsed.len()]);
            }
        }
    }
}
