//! The server side of a WebSocket (RFC 6455) as kubectl's exec and attach use it: the
//! opening handshake with subprotocol choice, and frames (clients mask theirs, servers do
//! not). Message boundaries matter to the channel protocols, so fragmented messages are
//! joined before they are handed on.

use base64::Engine;
use sha1::{Digest, Sha1};
use tokio::io::{AsyncRead, AsyncReadExt};

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// The largest message accepted from a client (stdin chunks and resizes are small).
pub const MAX_MESSAGE: usize = 4 * 1024 * 1024;

pub const TEXT: u8 = 1;
pub const BINARY: u8 = 2;
pub const CLOSE: u8 = 8;
pub const PING: u8 = 9;
pub const PONG: u8 = 10;

/// What a client's upgrade request asks for.
#[derive(Debug, PartialEq, Eq)]
pub struct Handshake {
    pub key: String,
    pub protocols: Vec<String>,
}

/// The handshake in an HTTP request head, None when it is not a WebSocket upgrade.
pub fn handshake(head: &[u8]) -> Option<Handshake> {
    let text = std::str::from_utf8(head).ok()?;
    let mut upgrade = false;
    let mut key = None;
    let mut protocols = Vec::new();
    for line in text.split("\r\n").skip(1) {
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "upgrade" => upgrade |= value.eq_ignore_ascii_case("websocket"),
            "sec-websocket-key" => key = Some(value.to_string()),
            "sec-websocket-protocol" => protocols.extend(value.split(',').map(|p| p.trim().to_string())),
            _ => {}
        }
    }
    Some(Handshake { key: key.filter(|_| upgrade)?, protocols })
}

/// The Sec-WebSocket-Accept answer to a client's key.
pub fn accept(key: &str) -> String {
    let digest = Sha1::digest(format!("{key}{GUID}").as_bytes());
    base64::engine::general_purpose::STANDARD.encode(digest)
}

/// The server's 101 answer choosing `protocol`.
pub fn switching(key: &str, protocol: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\nSec-WebSocket-Protocol: {protocol}\r\n\r\n",
        accept(key)
    )
    .into_bytes()
}

/// One server frame (final, unmasked).
pub fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 10);
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n <= u16::MAX as usize => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
    out
}

/// A close frame with a status code (1000: normal).
pub fn close(code: u16) -> Vec<u8> {
    frame(CLOSE, &code.to_be_bytes())
}

/// A whole message from the client: its opcode (of the first fragment) and payload.
#[derive(Debug, PartialEq, Eq)]
pub struct Message {
    pub opcode: u8,
    pub payload: Vec<u8>,
}

/// Reads a client's messages, joining fragments.
pub struct Reader<R> {
    inner: R,
    /// A fragmented message still being received.
    partial: Option<Message>,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    pub fn new(inner: R) -> Self {
        Self { inner, partial: None }
    }

    /// The next message; None at the end of the stream. Control frames (ping, pong, close)
    /// come back as they arrive, even between the fragments of a message.
    pub async fn next(&mut self) -> std::io::Result<Option<Message>> {
        let r = &mut self.inner;
        loop {
            let mut head = [0u8; 2];
            match r.read_exact(&mut head).await {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && self.partial.is_none() => return Ok(None),
                Err(e) => return Err(e),
            }
            let fin = head[0] & 0x80 != 0;
            let opcode = head[0] & 0x0f;
            let masked = head[1] & 0x80 != 0;
            let len = match head[1] & 0x7f {
                126 => r.read_u16().await? as u64,
                127 => r.read_u64().await?,
                n => n as u64,
            };
            let so_far = self.partial.as_ref().map_or(0, |m| m.payload.len());
            if len > MAX_MESSAGE as u64 || so_far + len as usize > MAX_MESSAGE {
                return Err(std::io::Error::other(format!("a WebSocket message over {MAX_MESSAGE} bytes")));
            }
            let mut mask = [0u8; 4];
            if masked {
                r.read_exact(&mut mask).await?;
            }
            let mut payload = vec![0u8; len as usize];
            r.read_exact(&mut payload).await?;
            if masked {
                for (i, b) in payload.iter_mut().enumerate() {
                    *b ^= mask[i % 4];
                }
            }
            if opcode >= CLOSE {
                return Ok(Some(Message { opcode, payload }));
            }
            let message = self.partial.get_or_insert(Message { opcode, payload: Vec::new() });
            message.payload.extend_from_slice(&payload);
            if fin {
                return Ok(self.partial.take());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_handshake_is_answered_as_rfc_6455_says() {
        // The example of RFC 6455, section 1.3.
        assert_eq!(accept("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        let head = b"GET /exec HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                     Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: v5.channel.k8s.io, v4.channel.k8s.io\r\n\r\n";
        let h = handshake(head).unwrap();
        assert_eq!(h.protocols, ["v5.channel.k8s.io", "v4.channel.k8s.io"]);
        assert!(handshake(b"POST /exec HTTP/1.1\r\nUpgrade: SPDY/3.1\r\n\r\n").is_none());
    }

    #[tokio::test]
    async fn masked_fragments_are_joined_and_control_frames_pass_between() {
        let mask = [1u8, 2, 3, 4];
        let masked = |fin: bool, opcode: u8, data: &[u8]| {
            let mut f = vec![if fin { 0x80 } else { 0 } | opcode, 0x80 | data.len() as u8];
            f.extend_from_slice(&mask);
            f.extend(data.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
            f
        };
        let mut wire = masked(false, BINARY, b"\x00hel");
        wire.extend(masked(true, PING, b"p"));
        wire.extend(masked(true, 0, b"lo"));
        let mut r = Reader::new(&wire[..]);
        assert_eq!(r.next().await.unwrap().unwrap(), Message { opcode: PING, payload: b"p".to_vec() });
        let m = r.next().await.unwrap().unwrap();
        assert_eq!((m.opcode, m.payload.as_slice()), (BINARY, &b"\x00hello"[..]));
        assert!(r.next().await.unwrap().is_none());
        assert_eq!(frame(BINARY, &[1, 2]), [0x82, 2, 1, 2]);
        assert_eq!(&frame(BINARY, &[0; 300])[..4], &[0x82, 126, 1, 44]);
    }
}
