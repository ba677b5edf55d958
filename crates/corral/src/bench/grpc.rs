//! The load generator's own unary gRPC client, on the `h2` crate directly.
//!
//! A load generator shares the machine with the servers it measures, so what it spends per
//! request is taken from them. Through tonic's `Channel` a call passes a buffer task and
//! hyper's dispatch task before the connection's task writes it. Here a call puts its
//! frames on the connection's shared stream state and wakes the connection's task, which
//! writes every call queued since it last ran in one go, and reads every answer the same
//! way. The same client drives Corral and etcd.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{CONTENT_TYPE, TE};
use http::{HeaderValue, Method, Request, Uri};
use prost::Message;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::coalesce::Unvectored;

/// HTTP/2 windows large enough that no answer waits for a WINDOW_UPDATE.
const STREAM_WINDOW: u32 = 1 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;

/// One HTTP/2 connection; clones share it.
#[derive(Clone)]
pub struct Conn {
    send: h2::client::SendRequest<Bytes>,
    base: Arc<str>,
}

impl Conn {
    /// Connects to `url` (`https://host:port`, or `http://` without `tls`).
    pub async fn connect(url: &str, tls: Option<Arc<rustls::ClientConfig>>) -> Result<Self> {
        let authority = url.split_once("://").map_or(url, |(_, rest)| rest).trim_end_matches('/');
        let tcp = TcpStream::connect(authority).await.with_context(|| format!("connecting to {url}"))?;
        tcp.set_nodelay(true)?;
        let send = match tls {
            Some(config) => {
                let host = authority.rsplit_once(':').map_or(authority, |(host, _)| host);
                let name = ServerName::try_from(host.to_string()).with_context(|| format!("server name in {url}"))?;
                let stream = tokio_rustls::TlsConnector::from(config)
                    .connect(name, tcp)
                    .await
                    .with_context(|| format!("TLS with {url}"))?;
                start(stream).await?
            }
            None => start(tcp).await?,
        };
        Ok(Self { send, base: url.trim_end_matches('/').into() })
    }

    /// The URI of `method` (`/package.Service/Method`) on this connection's server.
    pub fn uri(&self, method: &str) -> Result<Uri> {
        Ok(format!("{}{method}", self.base).parse()?)
    }

    /// One unary call.
    pub async fn unary<Req: Message, Resp: Message + Default>(&self, uri: &Uri, req: &Req) -> Result<Resp> {
        let mut send = self.send.clone().ready().await?;
        let mut request = Request::new(());
        *request.method_mut() = Method::POST;
        *request.uri_mut() = uri.clone();
        let headers = request.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert(TE, HeaderValue::from_static("trailers"));
        let (response, mut body) = send.send_request(request, false)?;
        body.send_data(frame(req), true)?;
        let (head, mut answer) = response.await?.into_parts();
        check_status(&head.headers)?;
        let mut data = BytesMut::new();
        while let Some(chunk) = answer.data().await {
            let chunk = chunk?;
            answer.flow_control().release_capacity(chunk.len())?;
            data.extend_from_slice(&chunk);
        }
        if let Some(trailers) = answer.trailers().await? {
            check_status(&trailers)?;
        }
        unframe(data.freeze())
    }
}

async fn start<T: AsyncRead + AsyncWrite + Unpin + Send + 'static>(io: T) -> Result<h2::client::SendRequest<Bytes>> {
    drive(Unvectored(io)).await
}

/// The HTTP/2 handshake on `io`, and the connection's task.
async fn drive<T: AsyncRead + AsyncWrite + Unpin + Send + 'static>(io: T) -> Result<h2::client::SendRequest<Bytes>> {
    let (send, connection) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .handshake(io)
        .await?;
    tokio::spawn(async move {
        if let Err(e) = crate::coalesce::Coalesced::new(connection).await {
            tracing::debug!(error = %e, "bench connection closed");
        }
    });
    Ok(send)
}

/// A gRPC message: uncompressed flag, length, protobuf.
fn frame<M: Message>(msg: &M) -> Bytes {
    let len = msg.encoded_len();
    let mut out = BytesMut::with_capacity(5 + len);
    out.put_u8(0);
    out.put_u32(len as u32);
    msg.encode(&mut out).expect("the buffer has room for the message");
    out.freeze()
}

fn unframe<M: Message + Default>(mut data: Bytes) -> Result<M> {
    if data.len() < 5 {
        bail!("the answer has no gRPC message ({} bytes)", data.len());
    }
    if data.get_u8() != 0 {
        bail!("the answer is compressed");
    }
    let len = data.get_u32() as usize;
    if data.len() != len {
        bail!("the answer's message says {len} bytes, and {} came", data.len());
    }
    Ok(M::decode(data)?)
}

