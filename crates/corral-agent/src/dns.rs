//! Cluster DNS on every node, from its own view of the Services (as CoreDNS's kubernetes
//! plugin answers, without a DNS pod): `<service>.<namespace>.svc.<domain>` is the Service's
//! cluster IP, or its ready endpoints' addresses when it is headless; a pod reaches the short
//! forms (`<service>`, `<service>.<namespace>`) through the search path its sandbox is given.
//! A name in the cluster domain that names nothing is NXDOMAIN; any other name is forwarded to
//! the node's own resolver.
//!
//! The wire format (RFC 1035) is read and written here: `answer` is pure; `serve` runs the
//! UDP and TCP listeners.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use corral_api::meta::{JsonAt, str_at as text};
use serde_json::Value;
use tokio::sync::watch;

use crate::services::ServiceView;

/// Answers may be cached this long: endpoints and Services change.
const TTL_S: u32 = 5;
const TYPE_A: u16 = 1;
const TYPE_ANY: u16 = 255;
const CLASS_IN: u16 = 1;
const RCODE_SERVFAIL: u8 = 2;
const RCODE_NXDOMAIN: u8 = 3;
const RCODE_NOTIMP: u8 = 4;
/// How long the node's resolver gets to answer a forwarded query.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);

/// One question of a query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Question {
    /// Lowercase, without the trailing dot.
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
}

/// A query's header and question, as far as answering needs them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    pub id: u16,
    /// Recursion desired, echoed in the answer.
    pub rd: bool,
    pub opcode: u8,
    pub question: Question,
    /// Where the question ends in the message (it is echoed as is).
    question_end: usize,
}

/// Reads the header and first question of a message; None when it is not a query.
pub fn parse_query(msg: &[u8]) -> Option<Query> {
    if msg.len() < 12 || msg[2] & 0x80 != 0 || u16::from_be_bytes([msg[4], msg[5]]) == 0 {
        return None;
    }
    let mut labels = Vec::new();
    let mut at = 12;
    loop {
        let len = *msg.get(at)? as usize;
        at += 1;
        if len == 0 {
            break;
        }
        // Compression pointers do not appear in a query's first name.
        if len > 63 {
            return None;
        }
        labels.push(std::str::from_utf8(msg.get(at..at + len)?).ok()?.to_ascii_lowercase());
        at += len;
    }
    let field = |i: usize| Some(u16::from_be_bytes([*msg.get(i)?, *msg.get(i + 1)?]));
    let question = Question { name: labels.join("."), qtype: field(at)?, qclass: field(at + 2)? };
    Some(Query { id: field(0)?, rd: msg[2] & 0x01 != 0, opcode: (msg[2] >> 3) & 0x0f, question, question_end: at + 4 })
}

/// The names this node answers for: FQDN (no trailing dot) to addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Names {
    pub domain: String,
    pub records: BTreeMap<String, BTreeSet<Ipv4Addr>>,
}

impl Names {
    /// Every Service's name: its cluster IP, or (headless) its slices' ready addresses.
    pub fn from_view<'a>(
        domain: &str,
        services: impl IntoIterator<Item = &'a Value>,
        slices: impl IntoIterator<Item = &'a Value>,
    ) -> Names {
        let mut records: BTreeMap<String, BTreeSet<Ipv4Addr>> = BTreeMap::new();
        let fqdn = |ns: &str, name: &str| format!("{name}.{ns}.svc.{domain}");
        let mut headless = BTreeSet::new();
        for svc in services {
            let (ns, name) = (text(svc, "/metadata/namespace"), text(svc, "/metadata/name"));
            match text(svc, "/spec/clusterIP") {
                "None" => {
                    headless.insert((ns, name));
                    records.entry(fqdn(ns, name)).or_default();
                }
                ip => {
                    if let Ok(ip) = ip.parse() {
                        records.entry(fqdn(ns, name)).or_default().insert(ip);
                    }
                }
            }
        }
        for slice in slices {
            let (ns, svc) =
                (text(slice, "/metadata/namespace"), text(slice, "/metadata/labels/kubernetes.io~1service-name"));
            if !headless.contains(&(ns, svc)) {
                continue;
            }
            let eps = slice.get("endpoints").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
            for ep in eps.iter().filter(|ep| ep.at("/conditions/ready").and_then(Value::as_bool) != Some(false)) {
                if let Some(ip) = ep.at("/addresses/0").and_then(Value::as_str).and_then(|a| a.parse().ok()) {
                    records.entry(fqdn(ns, svc)).or_default().insert(ip);
                }
            }
        }
        Names { domain: domain.to_string(), records }
    }

    fn in_domain(&self, name: &str) -> bool {
        name == self.domain || name.ends_with(&format!(".{}", self.domain))
    }
}

/// What to do with a query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    Reply(Vec<u8>),
    /// Not a cluster name: ask the node's resolver.
    Forward,
}

