//! Length-prefixed protobuf messages on a byte stream (a QUIC stream in practice): a
//! big-endian u32 length, then the encoded message. Used by the agent protocol, where each
//! request opens a stream of its own.

use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Frames above this are refused on both ends: a pod list of a full node fits many times.
pub const MAX_FRAME: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("the stream broke: {0}")]
    Io(#[from] std::io::Error),
    #[error("a frame of {0} bytes is over the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("a frame does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("the stream ended inside a frame")]
    Truncated,
}

/// Writes one frame.
pub async fn write<M: Message, W: AsyncWrite + Unpin>(w: &mut W, msg: &M) -> Result<(), FrameError> {
    let len = msg.encoded_len();
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut buf = Vec::with_capacity(4 + len);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    msg.encode(&mut buf).expect("a Vec grows as needed");
    w.write_all(&buf).await?;
    Ok(())
}

/// Reads one frame; None when the stream ended cleanly between frames.
pub async fn read<M: Message + Default, R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<M>, FrameError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]).await? {
            0 if got == 0 => return Ok(None),
            0 => return Err(FrameError::Truncated),
            n => got += n,
        }
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    // Memory grows as bytes arrive: a length alone does not make the reader allocate it.
    let mut buf = Vec::with_capacity(len.min(64 * 1024));
    (&mut *r).take(len as u64).read_to_end(&mut buf).await.map_err(FrameError::Io)?;
    if buf.len() < len {
        return Err(FrameError::Truncated);
    }
    Ok(Some(M::decode(buf.as_slice())?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, PartialEq, prost::Message)]
    struct Note {
        #[prost(string, tag = "1")]
        text: String,
    }

    #[tokio::test]
    async fn frames_round_trip_and_a_cut_stream_is_told_from_a_clean_end() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            write(&mut a, &Note { text: "hello".into() }).await.unwrap();
            write(&mut a, &Note { text: "x".repeat(200) }).await.unwrap();
        });
        assert_eq!(read::<Note, _>(&mut b).await.unwrap().unwrap().text, "hello");
        assert_eq!(read::<Note, _>(&mut b).await.unwrap().unwrap().text.len(), 200);
        writer.await.unwrap();
        assert!(read::<Note, _>(&mut b).await.unwrap().is_none(), "a clean end");

        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[0, 0, 0, 9, 1, 2]).await.unwrap();
        drop(a);
        assert!(matches!(read::<Note, _>(&mut b).await, Err(FrameError::Truncated)));

        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        assert!(matches!(read::<Note, _>(&mut b).await, Err(FrameError::TooLarge(_))));
    }
}
