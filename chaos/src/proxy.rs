//! A userspace TCP proxy for peer links, with delay, jitter and loss the runner turns up and
//! down while it runs (tc netem is not available on these machines).
//!
//! The proxy sees a byte stream, not packets, so it models what TCP makes of a bad link:
//! every chunk it forwards arrives `delay` plus up to `jitter` later, and a "lost" chunk
//! arrives one retransmission timeout (200 ms, Linux's minimum) later still, holding back
//! the chunks behind it, as a lost segment does. Order is kept; nothing is corrupted (the
//! links carry TLS, which would only reset). Each direction has a bounded queue, so a slow
//! link pushes back on its sender as a full TCP window does.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::debug;

/// How a link misbehaves. The default is a healthy link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Shaping {
    pub delay: Duration,
    pub jitter: Duration,
    /// Probability that a chunk is "lost" and arrives a retransmission timeout late.
    pub loss: f64,
}

/// What a lost chunk costs: TCP's minimum retransmission timeout on Linux.
pub const RETRANSMIT: Duration = Duration::from_millis(200);

/// Chunks in flight per direction before the reader waits (about 4 MiB at most).
const QUEUE: usize = 64;

impl Shaping {
    pub fn is_healthy(&self) -> bool {
        *self == Shaping::default()
    }

    /// How much later than now a chunk read now is delivered.
    fn lateness(&self, rng: &mut impl Rng) -> Duration {
        if self.is_healthy() {
            return Duration::ZERO;
        }
        let jitter = if self.jitter.is_zero() {
            Duration::ZERO
        } else {
            Duration::from_micros(rng.random_range(0..self.jitter.as_micros() as u64))
        };
        let lost = self.loss > 0.0 && rng.random_bool(self.loss.min(1.0));
        self.delay + jitter + if lost { RETRANSMIT } else { Duration::ZERO }
    }
}

/// The shaping of a set of links, shared by their proxies and changed by the runner.
#[derive(Clone, Debug, Default)]
pub struct Knob(Arc<Mutex<Shaping>>);

impl Knob {
    pub fn set(&self, shaping: Shaping) {
        *self.0.lock().expect("knob lock") = shaping;
    }

    pub fn get(&self) -> Shaping {
        *self.0.lock().expect("knob lock")
    }
}

/// One listening proxy: connections to `listen` are forwarded to `target`. Dropping it stops
/// accepting and ends the connections it carries.
pub struct LinkProxy {
    pub listen: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LinkProxy {
    pub async fn start(listen: SocketAddr, target: SocketAddr, knob: Knob) -> std::io::Result<LinkProxy> {
        let listener = TcpListener::bind(listen).await?;
        let listen = listener.local_addr()?;
        let task = tokio::spawn(async move {
            // Connections end with the proxy: their tasks are aborted with this set.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((inbound, _)) = listener.accept().await else { continue };
                let knob = knob.clone();
                connections.spawn(async move {
                    match TcpStream::connect(target).await {
                        Ok(outbound) => carry(inbound, outbound, knob).await,
                        Err(e) => debug!(%target, error = %e, "proxy could not reach its target"),
                    }
                });
                while connections.try_join_next().is_some() {}
            }
        });
        Ok(LinkProxy { listen, task })
    }
}

/// Carries one connection both ways until either side closes.
async fn carry(inbound: TcpStream, outbound: TcpStream, knob: Knob) {
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (in_read, in_write) = inbound.into_split();
    let (out_read, out_write) = outbound.into_split();
    tokio::join!(pump(in_read, out_write, knob.clone()), pump(out_read, in_write, knob));
}

/// One direction: a reader stamps each chunk with its delivery time, a writer delivers it
/// then. Delivery times never go backwards, so a late chunk holds back those behind it.
async fn pump(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, knob: Knob) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(QUEUE);
    let reader = async move {
        let mut rng = rand::rngs::StdRng::from_rng(&mut rand::rng());
        let mut last = Instant::now();
        loop {
            let mut buf = vec![0u8; 64 * 1024];
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            buf.truncate(n);
            let at = (Instant::now() + knob.get().lateness(&mut rng)).max(last);
            last = at;
            if tx.send((at, buf)).await.is_err() {
                break;
            }
        }
    };
    let writer = async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on an ephemeral port.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn round_trip(stream: &mut TcpStream, message: &[u8]) -> Duration {
        let began = Instant::now();
        stream.write_all(message).await.expect("write");
        let mut back = vec![0u8; message.len()];
        stream.read_exact(&mut back).await.expect("read");
        assert_eq!(back, message, "bytes arrive whole and in order");
        began.elapsed()
    }

    #[tokio::test]
    async fn a_link_is_slowed_while_shaped_and_healthy_again_after() {
        // A healthy proxy in front of an echo server.
        let knob = Knob::default();
        let proxy = LinkProxy::start("127.0.0.1:0".parse().unwrap(), echo().await, knob.clone()).await.expect("proxy");
        let mut stream = TcpStream::connect(proxy.listen).await.expect("connect");
        let healthy = round_trip(&mut stream, b"ping").await;

        // Turned up: 50 ms each way on the same connection.
        knob.set(Shaping { delay: Duration::from_millis(50), ..Shaping::default() });
        let slow = round_trip(&mut stream, b"slow ping").await;
        assert!(slow >= Duration::from_millis(100), "two delayed directions: {slow:?}");

        // Total loss: every chunk waits a retransmission timeout.
        knob.set(Shaping { loss: 1.0, ..Shaping::default() });
        let lossy = round_trip(&mut stream, b"lost ping").await;
        assert!(lossy >= 2 * RETRANSMIT, "{lossy:?}");

        // Healed.
        knob.set(Shaping::default());
        let again = round_trip(&mut stream, b"ping again").await;
        assert!(again < Duration::from_millis(50), "healthy: {again:?} (first was {healthy:?})");
    }

    #[tokio::test]
    async fn jittered_chunks_keep_their_order() {
        let knob = Knob::default();
        knob.set(Shaping { jitter: Duration::from_millis(20), ..Shaping::default() });
        let proxy = LinkProxy::start("127.0.0.1:0".parse().unwrap(), echo().await, knob).await.expect("proxy");
        let mut stream = TcpStream::connect(proxy.listen).await.expect("connect");
        let (mut r, mut w) = stream.split();
        let sent: Vec<u8> = (0..200u32).flat_map(|i| i.to_be_bytes()).collect();
        let write = async {
            for chunk in sent.chunks(4) {
                w.write_all(chunk).await.expect("write");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        let mut back = vec![0u8; sent.len()];
        let read = r.read_exact(&mut back);
        let (_, got) = tokio::join!(write, read);
        got.expect("read");
        assert_eq!(back, sent, "jitter never reorders a stream");
    }
}
