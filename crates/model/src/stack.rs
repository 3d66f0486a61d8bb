//! Runtimes and stacks, as IronWorker had them.
//!
//! A code's `runtime` says how its entry point is launched (`binary` runs the file itself,
//! `python` runs `python3 <file>`, `java` runs `java -jar <file>`...); its `stack` says which
//! image it runs on. Without a stack a code runs on its runtime's default stack. Stacks carry
//! versions in their names (`python-3.11`, `node-18`...) and answer to unversioned aliases
//! (`python`, `node`...); IronWorker's old names (`python-3.5`, `node-0.10`, `ruby-2.1`,
//! `java-1.7`, `php-5.4`...) map to the stack of the same language where such code plausibly
//! runs, and Python 2 to a clear refusal.
//!
//! The stack is resolved when a code is uploaded and stored on the revision, so a task runs on
//! what was validated. The table is configurable: every stack's image can be replaced and
//! stacks can be added ([`StackTable::apply`]).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The image the `busybox` stack uses: built locally from the host's static busybox.
pub const LOCAL_BUSYBOX_IMAGE: &str = "stevedore/busybox:local";

/// The Debian base image every other local stack is built on (`stevedore stack build-local`).
pub const LOCAL_DEBIAN_IMAGE: &str = "stevedore/debian:bookworm-local";

/// The Debian release the local stacks are built from, whose packages fix their versions.
pub const LOCAL_DEBIAN_SUITE: &str = "bookworm";

/// How a code's entry point is launched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// The file itself, made executable.
    Binary,
    Sh,
    Python,
    Node,
    Ruby,
    Php,
    /// `java -jar <file>`: the entry point is a jar with a `Main-Class`.
    Java,
    /// `go run <file>`: the entry point is a Go source file, compiled when the task starts
    /// (as IronWorker's Ruby client ran Go workers).
    Go,
}

/// Which images the built-in stacks name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StackImages {
    /// Each language's official image, as a connected machine pulls it (`python:3.11-slim`).
    #[default]
    Official,
    /// The images `stevedore stack build-local` builds from Debian's archive, for machines
    /// that reach no container registry.
    Local,
}

/// One stack: an image and the runtimes it can launch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stack {
    /// The canonical name, with its version (`python-3.11`); what a revision stores.
    pub name: String,
    /// Other names that find it (`python`, `python3`).
    pub aliases: Vec<String>,
    /// The runtimes it can launch; the first is the one a code that names only the stack gets.
    pub runtimes: Vec<Runtime>,
    pub image: String,
}

/// The stacks a server or runner knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackTable {
    stacks: Vec<Stack>,
}

/// A stack as `stevedore.toml`'s `[[stacks]]` gives it: a built-in stack's name with what
/// changes (usually `image`), or a new stack with its image and runtimes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StackSetting {
    pub name: String,
    pub image: Option<String>,
    pub aliases: Option<Vec<String>>,
    pub runtimes: Option<Vec<Runtime>>,
}

/// A runtime and the stack it runs on, as an upload resolved them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolvedStack<'a> {
    pub runtime: Runtime,
    pub stack: &'a Stack,
}

/// What can be wrong with a runtime, a stack or a pair of them. The messages are for users.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StackError {
    #[error(
        "runtime: unknown runtime {name:?}; the runtimes are {}",
        Runtime::names()
    )]
    UnknownRuntime { name: String },
    #[error("stack: unknown stack {name:?}; the stacks are {known}")]
    UnknownStack { name: String, known: String },
    #[error(
        "stack: {name:?} is Python 2, which no stack here runs (Python 2 code needs porting to Python 3); the stacks are {known}"
    )]
    Python2 { name: String, known: String },
    #[error(
        "stack: runtime {runtime} cannot run on stack {stack:?}, which runs {runs}; leave out `stack` for the runtime's default ({default})"
    )]
    Mismatch {
        runtime: Runtime,
        stack: String,
        runs: String,
        default: String,
    },
    #[error("stacks: {0}")]
    InvalidSetting(String),
}

