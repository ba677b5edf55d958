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
