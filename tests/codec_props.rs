//! Property tests of the frame codec through its public API: any valid frame stream, cut into
//! any chunks, comes out of a relay-like driver exactly as it went in; unmasking in pieces equals
//! unmasking whole; corrupted headers give the expected close code; encoders round-trip; and
//! frames written by tungstenite parse as tungstenite meant them (and vice versa).

use proptest::prelude::*;
use tokio_tungstenite::tungstenite;
use wsgate::ws::codec::{
    apply_mask, close_code, encode_control, encode_header, parse_close_payload, Decoder,
    FrameError, FrameHeader, OpCode, Role, MAX_CONTROL_FRAME, MAX_CONTROL_PAYLOAD, MAX_HEADER_LEN,
    MAX_PAYLOAD_LEN, NO_PAYLOAD_LIMIT,
};

/// One frame the generator wants on the wire.
#[derive(Debug, Clone)]
struct Spec {
    fin: bool,
    rsv: u8,
    opcode: OpCode,
    mask: Option<[u8; 4]>,
    payload: Vec<u8>,
    /// Length encoding to use: 7, 16 or 64 bits (never shorter than the length needs).
    len_form: u8,
}

/// What the relay-like driver saw.
#[derive(Debug, Default)]
struct Seen {
    headers: Vec<FrameHeader>,
    payloads: Vec<Vec<u8>>,
}

/// A little relay: keeps a read buffer, appends chunks as they "arrive", parses headers from the
/// front, and streams payload out (unmasked piece by piece) without waiting for whole frames.
struct Relay {
    dec: Decoder,
    buf: Vec<u8>,
    /// Payload bytes of the current frame already passed on, when a frame is in progress.
    current: Option<(FrameHeader, u64)>,
    seen: Seen,
}

impl Relay {
    fn new(role: Role, max_payload: u64) -> Self {
        Relay {
            dec: Decoder::new(role, max_payload),
            buf: Vec::new(),
            current: None,
            seen: Seen::default(),
        }
    }

    fn feed(&mut self, chunk: &[u8]) -> Result<(), FrameError> {
        self.buf.extend_from_slice(chunk);
        let mut pos = 0;
        let result = loop {
            match &mut self.current {
                Some((h, done)) => {
                    let want = h.payload_len - *done;
                    let n = want.min((self.buf.len() - pos) as u64) as usize;
                    let piece = &mut self.buf[pos..pos + n];
                    if let Some(key) = h.mask {
                        apply_mask(piece, key, *done);
                    }
                    self.seen
                        .payloads
                        .last_mut()
                        .expect("a frame is in progress")
                        .extend_from_slice(piece);
                    *done += n as u64;
                    pos += n;
                    if *done == h.payload_len {
                        self.current = None;
                    } else {
                        break Ok(());
                    }
                }
                None => match self.dec.parse_header(&self.buf[pos..]) {
                    Ok(Some(h)) => {
                        pos += usize::from(h.header_len);
                        self.seen.headers.push(h);
                        self.seen.payloads.push(Vec::new());
                        self.current = Some((h, 0));
                    }
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(e),
                },
            }
        };
        self.buf.drain(..pos);
        result
    }

    /// Feed `stream` cut into pieces of the given sizes (cycled).
    fn run(mut self, stream: &[u8], sizes: &[usize]) -> (Self, Result<(), FrameError>) {
        let mut rest = stream;
        for size in sizes.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (chunk, tail) = rest.split_at((*size).clamp(1, rest.len()));
            rest = tail;
            if let Err(e) = self.feed(chunk) {
                return (self, Err(e));
            }
        }
        (self, Ok(()))
    }

    fn at_boundary(&self) -> bool {
        self.buf.is_empty() && self.current.is_none()
    }
}

