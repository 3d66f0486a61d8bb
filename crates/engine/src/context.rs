//! The build context: the directory a build sends to the engine, filtered by its
//! `.dockerignore`, and the tar it is sent as.
//!
//! The context is walked first ([`plan_context`]): that finds the Dockerfile, applies
//! `.dockerignore`, skips what a tar cannot carry and refuses a context over its size limit,
//! all before the engine is contacted. The tar is then written from the plan
//! ([`write_context_tar`]), streamed in chunks rather than built in memory.
//!
//! The `.dockerignore` rules (the `docker` CLI's) are described on
//! [`BuildRequest`](crate::BuildRequest).

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use bytes::Bytes;

use crate::archive::{ArchiveFailure, stream_archive};
use crate::build::BuildRequest;
use crate::error::EngineError;

/// The ignore file's name, at the root of the context.
pub(crate) const DOCKERIGNORE: &str = ".dockerignore";

/// What a build sends: the entries of the context that survive `.dockerignore`, parents
/// before children, siblings in name order.
#[derive(Debug)]
pub(crate) struct ContextPlan {
    root: PathBuf,
    /// The Dockerfile's path in the context, `/`-separated, cleaned.
    pub(crate) dockerfile: String,
    entries: Vec<ContextEntry>,
    /// Regular files in the plan.
    pub(crate) files: u64,
    /// Their sizes when walked, in bytes.
    pub(crate) bytes: u64,
    max_bytes: u64,
}

#[derive(Debug)]
struct ContextEntry {
    /// The path relative to the root, as stored in the tar.
    path: PathBuf,
    /// The same path `/`-separated, for matching and messages.
    name: String,
    kind: EntryKind,
}

#[derive(Debug, PartialEq, Eq)]
enum EntryKind {
    Directory,
    File,
    Symlink(PathBuf),
}

/// The parsed `.dockerignore`.
#[derive(Debug, Default)]
pub(crate) struct IgnorePatterns {
    patterns: Vec<IgnorePattern>,
}

#[derive(Debug)]
struct IgnorePattern {
    /// The cleaned pattern, without its `!`.
    text: String,
    exception: bool,
    tokens: Vec<Token>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Char(char),
    /// `*`: any run of characters but `/`.
    Star,
    /// `**` at the end: anything.
    AnyPath,
    /// `**` elsewhere: nothing, or anything that ends with `/`.
    AnyDirectories,
    /// `?`: one character but `/`.
    One,
    /// `[...]`: one character in (or, negated, not in) the ranges.
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

/// Reads exactly the size a tar header announced: a file that shrank or grew while it was
/// sent would otherwise corrupt the archive.
struct ExactReader<R> {
    inner: io::Take<R>,
    remaining: u64,
}

// === impl ContextPlan ===

impl ContextPlan {
    /// Where the Dockerfile is on disk.
    #[cfg(any(test, feature = "fake"))]
    pub(crate) fn dockerfile_path(&self) -> PathBuf {
        self.root.join(&self.dockerfile)
    }

    fn check_size(&self) -> Result<(), EngineError> {
        if self.bytes > self.max_bytes {
            return Err(invalid(format!(
                "{} holds more than {} bytes of files, the limit; leave out what the build \
                 does not need with a {DOCKERIGNORE}",
                self.root.display(),
                self.max_bytes
            )));
        }
        Ok(())
    }

