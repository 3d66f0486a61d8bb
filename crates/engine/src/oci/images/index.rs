//! The store's record of its images: one JSON file, `index.json`, rewritten whole and
//! atomically (a temporary file, synced, renamed over the old one) on every change, so a crash
//! leaves the old record or the new one, never half of one.
//!
//! An image is known by its id (its config's digest); each record names its references, its
//! layers by diff id (the digest of the uncompressed layer tar, the name of its directory),
//! and how it runs. A layer belongs to every record that names it: the records are its
//! reference count.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::EngineError;
use crate::oci::ImageRunConfig;

/// The index file's name under the store's root.
pub(crate) const INDEX_FILE: &str = "index.json";

/// Every image of the store.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Index {
    /// The images by id (`sha256:<hex>` of the config).
    pub(crate) images: BTreeMap<String, ImageRecord>,
    /// The layers in place, by diff id.
    #[serde(default)]
    pub(crate) layers: BTreeMap<String, LayerRecord>,
}

/// One layer in place.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LayerRecord {
    /// The bytes its files hold.
    pub(crate) bytes: u64,
    /// The length of its uncompressed tar: what tells an import that a layer of Docker's
    /// export may be one the store has (then only its digest is computed).
    pub(crate) tar_bytes: u64,
}

/// One image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ImageRecord {
    /// The config's digest.
    pub(crate) id: String,
    /// The references (`name:tag` or `name@digest`) that name it here; empty once a newer
    /// image took its last one while a container still used it.
    pub(crate) references: Vec<String>,
    /// `repository@digest` names from registries it was pulled from: what tells an image
    /// built on this machine (none) from a registry's (see `LocalImage::repo_digests`).
    pub(crate) repo_digests: Vec<String>,
    /// The layers' diff ids, the base first.
    pub(crate) layers: Vec<String>,
    /// The bytes its layers hold unpacked.
    pub(crate) size_bytes: u64,
    /// Where it came from.
    pub(crate) source: ImageSource,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) config: RunConfigRecord,
}

/// Where an image came from: an image of the local Docker engine is imported again when the
/// engine's image under the same reference changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ImageSource {
    Docker,
    Registry,
}

/// [`ImageRunConfig`] as the index keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RunConfigRecord {
    #[serde(default)]
    pub(crate) env: Vec<String>,
    #[serde(default)]
    pub(crate) entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub(crate) cmd: Option<Vec<String>>,
    #[serde(default)]
    pub(crate) working_dir: Option<String>,
    #[serde(default)]
    pub(crate) user: Option<String>,
}

// === impl Index ===

impl Index {
    /// Reads the index under `root`; an empty one when there is none yet.
    pub(crate) fn load(root: &Path) -> Result<Index, EngineError> {
        let path = root.join(INDEX_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|error| EngineError::LocalIo {
                path: path.display().to_string(),
                message: format!("the image index cannot be read: {error}"),
            }),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(Index::default()),
            Err(error) => Err(local_io(&path, &error)),
        }
    }

    /// Writes the index under `root`, atomically.
    pub(crate) fn save(&self, root: &Path) -> Result<(), EngineError> {
        let path = root.join(INDEX_FILE);
        let temporary = root.join(format!("{INDEX_FILE}.new"));
        let bytes = serde_json::to_vec_pretty(self).map_err(EngineError::protocol)?;
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&temporary)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            std::fs::rename(&temporary, &path)?;
            std::fs::File::open(root)?.sync_all()
        };
        write().map_err(|error| local_io(&path, &error))
    }

    /// The record `image` names: a reference, or an id (`sha256:<hex>`).
    pub(crate) fn find(&self, image: &str) -> Option<&ImageRecord> {
        if let Some(record) = self.images.get(image) {
            return Some(record);
        }
        self.images
            .values()
            .find(|record| record.references.iter().any(|name| name == image))
    }

    /// Names `id` by `reference`, taking the reference from any other image that had it.
    /// Returns the ids of the images left with no reference.
    pub(crate) fn retag(&mut self, reference: &str, id: &str) -> Vec<String> {
        let mut orphans = Vec::new();
        for record in self.images.values_mut() {
            if record.id != id && record.references.iter().any(|name| name == reference) {
                record.references.retain(|name| name != reference);
                if record.references.is_empty() {
                    orphans.push(record.id.clone());
                }
            }
        }
        if let Some(record) = self.images.get_mut(id)
            && !record.references.iter().any(|name| name == reference)
        {
            record.references.push(reference.to_owned());
        }
        orphans
    }

    /// How many images name the layer `diff_id`.
    pub(crate) fn layer_users(&self, diff_id: &str) -> usize {
        self.images
            .values()
            .filter(|record| record.layers.iter().any(|layer| layer == diff_id))
            .count()
    }
}

// === impl RunConfigRecord ===

impl From<&RunConfigRecord> for ImageRunConfig {
    fn from(record: &RunConfigRecord) -> Self {
        ImageRunConfig {
            env: record.env.clone(),
            entrypoint: record.entrypoint.clone(),
            cmd: record.cmd.clone(),
            working_dir: record.working_dir.clone(),
            user: record.user.clone(),
        }
    }
}

pub(crate) fn local_io(path: &Path, error: &dyn std::fmt::Display) -> EngineError {
    EngineError::LocalIo {
        path: path.display().to_string(),
        message: error.to_string(),
    }
}
