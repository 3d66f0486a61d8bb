//! An image pulled from its registry into the store: its manifest resolved (`registry`),
//! then its layers fetched a few at a time, each streamed through its digest and unpacked on
//! a blocking thread as it arrives, checked against its digest and its diff id before it is
//! moved into place. A layer the store has is not fetched; one that several pulls want at
//! once is fetched by one of them.

use std::io;
use std::sync::{Arc, PoisonError};

use futures::StreamExt;
use tokio::sync::broadcast;

use super::index::{ImageRecord, ImageSource, LayerRecord, local_io};
use super::registry::{LayerBlob, RegistrySession};
use super::unpack::{self, Digesting};
use super::{
    BusyLayers, ChannelReader, ImageConfig, Inner, PARALLEL_LAYER_DOWNLOADS, PROGRESS_STEP,
    STREAM_CHUNKS, decompressed, layer_event, pulled_badly, remove_quietly, short_digest,
    unpack_failure,
};
use crate::engine::{PullProgress, RegistryAuth};
use crate::error::EngineError;

// === impl Inner ===

impl Inner {
    /// Pulls `reference` from its registry.
    pub(super) async fn pull(
        self: &Arc<Self>,
        reference: &str,
        auth: Option<RegistryAuth>,
        events: &broadcast::Sender<PullProgress>,
    ) -> Result<(), EngineError> {
        tracing::info!(image = %reference, "pulling image into the OCI store");
        let session = self.session(reference, auth)?;
        let resolved = session.resolve().await?;
        let config =
            ImageConfig::parse(&resolved.config).map_err(|message| EngineError::PullFailed {
                image: reference.to_owned(),
                message,
            })?;
        if config.diff_ids.len() != resolved.layers.len() {
            return Err(EngineError::PullFailed {
                image: reference.to_owned(),
                message: format!(
                    "the manifest lists {} layers, the config {}",
                    resolved.layers.len(),
                    config.diff_ids.len()
                ),
            });
        }
        let _ = events.send(PullProgress::Message {
            status: format!("Digest: {}", resolved.manifest_digest),
        });
        let repo_digest = session.name().repo_digest(&resolved.manifest_digest);
        if self
            .tag_existing(&resolved.config_digest, reference, Some(&repo_digest))
            .await?
        {
            return Ok(());
        }
        let download: u64 = resolved.layers.iter().map(|layer| layer.size).sum();
        self.within_limit(reference, download)?;

        let _busy = BusyLayers::mark(self, &config.diff_ids);
        // By index: a closure over borrowed pairs trips the compiler's `Send` proof.
        let (layers, diff_ids) = (&resolved.layers, &config.diff_ids);
        let mut fetches = futures::stream::iter(0..layers.len())
            .map(|n| self.fetch_layer(&session, &layers[n], &diff_ids[n], events))
            .buffer_unordered(PARALLEL_LAYER_DOWNLOADS);
        while let Some(fetched) = fetches.next().await {
            fetched?;
        }
        drop(fetches);
        let record = ImageRecord {
            id: resolved.config_digest.clone(),
            references: vec![reference.to_owned()],
            repo_digests: vec![repo_digest],
            layers: config.diff_ids,
            size_bytes: 0,
            source: ImageSource::Registry,
            labels: config.labels,
            config: config.run,
        };
        self.record(record, reference).await?;
        let _ = events.send(PullProgress::Message {
            status: format!("Status: Downloaded newer image for {reference}"),
        });
        tracing::info!(image = %reference, "image pulled into the OCI store");
        Ok(())
    }

    /// One layer of a registry pull in place: at once when the store has it, fetched,
    /// checked and unpacked otherwise, by one pull however many want it.
    async fn fetch_layer(
        self: &Arc<Self>,
        session: &RegistrySession<'_>,
        blob: &LayerBlob,
        diff_id: &str,
        events: &broadcast::Sender<PullProgress>,
    ) -> Result<(), EngineError> {
        let short = short_digest(&blob.digest);
        let lock = {
            let mut locks = self
                .layer_locks
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            Arc::clone(locks.entry(diff_id.to_owned()).or_default())
        };
        let _fetching = lock.lock().await;
        let result = self
            .fetch_layer_locked(session, blob, diff_id, &short, events)
            .await;
        {
            let mut locks = self
                .layer_locks
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            // The map's own and this caller's: nobody else waits for the lock.
            if locks
                .get(diff_id)
                .is_some_and(|l| Arc::strong_count(l) <= 2)
            {
                locks.remove(diff_id);
            }
        }
        result
    }