    #[cfg(test)]
    fn names(&self) -> Vec<&str> {
        self.entries.iter().map(|e| e.name.as_str()).collect()
    }
}

/// Walks the context of `request`: checks the Dockerfile, applies `.dockerignore`, counts
/// and limits the size. Blocking file system work: run it off the async executor.
pub(crate) fn plan_context(request: &BuildRequest) -> Result<ContextPlan, EngineError> {
    let root = request.context_dir.clone();
    let shown = root.display().to_string();
    match fs::metadata(&root) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Err(invalid(format!("{shown} is not a directory"))),
        Err(error) => return Err(invalid(format!("cannot read {shown}: {error}"))),
    }
    let dockerfile = clean_dockerfile(&request.dockerfile)?;
    match fs::metadata(root.join(&dockerfile)) {
        Ok(meta) if meta.is_file() => {}
        Ok(_) => return Err(invalid(format!("{dockerfile} in {shown} is not a file"))),
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            return Err(invalid(format!("there is no {dockerfile} in {shown}")));
        }
        Err(error) => return Err(invalid(format!("cannot read {dockerfile}: {error}"))),
    }
    let mut ignore = match fs::read_to_string(root.join(DOCKERIGNORE)) {
        Ok(text) => IgnorePatterns::parse(&text)?,
        Err(error) if error.kind() == io::ErrorKind::NotFound => IgnorePatterns::default(),
        Err(error) => return Err(invalid(format!("cannot read {DOCKERIGNORE}: {error}"))),
    };
    ignore.keep(DOCKERIGNORE);
    ignore.keep(&dockerfile);

    let mut plan = ContextPlan {
        root,
        dockerfile,
        entries: Vec::new(),
        files: 0,
        bytes: 0,
        max_bytes: request.max_context_bytes,
    };
    // Directories still to read, relative to the root; popped last-in first-out, so each
    // directory's children follow it.
    let mut pending: Vec<(PathBuf, String)> = vec![(PathBuf::new(), String::new())];
    while let Some((directory, directory_name)) = pending.pop() {
        let mut children = read_directory(&plan.root.join(&directory), &directory_name)?;
        children.sort();
        let mut subdirectories = Vec::new();
        for child in children {
            let path = directory.join(&child);
            let name = if directory_name.is_empty() {
                child.to_string_lossy().into_owned()
            } else {
                format!("{directory_name}/{}", child.to_string_lossy())
            };
            let on_disk = plan.root.join(&path);
            let meta = fs::symlink_metadata(&on_disk)
                .map_err(|error| invalid(format!("cannot read {name}: {error}")))?;
            let excluded = ignore.excludes(&name);
            let file_type = meta.file_type();
            if file_type.is_dir() {
                if !excluded || ignore.may_include_below(&name) {
                    subdirectories.push((path.clone(), name.clone()));
                }
                if !excluded {
                    plan.entries.push(ContextEntry {
                        path,
                        name,
                        kind: EntryKind::Directory,
                    });
                }
            } else if excluded {
                continue;
            } else if file_type.is_file() {
                plan.files += 1;
                plan.bytes = plan.bytes.saturating_add(meta.len());
                plan.check_size()?;
                plan.entries.push(ContextEntry {
                    path,
                    name,
                    kind: EntryKind::File,
                });
            } else if file_type.is_symlink() {
                let target = fs::read_link(&on_disk)
                    .map_err(|error| invalid(format!("cannot read the link {name}: {error}")))?;
                plan.entries.push(ContextEntry {
                    path,
                    name,
                    kind: EntryKind::Symlink(target),
                });
            } else {
                tracing::debug!(entry = %name, "not sending a socket, FIFO or device in the build context");
            }
        }
        pending.extend(subdirectories.into_iter().rev());
    }
    Ok(plan)
}

/// Streams the plan's tar from a blocking task, in chunks, as a request body.
///
/// When the context itself fails (a file cannot be read), the body ends with an error, which
/// the request reports as a transport failure; the returned [`ArchiveFailure`] then holds the
/// real reason. A body nobody reads any more (the request ended) stops the task.
pub(crate) fn stream_context(
    plan: ContextPlan,
) -> (
    impl futures::Stream<Item = Result<Bytes, io::Error>> + Send + 'static,
    ArchiveFailure,
) {
    stream_archive(move |out| write_context_tar(&plan, out))
}

fn read_directory(path: &Path, name: &str) -> Result<Vec<std::ffi::OsString>, EngineError> {
    let shown = if name.is_empty() { "." } else { name };
    let read_failed = |error: io::Error| invalid(format!("cannot read {shown}: {error}"));
    fs::read_dir(path)
        .map_err(read_failed)?
        .map(|entry| entry.map(|entry| entry.file_name()).map_err(read_failed))
        .collect()
}

