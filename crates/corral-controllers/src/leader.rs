//! Starts the control loops when this server becomes the Raft leader and aborts them at once
//! when it stops being leader. Their writes are fenced too: the server runs them inside the
//! store's `LEADER_ONLY` scope, so a write is appended only to this server's Raft while it
//! leads and never forwarded (a deposed leader's loops run on until they hear of it; without
//! the fence their writes went through the new leader: `corral chaos run kube-mixed` saw a
//! ReplicaSet of 3 with 4 pods).

use std::time::Instant;

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A runtime of its own for the control loops: two worker threads (and a blocking pool) at a
/// lower CPU priority (nice 10). A pass over 50,000 pods is plain computation on its thread;
/// on the servers' own runtime it would hold a worker that Raft's heartbeats, the store and
/// the API need, and on two cores a leader kept busy that way looks dead to its followers.
/// Here the loops slow down under a storm and the consensus does not. The runtime lives as
/// long as the process; its tasks stop with each term.
pub fn control_runtime() -> std::io::Result<tokio::runtime::Handle> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("controllers")
        .enable_all()
        .on_thread_start(|| {
            // On Linux the nice value is per thread: `who = 0` is the calling thread.
            // SAFETY: setpriority has no memory effects; failure only leaves the priority.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
        })
        .build()?;
    let handle = runtime.handle().clone();
    std::mem::forget(runtime);
    Ok(handle)
}

/// Runs until `leader` closes. `start` is called on every gain of leadership; the tasks it
/// returns are aborted on every loss.
pub async fn run_while_leader(mut leader: watch::Receiver<bool>, mut start: impl FnMut() -> Vec<JoinHandle<()>>) {
    loop {
        if leader.wait_for(|l| *l).await.is_err() {
            return;
        }
        let since = Instant::now();
        tracing::info!("leader: starting the scheduler and controllers");
        let tasks = start();
        let closed = leader.wait_for(|l| !*l).await.is_err();
        for t in &tasks {
            t.abort();
        }
        tracing::info!(
            led_ms = since.elapsed().as_millis() as u64,
            "no longer leader: scheduler and controllers stopped"
        );
        if closed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn loops_run_only_while_leader() {
        let (tx, rx) = watch::channel(false);
        let running = Arc::new(AtomicUsize::new(0));
        let starts = Arc::new(AtomicUsize::new(0));
        let (r, s) = (running.clone(), starts.clone());
        let runner = tokio::spawn(run_while_leader(rx, move || {
            s.fetch_add(1, Ordering::SeqCst);
            let r = r.clone();
            vec![tokio::spawn(async move {
                loop {
                    r.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })]
        }));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(running.load(Ordering::SeqCst), 0, "a follower runs nothing");
        tx.send_replace(true);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(running.load(Ordering::SeqCst) > 0);
        tx.send_replace(false);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let stopped_at = running.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(running.load(Ordering::SeqCst), stopped_at, "stopped when leadership was lost");
        tx.send_replace(true);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(starts.load(Ordering::SeqCst), 2, "started again on the next term");
        drop(tx);
        runner.await.unwrap();
    }
}
