//! The container runtime as the agent sees it: the CRI calls it makes, behind a trait so that
//! pod sync runs against containerd (`CriClient`, gRPC over its unix socket) or the
//! in-process `FakeRuntime` in tests.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use corral_proto::cri;
use corral_proto::cri::image_service_client::ImageServiceClient;
use corral_proto::cri::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint};

/// What a runtime call can fail with, sorted by what the caller does about it.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    /// The runtime is not answering (socket gone, restarting): retry later.
    #[error("container runtime unavailable: {0}")]
    Unavailable(String),
    /// The sandbox, container or image does not exist (any more).
    #[error("not found: {0}")]
    NotFound(String),
    /// The runtime refused the request; its message is shown to the user.
    #[error("{0}")]
    Failed(String),
}

impl From<tonic::Status> for CriError {
    fn from(s: tonic::Status) -> Self {
        match s.code() {
            tonic::Code::Unavailable | tonic::Code::Cancelled => CriError::Unavailable(s.message().to_string()),
            tonic::Code::NotFound => CriError::NotFound(s.message().to_string()),
            _ => CriError::Failed(s.message().to_string()),
        }
    }
}

pub type CriResult<T> = Result<T, CriError>;

/// The output of a command run in a container to completion (exec probes).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit_code: i32,
}

/// The CRI calls the agent makes. Implementations must be safe to call concurrently.
pub trait Runtime: Send + Sync + 'static {
    /// Runtime name and version, as the Node's `containerRuntimeVersion` shows them.
    fn version(&self) -> impl Future<Output = CriResult<cri::VersionResponse>> + Send;
    fn run_pod_sandbox(&self, config: cri::PodSandboxConfig) -> impl Future<Output = CriResult<String>> + Send;
    fn stop_pod_sandbox(&self, id: &str) -> impl Future<Output = CriResult<()>> + Send;
    fn remove_pod_sandbox(&self, id: &str) -> impl Future<Output = CriResult<()>> + Send;
    fn pod_sandbox_status(&self, id: &str) -> impl Future<Output = CriResult<cri::PodSandboxStatus>> + Send;
    fn list_pod_sandboxes(&self) -> impl Future<Output = CriResult<Vec<cri::PodSandbox>>> + Send;
    fn create_container(
        &self,
        sandbox_id: &str,
        config: cri::ContainerConfig,
        sandbox: cri::PodSandboxConfig,
    ) -> impl Future<Output = CriResult<String>> + Send;
    fn start_container(&self, id: &str) -> impl Future<Output = CriResult<()>> + Send;
    /// Stops with SIGTERM (or the image's stop signal), then SIGKILL after `timeout`.
    fn stop_container(&self, id: &str, timeout: Duration) -> impl Future<Output = CriResult<()>> + Send;
    fn remove_container(&self, id: &str) -> impl Future<Output = CriResult<()>> + Send;
    /// Every container, of every sandbox.
    fn list_containers(&self) -> impl Future<Output = CriResult<Vec<cri::Container>>> + Send;
    fn container_status(&self, id: &str) -> impl Future<Output = CriResult<cri::ContainerStatus>> + Send;
    fn exec_sync(
        &self,
        id: &str,
        command: Vec<String>,
        timeout: Duration,
    ) -> impl Future<Output = CriResult<ExecOutput>> + Send;
    /// The URL of the runtime's streaming server for an exec, attach or port-forward.
    fn stream_url(&self, request: StreamRequest) -> impl Future<Output = CriResult<String>> + Send;
    /// The image's id when it is present on the node.
    fn image_status(&self, image: &str) -> impl Future<Output = CriResult<Option<cri::Image>>> + Send;
    /// Pulls the image; returns its reference (id).
    fn pull_image(&self, image: &str) -> impl Future<Output = CriResult<String>> + Send;
    fn list_images(&self) -> impl Future<Output = CriResult<Vec<cri::Image>>> + Send;
    fn remove_image(&self, image: &str) -> impl Future<Output = CriResult<()>> + Send;
    /// Where the runtime keeps its images (the filesystem image GC watches).
    fn image_fs_mountpoint(&self) -> impl Future<Output = CriResult<PathBuf>> + Send;
    /// Whether the runtime and its network are ready.
    fn status(&self) -> impl Future<Output = CriResult<cri::RuntimeStatus>> + Send;
    /// Resource usage of every container: cumulative CPU and the memory working set.
    fn list_container_stats(&self) -> impl Future<Output = CriResult<Vec<cri::ContainerStats>>> + Send;
}