/// Writes the plan's entries as a tar into `out` and returns `out`. Blocking file IO.
pub(crate) fn write_context_tar<W: Write>(plan: &ContextPlan, out: W) -> Result<W, EngineError> {
    let mut builder = tar::Builder::new(out);
    let mut sent: u64 = 0;
    for entry in &plan.entries {
        let on_disk = plan.root.join(&entry.path);
        let read_failed =
            |error: io::Error| invalid(format!("cannot read {}: {error}", entry.name));
        let written = match &entry.kind {
            EntryKind::Directory => {
                let meta = fs::symlink_metadata(&on_disk).map_err(read_failed)?;
                let mut header = header_for(tar::EntryType::Directory, &meta, 0);
                let mut path = entry.path.clone().into_os_string();
                path.push("/");
                builder.append_data(&mut header, path, io::empty())
            }
            EntryKind::File => {
                let file = fs::File::open(&on_disk).map_err(read_failed)?;
                let meta = file.metadata().map_err(read_failed)?;
                if !meta.is_file() {
                    return Err(invalid(format!("{} changed while it was sent", entry.name)));
                }
                sent = sent.saturating_add(meta.len());
                if sent > plan.max_bytes {
                    return Err(invalid(format!(
                        "{} grew past the limit of {} bytes of files while it was sent",
                        plan.root.display(),
                        plan.max_bytes
                    )));
                }
                let mut header = header_for(tar::EntryType::Regular, &meta, meta.len());
                let contents = ExactReader {
                    inner: file.take(meta.len()),
                    remaining: meta.len(),
                };
                builder.append_data(&mut header, &entry.path, contents)
            }
            EntryKind::Symlink(target) => {
                let meta = fs::symlink_metadata(&on_disk).map_err(read_failed)?;
                let mut header = header_for(tar::EntryType::Symlink, &meta, 0);
                header.set_mode(0o777);
                builder.append_link(&mut header, &entry.path, target)
            }
        };
        written.map_err(read_failed)?;
    }
    builder
        .into_inner()
        .map_err(|error| invalid(format!("cannot finish the context archive: {error}")))
}

fn header_for(kind: tar::EntryType, meta: &fs::Metadata, size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_size(size);
    header.set_mode(mode_of(meta));
    header.set_uid(0);
    header.set_gid(0);
    let mtime = meta
        .modified()
        .ok()
        .and_then(|time| time.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |since| since.as_secs());
    header.set_mtime(mtime);
    header
}

#[cfg(unix)]
fn mode_of(meta: &fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o7777
}

#[cfg(not(unix))]
fn mode_of(meta: &fs::Metadata) -> u32 {
    if meta.is_dir() { 0o755 } else { 0o644 }
}

/// The Dockerfile's path cleaned to `a/b/Dockerfile`; refused when empty, absolute or
/// reaching outside the context.
fn clean_dockerfile(dockerfile: &str) -> Result<String, EngineError> {
    let refuse = |why: &str| invalid(format!("the Dockerfile path {dockerfile:?} {why}"));
    if dockerfile.starts_with('/') || dockerfile.starts_with('\\') {
        return Err(refuse("must be relative to the context"));
    }
    let parts: Vec<&str> = dockerfile
        .split('/')
        .filter(|part| !part.is_empty() && *part != ".")
        .collect();
    if parts.contains(&"..") {
        return Err(refuse("must stay inside the context"));
    }
    if parts.is_empty() || dockerfile.contains('\0') {
        return Err(refuse("names no file"));
    }
    Ok(parts.join("/"))
}

fn invalid(reason: String) -> EngineError {
    EngineError::InvalidBuildContext { reason }
}

// === impl IgnorePatterns ===

impl IgnorePatterns {
    /// Parses the text of a `.dockerignore`.
    pub(crate) fn parse(text: &str) -> Result<Self, EngineError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut patterns = Vec::new();
        for (index, line) in text.lines().enumerate() {
            if line.starts_with('#') {
                continue;
            }
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let (exception, pattern) = match line.strip_prefix('!') {
                Some(rest) => (true, rest.trim()),
                None => (false, line),
            };
            let text = clean_pattern(pattern);
            if text.is_empty() {
                if exception {
                    return Err(invalid(format!(
                        "{DOCKERIGNORE} line {}: {line:?} excepts nothing",
                        index + 1
                    )));
                }
                continue;
            }
            let tokens = tokens_of(&text).map_err(|why| {
                invalid(format!(
                    "{DOCKERIGNORE} line {}: {line:?}: {why}",
                    index + 1
                ))
            })?;
            patterns.push(IgnorePattern {
                text,
                exception,
                tokens,
            });
        }
        Ok(IgnorePatterns { patterns })
    }

    /// Whether `path` (relative, `/`-separated) is left out: the last pattern that matches it
    /// or one of its parent directories decides.
    pub(crate) fn excludes(&self, path: &str) -> bool {
        let path: Vec<char> = path.chars().collect();
        let parents: Vec<&[char]> = (0..path.len())
            .filter(|at| path[*at] == '/')
            .map(|slash| &path[..slash])
            .collect();
        let mut excluded = false;
        for pattern in &self.patterns {
            // Only an exclusion can change an included path, only an exception an excluded one.
            if pattern.exception != excluded {
                continue;
            }
            let matches = |text: &[char]| matches_tokens(&pattern.tokens, text);
            let hit = matches(&path) || parents.iter().any(|parent| matches(parent));
            if hit {
                excluded = !pattern.exception;
            }
        }
        excluded
    }

    /// Whether an exception pattern names something below the excluded `directory`, so it
    /// must be walked after all.
    pub(crate) fn may_include_below(&self, directory: &str) -> bool {
        let below = format!("{directory}/");
        self.patterns
            .iter()
            .any(|pattern| pattern.exception && format!("{}/", pattern.text).starts_with(&below))
    }

    /// Makes sure `path` is included, whatever the patterns say.
    pub(crate) fn keep(&mut self, path: &str) {
        if self.excludes(path) {
            self.patterns.push(IgnorePattern {
                text: path.to_owned(),
                exception: true,
                tokens: path.chars().map(Token::Char).collect(),
            });
        }
    }
}

