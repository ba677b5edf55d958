//! The agent's connection to the servers: QUIC with its node certificate, one stream per
//! request, to whichever server answers. When the server it uses dies or is cut off, the
//! next request goes to the next server in the list.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use corral_proto::agent::{AgentRequest, AgentResponse, Join, agent_request, agent_response};
use corral_transport::quic::{self, ClientIdentity, Trust};
use corral_transport::{JoinToken, frame, signing_request};

/// How long a server gets to accept a connection before the next one is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one request (not a watch) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("no server answered: {0}")]
    Unreachable(String),
    #[error("the server refused: {0}")]
    Refused(String),
    #[error("the request broke off: {0}")]
    Broken(String),
    /// No answer in time on a connection that did not break: a busy server, not a dead one
    /// (a dead or wedged one is found by the watches, which go silent).
    #[error("no answer in {0:?}")]
    Slow(Duration),
    #[error("{0}")]
    Setup(String),
}

/// What an agent keeps from joining: its certificate and key, the CA, and the servers.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Credentials {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub servers: Vec<String>,
}

impl Credentials {
    const FILE: &str = "credentials.json";

    pub fn load(dir: &Path) -> Option<Self> {
        serde_json::from_slice(&std::fs::read(dir.join(Self::FILE)).ok()?).ok()
    }

    /// Written atomically and readable by root only: the key is in it.
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join(format!("{}.tmp", Self::FILE));
        let mut f = std::fs::OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(self).expect("JSON"))?;
        f.sync_all()?;
        std::fs::rename(tmp, dir.join(Self::FILE))
    }
}

async fn resolve(server: &str) -> Result<(SocketAddr, String), LinkError> {
    let host = server.rsplit_once(':').map_or(server, |(h, _)| h).trim_matches(['[', ']']).to_string();
    let addr = tokio::net::lookup_host(server)
        .await
        .map_err(|e| LinkError::Unreachable(format!("{server}: {e}")))?
        .next()
        .ok_or_else(|| LinkError::Unreachable(format!("{server}: no address")))?;
    Ok((addr, host))
}

async fn connect(endpoint: &quinn::Endpoint, server: &str) -> Result<quinn::Connection, LinkError> {
    let (addr, host) = resolve(server).await?;
    let connecting = endpoint.connect(addr, &host).map_err(|e| LinkError::Unreachable(format!("{server}: {e}")))?;
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(LinkError::Unreachable(format!("{server}: {e}"))),
        Err(_) => Err(LinkError::Unreachable(format!("{server}: no answer in {CONNECT_TIMEOUT:?}"))),
    }
}

/// Sends one request on a new stream and reads the one answer.
async fn call(conn: &quinn::Connection, request: &AgentRequest) -> Result<AgentResponse, LinkError> {
    let broken = |e: &dyn std::fmt::Display| LinkError::Broken(e.to_string());
    let exchange = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| broken(&e))?;
        frame::write(&mut send, request).await.map_err(|e| broken(&e))?;
        let _ = send.finish();
        let reply: Option<AgentResponse> = frame::read(&mut recv).await.map_err(|e| broken(&e))?;
        reply.ok_or_else(|| LinkError::Broken("the server closed the stream without an answer".into()))
    };
    let reply =
        tokio::time::timeout(REQUEST_TIMEOUT, exchange).await.map_err(|_| LinkError::Slow(REQUEST_TIMEOUT))??;
    match reply.kind {
        Some(agent_response::Kind::Refused(r)) => Err(LinkError::Refused(r.message)),
        _ => Ok(reply),
    }
}

/// Joins the cluster at any of `servers` with `token`: a new key, a certificate for it
/// signed by the cluster CA, and the list of every server.
pub async fn join(servers: &[String], token: &str, node_name: &str) -> Result<Credentials, LinkError> {
    let token = JoinToken::parse(token).map_err(|e| LinkError::Setup(e.to_string()))?;
    let user = format!("system:node:{node_name}");
    let (key_pem, csr_pem) = signing_request(&user).map_err(|e| LinkError::Setup(e.to_string()))?;
    let endpoint =
        quic::client(&Trust::Pinned(token.ca_hash.clone()), None).map_err(|e| LinkError::Setup(e.to_string()))?;
    let request = AgentRequest {
        kind: Some(agent_request::Kind::Join(Join {
            token: token.to_string(),
            node_name: node_name.to_string(),
            csr_pem,
        })),
    };
    let mut last = LinkError::Unreachable("no server given: pass --server".into());
    for server in servers {
        let conn = match connect(&endpoint, server).await {
            Ok(c) => c,
            Err(e) => {
                last = e;
                continue;
            }
        };
        let reply = call(&conn, &request).await;
        conn.close(0u32.into(), b"joined");
        match reply?.kind {
            Some(agent_response::Kind::Joined(j)) => {
                let mut servers = j.servers;
                if servers.is_empty() {
                    servers.push(server.clone());
                }
                return Ok(Credentials { ca_pem: j.ca_pem, cert_pem: j.cert_pem, key_pem, servers });
            }
            _ => last = LinkError::Broken(format!("{server} answered a join with something else")),
        }
    }
    Err(last)
}

/// What the agent does with a stream a server opens (logs, exec, port-forward).
pub type Handler =
    Arc<dyn Fn(quinn::SendStream, quinn::RecvStream) -> futures::future::BoxFuture<'static, ()> + Send + Sync>;

/// How often connections to the servers not in use are checked (and made again).
const KEEP_EVERY: Duration = Duration::from_secs(2);