/// One built-in stack: its names, runtimes, the official image and how its local image is
/// made from Debian's packages.
struct Builtin {
    name: &'static str,
    aliases: &'static [&'static str],
    runtimes: &'static [Runtime],
    /// `None`: no official image exists, the local build is the default everywhere.
    official_image: Option<&'static str>,
    local_image: &'static str,
    /// Debian packages installed on [`LOCAL_DEBIAN_IMAGE`]; `None` for busybox, which is not
    /// built on Debian.
    packages: Option<&'static [&'static str]>,
}

/// A local stack image and what goes into it, for `stevedore stack build-local`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalBuild {
    pub stack: &'static str,
    pub image: &'static str,
    /// Debian packages installed on [`LOCAL_DEBIAN_IMAGE`]; `None` for the busybox image,
    /// which is made from the host's static busybox.
    pub packages: Option<&'static [&'static str]>,
}

use Runtime::*;

/// The packages of each language, shared by its own stack and the default one.
const PYTHON_PACKAGES: &[&str] = &["python3"];
const NODE_PACKAGES: &[&str] = &["nodejs"];
const RUBY_PACKAGES: &[&str] = &["ruby"];
const PHP_PACKAGES: &[&str] = &["php-cli"];
const JAVA_PACKAGES: &[&str] = &["openjdk-17-jre-headless"];
const GO_PACKAGES: &[&str] = &["golang-go"];

const BUILTINS: &[Builtin] = &[
    Builtin {
        name: "busybox",
        aliases: &[],
        runtimes: &[Binary, Sh],
        official_image: None,
        local_image: LOCAL_BUSYBOX_IMAGE,
        packages: None,
    },
    Builtin {
        name: "default",
        aliases: &[],
        runtimes: &[Sh, Binary, Python, Node, Ruby, Php, Java],
        official_image: None,
        local_image: "stevedore/stack-default:local",
        packages: Some(&[
            "python3",
            "nodejs",
            "ruby",
            "php-cli",
            "openjdk-17-jre-headless",
        ]),
    },
    Builtin {
        name: "python-3.11",
        aliases: &["python", "python3"],
        runtimes: &[Python, Sh, Binary],
        official_image: Some("python:3.11-slim"),
        local_image: "stevedore/stack-python:3.11-local",
        packages: Some(PYTHON_PACKAGES),
    },
    Builtin {
        name: "node-18",
        aliases: &["node", "nodejs"],
        runtimes: &[Node, Sh, Binary],
        official_image: Some("node:18-slim"),
        local_image: "stevedore/stack-node:18-local",
        packages: Some(NODE_PACKAGES),
    },
    Builtin {
        name: "ruby-3.1",
        aliases: &["ruby"],
        runtimes: &[Ruby, Sh, Binary],
        official_image: Some("ruby:3.1-slim"),
        local_image: "stevedore/stack-ruby:3.1-local",
        packages: Some(RUBY_PACKAGES),
    },
    Builtin {
        name: "php-8.2",
        aliases: &["php"],
        runtimes: &[Php, Sh, Binary],
        official_image: Some("php:8.2-cli"),
        local_image: "stevedore/stack-php:8.2-local",
        packages: Some(PHP_PACKAGES),
    },
    Builtin {
        name: "java-17",
        aliases: &["java"],
        runtimes: &[Java, Sh, Binary],
        official_image: Some("eclipse-temurin:17-jre"),
        local_image: "stevedore/stack-java:17-local",
        packages: Some(JAVA_PACKAGES),
    },
    Builtin {
        name: "go-1.19",
        aliases: &["go", "golang"],
        runtimes: &[Go, Sh, Binary],
        official_image: Some("golang:1.19"),
        local_image: "stevedore/stack-go:1.19-local",
        packages: Some(GO_PACKAGES),
    },
];

// === impl Runtime ===

impl Runtime {
    pub const ALL: [Runtime; 8] = [Binary, Sh, Python, Node, Ruby, Php, Java, Go];

