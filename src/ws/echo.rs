//! The builtin echo endpoint (`builtin = "echo"`): wsgate answers the upgrade itself and
//! sends every message back, fragments as they came. The echo runs behind the same
//! tunnel as proxied connections (over an in-process pipe), so keepalive pings, timeouts
//! and frame limits apply exactly as they do for a real upstream.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::ws::codec::{self, Decoder, OpCode, Role, MAX_CONTROL_FRAME, NO_PAYLOAD_LIMIT};

/// Capacity of the in-process pipe between the tunnel and the echo loop.
pub const PIPE_CAPACITY: usize = 64 * 1024;

/// The echo loop's read buffer: any size works, frames stream through it.
const ECHO_BUF: usize = 8 * 1024;

/// Echoes client frames (masked, as the tunnel forwards them) back unmasked: data frames
/// with the same FIN, RSV and opcode, pings as pongs, a close with the same payload.
pub async fn echo<S>(mut io: S) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut decoder = Decoder::new(Role::Client, NO_PAYLOAD_LIMIT);
    let mut buf = vec![0u8; ECHO_BUF];
    let mut len = 0;
    // The data frame being echoed: payload bytes left, mask key, offset into the payload.
    let mut current: Option<(u64, Option<[u8; 4]>, u64)> = None;
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
                io.write_all(chunk).await?;
                pos += take;
                *left -= take as u64;
                *offset += take as u64;
                if *left > 0 {
                    break;
                }
                current = None;
                continue;
            }
            let header = match decoder.parse_header(&buf[pos..len]) {
                Ok(Some(header)) => header,
                Ok(None) => break,
                Err(e) => {
                    let mut payload = [0u8; 125];
                    let n = codec::close_payload(e.close_code(), "protocol error", &mut payload);
                    return write_control(&mut io, OpCode::Close, &payload[..n]).await;
                }
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
                        write_control(&mut io, OpCode::Close, payload).await?;
                        return io.shutdown().await;
                    }
                    _ => {}
                }
                pos += total;
            } else {
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

async fn write_control<S: AsyncWrite + Unpin>(
    io: &mut S,
    opcode: OpCode,
    payload: &[u8],
) -> std::io::Result<()> {
    let mut frame = [0u8; MAX_CONTROL_FRAME];
    let n = codec::encode_control(opcode, payload, None, &mut frame);
    io.write_all(&frame[..n]).await
}