/// The agent's connections: one to every server that answers, so any server can open a
/// stream to it; requests go to the current one, and to the next when it breaks.
pub struct Link {
    endpoint: quinn::Endpoint,
    servers: Vec<String>,
    conns: Mutex<HashMap<String, quinn::Connection>>,
    /// The index of the server requests go to.
    current: Mutex<usize>,
    /// One connection attempt at a time from `connection`.
    connecting: tokio::sync::Mutex<()>,
    handler: OnceLock<Handler>,
}

fn alive(c: &quinn::Connection) -> bool {
    c.close_reason().is_none()
}

impl Link {
    pub fn new(credentials: &Credentials, extra_servers: &[String]) -> Result<Self, LinkError> {
        let identity = ClientIdentity { cert_pem: credentials.cert_pem.clone(), key_pem: credentials.key_pem.clone() };
        let endpoint = quic::client(&Trust::Ca(credentials.ca_pem.clone()), Some(&identity))
            .map_err(|e| LinkError::Setup(e.to_string()))?;
        let mut servers = extra_servers.to_vec();
        for s in &credentials.servers {
            if !servers.contains(s) {
                servers.push(s.clone());
            }
        }
        Ok(Self {
            endpoint,
            servers,
            conns: Mutex::new(HashMap::new()),
            current: Mutex::new(0),
            connecting: tokio::sync::Mutex::new(()),
            handler: OnceLock::new(),
        })
    }

    /// Serves the streams servers open with `handler`, and keeps a connection to every
    /// server (checked every two seconds) so each can reach this agent.
    pub fn serve_streams(self: &Arc<Self>, handler: Handler) -> tokio::task::JoinHandle<()> {
        let _ = self.handler.set(handler);
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                for server in &this.servers {
                    let live = this.conns.lock().expect("not poisoned").get(server).is_some_and(alive);
                    if !live {
                        let _ = this.connect_to(server).await;
                    }
                }
                tokio::time::sleep(KEEP_EVERY).await;
            }
        })
    }

    /// The server requests go to now, if connected.
    pub fn server(&self) -> Option<String> {
        let i = *self.current.lock().expect("not poisoned");
        let server = &self.servers[i % self.servers.len()];
        self.conns.lock().expect("not poisoned").get(server).filter(|c| alive(c)).map(|_| server.clone())
    }

    async fn connect_to(&self, server: &str) -> Result<quinn::Connection, LinkError> {
        let conn = connect(&self.endpoint, server).await?;
        if let Some(handler) = self.handler.get() {
            let (conn, handler) = (conn.clone(), handler.clone());
            tokio::spawn(async move {
                while let Ok((send, recv)) = conn.accept_bi().await {
                    tokio::spawn(handler(send, recv));
                }
            });
        }
        let old = self.conns.lock().expect("not poisoned").insert(server.to_string(), conn.clone());
        if let Some(old) = old.filter(|o| o.stable_id() != conn.stable_id()) {
            old.close(0u32.into(), b"replaced");
        }
        Ok(conn)
    }

    /// The current server's connection, or one to the first server that answers, starting
    /// after the one that failed last.
    pub async fn connection(&self) -> Result<quinn::Connection, LinkError> {
        let _one = self.connecting.lock().await;
        let start = *self.current.lock().expect("not poisoned");
        let mut errors = Vec::new();
        for k in 0..self.servers.len() {
            let i = (start + k) % self.servers.len();
            let server = &self.servers[i];
            let existing = self.conns.lock().expect("not poisoned").get(server).filter(|c| alive(c)).cloned();
            let fresh = existing.is_none();
            let conn = match existing {
                Some(c) => Ok(c),
                None => self.connect_to(server).await,
            };
            match conn {
                Ok(c) => {
                    if fresh || k > 0 {
                        tracing::info!(server = %server, "connected");
                    }
                    *self.current.lock().expect("not poisoned") = i;
                    return Ok(c);
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        Err(LinkError::Unreachable(errors.join("; ")))
    }

    /// Gives up on `conn` (it broke): requests go to the next server.
    pub fn abandon(&self, conn: &quinn::Connection) {
        let mut conns = self.conns.lock().expect("not poisoned");
        let server = conns.iter().find(|(_, c)| c.stable_id() == conn.stable_id()).map(|(s, _)| s.clone());
        conn.close(0u32.into(), b"abandoned");
        if let Some(server) = server {
            conns.remove(&server);
            let mut current = self.current.lock().expect("not poisoned");
            if self.servers.get(*current % self.servers.len()) == Some(&server) {
                *current += 1;
            }
        }
    }

    /// One request and its answer; a broken connection is abandoned (a slow answer leaves it
    /// be: under load a server can take long to write, and abandoning the connection would
    /// also break every watch on it, which then resume from the server's history).
    pub async fn request(&self, request: AgentRequest) -> Result<AgentResponse, LinkError> {
        let conn = self.connection().await?;
        let reply = call(&conn, &request).await;
        if let Err(LinkError::Broken(_)) = &reply {
            self.abandon(&conn);
        }
        reply
    }

    /// Opens a long-lived request (a watch): the stream to read answers from.
    pub async fn open(&self, request: AgentRequest) -> Result<(quinn::Connection, quinn::RecvStream), LinkError> {
        let conn = self.connection().await?;
        let opened = async {
            let (mut send, recv) = conn.open_bi().await.map_err(|e| LinkError::Broken(e.to_string()))?;
            frame::write(&mut send, &request).await.map_err(|e| LinkError::Broken(e.to_string()))?;
            let _ = send.finish();
            Ok(recv)
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, opened).await {
            Ok(Ok(recv)) => Ok((conn, recv)),
            Ok(Err(e)) => {
                self.abandon(&conn);
                Err(e)
            }
            Err(_) => {
                self.abandon(&conn);
                Err(LinkError::Broken("opening a stream timed out".into()))
            }
        }
    }
}