/// What a streaming session is for.
#[derive(Clone, Debug)]
pub enum StreamRequest {
    Exec(cri::ExecRequest),
    Attach(cri::AttachRequest),
    PortForward(cri::PortForwardRequest),
}

/// containerd's CRI plugin over its unix socket.
#[derive(Clone)]
pub struct CriClient {
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    socket: PathBuf,
}

impl CriClient {
    /// A client of the runtime at `socket`. Connects lazily: a runtime that starts later (or
    /// restarts) is reached on the next call.
    pub fn new(socket: &Path) -> CriResult<Self> {
        let path = socket.to_path_buf();
        // The URI is required by tonic but unused: every connection goes to the socket.
        let channel = Endpoint::try_from("http://[::1]:1")
            .map_err(|e| CriError::Failed(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .connect_with_connector_lazy(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            }));
        // Container logs and image lists can be large.
        const MAX: usize = 16 << 20;
        Ok(Self {
            runtime: RuntimeServiceClient::new(channel.clone()).max_decoding_message_size(MAX),
            images: ImageServiceClient::new(channel).max_decoding_message_size(MAX),
            socket: socket.to_path_buf(),
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

fn image_spec(image: &str) -> cri::ImageSpec {
    cri::ImageSpec { image: image.to_string(), ..Default::default() }
}

impl Runtime for CriClient {
    async fn version(&self) -> CriResult<cri::VersionResponse> {
        let req = cri::VersionRequest { version: "v1".into() };
        Ok(self.runtime.clone().version(req).await?.into_inner())
    }

    async fn run_pod_sandbox(&self, config: cri::PodSandboxConfig) -> CriResult<String> {
        let req = cri::RunPodSandboxRequest { config: Some(config), ..Default::default() };
        Ok(self.runtime.clone().run_pod_sandbox(req).await?.into_inner().pod_sandbox_id)
    }

    async fn stop_pod_sandbox(&self, id: &str) -> CriResult<()> {
        let req = cri::StopPodSandboxRequest { pod_sandbox_id: id.into() };
        self.runtime.clone().stop_pod_sandbox(req).await?;
        Ok(())
    }

    async fn remove_pod_sandbox(&self, id: &str) -> CriResult<()> {
        let req = cri::RemovePodSandboxRequest { pod_sandbox_id: id.into() };
        self.runtime.clone().remove_pod_sandbox(req).await?;
        Ok(())
    }

    async fn pod_sandbox_status(&self, id: &str) -> CriResult<cri::PodSandboxStatus> {
        let req = cri::PodSandboxStatusRequest { pod_sandbox_id: id.into(), verbose: false };
        let resp = self.runtime.clone().pod_sandbox_status(req).await?.into_inner();
        resp.status.ok_or_else(|| CriError::NotFound(format!("sandbox {id}")))
    }

    async fn list_pod_sandboxes(&self) -> CriResult<Vec<cri::PodSandbox>> {
        let req = cri::ListPodSandboxRequest::default();
        Ok(self.runtime.clone().list_pod_sandbox(req).await?.into_inner().items)
    }

    async fn create_container(
        &self,
        sandbox_id: &str,
        config: cri::ContainerConfig,
        sandbox: cri::PodSandboxConfig,
    ) -> CriResult<String> {
        let req = cri::CreateContainerRequest {
            pod_sandbox_id: sandbox_id.into(),
            config: Some(config),
            sandbox_config: Some(sandbox),
        };
        Ok(self.runtime.clone().create_container(req).await?.into_inner().container_id)
    }

    async fn start_container(&self, id: &str) -> CriResult<()> {
        let req = cri::StartContainerRequest { container_id: id.into() };
        self.runtime.clone().start_container(req).await?;
        Ok(())
    }

    async fn stop_container(&self, id: &str, timeout: Duration) -> CriResult<()> {
        let req = cri::StopContainerRequest { container_id: id.into(), timeout: timeout.as_secs() as i64 };
        self.runtime.clone().stop_container(req).await?;
        Ok(())
    }

    async fn remove_container(&self, id: &str) -> CriResult<()> {
        let req = cri::RemoveContainerRequest { container_id: id.into() };
        self.runtime.clone().remove_container(req).await?;
        Ok(())
    }

    async fn list_containers(&self) -> CriResult<Vec<cri::Container>> {
        let req = cri::ListContainersRequest::default();
        Ok(self.runtime.clone().list_containers(req).await?.into_inner().containers)
    }

    async fn list_container_stats(&self) -> CriResult<Vec<cri::ContainerStats>> {
        let req = cri::ListContainerStatsRequest::default();
        Ok(self.runtime.clone().list_container_stats(req).await?.into_inner().stats)
    }

    async fn container_status(&self, id: &str) -> CriResult<cri::ContainerStatus> {
        let req = cri::ContainerStatusRequest { container_id: id.into(), verbose: false };
        let resp = self.runtime.clone().container_status(req).await?.into_inner();
        resp.status.ok_or_else(|| CriError::NotFound(format!("container {id}")))
    }

    async fn exec_sync(&self, id: &str, command: Vec<String>, timeout: Duration) -> CriResult<ExecOutput> {
        let req = cri::ExecSyncRequest { container_id: id.into(), cmd: command, timeout: timeout.as_secs() as i64 };
        let resp = self.runtime.clone().exec_sync(req).await?.into_inner();
        Ok(ExecOutput { stdout: resp.stdout, stderr: resp.stderr, exit_code: resp.exit_code })
    }

    async fn stream_url(&self, request: StreamRequest) -> CriResult<String> {
        let mut rt = self.runtime.clone();
        Ok(match request {
            StreamRequest::Exec(r) => rt.exec(r).await?.into_inner().url,
            StreamRequest::Attach(r) => rt.attach(r).await?.into_inner().url,
            StreamRequest::PortForward(r) => rt.port_forward(r).await?.into_inner().url,
        })
    }

    async fn image_status(&self, image: &str) -> CriResult<Option<cri::Image>> {
        let req = cri::ImageStatusRequest { image: Some(image_spec(image)), verbose: false };
        Ok(self.images.clone().image_status(req).await?.into_inner().image)
    }

    async fn pull_image(&self, image: &str) -> CriResult<String> {
        let req = cri::PullImageRequest { image: Some(image_spec(image)), ..Default::default() };
        Ok(self.images.clone().pull_image(req).await?.into_inner().image_ref)
    }

    async fn list_images(&self) -> CriResult<Vec<cri::Image>> {
        let req = cri::ListImagesRequest::default();
        Ok(self.images.clone().list_images(req).await?.into_inner().images)
    }

    async fn remove_image(&self, image: &str) -> CriResult<()> {
        let req = cri::RemoveImageRequest { image: Some(image_spec(image)) };
        self.images.clone().remove_image(req).await?;
        Ok(())
    }

    async fn image_fs_mountpoint(&self) -> CriResult<PathBuf> {
        let resp = self.images.clone().image_fs_info(cri::ImageFsInfoRequest {}).await?.into_inner();
        let fs = resp.image_filesystems.into_iter().find_map(|f| f.fs_id).map(|id| id.mountpoint);
        fs.filter(|m| !m.is_empty())
            .map(PathBuf::from)
            .ok_or_else(|| CriError::Failed("the runtime names no image filesystem".into()))
    }

    async fn status(&self) -> CriResult<cri::RuntimeStatus> {
        let req = cri::StatusRequest { verbose: false };
        let resp = self.runtime.clone().status(req).await?.into_inner();
        resp.status.ok_or_else(|| CriError::Failed("the runtime reported no status".into()))
    }
}
