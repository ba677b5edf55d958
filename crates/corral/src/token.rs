//! `corral token create`: a join token for agents, kept as a kubeadm-style bootstrap token
//! Secret in kube-system and printed as `K10<CA hash>::<id>.<secret>`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use corral_transport::JoinToken;
use hyper::Method;

use crate::kube::Client;
use crate::local::ClusterRecord;

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Make a join token and print it.
    Create(CreateArgs),
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// A local cluster's state directory (`corral up`): its API address and admin certificate.
    #[arg(long, default_value = "/var/lib/corral/local")]
    pub state_dir: PathBuf,
    /// The Kubernetes API (default: the state directory's first server).
    #[arg(long)]
    pub api_url: Option<String>,
    /// Where ca.crt, admin.crt and admin.key are (default: STATE_DIR/pki).
    #[arg(long)]
    pub pki_dir: Option<PathBuf>,
    /// How long the token can be used to join, in hours (0: until deleted).
    #[arg(long, default_value_t = 24)]
    pub ttl_hours: u64,
    #[arg(long, default_value = "made by corral token create")]
    pub description: String,
}

pub async fn run(cmd: TokenCommand) -> Result<()> {
    match cmd {
        TokenCommand::Create(args) => {
            let pki = args.pki_dir.clone().unwrap_or_else(|| args.state_dir.join("pki"));
            let url = match &args.api_url {
                Some(u) => u.clone(),
                None => match ClusterRecord::load(&args.state_dir)? {
                    Some(r) => r.servers[0].api_url.clone(),
                    None => bail!(
                        "no cluster in {}: pass --state-dir of a `corral up` cluster, or --api-url and --pki-dir",
                        args.state_dir.display()
                    ),
                },
            };
            let expires = (args.ttl_hours > 0).then(|| now() + args.ttl_hours as i64 * 3600);
            let token = create(&pki, &url, expires, &args.description).await?;
            println!("{token}");
            Ok(())
        }
    }
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Stores a new token through the API at `url` and returns it.
pub async fn create(pki: &Path, url: &str, expires: Option<i64>, description: &str) -> Result<JoinToken> {
    let ca =
        std::fs::read_to_string(pki.join("ca.crt")).with_context(|| format!("reading {}/ca.crt", pki.display()))?;
    let token = JoinToken::generate(&corral_transport::quic::ca_hash(&ca)?);
    let secret = corral_apiserver::agents::rules::token_secret(&token, expires, description);
    let client = Client::connect(pki, url, 1).await?;
    client
        .ok(Method::POST, "/api/v1/namespaces/kube-system/secrets", Some(&secret), "application/json")
        .await
        .context("storing the token")?;
    Ok(token)
}
