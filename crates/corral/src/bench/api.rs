//! `corral bench api`: the Kubernetes API under load, measured from a client.
//!
//! 1. A fixed write rate (creates and updates of pods, half each) with as many gets beside
//!    it, for some seconds: latency p50/p99 per verb, measured from when each request was
//!    due (an open loop: a slow server cannot slow the load down and hide its latency).
//! 2. Fill to N pods; list them all.
//! 3. Watch fan-out: W watchers on the pods, then updates stamped with their send time;
//!    delivery latency p50/p99 over every watcher and update.
//! 4. Each server's RSS.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Result, bail};
use clap::Args;
use hdrhistogram::Histogram;
use hyper::{Method, StatusCode};
use serde_json::{Value, json};

use crate::kube::Client;

#[derive(Args, Debug)]
pub struct ApiArgs {
    /// A state directory from `corral up`.
    #[arg(long)]
    pub state_dir: PathBuf,
    /// Writes per second in the rate phase (creates and updates, half each; as many gets).
    #[arg(long, default_value_t = 500)]
    pub rate: u32,
    /// Seconds of the rate phase.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// Pods to fill to before listing and watching.
    #[arg(long, default_value_t = 10_000)]
    pub pods: usize,
    /// Watchers in the fan-out phase.
    #[arg(long, default_value_t = 1_000)]
    pub watchers: usize,
    /// Stamped updates the watchers must each see.
    #[arg(long, default_value_t = 100)]
    pub updates: usize,
    /// Server to send requests to (0-based index in the cluster).
    #[arg(long, default_value_t = 0)]
    pub server: usize,
}

const NS: &str = "bench";
/// Concurrent HTTP/2 streams per connection (servers allow more).
const STREAMS_PER_CONN: usize = 100;

fn pod(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "labels": { "app": "bench", "tier": "load" } },
        "spec": { "containers": [{ "name": "app", "image": "busybox:1.36", "command": ["sleep", "3600"],
                                   "resources": { "requests": { "cpu": "10m", "memory": "16Mi" } } }] }
    })
}

const JSON: &str = "application/json";
const MERGE: &str = "application/merge-patch+json";

fn pods_path() -> String {
    format!("/api/v1/namespaces/{NS}/pods")
}

fn micros_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_micros() as u64
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram bounds")
}

pub async fn run(args: ApiArgs) -> Result<()> {
    let (servers, url) = super::cluster_api(&args.state_dir, args.server)?;
    let url = url.as_str();
    let client = Client::connect(&args.state_dir.join("pki"), url, 8).await?;
    let ns = json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": NS } });
    match client.call(Method::POST, "/api/v1/namespaces", Some(&ns), JSON).await? {
        (s, _) if s.is_success() || s == StatusCode::CONFLICT => {}
        (s, body) => bail!("creating namespace {NS}: {s}: {}", String::from_utf8_lossy(&body)),
    }
    println!("corral bench api: {url}, {} servers", servers.len());

    // Names carry a run tag, so runs against one cluster do not collide.
    let tag = format!("{:x}", micros_now() / 1_000_000 % 0x10000);
    let created = rate_phase(&client, &args, &tag).await?;
    fill_and_list(&client, &args, created, &tag).await?;
    fan_out(&args, url, &client, created, &tag).await?;
    super::print_rss(&servers);
    Ok(())
}

/// Creates and updates at `rate` writes/s, with as many gets. Returns the pods created.
async fn rate_phase(client: &Client, args: &ApiArgs, tag: &str) -> Result<usize> {
    let hist = Arc::new(Mutex::new([histogram(), histogram(), histogram()]));
    let errors = Arc::new(AtomicUsize::new(0));
    let total = args.rate as u64 * args.seconds;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let creates = (total as usize).div_ceil(2);
    for i in 0..total as usize {
        tick.tick().await;
        let due = Instant::now();
        let (client, hist, errors, tag) = (client.clone(), hist.clone(), errors.clone(), tag.to_string());
        tasks.spawn(async move {
            // Even ticks create pod i/2; odd ticks update one created at least 50 creates
            // before, spread by a hash so no pod is hot; every tick also reads that one.
            let n = i / 2;
            let old = if n > 50 { n.wrapping_mul(2_654_435_761) % (n - 50) } else { 0 };
            let write = if i % 2 == 0 {
                (0, client.call(Method::POST, &pods_path(), Some(&pod(&format!("load-{tag}-{n}"))), JSON).await)
            } else {
                let patch = json!({ "metadata": { "labels": { "round": i.to_string() } } });
                let path = format!("{}/load-{tag}-{old}", pods_path());
                (1, client.call(Method::PATCH, &path, Some(&patch), MERGE).await)
            };
            let write_done = due.elapsed();
            let read_due = Instant::now();
            let read = client.call(Method::GET, &format!("{}/load-{tag}-{old}", pods_path()), None, JSON).await;
            let read_done = read_due.elapsed();
            let mut h = hist.lock().expect("histograms");
            for (verb, result, took) in [(write.0, write.1, write_done), (2, read, read_done)] {
                match result {
                    Ok((s, _)) if s.is_success() => {
                        let _ = h[verb].record(took.as_micros() as u64);
                    }
                    Ok((s, body)) => {
                        if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                            eprintln!("first error: {s}: {}", String::from_utf8_lossy(&body));
                        }
                    }
                    Err(e) => {
                        if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                            eprintln!("first error: {e}");
                        }
                    }
                }
            }
        });
        while tasks.len() > 4096 {
            tasks.join_next().await;
        }
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = started.elapsed().as_secs_f64();
    let h = hist.lock().expect("histograms");
    println!(
        "rate phase: {} writes/s asked for {}s, {:.0} writes/s done, {} errors",
        args.rate,
        args.seconds,
        (h[0].len() + h[1].len()) as f64 / elapsed,
        errors.load(Ordering::Relaxed)
    );
    for (name, h) in ["create", "update", "get"].iter().zip(h.iter()) {
        println!(
            "  {name:<7} {:>6} ops  {:>6.0}/s  p50 {:>6.2} ms  p99 {:>7.2} ms  max {:>7.2} ms",
            h.len(),
            h.len() as f64 / elapsed,
            ms(h, 0.5),
            ms(h, 0.99),
            h.max() as f64 / 1000.0
        );
    }
    Ok(creates)
}

