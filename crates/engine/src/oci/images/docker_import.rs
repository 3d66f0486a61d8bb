//! An image of the local Docker engine brought into the store through the engine's export
//! (`GET /images/{id}/get`, what `docker save` writes): a tar holding each layer's tar, the
//! image config and `manifest.json`, which name the layers in order.
//!
//! The export streams: each layer is unpacked into `tmp/` as it arrives, hashed on the way.
//! The manifest and config come last, so only then is each unpacked layer matched to its diff
//! id (the config's, checked against its digest, the image id) and moved into place; a layer
//! whose hash is not the diff id the manifest puts there fails the import. Both layouts of
//! the export are read: Docker's own (`<id>/layer.tar`, until Engine 25) and the OCI layout
//! (`blobs/sha256/<digest>`), where a layer the store has is skipped unread.

use std::collections::HashMap;
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::Arc;

use bollard::Docker;
use bollard::models::ImageInspect;
use bytes::Bytes;
use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::broadcast;

use super::index::{ImageRecord, ImageSource, LayerRecord, local_io};
use super::registry::sha256_digest;
use super::unpack::{self, Digesting};
use super::{
    BusyLayers, ChannelReader, ImageConfig, Inner, STREAM_CHUNKS, decompressed, layer_event,
    remove_quietly, unpack_failure,
};
use crate::engine::PullProgress;
use crate::error::{EngineError, Subject};

/// Files of the export other than layers (manifest, config) are read whole up to this size.
const MAX_DOCUMENT_BYTES: u64 = 16 << 20;

/// One entry of the export's `manifest.json`.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SavedManifest {
    config: String,
    layers: Vec<String>,
}

/// A layer of the export unpacked into `tmp/`, not yet in place.
struct Unpacked {
    diff_id: String,
    /// `None` when the store had the layer and it was skipped.
    directory: Option<PathBuf>,
    layer: LayerRecord,
}

impl Unpacked {
    /// A layer the store has.
    fn known(diff_id: String) -> Self {
        Unpacked {
            diff_id,
            directory: None,
            layer: LayerRecord::default(),
        }
    }
}

/// What the export held.
#[derive(Default)]
struct Export {
    /// Layers by their path in the export.
    layers: HashMap<String, Unpacked>,
    /// Symlinks in the export (a layer Docker saved once for two of its entries).
    links: HashMap<String, String>,
    /// The small files, by path.
    documents: HashMap<String, Vec<u8>>,
}

/// Imports the engine's image `inspected` as `reference`.
pub(super) async fn import(
    inner: &Arc<Inner>,
    docker: &Docker,
    reference: &str,
    inspected: ImageInspect,
    events: &broadcast::Sender<PullProgress>,
) -> Result<(), EngineError> {
    let id = inspected
        .id
        .clone()
        .ok_or_else(|| EngineError::protocol(format!("the image {reference} has no id")))?;
    let repo_digests = inspected.repo_digests.clone().unwrap_or_default();
    if inner.tag_existing(&id, reference, None).await? {
        return Ok(());
    }
    let diff_ids = inspected
        .root_fs
        .and_then(|root_fs| root_fs.layers)
        .unwrap_or_default();
    let size = inspected.size.and_then(|size| u64::try_from(size).ok());
    inner.within_limit(reference, size.unwrap_or(0))?;
    tracing::info!(image = %reference, %id, layers = diff_ids.len(), "importing a Docker image into the OCI store");

    let _busy = BusyLayers::mark(inner, &diff_ids);
    // A layer the store may have is only hashed; should one turn out to be another layer of
    // the same length, the export is read again, unpacking everything.
    let config = match export_once(inner, docker, &id, reference, &diff_ids, true, events).await? {
        Some(config) => config,
        None => export_once(inner, docker, &id, reference, &diff_ids, false, events)
            .await?
            .ok_or_else(|| {
                EngineError::protocol("an export read without skipping asked to skip")
            })?,
    };
    let record = ImageRecord {
        id: id.clone(),
        references: vec![reference.to_owned()],
        repo_digests,
        layers: config.diff_ids,
        size_bytes: 0,
        source: ImageSource::Docker,
        labels: config.labels,
        config: config.run,
    };
    inner.record(record, reference).await?;
    tracing::info!(image = %reference, %id, "Docker image imported into the OCI store");
    Ok(())
}