/// An error if `headers` carry a gRPC status other than OK.
fn check_status(headers: &http::HeaderMap) -> Result<()> {
    match headers.get("grpc-status").map(|v| v.as_bytes()) {
        None | Some(b"0") => Ok(()),
        Some(code) => {
            let message = headers.get("grpc-message").and_then(|m| m.to_str().ok()).unwrap_or("");
            bail!("gRPC status {}: {message}", String::from_utf8_lossy(code))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::io;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll};

    use corral_proto::etcdserverpb::{PutRequest, PutResponse};
    use tokio::io::{DuplexStream, ReadBuf};

    use super::*;

    /// An in-memory stream that counts the writes reaching it and takes vectored writes, as
    /// a TCP or TLS stream does.
    struct CountedWrites {
        io: DuplexStream,
        writes: Arc<AtomicUsize>,
    }

    impl AsyncRead for CountedWrites {
        fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for CountedWrites {
        fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            self.writes.fetch_add(1, Ordering::Relaxed);
            Pin::new(&mut self.io).poll_write(cx, buf)
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            self.writes.fetch_add(1, Ordering::Relaxed);
            let whole: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            Pin::new(&mut self.io).poll_write(cx, &whole)
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    /// An HTTP/2 server that answers every call with an empty PutResponse.
    async fn serve(io: DuplexStream) {
        let mut conn = h2::server::handshake(io).await.expect("server handshake");
        while let Some(Ok((request, mut respond))) = conn.accept().await {
            tokio::spawn(async move {
                let mut body = request.into_body();
                while let Some(Ok(chunk)) = body.data().await {
                    body.flow_control().release_capacity(chunk.len()).expect("capacity");
                }
                let head = http::Response::builder().header(CONTENT_TYPE, "application/grpc").body(()).expect("head");
                let mut send = respond.send_response(head, false).expect("response");
                send.send_data(frame(&PutResponse::default()), false).expect("data");
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", HeaderValue::from_static("0"));
                send.send_trailers(trailers).expect("trailers");
            });
        }
    }

    /// How many writes carry `calls` puts of a 256-byte value made at once, on a connection
    /// set up by `connect` (after one call that flushes the handshake's own frames).
    async fn writes_for<F, Fut>(calls: usize, connect: F) -> usize
    where
        F: FnOnce(CountedWrites) -> Fut,
        Fut: Future<Output = Result<h2::client::SendRequest<Bytes>>>,
    {
        let (client, server) = tokio::io::duplex(1 << 20);
        tokio::spawn(serve(server));
        let writes = Arc::new(AtomicUsize::new(0));
        let send = connect(CountedWrites { io: client, writes: writes.clone() }).await.expect("handshake");
        let conn = Conn { send, base: "http://bench.test".into() };
        let uri = conn.uri("/etcdserverpb.KV/Put").expect("uri");
        let put = PutRequest { key: b"k".to_vec(), value: vec![b'v'; 256], ..Default::default() };
        conn.unary::<_, PutResponse>(&uri, &put).await.expect("first call");
        let before = writes.load(Ordering::Relaxed);
        let answers = futures::future::join_all((0..calls).map(|_| conn.unary::<_, PutResponse>(&uri, &put))).await;
        assert!(answers.iter().all(Result::is_ok), "every call is answered");
        writes.load(Ordering::Relaxed) - before
    }

    #[tokio::test]
    async fn requests_queued_together_leave_in_one_write() {
        let chained = writes_for(8, drive).await;
        assert!(chained >= 8, "over a vectored stream h2 writes each such request alone: {chained} writes");
        let copied = writes_for(8, start).await;
        assert!(copied <= 2, "the eight requests leave together: {copied} writes");
    }

    #[test]
    fn a_message_survives_its_framing() {
        let put = PutRequest { key: b"k".to_vec(), value: vec![b'v'; 300], ..Default::default() };
        let framed = frame(&put);
        assert_eq!(framed.len(), 5 + put.encoded_len());
        assert_eq!(unframe::<PutRequest>(framed).expect("unframes"), put);
    }

    #[test]
    fn a_short_compressed_or_cut_answer_is_an_error() {
        assert!(unframe::<PutRequest>(Bytes::from_static(&[0, 0, 0])).is_err());
        assert!(unframe::<PutRequest>(Bytes::from_static(&[1, 0, 0, 0, 0])).is_err());
        assert!(unframe::<PutRequest>(Bytes::from_static(&[0, 0, 0, 0, 9, 1])).is_err());
    }

    #[test]
    fn a_status_other_than_ok_is_an_error() {
        let mut headers = http::HeaderMap::new();
        assert!(check_status(&headers).is_ok(), "no status in the headers: the trailers carry it");
        headers.insert("grpc-status", "0".parse().expect("header"));
        assert!(check_status(&headers).is_ok());
        headers.insert("grpc-status", "8".parse().expect("header"));
        headers.insert("grpc-message", "etcdserver: too many requests".parse().expect("header"));
        let err = check_status(&headers).expect_err("not OK").to_string();
        assert!(err.contains("8") && err.contains("too many requests"), "{err}");
    }
}