/// Creates pods up to `args.pods` (64 at a time), then lists them all.
async fn fill_and_list(client: &Client, args: &ApiArgs, have: usize, tag: &str) -> Result<()> {
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(have));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let (client, next, target, tag) = (client.clone(), next.clone(), args.pods, tag.to_string());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= target {
                    return Ok::<_, anyhow::Error>(());
                }
                client.ok(Method::POST, &pods_path(), Some(&pod(&format!("fill-{tag}-{i}"))), JSON).await?;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let filled = args.pods.saturating_sub(have);
    let took = started.elapsed().as_secs_f64();
    println!("fill: {filled} pods created in {took:.1}s ({:.0}/s, 64 at a time)", filled as f64 / took);
    let mut times = Vec::new();
    let mut size = 0;
    let mut count = 0;
    for _ in 0..3 {
        let started = Instant::now();
        let body = client.ok(Method::GET, &pods_path(), None, JSON).await?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        size = body.len();
        count = serde_json::from_slice::<Value>(&body)?["items"].as_array().map_or(0, Vec::len);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "list: {count} pods, {:.1} MiB, median of 3 {:.0} ms (min {:.0}, max {:.0})",
        size as f64 / (1 << 20) as f64,
        times[1],
        times[0],
        times[2]
    );
    Ok(())
}

/// Opens the watchers, sends stamped updates, and measures when each watcher sees each one.
async fn fan_out(args: &ApiArgs, url: &str, client: &Client, created: usize, tag: &str) -> Result<()> {
    let list = client.ok(Method::GET, &format!("{}?limit=1", pods_path()), None, JSON).await?;
    let rv = serde_json::from_slice::<Value>(&list)?["metadata"]["resourceVersion"].as_str().unwrap_or("0").to_string();
    let conns = args.watchers.div_ceil(STREAMS_PER_CONN).max(1);
    let watch_client = Client::connect(&args.state_dir.join("pki"), url, conns).await?;
    let delivery = Arc::new(Mutex::new(histogram()));
    let seen = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut watchers = tokio::task::JoinSet::new();
    let ready = Arc::new(tokio::sync::Barrier::new(args.watchers + 1));
    for _ in 0..args.watchers {
        let (c, delivery, seen, ready) = (watch_client.clone(), delivery.clone(), seen.clone(), ready.clone());
        let path = format!("{}?watch=1&resourceVersion={rv}&labelSelector=app%3Dbench", pods_path());
        watchers.spawn(async move {
            let resp = c.stream(Method::GET, &path).await;
            ready.wait().await;
            Client::each_event(resp?, |event| {
                let sent = event.pointer("/object/metadata/annotations/sent").and_then(Value::as_str);
                if let Some(sent) = sent.and_then(|s| s.parse::<u64>().ok()) {
                    let _ = delivery.lock().expect("histogram").record(micros_now().saturating_sub(sent).max(1));
                    seen.fetch_add(1, Ordering::Relaxed);
                }
            })
            .await
        });
    }
    ready.wait().await;
    println!("fan-out: {} watchers open in {:.1}s", args.watchers, started.elapsed().as_secs_f64());
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    for i in 0..args.updates {
        tick.tick().await;
        let patch = json!({ "metadata": { "annotations": { "sent": micros_now().to_string() } } });
        let path = format!("{}/load-{tag}-{}", pods_path(), i % created.max(1));
        client.ok(Method::PATCH, &path, Some(&patch), MERGE).await?;
    }
    let expected = args.watchers * args.updates;
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    watchers.abort_all();
    let h = delivery.lock().expect("histogram");
    println!(
        "fan-out: {} of {expected} deliveries ({} updates x {} watchers), p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        seen.load(Ordering::Relaxed),
        args.updates,
        args.watchers,
        ms(&h, 0.5),
        ms(&h, 0.99),
        h.max() as f64 / 1000.0
    );
    Ok(())
}