/// Streams the engine's export of `id` into [`read_export`]; `None` when a layer taken for
/// one the store has was not (read again with `skip_known` off).
async fn export_once(
    inner: &Arc<Inner>,
    docker: &Docker,
    id: &str,
    reference: &str,
    diff_ids: &[String],
    skip_known: bool,
    events: &broadcast::Sender<PullProgress>,
) -> Result<Option<ImageConfig>, EngineError> {
    let (sender, chunks) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(STREAM_CHUNKS);
    let reading = {
        let inner = Arc::clone(inner);
        let events = events.clone();
        let (id, reference) = (id.to_owned(), reference.to_owned());
        let known = if skip_known {
            known_layers(&inner, diff_ids)
        } else {
            HashMap::new()
        };
        tokio::task::spawn_blocking(move || {
            read_export(
                &inner,
                ChannelReader::new(chunks),
                &id,
                &reference,
                &known,
                &events,
            )
        })
    };
    let mut export = docker.export_image(id);
    let mut failure = None;
    while let Some(chunk) = export.next().await {
        match chunk {
            Ok(chunk) => {
                if sender.send(Ok(chunk)).await.is_err() {
                    break;
                }
            }
            Err(error) => {
                failure = Some(EngineError::from_bollard(error, Subject::Engine));
                let _ = sender
                    .send(Err(io::Error::other("the export broke off")))
                    .await;
                break;
            }
        }
    }
    drop(sender);
    let read = reading
        .await
        .map_err(|error| EngineError::protocol(format!("reading the export failed: {error}")))?;
    match failure {
        Some(failure) => Err(failure),
        None => read,
    }
}

/// The layers of `diff_ids` the store has, by the length of their tar.
fn known_layers(inner: &Inner, diff_ids: &[String]) -> HashMap<u64, Vec<String>> {
    let state = inner.state();
    let mut known: HashMap<u64, Vec<String>> = HashMap::new();
    for diff_id in diff_ids {
        if let Some(layer) = state.index.layers.get(diff_id)
            && inner.layer_dir(diff_id).is_dir()
        {
            known
                .entry(layer.tar_bytes)
                .or_default()
                .push(diff_id.clone());
        }
    }
    known
}

/// Reads the export to its end (on a blocking thread), checks it against the image id, and
/// moves its layers into place. Every layer unpacked and not moved is removed again. `None`
/// when a layer of a length in `known` was none of those layers.
fn read_export(
    inner: &Inner,
    reader: ChannelReader,
    id: &str,
    reference: &str,
    known: &HashMap<u64, Vec<String>>,
    events: &broadcast::Sender<PullProgress>,
) -> Result<Option<ImageConfig>, EngineError> {
    let mut export = Export::default();
    let result =
        read_entries(inner, reader, reference, known, events, &mut export).and_then(|complete| {
            if complete {
                place_layers(inner, &mut export, id, reference).map(Some)
            } else {
                Ok(None)
            }
        });
    for unpacked in export.layers.values() {
        if let Some(directory) = &unpacked.directory {
            remove_quietly(directory);
        }
    }
    result
}

/// Reads the export's entries; `false` when a layer of a length in `known` was none of those
/// layers (its bytes are gone, so the caller reads the export again).
fn read_entries(
    inner: &Inner,
    reader: ChannelReader,
    reference: &str,
    known: &HashMap<u64, Vec<String>>,
    events: &broadcast::Sender<PullProgress>,
    export: &mut Export,
) -> Result<bool, EngineError> {
    let broken = |error: io::Error| EngineError::PullFailed {
        image: reference.to_owned(),
        message: format!("the engine's export cannot be read: {error}"),
    };
    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries().map_err(broken)? {
        let mut entry = entry.map_err(broken)?;
        let path = entry
            .path()
            .map_err(broken)?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_owned();
        let kind = entry.header().entry_type();
        if kind == tar::EntryType::Symlink {
            if let Some(target) = entry.link_name().map_err(broken)? {
                export
                    .links
                    .insert(path.clone(), resolve_link(&path, &target.to_string_lossy()));
            }
            continue;
        }
        if !kind.is_file() {
            continue;
        }
        let size = entry.size();
        let mut head = Vec::with_capacity(512);
        (&mut entry)
            .take(512)
            .read_to_end(&mut head)
            .map_err(broken)?;
        let is_tar = head.len() >= 262 && &head[257..262] == b"ustar";
        let is_gzip = head.starts_with(&[0x1f, 0x8b]);
        let whole = io::Cursor::new(head).chain(entry);
        if path.ends_with("/layer.tar") || (path.starts_with("blobs/") && (is_tar || is_gzip)) {
            // A blob named by its digest that the store has is known without reading it.
            let named = path
                .strip_prefix("blobs/sha256/")
                .map(|hex| format!("sha256:{hex}"));
            if let Some(diff_id) = named.filter(|diff_id| inner.layer_dir(diff_id).is_dir()) {
                let _ = events.send(layer_event(&short(&path), "Already exists", None, None));
                export.layers.insert(path, Unpacked::known(diff_id));
                continue;
            }
            if let Some(candidates) = known.get(&size) {
                let (diff_id, _, _) = Digesting::new(whole).finish().map_err(broken)?;
                if !candidates.contains(&diff_id) {
                    return Ok(false);
                }
                let _ = events.send(layer_event(&short(&path), "Already exists", None, None));
                export.layers.insert(path, Unpacked::known(diff_id));
                continue;
            }
            let _ = events.send(layer_event(
                &short(&path),
                "Extracting",
                Some(0),
                Some(size),
            ));
            let directory = inner.temporary();
            std::fs::create_dir_all(&directory).map_err(|error| local_io(&directory, &error))?;
            let mut whole = whole;
            let mut layer = Digesting::new(decompressed(&mut whole).map_err(broken)?);
            let unpacked = unpack::unpack_layer(&mut layer, &directory);
            let finished = layer.finish();
            let stats = match unpacked {
                Ok(stats) => stats,
                Err(error) => {
                    remove_quietly(&directory);
                    return Err(unpack_failure(error, &path));
                }
            };
            let (diff_id, tar_bytes, _) = finished.map_err(broken)?;
            let _ = events.send(layer_event(
                &short(&path),
                "Pull complete",
                Some(size),
                Some(size),
            ));
            export.layers.insert(
                path,
                Unpacked {
                    diff_id,
                    directory: Some(directory),
                    layer: LayerRecord {
                        bytes: stats.bytes,
                        tar_bytes,
                    },
                },
            );
        } else if size <= MAX_DOCUMENT_BYTES {
            let mut bytes = Vec::new();
            let mut whole = whole;
            whole.read_to_end(&mut bytes).map_err(broken)?;
            export.documents.insert(path, bytes);
        }
    }
    Ok(true)
}