    async fn fetch_layer_locked(
        self: &Arc<Self>,
        session: &RegistrySession<'_>,
        blob: &LayerBlob,
        diff_id: &str,
        short: &str,
        events: &broadcast::Sender<PullProgress>,
    ) -> Result<(), EngineError> {
        if self.layer_dir(diff_id).is_dir() {
            let _ = events.send(layer_event(short, "Already exists", None, None));
            return Ok(());
        }
        let _ = events.send(layer_event(short, "Downloading", Some(0), Some(blob.size)));
        let response = session.blob(&blob.digest).await?;
        let (sender, chunks) = tokio::sync::mpsc::channel(STREAM_CHUNKS);
        let inner = Arc::clone(self);
        let (expected, diff_id_owned, size) = (blob.digest.clone(), diff_id.to_owned(), blob.size);
        let image = session.image().to_owned();
        let unpacked_image = image.clone();
        let unpacking = tokio::task::spawn_blocking(move || {
            inner.unpack_blob(
                &unpacked_image,
                ChannelReader::new(chunks),
                &expected,
                size,
                &diff_id_owned,
            )
        });

        let mut body = response.bytes_stream();
        let mut received = 0_u64;
        let mut reported = 0_u64;
        let mut failure = None;
        while let Some(chunk) = body.next().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(error) => {
                    failure = Some(session.transport(&error));
                    let _ = sender
                        .send(Err(io::Error::other("the download broke off")))
                        .await;
                    break;
                }
            };
            received += chunk.len() as u64;
            if blob.size > 0 && received > blob.size {
                failure = Some(EngineError::PullFailed {
                    image: image.clone(),
                    message: format!("the layer {} is larger than its manifest says", blob.digest),
                });
                let _ = sender.send(Err(io::Error::other("too large"))).await;
                break;
            }
            if sender.send(Ok(chunk)).await.is_err() {
                // The unpacking stopped; its error says why.
                break;
            }
            if received - reported >= PROGRESS_STEP {
                reported = received;
                let _ = events.send(layer_event(
                    short,
                    "Downloading",
                    Some(received),
                    Some(blob.size),
                ));
            }
        }
        drop(sender);
        let unpacked = unpacking
            .await
            .map_err(|error| EngineError::protocol(format!("unpacking a layer failed: {error}")))?;
        if let Some(failure) = failure {
            return Err(failure);
        }
        unpacked?;
        let _ = events.send(layer_event(short, "Pull complete", None, None));
        Ok(())
    }

    /// Reads one registry blob (compressed or not), checks its digest and size and its
    /// uncompressed digest against `diff_id`, and moves the unpacked layer into place.
    fn unpack_blob(
        &self,
        image: &str,
        reader: ChannelReader,
        digest: &str,
        size: u64,
        diff_id: &str,
    ) -> Result<(), EngineError> {
        let temporary = self.temporary();
        let result = (|| {
            std::fs::create_dir_all(&temporary).map_err(|error| local_io(&temporary, &error))?;
            let mut compressed = Digesting::new(reader);
            let unpacked = (|| {
                let layer = decompressed(&mut compressed).map_err(|e| pulled_badly(image, &e))?;
                let mut layer = Digesting::new(layer);
                let stats = unpack::unpack_layer(&mut layer, &temporary)
                    .map_err(|error| unpack_failure(error, diff_id))?;
                let (actual, tar_bytes, _) = layer.finish().map_err(|e| pulled_badly(image, &e))?;
                let record = LayerRecord {
                    bytes: stats.bytes,
                    tar_bytes,
                };
                Ok::<_, EngineError>((record, actual))
            })();
            // The digest first, whatever the unpacking said: a layer that arrived damaged is
            // the transfer's fault, not the image's.
            let (actual, read, _) = compressed.finish().map_err(|e| pulled_badly(image, &e))?;
            if actual != digest || (size > 0 && read != size) {
                return Err(EngineError::PullFailed {
                    image: image.to_owned(),
                    message: format!(
                        "the registry sent a layer whose digest is {actual} ({read} bytes), \
                         not {digest} ({size} bytes)"
                    ),
                });
            }
            let (record, uncompressed) = unpacked?;
            if uncompressed != diff_id {
                return Err(EngineError::PullFailed {
                    image: image.to_owned(),
                    message: format!(
                        "the layer {digest} unpacks to {uncompressed}, not to its diff id {diff_id}"
                    ),
                });
            }
            self.commit_layer(&temporary, diff_id, record)
        })();
        if result.is_err() {
            remove_quietly(&temporary);
        }
        result
    }
}
