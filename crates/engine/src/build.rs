//! Building an image from a Dockerfile: what a caller asks for ([`BuildRequest`]), what it
//! gets back ([`BuiltImage`]) and what it sees on the way ([`BuildProgress`]).
//!
//! The build context (the directory the Dockerfile's `COPY` reads from) is walked and tarred
//! by `context`; the engine's answer is turned into progress events here.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::engine::PullProgress;

/// The largest build context sent by default: 1 GiB of file contents. A bigger context is
/// almost always a forgotten `.dockerignore` (a `node_modules`, a `.git`, build output).
pub const DEFAULT_MAX_BUILD_CONTEXT_BYTES: u64 = 1 << 30;

/// The Dockerfile's default name, at the root of the context.
pub const DEFAULT_DOCKERFILE: &str = "Dockerfile";

/// Output kept while waiting for the end of a line; longer lines are passed on in pieces.
const MAX_PENDING_LINE: usize = 64 << 10;

/// An image build (`docker build`), from a local directory.
///
/// The engine's classic builder runs it (BuildKit needs a client that speaks its own
/// protocol), so BuildKit-only Dockerfile syntax (`RUN --mount`, heredocs) does not work.
///
/// # The context and `.dockerignore`
///
/// Regular files, directories and symlinks (as symlinks, never followed) are sent; sockets,
/// FIFOs and devices are skipped. Entries are owned by root in the tar and keep their
/// permission bits and modification times.
///
/// `.dockerignore` at the root of the context leaves files out, with the `docker` CLI's rules:
/// one pattern a line; lines starting with `#` are comments; surrounding spaces are trimmed; a
/// leading `/`, `./` and `.`/`..` components are cleaned away; `!pattern` re-includes what an
/// earlier pattern excluded, and the last matching pattern decides. A pattern matches a path or
/// any of its parent directories (`build` leaves out everything below `build/`). In a pattern
/// `*` matches any run of characters but `/`, `?` one character but `/`, `**` any number of
/// directories (`**/*.log`, `docs/**`), `[a-z]` and `[^a-z]` a character class, and `\`
/// escapes the next character. An excluded directory is not walked at all unless an exception
/// names something below it (`!build/keep.txt`), as with the CLI. The Dockerfile and
/// `.dockerignore` itself are always sent. A broken pattern (an unclosed `[`) is refused.
/// BuildKit's per-Dockerfile `<name>.dockerignore` is not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildRequest {
    /// The build context: a local directory, sent to the engine as a tar. Its `.dockerignore`
    /// leaves files out, as described above.
    pub context_dir: PathBuf,
    /// The Dockerfile's path inside the context, `/`-separated (default `Dockerfile`). It must
    /// lie inside the context, and is sent even when `.dockerignore` excludes it.
    pub dockerfile: String,
    /// References the built image is tagged with, e.g. `team/app:2`; a reference without a
    /// tag gets `:latest`. With none the image is known by its id only.
    pub tags: Vec<String>,
    /// Values for the Dockerfile's `ARG`s.
    pub build_args: BTreeMap<String, String>,
    /// Labels set on the built image.
    pub labels: BTreeMap<String, String>,
    /// Ask the registry for newer versions of the base images; the build then fails when the
    /// registry cannot be reached or does not have the image. When false (the default), a
    /// base image present locally is used as it is, so building `FROM` a local image works
    /// without any registry; a base image that is missing is still pulled by the engine.
    pub pull: bool,
    /// Build every step afresh instead of reusing the engine's cached layers.
    pub no_cache: bool,
    /// The largest context accepted, in bytes of file contents; a bigger one is refused
    /// before anything is sent. Default [`DEFAULT_MAX_BUILD_CONTEXT_BYTES`].
    pub max_context_bytes: u64,
}

/// A successful build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltImage {
    /// The image's id, e.g. `sha256:3f1c...`.
    pub id: String,
    /// The references it was tagged with, normalized (`:latest` added where no tag was given).
    pub tags: Vec<String>,
}

/// One step of a build, for a progress display. The texts are the engine's, for display
/// only: failures are decided from the engine's structured answers, never from these lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildProgress {
    /// The context was read and is about to be sent: how much of it there is.
    Context {
        /// Regular files in it (directories and symlinks not counted).
        files: u64,
        /// Their contents, in bytes.
        bytes: u64,
    },
    /// The engine began a Dockerfile step (`Step 2/5 : RUN make`).
    Step {
        /// The step's number, from 1.
        number: u32,
        /// How many steps the build has (the engine counts a step for the labels too).
        total: u32,
        /// The instruction as the engine prints it, e.g. `RUN make`.
        instruction: String,
    },
    /// A line of output: the builder's own (` ---> Running in 5e2f...`) or what a `RUN`
    /// printed (stdout and stderr together), without its line ending.
    Output {
        /// The line.
        line: String,
    },
    /// The engine is pulling a base image the Dockerfile names.
    Pull(PullProgress),
    /// The engine reported the built image's id.
    ImageId {
        /// The id, e.g. `sha256:3f1c...`.
        id: String,
    },
}

