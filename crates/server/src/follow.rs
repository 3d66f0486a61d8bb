//! Following a task's log as it grows, driven by the store alone: a follower polls
//! `Store::get_log_since` from the offset it reached, so any server that shares the database
//! can serve any stream, and nothing in this process has to tell it that a runner wrote.
//!
//! Each read returns the new bytes together with the task's status and log size as of the
//! same moment. A follower ends once it has seen a terminal status and read up to the size
//! that came with it; since a finished task takes no more log, that is the whole log, bytes
//! written just before completion included.

use std::sync::Arc;
use std::time::Duration;

use stevedore_model::{Task, TaskStatus};
use stevedore_store::{LogSlice, Store, StoreError};

use crate::error::ApiError;

/// The most log bytes one read asks for. A follower behind by more reads again at once.
pub const READ_BYTES: u32 = 64 * 1024;

/// What a follower hands out, in log order.
#[derive(Debug, Clone, PartialEq)]
pub enum Followed {
    /// Bytes of the log starting at `offset`. An offset below the end of earlier bytes means
    /// the log was cut back for its truncation marker: these bytes replace the earlier ones.
    Log { offset: u64, bytes: Vec<u8> },
    /// The task's status or progress changed (or this is the first report).
    Status(TaskState),
    /// The task finished and every byte of its log was handed out. Nothing follows.
    End(Box<Task>),
}

/// A task's status and progress as a follower reports them.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskState {
    pub status: TaskStatus,
    pub percent: Option<u8>,
    pub msg: Option<String>,
}

/// Follows one task's log. See the module documentation.
pub struct LogFollower {
    store: Arc<dyn Store>,
    project_id: String,
    task_id: String,
    poll_interval: Duration,
    /// The next byte to read.
    position: u64,
    /// A read not handed out yet: the one `open` made.
    unread: Option<LogSlice>,
    /// The state last handed out.
    reported: Option<TaskState>,
    /// The log had reached its cap by the last read.
    truncated: bool,
    /// The last read found nothing more to read: wait a poll interval before the next.
    idle: bool,
    finished: bool,
}

impl LogFollower {
    /// Reads the log once from `offset`, so that an unknown task or an offset past the end of
    /// the log is refused before a response starts.
    pub async fn open(
        store: Arc<dyn Store>,
        project_id: &str,
        task_id: &str,
        offset: u64,
        poll_interval: Duration,
    ) -> Result<LogFollower, ApiError> {
        let first = store
            .get_log_since(project_id, task_id, offset, READ_BYTES)
            .await?;
        if offset > first.size {
            return Err(ApiError::BadRequest(format!(
                "offset {offset} is past the end of the log, which has {} bytes",
                first.size
            )));
        }
        Ok(LogFollower {
            store,
            project_id: project_id.to_owned(),
            task_id: task_id.to_owned(),
            poll_interval,
            position: offset,
            // A client resuming inside a log that was already truncated knows what it read.
            truncated: first.truncated_at.is_some(),
            unread: Some(first),
            reported: None,
            idle: false,
            finished: false,
        })
    }

    /// What happened since the last call, waiting (polling the store) until something did.
    /// `None` once the end was handed out.
    pub async fn next(&mut self) -> Result<Option<Vec<Followed>>, StoreError> {
        if self.finished {
            return Ok(None);
        }
        loop {
            let slice = match self.unread.take() {
                Some(slice) => slice,
                None => {
                    if self.idle {
                        tokio::time::sleep(self.poll_interval).await;
                    }
                    self.store
                        .get_log_since(&self.project_id, &self.task_id, self.position, READ_BYTES)
                        .await?
                }
            };
            if let Some(marker) = slice.truncated_at
                && !self.truncated
            {
                self.truncated = true;
                if self.position > marker {
                    // The log was cut back to make room for its marker after bytes past the
                    // cut were handed out: hand the log out again from the marker.
                    self.position = marker;
                    self.idle = false;
                    continue;
                }
            }
            let mut out = Vec::new();
            let read = slice.bytes.len() as u64;
            if read > 0 {
                out.push(Followed::Log {
                    offset: self.position,
                    bytes: slice.bytes,
                });
                self.position += read;
            }
            let terminal = slice.status.is_terminal();
            let state = TaskState {
                status: slice.status,
                percent: slice.percent,
                msg: slice.msg,
            };
            if self.reported.as_ref() != Some(&state) {
                self.reported = Some(state.clone());
                out.push(Followed::Status(state));
            }
            let caught_up = self.position >= slice.size;
            self.idle = caught_up || read == 0;
            if terminal && caught_up {
                let task = self.store.get_task(&self.project_id, &self.task_id).await?;
                out.push(Followed::End(Box::new(task)));
                self.finished = true;
            }
            if !out.is_empty() {
                return Ok(Some(out));
            }
        }
    }
}

