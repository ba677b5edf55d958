//! A future that lets every other ready task run before it is polled, so that a connection
//! writes what they all queued at once; and a stream under it that keeps h2 from writing
//! larger messages one by one.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A connection future that, each time it is woken, first goes to the back of the runtime's
/// queue, so that every task already ready runs before the connection is polled.
///
/// hyper runs each request in a task of its own, which wakes the connection's task when its
/// response is ready, and tokio runs a woken task next (its LIFO slot): each response of an
/// applied batch would leave in its own `writev`. Requeued, the connection finds all of them
/// queued and writes them together; the load generator's connection, likewise, the requests
/// of every client that a batch of responses woke.
///
/// The requeue is a self-wake: tokio schedules a task that woke itself while it ran behind
/// those already ready (it counts as a yield), where an idle worker may still steal it.
pub struct Coalesced<F> {
    inner: Pin<Box<F>>,
    requeued: bool,
}

impl<F> Coalesced<F> {
    pub fn new(inner: F) -> Self {
        Coalesced { inner: Box::pin(inner), requeued: false }
    }

    pub fn inner(&mut self) -> Pin<&mut F> {
        self.inner.as_mut()
    }
}

impl<F: Future> Future for Coalesced<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        if !self.requeued {
            self.requeued = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.requeued = false;
        self.inner.as_mut().poll(cx)
    }
}

/// A stream that tells h2 it has no vectored writes, so that h2 copies every DATA payload
/// under 1 KiB into its write buffer instead of chaining it.
///
/// Over a stream with vectored writes h2 chains any payload of 256 bytes or more (a put of
/// a 256-byte value, a range answer holding one) and must write it out before it can buffer
/// the next frame: each such message then leaves in a `writev` (one TLS record, one segment,
/// one wake-up of the reader) of its own, whatever [`Coalesced`] gathered. Copied, the
/// messages queued since the connection last ran leave together.
pub struct Unvectored<T>(pub T);

impl<T: AsyncRead + Unpin> AsyncRead for Unvectored<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Unvectored<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::task::Waker;

    use super::*;

    /// A connection as hyper's looks to the runtime: responses are queued on shared state by
    /// other tasks, each waking the connection, which writes all it finds queued.
    #[derive(Default)]
    struct Wire {
        queued: usize,
        waker: Option<Waker>,
        writes: Vec<usize>,
    }

    fn connection(wire: Arc<Mutex<Wire>>, expected: usize) -> impl Future<Output = Vec<usize>> {
        std::future::poll_fn(move |cx| {
            let mut wire = wire.lock().unwrap();
            let queued = std::mem::take(&mut wire.queued);
            if queued > 0 {
                wire.writes.push(queued);
            }
            if wire.writes.iter().sum::<usize>() == expected {
                return Poll::Ready(std::mem::take(&mut wire.writes));
            }
            wire.waker = Some(cx.waker().clone());
            Poll::Pending
        })
    }

    /// Spawns the connection, then (once it waits) `responses` tasks that each queue one
    /// response and wake it; returns the sizes of the connection's writes.
    async fn respond(responses: usize, coalesce: bool) -> Vec<usize> {
        let wire = Arc::new(Mutex::new(Wire::default()));
        let conn = connection(wire.clone(), responses);
        let conn = match coalesce {
            true => tokio::spawn(Coalesced::new(conn)),
            false => tokio::spawn(conn),
        };
        for _ in 0..1_000 {
            if wire.lock().unwrap().waker.is_some() {
                break;
            }
            tokio::task::yield_now().await;
        }
        for _ in 0..responses {
            let wire = wire.clone();
            tokio::spawn(async move {
                let waker = {
                    let mut wire = wire.lock().unwrap();
                    wire.queued += 1;
                    wire.waker.take()
                };
                if let Some(waker) = waker {
                    waker.wake();
                }
            });
        }
        conn.await.unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_batch_of_responses_leaves_in_one_write() {
        // Phase 1: as hyper runs it, the connection is polled right after the first task
        // that wakes it (the runtime's LIFO slot), and writes before the others queue theirs.
        let plain = tokio::spawn(respond(8, false)).await.unwrap();
        assert!(plain.len() > 1, "the runtime polled the woken connection at once: {plain:?}");

        // Phase 2: coalesced, it waits until the other ready tasks have run.
        let coalesced = tokio::spawn(respond(8, true)).await.unwrap();
        assert_eq!(coalesced, vec![8]);
    }
}
