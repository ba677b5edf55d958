//! The images Corral builds offline from the host's own files, for machines with no registry:
//! the sandbox image (our `pause`, compiled statically), busybox (Debian's busybox-static
//! with every applet) and nginx (Debian's nginx with the libraries it links, serving a page
//! on port 80, over the busybox layer so `kubectl exec` has a shell).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::Error;
use crate::oci::{Image, Layer, RunConfig};

/// The sandbox image containerd's CRI plugin is configured with.
pub const PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.9";
pub const BUSYBOX_IMAGES: &[&str] = &["docker.io/library/busybox:latest", "docker.io/library/busybox:1.35"];
pub const NGINX_IMAGES: &[&str] =
    &["docker.io/library/nginx:latest", "docker.io/library/nginx:1.25", "docker.io/library/nginx:1.27"];

const PAUSE_SOURCE: &str = include_str!("../../../deploy/images/pause.c");

const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                      www-data:x:33:33:www-data:/var/www:/bin/false\n\
                      nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
const GROUP: &str = "root:x:0:\nwww-data:x:33:\nnogroup:x:65534:\n";
const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where the host's inputs are: the busybox and nginx binaries, nginx's mime types, and
/// the C compiler for pause. Tests point these at files of their own.
#[derive(Clone, Debug)]
pub struct Host {
    pub busybox: PathBuf,
    pub nginx: PathBuf,
    pub mime_types: PathBuf,
    pub cc: String,
}

impl Default for Host {
    fn default() -> Self {
        Self {
            busybox: "/bin/busybox".into(),
            nginx: "/usr/sbin/nginx".into(),
            mime_types: "/etc/nginx/mime.types".into(),
            cc: std::env::var("CC").unwrap_or_else(|_| "cc".into()),
        }
    }
}

