//! Progress reported from inside a task's container by an in-band line protocol on its
//! stdout or stderr.
//!
//! A line of the form
//!
//! ```text
//! ::stevedore-progress::<percent>[ <message>]
//! ::stevedore-progress:: <message>
//! ```
//!
//! sets the task's `percent` (0 to 100, decimal digits only) and, when given, its `msg`; the
//! second form sets only the message and leaves the percent as it was. The marker must start
//! the line; the line ends at `\n`, and one `\r` before it is ignored. Nothing else is a
//! progress line: a percent outside 0..=100, anything but digits before the first space, a
//! missing message after a leading space, or a line longer than [`MAX_PROGRESS_LINE_BYTES`]
//! is an ordinary log line and nothing more. The message is trimmed and cut to
//! [`MAX_PROGRESS_MESSAGE_BYTES`] on a character boundary.
//!
//! Progress lines stay in the task's log like any other output: what the task printed is
//! what its log shows, and a reader of the log sees where progress came from.
//!
//! The protocol needs nothing inside the container but the ability to print: no network, no
//! credential, no file. So it works the same with `network: none`, on a remote engine, for a
//! remote runner and for a local run.
//!
//! Forwarding is coalesced: the first update goes to the task source at once, later ones at
//! most every `interval` (the latest value wins, field by field), and whatever is pending
//! when the output ends goes out before the task's result is recorded. A worker printing
//! thousands of progress lines a second costs the source a few writes a second. Failing to
//! forward is logged and never fails the task.

use std::time::Duration;

use stevedore_engine::OutputStream;
use tokio::time::Instant;

use crate::source::TaskSource;

/// What starts a progress line.
pub const PROGRESS_MARKER: &str = "::stevedore-progress::";
/// The longest progress message kept, in bytes; longer ones are cut on a character boundary.
pub const MAX_PROGRESS_MESSAGE_BYTES: usize = 512;
/// The longest line, in bytes without its line ending, that can be a progress line. Longer
/// lines are log output only, and the runner buffers no more than this of an unfinished line.
pub const MAX_PROGRESS_LINE_BYTES: usize = 4096;

/// One progress report: each field that is set replaces the task's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProgressUpdate {
    /// 0 to 100.
    pub percent: Option<u8>,
    /// Trimmed, never empty, at most [`MAX_PROGRESS_MESSAGE_BYTES`].
    pub msg: Option<String>,
}

/// Parses one line of output (without its `\n`; a trailing `\r` is allowed). `None` when the
/// line is not a well-formed progress line.
pub fn parse_progress_line(line: &[u8]) -> Option<ProgressUpdate> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.len() > MAX_PROGRESS_LINE_BYTES {
        return None;
    }
    let rest = line.strip_prefix(PROGRESS_MARKER.as_bytes())?;
    if let Some(message) = rest.strip_prefix(b" ") {
        // `:: <message>`: the message alone.
        let msg = clean_message(message)?;
        return Some(ProgressUpdate {
            percent: None,
            msg: Some(msg),
        });
    }
    let (digits, message) = match rest.iter().position(|&b| b == b' ') {
        Some(space) => (&rest[..space], Some(&rest[space + 1..])),
        None => (rest, None),
    };
    let percent = parse_percent(digits)?;
    Some(ProgressUpdate {
        percent: Some(percent),
        msg: message.and_then(clean_message),
    })
}

/// 1 to 3 ASCII digits with a value of at most 100.
fn parse_percent(digits: &[u8]) -> Option<u8> {
    if digits.is_empty() || digits.len() > 3 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let value = digits
        .iter()
        .fold(0u16, |value, digit| value * 10 + u16::from(digit - b'0'));
    u8::try_from(value).ok().filter(|percent| *percent <= 100)
}

/// The message as text, trimmed and capped; `None` when nothing is left.
fn clean_message(message: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(message);
    let mut text = text.trim();
    if text.len() > MAX_PROGRESS_MESSAGE_BYTES {
        let mut end = MAX_PROGRESS_MESSAGE_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text = text[..end].trim_end();
    }
    (!text.is_empty()).then(|| text.to_owned())
}

/// Finds progress lines in a container's output as it arrives in arbitrary chunks, stdout
/// and stderr apart.
#[derive(Debug, Default)]
pub(crate) struct LineScanner {
    stdout: PartialLine,
    stderr: PartialLine,
}

