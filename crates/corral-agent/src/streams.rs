//! Streams the servers open to the agent, for kubectl: a container's log (read from the CRI
//! log files here), and exec, attach and port-forward, relayed byte for byte between the
//! server and the runtime's own streaming server (the URL CRI's Exec, Attach and
//! PortForward return), so the protocols (SPDY, WebSocket) are the runtime's.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use corral_proto::agent::{Logs, ServerRequest, Stream, StreamReply, server_request, stream::Kind};
use corral_proto::cri;
use corral_transport::frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cri::{Runtime, StreamRequest};
use crate::logs::{self, LogOptions};
use crate::sync::State;
use crate::worker::{Lookup, Worker};
use crate::{spdy, websocket};

const FOLLOW_POLL: Duration = Duration::from_millis(250);

pub struct Streams<R: Runtime, L: Lookup> {
    pub worker: Arc<Worker<R, L>>,
    pub log_root: PathBuf,
}

fn reply(ok: bool, code: i32, message: impl Into<String>) -> StreamReply {
    StreamReply { ok, message: message.into(), code }
}

impl<R: Runtime, L: Lookup> Streams<R, L> {
    /// Serves one stream a server opened.
    pub async fn serve(self: Arc<Self>, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
        let request: ServerRequest = match frame::read(&mut recv).await {
            Ok(Some(r)) => r,
            _ => return,
        };
        let result = match request.kind {
            Some(server_request::Kind::Logs(l)) => self.logs(l, &mut send).await,
            Some(server_request::Kind::Stream(s)) => self.relay(s, send, recv).await,
            None => Ok(()),
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "a stream for a server ended");
        }
    }

    /// The id of the container's latest run, and whether it is running.
    async fn container(&self, uid: &str, name: &str) -> Result<(String, bool), StreamReply> {
        let views = self.worker.observe().await.map_err(|e| reply(false, 503, format!("the runtime: {e}")))?;
        let run = views.get(uid).and_then(|v| v.latest(name));
        match run {
            Some(c) => Ok((c.id.clone(), c.state == State::Running)),
            None => Err(reply(false, 400, format!("container {name:?} is not running yet (ContainerCreating)"))),
        }
    }

    async fn logs(&self, l: Logs, send: &mut quinn::SendStream) -> Result<(), String> {
        let files = logs::files(&self.log_root, &l.namespace, &l.pod, &l.uid, &l.container);
        let file = if l.previous { files.iter().rev().nth(1) } else { files.last() };
        let Some(file) = file.cloned() else {
            let why = if l.previous {
                format!("previous terminated container {:?} in pod {:?} not found", l.container, l.pod)
            } else {
                format!("container {:?} in pod {:?} is waiting to start: ContainerCreating", l.container, l.pod)
            };
            return frame::write(send, &reply(false, 400, why)).await.map_err(|e| e.to_string());
        };
        frame::write(send, &reply(true, 200, "")).await.map_err(|e| e.to_string())?;
        let opts = LogOptions {
            tail_lines: l.tail_lines,
            since_unix: l.since_unix,
            timestamps: l.timestamps,
            limit_bytes: l.limit_bytes,
        };
        let content = std::fs::read(&file).map_err(|e| e.to_string())?;
        let complete = content.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        let (out, limited) = logs::render(&content[..complete], &opts);
        send.write_all(&out).await.map_err(|e| e.to_string())?;
        let mut written = out.len() as i64;
        if !l.follow || limited || l.previous {
            let _ = send.finish();
            return Ok(());
        }
        let mut offset = complete as u64;
        loop {
            tokio::time::sleep(FOLLOW_POLL).await;
            let (more, next) = logs::more(&file, offset, &opts).map_err(|e| e.to_string())?;
            offset = next;
            if !more.is_empty() {
                let take = if l.limit_bytes > 0 {
                    more.len().min((l.limit_bytes - written).max(0) as usize)
                } else {
                    more.len()
                };
                send.write_all(&more[..take]).await.map_err(|e| e.to_string())?;
                written += take as i64;
                if l.limit_bytes > 0 && written >= l.limit_bytes {
                    break;
                }
                continue;
            }
            // Nothing new: stop once the container has stopped (or another run took over).
            let newest = logs::files(&self.log_root, &l.namespace, &l.pod, &l.uid, &l.container).last().cloned();
            let running = matches!(self.container(&l.uid, &l.container).await, Ok((_, true)));
            if !running || newest.as_ref() != Some(&file) {
                break;
            }
        }
        let _ = send.finish();
        Ok(())
    }

    /// Asks the runtime for a streaming URL, replays the client's request to it, and
    /// relays bytes both ways until either side ends.
    async fn relay(&self, s: Stream, mut send: quinn::SendStream, mut recv: quinn::RecvStream) -> Result<(), String> {
        let kind = Kind::try_from(s.kind).unwrap_or(Kind::Unspecified);
        let request = match kind {
            Kind::PortForward => {
                let sandbox = self.sandbox(&s.uid).await;
                match sandbox {
                    Ok(id) => {
                        Ok(StreamRequest::PortForward(cri::PortForwardRequest { pod_sandbox_id: id, port: vec![] }))
                    }
                    Err(r) => Err(r),
                }
            }
            Kind::Exec | Kind::Attach => match self.container(&s.uid, &s.container).await {
                Ok((_, false)) => Err(reply(false, 400, format!("container {:?} is not running", s.container))),
                Ok((id, true)) if kind == Kind::Exec => Ok(StreamRequest::Exec(cri::ExecRequest {
                    container_id: id,
                    cmd: s.command.clone(),
                    tty: s.tty,
                    stdin: s.stdin,
                    stdout: s.stdout,
                    stderr: s.stderr,
                })),
                Ok((id, true)) => Ok(StreamRequest::Attach(cri::AttachRequest {
                    container_id: id,
                    stdin: s.stdin,
                    tty: s.tty,
                    stdout: s.stdout,
                    stderr: s.stderr,
                })),
                Err(r) => Err(r),
            },
            Kind::Unspecified => Err(reply(false, 400, "an unknown kind of stream")),
        };
        let url = match request {
            Ok(r) => self.worker.runtime().stream_url(r).await.map_err(|e| reply(false, 500, e.to_string())),
            Err(r) => Err(r),
        };
        let url = match url {
            Ok(u) => u,
            Err(r) => return frame::write(&mut send, &r).await.map_err(|e| e.to_string()),
        };
        let (authority, path) =
            split_url(&url).ok_or_else(|| format!("the runtime's streaming URL {url} is not http"))?;
        if kind != Kind::PortForward
            && let Some(ws) = websocket::handshake(&s.http_head)
        {
            return translate(&s, ws, &authority, &path, send, recv).await;
        }
        let mut tcp = match tokio::net::TcpStream::connect(&authority).await {
            Ok(t) => t,
            Err(e) => {
                let r = reply(false, 502, format!("the runtime's streaming server at {authority}: {e}"));
                return frame::write(&mut send, &r).await.map_err(|e| e.to_string());
            }
        };
        tcp.write_all(&replay_head(&s.http_head, &authority, &path)).await.map_err(|e| e.to_string())?;
        frame::write(&mut send, &reply(true, 200, "")).await.map_err(|e| e.to_string())?;
        let (mut tcp_read, mut tcp_write) = tcp.into_split();
        let up = async {
            let _ = tokio::io::copy(&mut recv, &mut tcp_write).await;
            let _ = tcp_write.shutdown().await;
        };
        let down = async {
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match tcp_read.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if send.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = send.finish();
        };
        tokio::join!(up, down);
        Ok(())
    }

    async fn sandbox(&self, uid: &str) -> Result<String, StreamReply> {
        let views = self.worker.observe().await.map_err(|e| reply(false, 503, format!("the runtime: {e}")))?;
        views
            .get(uid)
            .and_then(|v| v.sandbox().filter(|s| s.ready))
            .map(|s| s.id.clone())
            .ok_or_else(|| reply(false, 400, "the pod has no running sandbox"))
    }
}

