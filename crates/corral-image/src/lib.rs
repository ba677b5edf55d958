//! Container images for machines with no registry: OCI archives written offline
//! (`oci`) from the host's own files (`recipes`): the sandbox image, busybox and nginx.
//! `corral image build` writes them; the agent imports every archive in its images directory.

pub mod oci;
pub mod recipes;

use std::path::{Path, PathBuf};

pub use oci::{Image, Layer, RunConfig, Written};
pub use recipes::{BUSYBOX_IMAGES, Host, NGINX_IMAGES, PAUSE_IMAGE};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}: {1}")]
    Host(String, std::io::Error),
    #[error("{0}")]
    Missing(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

/// The archives `build_all` writes, by file name.
pub const ARCHIVES: [&str; 3] = ["pause.tar", "busybox.tar", "nginx.tar"];

/// Builds every image into `out` (`pause.tar`, `busybox.tar`, `nginx.tar`), calling
/// `progress` after each with its file and what was written.
pub fn build_all(host: &Host, out: &Path, mut progress: impl FnMut(&Path, &Written)) -> Result<Vec<PathBuf>, Error> {
    std::fs::create_dir_all(out).map_err(|e| Error::Host(out.display().to_string(), e))?;
    let work = tempdir(out)?;
    let images = [
        ("pause.tar", recipes::pause(host, &work)),
        ("busybox.tar", recipes::busybox(host)),
        ("nginx.tar", recipes::nginx(host)),
    ];
    let mut written = Vec::new();
    for (file, image) in images {
        let path = out.join(file);
        let w = image?.write(&path)?;
        progress(&path, &w);
        written.push(path);
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(written)
}

fn tempdir(out: &Path) -> Result<PathBuf, Error> {
    let work = out.join(format!(".build-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| Error::Host(work.display().to_string(), e))?;
    Ok(work)
}
