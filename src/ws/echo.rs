//! The builtin echo endpoint (`builtin = "echo"`): wsgate answers the upgrade itself and
//! sends every message back, fragments as they came. The echo runs behind the same
//! tunnel as proxied connections (over an in-process pipe), so keepalive pings, timeouts
//! and frame limits apply exactly as they do for a real upstream.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::ws::codec::{
    self, Decoder, FrameError, OpCode, Role, Utf8Check, MAX_CONTROL_FRAME, NO_PAYLOAD_LIMIT,
};

/// Capacity of the in-process pipe between the tunnel and the echo loop.
pub const PIPE_CAPACITY: usize = 64 * 1024;

/// The echo loop's read buffer: any size works, frames stream through it.
const ECHO_BUF: usize = 8 * 1024;

/// Echoes client frames (masked, as the tunnel forwards them) back unmasked: data frames
/// with the same FIN, RSV and opcode, pings as pongs, a close with the same payload. It
/// validates like any endpoint (the tunnel in front of it already does): text must be
/// UTF-8 (1007), close frames must carry a valid code and reason (1002, 1007).
pub async fn echo<S>(mut io: S) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut decoder = Decoder::new(Role::Client, NO_PAYLOAD_LIMIT);
    let mut buf = vec![0u8; ECHO_BUF];
    let mut len = 0;
    // The data frame being echoed: payload bytes left, mask key, offset into the payload.
    let mut current: Option<(u64, Option<[u8; 4]>, u64)> = None;
    // The text message being echoed, checked as it goes; `fin` of the current frame.
    let mut text: Option<Utf8Check> = None;
    let mut fin = true;
    loop {
        let n = io.read(&mut buf[len..]).await?;
        if n == 0 {
            return io.shutdown().await;
        }
        len += n;
        let mut pos = 0;
        loop {
            if let Some((left, mask, offset)) = current.as_mut() {
                let take = (*left).min((len - pos) as u64) as usize;
                let chunk = &mut buf[pos..pos + take];
                if let Some(key) = mask {
                    codec::apply_mask(chunk, *key, *offset);
                }
                if let Some(check) = text.as_mut() {
                    let mut verdict = check.feed(chunk);
                    if verdict.is_ok() && fin && *left == take as u64 {
                        verdict = check.finish();
                    }
                    if verdict.is_err() {
                        // Part of the echoed frame went out already: no close frame can
                        // follow it (the tunnel in front tells the client 1007).
                        return io.shutdown().await;
                    }
                }
                io.write_all(chunk).await?;
                pos += take;
                *left -= take as u64;
                *offset += take as u64;
                if *left > 0 {
                    break;
                }
                current = None;
                if fin {
                    text = None;
                }
                continue;
            }
            let header = match decoder.parse_header(&buf[pos..len]) {
                Ok(Some(header)) => header,
                Ok(None) => break,
                Err(e) => return refuse(&mut io, e).await,
            };
            let header_len = header.header_len as usize;
            if header.rsv != 0 {
                // The echo negotiates no extension, so RSV bits are a protocol error (RFC 6455 §5.2).
                let mut payload = [0u8; 125];
                let n = codec::close_payload(1002, "protocol error", &mut payload);
                return write_control(&mut io, OpCode::Close, &payload[..n]).await;
            }
            if header.opcode.is_control() {
                let total = header_len + header.payload_len as usize;
                if len - pos < total {
                    break;
                }
                let payload = &mut buf[pos + header_len..pos + total];
                if let Some(key) = header.mask {
                    codec::apply_mask(payload, key, 0);
                }
                match header.opcode {
                    OpCode::Ping => write_control(&mut io, OpCode::Pong, payload).await?,
                    OpCode::Close => {
                        if let Err(e) = codec::parse_close_payload(payload) {
                            return refuse(&mut io, e).await;
                        }
                        write_control(&mut io, OpCode::Close, payload).await?;
                        return io.shutdown().await;
                    }
                    _ => {}
                }
                pos += total;
            } else {
                match header.opcode {
                    OpCode::Text => text = Some(Utf8Check::default()),
                    OpCode::Binary => text = None,
                    _ => {}
                }
                fin = header.fin;
                if header.payload_len == 0 && fin {
                    if let Some(mut check) = text.take() {
                        if let Err(e) = check.finish() {
                            return refuse(&mut io, e).await;
                        }
                    }
                }
                let mut out = [0u8; 14];
                let n = codec::encode_header(
                    header.fin,
                    header.rsv,
                    header.opcode,
                    header.payload_len,
                    None,
                    &mut out,
                );
                io.write_all(&out[..n]).await?;
                pos += header_len;
                if header.payload_len > 0 {
                    current = Some((header.payload_len, header.mask, 0));
                }
            }
        }
        buf.copy_within(pos..len, 0);
        len -= pos;
    }
}

/// Closes with the code and reason for `e`, as any endpoint that validates would.
async fn refuse<S: AsyncWrite + Unpin>(io: &mut S, e: FrameError) -> std::io::Result<()> {
    let mut payload = [0u8; 125];
    let n = codec::close_payload(e.close_code(), e.close_reason(), &mut payload);
    write_control(io, OpCode::Close, &payload[..n]).await?;
    io.shutdown().await
}

async fn write_control<S: AsyncWrite + Unpin>(
    io: &mut S,
    opcode: OpCode,
    payload: &[u8],
) -> std::io::Result<()> {
    let mut frame = [0u8; MAX_CONTROL_FRAME];
    let n = codec::encode_control(opcode, payload, None, &mut frame);
    io.write_all(&frame[..n]).await
}