/// The channel protocols kubectl speaks over a WebSocket that are served, preferred first.
/// v5 adds the client's close of stdin (channel 255) to v4.
const CHANNEL_PROTOCOLS: [&str; 2] = ["v5.channel.k8s.io", "v4.channel.k8s.io"];
const CLOSE_CHANNEL: u8 = 255;

/// SPDY stream ids of a remote command, as Kubernetes' clients open them.
const ERROR: u32 = 1;
const STDIN: u32 = 3;
const STDOUT: u32 = 5;
const STDERR: u32 = 7;
const RESIZE: u32 = 9;

/// Exec or attach for a WebSocket client (kubectl 1.30 and later): the agent ends the
/// WebSocket itself and speaks SPDY to the runtime's streaming server, which knows only
/// SPDY and older WebSocket versions, as kube-apiserver's stream translator does. Channel
/// n of the WebSocket is the SPDY stream of the same role.
async fn translate(
    s: &Stream,
    ws: websocket::Handshake,
    authority: &str,
    path: &str,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
) -> Result<(), String> {
    let Some(protocol) = ws.protocols.iter().find(|p| CHANNEL_PROTOCOLS.contains(&p.as_str())).cloned() else {
        let offered = ws.protocols.join(", ");
        let r = reply(false, 400, format!("none of the WebSocket subprotocols [{offered}] is served; use SPDY"));
        return frame::write(&mut send, &r).await.map_err(|e| e.to_string());
    };
    let mut tcp = match spdy_upgrade(authority, path).await {
        Ok(tcp) => tcp,
        Err(r) => return frame::write(&mut send, &r).await.map_err(|e| e.to_string()),
    };
    frame::write(&mut send, &reply(true, 101, "")).await.map_err(|e| e.to_string())?;
    send.write_all(&websocket::switching(&ws.key, &protocol)).await.map_err(|e| e.to_string())?;

    let mut streams = vec![(ERROR, "error")];
    if s.stdin {
        streams.push((STDIN, "stdin"));
    }
    if s.stdout {
        streams.push((STDOUT, "stdout"));
    }
    if s.stderr && !s.tty {
        streams.push((STDERR, "stderr"));
    }
    if s.tty {
        streams.push((RESIZE, "resize"));
    }
    let mut headers = spdy::HeaderWriter::default();
    for (id, kind) in &streams {
        tcp.write_all(&spdy::syn_stream(&mut headers, *id, &[("streamtype", kind)]))
            .await
            .map_err(|e| e.to_string())?;
    }
    // Output streams still open; the command is over when none is.
    let mut open: Vec<u32> =
        streams.iter().map(|(id, _)| *id).filter(|id| matches!(*id, ERROR | STDOUT | STDERR)).collect();

    let (mut tcp_read, mut tcp_write) = tcp.into_split();
    let (client_tx, mut from_client) = tokio::sync::mpsc::channel(16);
    let (runtime_tx, mut from_runtime) = tokio::sync::mpsc::channel(16);
    let client_reader = tokio::spawn(async move {
        let mut reader = websocket::Reader::new(recv);
        while let Ok(Some(m)) = reader.next().await {
            if client_tx.send(m).await.is_err() {
                break;
            }
        }
    });
    let runtime_reader = tokio::spawn(async move {
        while let Ok(Some(f)) = spdy::read_frame(&mut tcp_read).await {
            if runtime_tx.send(f).await.is_err() {
                break;
            }
        }
    });
    let io = |e: std::io::Error| e.to_string();
    let result: Result<(), String> = async {
        loop {
            tokio::select! {
                m = from_client.recv() => {
                    let Some(m) = m else { break };
                    match m.opcode {
                        websocket::PING => send.write_all(&websocket::frame(websocket::PONG, &m.payload)).await.map_err(|e| e.to_string())?,
                        websocket::CLOSE => break,
                        websocket::BINARY | websocket::TEXT => {
                            let Some((&channel, data)) = m.payload.split_first() else { continue };
                            match channel {
                                0 if s.stdin => tcp_write.write_all(&spdy::data(STDIN, false, data)).await.map_err(io)?,
                                4 if s.tty => tcp_write.write_all(&spdy::data(RESIZE, false, data)).await.map_err(io)?,
                                CLOSE_CHANNEL if data.first() == Some(&0) && s.stdin => {
                                    tcp_write.write_all(&spdy::data(STDIN, true, &[])).await.map_err(io)?
                                }
                                _ => {}
                            }
                        }
                        _ => {}
                    }
                }
                f = from_runtime.recv() => {
                    match f {
                        None | Some(spdy::Frame::GoAway) => break,
                        Some(spdy::Frame::Ping { id }) => tcp_write.write_all(&spdy::ping(id)).await.map_err(io)?,
                        Some(spdy::Frame::Data { stream, fin, data }) => {
                            let channel = match stream { ERROR => 3u8, STDOUT => 1, STDERR => 2, _ => continue };
                            if !data.is_empty() {
                                let mut message = Vec::with_capacity(data.len() + 1);
                                message.push(channel);
                                message.extend_from_slice(&data);
                                send.write_all(&websocket::frame(websocket::BINARY, &message)).await.map_err(|e| e.to_string())?;
                            }
                            if fin {
                                open.retain(|id| *id != stream);
                            }
                        }
                        Some(spdy::Frame::SynReply { stream, fin: true }) | Some(spdy::Frame::RstStream { stream, .. }) => {
                            open.retain(|id| *id != stream);
                        }
                        Some(_) => {}
                    }
                    if open.is_empty() {
                        break;
                    }
                }
            }
        }
        Ok(())
    }
    .await;
    client_reader.abort();
    runtime_reader.abort();
    let _ = send.write_all(&websocket::close(1000)).await;
    let _ = send.finish();
    result
}

