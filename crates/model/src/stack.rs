//! Stacks: runtime names mapped to the image that runs a zip package and the launcher that
//! starts its `file_name`.

use serde::{Deserialize, Serialize};

/// The image every offline stack uses: built locally from the host's static busybox.
pub const LOCAL_BUSYBOX_IMAGE: &str = "stevedore/busybox:local";

/// One runtime.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stack {
    pub name: String,
    pub image: String,
    /// The program and arguments placed before the package's `file_name`; empty runs the
    /// file itself (it must be executable).
    pub launcher: Vec<String>,
}

impl Stack {
    pub fn new(name: &str, image: &str, launcher: &[&str]) -> Self {
        Self {
            name: name.to_owned(),
            image: image.to_owned(),
            launcher: launcher.iter().map(|part| (*part).to_owned()).collect(),
        }
    }

    /// The stacks a fresh installation knows. `binary` and `sh` run on the local busybox image
    /// and so work without a registry; the others pull their official images.
    pub fn defaults() -> Vec<Stack> {
        vec![
            Stack::new("binary", LOCAL_BUSYBOX_IMAGE, &[]),
            Stack::new("sh", LOCAL_BUSYBOX_IMAGE, &["sh"]),
            Stack::new("python", "python:3.12-slim", &["python3"]),
            Stack::new("node", "node:22-slim", &["node"]),
            Stack::new("ruby", "ruby:3.3-slim", &["ruby"]),
        ]
    }
}
