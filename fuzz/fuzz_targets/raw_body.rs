//! Feeds arbitrary bytes, cut at arbitrary points, to the decoder of an upstream refusal's
//! body (Content-Length, chunked, or read to the close) and checks that nothing panics, that
//! the decoded bytes and the outcome do not depend on the cuts, that a length-delimited body
//! never yields more than its length, and that a chunked body decodes as a reference decoder
//! written here does.

#![no_main]

use arbitrary::Arbitrary;
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use wsgate::proxy::upgrade::{BodyDecoder, Framing, Step};

#[derive(Debug, Arbitrary)]
enum Kind {
    Empty,
    Length(u16),
    Chunked,
    ToClose,
}

#[derive(Debug, Arbitrary)]
struct Input {
    kind: Kind,
    /// How many bytes come with the head (the decoder's starting buffer).
    with_head: u8,
    splits: Vec<u8>,
    data: Vec<u8>,
}

#[derive(Debug, PartialEq)]
struct Outcome {
    body: Vec<u8>,
    /// None: complete; Some: the error's text.
    error: Option<String>,
    /// Ended before the input did (the body was complete).
    complete: bool,
}

fn framing(kind: &Kind) -> Framing {
    match kind {
        Kind::Empty => Framing::Empty,
        Kind::Length(n) => Framing::Length(u64::from(*n)),
        Kind::Chunked => Framing::Chunked,
        Kind::ToClose => Framing::ToClose,
    }
}

fn run(input: &Input, splits: &[u8]) -> Outcome {
    let first = usize::from(input.with_head).min(input.data.len());
    let mut decoder = BodyDecoder::new(BytesMut::from(&input.data[..first]), framing(&input.kind));
    let mut rest = &input.data[first..];
    let mut sizes = splits.iter().map(|s| usize::from(*s) + 1).cycle();
    let mut body = Vec::new();
    // Bounded: each step consumes input or ends; a budget catches a loop.
    let mut budget = 4 * input.data.len() + 64;
    loop {
        budget = budget.checked_sub(1).expect("the decoder loops");
        match decoder.step() {
            Ok(Step::Data(data)) => {
                assert!(!data.is_empty(), "empty data frame");
                body.extend_from_slice(&data);
            }
            Ok(Step::Again) => {}
            Ok(Step::End) => {
                return Outcome {
                    body,
                    error: None,
                    complete: true,
                }
            }
            Ok(Step::NeedMore) => {
                if rest.is_empty() {
                    let error = decoder.end_of_input().err().map(|e| e.to_string());
                    return Outcome {
                        body,
                        error,
                        complete: false,
                    };
                }
                let n = if splits.is_empty() {
                    rest.len()
                } else {
                    sizes.next().unwrap_or(rest.len()).min(rest.len())
                };
                decoder.push(&rest[..n]);
                rest = &rest[n..];
            }
            Err(e) => {
                return Outcome {
                    body,
                    error: Some(e.to_string()),
                    complete: false,
                }
            }
        }
    }
}

/// The chunked body of `data` as RFC 9112 §7.1 reads it (sizes up to 16 hex digits, lines
/// ending in LF or CRLF), or None when it is malformed or incomplete.
fn reference_chunked(data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut pos = 0;
    let line = |pos: &mut usize| -> Option<Vec<u8>> {
        let end = data[*pos..].iter().position(|&b| b == b'\n')? + *pos;
        let mut l = data[*pos..end].to_vec();
        if l.last() == Some(&b'\r') {
            l.pop();
        }
        *pos = end + 1;
        Some(l)
    };
    loop {
        let size_line = line(&mut pos)?;
        let digits = size_line.split(|&b| b == b';').next()?.trim_ascii();
        let digits = std::str::from_utf8(digits).ok()?;
        if digits.is_empty() || digits.len() > 16 {
            return None;
        }
        let size = usize::try_from(u64::from_str_radix(digits, 16).ok()?).ok()?;
        if size == 0 {
            // Trailers until an empty line.
            loop {
                if line(&mut pos)?.is_empty() {
                    return Some(out);
                }
            }
        }
        let end = pos.checked_add(size)?;
        out.extend_from_slice(data.get(pos..end)?);
        pos = end;
        if !line(&mut pos)?.is_empty() {
            return None;
        }
    }
}

fuzz_target!(|input: Input| {
    let whole = run(&input, &[]);
    let cut = run(&input, &input.splits);
    assert_eq!(whole, cut, "the outcome depends on how the input was cut");
    match input.kind {
        Kind::Empty => assert!(whole.body.is_empty() && whole.complete),
        Kind::Length(n) => {
            assert!(whole.body.len() <= usize::from(n));
            assert_eq!(whole.complete, whole.body.len() == usize::from(n));
            assert!(input.data.starts_with(&whole.body));
        }
        Kind::ToClose => {
            assert_eq!(whole.body, input.data);
            assert_eq!(whole.error, None);
        }
        Kind::Chunked => {
            if whole.complete {
                // Trailers are bounded by the decoder, not by the reference.
                if input.data.len() < 60_000 {
                    assert_eq!(Some(whole.body), reference_chunked(&input.data));
                }
            }
        }
    }
});
