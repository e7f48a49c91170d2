//! The container runtime seam: containerd, through containerd-client, in one namespace.
//!
//! containerd 1.6 has no server-side pull or import, so images are written to its content
//! store blob by blob and unpacked layer by layer through its diff and snapshot services, with
//! the garbage-collection labels `ctr` would set. Everything a task creates (snapshot,
//! container, shim task) carries the task id as its key, so it can be found and cleaned up
//! after a restart.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use berth_model::image_ref::ImageRef;
use containerd_client::services::v1 as ctd;
use containerd_client::services::v1::snapshots as snap;
use containerd_client::types::{Descriptor, Mount};
use prost_types::Any;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tracing::{debug, info};

/// The snapshotter used for images and containers.
pub const SNAPSHOTTER: &str = "overlayfs";
/// The runtime shim.
pub const RUNTIME: &str = "io.containerd.runc.v2";
/// Label carrying a container's Berth task id.
pub const LABEL_TASK: &str = "berth.task-id";
/// Label carrying a container's Berth job id.
pub const LABEL_JOB: &str = "berth.job-id";

const SPEC_TYPE: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
pub(crate) const MAX_JSON: u64 = 4 << 20;
const MAX_LAYERS: usize = 128;
pub(crate) const MAX_BLOB: u64 = 2 << 30;
const CHUNK: usize = 1 << 20;
const PULL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// A failure talking to containerd or in an image.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The socket could not be reached.
    #[error("cannot connect to containerd at {path}: {reason}")]
    Connect {
        /// Socket path.
        path: String,
        /// Why.
        reason: String,
    },
    /// The image is not in containerd, and the registry does not have it either.
    #[error("image {0} not found")]
    ImageNotFound(String),
    /// The image's reference or content is invalid.
    #[error("image {image}: {reason}")]
    BadImage {
        /// The image.
        image: String,
        /// What is wrong.
        reason: String,
    },
    /// The registry could not be reached or refused the pull.
    #[error("cannot pull {image}: {reason}")]
    Pull {
        /// The image.
        image: String,
        /// Why.
        reason: String,
    },
    /// A containerd call failed.
    #[error("containerd {op} failed: {status}")]
    Call {
        /// The call.
        op: &'static str,
        /// containerd's answer.
        status: tonic::Status,
    },
    /// A local file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

fn call(op: &'static str) -> impl FnOnce(tonic::Status) -> RuntimeError {
    move |status| RuntimeError::Call { op, status }
}

/// What a task needs from its image.
#[derive(Debug, Clone, Default)]
pub struct ImageInfo {
    /// Normalised reference.
    pub name: String,
    /// Snapshot key of the top layer, the parent of container snapshots.
    pub chain_id: String,
    /// `Env` from the image config.
    pub env: Vec<String>,
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
    /// `WorkingDir`.
    pub working_dir: String,
}

#[derive(Deserialize)]
struct OciDescriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: i64,
    #[serde(default)]
    platform: Option<OciPlatform>,
    #[serde(default)]
    annotations: HashMap<String, String>,
}

#[derive(Deserialize)]
struct OciPlatform {
    architecture: String,
    os: String,
}

#[derive(Deserialize)]
struct OciIndex {
    manifests: Vec<OciDescriptor>,
}

#[derive(Deserialize)]
struct OciManifest {
    config: OciDescriptor,
    layers: Vec<OciDescriptor>,
}

#[derive(Deserialize, Default)]
struct OciImageConfig {
    #[serde(default)]
    config: Option<OciExecConfig>,
    rootfs: OciRootfs,
}

#[derive(Deserialize, Default)]
struct OciExecConfig {
    #[serde(rename = "Env", default)]
    env: Option<Vec<String>>,
    #[serde(rename = "Entrypoint", default)]
    entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    cmd: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    working_dir: Option<String>,
}

#[derive(Deserialize, Default)]
struct OciRootfs {
    diff_ids: Vec<String>,
}

pub(crate) fn is_index(media_type: &str) -> bool {
    media_type == "application/vnd.oci.image.index.v1+json"
        || media_type == "application/vnd.docker.distribution.manifest.list.v2+json"
}

fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn valid_digest(d: &str) -> bool {
    d.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A running task's state as containerd sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskStatus {
    /// No shim task for the container.
    Missing,
    /// Created but not started.
    Created,
    /// Running (or paused).
    Running,
    /// Exited with this status.
    Stopped(u32),
}

/// A containerd connection bound to one namespace.
#[derive(Clone)]
pub struct Containerd {
    channel: Channel,
    namespace: MetadataValue<tonic::metadata::Ascii>,
    /// One lock per image, so that concurrent tasks unpack an image once.
    unpack_locks: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

impl Containerd {
    /// Connects to the socket; the namespace must be a valid containerd namespace.
    pub async fn connect(socket: &Path, namespace: &str) -> Result<Containerd, RuntimeError> {
        let err = |reason: String| RuntimeError::Connect {
            path: socket.display().to_string(),
            reason,
        };
        if namespace.is_empty()
            || !namespace
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(err(format!("invalid namespace `{namespace}`")));
        }
        let channel = containerd_client::connect(socket)
            .await
            .map_err(|e| err(e.to_string()))?;
        let namespace = namespace
            .parse()
            .map_err(|_| err(format!("invalid namespace `{namespace}`")))?;
        let c = Containerd {
            channel,
            namespace,
            unpack_locks: Arc::default(),
        };
        ctd::version_client::VersionClient::new(c.channel.clone())
            .version(())
            .await
            .map_err(|e| err(e.to_string()))?;
        Ok(c)
    }