    pub fn name(self) -> &'static str {
        match self {
            Binary => "binary",
            Sh => "sh",
            Python => "python",
            Node => "node",
            Ruby => "ruby",
            Php => "php",
            Java => "java",
            Go => "go",
        }
    }

    /// The program and arguments placed before the entry point; empty runs the file itself.
    pub fn launcher(self) -> &'static [&'static str] {
        match self {
            Binary => &[],
            Sh => &["sh"],
            Python => &["python3"],
            Node => &["node"],
            Ruby => &["ruby"],
            Php => &["php"],
            Java => &["java", "-jar"],
            Go => &["go", "run"],
        }
    }

    /// The stack a code of this runtime runs on when it names none. `sh` gets the stack with
    /// every language, because IronWorker's Node and Ruby clients upload `sh` runners that
    /// call `node` and `ruby` and name no stack.
    pub fn default_stack(self) -> &'static str {
        match self {
            Binary => "busybox",
            Sh => "default",
            Python => "python-3.11",
            Node => "node-18",
            Ruby => "ruby-3.1",
            Php => "php-8.2",
            Java => "java-17",
            Go => "go-1.19",
        }
    }

    fn names() -> String {
        let names: Vec<&str> = Self::ALL.iter().map(|runtime| runtime.name()).collect();
        names.join(", ")
    }
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Runtime {
    type Err = StackError;

    /// A runtime's name; `python3` and `nodejs` are accepted for `python` and `node`.
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        let lower = name.trim().to_ascii_lowercase();
        let runtime = match lower.as_str() {
            "python3" => Some(Python),
            "nodejs" => Some(Node),
            "golang" => Some(Go),
            _ => Self::ALL
                .into_iter()
                .find(|runtime| runtime.name() == lower),
        };
        runtime.ok_or_else(|| StackError::UnknownRuntime {
            name: name.to_owned(),
        })
    }
}

// === impl StackImages ===

impl FromStr for StackImages {
    type Err = StackError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "official" => Ok(StackImages::Official),
            "local" => Ok(StackImages::Local),
            other => Err(StackError::InvalidSetting(format!(
                "stack_images must be \"official\" or \"local\", not {other:?}"
            ))),
        }
    }
}

// === impl Stack ===

impl Stack {
    /// Whether `name` finds this stack: its name or one of its aliases.
    pub fn answers_to(&self, name: &str) -> bool {
        self.name == name || self.aliases.iter().any(|alias| alias == name)
    }

    /// The runtime a code that names only this stack gets.
    pub fn primary_runtime(&self) -> Runtime {
        self.runtimes.first().copied().unwrap_or(Binary)
    }

    /// Whether this stack can launch a code of `runtime`.
    pub fn runs(&self, runtime: Runtime) -> bool {
        self.runtimes.contains(&runtime)
    }
}

// === impl StackTable ===

impl StackTable {
    /// The built-in stacks with their official images (or the local ones).
    pub fn builtin(images: StackImages) -> Self {
        let stacks = BUILTINS
            .iter()
            .map(|builtin| Stack {
                name: builtin.name.to_owned(),
                aliases: builtin.aliases.iter().map(|a| (*a).to_owned()).collect(),
                runtimes: builtin.runtimes.to_vec(),
                image: match (images, builtin.official_image) {
                    (StackImages::Official, Some(official)) => official.to_owned(),
                    _ => builtin.local_image.to_owned(),
                },
            })
            .collect();
        StackTable { stacks }
    }

    /// The built-in table with `settings` applied in order.
    pub fn configured(
        images: StackImages,
        settings: &[StackSetting],
    ) -> Result<StackTable, StackError> {
        let mut table = StackTable::builtin(images);
        for setting in settings {
            table.apply(setting)?;
        }
        Ok(table)
    }

    /// What `stevedore stack build-local` can build, in build order (busybox first, then the
    /// Debian stacks).
    pub fn local_builds() -> Vec<LocalBuild> {
        BUILTINS
            .iter()
            .map(|builtin| LocalBuild {
                stack: builtin.name,
                image: builtin.local_image,
                packages: builtin.packages,
            })
            .collect()
    }

    pub fn stacks(&self) -> &[Stack] {
        &self.stacks
    }

