//! A small Kubernetes API client for the binary's own commands (benchmarks, tokens): HTTP/2
//! over TLS with the admin client certificate, JSON in and out.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;

/// HTTP/2 connections with the admin client certificate.
#[derive(Clone)]
pub struct Client {
    conns: Arc<Vec<SendRequest<Full<Bytes>>>>,
    next: Arc<AtomicUsize>,
    authority: String,
}

impl Client {
    /// `pki` holds ca.crt, admin.crt and admin.key.
    pub async fn connect(pki: &std::path::Path, url: &str, conns: usize) -> Result<Client> {
        use rustls::pki_types::ServerName;
        let tls = corral_transport::tls::h2_client_config(
            &pki.join("ca.crt"),
            &pki.join("admin.crt"),
            &pki.join("admin.key"),
        )?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
        let authority = url.trim_start_matches("https://").to_string();
        let mut out = Vec::with_capacity(conns);
        for _ in 0..conns {
            let tcp =
                tokio::net::TcpStream::connect(&authority).await.with_context(|| format!("connecting to {url}"))?;
            tcp.set_nodelay(true)?;
            let host = authority.rsplit_once(':').map_or(authority.as_str(), |(host, _)| host);
            let stream = connector.connect(ServerName::try_from(host.to_string())?, tcp).await?;
            let (send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            out.push(send);
        }
        Ok(Client { conns: Arc::new(out), next: Arc::new(AtomicUsize::new(0)), authority })
    }

    fn request(
        method: Method,
        authority: &str,
        path: &str,
        body: Option<&Value>,
        ct: &str,
    ) -> Result<Request<Full<Bytes>>> {
        let body = body.map(|b| Bytes::from(serde_json::to_vec(b).expect("json"))).unwrap_or_default();
        Ok(Request::builder()
            .method(method)
            .uri(format!("https://{authority}{path}"))
            .header("content-type", ct)
            .header("accept", "application/json")
            .body(Full::new(body))?)
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        ct: &str,
    ) -> Result<(StatusCode, Bytes)> {
        let resp = self.send(method, path, body, ct).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }

    /// A request whose answer is read as it comes (a watch).
    pub async fn stream(&self, method: Method, path: &str) -> Result<hyper::Response<hyper::body::Incoming>> {
        self.send(method, path, None, "application/json").await
    }

    /// Sends on the next connection in turn.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        ct: &str,
    ) -> Result<hyper::Response<hyper::body::Incoming>> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        let mut send = self.conns[i].clone();
        Ok(send.send_request(Self::request(method, &self.authority, path, body, ct)?).await?)
    }

    /// Reads a watch's answer to its end, handing each event to `each`.
    pub async fn each_event(resp: hyper::Response<hyper::body::Incoming>, mut each: impl FnMut(Value)) -> Result<()> {
        let mut body = resp.into_body();
        let mut buf = Vec::new();
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame?.into_data() else { continue };
            buf.extend_from_slice(&data);
            while let Some(end) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=end).collect();
                each(serde_json::from_slice(&line).unwrap_or(Value::Null));
            }
        }
        Ok(())
    }

    pub async fn ok(&self, method: Method, path: &str, body: Option<&Value>, ct: &str) -> Result<Bytes> {
        let (status, body) = self.call(method.clone(), path, body, ct).await?;
        if !status.is_success() {
            bail!("{method} {path}: {status}: {}", String::from_utf8_lossy(&body));
        }
        Ok(body)
    }
}