    fn req<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.metadata_mut()
            .insert("containerd-namespace", self.namespace.clone());
        r
    }

    fn leased<T>(&self, msg: T, lease: &str) -> tonic::Request<T> {
        let mut r = self.req(msg);
        if let Ok(v) = lease.parse() {
            r.metadata_mut().insert("containerd-lease", v);
        }
        r
    }

    fn content(&self) -> ctd::content_client::ContentClient<Channel> {
        ctd::content_client::ContentClient::new(self.channel.clone())
    }

    fn snapshots(&self) -> snap::snapshots_client::SnapshotsClient<Channel> {
        snap::snapshots_client::SnapshotsClient::new(self.channel.clone())
    }

    fn images(&self) -> ctd::images_client::ImagesClient<Channel> {
        ctd::images_client::ImagesClient::new(self.channel.clone())
    }

    fn containers(&self) -> ctd::containers_client::ContainersClient<Channel> {
        ctd::containers_client::ContainersClient::new(self.channel.clone())
    }

    fn tasks(&self) -> ctd::tasks_client::TasksClient<Channel> {
        ctd::tasks_client::TasksClient::new(self.channel.clone())
    }

    /// The raw channel, for the events subscription.
    pub fn events(&self) -> ctd::events_client::EventsClient<Channel> {
        ctd::events_client::EventsClient::new(self.channel.clone())
    }

    /// The namespace's filter for event subscriptions.
    pub fn namespace(&self) -> &str {
        self.namespace.to_str().unwrap_or_default()
    }

    /// A lease that keeps what it covers from garbage collection until it is deleted.
    pub(crate) async fn lease(&self) -> Result<String, RuntimeError> {
        let id = format!("berth-{}", uuid_like());
        let mut labels = HashMap::new();
        // Expire on its own if we die before deleting it.
        labels.insert(
            "containerd.io/gc.expire".to_string(),
            rfc3339_in(std::time::Duration::from_secs(3600)),
        );
        ctd::leases_client::LeasesClient::new(self.channel.clone())
            .create(self.req(ctd::CreateRequest {
                id: id.clone(),
                labels,
            }))
            .await
            .map_err(call("leases.create"))?;
        Ok(id)
    }

    pub(crate) async fn drop_lease(&self, id: &str) {
        let r = ctd::leases_client::LeasesClient::new(self.channel.clone())
            .delete(self.req(ctd::DeleteRequest {
                id: id.to_string(),
                sync: false,
            }))
            .await;
        if let Err(e) = r {
            debug!(lease = id, error = %e, "Lease not deleted; it expires by itself.");
        }
    }

    pub(crate) async fn read_blob(&self, digest: &str, max: u64) -> Result<Vec<u8>, RuntimeError> {
        let info = self
            .content()
            .info(self.req(ctd::InfoRequest {
                digest: digest.to_string(),
            }))
            .await
            .map_err(call("content.info"))?
            .into_inner()
            .info
            .unwrap_or_default();
        if info.size < 0 || info.size as u64 > max {
            return Err(RuntimeError::BadImage {
                image: digest.to_string(),
                reason: format!("blob is {} bytes, more than the {max} allowed", info.size),
            });
        }
        let mut stream = self
            .content()
            .read(self.req(ctd::ReadContentRequest {
                digest: digest.to_string(),
                offset: 0,
                size: 0,
            }))
            .await
            .map_err(call("content.read"))?
            .into_inner();
        let mut out = Vec::with_capacity(info.size as usize);
        while let Some(chunk) = stream.message().await.map_err(call("content.read"))? {
            out.extend_from_slice(&chunk.data);
            if out.len() as u64 > max {
                return Err(RuntimeError::BadImage {
                    image: digest.to_string(),
                    reason: "blob larger than announced".into(),
                });
            }
        }
        Ok(out)
    }

    async fn read_json<T: for<'de> Deserialize<'de>>(
        &self,
        image: &str,
        digest: &str,
    ) -> Result<T, RuntimeError> {
        let bytes = self.read_blob(digest, MAX_JSON).await?;
        serde_json::from_slice(&bytes).map_err(|e| RuntimeError::BadImage {
            image: image.to_string(),
            reason: format!("{digest} is not valid JSON of the expected shape: {e}"),
        })
    }

    pub(crate) async fn has_blob(&self, digest: &str) -> Result<bool, RuntimeError> {
        match self
            .content()
            .info(self.req(ctd::InfoRequest {
                digest: digest.to_string(),
            }))
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(call("content.info")(s)),
        }
    }

    /// Writes one blob to the content store; containerd verifies the digest.
    pub(crate) async fn write_blob(
        &self,
        digest: &str,
        data: Vec<u8>,
        lease: &str,
    ) -> Result<(), RuntimeError> {
        if self.has_blob(digest).await? {
            return Ok(());
        }
        let total = data.len() as i64;
        let reference = format!("berth-write-{digest}");
        let mut reqs = Vec::new();
        for (i, chunk) in data.chunks(CHUNK).enumerate() {
            reqs.push(ctd::WriteContentRequest {
                action: ctd::WriteAction::Write as i32,
                r#ref: reference.clone(),
                total,
                expected: digest.to_string(),
                offset: (i * CHUNK) as i64,
                data: chunk.to_vec(),
                labels: HashMap::new(),
            });
        }
        reqs.push(ctd::WriteContentRequest {
            action: ctd::WriteAction::Commit as i32,
            r#ref: reference,
            total,
            expected: digest.to_string(),
            offset: total,
            data: Vec::new(),
            labels: HashMap::new(),
        });
        let mut req = self.leased(tokio_stream::iter(reqs), lease);
        req.metadata_mut()
            .insert("containerd-namespace", self.namespace.clone());
        match self.content().write(req).await {
            Ok(resp) => {
                let mut stream = resp.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(s) if s.code() == Code::AlreadyExists => break,
                        Err(s) => return Err(call("content.write")(s)),
                    }
                }
                Ok(())
            }
            Err(s) if s.code() == Code::AlreadyExists => Ok(()),
            Err(s) => Err(call("content.write")(s)),
        }
    }

    async fn set_labels(
        &self,
        digest: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), RuntimeError> {
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        self.content()
            .update(self.req(ctd::UpdateRequest {
                info: Some(ctd::Info {
                    digest: digest.to_string(),
                    labels,
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask { paths }),
            }))
            .await
            .map_err(call("content.update"))?;
        Ok(())
    }

    async fn snapshot_exists(&self, key: &str) -> Result<bool, RuntimeError> {
        match self
            .snapshots()
            .stat(self.req(snap::StatSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: key.to_string(),
            }))
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(call("snapshots.stat")(s)),
        }
    }

    /// Finds the image, picks this platform's manifest and unpacks its layers if needed.
    pub async fn resolve_image(&self, reference: &str) -> Result<ImageInfo, RuntimeError> {
        let name = ImageRef::parse(reference)
            .map_err(|reason| RuntimeError::BadImage {
                image: reference.to_string(),
                reason,
            })?
            .to_string();
        // One pull and one unpack per image at a time; later callers find it done.
        let lock = {
            let mut locks = self.unpack_locks.lock().unwrap_or_else(|p| p.into_inner());
            locks.entry(name.clone()).or_default().clone()
        };
        let _guard = lock.lock().await;
        let image = match self.get_image(&name).await? {
            Some(image) => image,
            None => {
                tokio::time::timeout(PULL_TIMEOUT, self.pull(&name))
                    .await
                    .map_err(|_| RuntimeError::Pull {
                        image: name.clone(),
                        reason: format!("no progress within {}s", PULL_TIMEOUT.as_secs()),
                    })??;
                self.get_image(&name)
                    .await?
                    .ok_or_else(|| RuntimeError::ImageNotFound(name.clone()))?
            }
        };
        let target = image.target.ok_or_else(|| RuntimeError::BadImage {
            image: name.clone(),
            reason: "image record has no target".into(),
        })?;
        let manifest_digest = self
            .pick_manifest(&name, &target.media_type, &target.digest)
            .await?;
        let manifest: OciManifest = self.read_json(&name, &manifest_digest).await?;
        let config: OciImageConfig = self.read_json(&name, &manifest.config.digest).await?;
        let chain_id = self.unpack(&name, &manifest, &config).await?;
        let exec = config.config.unwrap_or_default();
        Ok(ImageInfo {
            name,
            chain_id,
            env: exec.env.unwrap_or_default(),
            entrypoint: exec.entrypoint.unwrap_or_default(),
            cmd: exec.cmd.unwrap_or_default(),
            working_dir: exec.working_dir.unwrap_or_default(),
        })
    }

    async fn get_image(&self, name: &str) -> Result<Option<ctd::Image>, RuntimeError> {
        match self
            .images()
            .get(self.req(ctd::GetImageRequest {
                name: name.to_string(),
            }))
            .await
        {
            Ok(r) => Ok(r.into_inner().image),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(call("images.get")(s)),
        }
    }

    pub(crate) async fn pick_manifest(
        &self,
        name: &str,
        media_type: &str,
        digest: &str,
    ) -> Result<String, RuntimeError> {
        if !is_index(media_type) {
            return Ok(digest.to_string());
        }
        let index: OciIndex = self.read_json(name, digest).await?;
        index
            .manifests
            .into_iter()
            .find(|m| {
                m.platform
                    .as_ref()
                    .is_none_or(|p| p.os == "linux" && p.architecture == go_arch())
            })
            .map(|m| m.digest)
            .ok_or_else(|| RuntimeError::BadImage {
                image: name.to_string(),
                reason: format!("no manifest for linux/{}", go_arch()),
            })
    }

    async fn unpack(
        &self,
        name: &str,
        m: &OciManifest,
        config: &OciImageConfig,
    ) -> Result<String, RuntimeError> {
        let bad = |reason: String| RuntimeError::BadImage {
            image: name.to_string(),
            reason,
        };
        let diff_ids = &config.rootfs.diff_ids;
        if m.layers.is_empty() || m.layers.len() != diff_ids.len() {
            return Err(bad(format!(
                "{} layers but {} diff_ids",
                m.layers.len(),
                diff_ids.len()
            )));
        }
        if m.layers.len() > MAX_LAYERS {
            return Err(bad(format!("more than {MAX_LAYERS} layers")));
        }
        let mut chain = String::new();
        let mut parent = String::new();
        let mut lease: Option<String> = None;
        let result = async {
            for (layer, diff_id) in m.layers.iter().zip(diff_ids) {
                if !valid_digest(diff_id) || !valid_digest(&layer.digest) {
                    return Err(bad(format!("invalid digest {diff_id} / {}", layer.digest)));
                }
                chain = if parent.is_empty() {
                    diff_id.clone()
                } else {
                    format!(
                        "sha256:{}",
                        hex::encode(Sha256::digest(format!("{parent} {diff_id}")))
                    )
                };
                if self.snapshot_exists(&chain).await? {
                    parent = chain.clone();
                    continue;
                }
                let l = match &lease {
                    Some(l) => l.clone(),
                    None => {
                        let l = self.lease().await?;
                        lease = Some(l.clone());
                        l
                    }
                };
                let key = format!("berth-extract-{}-{chain}", uuid_like());
                let mounts = self
                    .snapshots()
                    .prepare(self.leased(
                        snap::PrepareSnapshotRequest {
                            snapshotter: SNAPSHOTTER.into(),
                            key: key.clone(),
                            parent: parent.clone(),
                            labels: HashMap::new(),
                        },
                        &l,
                    ))
                    .await
                    .map_err(call("snapshots.prepare"))?
                    .into_inner()
                    .mounts;
                let applied = ctd::diff_client::DiffClient::new(self.channel.clone())
                    .apply(self.leased(
                        ctd::ApplyRequest {
                            diff: Some(Descriptor {
                                media_type: layer.media_type.clone(),
                                digest: layer.digest.clone(),
                                size: layer.size,
                                annotations: HashMap::new(),
                            }),
                            mounts,
                            payloads: HashMap::new(),
                            sync_fs: false,
                        },
                        &l,
                    ))
                    .await
                    .map_err(call("diff.apply"))?
                    .into_inner()
                    .applied
                    .unwrap_or_default();
                if &applied.digest != diff_id {
                    let _ = self.remove_snapshot(&key).await;
                    return Err(bad(format!(
                        "layer {} unpacks to {}, but the config says {diff_id}",
                        layer.digest, applied.digest
                    )));
                }
                match self
                    .snapshots()
                    .commit(self.leased(
                        snap::CommitSnapshotRequest {
                            snapshotter: SNAPSHOTTER.into(),
                            name: chain.clone(),
                            key: key.clone(),
                            labels: HashMap::new(),
                        },
                        &l,
                    ))
                    .await
                {
                    Ok(_) => {}
                    Err(s) if s.code() == Code::AlreadyExists => {
                        let _ = self.remove_snapshot(&key).await;
                    }
                    Err(s) => return Err(call("snapshots.commit")(s)),
                }
                debug!(image = name, layer = %layer.digest, "Layer unpacked.");
                parent = chain.clone();
            }
            // The config now references the unpacked top layer, as `ctr` records it.
            let mut labels = HashMap::new();
            labels.insert(
                format!("containerd.io/gc.ref.snapshot.{SNAPSHOTTER}"),
                chain.clone(),
            );
            self.set_labels(&m.config.digest, labels).await?;
            Ok(chain.clone())
        }
        .await;
        if let Some(l) = lease {
            self.drop_lease(&l).await;
        }
        result
    }

    /// Imports an OCI image archive (as written by `skopeo copy oci-archive:` or
    /// `scripts/build-test-image.sh`); returns the names of the images it held.
    pub async fn import_archive(&self, path: &Path) -> Result<Vec<String>, RuntimeError> {
        let io = |source| RuntimeError::Io {
            path: path.display().to_string(),
            source,
        };
        let bad = |reason: String| RuntimeError::BadImage {
            image: path.display().to_string(),
            reason,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let mut archive = tar::Archive::new(file);
        let mut index: Option<Vec<u8>> = None;
        let lease = self.lease().await?;
        let result = async {
            for entry in archive.entries().map_err(io)? {
                let mut entry = entry.map_err(io)?;
                if !entry.header().entry_type().is_file() {
                    continue;
                }
                let entry_path = entry.path().map_err(io)?.to_string_lossy().into_owned();
                let entry_path = entry_path.trim_start_matches("./").to_string();
                let size = entry.header().size().map_err(io)?;
                if entry_path == "index.json" {
                    if size > MAX_JSON {
                        return Err(bad("index.json is too large".into()));
                    }
                    let mut buf = Vec::new();
                    std::io::Read::read_to_end(&mut entry, &mut buf).map_err(io)?;
                    index = Some(buf);
                } else if let Some(hex) = entry_path.strip_prefix("blobs/sha256/") {
                    let digest = format!("sha256:{hex}");
                    if !valid_digest(&digest) {
                        return Err(bad(format!("{entry_path} is not a sha256 blob name")));
                    }
                    if size > MAX_BLOB {
                        return Err(bad(format!("{entry_path} is larger than {MAX_BLOB} bytes")));
                    }
                    let mut buf = Vec::with_capacity(size as usize);
                    std::io::Read::read_to_end(&mut entry, &mut buf).map_err(io)?;
                    self.write_blob(&digest, buf, &lease).await?;
                }
            }
            let index =
                index.ok_or_else(|| bad("no index.json: not an OCI image archive".into()))?;
            let index: OciIndex =
                serde_json::from_slice(&index).map_err(|e| bad(format!("index.json: {e}")))?;
            let mut names = Vec::new();
            for m in index.manifests {
                let raw = m
                    .annotations
                    .get("io.containerd.image.name")
                    .or_else(|| m.annotations.get("org.opencontainers.image.ref.name"));
                let Some(name) = raw
                    .and_then(|n| ImageRef::parse(n).ok())
                    .map(|r| r.to_string())
                else {
                    debug!(digest = %m.digest, "Manifest without a usable name skipped.");
                    continue;
                };
                self.record_image(&name, &m.media_type, &m.digest, m.size, &lease)
                    .await?;
                self.resolve_image(&name).await?;
                info!(image = %name, digest = %m.digest, "Image imported.");
                names.push(name);
            }
            Ok(names)
        }
        .await;
        self.drop_lease(&lease).await;
        result
    }

    /// Creates or updates the image record pointing at `digest`, labelling its manifests so
    /// that garbage collection keeps what they reference.
    pub(crate) async fn record_image(
        &self,
        name: &str,
        media_type: &str,
        digest: &str,
        size: i64,
        lease: &str,
    ) -> Result<(), RuntimeError> {
        self.label_manifest(name, media_type, digest).await?;
        let image = ctd::Image {
            name: name.to_string(),
            labels: HashMap::new(),
            target: Some(Descriptor {
                media_type: media_type.to_string(),
                digest: digest.to_string(),
                size,
                annotations: HashMap::new(),
            }),
            created_at: None,
            updated_at: None,
        };
        match self
            .images()
            .create(self.leased(
                ctd::CreateImageRequest {
                    image: Some(image.clone()),
                    source_date_epoch: None,
                },
                lease,
            ))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => {
                self.images()
                    .update(self.req(ctd::UpdateImageRequest {
                        image: Some(image),
                        update_mask: None,
                        source_date_epoch: None,
                    }))
                    .await
                    .map_err(call("images.update"))?;
                Ok(())
            }
            Err(s) => Err(call("images.create")(s)),
        }
    }

    /// Labels a manifest (or index) so that GC keeps what it references.
    async fn label_manifest(
        &self,
        name: &str,
        media_type: &str,
        digest: &str,
    ) -> Result<(), RuntimeError> {
        let mut labels = HashMap::new();
        if is_index(media_type) {
            let index: OciIndex = self.read_json(name, digest).await?;
            for (i, m) in index.manifests.iter().enumerate() {
                labels.insert(
                    format!("containerd.io/gc.ref.content.m.{i}"),
                    m.digest.clone(),
                );
                if self.has_blob(&m.digest).await? {
                    Box::pin(self.label_manifest(name, &m.media_type, &m.digest)).await?;
                }
            }
        } else {
            let m: OciManifest = self.read_json(name, digest).await?;
            labels.insert(
                "containerd.io/gc.ref.content.config".into(),
                m.config.digest.clone(),
            );
            for (i, l) in m.layers.iter().enumerate() {
                labels.insert(
                    format!("containerd.io/gc.ref.content.l.{i}"),
                    l.digest.clone(),
                );
            }
        }
        self.set_labels(digest, labels).await
    }

    /// Creates the task's snapshot, container and shim task, then starts it; returns the pid.
    pub async fn create_and_start(
        &self,
        id: &str,
        image: &ImageInfo,
        spec: &oci_spec::runtime::Spec,
        labels: HashMap<String, String>,
        log_path: &Path,
    ) -> Result<u32, RuntimeError> {
        let lease = self.lease().await?;
        let result = async {
            let mounts = match self
                .snapshots()
                .prepare(self.leased(
                    snap::PrepareSnapshotRequest {
                        snapshotter: SNAPSHOTTER.into(),
                        key: id.to_string(),
                        parent: image.chain_id.clone(),
                        labels: HashMap::new(),
                    },
                    &lease,
                ))
                .await
            {
                Ok(r) => r.into_inner().mounts,
                Err(s) if s.code() == Code::AlreadyExists => self.mounts(id).await?,
                Err(s) => return Err(call("snapshots.prepare")(s)),
            };
            let spec_json = serde_json::to_vec(spec).map_err(|e| RuntimeError::BadImage {
                image: image.name.clone(),
                reason: format!("cannot encode runtime spec: {e}"),
            })?;
            let container = ctd::Container {
                id: id.to_string(),
                labels,
                image: image.name.clone(),
                runtime: Some(ctd::container::Runtime {
                    name: RUNTIME.into(),
                    options: None,
                }),
                spec: Some(Any {
                    type_url: SPEC_TYPE.into(),
                    value: spec_json,
                }),
                snapshotter: SNAPSHOTTER.into(),
                snapshot_key: id.to_string(),
                ..Default::default()
            };
            match self
                .containers()
                .create(self.leased(
                    ctd::CreateContainerRequest {
                        container: Some(container),
                    },
                    &lease,
                ))
                .await
            {
                Ok(_) => {}
                Err(s) if s.code() == Code::AlreadyExists => {}
                Err(s) => return Err(call("containers.create")(s)),
            }
            self.start_task(id, mounts, log_path).await
        }
        .await;
        self.drop_lease(&lease).await;
        result
    }

    async fn start_task(
        &self,
        id: &str,
        rootfs: Vec<Mount>,
        log_path: &Path,
    ) -> Result<u32, RuntimeError> {
        // The shim appends both streams to this file itself, so output keeps flowing while
        // the agent is down.
        let uri = format!("file://{}", log_path.display());
        self.tasks()
            .create(self.req(ctd::CreateTaskRequest {
                container_id: id.to_string(),
                rootfs,
                stdin: String::new(),
                stdout: uri.clone(),
                stderr: uri,
                terminal: false,
                ..Default::default()
            }))
            .await
            .map_err(call("tasks.create"))?;
        let pid = self
            .tasks()
            .start(self.req(ctd::StartRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
            }))
            .await
            .map_err(call("tasks.start"))?
            .into_inner()
            .pid;
        Ok(pid)
    }

    async fn mounts(&self, key: &str) -> Result<Vec<Mount>, RuntimeError> {
        Ok(self
            .snapshots()
            .mounts(self.req(snap::MountsRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: key.to_string(),
            }))
            .await
            .map_err(call("snapshots.mounts"))?
            .into_inner()
            .mounts)
    }

    /// Sends a signal to the task's processes.
    pub async fn kill(&self, id: &str, signal: u32) -> Result<(), RuntimeError> {
        match self
            .tasks()
            .kill(self.req(ctd::KillRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
                signal,
                all: true,
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(call("tasks.kill")(s)),
        }
    }

    /// The task's init process, or None when the container has no task.
    async fn process(
        &self,
        id: &str,
    ) -> Result<Option<containerd_client::types::v1::Process>, RuntimeError> {
        match self
            .tasks()
            .get(self.req(ctd::GetRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
            }))
            .await
        {
            Ok(r) => Ok(Some(r.into_inner().process.unwrap_or_default())),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(call("tasks.get")(s)),
        }
    }

    /// The task's state as containerd sees it.
    pub async fn status(&self, id: &str) -> Result<TaskStatus, RuntimeError> {
        use containerd_client::types::v1::Status as S;
        Ok(match self.process(id).await? {
            None => TaskStatus::Missing,
            Some(p) => match S::try_from(p.status).unwrap_or(S::Unknown) {
                S::Created => TaskStatus::Created,
                S::Stopped => TaskStatus::Stopped(p.exit_status),
                _ => TaskStatus::Running,
            },
        })
    }

    /// The pid of the task's init process (0 when it has none).
    pub async fn pid(&self, id: &str) -> Result<u32, RuntimeError> {
        Ok(self.process(id).await?.map_or(0, |p| p.pid))
    }

    /// Deletes the shim task, the container and its snapshot; returns the exit status if a
    /// task existed. Missing pieces are fine: this also finishes half-done cleanups.
    pub async fn remove(&self, id: &str) -> Result<Option<u32>, RuntimeError> {
        let exit = match self
            .tasks()
            .delete(self.req(ctd::DeleteTaskRequest {
                container_id: id.to_string(),
            }))
            .await
        {
            Ok(r) => Some(r.into_inner().exit_status),
            Err(s) if s.code() == Code::NotFound => None,
            Err(s) => return Err(call("tasks.delete")(s)),
        };
        match self
            .containers()
            .delete(self.req(ctd::DeleteContainerRequest { id: id.to_string() }))
            .await
        {
            Ok(_) => {}
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => return Err(call("containers.delete")(s)),
        }
        self.remove_snapshot(id).await?;
        Ok(exit)
    }

    async fn remove_snapshot(&self, key: &str) -> Result<(), RuntimeError> {
        match self
            .snapshots()
            .remove(self.req(snap::RemoveSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: key.to_string(),
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(call("snapshots.remove")(s)),
        }
    }

    /// Removes active snapshots that no container owns: what an agent killed between
    /// preparing a snapshot and creating its container, or in the middle of an unpack, left.
    /// Call only when nothing else is creating containers in the namespace.
    pub async fn remove_orphan_snapshots(&self) -> Result<Vec<String>, RuntimeError> {
        let owned: std::collections::HashSet<String> = self
            .berth_containers()
            .await?
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        let mut stream = self
            .snapshots()
            .list(self.req(snap::ListSnapshotsRequest {
                snapshotter: SNAPSHOTTER.into(),
                filters: vec![],
            }))
            .await
            .map_err(call("snapshots.list"))?
            .into_inner();
        let mut orphans = Vec::new();
        while let Some(page) = stream.message().await.map_err(call("snapshots.list"))? {
            for info in page.info {
                if info.kind == snap::Kind::Active as i32 && !owned.contains(&info.name) {
                    orphans.push(info.name);
                }
            }
        }
        for key in &orphans {
            self.remove_snapshot(key).await?;
        }
        Ok(orphans)
    }

    /// Containers Berth created in this namespace: (container id, labels).
    pub async fn berth_containers(
        &self,
    ) -> Result<Vec<(String, HashMap<String, String>)>, RuntimeError> {
        let list = self
            .containers()
            .list(self.req(ctd::ListContainersRequest {
                filters: vec![format!("labels.\"{LABEL_TASK}\"")],
            }))
            .await
            .map_err(call("containers.list"))?
            .into_inner()
            .containers;
        Ok(list.into_iter().map(|c| (c.id, c.labels)).collect())
    }
}

fn uuid_like() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// An RFC 3339 UTC timestamp `d` from now, for containerd's lease expiry label.
fn rfc3339_in(d: std::time::Duration) -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now() + d).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_shape() {
        let s = rfc3339_in(std::time::Duration::ZERO);
        assert_eq!(s.len(), 20, "{s}");
        assert!(s.starts_with("20") && s.ends_with('Z'), "{s}");
    }
}
