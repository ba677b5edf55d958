//! `corral`: the one binary. Servers, local clusters, benchmarks.

mod agent;
mod bench;
mod chaos;
mod coalesce;
mod grpc_serve;
mod image;
mod kube;
mod local;
mod nodenet;
mod server;
mod tls;
mod token;
mod trim;
mod urls;

use anyhow::Result;

/// mimalloc: glibc's malloc and free were a tenth of a server's CPU under write load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "corral", version, about = "A Kubernetes-compatible orchestrator in one binary")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one control-plane server (store, etcd v3 API, Raft).
    Server(server::ServerArgs),
    /// Run one worker node: pods through containerd, reported to the servers.
    Agent(agent::AgentArgs),
    /// Join tokens for agents.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Start a local cluster in the background and wait until it is healthy.
    Up(local::UpArgs),
    /// Stop a local cluster and remove everything it made.
    Down(local::DownArgs),
    /// A local cluster's servers, agents and nodes.
    Status(local::StatusArgs),
    /// Benchmarks that print figures, run the same way against Corral and etcd.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Fault injection under a recorded workload, judged by checkers (linearizability,
    /// lost writes, watches, convergence).
    #[command(subcommand)]
    Chaos(chaos::ChaosCommand),
    /// Container images for machines with no registry.
    #[command(subcommand)]
    Image(image::ImageCommand),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Agent(_)) {
        small_heap();
    }
    if matches!(cli.command, Command::Status(_) | Command::Token(_) | Command::Image(_)) {
        // A table piped into `head` ends quietly, as other tools' do, instead of panicking
        // on the closed pipe. (Servers and agents keep Rust's ignored SIGPIPE: their peers
        // close sockets all the time.)
        // SAFETY: restores the default action of one signal before any thread is started.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Command::Server(args) => {
            init_logging();
            runtime.block_on(server::run(args))
        }
        Command::Agent(args) => {
            init_logging();
            runtime.block_on(agent::run(args))
        }
        Command::Token(cmd) => runtime.block_on(token::run(cmd)),
        Command::Up(args) => runtime.block_on(local::up(args)),
        Command::Down(args) => runtime.block_on(local::down(args)),
        Command::Status(args) => runtime.block_on(local::status_command(args)),
        Command::Bench(cmd) => runtime.block_on(bench::run(cmd)),
        Command::Chaos(cmd) => {
            init_progress_logging();
            runtime.block_on(chaos::run(cmd))
        }
        Command::Image(cmd) => image::run(cmd),
    }
}

/// An agent's heap is small (a few MiB); servers keep the defaults, tuned for large hot
/// heaps. Two things for the agent only:
/// - no transparent huge pages: mimalloc advises them for its arenas, and each touched
///   region then costs 2 MiB (20 MiB of RSS for 300 KiB in use). The flag is kept across
///   the exec below.
/// - mimalloc's options for a small heap: memory given back as soon as it is free, arenas
///   committed page by page. mimalloc reads them from the environment when it starts,
///   before `main`, so the agent sets them and executes itself again once (same process,
///   same arguments, same name); options already in the environment are left as the user
///   set them. If that fails the agent runs on with the defaults.
fn small_heap() {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl with PR_SET_THP_DISABLE only sets a flag of this process.
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    const OPTIONS: [(&str, &str); 2] = [("MIMALLOC_PURGE_DELAY", "0"), ("MIMALLOC_ARENA_EAGER_COMMIT", "0")];
    if OPTIONS.iter().any(|(k, _)| std::env::var_os(k).is_some()) {
        return;
    }
    let me = match std::env::current_exe() {
        Ok(path) => path,
        Err(e) => return eprintln!("corral agent: mimalloc's defaults (finding this binary: {e})"),
    };
    let mut args = std::env::args_os();
    let program = args.next().unwrap_or_default();
    let err = std::process::Command::new(&me).arg0(program).args(args).envs(OPTIONS).exec();
    eprintln!("corral agent: mimalloc's defaults (executing {} again: {err})", me.display());
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("CORRAL_LOG").unwrap_or_else(|_| EnvFilter::new("info,openraft=warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(false).init();
}

/// For commands that report progress through tracing: their own info lines, others' warnings.
fn init_progress_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("CORRAL_LOG").unwrap_or_else(|_| EnvFilter::new("warn,corral_chaos=info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .without_time()
        .init();
}