    /// The stack of this exact name (what a revision stores).
    pub fn get(&self, name: &str) -> Option<&Stack> {
        self.stacks.iter().find(|stack| stack.name == name)
    }

    /// The stack a user's name means: its name, an alias, or one of IronWorker's old
    /// versioned names (`ruby-2.1` runs on the `ruby` stack; Python 2 is refused).
    pub fn lookup(&self, name: &str) -> Result<&Stack, StackError> {
        let wanted = name.trim().to_ascii_lowercase();
        if let Some(stack) = self.stacks.iter().find(|stack| stack.answers_to(&wanted)) {
            return Ok(stack);
        }
        let legacy = wanted
            .split_once('-')
            .filter(|(_, version)| version.starts_with(|c: char| c.is_ascii_digit()));
        if let Some((language, version)) = legacy {
            let language = if language == "nodejs" {
                "node"
            } else {
                language
            };
            if language == "python" && version.split('.').next() == Some("2") {
                return Err(StackError::Python2 {
                    name: name.to_owned(),
                    known: self.known(),
                });
            }
            if let Some(stack) = self.stacks.iter().find(|stack| stack.answers_to(language)) {
                return Ok(stack);
            }
        }
        Err(StackError::UnknownStack {
            name: name.to_owned(),
            known: self.known(),
        })
    }