/// The sandbox image: `/pause` compiled from deploy/images/pause.c, statically.
pub fn pause(host: &Host, work: &Path) -> Result<Image, Error> {
    let source = work.join("pause.c");
    let binary = work.join("pause");
    std::fs::write(&source, PAUSE_SOURCE).map_err(|e| Error::Host(source.display().to_string(), e))?;
    let out = Command::new(&host.cc)
        .args(["-static", "-Os", "-s", "-o"])
        .arg(&binary)
        .arg(&source)
        .output()
        .map_err(|e| Error::Missing(format!("the C compiler {:?} ({e}): install gcc", host.cc)))?;
    if !out.status.success() {
        return Err(Error::Missing(format!(
            "compiling pause failed: {} (static linking needs libc6-dev)",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let mut layer = Layer::new();
    layer.copy_from_host(&binary, "/pause")?;
    Ok(Image {
        names: vec![PAUSE_IMAGE.into()],
        run: RunConfig { entrypoint: vec!["/pause".into()], ..Default::default() },
        layers: vec![layer],
    })
}

/// A base layer: busybox with every applet linked where busybox puts it, users, /tmp.
fn busybox_layer(host: &Host) -> Result<Layer, Error> {
    if !is_static_elf(&host.busybox)? {
        return Err(Error::Missing(format!(
            "{} is not a static binary: install Debian's busybox-static",
            host.busybox.display()
        )));
    }
    let list = Command::new(&host.busybox)
        .arg("--list-full")
        .output()
        .map_err(|e| Error::Host(host.busybox.display().to_string(), e))?;
    let mut layer = Layer::new();
    layer.copy_from_host(&host.busybox, "/bin/busybox")?;
    for applet in String::from_utf8_lossy(&list.stdout).lines().map(str::trim).filter(|l| !l.is_empty()) {
        if applet != "bin/busybox" {
            layer.symlink(applet, "/bin/busybox");
        }
    }
    layer
        .file("/etc/passwd", PASSWD, 0o644)
        .file("/etc/group", GROUP, 0o644)
        .dir("/tmp", 0o1777)
        .dir("/root", 0o700)
        .dir("/var", 0o755)
        .dir("/proc", 0o555)
        .dir("/sys", 0o555)
        .dir("/dev", 0o755);
    Ok(layer)
}

pub fn busybox(host: &Host) -> Result<Image, Error> {
    Ok(Image {
        names: BUSYBOX_IMAGES.iter().map(|s| s.to_string()).collect(),
        run: RunConfig { cmd: vec!["sh".into()], env: vec![PATH_ENV.into()], ..Default::default() },
        layers: vec![busybox_layer(host)?],
    })
}

const NGINX_CONF: &str = r#"# Corral's nginx image: one worker, logs to the container's output, a page on port 80.
user www-data;
worker_processes 1;
pid /run/nginx.pid;
error_log /dev/stderr warn;

events {
    worker_connections 256;
}

http {
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    access_log /dev/stdout;
    sendfile on;
    keepalive_timeout 65;

    server {
        listen 80 default_server;
        root /usr/share/nginx/html;
        index index.html;
        # Which replica answered: tests of Services count the hostnames they see.
        add_header X-Served-By $hostname always;
        location = /hostname {
            default_type text/plain;
            return 200 "$hostname\n";
        }
        location / {
            try_files $uri $uri/ =404;
        }
    }
}
"#;

const INDEX_HTML: &str = "<!DOCTYPE html>
<html>
<head><title>Welcome to nginx!</title></head>
<body>
<h1>Welcome to nginx!</h1>
<p>This nginx runs on Corral, from an image built offline by <code>corral image build</code>.</p>
</body>
</html>
";

pub fn nginx(host: &Host) -> Result<Image, Error> {
    let mut layer = Layer::new();
    layer.copy_from_host(&host.nginx, "/usr/sbin/nginx")?;
    for lib in shared_libraries(&host.nginx)? {
        let path = lib.display().to_string();
        layer.copy_from_host(&lib, &path)?;
    }
    layer
        .copy_from_host(&host.mime_types, "/etc/nginx/mime.types")?
        .file("/etc/nginx/nginx.conf", NGINX_CONF, 0o644)
        .file("/usr/share/nginx/html/index.html", INDEX_HTML, 0o644)
        .dir("/var/lib/nginx", 0o755)
        .dir("/var/log/nginx", 0o755)
        .dir("/run", 0o755);
    Ok(Image {
        names: NGINX_IMAGES.iter().map(|s| s.to_string()).collect(),
        run: RunConfig {
            cmd: vec!["nginx".into(), "-g".into(), "daemon off;".into()],
            env: vec![PATH_ENV.into()],
            exposed_ports: vec!["80/tcp".into()],
            stop_signal: Some("SIGQUIT".into()),
            ..Default::default()
        },
        layers: vec![busybox_layer(host)?, layer],
    })
}

/// The shared libraries a dynamically linked binary loads (and its loader), from `ldd`.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, Error> {
    let out =
        Command::new("ldd").arg(binary).output().map_err(|e| Error::Missing(format!("ldd ({e}): install libc-bin")))?;
    if !out.status.success() {
        return Err(Error::Missing(format!(
            "ldd {}: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(parse_ldd(&String::from_utf8_lossy(&out.stdout)))
}

fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// True for an ELF executable without an interpreter (PT_INTERP): it runs in an empty image.
fn is_static_elf(path: &Path) -> Result<bool, Error> {
    let data = std::fs::read(path).map_err(|e| Error::Host(path.display().to_string(), e))?;
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 {
        return Ok(false);
    }
    let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(data[o..o + 8].try_into().unwrap_or_default()) as usize;
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        if at + 4 > data.len() {
            return Ok(false);
        }
        const PT_INTERP: u32 = 3;
        if u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]) == PT_INTERP {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_the_libraries_and_the_loader() {
        let text = "\tlinux-vdso.so.1 (0x00007eff8d22e000)\n\
                    \tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007eff8cf2b000)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007eff8d230000)\n";
        assert_eq!(
            parse_ldd(text),
            [PathBuf::from("/lib/x86_64-linux-gnu/libz.so.1"), PathBuf::from("/lib64/ld-linux-x86-64.so.2")]
        );
    }

    #[test]
    fn only_executables_without_an_interpreter_count_as_static() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("script");
        std::fs::write(&text, "#!/bin/sh\n").unwrap();
        assert!(!is_static_elf(&text).unwrap());
        // /bin/sh on every Debian machine is dynamically linked.
        assert!(!is_static_elf(Path::new("/bin/sh")).unwrap());
    }
}