fn reply(msg: &[u8], q: &Query, rcode: u8, addresses: &[Ipv4Addr]) -> Vec<u8> {
    let mut out = Vec::with_capacity(q.question_end + 16 * addresses.len());
    out.extend_from_slice(&q.id.to_be_bytes());
    // QR, the opcode, AA, RD as asked; RA.
    out.push(0x80 | (q.opcode << 3) | 0x04 | u8::from(q.rd));
    out.push(0x80 | rcode);
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&(addresses.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&msg[12..q.question_end]);
    for ip in addresses {
        // The name: a pointer to the question's (at offset 12).
        out.extend_from_slice(&[0xc0, 12]);
        out.extend_from_slice(&TYPE_A.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&TTL_S.to_be_bytes());
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&ip.octets());
    }
    out
}

/// The answer to `msg` from `names`; None for a message that is not a query (dropped).
pub fn answer(msg: &[u8], names: &Names) -> Option<Answer> {
    let q = parse_query(msg)?;
    if q.opcode != 0 {
        return Some(Answer::Reply(reply(msg, &q, RCODE_NOTIMP, &[])));
    }
    if !names.in_domain(&q.question.name) {
        return Some(Answer::Forward);
    }
    let Some(found) = names.records.get(&q.question.name) else {
        // Kubernetes' zones also hold what this node does not name (pods, SRV): nothing
        // is the honest answer for them too.
        return Some(Answer::Reply(reply(msg, &q, RCODE_NXDOMAIN, &[])));
    };
    let wanted = q.question.qclass == CLASS_IN && matches!(q.question.qtype, TYPE_A | TYPE_ANY);
    let addresses: Vec<Ipv4Addr> = if wanted { found.iter().copied().collect() } else { Vec::new() };
    // A name with no address of the asked type: NOERROR and no answer (NODATA).
    Some(Answer::Reply(reply(msg, &q, 0, &addresses)))
}

/// A SERVFAIL for `msg` (the node's resolver did not answer).
pub fn server_failure(msg: &[u8]) -> Option<Vec<u8>> {
    let q = parse_query(msg)?;
    Some(reply(msg, &q, RCODE_SERVFAIL, &[]))
}

/// The first nameserver of a resolv.conf.
pub fn upstream_of(resolv_conf: &str) -> Option<SocketAddr> {
    resolv_conf.lines().find_map(|l| {
        let ip = l.trim().strip_prefix("nameserver")?.trim();
        Some(SocketAddr::new(ip.parse().ok()?, 53))
    })
}

/// Asks the node's resolver; its answer, or SERVFAIL.
async fn forward(msg: &[u8], upstream: Option<SocketAddr>) -> Option<Vec<u8>> {
    let asked = async {
        let upstream = upstream?;
        let local: SocketAddr = if upstream.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().ok()?;
        let socket = tokio::net::UdpSocket::bind(local).await.ok()?;
        socket.send_to(msg, upstream).await.ok()?;
        let mut buf = vec![0u8; 4096];
        let (n, _) = socket.recv_from(&mut buf).await.ok()?;
        buf.truncate(n);
        Some(buf)
    };
    match tokio::time::timeout(FORWARD_TIMEOUT, asked).await {
        Ok(Some(answer)) => Some(answer),
        _ => server_failure(msg),
    }
}

/// The names, built from the view once per change of it rather than per query.
struct Cache {
    view: Arc<ServiceView>,
    domain: String,
    /// The view's version followed, and the names built at the last one seen.
    names: Mutex<(watch::Receiver<u64>, Arc<Names>)>,
    upstream: Option<SocketAddr>,
}

impl Cache {
    fn names(&self) -> Arc<Names> {
        let mut guard = self.names.lock().expect("not poisoned");
        let (changes, names) = &mut *guard;
        if changes.has_changed().unwrap_or(false) {
            changes.mark_unchanged();
            let services = self.view.services.lock().expect("not poisoned");
            let slices = self.view.slices.lock().expect("not poisoned");
            *names = Arc::new(Names::from_view(&self.domain, services.by_key.values(), slices.by_key.values()));
        }
        names.clone()
    }

    async fn respond(&self, msg: &[u8]) -> Option<Vec<u8>> {
        match answer(msg, &self.names())? {
            Answer::Reply(r) => Some(r),
            Answer::Forward => forward(msg, self.upstream).await,
        }
    }
}