/// Cleans a pattern as a path: no empty, `.` or leading `..` components, no leading `/`.
fn clean_pattern(pattern: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    let absolute = pattern.starts_with('/');
    for part in pattern.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|last| *last != "..") {
                    parts.pop();
                } else if !absolute {
                    parts.push("..");
                }
            }
            part => parts.push(part),
        }
    }
    parts.join("/")
}

fn tokens_of(pattern: &str) -> Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    let mut chars = pattern.chars().peekable();
    while let Some(c) = chars.next() {
        let token = match c {
            '*' if chars.peek() == Some(&'*') => {
                chars.next();
                if chars.peek() == Some(&'/') {
                    chars.next();
                }
                if chars.peek().is_none() {
                    Token::AnyPath
                } else {
                    Token::AnyDirectories
                }
            }
            '*' => Token::Star,
            '?' => Token::One,
            '\\' => Token::Char(chars.next().ok_or("it ends with a lone \\")?),
            '[' => {
                let negated = chars.next_if_eq(&'^').is_some();
                let mut ranges = Vec::new();
                let mut first = true;
                loop {
                    let c = match chars.next() {
                        None => return Err("a [ is not closed".to_owned()),
                        Some(']') if !first => break,
                        Some('\\') => chars.next().ok_or("it ends with a lone \\")?,
                        Some(c) => c,
                    };
                    first = false;
                    let high = if chars.next_if_eq(&'-').is_some() {
                        match chars.next() {
                            None => return Err("a [ is not closed".to_owned()),
                            Some('\\') => chars.next().ok_or("it ends with a lone \\")?,
                            Some(high) => high,
                        }
                    } else {
                        c
                    };
                    if high < c {
                        return Err(format!("the range {c}-{high} is empty"));
                    }
                    ranges.push((c, high));
                }
                Token::Class { negated, ranges }
            }
            c => Token::Char(c),
        };
        tokens.push(token);
    }
    Ok(tokens)
}

fn matches_tokens(tokens: &[Token], text: &[char]) -> bool {
    let Some((token, rest)) = tokens.split_first() else {
        return text.is_empty();
    };
    match token {
        Token::Char(c) => text.first() == Some(c) && matches_tokens(rest, &text[1..]),
        Token::One => text.first().is_some_and(|c| *c != '/') && matches_tokens(rest, &text[1..]),
        Token::Class { negated, ranges } => {
            text.first().is_some_and(|c| {
                ranges.iter().any(|(low, high)| (low..=high).contains(&c)) != *negated
            }) && matches_tokens(rest, &text[1..])
        }
        Token::Star => {
            for skip in 0..=text.len() {
                if matches_tokens(rest, &text[skip..]) {
                    return true;
                }
                if text.get(skip) == Some(&'/') {
                    break;
                }
            }
            false
        }
        Token::AnyPath => (0..=text.len()).any(|skip| matches_tokens(rest, &text[skip..])),
        Token::AnyDirectories => {
            matches_tokens(rest, text)
                || (0..text.len())
                    .filter(|at| text[*at] == '/')
                    .any(|slash| matches_tokens(rest, &text[slash + 1..]))
        }
    }
}

// === impl ExactReader ===