/// Serialize a frame by hand (independently of `encode_header`).
fn serialize(spec: &Spec, out: &mut Vec<u8>) {
    let len = spec.payload.len() as u64;
    out.push(u8::from(spec.fin) << 7 | spec.rsv << 4 | spec.opcode.as_u8());
    let m = if spec.mask.is_some() { 0x80 } else { 0 };
    match spec.len_form {
        7 => out.push(m | len as u8),
        16 => {
            out.push(m | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(m | 127);
            out.extend_from_slice(&len.to_be_bytes());
        }
    }
    let start = out.len();
    if let Some(key) = spec.mask {
        out.extend_from_slice(&key);
        out.extend(spec.payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.extend_from_slice(&spec.payload);
    }
    debug_assert!(out.len() - start >= spec.payload.len());
}

fn header_len(spec: &Spec) -> u8 {
    let ext = match spec.len_form {
        7 => 0,
        16 => 2,
        _ => 8,
    };
    2 + ext + if spec.mask.is_some() { 4 } else { 0 }
}

/// Shortest length form for `len`, or a longer one when `widen` asks (non-minimal is legal).
fn len_form(len: usize, widen: u8) -> u8 {
    let min = match len {
        0..=125 => 7,
        126..=65535 => 16,
        _ => 64,
    };
    match (min, widen % 4) {
        (7, 1) => 16,
        (7 | 16, 2) => 64,
        _ => min,
    }
}

fn payload_len() -> impl Strategy<Value = usize> {
    prop_oneof![
        6 => 0usize..=140,
        1 => 65_530usize..=65_540,
        1 => 0usize..=70_000,
    ]
}

/// Raw material for one frame; `build` turns a list of these into a valid sequence.
#[derive(Debug, Clone)]
struct Step {
    control: bool,
    fin: bool,
    rsv: u8,
    pick: u8,
    len: usize,
    ctrl_len: usize,
    key: [u8; 4],
    seed: u8,
    widen: u8,
}

fn step() -> impl Strategy<Value = Step> {
    (
        prop::bool::weighted(0.3),
        any::<bool>(),
        0u8..8,
        any::<u8>(),
        payload_len(),
        0usize..=MAX_CONTROL_PAYLOAD,
        any::<[u8; 4]>(),
        any::<u8>(),
        any::<u8>(),
    )
        .prop_map(
            |(control, fin, rsv, pick, len, ctrl_len, key, seed, widen)| Step {
                control,
                fin,
                rsv,
                pick,
                len,
                ctrl_len,
                key,
                seed,
                widen,
            },
        )
}

fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Turn raw steps into frames that respect the fragmentation rules: data frames inside an open
/// message become continuations, control frames are final and short, and an open message is
/// finished at the end.
fn build(steps: &[Step], masked: bool) -> Vec<Spec> {
    let mut open = false;
    let mut specs = Vec::new();
    for s in steps {
        let mask = masked.then_some(s.key);
        let spec = if s.control {
            let opcode = [OpCode::Ping, OpCode::Pong, OpCode::Close][usize::from(s.pick % 3)];
            let len = s.ctrl_len;
            Spec {
                fin: true,
                rsv: s.rsv,
                opcode,
                mask,
                payload: payload(len, s.seed),
                len_form: len_form(len, s.widen),
            }
        } else {
            let opcode = match (open, s.pick % 2) {
                (true, _) => OpCode::Continuation,
                (false, 0) => OpCode::Text,
                (false, _) => OpCode::Binary,
            };
            open = !s.fin;
            Spec {
                fin: s.fin,
                rsv: s.rsv,
                opcode,
                mask,
                payload: payload(s.len, s.seed),
                len_form: len_form(s.len, s.widen),
            }
        };
        specs.push(spec);
    }
    if open {
        specs.push(Spec {
            fin: true,
            rsv: 0,
            opcode: OpCode::Continuation,
            mask: masked.then_some([9, 8, 7, 6]),
            payload: Vec::new(),
            len_form: 7,
        });
    }
    specs
}

fn chunk_sizes() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(
        prop_oneof![1usize..=16, 1usize..=4096, 1usize..=100_000],
        1..8,
    )
}

fn check_stream(specs: &[Spec], role: Role, sizes: &[usize]) -> Result<(), TestCaseError> {
    let mut stream = Vec::new();
    for s in specs {
        serialize(s, &mut stream);
    }
    let (relay, result) = Relay::new(role, NO_PAYLOAD_LIMIT).run(&stream, sizes);
    prop_assert_eq!(result, Ok(()));
    prop_assert!(relay.at_boundary());
    prop_assert!(!relay.dec.in_fragmented_message());
    prop_assert_eq!(relay.seen.headers.len(), specs.len());
    for ((h, p), s) in relay
        .seen
        .headers
        .iter()
        .zip(&relay.seen.payloads)
        .zip(specs)
    {
        let want = FrameHeader {
            fin: s.fin,
            rsv: s.rsv,
            opcode: s.opcode,
            mask: s.mask,
            payload_len: s.payload.len() as u64,
            header_len: header_len(s),
        };
        prop_assert_eq!(*h, want);
        prop_assert!(p == &s.payload, "payload of {:?} differs", want);
    }
    Ok(())
}

proptest! {

    /// (a) Any valid stream, any chunking: exactly the original headers and payloads.
    #[test]
    fn valid_streams_survive_any_chunking(
        steps in prop::collection::vec(step(), 1..10),
        sizes in chunk_sizes(),
        client in any::<bool>(),
    ) {
        let role = if client { Role::Client } else { Role::Server };
        check_stream(&build(&steps, client), role, &sizes)?;
    }

    /// (a') The same stream through tungstenite's writer parses to the same frames.
    #[test]
    fn tungstenite_written_frames_parse_identically(
        steps in prop::collection::vec(step(), 1..8),
        sizes in chunk_sizes(),
        client in any::<bool>(),
    ) {
        use tungstenite::protocol::frame::{coding, Frame, FrameHeader as TFrameHeader};
        let specs: Vec<Spec> = build(&steps, client)
            .into_iter()
            // tungstenite always writes the shortest length form.
            .map(|mut s| { s.len_form = len_form(s.payload.len(), 0); s })
            .collect();
        let mut stream = Vec::new();
        for s in &specs {
            let header = TFrameHeader {
                is_final: s.fin,
                rsv1: s.rsv & 4 != 0,
                rsv2: s.rsv & 2 != 0,
                rsv3: s.rsv & 1 != 0,
                opcode: coding::OpCode::from(s.opcode.as_u8()),
                mask: s.mask,
            };
            Frame::from_payload(header, tungstenite::Bytes::from(s.payload.clone()))
                .format(&mut stream)
                .expect("write to a Vec");
        }
        let role = if client { Role::Client } else { Role::Server };
        let (relay, result) = Relay::new(role, NO_PAYLOAD_LIMIT).run(&stream, &sizes);
        prop_assert_eq!(result, Ok(()));
        prop_assert!(relay.at_boundary());
        let got: Vec<_> = relay.seen.headers.iter().map(|h| (h.fin, h.rsv, h.opcode, h.mask, h.payload_len)).collect();
        let want: Vec<_> = specs.iter().map(|s| (s.fin, s.rsv, s.opcode, s.mask, s.payload.len() as u64)).collect();
        prop_assert_eq!(got, want);
        prop_assert!(relay.seen.payloads.iter().zip(&specs).all(|(p, s)| p == &s.payload));
    }

    /// (b) Unmasking in pieces with the right offsets equals unmasking whole, matches the
    /// byte-by-byte definition, and twice is the identity.
    #[test]
    fn apply_mask_in_pieces(
        data in prop::collection::vec(any::<u8>(), 0..2048),
        key in any::<[u8; 4]>(),
        base in any::<u64>(),
        mut cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let base = base / 2; // room for base + len without overflow
        let mut whole = data.clone();
        apply_mask(&mut whole, key, base);
        for (i, b) in whole.iter().enumerate() {
            prop_assert_eq!(*b, data[i] ^ key[((base + i as u64) % 4) as usize]);
        }
        let mut points: Vec<usize> = cuts.drain(..).map(|ix| ix.index(data.len() + 1)).collect();
        points.push(0);
        points.push(data.len());
        points.sort_unstable();
        let mut pieces = data.clone();
        for w in points.windows(2) {
            apply_mask(&mut pieces[w[0]..w[1]], key, base + w[0] as u64);
        }
        prop_assert_eq!(&pieces, &whole);
        apply_mask(&mut pieces, key, base);
        prop_assert_eq!(pieces, data);
    }

    /// (c) Corrupting the first byte (opcode, FIN, RSV) or flipping the mask bit gives the close
    /// code a simple model predicts, never a panic.
    #[test]
    fn corrupted_headers_give_the_expected_code(
        step in step(),
        client in any::<bool>(),
        corrupt_b0 in any::<Option<u8>>(),
    ) {
        let role = if client { Role::Client } else { Role::Server };
        let mut specs = build(std::slice::from_ref(&step), client);
        specs.truncate(1);
        let mut bytes = Vec::new();
        serialize(&specs[0], &mut bytes);
        let ctrl_len_ok = specs[0].payload.len() <= MAX_CONTROL_PAYLOAD;
        let expected: Option<u16> = match corrupt_b0 {
            Some(b0) => {
                bytes[0] = b0;
                let fin = b0 & 0x80 != 0;
                match OpCode::from_u8(b0 & 0x0F) {
                    None => Some(1002),
                    Some(op) if op.is_control() && (!fin || !ctrl_len_ok) => Some(1002),
                    Some(OpCode::Continuation) => Some(1002), // nothing was started
                    Some(_) => None,
                }
            }
            None => {
                bytes[1] ^= 0x80;
                Some(1002)
            }
        };
        let mut dec = Decoder::new(role, NO_PAYLOAD_LIMIT);
        let got = dec.parse_header(&bytes).map_err(|e| e.close_code());
        match expected {
            Some(code) => prop_assert_eq!(got, Err(code)),
            None => prop_assert!(matches!(got, Ok(Some(_))), "{:?}", got),
        }
    }

    /// (c') A frame over the limit is 1009 (unless it is a protocol error first).
    #[test]
    fn oversized_frames_are_1009(len in 1u64..=MAX_PAYLOAD_LEN, under in 1u64..=u64::MAX, key in any::<[u8; 4]>()) {
        let max = len - under.min(len);
        let mut hdr = [0u8; MAX_HEADER_LEN];
        let n = encode_header(true, 0, OpCode::Binary, len, Some(key), &mut hdr);
        let got = Decoder::new(Role::Client, max).parse_header(&hdr[..n]);
        prop_assert_eq!(got, Err(FrameError::TooBig { len, max }));
        prop_assert_eq!(got.map_err(|e| e.close_code()), Err(close_code::MESSAGE_TOO_BIG));
    }

    /// Arbitrary bytes never panic, and every prefix answers `Ok(None)` or the final answer.
    #[test]
    fn arbitrary_bytes_are_prefix_consistent(
        bytes in prop::collection::vec(any::<u8>(), 0..20),
        client in any::<bool>(),
        max in prop_oneof![Just(NO_PAYLOAD_LIMIT), any::<u64>(), 0u64..300],
        open in any::<bool>(),
    ) {
        let role = if client { Role::Client } else { Role::Server };
        let mut base = Decoder::new(role, max);
        if open {
            // Put the decoder inside a fragmented message first.
            let mut hdr = [0u8; MAX_HEADER_LEN];
            let n = encode_header(false, 0, OpCode::Text, 0, client.then_some([1, 2, 3, 4]), &mut hdr);
            prop_assert!(base.parse_header(&hdr[..n]).is_ok());
        }
        let full = base.clone().parse_header(&bytes);
        for n in 0..bytes.len() {
            let mut dec = base.clone();
            let r = dec.parse_header(&bytes[..n]);
            prop_assert!(r == Ok(None) || r == full, "prefix {}: {:?} vs {:?}", n, r, full);
            if r == Ok(None) {
                prop_assert_eq!(dec.in_fragmented_message(), base.in_fragmented_message());
            }
        }
        if let Ok(Some(h)) = full {
            prop_assert!((2..=14).contains(&h.header_len));
            prop_assert!(usize::from(h.header_len) <= bytes.len());
            prop_assert!(h.payload_len <= max.min(MAX_PAYLOAD_LEN));
            prop_assert_eq!(h.mask.is_some(), client);
        }
    }

    /// (d) encode_header -> parse_header round-trips every field.
    #[test]
    fn encode_header_round_trip(
        fin in any::<bool>(),
        rsv in 0u8..8,
        op in 0usize..6,
        len in prop_oneof![0u64..=70_000, Just(65_535), Just(65_536), 0u64..=MAX_PAYLOAD_LEN],
        mask in any::<Option<[u8; 4]>>(),
    ) {
        let opcode = [OpCode::Continuation, OpCode::Text, OpCode::Binary, OpCode::Close, OpCode::Ping, OpCode::Pong][op];
        let (fin, len) = if opcode.is_control() { (true, len % 126) } else { (fin, len) };
        let role = if mask.is_some() { Role::Client } else { Role::Server };
        let mut dec = Decoder::new(role, NO_PAYLOAD_LIMIT);
        let mut hdr = [0u8; MAX_HEADER_LEN];
        if opcode == OpCode::Continuation {
            let n = encode_header(false, 0, OpCode::Binary, 0, mask, &mut hdr);
            prop_assert!(dec.parse_header(&hdr[..n]).is_ok());
        }
        let n = encode_header(fin, rsv, opcode, len, mask, &mut hdr);
        let h = dec.parse_header(&hdr[..n]);
        prop_assert_eq!(h, Ok(Some(FrameHeader { fin, rsv, opcode, mask, payload_len: len, header_len: n as u8 })));
        // tungstenite reads the same header.
        let mut cur = std::io::Cursor::new(&hdr[..n]);
        let (th, tlen) = tungstenite::protocol::frame::FrameHeader::parse(&mut cur)
            .expect("tungstenite parses it")
            .expect("complete");
        prop_assert_eq!((th.is_final, th.mask, tlen, u8::from(th.opcode)), (fin, mask, len, opcode.as_u8()));
    }

    /// (d) encode_control -> parse_header + apply_mask gives back the payload.
    #[test]
    fn encode_control_round_trip(
        op in 0usize..3,
        payload in prop::collection::vec(any::<u8>(), 0..=MAX_CONTROL_PAYLOAD),
        mask in any::<Option<[u8; 4]>>(),
    ) {
        let opcode = [OpCode::Close, OpCode::Ping, OpCode::Pong][op];
        let mut out = [0u8; MAX_CONTROL_FRAME];
        let n = encode_control(opcode, &payload, mask, &mut out);
        let role = if mask.is_some() { Role::Client } else { Role::Server };
        let h = Decoder::new(role, NO_PAYLOAD_LIMIT).parse_header(&out[..n]).expect("valid").expect("complete");
        prop_assert_eq!((h.fin, h.rsv, h.opcode, h.mask, h.frame_len()), (true, 0, opcode, mask, n as u64));
        let body = &mut out[usize::from(h.header_len)..n];
        if let Some(key) = h.mask {
            apply_mask(body, key, 0);
        }
        prop_assert_eq!(&*body, &payload[..]);
    }
}

/// Our close frames read by tungstenite as a real peer would: code and reason survive, masked
/// towards a server and unmasked towards a client.
#[test]
fn tungstenite_reads_our_close_and_ping_frames() {
    use std::io::{Cursor, Read, Write};
    use tungstenite::protocol::{frame::coding::CloseCode, Role as TRole, WebSocket};
    use tungstenite::Message;
    use wsgate::ws::codec::ControlFrame;

    /// Reads prepared bytes, swallows whatever tungstenite writes back (pongs, close replies).
    struct Script(Cursor<Vec<u8>>);
    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.0.read(buf)
        }
    }
    impl Write for Script {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    for (mask, role) in [
        (Some(wsgate::ws::codec::random_mask()), TRole::Server),
        (None, TRole::Client),
    ] {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(ControlFrame::new(OpCode::Ping, b"wsgate", mask).as_bytes());
        // A fragmented binary message with our own headers around masked payload.
        for (fin, opcode, part) in [
            (false, OpCode::Binary, &b"hello "[..]),
            (true, OpCode::Continuation, b"world"),
        ] {
            let mut hdr = [0u8; MAX_HEADER_LEN];
            let n = encode_header(fin, 0, opcode, part.len() as u64, mask, &mut hdr);
            bytes.extend_from_slice(&hdr[..n]);
            let mut p = part.to_vec();
            if let Some(key) = mask {
                apply_mask(&mut p, key, 0);
            }
            bytes.extend_from_slice(&p);
        }
        bytes.extend_from_slice(
            ControlFrame::close(close_code::GOING_AWAY, "idle timeout", mask).as_bytes(),
        );

        let mut ws = WebSocket::from_raw_socket(Script(Cursor::new(bytes)), role, None);
        assert_eq!(
            ws.read().expect("ping"),
            Message::Ping(b"wsgate"[..].into())
        );
        assert_eq!(
            ws.read().expect("binary"),
            Message::Binary(b"hello world"[..].into())
        );
        match ws.read().expect("close") {
            Message::Close(Some(cf)) => {
                assert_eq!(cf.code, CloseCode::Away);
                assert_eq!(cf.reason.as_str(), "idle timeout");
            }
            other => panic!("expected a close, got {other:?}"),
        }
    }
}

/// tungstenite's close frame payload parses with our parser.
#[test]
fn tungstenite_close_payload_parses() {
    use tungstenite::protocol::frame::{coding::CloseCode, CloseFrame, Frame};
    let frame = Frame::close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye ✓".into(),
    }));
    assert_eq!(
        parse_close_payload(frame.payload()),
        Ok(Some((1000, "bye ✓")))
    );
    assert_eq!(parse_close_payload(Frame::close(None).payload()), Ok(None));
}