    /// The runtime and stack of an upload that gives `runtime`, `stack` or both. A runtime
    /// alone runs on its default stack; a stack alone with its primary runtime. A `runtime`
    /// that is no runtime but names a stack is read as that stack, as stevedore's own uploads
    /// once named stacks in `runtime`.
    pub fn resolve(
        &self,
        runtime: Option<&str>,
        stack: Option<&str>,
    ) -> Result<ResolvedStack<'_>, StackError> {
        let runtime = match runtime.map(str::trim).filter(|name| !name.is_empty()) {
            None => None,
            Some(name) => match name.parse::<Runtime>() {
                Ok(runtime) => Some(runtime),
                Err(unknown) if stack.is_none() => {
                    let stack = self.lookup(name).map_err(|_| unknown)?;
                    return Ok(ResolvedStack {
                        runtime: stack.primary_runtime(),
                        stack,
                    });
                }
                Err(unknown) => return Err(unknown),
            },
        };
        let stack = stack.map(str::trim).filter(|name| !name.is_empty());
        match (runtime, stack) {
            (Some(runtime), None) => {
                let stack = self.lookup(runtime.default_stack())?;
                self.check_pair(runtime, stack)
            }
            (Some(runtime), Some(name)) => self.check_pair(runtime, self.lookup(name)?),
            (None, Some(name)) => {
                let stack = self.lookup(name)?;
                Ok(ResolvedStack {
                    runtime: stack.primary_runtime(),
                    stack,
                })
            }
            (None, None) => Err(StackError::UnknownRuntime {
                name: String::new(),
            }),
        }
    }

    /// The stack a stored revision runs on: the stack it was resolved to, or for revisions
    /// stored before stacks were resolved, its runtime's default.
    pub fn for_revision(
        &self,
        runtime: &str,
        stack: Option<&str>,
    ) -> Result<ResolvedStack<'_>, StackError> {
        match stack {
            Some(name) => {
                let runtime: Runtime = runtime.parse()?;
                let stack = self.get(name).ok_or_else(|| StackError::UnknownStack {
                    name: name.to_owned(),
                    known: self.known(),
                })?;
                self.check_pair(runtime, stack)
            }
            None => self.resolve(Some(runtime), None),
        }
    }

    /// This table with the image of the stack `name` replaced (a test's or an operator's
    /// shortcut for the `image` of [`StackTable::apply`]).
    pub fn with_image(mut self, name: &str, image: &str) -> Result<StackTable, StackError> {
        self.apply(&StackSetting {
            name: name.to_owned(),
            image: Some(image.to_owned()),
            ..StackSetting::default()
        })?;
        Ok(self)
    }

    /// Changes a stack or adds one. Names and aliases stay unique.
    pub fn apply(&mut self, setting: &StackSetting) -> Result<(), StackError> {
        let name = setting.name.trim().to_ascii_lowercase();
        if name.is_empty() {
            return Err(StackError::InvalidSetting(
                "a stack needs a name".to_owned(),
            ));
        }
        match self.stacks.iter().position(|stack| stack.name == name) {
            Some(index) => {
                let stack = &mut self.stacks[index];
                if let Some(image) = &setting.image {
                    stack.image = image.clone();
                }
                if let Some(aliases) = &setting.aliases {
                    stack.aliases = aliases.clone();
                }
                if let Some(runtimes) = &setting.runtimes {
                    stack.runtimes = runtimes.clone();
                }
            }
            None => {
                let (Some(image), Some(runtimes)) = (&setting.image, &setting.runtimes) else {
                    return Err(StackError::InvalidSetting(format!(
                        "the new stack {name:?} needs an `image` and its `runtimes`"
                    )));
                };
                self.stacks.push(Stack {
                    name: name.clone(),
                    aliases: setting.aliases.clone().unwrap_or_default(),
                    runtimes: runtimes.clone(),
                    image: image.clone(),
                });
            }
        }
        self.check()
    }

    fn check(&self) -> Result<(), StackError> {
        let mut seen = std::collections::BTreeSet::new();
        for stack in &self.stacks {
            if stack.runtimes.is_empty() {
                return Err(StackError::InvalidSetting(format!(
                    "the stack {:?} runs no runtime",
                    stack.name
                )));
            }
            if stack.image.trim().is_empty() {
                return Err(StackError::InvalidSetting(format!(
                    "the stack {:?} has no image",
                    stack.name
                )));
            }
            for name in std::iter::once(&stack.name).chain(&stack.aliases) {
                if !seen.insert(name.as_str()) {
                    return Err(StackError::InvalidSetting(format!(
                        "the name {name:?} is given to two stacks"
                    )));
                }
            }
        }
        Ok(())
    }

    fn check_pair<'a>(
        &'a self,
        runtime: Runtime,
        stack: &'a Stack,
    ) -> Result<ResolvedStack<'a>, StackError> {
        if !stack.runs(runtime) {
            let runs: Vec<&str> = stack.runtimes.iter().map(|r| r.name()).collect();
            return Err(StackError::Mismatch {
                runtime,
                stack: stack.name.clone(),
                runs: runs.join(", "),
                default: runtime.default_stack().to_owned(),
            });
        }
        Ok(ResolvedStack { runtime, stack })
    }

    /// The stacks for a message: `busybox, default, python-3.11 (python, python3), ...`.
    fn known(&self) -> String {
        let names: Vec<String> = self
            .stacks
            .iter()
            .map(|stack| {
                if stack.aliases.is_empty() {
                    stack.name.clone()
                } else {
                    format!("{} ({})", stack.name, stack.aliases.join(", "))
                }
            })
            .collect();
        names.join(", ")
    }
}

