//! Images on the local engine, with progress on the terminal: building a code's image from a
//! Dockerfile (`code push --dockerfile`, `run --dockerfile`) and pulling one that is missing
//! (`run`).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use stevedore_engine::{BuildProgress, BuildRequest, ContainerEngine, PullProgress, RegistryAuth};
use stevedore_model::CodeImages;
use stevedore_model::registry::LOCAL_CODE_REPOSITORY;

/// Builds the image of code `name` from `context`/Dockerfile and returns its reference. Each
/// build gets a tag of its own, so every revision pins the exact image it was pushed with.
///
/// With `project`, the image goes under that project's path of `images` (and must then be
/// pushed when they live in a registry, see [`push_code_image`]); without (`stevedore run`),
/// it is a local image of this machine's alone.
pub async fn build_code_image(
    engine: &dyn ContainerEngine,
    project: Option<(&CodeImages, &str)>,
    name: &str,
    context: &Path,
    show_progress: bool,
) -> anyhow::Result<String> {
    let repository = match project {
        Some((images, project_id)) => images.repository_for(project_id, &repository_name(name)),
        None => format!("{LOCAL_CODE_REPOSITORY}/{}", repository_name(name)),
    };
    let reference = format!(
        "{repository}:{}",
        chrono::Utc::now().format("%Y%m%d%H%M%S%3f")
    );
    let mut request = BuildRequest::new(context).tag(reference.clone());
    request
        .labels
        .insert("stevedore.code".to_owned(), name.to_owned());
    let bar = bar(show_progress, "{spinner} building {msg}");
    bar.set_message(reference.clone());
    let mut on_progress = |event: BuildProgress| match event {
        BuildProgress::Step {
            number,
            total,
            instruction,
        } => {
            bar.set_length(u64::from(total));
            bar.set_position(u64::from(number));
            bar.println(format!("step {number}/{total}: {instruction}"));
        }
        BuildProgress::Output { line } => {
            if !line.trim().is_empty() {
                bar.println(format!("  {}", line.trim_end()));
            }
        }
        BuildProgress::Context { files, bytes } => bar.println(format!(
            "sending the build context: {files} files, {}",
            crate::output::bytes(bytes)
        )),
        BuildProgress::Pull(_) | BuildProgress::ImageId { .. } => {}
    };
    let built = engine
        .build_image(&request, &mut on_progress)
        .await
        .with_context(|| format!("cannot build the image from {}", context.display()));
    bar.finish_and_clear();
    let built = built?;
    if show_progress {
        eprintln!("built {reference} ({})", built.id);
    }
    Ok(reference)
}

/// Pushes a built code image to the operator's registry, so runners on other machines can
/// pull it.
pub async fn push_code_image(
    engine: &dyn ContainerEngine,
    reference: &str,
    auth: RegistryAuth,
    show_progress: bool,
) -> anyhow::Result<()> {
    let bar = bar(show_progress, "{spinner} pushing {msg}");
    bar.set_message(reference.to_owned());
    let pushed = engine.push_image(reference, Some(auth)).await;
    bar.finish_and_clear();
    pushed.with_context(|| format!("cannot push {reference} to the code registry"))?;
    if show_progress {
        eprintln!("pushed {reference}");
    }
    Ok(())
}

/// Makes sure `image` is on the engine, pulling it with a progress bar when it is not.
pub async fn ensure_image(
    engine: &dyn ContainerEngine,
    image: &str,
    auth: Option<RegistryAuth>,
    show_progress: bool,
) -> anyhow::Result<()> {
    let bar = bar(
        show_progress,
        "pulling {msg} {bar:30} {bytes}/{total_bytes}",
    );
    bar.set_message(image.to_owned());
    let mut layers: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut on_progress = |event: PullProgress| {
        if let PullProgress::Layer {
            layer,
            current,
            total,
            ..
        } = event
        {
            let entry = layers.entry(layer).or_default();
            if let Some(current) = current {
                entry.0 = current;
            }
            if let Some(total) = total {
                entry.1 = total;
            }
            bar.set_length(layers.values().map(|(_, total)| total).sum());
            bar.set_position(layers.values().map(|(current, _)| current).sum());
        }
    };
    let result = engine
        .ensure_image_with_progress(image, auth, &mut on_progress)
        .await;
    bar.finish_and_clear();
    result
        .with_context(|| format!("the image {image} is not on the engine and cannot be pulled"))?;
    Ok(())
}

fn bar(show: bool, template: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

/// A Docker repository name made from a code name: lowercase letters, digits and single
/// separators.
fn repository_name(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    let out = out.trim_end_matches('-').to_owned();
    if out.is_empty() {
        "code".to_owned()
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_become_repository_names() {
        assert_eq!(repository_name("Hello World_2"), "hello-world-2");
        assert_eq!(repository_name("--x--"), "x");
        assert_eq!(repository_name("ünï"), "n");
        assert_eq!(repository_name("💥"), "code");
    }
}
