//! Images on the local engine, with progress on the terminal: building a code's image from a
//! Dockerfile (`code push --dockerfile`, `run --dockerfile`), pulling one that is missing
//! (`run`), and building the local stack images (`stack build-local`).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use stevedore_engine::{
    BuildProgress, BuildRequest, ImageBuilder, ImageStore, PullProgress, RegistryAuth,
};
use stevedore_model::CodeImages;
use stevedore_model::registry::LOCAL_CODE_REPOSITORY;
use stevedore_model::stack::{LOCAL_DEBIAN_IMAGE, LOCAL_DEBIAN_SUITE, LocalBuild};
use stevedore_model::{StackImages, StackTable};

/// Builds the image of code `name` from `context`/Dockerfile and returns its reference. Each
/// build gets a tag of its own, so every revision pins the exact image it was pushed with.
///
/// With `project`, the image goes under that project's path of `images` (and must then be
/// pushed when they live in a registry, see [`push_code_image`]); without (`stevedore run`),
/// it is a local image of this machine's alone.
pub async fn build_code_image(
    engine: &dyn ImageBuilder,
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
    engine: &dyn ImageBuilder,
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
    engine: &dyn ImageStore,
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

/// What `stack build-local` did for one image.
#[derive(Debug, serde::Serialize)]
pub struct LocalStackBuilt {
    /// The stack the image is for; none for the Debian base image the stacks share.
    pub stack: Option<String>,
    pub image: String,
    pub id: String,
    /// False when the image existed from the same recipe and was reused.
    pub built: bool,
    pub seconds: f64,
}

/// Builds the local images of the stacks `names` (every built-in stack when empty): busybox
/// from the host's static busybox, the others on a Debian base image bootstrapped from
/// Debian's archive. An image that exists from the same recipe is reused.
pub async fn build_local_stacks(
    engine: &dyn ImageBuilder,
    names: &[String],
    busybox: &Path,
    show_progress: bool,
) -> anyhow::Result<Vec<LocalStackBuilt>> {
    let table = StackTable::builtin(StackImages::Local);
    let mut wanted = Vec::new();
    for name in names {
        let stack = table.lookup(name)?;
        wanted.push(stack.name.clone());
    }
    let builds: Vec<LocalBuild> = StackTable::local_builds()
        .into_iter()
        .filter(|build| wanted.is_empty() || wanted.iter().any(|name| name == build.stack))
        .collect();
    let mut done = Vec::new();
    let mut base_ready = false;
    for build in builds {
        let mut started = std::time::Instant::now();
        let outcome = match build.packages {
            None => stevedore_engine::build_local_busybox_image(engine, busybox, build.image)
                .await
                .with_context(|| {
                    format!("cannot build {} from {}", build.image, busybox.display())
                })?,
            Some(packages) => {
                if !base_ready {
                    let base_started = std::time::Instant::now();
                    if show_progress {
                        eprintln!(
                            "{LOCAL_DEBIAN_IMAGE}: bootstrapped from Debian's archive unless it is built (a minute or two)"
                        );
                    }
                    let base = stevedore_engine::build_debian_base(
                        engine,
                        LOCAL_DEBIAN_IMAGE,
                        LOCAL_DEBIAN_SUITE,
                    )
                    .await
                    .with_context(|| format!("cannot build {LOCAL_DEBIAN_IMAGE}"))?;
                    if show_progress {
                        let verb = if base.was_built() { "built" } else { "reused" };
                        eprintln!("{verb} {LOCAL_DEBIAN_IMAGE}");
                    }
                    done.push(LocalStackBuilt {
                        stack: None,
                        image: LOCAL_DEBIAN_IMAGE.to_owned(),
                        id: base.id().to_owned(),
                        built: base.was_built(),
                        seconds: base_started.elapsed().as_secs_f64(),
                    });
                    base_ready = true;
                    // The base is reported on its own; the stack's time starts after it.
                    started = std::time::Instant::now();
                }
                let mut on_progress = |event: BuildProgress| {
                    if !show_progress {
                        return;
                    }
                    match event {
                        BuildProgress::Step {
                            number,
                            total,
                            instruction,
                        } => eprintln!("  step {number}/{total}: {instruction}"),
                        BuildProgress::Output { line } if !line.trim().is_empty() => {
                            eprintln!("    {}", line.trim_end());
                        }
                        _ => {}
                    }
                };
                stevedore_engine::build_debian_stack(
                    engine,
                    build.image,
                    LOCAL_DEBIAN_IMAGE,
                    packages,
                    &mut on_progress,
                )
                .await
                .with_context(|| format!("cannot build {}", build.image))?
            }
        };
        if show_progress && outcome.was_built() {
            eprintln!(
                "built {} for the stack {} in {:.0} s",
                build.image,
                build.stack,
                started.elapsed().as_secs_f64()
            );
        } else if show_progress {
            eprintln!("reused {} for the stack {}", build.image, build.stack);
        }
        done.push(LocalStackBuilt {
            stack: Some(build.stack.to_owned()),
            image: build.image.to_owned(),
            id: outcome.id().to_owned(),
            built: outcome.was_built(),
            seconds: started.elapsed().as_secs_f64(),
        });
    }
    Ok(done)
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
