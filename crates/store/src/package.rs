//! A code package as the store hands it out: its size up front, its bytes as a stream of
//! chunks, so that no caller has to hold a whole package to pass it on.

use std::fmt;

use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt, TryStreamExt};

use crate::{Result, StoreError};

/// A package read chunk by chunk, in order. The stream ends after `size` bytes; a store that
/// finds fewer or more ends it with an error instead.
pub struct PackageStream {
    /// The package's length in bytes, as recorded when it was pushed.
    pub size: u64,
    /// The package's bytes.
    pub chunks: BoxStream<'static, Result<Bytes>>,
}

// === impl PackageStream ===

impl PackageStream {
    /// A package already in memory, as one chunk.
    pub fn from_bytes(bytes: impl Into<Bytes>) -> Self {
        let bytes: Bytes = bytes.into();
        PackageStream {
            size: bytes.len() as u64,
            chunks: stream::once(async move { Ok(bytes) }).boxed(),
        }
    }

    /// Every chunk gathered into one buffer: for tests and small packages only.
    pub async fn into_bytes(self) -> Result<Vec<u8>> {
        let expected = self.size;
        let bytes: Vec<u8> = self
            .chunks
            .try_fold(Vec::new(), |mut all, chunk| async move {
                all.extend_from_slice(&chunk);
                Ok(all)
            })
            .await?;
        if bytes.len() as u64 != expected {
            return Err(StoreError::Corrupt(format!(
                "a package recorded as {expected} bytes has {}",
                bytes.len()
            )));
        }
        Ok(bytes)
    }
}

impl fmt::Debug for PackageStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PackageStream")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}