/// Connects to the runtime's streaming server and upgrades to SPDY/3.1 for a remote command.
async fn spdy_upgrade(authority: &str, path: &str) -> Result<tokio::net::TcpStream, StreamReply> {
    let failed = |e: std::io::Error| reply(false, 502, format!("the runtime's streaming server at {authority}: {e}"));
    let mut tcp = tokio::net::TcpStream::connect(authority).await.map_err(failed)?;
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\
         X-Stream-Protocol-Version: v4.channel.k8s.io\r\nContent-Length: 0\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.map_err(failed)?;
    // The answer's head, read byte by byte so that no SPDY frame after it is consumed.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 16 * 1024 {
            return Err(reply(false, 502, "the runtime's streaming server sent an oversized answer"));
        }
        head.push(tcp.read_u8().await.map_err(failed)?);
    }
    let text = String::from_utf8_lossy(&head);
    let code: i32 = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(502);
    if code != 101 {
        return Err(reply(
            false,
            code,
            format!("the runtime refused the stream: {}", text.lines().next().unwrap_or("")),
        ));
    }
    Ok(tcp)
}

/// `http://host:port/path` as (`host:port`, `/path`).
fn split_url(url: &str) -> Option<(String, String)> {
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    Some((authority.to_string(), format!("/{path}")))
}

