//! Pulls an image from an OCI registry into containerd.
//!
//! containerd 1.6 has no server-side pull, so the agent speaks the distribution protocol
//! (oci-client), writes every blob to containerd's content store (which verifies digests),
//! records the image, and unpacks it through the diff and snapshot services like an import.
//! Registries on loopback are spoken to over plain HTTP; all others over HTTPS.

use std::net::IpAddr;

use futures::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::{
    IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE,
    OCI_IMAGE_MEDIA_TYPE,
};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::Deserialize;
use tracing::info;

use crate::runtime::{Containerd, MAX_BLOB, MAX_JSON, RuntimeError, is_index};

const ACCEPT: [&str; 4] = [
    OCI_IMAGE_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE,
];

#[derive(Deserialize)]
struct MediaType {
    #[serde(rename = "mediaType", default)]
    media_type: String,
}

#[derive(Deserialize)]
struct Blob {
    digest: String,
    size: i64,
}

#[derive(Deserialize)]
struct Manifest {
    config: Blob,
    layers: Vec<Blob>,
}

/// Whether `registry` (`host[:port]`) is on this machine, and so spoken to over HTTP.
pub fn is_loopback(registry: &str) -> bool {
    let host = match registry.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => registry,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl Containerd {
    /// Pulls `name` (a normalised reference) into the content store and records the image.
    pub(crate) async fn pull(&self, name: &str) -> Result<(), RuntimeError> {
        let bad = |reason: String| RuntimeError::BadImage {
            image: name.to_string(),
            reason,
        };
        let pull_err = |e: oci_client::errors::OciDistributionError| RuntimeError::Pull {
            image: name.to_string(),
            reason: e.to_string(),
        };
        let reference: Reference = name.parse().map_err(|e| bad(format!("{e}")))?;
        let protocol = if is_loopback(reference.registry()) {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        };
        // reqwest's rustls is built without a default provider; ring is ours. A second install
        // is refused harmlessly.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = Client::new(ClientConfig {
            protocol,
            ..Default::default()
        });
        let auth = RegistryAuth::Anonymous;
        let (top, top_digest) = client
            .pull_manifest_raw(&reference, &auth, &ACCEPT)
            .await
            .map_err(pull_err)?;
        if top.len() as u64 > MAX_JSON {
            return Err(bad("manifest too large".into()));
        }
        let top_type = serde_json::from_slice::<MediaType>(&top)
            .map_err(|e| bad(format!("manifest: {e}")))?
            .media_type;
        let lease = self.lease().await?;
        let result = async {
            let manifest_digest = if is_index(&top_type) {
                self.write_blob(&top_digest, top.to_vec(), &lease).await?;
                let digest = self.pick_manifest(name, &top_type, &top_digest).await?;
                let by_digest = reference.clone_with_digest(digest.clone());
                let (m, _) = client
                    .pull_manifest_raw(&by_digest, &auth, &ACCEPT)
                    .await
                    .map_err(pull_err)?;
                self.write_blob(&digest, m.to_vec(), &lease).await?;
                digest
            } else {
                self.write_blob(&top_digest, top.to_vec(), &lease).await?;
                top_digest.clone()
            };
            let raw = self.read_blob(&manifest_digest, MAX_JSON).await?;
            let m: Manifest =
                serde_json::from_slice(&raw).map_err(|e| bad(format!("manifest: {e}")))?;
            for blob in std::iter::once(&m.config).chain(&m.layers) {
                if blob.size < 0 || blob.size as u64 > MAX_BLOB {
                    return Err(bad(format!("blob {} has size {}", blob.digest, blob.size)));
                }
                if self.has_blob(&blob.digest).await? {
                    continue;
                }
                let mut stream = client
                    .pull_blob_stream(&reference, blob.digest.as_str())
                    .await
                    .map_err(pull_err)?;
                let mut data = Vec::with_capacity(blob.size as usize);
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(|e| bad(format!("blob {}: {e}", blob.digest)))?;
                    if (data.len() + chunk.len()) as i64 > blob.size {
                        return Err(bad(format!(
                            "blob {} is larger than its manifest says",
                            blob.digest
                        )));
                    }
                    data.extend_from_slice(&chunk);
                }
                self.write_blob(&blob.digest, data, &lease).await?;
            }
            self.record_image(name, &top_type, &top_digest, top.len() as i64, &lease)
                .await?;
            info!(image = name, digest = %top_digest, "Image pulled.");
            Ok(())
        }
        .await;
        self.drop_lease(&lease).await;
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries() {
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("localhost:5000"));
        assert!(is_loopback("localhost"));
        assert!(is_loopback("[::1]:5000"));
        assert!(!is_loopback("docker.io"));
        assert!(!is_loopback("10.0.0.1:5000"));
        assert!(!is_loopback("registry.example.com:443"));
    }
}