impl<R: Read> Read for ExactReader<R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let read = self.inner.read(buffer)?;
        if read == 0 && self.remaining > 0 && !buffer.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file shrank while it was sent",
            ));
        }
        self.remaining -= read as u64;
        Ok(read)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn patterns(text: &str) -> IgnorePatterns {
        match IgnorePatterns::parse(text) {
            Ok(patterns) => patterns,
            Err(error) => panic!("{text:?} does not parse: {error}"),
        }
    }

    #[test]
    fn plain_names_exclude_files_and_everything_below_directories() {
        let ignore = patterns("secret.txt\nbuild\n");
        assert!(ignore.excludes("secret.txt"));
        assert!(ignore.excludes("build"));
        assert!(ignore.excludes("build/out/app.bin"));
        assert!(
            !ignore.excludes("src/secret.txt"),
            "names are relative to the root"
        );
        assert!(!ignore.excludes("builder"));
        assert!(!ignore.excludes("secret.txt.bak"));
    }

    #[test]
    fn globs_follow_the_docker_cli() {
        let ignore = patterns("*.log\nsrc/*/tmp\n**/*.pyc\ndocs/**\nfile?.txt\n[ab]c.md\n");
        assert!(ignore.excludes("debug.log"));
        assert!(!ignore.excludes("logs/debug.log"), "* does not cross /");
        assert!(ignore.excludes("src/a/tmp"));
        assert!(ignore.excludes("src/a/tmp/x"));
        assert!(!ignore.excludes("src/a/b/tmp"));
        assert!(ignore.excludes("x.pyc"));
        assert!(ignore.excludes("a/b/c/x.pyc"));
        assert!(ignore.excludes("docs/guide/intro.md"));
        assert!(
            !ignore.excludes("docs"),
            "docs/** needs something below docs"
        );
        assert!(ignore.excludes("file1.txt"));
        assert!(!ignore.excludes("file10.txt"));
        assert!(ignore.excludes("ac.md") && ignore.excludes("bc.md"));
        assert!(!ignore.excludes("cc.md"));

        let negated = patterns("[^a-c]*.md\n");
        assert!(negated.excludes("readme.md"));
        assert!(!negated.excludes("changes.md"));

        let escaped = patterns("\\*.txt\n");
        assert!(escaped.excludes("*.txt"));
        assert!(!escaped.excludes("a.txt"));
    }

    #[test]
    fn exceptions_re_include_and_the_last_match_decides() {
        let ignore = patterns("*.md\n!README.md\nREADME-old.md\n");
        assert!(ignore.excludes("CHANGES.md"));
        assert!(!ignore.excludes("README.md"));
        assert!(ignore.excludes("README-old.md"));

        let ignore = patterns("!keep.log\n*.log\n");
        assert!(
            ignore.excludes("keep.log"),
            "an earlier exception is overruled"
        );

        let ignore = patterns("build\n!build/keep.txt\n");
        assert!(ignore.excludes("build/other"));
        assert!(!ignore.excludes("build/keep.txt"));
        assert!(ignore.may_include_below("build"));
        assert!(!ignore.may_include_below("other"));
    }

    #[test]
    fn lines_are_trimmed_cleaned_and_commented() {
        let ignore = patterns("\u{feff}# a comment\n\n  /target/  \n./tmp\na/../b\n !c \n");
        assert!(ignore.excludes("target/debug"));
        assert!(ignore.excludes("tmp"));
        assert!(ignore.excludes("b"));
        assert!(!ignore.excludes("a"));
        assert!(!ignore.excludes("# a comment"));
        assert_eq!(ignore.patterns.len(), 4);
        assert!(ignore.patterns[3].exception);
    }

    #[test]
    fn broken_patterns_are_refused_with_their_line() {
        for text in ["ok\n[abc\n", "trailing\\", "!\n", "[z-a]"] {
            match IgnorePatterns::parse(text) {
                Err(EngineError::InvalidBuildContext { reason }) => {
                    assert!(reason.contains(DOCKERIGNORE), "{reason}")
                }
                other => panic!("{text:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn keep_adds_an_exception_only_when_needed() {
        let mut ignore = patterns("Dockerfile\n.dockerignore\n");
        ignore.keep("Dockerfile");
        ignore.keep(".dockerignore");
        ignore.keep("other");
        assert!(!ignore.excludes("Dockerfile"));
        assert!(!ignore.excludes(".dockerignore"));
        assert_eq!(ignore.patterns.len(), 4);
    }

    /// A context: a Dockerfile, files to keep and to leave out, a symlink and a socket.
    fn sample_context() -> Result<tempfile::TempDir, Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let root = dir.path();
        fs::write(root.join("Dockerfile"), "FROM scratch\nCOPY . /\n")?;
        fs::write(
            root.join(DOCKERIGNORE),
            "*.log\n!keep.log\nsecret\nnode_modules\nDockerfile\n",
        )?;
        fs::write(root.join("app.sh"), "#!/bin/sh\necho hi\n")?;
        fs::write(root.join("debug.log"), "noise")?;
        fs::write(root.join("keep.log"), "kept")?;
        fs::write(root.join("secret"), "hunter2")?;
        fs::create_dir_all(root.join("node_modules/left-pad"))?;
        fs::write(root.join("node_modules/left-pad/index.js"), "x")?;
        fs::create_dir_all(root.join("src/nested"))?;
        fs::write(root.join("src/nested/main.c"), "int main;")?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(root.join("app.sh"), fs::Permissions::from_mode(0o755))?;
            std::os::unix::fs::symlink("app.sh", root.join("link"))?;
            std::os::unix::fs::symlink("/etc/../etc/hostname", root.join("src/absolute"))?;
            std::os::unix::net::UnixListener::bind(root.join("socket"))?;
        }
        Ok(dir)
    }

    #[test]
    fn the_plan_honours_dockerignore_and_keeps_the_dockerfile() -> TestResult {
        let dir = sample_context()?;
        let plan = plan_context(&BuildRequest::new(dir.path()))?;
        let mut expected = vec![
            ".dockerignore",
            "Dockerfile",
            "app.sh",
            "keep.log",
            "src",
            "src/nested",
            "src/nested/main.c",
        ];
        if cfg!(unix) {
            expected.insert(4, "link");
            expected.insert(6, "src/absolute");
        }
        assert_eq!(plan.names(), expected);
        assert_eq!(plan.files, 5);
        assert_eq!(plan.dockerfile, "Dockerfile");
        Ok(())
    }

    #[test]
    fn the_tar_holds_modes_symlinks_and_contents() -> TestResult {
        let dir = sample_context()?;
        let plan = plan_context(&BuildRequest::new(dir.path()))?;
        let bytes = write_context_tar(&plan, Vec::new())?;
        let mut archive = tar::Archive::new(&bytes[..]);
        let mut seen = Vec::new();
        for entry in archive.entries()? {
            let mut entry = entry?;
            let header = entry.header();
            let kind = header.entry_type();
            let mode = header.mode()?;
            let owner = (header.uid()?, header.gid()?);
            let path = entry.path()?.to_string_lossy().into_owned();
            let link = entry
                .link_name()?
                .map(|target| target.to_string_lossy().into_owned());
            let mut contents = String::new();
            entry.read_to_string(&mut contents)?;
            assert_eq!(owner, (0, 0), "{path}");
            seen.push((path, kind, mode, link, contents));
        }
        let find = |name: &str| seen.iter().find(|entry| entry.0 == name);
        let app = find("app.sh").ok_or("app.sh missing")?;
        assert_eq!(app.4, "#!/bin/sh\necho hi\n");
        assert!(find("src/").is_some_and(|e| e.1 == tar::EntryType::Directory));
        assert!(find("secret").is_none());
        if cfg!(unix) {
            assert_eq!(app.2, 0o755);
            let link = find("link").ok_or("link missing")?;
            assert_eq!(link.1, tar::EntryType::Symlink);
            assert_eq!(link.3.as_deref(), Some("app.sh"));
            let absolute = find("src/absolute").ok_or("src/absolute missing")?;
            assert_eq!(absolute.3.as_deref(), Some("/etc/../etc/hostname"));
            assert!(find("socket").is_none());
        }
        Ok(())
    }

    #[test]
    fn an_excluded_directory_is_walked_only_for_its_exceptions() -> TestResult {
        let dir = tempfile::tempdir()?;
        let root = dir.path();
        fs::create_dir_all(root.join("build/deep"))?;
        fs::write(root.join("build/keep.txt"), "k")?;
        fs::write(root.join("build/drop.txt"), "d")?;
        fs::write(root.join("build/deep/drop.txt"), "d")?;
        fs::create_dir_all(root.join("docker"))?;
        fs::write(root.join("docker/app.Dockerfile"), "FROM scratch\n")?;
        fs::write(root.join(DOCKERIGNORE), "build\n!build/keep.txt\ndocker\n")?;
        let mut request = BuildRequest::new(root);
        request.dockerfile = "./docker//app.Dockerfile".to_owned();
        let plan = plan_context(&request)?;
        assert_eq!(plan.dockerfile, "docker/app.Dockerfile");
        assert_eq!(
            plan.names(),
            vec![".dockerignore", "build/keep.txt", "docker/app.Dockerfile"]
        );
        Ok(())
    }

    #[test]
    fn a_missing_or_escaping_dockerfile_and_a_missing_context_are_refused() -> TestResult {
        let dir = tempfile::tempdir()?;
        let refused = |request: &BuildRequest| match plan_context(request) {
            Err(error @ EngineError::InvalidBuildContext { .. }) => {
                assert!(!error.is_infrastructure());
                error.to_string()
            }
            other => panic!("expected a refusal, got {other:?}"),
        };
        let missing = refused(&BuildRequest::new(dir.path()));
        assert!(missing.contains("no Dockerfile"), "{missing}");

        fs::write(dir.path().join("Dockerfile"), "FROM scratch\n")?;
        for path in ["../Dockerfile", "/etc/Dockerfile", "", "./"] {
            let mut request = BuildRequest::new(dir.path());
            request.dockerfile = path.to_owned();
            refused(&request);
        }
        refused(&BuildRequest::new(dir.path().join("nonexistent")));
        refused(&BuildRequest::new(dir.path().join("Dockerfile")));
        Ok(())
    }

    #[test]
    fn a_context_over_the_limit_is_refused_before_sending() -> TestResult {
        let dir = tempfile::tempdir()?;
        fs::write(dir.path().join("Dockerfile"), "FROM scratch\n")?;
        fs::write(dir.path().join("big.bin"), vec![0u8; 4096])?;
        let mut request = BuildRequest::new(dir.path());
        request.max_context_bytes = 4096;
        match plan_context(&request) {
            Err(EngineError::InvalidBuildContext { reason }) => {
                assert!(reason.contains("limit"), "{reason}")
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        fs::write(dir.path().join(DOCKERIGNORE), "big.bin\n")?;
        assert!(plan_context(&request).is_ok(), "ignored files do not count");
        Ok(())
    }

    #[tokio::test]
    async fn the_streamed_tar_is_the_written_one() -> TestResult {
        let dir = sample_context()?;
        let plan = plan_context(&BuildRequest::new(dir.path()))?;
        let written = write_context_tar(&plan, Vec::new())?;
        let (body, failure) = stream_context(plan);
        let chunks: Vec<Result<Bytes, io::Error>> = futures::StreamExt::collect(body).await;
        let mut streamed = Vec::new();
        for chunk in chunks {
            streamed.extend_from_slice(&chunk?);
        }
        assert_eq!(streamed, written);
        assert!(failure.take().is_none());
        Ok(())
    }

    #[tokio::test]
    async fn a_file_gone_before_it_is_sent_fails_the_body_and_says_why() -> TestResult {
        let dir = tempfile::tempdir()?;
        fs::write(dir.path().join("Dockerfile"), "FROM scratch\n")?;
        fs::write(dir.path().join("vanishing.txt"), "here while walked")?;
        let plan = plan_context(&BuildRequest::new(dir.path()))?;
        fs::remove_file(dir.path().join("vanishing.txt"))?;
        let (body, failure) = stream_context(plan);
        let chunks: Vec<Result<Bytes, io::Error>> = futures::StreamExt::collect(body).await;
        assert!(matches!(chunks.last(), Some(Err(_))));
        match failure.take() {
            Some(EngineError::InvalidBuildContext { reason }) => {
                assert!(reason.contains("vanishing.txt"), "{reason}")
            }
            other => panic!("expected the context's failure, got {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn a_file_that_shrinks_while_it_is_sent_is_an_error_not_a_corrupt_tar() {
        let mut reader = ExactReader {
            inner: (&b"abc"[..]).take(10),
            remaining: 10,
        };
        let mut sink = Vec::new();
        let copied = io::copy(&mut reader, &mut sink);
        assert!(matches!(copied, Err(ref e) if e.kind() == io::ErrorKind::UnexpectedEof));
    }
}