/// The unfinished last line of one stream, kept only while it may still be a progress line.
#[derive(Debug, Default)]
struct PartialLine {
    bytes: Vec<u8>,
    /// The line cannot be a progress line (it starts otherwise, or is too long): ignore the
    /// rest of it up to its end.
    skipping: bool,
}

// === impl LineScanner ===

impl LineScanner {
    /// Feeds the next bytes of `stream`, calling `found` for every complete progress line.
    pub(crate) fn feed(
        &mut self,
        stream: OutputStream,
        bytes: &[u8],
        found: &mut impl FnMut(ProgressUpdate),
    ) {
        match stream {
            OutputStream::Stdout => self.stdout.feed(bytes, found),
            OutputStream::Stderr => self.stderr.feed(bytes, found),
        }
    }
}

// === impl PartialLine ===

impl PartialLine {
    fn feed(&mut self, mut bytes: &[u8], found: &mut impl FnMut(ProgressUpdate)) {
        while let Some(end) = bytes.iter().position(|&b| b == b'\n') {
            let piece = &bytes[..end];
            if !self.skipping {
                let update = if self.bytes.is_empty() {
                    parse_progress_line(piece)
                } else if self.bytes.len() + piece.len() <= MAX_PROGRESS_LINE_BYTES + 1 {
                    self.bytes.extend_from_slice(piece);
                    parse_progress_line(&self.bytes)
                } else {
                    None
                };
                if let Some(update) = update {
                    found(update);
                }
            }
            self.bytes.clear();
            self.skipping = false;
            bytes = &bytes[end + 1..];
        }
        if bytes.is_empty() || self.skipping {
            return;
        }
        self.bytes.extend_from_slice(bytes);
        let marker = PROGRESS_MARKER.as_bytes();
        let head = self.bytes.len().min(marker.len());
        // One byte more than the longest line for the `\r` that may end it.
        if self.bytes.len() > MAX_PROGRESS_LINE_BYTES + 1 || self.bytes[..head] != marker[..head] {
            self.bytes = Vec::new();
            self.skipping = true;
        }
    }
}

/// The progress found in one task's output, and its coalesced forwarding to the source.
#[derive(Debug)]
pub(crate) struct ProgressReporter {
    scanner: LineScanner,
    interval: Duration,
    /// Found and not yet forwarded, merged field by field (latest wins).
    pending: Option<ProgressUpdate>,
    last_sent: Option<Instant>,
}

// === impl ProgressReporter ===

impl ProgressReporter {
    pub(crate) fn new(interval: Duration) -> Self {
        ProgressReporter {
            scanner: LineScanner::default(),
            interval,
            pending: None,
            last_sent: None,
        }
    }

    /// Scans the next output bytes of `stream` for progress lines.
    pub(crate) fn scan(&mut self, stream: OutputStream, bytes: &[u8]) {
        let pending = &mut self.pending;
        self.scanner.feed(stream, bytes, &mut |update| {
            let merged = pending.get_or_insert_with(ProgressUpdate::default);
            if update.percent.is_some() {
                merged.percent = update.percent;
            }
            if update.msg.is_some() {
                merged.msg = update.msg;
            }
        });
    }

    /// When the pending update may be forwarded; `None` when nothing is pending.
    pub(crate) fn due(&self) -> Option<Instant> {
        self.pending.as_ref()?;
        Some(match self.last_sent {
            Some(sent) => sent + self.interval,
            None => Instant::now(),
        })
    }

    /// Whether a pending update may be forwarded now.
    pub(crate) fn is_due(&self) -> bool {
        self.due().is_some_and(|due| due <= Instant::now())
    }