/// Answers on `listen` (UDP and TCP) for good.
pub async fn serve(listen: SocketAddr, view: Arc<ServiceView>, domain: String) -> std::io::Result<()> {
    let upstream = std::fs::read_to_string("/etc/resolv.conf").ok().and_then(|r| upstream_of(&r));
    let udp = Arc::new(tokio::net::UdpSocket::bind(listen).await?);
    let tcp = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(%listen, domain = %domain, upstream = ?upstream, "cluster DNS answering");
    // Built on the first query (the version starts out "changed" for a new receiver).
    let mut changes = view.services_changes();
    changes.mark_changed();
    let names = Mutex::new((changes, Arc::new(Names::default())));
    let cache = Arc::new(Cache { view, domain, names, upstream });
    let c = cache.clone();
    let udp_loop = async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, from)) = udp.recv_from(&mut buf).await else { continue };
            let msg = buf[..n].to_vec();
            let (udp, c) = (udp.clone(), c.clone());
            // Forwarded queries wait on the resolver: one task each, bounded by its timeout.
            tokio::spawn(async move {
                if let Some(r) = c.respond(&msg).await {
                    let _ = udp.send_to(&r, from).await;
                }
            });
        }
    };
    let tcp_loop = async move {
        loop {
            let Ok((mut stream, _)) = tcp.accept().await else { continue };
            let c = cache.clone();
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let read = async {
                    let len = stream.read_u16().await.ok()? as usize;
                    let mut msg = vec![0u8; len];
                    stream.read_exact(&mut msg).await.ok()?;
                    Some(msg)
                };
                let Ok(Some(msg)) = tokio::time::timeout(FORWARD_TIMEOUT, read).await else { return };
                if let Some(r) = c.respond(&msg).await {
                    let _ = stream.write_u16(r.len() as u16).await;
                    let _ = stream.write_all(&r).await;
                }
            });
        }
    };
    tokio::join!(udp_loop, tcp_loop);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut msg = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            msg.push(label.len() as u8);
            msg.extend_from_slice(label.as_bytes());
        }
        msg.push(0);
        msg.extend_from_slice(&qtype.to_be_bytes());
        msg.extend_from_slice(&CLASS_IN.to_be_bytes());
        msg
    }

    fn names() -> Names {
        let services = [
            json!({"metadata": {"namespace": "shop", "name": "web"}, "spec": {"clusterIP": "10.96.0.20"}}),
            json!({"metadata": {"namespace": "shop", "name": "db"}, "spec": {"clusterIP": "None"}}),
        ];
        let slices = [json!({
            "metadata": {"namespace": "shop", "labels": {"kubernetes.io/service-name": "db"}},
            "endpoints": [{"addresses": ["10.244.1.7"]}, {"addresses": ["10.244.2.9"], "conditions": {"ready": false}},
                          {"addresses": ["10.244.1.8"], "conditions": {"ready": true}}],
        })];
        Names::from_view("cluster.local", &services, &slices)
    }

    /// (rcode, answer count, the addresses answered).
    fn read(reply: &[u8]) -> (u8, u16, Vec<Ipv4Addr>) {
        let count = u16::from_be_bytes([reply[6], reply[7]]);
        let q = parse_query(&{
            let mut m = reply.to_vec();
            m[2] &= 0x7f;
            m
        })
        .unwrap();
        let mut at = q.question_end;
        let mut ips = Vec::new();
        for _ in 0..count {
            assert_eq!(&reply[at..at + 2], &[0xc0, 12]);
            ips.push(Ipv4Addr::new(reply[at + 12], reply[at + 13], reply[at + 14], reply[at + 15]));
            at += 16;
        }
        (reply[3] & 0x0f, count, ips)
    }

    fn reply_to(name: &str, qtype: u16) -> Vec<u8> {
        match answer(&query(name, qtype), &names()) {
            Some(Answer::Reply(r)) => r,
            other => panic!("{name}: {other:?}"),
        }
    }

    #[test]
    fn services_resolve_to_their_cluster_ip_or_ready_endpoints() {
        let web = reply_to("web.shop.svc.cluster.local", TYPE_A);
        assert_eq!(&web[..2], &[0x12, 0x34], "the query's id");
        assert_eq!(web[2] & 0x85, 0x85, "a response, authoritative, recursion desired echoed");
        assert_eq!(read(&web), (0, 1, vec![Ipv4Addr::new(10, 96, 0, 20)]));
        assert_eq!(read(&reply_to("WEB.Shop.svc.cluster.local", TYPE_A)).2, [Ipv4Addr::new(10, 96, 0, 20)]);
        let db = reply_to("db.shop.svc.cluster.local", TYPE_A);
        assert_eq!(read(&db).2, [Ipv4Addr::new(10, 244, 1, 7), Ipv4Addr::new(10, 244, 1, 8)]);
    }

    #[test]
    fn other_names_are_nxdomain_nodata_or_forwarded() {
        assert_eq!(read(&reply_to("nothing.shop.svc.cluster.local", TYPE_A)).0, RCODE_NXDOMAIN);
        // A search path tried on a short name: web.shop.svc.cluster.local.shop.svc.cluster.local
        assert_eq!(read(&reply_to("web.shop.svc.cluster.local.shop.svc.cluster.local", TYPE_A)).0, RCODE_NXDOMAIN);
        assert_eq!(read(&reply_to("web.shop.svc.cluster.local", 28)), (0, 0, vec![]), "AAAA: no data");
        assert_eq!(answer(&query("example.org", TYPE_A), &names()), Some(Answer::Forward));
        assert_eq!(answer(&[0u8; 5], &names()), None, "not a DNS message");
        let failed = server_failure(&query("example.org", TYPE_A)).unwrap();
        assert_eq!(read(&failed).0, RCODE_SERVFAIL);
        assert_eq!(
            upstream_of("# x\nsearch a\nnameserver 10.0.0.2\nnameserver 10.0.0.3\n"),
            Some("10.0.0.2:53".parse().unwrap())
        );
    }
}
