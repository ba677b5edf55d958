//! The client side of SPDY/3.1 as Kubernetes' streaming protocols use it (the runtime's
//! streaming server speaks it for exec and attach): frames, and header blocks. Header
//! blocks are one zlib stream per direction; ours is written with stored (uncompressed)
//! blocks, each header block ending in a sync flush, and no preset dictionary, which every
//! zlib reader accepts, and the server's are
//! never needed (streams are told apart by id), so no compressor is required. Flow control
//! is not used by the Go implementation on the other side, so windows are not tracked.

use tokio::io::{AsyncRead, AsyncReadExt};

const VERSION: u16 = 3;
const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
pub const FLAG_FIN: u8 = 0x01;
/// The largest frame accepted (the length field allows 16 MiB).
const MAX_FRAME: usize = 1 << 24;

#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    Data {
        stream: u32,
        fin: bool,
        data: Vec<u8>,
    },
    SynReply {
        stream: u32,
        fin: bool,
    },
    RstStream {
        stream: u32,
        status: u32,
    },
    Ping {
        id: u32,
    },
    GoAway,
    /// SETTINGS, HEADERS, WINDOW_UPDATE and others: nothing to do.
    Other,
}

/// Writes the client's header blocks as one zlib stream.
#[derive(Default)]
pub struct HeaderWriter {
    started: bool,
}

impl HeaderWriter {
    /// A header block: the name/value pairs, as the next stored block of the zlib stream.
    pub fn block(&mut self, headers: &[(&str, &str)]) -> Vec<u8> {
        let mut raw = Vec::new();
        raw.extend_from_slice(&(headers.len() as u32).to_be_bytes());
        for (name, value) in headers {
            for text in [name.to_ascii_lowercase().as_bytes(), value.as_bytes()] {
                raw.extend_from_slice(&(text.len() as u32).to_be_bytes());
                raw.extend_from_slice(text);
            }
        }
        let mut out = Vec::with_capacity(raw.len() + 8);
        if !self.started {
            // CMF 0x78 (deflate, 32 KiB window), FLG 0x01: no dictionary, check bits valid.
            out.extend_from_slice(&[0x78, 0x01]);
            self.started = true;
        }
        for chunk in raw.chunks(u16::MAX as usize) {
            let len = chunk.len() as u16;
            out.push(0x00); // not final, stored
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&(!len).to_le_bytes());
            out.extend_from_slice(chunk);
        }
        // A sync flush (an empty stored block) ends every block, as zlib writers do: Go's
        // reader hands out a stored block's bytes only once it has read the next header.
        out.extend_from_slice(&[0x00, 0x00, 0x00, 0xff, 0xff]);
        out
    }
}

fn control(kind: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.extend_from_slice(&(0x8000 | VERSION).to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&((flags as u32) << 24 | payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Opens a stream (odd ids from the client) with its headers.
pub fn syn_stream(writer: &mut HeaderWriter, stream: u32, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut payload = Vec::new();
    payload.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    payload.extend_from_slice(&0u32.to_be_bytes()); // associated stream
    payload.extend_from_slice(&[0, 0]); // priority, slot
    payload.extend_from_slice(&writer.block(headers));
    control(SYN_STREAM, 0, &payload)
}

/// Data on a stream; `fin` half-closes it from our side.
pub fn data(stream: u32, fin: bool, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 8);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(&((if fin { FLAG_FIN } else { 0 } as u32) << 24 | data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// The answer to the server's ping.
pub fn ping(id: u32) -> Vec<u8> {
    control(PING, 0, &id.to_be_bytes())
}

fn word(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4).map_or(0, |w| u32::from_be_bytes([w[0], w[1], w[2], w[3]]))
}

/// The next frame; None at the end of the stream.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<Frame>> {
    let mut head = [0u8; 8];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let flags = head[4];
    let len = (word(&head, 4) & 0x00ff_ffff) as usize;
    if len >= MAX_FRAME {
        return Err(std::io::Error::other("an oversized SPDY frame"));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    if head[0] & 0x80 == 0 {
        let stream = word(&head, 0) & 0x7fff_ffff;
        return Ok(Some(Frame::Data { stream, fin: flags & FLAG_FIN != 0, data: payload }));
    }
    let kind = u16::from_be_bytes([head[2], head[3]]);
    Ok(Some(match kind {
        SYN_REPLY => Frame::SynReply { stream: word(&payload, 0) & 0x7fff_ffff, fin: flags & FLAG_FIN != 0 },
        RST_STREAM => Frame::RstStream { stream: word(&payload, 0) & 0x7fff_ffff, status: word(&payload, 4) },
        PING => Frame::Ping { id: word(&payload, 0) },
        GOAWAY => Frame::GoAway,
        _ => Frame::Other,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_blocks_are_a_valid_zlib_stream_of_stored_blocks() {
        let mut w = HeaderWriter::default();
        let first = w.block(&[("streamType", "error")]);
        // zlib's header check: (CMF * 256 + FLG) is a multiple of 31.
        assert_eq!((first[0] as u16 * 256 + first[1] as u16) % 31, 0);
        let pairs = [0, 0, 0, 1, 0, 0, 0, 10, b's', b't', b'r', b'e', b'a', b'm', b't', b'y', b'p', b'e'];
        assert_eq!(&first[2..5], &[0x00, 27, 0]);
        assert_eq!(&first[5..7], &[!27u8, 0xff]);
        assert_eq!(&first[7..7 + pairs.len()], &pairs);
        assert_eq!(&first[first.len() - 5..], &[0, 0, 0, 0xff, 0xff], "a sync flush ends the block");
        let second = w.block(&[("streamtype", "stdin")]);
        assert_eq!(second[0], 0x00, "the stream goes on: no second zlib header");
    }

    #[tokio::test]
    async fn frames_are_read_back() {
        let mut w = HeaderWriter::default();
        let mut wire = syn_stream(&mut w, 1, &[("streamtype", "error")]);
        wire.extend(data(3, true, b"hi"));
        wire.extend(ping(2));
        let mut r = &wire[..];
        assert_eq!(read_frame(&mut r).await.unwrap(), Some(Frame::Other), "SYN_STREAM is the client's own");
        assert_eq!(read_frame(&mut r).await.unwrap(), Some(Frame::Data { stream: 3, fin: true, data: b"hi".to_vec() }));
        assert_eq!(read_frame(&mut r).await.unwrap(), Some(Frame::Ping { id: 2 }));
        assert_eq!(read_frame(&mut r).await.unwrap(), None);
    }
}