    /// Forwards the pending update, if there is one, whatever the interval says.
    pub(crate) async fn forward(&mut self, source: &dyn TaskSource, task_id: &str, token: i64) {
        let Some(update) = self.pending.take() else {
            return;
        };
        self.last_sent = Some(Instant::now());
        if let Err(error) = source
            .progress(task_id, token, update.percent, update.msg.as_deref())
            .await
        {
            if error.is_transient() {
                tracing::warn!(%error, "the task's progress could not be reported");
            } else {
                tracing::debug!(%error, "the task's progress was refused");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn parse(line: &str) -> Option<(Option<u8>, Option<String>)> {
        parse_progress_line(line.as_bytes()).map(|update| (update.percent, update.msg))
    }

    #[test]
    fn the_documented_forms_parse() {
        assert_eq!(
            parse("::stevedore-progress::42 copying files"),
            Some((Some(42), Some("copying files".into())))
        );
        assert_eq!(parse("::stevedore-progress::0"), Some((Some(0), None)));
        assert_eq!(parse("::stevedore-progress::100"), Some((Some(100), None)));
        assert_eq!(
            parse("::stevedore-progress::007 x"),
            Some((Some(7), Some("x".into())))
        );
        assert_eq!(
            parse("::stevedore-progress:: only a message "),
            Some((None, Some("only a message".into())))
        );
        assert_eq!(
            parse("::stevedore-progress::50   padded  \r"),
            Some((Some(50), Some("padded".into())))
        );
        // A percent with nothing but spaces after it sets the percent only.
        assert_eq!(parse("::stevedore-progress::50   "), Some((Some(50), None)));
    }

    #[test]
    fn anything_else_is_just_a_log_line() {
        for line in [
            "",
            "hello",
            "::stevedore-progress::",
            "::stevedore-progress::   ",
            "::stevedore-progress::101",
            "::stevedore-progress::1000",
            "::stevedore-progress::-1",
            "::stevedore-progress::+5",
            "::stevedore-progress::50%",
            "::stevedore-progress::5.5 half",
            "::stevedore-progress::fifty",
            "::stevedore-progress::50\tx",
            " ::stevedore-progress::50",
            "::Stevedore-Progress::50",
            "::stevedore-progress:50",
            "::stevedore-progress::50\r\r",
        ] {
            assert_eq!(parse(line), None, "{line:?}");
        }
        let long = format!(
            "::stevedore-progress::1 {}",
            "x".repeat(MAX_PROGRESS_LINE_BYTES)
        );
        assert_eq!(parse(&long), None);
    }

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        let message = "ü".repeat(400); // 800 bytes
        let update =
            parse_progress_line(format!("::stevedore-progress::3 {message}").as_bytes()).unwrap();
        let msg = update.msg.unwrap();
        assert_eq!(msg.len(), MAX_PROGRESS_MESSAGE_BYTES);
        assert!(message.starts_with(&msg));
        let odd = format!("a{message}");
        let msg = parse_progress_line(format!("::stevedore-progress::3 {odd}").as_bytes())
            .unwrap()
            .msg
            .unwrap();
        assert_eq!(msg.len(), MAX_PROGRESS_MESSAGE_BYTES - 1);
    }

    #[test]
    fn invalid_utf8_in_a_message_is_replaced_not_refused() {
        let update = parse_progress_line(b"::stevedore-progress::9 caf\xe9").unwrap();
        assert_eq!(update.percent, Some(9));
        assert_eq!(update.msg.as_deref(), Some("caf\u{fffd}"));
    }

    fn scan_all(chunks: &[(OutputStream, &[u8])]) -> Vec<ProgressUpdate> {
        let mut scanner = LineScanner::default();
        let mut found = Vec::new();
        for (stream, bytes) in chunks {
            scanner.feed(*stream, bytes, &mut |update| found.push(update));
        }
        found
    }

    #[test]
    fn lines_split_across_chunks_and_streams_are_recognised() {
        let found = scan_all(&[
            (OutputStream::Stdout, b"log line\n::stevedore-pro"),
            (
                OutputStream::Stderr,
                b"::stevedore-progress::10 on stderr\r\nhalf a line ",
            ),
            (OutputStream::Stdout, b"gress::20 on"),
            (OutputStream::Stdout, b" stdout\n"),
            (
                OutputStream::Stderr,
                b"::stevedore-progress::30 not a progress line\n",
            ),
        ]);
        let percents: Vec<Option<u8>> = found.iter().map(|update| update.percent).collect();
        assert_eq!(percents, vec![Some(10), Some(20)]);
        assert_eq!(found[1].msg.as_deref(), Some("on stdout"));
    }

    #[test]
    fn an_unfinished_line_is_bounded() {
        let mut line = PartialLine::default();
        let mut found = Vec::new();
        line.feed(b"::stevedore-progress::5 ", &mut |u| found.push(u));
        for _ in 0..1000 {
            line.feed(&[b'x'; 64], &mut |u| found.push(u));
            assert!(line.bytes.len() <= MAX_PROGRESS_LINE_BYTES + 1);
        }
        line.feed(b"\n::stevedore-progress::6\n", &mut |u| found.push(u));
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].percent, Some(6));

        // Output that is not a progress line is never kept at all.
        line.feed(b"plain output without an end", &mut |u| found.push(u));
        assert!(line.bytes.is_empty() && line.skipping);
    }