impl Drop for LogFollower {
    fn drop(&mut self) {
        tracing::debug!(
            task_id = %self.task_id,
            offset = self.position,
            finished = self.finished,
            "log stream closed"
        );
    }
}

/// Log text for an event: bytes `offset..end` of the log, decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct LogText {
    pub offset: u64,
    pub end: u64,
    pub text: String,
}

/// Turns log bytes into text without splitting a character: an incomplete UTF-8 sequence at
/// the end of what arrived is held back until the rest arrives; invalid bytes become U+FFFD.
#[derive(Debug, Clone, Default)]
pub struct TextDecoder {
    /// The offset after the last text handed out.
    delivered: u64,
    /// Bytes after `delivered` that start an incomplete character.
    pending: Vec<u8>,
}

impl TextDecoder {
    pub fn starting_at(offset: u64) -> TextDecoder {
        TextDecoder {
            delivered: offset,
            pending: Vec::new(),
        }
    }

    /// The complete text of the bytes held back and `bytes` (which start at `offset`), or
    /// `None` when all of it is held back.
    pub fn push(&mut self, offset: u64, bytes: &[u8]) -> Option<LogText> {
        let expected = self.delivered + self.pending.len() as u64;
        if offset != expected {
            // The log is handed out again from an earlier offset: drop what lies past it.
            if offset < self.delivered || offset > expected {
                self.pending.clear();
                self.delivered = offset;
            } else {
                self.pending
                    .truncate(usize::try_from(offset - self.delivered).unwrap_or(usize::MAX));
            }
        }
        self.pending.extend_from_slice(bytes);
        let mut text = String::with_capacity(self.pending.len());
        let mut rest: &[u8] = &self.pending;
        while !rest.is_empty() {
            match std::str::from_utf8(rest) {
                Ok(valid) => {
                    text.push_str(valid);
                    rest = &[];
                }
                Err(error) => {
                    let (valid, after) = rest.split_at(error.valid_up_to());
                    text.push_str(&String::from_utf8_lossy(valid));
                    match error.error_len() {
                        Some(invalid) => {
                            text.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[invalid..];
                        }
                        // The character may be completed by bytes still to come.
                        None => {
                            rest = after;
                            break;
                        }
                    }
                }
            }
        }
        let consumed = self.pending.len() - rest.len();
        if consumed == 0 {
            return None;
        }
        self.pending.drain(..consumed);
        Some(self.hand_out(consumed, text))
    }

    /// Whatever is held back, at the end of the log: an incomplete character is U+FFFD.
    pub fn finish(&mut self) -> Option<LogText> {
        if self.pending.is_empty() {
            return None;
        }
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        let consumed = std::mem::take(&mut self.pending).len();
        Some(self.hand_out(consumed, text))
    }

    fn hand_out(&mut self, consumed: usize, text: String) -> LogText {
        let offset = self.delivered;
        self.delivered += consumed as u64;
        LogText {
            offset,
            end: self.delivered,
            text,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn text(offset: u64, end: u64, text: &str) -> Option<LogText> {
        Some(LogText {
            offset,
            end,
            text: text.to_owned(),
        })
    }

    #[test]
    fn a_character_split_across_pushes_is_held_back() {
        let mut decoder = TextDecoder::default();
        assert_eq!(decoder.push(0, b"caf\xc3"), text(0, 3, "caf"));
        assert_eq!(decoder.push(4, b"\xa9!"), text(3, 6, "\u{e9}!"));
        // A four-byte character arriving one byte at a time.
        let crab = "\u{1f980}".as_bytes();
        assert_eq!(decoder.push(6, &crab[..1]), None);
        assert_eq!(decoder.push(7, &crab[1..3]), None);
        assert_eq!(decoder.push(9, &crab[3..]), text(6, 10, "\u{1f980}"));
        assert_eq!(decoder.finish(), None);
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        let mut decoder = TextDecoder::starting_at(10);
        assert_eq!(
            decoder.push(10, b"a\xffb\xc3("),
            text(10, 15, "a\u{fffd}b\u{fffd}(")
        );
        // An incomplete character at the very end of the log.
        assert_eq!(decoder.push(15, b"ok\xe2\x82"), text(15, 17, "ok"));
        assert_eq!(decoder.finish(), text(17, 19, "\u{fffd}"));
    }

    #[test]
    fn bytes_handed_out_again_replace_what_was_held_back() {
        let mut decoder = TextDecoder::default();
        assert_eq!(decoder.push(0, b"abc\xc3"), text(0, 3, "abc"));
        // The log is handed out again from offset 2 (cut back for its marker).
        assert_eq!(decoder.push(2, b"[cut]"), text(2, 7, "[cut]"));
        assert_eq!(decoder.push(3, b"x\xe2"), text(3, 4, "x"));
        assert_eq!(decoder.push(4, b"y"), text(4, 5, "y"));
    }
}
