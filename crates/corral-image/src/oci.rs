//! OCI image archives: layers as uncompressed tars, the image config, the manifest and an
//! index naming the image, packed in one tar in the OCI image layout that `ctr images import`
//! (and containerd's import API) reads.
//!
//! Everything is deterministic: entries sorted, owners root, times zero, so the same files
//! give the same digests and an unchanged image is not imported twice.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::Error;

const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// One entry of a layer.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Entry {
    Dir { mode: u32 },
    File { data: Vec<u8>, mode: u32 },
    Symlink { target: String },
}

/// A layer's file system tree, keyed by path without a leading `/`.
#[derive(Default, Debug)]
pub struct Layer {
    entries: BTreeMap<String, Entry>,
}

impl Layer {
    pub fn new() -> Self {
        Self::default()
    }

    /// A directory (and its parents) with this mode.
    pub fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        let path = clean(path);
        self.parents(&path);
        self.entries.insert(path, Entry::Dir { mode });
        self
    }

    pub fn file(&mut self, path: &str, data: impl Into<Vec<u8>>, mode: u32) -> &mut Self {
        let path = clean(path);
        self.parents(&path);
        self.entries.insert(path, Entry::File { data: data.into(), mode });
        self
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        let path = clean(path);
        self.parents(&path);
        self.entries.insert(path, Entry::Symlink { target: target.to_string() });
        self
    }

    /// A file read from the host (following symlinks), with the host file's mode.
    pub fn copy_from_host(&mut self, host: &Path, path: &str) -> Result<&mut Self, Error> {
        use std::os::unix::fs::PermissionsExt;
        let data = std::fs::read(host).map_err(|e| Error::Host(host.display().to_string(), e))?;
        let mode =
            std::fs::metadata(host).map_err(|e| Error::Host(host.display().to_string(), e))?.permissions().mode();
        Ok(self.file(path, data, mode & 0o7777))
    }

    pub fn contains(&self, path: &str) -> bool {
        self.entries.contains_key(&clean(path))
    }

    fn parents(&mut self, path: &str) {
        let mut at = 0;
        while let Some(i) = path[at..].find('/') {
            let parent = &path[..at + i];
            self.entries.entry(parent.to_string()).or_insert(Entry::Dir { mode: 0o755 });
            at += i + 1;
        }
    }

    /// The layer as an uncompressed tar.
    pub fn to_tar(&self) -> Result<Vec<u8>, Error> {
        let mut tar = tar::Builder::new(Vec::new());
        for (path, entry) in &self.entries {
            let mut header = tar::Header::new_ustar();
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            match entry {
                Entry::Dir { mode } => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_mode(*mode);
                    header.set_size(0);
                    tar.append_data(&mut header, format!("{path}/"), std::io::empty())?;
                }
                Entry::File { data, mode } => {
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_mode(*mode);
                    header.set_size(data.len() as u64);
                    tar.append_data(&mut header, path, data.as_slice())?;
                }
                Entry::Symlink { target } => {
                    header.set_entry_type(tar::EntryType::Symlink);
                    header.set_mode(0o777);
                    header.set_size(0);
                    tar.append_link(&mut header, path, target)?;
                }
            }
        }
        Ok(tar.into_inner()?)
    }
}

fn clean(path: &str) -> String {
    path.trim_matches('/').to_string()
}

/// What the image runs and how (the `config` of an OCI image config).
#[derive(Clone, Debug, Default)]
pub struct RunConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    pub exposed_ports: Vec<String>,
    pub stop_signal: Option<String>,
}

/// An image ready to be written: its names (`docker.io/library/nginx:latest`), how it runs,
/// and its layers from the bottom up.
pub struct Image {
    pub names: Vec<String>,
    pub run: RunConfig,
    pub layers: Vec<Layer>,
}

/// What was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    /// The manifest's digest: the image's identity.
    pub digest: String,
    pub bytes: u64,
}