    #[test]
    fn a_line_of_exactly_the_limit_is_progress_and_one_more_byte_is_not() {
        let head = "::stevedore-progress::1 ";
        let exact = format!("{head}{}", "m".repeat(MAX_PROGRESS_LINE_BYTES - head.len()));
        let over = format!("{exact}m");
        for (text, expected) in [(&exact, 1), (&over, 0)] {
            let (first, second) = text.split_at(30);
            let found = scan_all(&[
                (OutputStream::Stdout, first.as_bytes()),
                (OutputStream::Stdout, second.as_bytes()),
                (OutputStream::Stdout, b"\r\n"),
            ]);
            assert_eq!(found.len(), expected, "{} bytes", text.len());
        }
    }

    #[tokio::test]
    async fn updates_are_coalesced_field_by_field() {
        let mut reporter = ProgressReporter::new(Duration::from_millis(50));
        assert_eq!(reporter.due(), None);
        reporter.scan(
            OutputStream::Stdout,
            b"::stevedore-progress::10 first\n::stevedore-progress:: second\n",
        );
        assert!(reporter.is_due());
        reporter.last_sent = Some(Instant::now());
        reporter.scan(OutputStream::Stdout, b"::stevedore-progress::20\n");
        assert_eq!(
            reporter.pending,
            Some(ProgressUpdate {
                percent: Some(20),
                msg: Some("second".into())
            })
        );
        assert!(!reporter.is_due());
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(reporter.is_due());
    }

    proptest! {
        #[test]
        fn parsing_never_panics(line in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_progress_line(&line);
            let mut marked = PROGRESS_MARKER.as_bytes().to_vec();
            marked.extend_from_slice(&line);
            if let Some(update) = parse_progress_line(&marked) {
                prop_assert!(update.percent.is_none_or(|percent| percent <= 100));
                let msg_ok = update.msg.is_none_or(|msg| {
                    !msg.is_empty() && msg.len() <= MAX_PROGRESS_MESSAGE_BYTES && msg.trim() == msg
                });
                prop_assert!(msg_ok);
            }
        }

        #[test]
        fn what_a_worker_prints_is_what_is_reported(
            percent in 0u8..=100,
            message in "[^\n\r]{0,700}",
        ) {
            let line = format!("{PROGRESS_MARKER}{percent} {message}");
            let update = parse_progress_line(line.as_bytes()).unwrap();
            prop_assert_eq!(update.percent, Some(percent));
            let trimmed = message.trim();
            match update.msg {
                None => prop_assert!(trimmed.is_empty()),
                Some(msg) => {
                    prop_assert!(trimmed.starts_with(&msg));
                    if trimmed.len() <= MAX_PROGRESS_MESSAGE_BYTES {
                        prop_assert_eq!(msg, trimmed);
                    }
                }
            }
        }

        #[test]
        fn percents_above_100_are_never_progress(percent in 101u32..100_000) {
            let line = format!("{PROGRESS_MARKER}{percent} too much");
            prop_assert_eq!(parse_progress_line(line.as_bytes()), None);
        }

        #[test]
        fn chunk_boundaries_do_not_matter(
            lines in proptest::collection::vec(
                prop_oneof![
                    (0u8..=120, "[a-z ]{0,20}")
                        .prop_map(|(p, m)| format!("{PROGRESS_MARKER}{p} {m}")),
                    "[a-z:\\- ]{0,40}",
                    Just(format!("{PROGRESS_MARKER}{}", "y".repeat(MAX_PROGRESS_LINE_BYTES))),
                ],
                0..20,
            ),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..10),
        ) {
            let text = lines.iter().map(|line| format!("{line}\n")).collect::<String>();
            let bytes = text.as_bytes();
            let whole = scan_all(&[(OutputStream::Stdout, bytes)]);
            let mut cuts: Vec<usize> = cuts.iter().map(|cut| cut.index(bytes.len() + 1)).collect();
            cuts.push(0);
            cuts.push(bytes.len());
            cuts.sort_unstable();
            let chunks: Vec<(OutputStream, &[u8])> = cuts
                .windows(2)
                .map(|pair| (OutputStream::Stdout, &bytes[pair[0]..pair[1]]))
                .collect();
            prop_assert_eq!(scan_all(&chunks), whole.clone());
            let expected: Vec<ProgressUpdate> = lines
                .iter()
                .filter_map(|line| parse_progress_line(line.as_bytes()))
                .collect();
            prop_assert_eq!(whole, expected);
        }
    }
}
