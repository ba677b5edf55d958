//! `corral image build`: the images a machine with no registry needs, written as OCI
//! archives from the host's own packages (see crates/corral-image).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Build the pause, busybox and nginx images as OCI archives.
    Build(BuildArgs),
}

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// Directory for the archives (an agent imports every archive in <data-dir>/images).
    #[arg(long, default_value = "/var/lib/corral/images")]
    pub out: PathBuf,
}

pub fn run(cmd: ImageCommand) -> Result<()> {
    match cmd {
        ImageCommand::Build(args) => build(&args),
    }
}

fn build(args: &BuildArgs) -> Result<()> {
    let started = Instant::now();
    let host = corral_image::Host::default();
    corral_image::build_all(&host, &args.out, |path, written| {
        println!(
            "{:<40} {:>6.1} MiB  {}  ({:.1}s)",
            path.display(),
            written.bytes as f64 / (1 << 20) as f64,
            &written.digest[..19],
            started.elapsed().as_secs_f64()
        );
    })
    .context("building images (deploy/install-deps.sh installs busybox-static, nginx and gcc)")?;
    Ok(())
}
