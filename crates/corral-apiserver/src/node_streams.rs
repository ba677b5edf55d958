//! `pods/log`, `pods/exec`, `pods/attach` and `pods/portforward`: the API server finds the
//! pod's node and opens a stream to its agent (`agents::AgentEndpoint::open`). Logs come
//! back as a plain-text body; for the others the agent replays the client's upgrade request
//! to the runtime's streaming server, and this side hands the runtime's HTTP answer to the
//! client and relays the upgraded connection both ways.

use std::convert::Infallible;

use bytes::Bytes;
use corral_api::{ApiError, meta};
use corral_proto::agent::{Logs, ServerRequest, Stream, server_request, stream::Kind};
use futures::StreamExt;
use http_body_util::{BodyExt, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

use crate::agents::AgentEndpoint;
use crate::api::{Api, Query};
use crate::route::ObjectRoute;

type Body = BoxBody<Bytes, Infallible>;

/// The largest HTTP response head accepted from a runtime's streaming server.
const MAX_HEAD: usize = 64 * 1024;

/// Every value of a repeated query parameter (`command=sh&command=-c`).
fn all_values(query: Option<&str>, key: &str) -> Vec<String> {
    Query::parse_all(query).into_iter().filter(|(k, _)| k == key).map(|(_, v)| v).collect()
}

fn flag(q: &Query, key: &str) -> bool {
    matches!(q.get(key), Some("true" | "1"))
}

/// The pod and the container a request names, as kube-apiserver defaults it.
async fn target(api: &Api, route: &ObjectRoute, name: &str, q: &Query) -> Result<(Value, String), ApiError> {
    let r = route.resource;
    let key = r.key(route.namespace.as_deref(), name);
    let pod = api.store.get(&key, false).await?.ok_or_else(|| ApiError::not_found(r, name))?.value;
    let names: Vec<&str> = ["containers", "initContainers", "ephemeralContainers"]
        .iter()
        .flat_map(|f| pod.pointer(&format!("/spec/{f}")).and_then(Value::as_array).into_iter().flatten())
        .filter_map(|c| c.get("name").and_then(Value::as_str))
        .collect();
    let regular: Vec<&str> = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("name").and_then(Value::as_str))
        .collect();
    let default = pod
        .pointer("/metadata/annotations/kubectl.kubernetes.io~1default-container")
        .and_then(Value::as_str)
        .map(str::to_string);
    let container = match q.get("container").filter(|c| !c.is_empty()).map(str::to_string).or(default) {
        Some(c) if names.contains(&c.as_str()) => c,
        Some(c) => {
            return Err(ApiError::BadRequest(format!("container {c} is not valid for pod {name}")));
        }
        None if regular.len() == 1 => regular[0].to_string(),
        None => {
            return Err(ApiError::BadRequest(format!(
                "a container name must be specified for pod {name}, choose one of: [{}]",
                regular.join(" ")
            )));
        }
    };
    Ok((pod, container))
}

fn node_of(pod: &Value, name: &str) -> Result<String, ApiError> {
    let node = pod.pointer("/spec/nodeName").and_then(Value::as_str).unwrap_or("");
    if node.is_empty() {
        return Err(ApiError::BadRequest(format!("pod {name} does not have a host assigned")));
    }
    Ok(node.to_string())
}

/// GET pods/{name}/log.
pub async fn logs(
    api: &Api,
    agents: &AgentEndpoint,
    route: &ObjectRoute,
    name: &str,
    q: &Query,
) -> Result<Response<Body>, ApiError> {
    let (pod, container) = target(api, route, name, q).await?;
    let node = node_of(&pod, name)?;
    let number = |key: &str| -> Result<Option<i64>, ApiError> {
        q.get(key)
            .map(|v| v.parse::<i64>().map_err(|_| ApiError::BadRequest(format!("{key}: {v:?} is not a number"))))
            .transpose()
    };
    let since_unix = match (number("sinceSeconds")?, q.get("sinceTime")) {
        (Some(s), _) => api.mint.now() - s,
        (None, Some(t)) => meta::parse_rfc3339(t).ok_or_else(|| ApiError::BadRequest(format!("sinceTime: {t:?}")))?,
        (None, None) => 0,
    };
    let request = ServerRequest {
        kind: Some(server_request::Kind::Logs(Logs {
            namespace: route.namespace.clone().unwrap_or_default(),
            pod: name.to_string(),
            uid: meta::uid(&pod).to_string(),
            container,
            follow: flag(q, "follow"),
            tail_lines: number("tailLines")?.unwrap_or(-1),
            since_unix,
            timestamps: flag(q, "timestamps"),
            previous: flag(q, "previous"),
            limit_bytes: number("limitBytes")?.unwrap_or(0),
        })),
    };
    let (send, recv) = agents.open(&node, &request).await?;
    Ok(Response::builder()
        .status(200)
        .header("content-type", "text/plain")
        .body(body_from(Bytes::new(), send, recv))
        .expect("valid response"))
}

