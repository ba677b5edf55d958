//! `corral`: the one binary. Servers, local clusters, benchmarks.

mod agent;
mod bench;
mod chaos;
mod image;
mod kube;
mod local;
mod nodenet;
mod server;
mod tls;
mod token;
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
        // An agent's heap is small (a few MiB), but mimalloc advises huge pages for its
        // arenas: each touched region then costs 2 MiB, 20 MiB of RSS for 300 KiB in use.
        // Servers keep huge pages (their heaps are large and hot).
        // SAFETY: prctl with PR_SET_THP_DISABLE only sets a flag of this process.
        unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
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
