//! `corral bench kv`: a put or range load with many concurrent clients.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::{Args, ValueEnum};
use corral_proto::etcdserverpb::{PutRequest, PutResponse, RangeRequest, RangeResponse};
use hdrhistogram::Histogram;

use super::grpc::Conn;
use super::{Target, TargetArgs};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Op {
    Put,
    /// Linearizable single-key reads.
    Range,
    /// Serializable single-key reads.
    RangeSerializable,
}

#[derive(Args, Debug)]
pub struct KvArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[arg(long, value_enum, default_value = "put")]
    pub op: Op,
    /// Concurrent clients (each one request at a time).
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// gRPC connections the clients share, spread over the endpoints.
    #[arg(long, default_value_t = 16)]
    pub conns: usize,
    /// Requests in all.
    #[arg(long, default_value_t = 10_000)]
    pub total: u64,
    #[arg(long, default_value_t = 256)]
    pub value_size: usize,
    /// Distinct keys written or read.
    #[arg(long, default_value_t = 100_000)]
    pub key_space: u64,
}

pub async fn run(args: KvArgs) -> Result<()> {
    let target = Target::from_args(&args.target)?;
    let conns = args.conns.max(1);
    let mut connections = Vec::with_capacity(conns);
    for i in 0..conns {
        connections.push(Conn::connect(&target.endpoints[i % target.endpoints.len()], target.rustls.clone()).await?);
    }
    if matches!(args.op, Op::Range | Op::RangeSerializable) {
        // Something to read.
        let put = connections[0].uri(PUT)?;
        for k in 0..args.key_space.min(1000) {
            let req = PutRequest { key: key(k), value: vec![b'v'; args.value_size], ..Default::default() };
            connections[0].unary::<_, PutResponse>(&put, &req).await?;
        }
    }
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    // For a local cluster, the servers' own CPU time per request: steadier than throughput
    // on a noisy machine, and blind to the load generator's share.
    let cpu_before = target.server_cpu_s();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..args.clients {
        let conn = connections[c % conns].clone();
        let (put, range) = (conn.uri(PUT)?, conn.uri(RANGE)?);
        let next = next.clone();
        let errors = errors.clone();
        let op = args.op;
        let (value_size, key_space, total) = (args.value_size, args.key_space, args.total);
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
            let value = vec![b'v'; value_size];
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    return hist;
                }
                let t = Instant::now();
                let ok = match op {
                    Op::Put => {
                        let req = PutRequest { key: key(n % key_space), value: value.clone(), ..Default::default() };
                        conn.unary::<_, PutResponse>(&put, &req).await.is_ok()
                    }
                    Op::Range | Op::RangeSerializable => {
                        let req = RangeRequest {
                            key: key(n % key_space.min(1000)),
                            serializable: matches!(op, Op::RangeSerializable),
                            ..Default::default()
                        };
                        conn.unary::<_, RangeResponse>(&range, &req).await.is_ok()
                    }
                };
                if ok {
                    hist.record(t.elapsed().as_micros().max(1) as u64).ok();
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let progress = tokio::spawn({
        let next = next.clone();
        let total = args.total;
        async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let done = next.load(Ordering::Relaxed).min(total);
                eprintln!("  {done}/{total} requests");
            }
        }
    });
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for t in tasks {
        hist.add(t.await?)?;
    }
    progress.abort();
    let elapsed = started.elapsed();
    let ok = hist.len();
    let cpu = match (cpu_before, target.server_cpu_s()) {
        (Some(a), Some(b)) if ok > 0 => format!(" server_cpu_us_per_op={:.0}", (b - a) * 1e6 / ok as f64),
        _ => String::new(),
    };
    println!(
        "op={:?} clients={} conns={} value_size={} requests={} errors={} elapsed_s={:.2} ops_per_s={:.0} latency_ms_p50={:.2} latency_ms_p99={:.2} latency_ms_max={:.2}{cpu}",
        args.op,
        args.clients,
        conns,
        args.value_size,
        ok,
        errors.load(Ordering::Relaxed),
        elapsed.as_secs_f64(),
        ok as f64 / elapsed.as_secs_f64(),
        hist.value_at_quantile(0.50) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0,
        hist.max() as f64 / 1000.0,
    );
    Ok(())
}

const PUT: &str = "/etcdserverpb.KV/Put";
const RANGE: &str = "/etcdserverpb.KV/Range";

fn key(n: u64) -> Vec<u8> {
    format!("bench/{n:010}").into_bytes()
}