/// The client's request head with the runtime's path on its request line and its Host.
fn replay_head(head: &[u8], authority: &str, path: &str) -> Vec<u8> {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let method = request_line.split(' ').next().unwrap_or("GET");
    let mut out = format!("{method} {path} HTTP/1.1\r\nHost: {authority}\r\n");
    for line in lines.filter(|l| !l.is_empty() && !l.to_ascii_lowercase().starts_with("host:")) {
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clients_request_is_replayed_to_the_runtimes_url() {
        let (authority, path) = split_url("http://127.0.0.1:4321/exec/AbCd").unwrap();
        assert_eq!((authority.as_str(), path.as_str()), ("127.0.0.1:4321", "/exec/AbCd"));
        let head = b"POST /api/v1/namespaces/d/pods/p/exec?command=sh HTTP/1.1\r\nHost: api:6443\r\nUpgrade: SPDY/3.1\r\nConnection: Upgrade\r\n\r\n";
        let replayed = String::from_utf8(replay_head(head, &authority, &path)).unwrap();
        assert_eq!(
            replayed,
            "POST /exec/AbCd HTTP/1.1\r\nHost: 127.0.0.1:4321\r\nUpgrade: SPDY/3.1\r\nConnection: Upgrade\r\n\r\n"
        );
        assert!(split_url("https://x/y").is_none());
    }
}