impl Default for StackTable {
    fn default() -> Self {
        StackTable::builtin(StackImages::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolved(
        table: &StackTable,
        runtime: Option<&str>,
        stack: Option<&str>,
    ) -> (Runtime, String) {
        let resolved = table.resolve(runtime, stack).unwrap();
        (resolved.runtime, resolved.stack.name.clone())
    }

    #[test]
    fn a_runtime_alone_runs_on_its_default_stack() {
        let table = StackTable::default();
        for runtime in Runtime::ALL {
            let (got, stack) = resolved(&table, Some(runtime.name()), None);
            assert_eq!((got, stack.as_str()), (runtime, runtime.default_stack()));
        }
        // The official clients' `sh` runners call node and ruby: their stack has both.
        let default = table.get("default").unwrap();
        for runtime in [Node, Ruby, Python, Php, Java] {
            assert!(default.runs(runtime), "{runtime}");
        }
    }

    #[test]
    fn aliases_and_ironworkers_old_names_find_the_nearest_stack() {
        let table = StackTable::default();
        for (name, expected) in [
            ("python", "python-3.11"),
            ("python-3.5", "python-3.11"),
            ("Python-3.11", "python-3.11"),
            ("node-0.10", "node-18"),
            ("node-4", "node-18"),
            ("ruby-2.1", "ruby-3.1"),
            ("ruby-1.9", "ruby-3.1"),
            ("java-1.7", "java-17"),
            ("php-5.4", "php-8.2"),
            ("go-1.4", "go-1.19"),
            ("busybox", "busybox"),
        ] {
            assert_eq!(table.lookup(name).unwrap().name, expected, "{name}");
        }
        let python2 = table.lookup("python-2.7").unwrap_err();
        assert!(matches!(python2, StackError::Python2 { .. }));
        let message = python2.to_string();
        assert!(
            message.contains("python-3.11") && message.contains("Python 2"),
            "{message}"
        );
        let unknown = table.lookup("cobol-85").unwrap_err().to_string();
        assert!(
            unknown.contains("cobol-85") && unknown.contains("node-18"),
            "{unknown}"
        );
    }

    #[test]
    fn a_pair_that_cannot_work_is_refused() {
        let table = StackTable::default();
        assert_eq!(
            resolved(&table, Some("sh"), Some("ruby-2.1")),
            (Sh, "ruby-3.1".to_owned())
        );
        assert_eq!(
            resolved(&table, None, Some("python")),
            (Python, "python-3.11".to_owned())
        );
        let error = table
            .resolve(Some("php"), Some("python-3.11"))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("php") && error.contains("python-3.11"),
            "{error}"
        );
        assert!(matches!(
            table.resolve(Some("cobol"), Some("busybox")),
            Err(StackError::UnknownRuntime { .. })
        ));
        // stevedore once named stacks in `runtime`.
        assert_eq!(
            resolved(&table, Some("python-3.11"), None),
            (Python, "python-3.11".to_owned())
        );
    }

    #[test]
    fn revisions_stored_before_stacks_run_on_their_runtimes_default() {
        let table = StackTable::default();
        let old = table.for_revision("sh", None).unwrap();
        assert_eq!(old.stack.name, "default");
        let new = table.for_revision("sh", Some("busybox")).unwrap();
        assert_eq!(new.stack.name, "busybox");
        assert!(table.for_revision("sh", Some("gone")).is_err());
    }

    #[test]
    fn images_are_official_or_local_and_configurable() {
        let official = StackTable::builtin(StackImages::Official);
        assert_eq!(
            official.get("python-3.11").unwrap().image,
            "python:3.11-slim"
        );
        assert_eq!(
            official.get("default").unwrap().image,
            "stevedore/stack-default:local"
        );
        let local = StackTable::builtin(StackImages::Local);
        assert_eq!(
            local.get("python-3.11").unwrap().image,
            "stevedore/stack-python:3.11-local"
        );
        let table = StackTable::configured(
            StackImages::Official,
            &[
                StackSetting {
                    name: "node-18".into(),
                    image: Some("mirror.example.com/node:18".into()),
                    ..StackSetting::default()
                },
                StackSetting {
                    name: "deno-2".into(),
                    image: Some("denoland/deno:2".into()),
                    aliases: Some(vec!["deno".into()]),
                    runtimes: Some(vec![Sh]),
                },
            ],
        )
        .unwrap();
        assert_eq!(
            table.get("node-18").unwrap().image,
            "mirror.example.com/node:18"
        );
        assert_eq!(table.lookup("deno").unwrap().name, "deno-2");
        let clash = StackTable::configured(
            StackImages::Official,
            &[StackSetting {
                name: "other".into(),
                image: Some("x".into()),
                aliases: Some(vec!["python".into()]),
                runtimes: Some(vec![Sh]),
            }],
        );
        assert!(matches!(clash, Err(StackError::InvalidSetting(_))));
    }

    #[test]
    fn every_local_build_but_busybox_installs_debian_packages() {
        let builds = StackTable::local_builds();
        assert_eq!(builds[0].image, LOCAL_BUSYBOX_IMAGE);
        assert!(builds[0].packages.is_none());
        assert!(builds[1..].iter().all(|build| build.packages.is_some()));
    }
}
