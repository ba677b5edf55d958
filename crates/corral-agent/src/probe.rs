//! Container probes as kubelet runs them. The pure part reads a probe from the container's
//! spec (`Probe::of`), says when the next run is due (`due`) and folds results into the
//! container's probe state with the thresholds (`ProbeState::record`). `run` does the IO:
//! a command through CRI's ExecSync, an HTTP GET, or a TCP connect, each within its timeout.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cri::Runtime;

const SECOND_NS: i64 = 1_000_000_000;
/// The most of a probe's HTTP answer read: its status line is all that matters.
const HTTP_READ_LIMIT: usize = 10 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Startup,
    Liveness,
    Readiness,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Startup, Kind::Liveness, Kind::Readiness];

    fn field(self) -> &'static str {
        match self {
            Kind::Startup => "startupProbe",
            Kind::Liveness => "livenessProbe",
            Kind::Readiness => "readinessProbe",
        }
    }

    /// As kubelet's events name it ("Liveness probe failed: ...").
    pub fn title(self) -> &'static str {
        match self {
            Kind::Startup => "Startup",
            Kind::Liveness => "Liveness",
            Kind::Readiness => "Readiness",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Handler {
    Exec(Vec<String>),
    Http {
        https: bool,
        host: String,
        port: u16,
        path: String,
        headers: Vec<(String, String)>,
    },
    Tcp {
        host: String,
        port: u16,
    },
    /// A probe that cannot run as written: every run fails with this message.
    Invalid(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    pub kind: Kind,
    pub handler: Handler,
    pub initial_delay_ns: i64,
    pub period_ns: i64,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

fn seconds(probe: &Value, field: &str, default: i64, min: i64) -> i64 {
    probe.get(field).and_then(Value::as_i64).unwrap_or(default).max(min)
}

/// A port given by number or by the name of one of the container's ports.
fn port_of(container: &Value, port: Option<&Value>) -> Result<u16, String> {
    match port {
        Some(Value::Number(n)) => n.as_u64().and_then(|p| u16::try_from(p).ok()).ok_or(format!("invalid port {n}")),
        Some(Value::String(name)) => {
            if let Ok(p) = name.parse::<u16>() {
                return Ok(p);
            }
            container
                .get("ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
                .and_then(|p| p.get("containerPort").and_then(Value::as_u64))
                .and_then(|p| u16::try_from(p).ok())
                .ok_or(format!("couldn't find port {name:?} in the container's ports"))
        }
        _ => Err("the probe has no port".into()),
    }
}

impl Probe {
    /// The container's probe of this kind, None when it has none.
    pub fn of(container: &Value, kind: Kind) -> Option<Probe> {
        let p = container.get(kind.field()).filter(|p| p.is_object())?;
        let handler = (|| {
            if let Some(exec) = p.get("exec") {
                let command = corral_api::meta::string_list(exec.get("command"));
                return if command.is_empty() {
                    Err("the exec probe has no command".into())
                } else {
                    Ok(Handler::Exec(command))
                };
            }
            if let Some(http) = p.get("httpGet") {
                let path = http.get("path").and_then(Value::as_str).unwrap_or("/");
                return Ok(Handler::Http {
                    https: http.get("scheme").and_then(Value::as_str).is_some_and(|s| s.eq_ignore_ascii_case("https")),
                    host: http.get("host").and_then(Value::as_str).unwrap_or_default().to_string(),
                    port: port_of(container, http.get("port"))?,
                    path: if path.starts_with('/') { path.to_string() } else { format!("/{path}") },
                    headers: http
                        .get("httpHeaders")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .filter_map(|h| {
                            Some((h.get("name")?.as_str()?.to_string(), h.get("value")?.as_str()?.to_string()))
                        })
                        .collect(),
                });
            }
            if let Some(tcp) = p.get("tcpSocket") {
                return Ok(Handler::Tcp {
                    host: tcp.get("host").and_then(Value::as_str).unwrap_or_default().to_string(),
                    port: port_of(container, tcp.get("port"))?,
                });
            }
            if p.get("grpc").is_some() {
                return Err("gRPC probes are not supported by this agent; use exec, httpGet or tcpSocket".into());
            }
            Err("the probe has no handler (exec, httpGet or tcpSocket)".into())
        })();
        // Liveness and startup probes must succeed once to pass, as the API validates.
        let success_min = if kind == Kind::Readiness { seconds(p, "successThreshold", 1, 1) } else { 1 };
        Some(Probe {
            kind,
            handler: handler.unwrap_or_else(Handler::Invalid),
            initial_delay_ns: seconds(p, "initialDelaySeconds", 0, 0) * SECOND_NS,
            period_ns: seconds(p, "periodSeconds", 10, 1) * SECOND_NS,
            timeout: Duration::from_secs(seconds(p, "timeoutSeconds", 1, 1) as u64),
            success_threshold: success_min as u32,
            failure_threshold: seconds(p, "failureThreshold", 3, 1) as u32,
        })
    }
}

/// One probe of one run of a container (a new container id starts over).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProbeState {
    pub container_id: String,
    /// None until the thresholds have decided: not started, not ready, alive.
    pub result: Option<bool>,
    successes: u32,
    failures: u32,
    /// When the last run started (ns since the epoch); 0 before the first.
    pub last_run: i64,
    pub running: bool,
    /// The last failure's message, for events and status.
    pub message: String,
}

impl ProbeState {
    pub fn new(container_id: &str) -> Self {
        Self { container_id: container_id.to_string(), ..Self::default() }
    }

    /// Whether a run is due at `now` for a container that started at `started_at`.
    pub fn due(&self, probe: &Probe, started_at: i64, now: i64) -> bool {
        if self.running || (probe.kind == Kind::Startup && self.result.is_some()) {
            return false;
        }
        now >= started_at + probe.initial_delay_ns && (self.last_run == 0 || now >= self.last_run + probe.period_ns)
    }

    /// Folds one result in; true when the probe's result changed.
    pub fn record(&mut self, probe: &Probe, ok: bool, message: String) -> bool {
        self.running = false;
        let before = self.result;
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if self.successes >= probe.success_threshold {
                self.result = Some(true);
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            self.message = message;
            if self.failures >= probe.failure_threshold {
                self.result = Some(false);
                // Kubelet counts again from zero after acting on a failure.
                self.failures = 0;
            }
        }
        self.result != before
    }
}

/// What one run found: success, or why not.
pub type Outcome = Result<(), String>;

/// Runs a probe once against a container whose pod has `pod_ip`.
pub async fn run<R: Runtime>(runtime: &R, container_id: &str, pod_ip: &str, probe: &Probe) -> Outcome {
    let host = |h: &str| if h.is_empty() { pod_ip.to_string() } else { h.to_string() };
    match &probe.handler {
        Handler::Invalid(message) => Err(message.clone()),
        Handler::Exec(command) => {
            let call = runtime.exec_sync(container_id, command.clone(), probe.timeout);
            // The runtime enforces the timeout; the call is bounded a little beyond it.
            match tokio::time::timeout(probe.timeout + Duration::from_secs(2), call).await {
                Err(_) => Err(format!("command {command:?} timed out")),
                Ok(Err(e)) => Err(e.to_string()),
                Ok(Ok(out)) if out.exit_code == 0 => Ok(()),
                Ok(Ok(out)) => {
                    let text = String::from_utf8_lossy(if out.stdout.is_empty() { &out.stderr } else { &out.stdout });
                    // As kubelet: the command's output says why; without one, its exit code.
                    let text = text.trim();
                    Err(if text.is_empty() {
                        format!("command {command:?} exited with {}", out.exit_code)
                    } else {
                        text.to_string()
                    })
                }
            }
        }
        Handler::Tcp { host: h, port } => {
            let address = (host(h), *port);
            match tokio::time::timeout(probe.timeout, tokio::net::TcpStream::connect(&address)).await {
                Err(_) => Err(format!("dial tcp {}:{port}: i/o timeout", address.0)),
                Ok(Err(e)) => Err(format!("dial tcp {}:{port}: connect: {}", address.0, io_text(&e))),
                Ok(Ok(_)) => Ok(()),
            }
        }
        Handler::Http { https, host: h, port, path, headers } => {
            let host = host(h);
            let url = format!("{}://{host}:{port}{path}", if *https { "https" } else { "http" });
            match tokio::time::timeout(probe.timeout, http_get(*https, &host, *port, path, headers)).await {
                Err(_) => Err(format!(
                    "Get \"{url}\": context deadline exceeded (Client.Timeout exceeded while awaiting headers)"
                )),
                Ok(Err(e)) => Err(format!("Get \"{url}\": {}", io_text(&e))),
                Ok(Ok(code)) if (200..400).contains(&code) => Ok(()),
                Ok(Ok(code)) => Err(format!("HTTP probe failed with statuscode: {code}")),
            }
        }
    }
}

/// An IO error as Go words it: "connection refused", not "Connection refused (os error 111)".
fn io_text(e: &std::io::Error) -> String {
    let text = e.to_string();
    let text = text.split(" (os error").next().unwrap_or(&text);
    let mut chars = text.chars();
    chars.next().map(|c| c.to_lowercase().chain(chars).collect()).unwrap_or_default()
}

/// The request line and headers kubelet sends: its user agent, the probe's headers (which
/// may replace Host), and no keep-alive.
fn http_request(host: &str, port: u16, path: &str, headers: &[(String, String)]) -> String {
    let mut request = format!("GET {path} HTTP/1.1\r\n");
    let has = |name: &str| headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
    if !has("host") {
        request.push_str(&format!("Host: {host}:{port}\r\n"));
    }
    if !has("user-agent") {
        request.push_str("User-Agent: kube-probe/1.33\r\n");
    }
    if !has("accept") {
        request.push_str("Accept: */*\r\n");
    }
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("Connection: close\r\n\r\n");
    request
}

/// The status code from the start of an HTTP/1.x answer.
fn status_code(head: &[u8]) -> Option<u16> {
    let line = head.split(|b| *b == b'\n').next()?;
    let text = std::str::from_utf8(line).ok()?;
    let mut words = text.split_whitespace();
    words.next().filter(|v| v.starts_with("HTTP/"))?;
    words.next()?.parse().ok()
}

async fn read_status<S: tokio::io::AsyncRead + Unpin>(mut stream: S) -> std::io::Result<u16> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.contains(&b'\n') && head.len() < HTTP_READ_LIMIT {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    status_code(&head).ok_or_else(|| std::io::Error::other("malformed HTTP response"))
}

async fn http_get(
    https: bool,
    host: &str,
    port: u16,
    path: &str,
    headers: &[(String, String)],
) -> std::io::Result<u16> {
    let mut tcp = tokio::net::TcpStream::connect((host, port)).await?;
    let request = http_request(host, port, path, headers);
    if !https {
        tcp.write_all(request.as_bytes()).await?;
        return read_status(tcp).await;
    }
    // As kubelet, an HTTPS probe does not verify the container's certificate.
    let config =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(std::io::Error::other)?
            .dangerous()
            .with_custom_certificate_verifier(std::sync::Arc::new(AnyCertificate))
            .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).map_err(std::io::Error::other)?;
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await?;
    tls.write_all(request.as_bytes()).await?;
    read_status(tls).await
}

/// Accepts whatever certificate the container presents (probes check liveness, not identity).
#[derive(Debug)]
struct AnyCertificate;

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        let algorithms = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        let algorithms = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider().signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const S: i64 = SECOND_NS;

    fn container(probe: Value) -> Value {
        json!({"name": "app", "ports": [{"name": "http", "containerPort": 8080}], "livenessProbe": probe})
    }

    #[test]
    fn probes_are_read_with_kubernetes_defaults_and_named_ports() {
        let c = container(json!({"httpGet": {"path": "healthz", "port": "http"}}));
        let p = Probe::of(&c, Kind::Liveness).unwrap();
        assert_eq!(
            p.handler,
            Handler::Http { https: false, host: String::new(), port: 8080, path: "/healthz".into(), headers: vec![] }
        );
        assert_eq!(
            (p.period_ns, p.timeout, p.failure_threshold, p.success_threshold),
            (10 * S, Duration::from_secs(1), 3, 1)
        );
        assert!(Probe::of(&c, Kind::Readiness).is_none());
        let bad = container(json!({"tcpSocket": {"port": "metrics"}}));
        assert!(
            matches!(Probe::of(&bad, Kind::Liveness).unwrap().handler, Handler::Invalid(m) if m.contains("\"metrics\""))
        );
        let grpc = container(json!({"grpc": {"port": 9000}}));
        assert!(matches!(Probe::of(&grpc, Kind::Liveness).unwrap().handler, Handler::Invalid(m) if m.contains("gRPC")));
    }

    #[test]
    fn runs_are_due_after_the_initial_delay_then_every_period() {
        let c = container(json!({"exec": {"command": ["true"]}, "initialDelaySeconds": 5, "periodSeconds": 2}));
        let p = Probe::of(&c, Kind::Liveness).unwrap();
        let mut s = ProbeState::new("c1");
        assert!(!s.due(&p, 100 * S, 104 * S));
        assert!(s.due(&p, 100 * S, 105 * S));
        s.last_run = 105 * S;
        s.running = true;
        assert!(!s.due(&p, 100 * S, 108 * S), "one run at a time");
        s.running = false;
        assert!(!s.due(&p, 100 * S, 106 * S));
        assert!(s.due(&p, 100 * S, 107 * S));
    }

    #[test]
    fn thresholds_decide_the_result() {
        let c = container(json!({"exec": {"command": ["true"]}, "failureThreshold": 2}));
        let p = Probe::of(&c, Kind::Liveness).unwrap();
        let mut s = ProbeState::new("c1");
        assert!(!s.record(&p, false, "no".into()), "one failure is not enough");
        assert!(s.record(&p, true, String::new()));
        assert_eq!(s.result, Some(true));
        assert!(!s.record(&p, false, "no".into()), "a success starts the count over");
        assert!(s.record(&p, false, "still no".into()));
        assert_eq!((s.result, s.message.as_str()), (Some(false), "still no"));

        let mut r = json!({"name": "app", "readinessProbe": {"tcpSocket": {"port": 80}, "successThreshold": 2}});
        let p = Probe::of(&r, Kind::Readiness).unwrap();
        let mut s = ProbeState::new("c1");
        s.record(&p, true, String::new());
        assert_eq!(s.result, None, "ready only after two successes");
        assert!(s.record(&p, true, String::new()));
        assert_eq!(s.result, Some(true));
        // A startup probe stops once it has succeeded.
        r["startupProbe"] = json!({"exec": {"command": ["true"]}});
        let p = Probe::of(&r, Kind::Startup).unwrap();
        let mut s = ProbeState::new("c1");
        s.record(&p, true, String::new());
        assert!(!s.due(&p, 0, 100 * S));
    }

    #[test]
    fn http_answers_are_read_by_their_status_line() {
        assert_eq!(status_code(b"HTTP/1.1 204 No Content\r\n"), Some(204));
        assert_eq!(status_code(b"SSH-2.0\r\n"), None);
        let r = http_request("10.0.0.5", 80, "/", &[("Host".into(), "example".into())]);
        assert!(r.starts_with("GET / HTTP/1.1\r\n") && r.contains("Host: example\r\n") && !r.contains("10.0.0.5"));
    }

    #[tokio::test]
    async fn tcp_and_http_probes_reach_a_local_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            for code in [200, 503] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                s.write_all(format!("HTTP/1.1 {code} X\r\ncontent-length: 0\r\n\r\n").as_bytes()).await.unwrap();
            }
        });
        let runtime = crate::fake::FakeRuntime::with_images(&[]);
        let http = Probe::of(&container(json!({"httpGet": {"port": port}})), Kind::Liveness).unwrap();
        assert_eq!(run(&runtime, "c", "127.0.0.1", &http).await, Ok(()));
        let failed = run(&runtime, "c", "127.0.0.1", &http).await.unwrap_err();
        assert!(failed.contains("statuscode: 503"), "{failed}");
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let tcp = Probe::of(&container(json!({"tcpSocket": {"port": closed}})), Kind::Liveness).unwrap();
        assert!(run(&runtime, "c", "127.0.0.1", &tcp).await.unwrap_err().starts_with("dial tcp 127.0.0.1:"));
    }
}