fn sha256(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

impl Image {
    /// Writes the archive to `out` (through a temporary file renamed into place, so a crash
    /// never leaves half an archive under the final name).
    pub fn write(&self, out: &Path) -> Result<Written, Error> {
        let layers: Vec<Vec<u8>> = self.layers.iter().map(Layer::to_tar).collect::<Result<_, _>>()?;
        let diff_ids: Vec<String> = layers.iter().map(|l| sha256(l)).collect();
        let mut config = json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": self.layers.iter().map(|_| json!({"created_by": "corral image build"})).collect::<Vec<_>>(),
        });
        let run = &self.run;
        let c = &mut config["config"];
        if !run.entrypoint.is_empty() {
            c["Entrypoint"] = json!(run.entrypoint);
        }
        if !run.cmd.is_empty() {
            c["Cmd"] = json!(run.cmd);
        }
        if !run.env.is_empty() {
            c["Env"] = json!(run.env);
        }
        if !run.working_dir.is_empty() {
            c["WorkingDir"] = json!(run.working_dir);
        }
        if !run.exposed_ports.is_empty() {
            let ports: serde_json::Map<String, Value> =
                run.exposed_ports.iter().map(|p| (p.clone(), json!({}))).collect();
            c["ExposedPorts"] = Value::Object(ports);
        }
        if let Some(signal) = &run.stop_signal {
            c["StopSignal"] = json!(signal);
        }
        let config = serde_json::to_vec(&config)?;
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": sha256(&config), "size": config.len()},
            "layers": layers.iter().map(|l| json!({"mediaType": LAYER_MEDIA_TYPE, "digest": sha256(l), "size": l.len()}))
                .collect::<Vec<_>>(),
        }))?;
        let digest = sha256(&manifest);
        let manifests: Vec<Value> = self
            .names
            .iter()
            .map(|name| {
                json!({
                    "mediaType": MANIFEST_MEDIA_TYPE,
                    "digest": digest,
                    "size": manifest.len(),
                    "annotations": {
                        "io.containerd.image.name": name,
                        "org.opencontainers.image.ref.name": name.rsplit_once(':').map_or("latest", |(_, tag)| tag),
                    },
                })
            })
            .collect();
        let index = serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": manifests}))?;

        let tmp = out.with_extension("tar.partial");
        let file = std::fs::File::create(&tmp).map_err(|e| Error::Host(tmp.display().to_string(), e))?;
        let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
        let mut add = |path: String, data: &[u8]| -> Result<(), Error> {
            let mut header = tar::Header::new_ustar();
            header.set_mode(0o644);
            header.set_mtime(0);
            header.set_size(data.len() as u64);
            header.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut header, path, data)?;
            Ok(())
        };
        add("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        add("index.json".into(), &index)?;
        let mut blobs: BTreeMap<String, &[u8]> = BTreeMap::new();
        for layer in &layers {
            blobs.insert(sha256(layer), layer);
        }
        blobs.insert(sha256(&config), &config);
        blobs.insert(digest.clone(), &manifest);
        for (d, data) in blobs {
            add(format!("blobs/sha256/{}", d.trim_start_matches("sha256:")), data)?;
        }
        let mut writer = tar.into_inner()?;
        writer.flush()?;
        let file = writer.into_inner().map_err(|e| Error::Io(e.into_error()))?;
        file.sync_all()?;
        std::fs::rename(&tmp, out).map_err(|e| Error::Host(out.display().to_string(), e))?;
        let bytes = std::fs::metadata(out)?.len();
        Ok(Written { digest, bytes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(tar_bytes: &[u8]) -> Vec<(String, tar::EntryType)> {
        let mut archive = tar::Archive::new(tar_bytes);
        archive
            .entries()
            .expect("a tar")
            .map(|e| {
                let e = e.expect("an entry");
                (e.path().expect("a path").display().to_string(), e.header().entry_type())
            })
            .collect()
    }

    #[test]
    fn a_layer_has_its_parents_and_sorted_root_owned_entries() {
        let mut layer = Layer::new();
        layer.file("/bin/busybox", b"elf".to_vec(), 0o755).symlink("/bin/sh", "busybox").dir("/tmp", 0o1777);
        let tar_bytes = layer.to_tar().unwrap();
        let names: Vec<String> = entries(&tar_bytes).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["bin/", "bin/busybox", "bin/sh", "tmp/"]);
        assert_eq!(layer.to_tar().unwrap(), tar_bytes, "the same tree gives the same bytes");
    }

    #[test]
    fn an_archive_names_the_image_and_holds_every_blob_its_manifest_points_to() {
        let dir = tempfile::tempdir().unwrap();
        let mut layer = Layer::new();
        layer.file("/hello", "hi", 0o644);
        let image = Image {
            names: vec!["docker.io/library/hello:latest".into(), "docker.io/library/hello:1.0".into()],
            run: RunConfig { cmd: vec!["/hello".into()], ..Default::default() },
            layers: vec![layer],
        };
        let out = dir.path().join("hello.tar");
        let written = image.write(&out).unwrap();
        assert_eq!(image.write(&out).unwrap(), written, "deterministic");

        let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut archive = tar::Archive::new(std::fs::File::open(&out).unwrap());
        for e in archive.entries().unwrap() {
            let mut e = e.unwrap();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut data).unwrap();
            files.insert(e.path().unwrap().display().to_string(), data);
        }
        let index: Value = serde_json::from_slice(&files["index.json"]).unwrap();
        let names: Vec<&str> = index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["annotations"]["io.containerd.image.name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["docker.io/library/hello:latest", "docker.io/library/hello:1.0"]);
        assert_eq!(index["manifests"][1]["annotations"]["org.opencontainers.image.ref.name"], "1.0");
        let blob = |d: &str| files[&format!("blobs/sha256/{}", d.trim_start_matches("sha256:"))].clone();
        let manifest: Value = serde_json::from_slice(&blob(&written.digest)).unwrap();
        let config: Value = serde_json::from_slice(&blob(manifest["config"]["digest"].as_str().unwrap())).unwrap();
        assert_eq!(config["config"]["Cmd"], json!(["/hello"]));
        let layer_digest = manifest["layers"][0]["digest"].as_str().unwrap();
        assert_eq!(sha256(&blob(layer_digest)), layer_digest);
        assert_eq!(config["rootfs"]["diff_ids"][0], layer_digest, "uncompressed: diff id = digest");
    }
}
