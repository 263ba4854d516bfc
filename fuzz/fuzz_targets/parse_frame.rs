//! Feeds arbitrary bytes, cut at arbitrary points, to the frame decoder the way the relay does
//! (keep a buffer, parse a header, stream its payload, unmasking piece by piece) and checks that
//! nothing panics, that every accepted header obeys the protocol, and that the outcome is the
//! same as parsing the whole input at once.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use wsgate::ws::codec::{
    apply_mask, parse_close_payload, Decoder, FrameError, FrameHeader, OpCode, Role,
    MAX_CONTROL_PAYLOAD, MAX_PAYLOAD_LEN, NO_PAYLOAD_LIMIT,
};

#[derive(Debug, Arbitrary)]
struct Input {
    client: bool,
    /// `None` = no limit; small limits exercise "frame too big".
    max_payload: Option<u16>,
    /// Chunk sizes (each + 1), cycled; empty = the whole input in one chunk.
    splits: Vec<u8>,
    data: Vec<u8>,
}

#[derive(Debug, PartialEq)]
enum End {
    /// Stopped on a frame boundary with no bytes left over.
    Clean,
    /// Ran out of bytes inside a header or a payload.
    NeedMore,
    Error(FrameError),
}

#[derive(Debug, PartialEq)]
struct Walk {
    headers: Vec<FrameHeader>,
    /// All payload bytes seen, unmasked.
    payload: Vec<u8>,
    end: End,
}

/// Parse with the whole input available.
fn walk_whole(mut dec: Decoder, data: &[u8]) -> Walk {
    let mut headers = Vec::new();
    let mut payload = Vec::new();
    let mut pos = 0;
    let end = loop {
        let rest = &data[pos..];
        let before = dec.clone();
        let result = dec.parse_header(rest);
        check_prefixes(&before, rest, &result);
        match result {
            Ok(Some(h)) => {
                check_header(&h, &dec);
                headers.push(h);
                pos += usize::from(h.header_len);
                let avail =
                    (data.len() - pos).min(usize::try_from(h.payload_len).unwrap_or(usize::MAX));
                let start = payload.len();
                payload.extend_from_slice(&data[pos..pos + avail]);
                if let Some(key) = h.mask {
                    apply_mask(&mut payload[start..], key, 0);
                }
                if h.opcode == OpCode::Close && avail as u64 == h.payload_len {
                    check_close(&payload[start..]);
                }
                pos += avail;
                if (avail as u64) < h.payload_len {
                    break End::NeedMore;
                }
            }
            Ok(None) => {
                assert_eq!(
                    dec.in_fragmented_message(),
                    before.in_fragmented_message(),
                    "Ok(None) changed state"
                );
                break if pos == data.len() {
                    End::Clean
                } else {
                    End::NeedMore
                };
            }
            Err(e) => {
                assert!(matches!(e.close_code(), 1002 | 1009), "{e:?}");
                break End::Error(e);
            }
        }
    };
    Walk {
        headers,
        payload,
        end,
    }
}

/// Parse chunk by chunk, keeping only the bytes not yet consumed, like the relay.
fn walk_chunked(mut dec: Decoder, data: &[u8], splits: &[u8]) -> Walk {
    let mut headers = Vec::new();
    let mut payload = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    // The frame whose payload is streaming and how much of it was seen.
    let mut current: Option<(FrameHeader, u64)> = None;
    let mut rest = data;
    let mut sizes = splits.iter().map(|s| usize::from(*s) + 1).cycle();
    while !rest.is_empty() {
        let n = sizes.next().unwrap_or(rest.len()).min(rest.len());
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        buf.extend_from_slice(chunk);
        let mut pos = 0;
        loop {
            if let Some((h, done)) = current.as_mut() {
                let want = h.payload_len - *done;
                let n = usize::try_from(want)
                    .unwrap_or(usize::MAX)
                    .min(buf.len() - pos);
                let piece = &mut buf[pos..pos + n];
                if let Some(key) = h.mask {
                    apply_mask(piece, key, *done);
                }
                payload.extend_from_slice(piece);
                *done += n as u64;
                pos += n;
                if *done < h.payload_len {
                    break;
                }
                current = None;
            }
            match dec.parse_header(&buf[pos..]) {
                Ok(Some(h)) => {
                    pos += usize::from(h.header_len);
                    headers.push(h);
                    current = Some((h, 0));
                }
                Ok(None) => break,
                Err(e) => {
                    return Walk {
                        headers,
                        payload,
                        end: End::Error(e),
                    }
                }
            }
        }
        buf.drain(..pos);
    }
    let end = if buf.is_empty() && current.is_none() {
        End::Clean
    } else {
        End::NeedMore
    };
    Walk {
        headers,
        payload,
        end,
    }
}

/// Protocol invariants of an accepted header.
fn check_header(h: &FrameHeader, dec: &Decoder) {
    assert!((2..=14).contains(&h.header_len));
    assert!(h.rsv <= 7);
    assert!(h.payload_len <= MAX_PAYLOAD_LEN);
    assert_eq!(h.mask.is_some(), dec.role() == Role::Client);
    if h.opcode.is_control() {
        assert!(h.fin && h.payload_len <= MAX_CONTROL_PAYLOAD as u64);
    }
}

/// Every prefix of the bytes the decoder answered about gives `Ok(None)` (without changing its
/// state) or that same answer.
fn check_prefixes(before: &Decoder, bytes: &[u8], full: &Result<Option<FrameHeader>, FrameError>) {
    let end = match full {
        Ok(Some(h)) => usize::from(h.header_len),
        _ => bytes.len().min(14),
    };
    for n in 0..end {
        let mut dec = before.clone();
        let r = dec.parse_header(&bytes[..n]);
        assert!(r == Ok(None) || r == *full, "prefix {n}: {r:?} vs {full:?}");
        if r == Ok(None) {
            assert_eq!(dec.in_fragmented_message(), before.in_fragmented_message());
        }
    }
}

fn check_close(payload: &[u8]) {
    match parse_close_payload(payload) {
        Ok(None) => assert!(payload.is_empty()),
        Ok(Some((code, reason))) => {
            assert!(wsgate::ws::codec::close_code::is_valid(code));
            assert_eq!(reason.len() + 2, payload.len());
        }
        Err(e) => assert!(matches!(e.close_code(), 1002 | 1007)),
    }
}

fuzz_target!(|input: Input| {
    let role = if input.client {
        Role::Client
    } else {
        Role::Server
    };
    let max = input.max_payload.map_or(NO_PAYLOAD_LIMIT, u64::from);
    let whole = walk_whole(Decoder::new(role, max), &input.data);
    let chunked = walk_chunked(Decoder::new(role, max), &input.data, &input.splits);
    assert_eq!(whole, chunked);
});