/// A response body of `first`, then what the agent sends until it finishes (the client
/// going away drops the stream, which tells the agent).
fn body_from(first: Bytes, send: quinn::SendStream, mut recv: quinn::RecvStream) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        let _keep = send;
        if !first.is_empty() && tx.send(first).await.is_err() {
            return;
        }
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(Some(n)) = recv.read(&mut buf).await {
            if tx.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                let _ = recv.stop(0u32.into());
                return;
            }
        }
    });
    let chunks = tokio_stream::wrappers::ReceiverStream::new(rx).map(|b| Ok::<_, Infallible>(Frame::data(b)));
    BodyExt::boxed(StreamBody::new(chunks))
}

/// pods/{name}/exec, attach and portforward: an upgrade relayed to the runtime.
pub async fn upgrade(
    api: &Api,
    agents: &AgentEndpoint,
    mut req: Request<Incoming>,
    route: &ObjectRoute,
    name: &str,
    q: &Query,
) -> Result<Response<Body>, ApiError> {
    let sub = route.sub.as_deref().unwrap_or_default();
    let upgrade = req.headers().get("upgrade").and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
    if upgrade.is_empty() {
        return Err(ApiError::BadRequest(format!("pods/{sub} needs a connection upgrade (SPDY/3.1 or websocket)")));
    }
    if sub == "portforward" && upgrade == "websocket" {
        // kubectl tunnels port-forwarding through a WebSocket first and falls back to SPDY
        // when the upgrade is refused; the runtime's streaming server speaks SPDY.
        return Err(ApiError::BadRequest("port forwarding over a WebSocket tunnel is not supported: use SPDY".into()));
    }
    let key = route.resource.key(route.namespace.as_deref(), name);
    let (pod, container) = match sub {
        "portforward" => {
            let pod = api.store.get(&key, false).await?.ok_or_else(|| ApiError::not_found(route.resource, name))?.value;
            (pod, String::new())
        }
        _ => target(api, route, name, q).await?,
    };
    let node = node_of(&pod, name)?;
    let kind = match sub {
        "exec" => Kind::Exec,
        "attach" => Kind::Attach,
        _ => Kind::PortForward,
    };
    let command = all_values(req.uri().query(), "command");
    if kind == Kind::Exec && command.is_empty() {
        return Err(ApiError::BadRequest("you must specify at least 1 command".into()));
    }
    let mut head = format!("{} {} HTTP/1.1\r\n", req.method(), req.uri().path_and_query().map_or("/", |p| p.as_str()));
    for (k, v) in req.headers() {
        if k != "authorization" {
            head.push_str(&format!("{}: {}\r\n", k, v.to_str().unwrap_or_default()));
        }
    }
    head.push_str("\r\n");
    let request = ServerRequest {
        kind: Some(server_request::Kind::Stream(Stream {
            kind: kind as i32,
            uid: meta::uid(&pod).to_string(),
            container,
            command,
            stdin: flag(q, "stdin"),
            stdout: flag(q, "stdout"),
            stderr: flag(q, "stderr"),
            tty: flag(q, "tty"),
            http_head: head.into_bytes(),
        })),
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let (mut send, mut recv) = agents.open(&node, &request).await?;
    // The runtime's answer: its head becomes ours; what follows is the upgraded stream.
    let mut buf = Vec::new();
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err(ApiError::Internal("the runtime's streaming server sent an oversized answer".into()));
        }
        let mut chunk = vec![0u8; 4096];
        match recv.read(&mut chunk).await {
            Ok(Some(n)) => buf.extend_from_slice(&chunk[..n]),
            _ => return Err(ApiError::Internal("the runtime's streaming server closed without answering".into())),
        }
    };
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Response::new(&mut headers);
    parsed
        .parse(&buf[..end])
        .map_err(|e| ApiError::Internal(format!("the runtime's streaming server answered badly: {e}")))?;
    let code = parsed.code.unwrap_or(502);
    let mut resp = Response::builder().status(code);
    for h in parsed.headers.iter() {
        resp = resp.header(h.name, h.value);
    }
    let rest = Bytes::copy_from_slice(&buf[end..]);
    if code != 101 {
        return Ok(resp.body(body_from(rest, send, recv)).expect("valid response"));
    }
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "the client's upgrade failed");
                return;
            }
        };
        let (mut client_read, mut client_write) = tokio::io::split(TokioIo::new(upgraded));
        let down = async {
            if client_write.write_all(&rest).await.is_err() {
                return;
            }
            let _ = tokio::io::copy(&mut recv, &mut client_write).await;
            let _ = client_write.shutdown().await;
        };
        let up = async {
            let _ = tokio::io::copy(&mut client_read, &mut send).await;
            let _ = send.finish();
        };
        tokio::join!(down, up);
    });
    Ok(resp.body(BodyExt::boxed(http_body_util::Empty::new())).expect("valid response"))
}
