//! `corral bench etcd up|down`: a 3-member Debian etcd 3.4 cluster on loopback with mutual
//! TLS from its own CA: the anchor every store benchmark is compared with.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use corral_transport::{CertificateAuthority, Usage};

use super::target::{Kind, Process, Target};

#[derive(Args, Debug)]
pub struct EtcdArgs {
    #[command(subcommand)]
    pub action: EtcdAction,
}

#[derive(Subcommand, Debug)]
pub enum EtcdAction {
    /// Start three etcd members and wait for a leader.
    Up {
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long, default_value_t = 25790)]
        base_port: u16,
    },
    /// Stop the members and remove the state directory.
    Down {
        #[arg(long)]
        state_dir: PathBuf,
    },
}

pub async fn run(args: EtcdArgs) -> Result<()> {
    match args.action {
        EtcdAction::Up { state_dir, base_port } => up(&state_dir, base_port).await,
        EtcdAction::Down { state_dir } => down(&state_dir),
    }
}

async fn up(dir: &Path, base_port: u16) -> Result<()> {
    if dir.join("etcd.json").exists() {
        bail!(
            "{} already holds an etcd cluster: `corral bench etcd down --state-dir {}` first",
            dir.display(),
            dir.display()
        );
    }
    let etcd =
        which("etcd").context("etcd is not installed: apt-get install etcd-server (deploy/install-deps.sh does)")?;
    std::fs::create_dir_all(dir.join("pki"))?;
    let dir = dir.canonicalize()?;
    let pki = dir.join("pki");
    let ca = CertificateAuthority::generate("etcd-bench-ca")?;
    let sans = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    ca.issue("etcd", &[], &sans, Usage::ServerAndClient)?.write(&pki, "server")?;
    ca.issue("admin", &[], &[], Usage::Client)?.write(&pki, "admin")?;
    ca.write(&pki)?;
    let members: Vec<(String, String, String)> = (0..3)
        .map(|i| {
            let port = base_port + 10 * i as u16;
            (format!("e{}", i + 1), format!("https://127.0.0.1:{port}"), format!("https://127.0.0.1:{}", port + 1))
        })
        .collect();
    let initial = members.iter().map(|(n, _, p)| format!("{n}={p}")).collect::<Vec<_>>().join(",");
    let p = |name: &str| pki.join(name).display().to_string();
    let mut processes = Vec::new();
    for (name, client, peer) in &members {
        let argv: Vec<String> = vec![
            etcd.display().to_string(),
            format!("--name={name}"),
            format!("--data-dir={}", dir.join(name).display()),
            format!("--listen-client-urls={client}"),
            format!("--advertise-client-urls={client}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster={initial}"),
            "--initial-cluster-state=new".into(),
            "--initial-cluster-token=corral-bench".into(),
            format!("--cert-file={}", p("server.crt")),
            format!("--key-file={}", p("server.key")),
            format!("--trusted-ca-file={}", p("ca.crt")),
            "--client-cert-auth".into(),
            format!("--peer-cert-file={}", p("server.crt")),
            format!("--peer-key-file={}", p("server.key")),
            format!("--peer-trusted-ca-file={}", p("ca.crt")),
            "--peer-client-cert-auth".into(),
        ];
        let log = dir.join(format!("{name}.log"));
        let pid = spawn(&argv, &log)?;
        processes.push(Process { name: name.clone(), client_url: client.clone(), pid, argv, log: Some(log) });
    }
    save(&dir, &processes)?;
    let endpoints = members.iter().map(|(_, c, _)| c.as_str()).collect::<Vec<_>>().join(",");
    std::fs::write(
        dir.join("etcdctl.env"),
        format!(
            "ETCDCTL_API=3\nETCDCTL_ENDPOINTS={endpoints}\nETCDCTL_CACERT={}\nETCDCTL_CERT={}\nETCDCTL_KEY={}\n",
            p("ca.crt"),
            p("admin.crt"),
            p("admin.key")
        ),
    )?;
    let target = Target::local(&dir)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if target.leader().await.is_ok() {
            break;
        }
        if Instant::now() > deadline {
            bail!("etcd did not elect a leader in 30s; see {}/e*.log", dir.display());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("etcd cluster up: set -a; . {}/etcdctl.env; set +a", dir.display());
    debug_assert_eq!(target.kind, Kind::Etcd);
    Ok(())
}

pub fn save(dir: &Path, processes: &[Process]) -> Result<()> {
    std::fs::write(dir.join("etcd.json"), serde_json::to_vec_pretty(&serde_json::json!({ "members": processes }))?)?;
    Ok(())
}

/// Starts `argv` in a session of its own, logging to `log`.
pub fn spawn(argv: &[String], log: &Path) -> Result<u32> {
    use std::os::unix::process::CommandExt;
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let mut cmd = std::process::Command::new(&argv[0]);
    cmd.args(&argv[1..]).stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    Ok(cmd.spawn().with_context(|| format!("starting {}", argv[0]))?.id())
}

fn down(dir: &Path) -> Result<()> {
    let Ok(raw) = std::fs::read(dir.join("etcd.json")) else {
        println!("nothing to stop in {}", dir.display());
        return Ok(());
    };
    let dir = dir.canonicalize()?;
    let doc: serde_json::Value = serde_json::from_slice(&raw)?;
    let processes: Vec<Process> = serde_json::from_value(doc["members"].clone())?;
    for p in &processes {
        if owns(p.pid, &dir) {
            unsafe { libc::kill(p.pid as i32, libc::SIGKILL) };
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    std::fs::remove_dir_all(&dir)?;
    println!("etcd cluster in {} stopped and removed", dir.display());
    Ok(())
}

/// True if `pid` runs a command whose arguments name `dir` (a process we started there).
pub fn owns(pid: u32, dir: &Path) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(&*dir.to_string_lossy()))
        .unwrap_or(false)
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(name)).find(|p| p.exists())
}