/// Checks the export against the image id and moves its layers into place, in order.
fn place_layers(
    inner: &Inner,
    export: &mut Export,
    id: &str,
    reference: &str,
) -> Result<ImageConfig, EngineError> {
    let wrong = |message: String| EngineError::PullFailed {
        image: reference.to_owned(),
        message,
    };
    let manifests: Vec<SavedManifest> = export
        .documents
        .get("manifest.json")
        .ok_or_else(|| wrong("the export has no manifest.json".to_owned()))
        .and_then(|bytes| {
            serde_json::from_slice(bytes).map_err(|error| {
                wrong(format!(
                    "the export's manifest.json cannot be read: {error}"
                ))
            })
        })?;
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    let manifest = manifests
        .into_iter()
        .find(|manifest| manifest.config.contains(hex))
        .ok_or_else(|| wrong(format!("the export does not hold the image {id}")))?;
    let config_bytes = export
        .documents
        .get(&manifest.config)
        .ok_or_else(|| wrong(format!("the export lacks the config {}", manifest.config)))?;
    let actual = sha256_digest(config_bytes);
    if actual != id {
        return Err(wrong(format!("the export's config is {actual}, not {id}")));
    }
    let config = ImageConfig::parse(config_bytes).map_err(wrong)?;
    if config.diff_ids.len() != manifest.layers.len() {
        return Err(wrong(format!(
            "the export lists {} layers, the config {}",
            manifest.layers.len(),
            config.diff_ids.len()
        )));
    }
    for (path, diff_id) in manifest.layers.iter().zip(&config.diff_ids) {
        let path = export.links.get(path).unwrap_or(path).clone();
        let unpacked = export
            .layers
            .get_mut(&path)
            .ok_or_else(|| wrong(format!("the export lacks the layer {path}")))?;
        if unpacked.diff_id != *diff_id {
            return Err(wrong(format!(
                "the export's layer {path} is {}, not the diff id {diff_id} its config names",
                unpacked.diff_id
            )));
        }
        if let Some(directory) = unpacked.directory.take() {
            inner.commit_layer(&directory, diff_id, unpacked.layer)?;
        }
    }
    Ok(config)
}

/// A symlink's target in the export, relative to the export's root.
fn resolve_link(path: &str, target: &str) -> String {
    let mut parts: Vec<&str> = path.split('/').collect();
    parts.pop();
    for part in target.split('/') {
        match part {
            ".." => {
                parts.pop();
            }
            "." | "" => {}
            part => parts.push(part),
        }
    }
    parts.join("/")
}

/// A layer's short name in progress events.
fn short(path: &str) -> String {
    path.trim_start_matches("blobs/sha256/")
        .chars()
        .take(12)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_layer_links_resolve_inside_the_export() {
        assert_eq!(resolve_link("b/layer.tar", "../a/layer.tar"), "a/layer.tar");
        assert_eq!(resolve_link("blobs/sha256/x", "y"), "blobs/sha256/y");
    }
}