/// Turns the engine's `stream` texts, which arrive in arbitrary pieces, into whole lines.
#[derive(Debug, Default)]
pub(crate) struct OutputLines {
    pending: String,
}

// === impl BuildRequest ===

impl BuildRequest {
    /// A build of `context_dir/Dockerfile` with no tags, arguments or labels, without pulling.
    pub fn new(context_dir: impl Into<PathBuf>) -> Self {
        BuildRequest {
            context_dir: context_dir.into(),
            dockerfile: DEFAULT_DOCKERFILE.to_owned(),
            tags: Vec::new(),
            build_args: BTreeMap::new(),
            labels: BTreeMap::new(),
            pull: false,
            no_cache: false,
            max_context_bytes: DEFAULT_MAX_BUILD_CONTEXT_BYTES,
        }
    }

    /// Adds a tag.
    pub fn tag(mut self, reference: impl Into<String>) -> Self {
        self.tags.push(reference.into());
        self
    }
}

// === impl OutputLines ===

impl OutputLines {
    /// Takes one piece of output and reports every line it completes.
    pub(crate) fn push(&mut self, text: &str, emit: &mut (dyn FnMut(BuildProgress) + Send)) {
        self.pending.push_str(text);
        while let Some(end) = self.pending.find('\n') {
            let line: String = self.pending.drain(..=end).collect();
            emit(event_of_line(&line));
        }
        if self.pending.len() > MAX_PENDING_LINE {
            let line = std::mem::take(&mut self.pending);
            emit(event_of_line(&line));
        }
    }

    /// Reports what is left: output that did not end with a line break.
    pub(crate) fn finish(&mut self, emit: &mut (dyn FnMut(BuildProgress) + Send)) {
        if !self.pending.is_empty() {
            let line = std::mem::take(&mut self.pending);
            emit(event_of_line(&line));
        }
    }
}

fn event_of_line(line: &str) -> BuildProgress {
    let line = line.strip_suffix('\n').unwrap_or(line);
    let line = line.strip_suffix('\r').unwrap_or(line);
    match parse_step(line) {
        Some((number, total, instruction)) => BuildProgress::Step {
            number,
            total,
            instruction: instruction.to_owned(),
        },
        None => BuildProgress::Output {
            line: line.to_owned(),
        },
    }
}

/// `Step 2/5 : RUN make` → `(2, 5, "RUN make")`.
fn parse_step(line: &str) -> Option<(u32, u32, &str)> {
    let rest = line.strip_prefix("Step ")?;
    let (counts, instruction) = rest.split_once(" : ")?;
    let (number, total) = counts.split_once('/')?;
    Some((number.parse().ok()?, total.parse().ok()?, instruction))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_of(pieces: &[&str]) -> Vec<BuildProgress> {
        let mut events = Vec::new();
        let mut lines = OutputLines::default();
        let mut emit = |event| events.push(event);
        for piece in pieces {
            lines.push(piece, &mut emit);
        }
        lines.finish(&mut emit);
        events
    }

    #[test]
    fn step_lines_split_across_pieces_become_steps() {
        // How engine 20.10 sends them: the step, then its line break on its own.
        let events = lines_of(&[
            "Step 1/3 : FROM stevedore/busybox:local",
            "\n",
            " ---> 4aeaaf968ba9\n",
            "Step 2/3 : RUN echo a && echo b",
            "\n",
            "a\nb\r\n",
            "no line break at the end",
        ]);
        assert_eq!(
            events,
            vec![
                BuildProgress::Step {
                    number: 1,
                    total: 3,
                    instruction: "FROM stevedore/busybox:local".into()
                },
                BuildProgress::Output {
                    line: " ---> 4aeaaf968ba9".into()
                },
                BuildProgress::Step {
                    number: 2,
                    total: 3,
                    instruction: "RUN echo a && echo b".into()
                },
                BuildProgress::Output { line: "a".into() },
                BuildProgress::Output { line: "b".into() },
                BuildProgress::Output {
                    line: "no line break at the end".into()
                },
            ]
        );
    }

    #[test]
    fn lines_that_only_look_like_steps_are_output() {
        for line in [
            "Step one : x",
            "Step 1/x : y",
            "Step 1/2 missing colon",
            "step 1/2 : z",
        ] {
            assert_eq!(
                lines_of(&[line]),
                vec![BuildProgress::Output { line: line.into() }]
            );
        }
    }

    #[test]
    fn an_endless_line_is_passed_on_in_pieces() {
        let long = "x".repeat(MAX_PENDING_LINE + 1);
        let events = lines_of(&[&long, "tail\n"]);
        assert_eq!(events.len(), 2);
    }
}
