//! The OCI runtime's image store against real components: images imported from the real
//! Docker engine, and pulled from a real registry (Debian's `docker-registry` on loopback,
//! with htpasswd basic auth, or over HTTPS with certificates of a throwaway authority made
//! with the `openssl` command), unpacked into a store in a temporary directory; whiteouts are
//! checked by mounting the layers as overlayfs.
//!
//! They need root (device nodes, ownership, `trusted.*` attributes, mounts), the Docker
//! engine (`scripts/ensure-docker.sh`) and, for the registry tests, `STEVEDORE_DOCKER_REGISTRY`
//! and `STEVEDORE_HTPASSWD` (`scripts/ensure-registry.sh`). Without them they skip, saying why,
//! unless `CI` is set: then they fail. Images they build or push are tagged
//! `stevedore-test/oci-…:<pid>` or under the test registry, and removed at the end.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stevedore_engine::oci::{OciImages, OciImagesSettings, UnpackedImage, UnpackedImages};
use stevedore_engine::{
    DockerEngine, EngineError, HOST_BUSYBOX, ImageBuilder, ImagePresence, ImageStore,
    LOCAL_BUSYBOX_IMAGE, PullProgress, RegistryAuth, build_local_busybox_image,
};
use tokio::sync::OnceCell;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const USER: &str = "alice";
const PASSWORD: &str = "registry-Passw0rd";

static LOCAL_IMAGE: OnceCell<()> = OnceCell::const_new();

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// Says why a test skips, or fails it under CI.
fn skip(why: &str) {
    assert!(!ci(), "CI is set and {why}");
    let _ = writeln!(std::io::stderr(), "skipped: {why}");
}

/// The Docker engine with the local busybox image, when this machine can run the tests.
async fn docker() -> Option<DockerEngine> {
    if std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(1)
        != 0
    {
        skip("the OCI image store needs root (device nodes, ownership, trusted attributes)");
        return None;
    }
    let engine = match DockerEngine::connect().await {
        Ok(engine) => engine,
        Err(error) => {
            skip(&format!(
                "the Docker engine is not reachable ({error}); run scripts/ensure-docker.sh"
            ));
            return None;
        }
    };
    let built = LOCAL_IMAGE
        .get_or_try_init(|| async {
            build_local_busybox_image(&engine, Path::new(HOST_BUSYBOX), LOCAL_BUSYBOX_IMAGE)
                .await
                .map(|_| ())
        })
        .await;
    if let Err(error) = built {
        skip(&format!(
            "the local busybox image cannot be built ({error}); run scripts/ensure-docker.sh"
        ));
        return None;
    }
    Some(engine)
}

macro_rules! docker_or_skip {
    () => {
        match docker().await {
            Some(engine) => engine,
            None => return Ok(()),
        }
    };
}

/// A store in a temporary directory.
async fn store(with_docker: bool) -> Result<(OciImages, tempfile::TempDir), EngineError> {
    let dir = tempfile::tempdir().map_err(|e| EngineError::Protocol {
        message: e.to_string(),
    })?;
    let settings = OciImagesSettings::new(dir.path().join("images"));
    let store = if with_docker {
        OciImages::open_with_local_docker(settings).await?
    } else {
        OciImages::open(settings).await?
    };
    Ok((store, dir))
}

/// Removes images by tag when dropped, even when the test panicked.
struct Images(Vec<String>);

impl Drop for Images {
    fn drop(&mut self) {
        for image in &self.0 {
            let _ = Command::new("docker")
                .args(["rmi", image])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Builds `reference` from `dockerfile` (no context) with `docker build`.
fn docker_build(reference: &str, dockerfile: &str) -> TestResult {
    let mut child = Command::new("docker")
        .args(["build", "-q", "-t", reference, "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?;
    child
        .stdin
        .take()
        .ok_or("no stdin")?
        .write_all(dockerfile.as_bytes())?;
    let status = child.wait()?;
    assert!(status.success(), "docker build {reference} failed");
    Ok(())
}

/// A base image, and an image on it whose one layer deletes a file and a directory of the
/// base and replaces another directory whole (an opaque directory).
fn whiteout_image(tag: &str) -> TestResult {
    docker_build(
        tag,
        &format!(
            "FROM {LOCAL_BUSYBOX_IMAGE}\n\
             RUN rm /etc/group && rm -r /var/tmp && mkdir -p /home/old && touch /home/old/file\n\
             RUN rm -r /home && mkdir /home && echo new > /home/new && chmod 4750 /home/new \
                 && ln /home/new /home/hardlink && mkfifo /home/fifo\n"
        ),
    )
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .map(|metadata| metadata.permissions().mode() & 0o7777)
        .unwrap_or(0)
}

fn is_whiteout(path: &Path) -> bool {
    std::fs::symlink_metadata(path)
        .is_ok_and(|metadata| metadata.file_type().is_char_device() && metadata.rdev() == 0)
}

fn opaque(path: &Path) -> bool {
    let mut value = [0_u8; 8];
    rustix::fs::lgetxattr(path, "trusted.overlay.opaque", &mut value)
        .is_ok_and(|length| &value[..length] == b"y")
}

/// Every path of a layer with its kind, mode, owner and content (or link target): what two
/// unpackings of the same layer must agree on.
fn listing(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, into: &mut BTreeMap<String, String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(metadata) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            let relative = path
                .strip_prefix(root)
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            let what = if metadata.is_dir() {
                walk(root, &path, into);
                "dir".to_owned()
            } else if metadata.file_type().is_symlink() {
                format!(
                    "-> {}",
                    std::fs::read_link(&path)
                        .map(|t| t.display().to_string())
                        .unwrap_or_default()
                )
            } else if metadata.is_file() {
                let bytes = std::fs::read(&path).unwrap_or_default();
                format!("file {} {:x}", bytes.len(), fxhash(&bytes))
            } else {
                format!("special {:x}", metadata.rdev())
            };
            into.insert(
                relative,
                format!(
                    "{what} {:o} {}:{}",
                    metadata.mode() & 0o7777,
                    metadata.uid(),
                    metadata.gid()
                ),
            );
        }
    }
    let mut into = BTreeMap::new();
    walk(root, root, &mut into);
    into
}

fn fxhash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Mounts the image's layers read-only as overlayfs at `target` and hands back a guard.
struct Overlay(PathBuf);

impl Overlay {
    fn mount(
        image: &UnpackedImage,
        target: &Path,
    ) -> Result<Overlay, Box<dyn std::error::Error + Send + Sync>> {
        std::fs::create_dir_all(target)?;
        // overlayfs lists the top layer first.
        let lower: Vec<String> = image
            .layers
            .iter()
            .rev()
            .map(|layer| layer.display().to_string())
            .collect();
        let status = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!("lowerdir={}", lower.join(":")))
            .arg(target)
            .status()?;
        assert!(status.success(), "mounting the overlay failed");
        Ok(Overlay(target.to_owned()))
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn busybox_imported_from_docker_is_unpacked_once_with_its_modes_and_links() -> TestResult {
    let _engine = docker_or_skip!();
    let (store, _dir) = store(true).await?;

    let mut events = Vec::new();
    let presence = store
        .ensure_image_with_progress(LOCAL_BUSYBOX_IMAGE, None, &mut |event| events.push(event))
        .await?;
    assert_eq!(presence, ImagePresence::Pulled);
    assert!(matches!(events.first(), Some(PullProgress::Started { .. })));
    assert!(matches!(
        events.last(),
        Some(PullProgress::Finished { ok: true, .. })
    ));
    assert!(
        events
            .iter()
            .any(|e| matches!(e, PullProgress::Layer { total: Some(t), .. } if *t > 0)),
        "layer events carry their size, for a runner's size limit: {events:?}"
    );
    assert_eq!(
        store.ensure_image(LOCAL_BUSYBOX_IMAGE, None, None).await?,
        ImagePresence::AlreadyPresent
    );

    let image = store
        .unpacked(LOCAL_BUSYBOX_IMAGE)
        .await?
        .ok_or("the image is not unpacked")?;
    let local = store
        .local_image(LOCAL_BUSYBOX_IMAGE)
        .await?
        .ok_or("no local image")?;
    let docker_id = std::process::Command::new("docker")
        .args(["image", "inspect", "-f", "{{.Id}}", LOCAL_BUSYBOX_IMAGE])
        .output()?;
    assert_eq!(
        String::from_utf8_lossy(&docker_id.stdout).trim(),
        image.id,
        "the id is Docker's"
    );
    assert_eq!(local.id, image.id);
    assert!(local.repo_digests.is_empty(), "built here, never pulled");
    assert!(local.labels.contains_key("stevedore.recipe"));
    assert_eq!(image.layers.len(), 1);
    assert_eq!(image.config.cmd, Some(vec!["sh".to_owned()]));
    assert_eq!(image.config.working_dir.as_deref(), Some("/mnt/task"));
    assert!(image.config.env.iter().any(|e| e.starts_with("PATH=")));

    let root = &image.layers[0];
    assert!(
        root.starts_with(store.root().join("layers/sha256")),
        "{}",
        root.display()
    );
    let busybox = root.join("bin/busybox");
    assert_eq!(mode(&busybox), 0o755);
    assert_eq!(
        std::fs::metadata(&busybox)?.len(),
        std::fs::metadata(HOST_BUSYBOX)?.len()
    );
    assert_eq!(
        std::fs::read_link(root.join("bin/sh"))?,
        Path::new("/bin/busybox")
    );
    assert_eq!(mode(&root.join("tmp")), 0o1777);
    assert_eq!(mode(&root.join("mnt/task")), 0o777);
    assert_eq!(mode(&root.join("root")), 0o700);
    assert!(std::fs::read_to_string(root.join("etc/passwd"))?.starts_with("root:x:0:0:"));

    // Another reference of the same image adds a name, no layer.
    let listed = store.list_images().await?;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].references, vec![LOCAL_BUSYBOX_IMAGE.to_owned()]);
    assert!(listed[0].size_bytes >= std::fs::metadata(HOST_BUSYBOX)?.len());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_image_over_the_size_limit_is_refused_before_anything_is_unpacked() -> TestResult {
    let _engine = docker_or_skip!();
    let dir = tempfile::tempdir()?;
    let mut settings = OciImagesSettings::new(dir.path().join("images"));
    settings.max_image_bytes = Some(1000);
    let store = OciImages::open_with_local_docker(settings).await?;
    let refused = store.ensure_image(LOCAL_BUSYBOX_IMAGE, None, None).await;
    match refused {
        Err(error @ EngineError::Refused { .. }) => assert!(!error.is_infrastructure()),
        other => panic!("an image over the limit: {other:?}"),
    }
    assert!(store.list_images().await?.is_empty());
    assert_eq!(
        std::fs::read_dir(store.root().join("layers/sha256"))?.count(),
        0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn deletions_in_a_layer_become_overlayfs_whiteouts_and_hide_the_base() -> TestResult {
    let _engine = docker_or_skip!();
    let tag = format!("stevedore-test/oci-whiteouts:{}", std::process::id());
    let _cleanup = Images(vec![tag.clone()]);
    whiteout_image(&tag)?;
    let (store, dir) = store(true).await?;
    store.ensure_image(&tag, None, None).await?;
    let image = store.unpacked(&tag).await?.ok_or("not unpacked")?;
    assert_eq!(image.layers.len(), 3);
    let (first, top) = (&image.layers[1], &image.layers[2]);
    assert!(is_whiteout(&first.join("etc/group")), "a deleted file");
    assert!(is_whiteout(&first.join("var/tmp")), "a deleted directory");
    assert!(opaque(&top.join("home")), "a directory replaced whole");
    assert_eq!(mode(&top.join("home/new")), 0o4750, "set-user-id kept");
    assert_eq!(
        std::fs::metadata(top.join("home/new"))?.ino(),
        std::fs::metadata(top.join("home/hardlink"))?.ino(),
        "a hard link stays one file"
    );
    assert!(
        std::fs::symlink_metadata(top.join("home/fifo"))?
            .file_type()
            .is_fifo()
    );

    // The kernel reads them so: the merged view lacks what the layers deleted.
    let merged = dir.path().join("merged");
    let _mounted = Overlay::mount(&image, &merged)?;
    assert!(merged.join("bin/busybox").is_file());
    assert!(!merged.join("etc/group").exists());
    assert!(!merged.join("var/tmp").exists());
    assert!(merged.join("var").is_dir());
    let home: Vec<String> = std::fs::read_dir(merged.join("home"))?
        .map(|entry| entry.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    let mut home = home;
    home.sort();
    assert_eq!(
        home,
        ["fifo", "hardlink", "new"],
        "the old contents are hidden"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn layers_are_shared_pinned_images_stay_and_the_last_user_removes_a_layer() -> TestResult {
    let _engine = docker_or_skip!();
    let tag = format!("stevedore-test/oci-shared:{}", std::process::id());
    let _cleanup = Images(vec![tag.clone()]);
    whiteout_image(&tag)?;
    let (store, _dir) = store(true).await?;
    // Both at once: the shared base layer is unpacked once and ends in place once.
    let (a, b) = tokio::join!(
        store.ensure_image(LOCAL_BUSYBOX_IMAGE, None, None),
        store.ensure_image(&tag, None, None)
    );
    a?;
    b?;
    let base = store
        .unpacked(LOCAL_BUSYBOX_IMAGE)
        .await?
        .ok_or("no base")?;
    let upper = store.unpacked(&tag).await?.ok_or("no upper")?;
    assert_eq!(upper.layers[0], base.layers[0], "the base layer is shared");
    let layers_dir = store.root().join("layers/sha256");
    assert_eq!(std::fs::read_dir(&layers_dir)?.count(), 3);
    assert_eq!(std::fs::read_dir(store.root().join("tmp"))?.count(), 0);

    let pinned = store.pin(&tag).ok_or("cannot pin")?;
    assert_eq!(pinned.layers, upper.layers);
    let refused = store.remove_image(&tag).await;
    assert!(
        matches!(refused, Err(EngineError::Conflict { .. })),
        "{refused:?}"
    );
    assert!(pinned.layers.iter().all(|layer| layer.is_dir()));
    drop(pinned);

    store.remove_image(&tag).await?;
    assert!(store.unpacked(&tag).await?.is_none());
    assert!(base.layers[0].is_dir(), "the base layer has another user");
    assert!(!upper.layers[2].exists(), "the image's own layers are gone");
    assert_eq!(std::fs::read_dir(&layers_dir)?.count(), 1);
    assert!(matches!(
        store.remove_image(&tag).await,
        Err(EngineError::ImageNotFound { .. })
    ));

    // Imported again, the base layer the store has is only hashed, not unpacked again.
    let mut events = Vec::new();
    store
        .ensure_image_with_progress(&tag, None, &mut |event| events.push(event))
        .await?;
    let skipped = events
        .iter()
        .filter(|e| matches!(e, PullProgress::Layer { status, .. } if status == "Already exists"))
        .count();
    assert_eq!(skipped, 1, "{events:?}");
    assert_eq!(store.unpacked(&tag).await?, Some(upper.clone()));
    assert!(upper.layers.iter().all(|layer| layer.is_dir()));
    store.remove_image(&tag).await?;

    // The store reopens as it was left.
    let root = store.root().to_owned();
    drop(store);
    let store = OciImages::open(OciImagesSettings::new(&root)).await?;
    assert_eq!(
        store.unpacked(LOCAL_BUSYBOX_IMAGE).await?,
        Some(base.clone())
    );
    store.remove_image(LOCAL_BUSYBOX_IMAGE).await?;
    assert_eq!(std::fs::read_dir(&layers_dir)?.count(), 0);
    assert!(store.list_images().await?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tag_rebuilt_in_docker_is_imported_again_and_the_old_image_waits_for_its_container()
-> TestResult {
    let _engine = docker_or_skip!();
    let tag = format!("stevedore-test/oci-rebuilt:{}", std::process::id());
    let _cleanup = Images(vec![tag.clone()]);
    docker_build(
        &tag,
        &format!("FROM {LOCAL_BUSYBOX_IMAGE}\nRUN echo one > /version\n"),
    )?;
    let (store, _dir) = store(true).await?;
    store.ensure_image(&tag, None, None).await?;
    let old = store.pin(&tag).ok_or("cannot pin")?;
    // The engine keeps the replaced image untagged: removed by id at the end.
    let _replaced = Images(vec![old.id.clone()]);

    docker_build(
        &tag,
        &format!("FROM {LOCAL_BUSYBOX_IMAGE}\nRUN echo two > /version\n"),
    )?;
    assert_eq!(
        store.ensure_image(&tag, None, None).await?,
        ImagePresence::Pulled,
        "the engine's image under the tag changed"
    );
    let new = store.unpacked(&tag).await?.ok_or("not imported")?;
    assert_ne!(new.id, old.id);
    assert_eq!(
        std::fs::read_to_string(new.layers[1].join("version"))?,
        "two\n"
    );
    // The old image lost its name but not its layers: a container runs on them.
    let listed = store.list_images().await?;
    let dangling = listed
        .iter()
        .find(|entry| entry.id == old.id)
        .ok_or("the pinned image is gone")?;
    assert!(dangling.references.is_empty());
    assert_eq!(
        std::fs::read_to_string(old.layers[1].join("version"))?,
        "one\n"
    );
    assert!(matches!(
        store.remove_image(&old.id).await,
        Err(EngineError::Conflict { .. })
    ));
    let old_layer = old.layers[1].clone();
    drop(old);
    let id = store
        .list_images()
        .await?
        .into_iter()
        .find(|e| e.references.is_empty());
    store
        .remove_image(&id.ok_or("no dangling image")?.id)
        .await?;
    assert!(!old_layer.exists());
    assert!(
        new.layers.iter().all(|layer| layer.is_dir()),
        "the new image keeps its layers"
    );
    Ok(())
}

/// A `docker-registry` process serving a temporary directory on a loopback port, with
/// htpasswd basic auth.
struct TestRegistry {
    child: Child,
    address: String,
    dir: tempfile::TempDir,
}

impl TestRegistry {
    fn start() -> Result<Option<TestRegistry>, Box<dyn std::error::Error + Send + Sync>> {
        let (Ok(binary), Ok(htpasswd)) = (
            std::env::var("STEVEDORE_DOCKER_REGISTRY"),
            std::env::var("STEVEDORE_HTPASSWD"),
        ) else {
            skip(
                "STEVEDORE_DOCKER_REGISTRY and STEVEDORE_HTPASSWD are not set (scripts/ensure-registry.sh)",
            );
            return Ok(None);
        };
        let dir = tempfile::tempdir()?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let address = format!("127.0.0.1:{port}");
        let users = Command::new(htpasswd)
            .args(["-Bbn", USER, PASSWORD])
            .output()?;
        assert!(users.status.success());
        std::fs::write(dir.path().join("htpasswd"), &users.stdout)?;
        let auth = format!(
            "auth:\n  htpasswd:\n    realm: stevedore-test\n    path: {}\n",
            dir.path().join("htpasswd").display()
        );
        let child = serve_registry(&binary, dir.path(), "config", &address, &auth)?;
        Ok(Some(TestRegistry {
            child,
            address,
            dir,
        }))
    }

    fn auth(&self, password: &str) -> RegistryAuth {
        RegistryAuth {
            username: Some(USER.to_owned()),
            password: Some(password.to_owned()),
            identity_token: None,
            server_address: Some(self.address.clone()),
        }
    }

    /// The file the registry serves blob `digest` from.
    fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `docker-registry` on `address` with the storage `dir/data` (registries started on
/// one `dir` serve the same images) and `extra` YAML (`auth:`, or `http.tls` indented under
/// `http:`), and waits until it listens.
fn serve_registry(
    binary: &str,
    dir: &Path,
    name: &str,
    address: &str,
    extra: &str,
) -> Result<Child, Box<dyn std::error::Error + Send + Sync>> {
    let config = format!(
        "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
         http:\n  addr: {address}\n{extra}",
        dir.join("data").display(),
    );
    let config_path = dir.join(format!("{name}.yml"));
    std::fs::write(&config_path, config)?;
    let mut child = Command::new(binary)
        .arg("serve")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(address).is_err() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(
                format!("the registry {name} did not listen on {address} within 20 s").into(),
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(child)
}

/// A free loopback address.
fn loopback_address() -> Result<String, std::io::Error> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    Ok(format!("127.0.0.1:{port}"))
}

/// A throwaway certificate authority, and server certificates it signs, made with the
/// `openssl` command in a temporary directory.
struct TestCa {
    dir: tempfile::TempDir,
}

impl TestCa {
    fn new() -> Result<TestCa, Box<dyn std::error::Error + Send + Sync>> {
        let dir = tempfile::tempdir()?;
        let ca = TestCa { dir };
        ca.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=stevedore test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ])?;
        Ok(ca)
    }

    /// The authority's certificate (PEM).
    fn certificate(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// A server certificate for `subject_alt_names` (`IP:127.0.0.1,DNS:localhost`) and its
    /// key, as `(certificate, key)`.
    fn issue(
        &self,
        name: &str,
        subject_alt_names: &str,
    ) -> Result<(PathBuf, PathBuf), Box<dyn std::error::Error + Send + Sync>> {
        let (key, request, certificate, extensions) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("{name}.ext"),
        );
        std::fs::write(
            self.dir.path().join(&extensions),
            format!(
                "subjectAltName={subject_alt_names}\nbasicConstraints=CA:FALSE\n\
                 keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"
            ),
        )?;
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &key,
            "-out",
            &request,
        ])?;
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &request,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &extensions,
            "-out",
            &certificate,
        ])?;
        Ok((self.dir.path().join(certificate), self.dir.path().join(key)))
    }

    fn openssl(&self, arguments: &[&str]) -> TestResult {
        let output = Command::new("openssl")
            .args(arguments)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()?;
        assert!(
            output.status.success(),
            "openssl {arguments:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(())
    }
}

/// Registries serving one storage: one over plain HTTP to push to (the Docker engine is not
/// told of the test's authority), one over HTTPS with a certificate for 127.0.0.1 and
/// localhost, and one over HTTPS with a certificate for another name, both signed by `ca`.
struct TlsRegistries {
    ca: TestCa,
    plain: String,
    tls: String,
    wrong_name: String,
    children: Vec<Child>,
    _dir: tempfile::TempDir,
}

impl TlsRegistries {
    fn start() -> Result<Option<TlsRegistries>, Box<dyn std::error::Error + Send + Sync>> {
        let Ok(binary) = std::env::var("STEVEDORE_DOCKER_REGISTRY") else {
            skip("STEVEDORE_DOCKER_REGISTRY is not set (scripts/ensure-registry.sh)");
            return Ok(None);
        };
        let dir = tempfile::tempdir()?;
        let ca = TestCa::new()?;
        let tls_config = |(certificate, key): (PathBuf, PathBuf)| {
            format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                certificate.display(),
                key.display()
            )
        };
        let good = tls_config(ca.issue("registry", "IP:127.0.0.1,DNS:localhost")?);
        let other = tls_config(ca.issue("elsewhere", "DNS:registry.example")?);
        let mut registries = TlsRegistries {
            ca,
            plain: loopback_address()?,
            tls: loopback_address()?,
            wrong_name: loopback_address()?,
            children: Vec::new(),
            _dir: dir,
        };
        let root = registries._dir.path().to_owned();
        for (name, address, extra) in [
            ("plain", registries.plain.clone(), String::new()),
            ("tls", registries.tls.clone(), good),
            ("wrong-name", registries.wrong_name.clone(), other),
        ] {
            let child = serve_registry(&binary, &root, name, &address, &extra)?;
            registries.children.push(child);
        }
        Ok(Some(registries))
    }
}

impl Drop for TlsRegistries {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The message of a failed pull, or a failure of the test saying what came instead.
fn pull_failure<T: std::fmt::Debug>(result: Result<T, EngineError>, what: &str) -> String {
    match result {
        Err(EngineError::PullFailed { message, .. }) => message,
        other => panic!("{what}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_https_registry_is_pulled_from_with_the_operators_ca_and_refused_without_it()
-> TestResult {
    let engine = docker_or_skip!();
    let Some(registries) = TlsRegistries::start()? else {
        return Ok(());
    };
    let tag = std::process::id();
    // An image of the test's own: pushing the shared busybox image would give it a repo
    // digest that other tests, running at the same time, do not expect.
    let local = format!("stevedore-test/oci-tls:{tag}");
    let pushed = format!("{}/oci/tls:{tag}", registries.plain);
    let _cleanup = Images(vec![local.clone(), pushed.clone()]);
    docker_build(
        &local,
        &format!("FROM {LOCAL_BUSYBOX_IMAGE}\nLABEL stevedore.test=\"https registry {tag}\"\n"),
    )?;
    let tagged = Command::new("docker")
        .args(["tag", &local, &pushed])
        .status()?;
    assert!(tagged.success());
    engine.push_image(&pushed, None).await?;
    let over_tls = format!("{}/oci/tls:{tag}", registries.tls);
    let dir = tempfile::tempdir()?;

    // The authority given: pulled over HTTPS, the same image Docker has.
    let mut settings = OciImagesSettings::new(dir.path().join("trusting"));
    settings.extra_ca_file = Some(registries.ca.certificate());
    let trusting = OciImages::open(settings).await?;
    trusting.ensure_image(&over_tls, None, None).await?;
    let expected = engine.image_id(&local).await?;
    assert_eq!(trusting.image_id(&over_tls).await?, expected);
    assert!(trusting.unpacked(&over_tls).await?.is_some());

    // The certificate is checked although the registry is on loopback: it speaks TLS, so
    // there is no falling back to plain HTTP.
    let (untrusting, _untrusting_dir) = store(false).await?;
    let unknown = pull_failure(
        untrusting.ensure_image(&over_tls, None, None).await,
        "an authority this machine does not trust",
    );
    assert!(
        unknown.contains(&format!("https://{}", registries.tls))
            && unknown.contains("authority this machine does not trust"),
        "{unknown}"
    );
    assert!(untrusting.list_images().await?.is_empty());

    let elsewhere = format!("{}/oci/tls:{tag}", registries.wrong_name);
    let wrong_name = pull_failure(
        trusting.ensure_image(&elsewhere, None, None).await,
        "a certificate for another name",
    );
    assert!(
        wrong_name.contains(&format!("https://{}", registries.wrong_name))
            && wrong_name.contains("its certificate is for another name"),
        "{wrong_name}"
    );

    // A loopback registry that does not speak TLS is still reached, over plain HTTP.
    let plain = format!("{}/oci/tls:{tag}", registries.plain);
    untrusting.ensure_image(&plain, None, None).await?;
    assert_eq!(untrusting.image_id(&plain).await?, expected);

    // An authority file that holds no certificate fails the store's open.
    let garbage = dir.path().join("not-a-ca.pem");
    std::fs::write(&garbage, "not a certificate\n")?;
    let mut settings = OciImagesSettings::new(dir.path().join("garbage"));
    settings.extra_ca_file = Some(garbage);
    let refused = OciImages::open(settings).await;
    assert!(
        matches!(refused, Err(EngineError::LocalIo { .. })),
        "{:?}",
        refused.err()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registry_pull_matches_the_docker_import_and_refusals_are_classified() -> TestResult {
    let engine = docker_or_skip!();
    let Some(registry) = TestRegistry::start()? else {
        return Ok(());
    };
    let local = format!("stevedore-test/oci-registry:{}", std::process::id());
    let remote = format!("{}/oci/whiteouts:{}", registry.address, std::process::id());
    let _cleanup = Images(vec![local.clone(), remote.clone()]);
    whiteout_image(&local)?;
    let tagged = Command::new("docker")
        .args(["tag", &local, &remote])
        .status()?;
    assert!(tagged.success());
    engine
        .push_image(&remote, Some(registry.auth(PASSWORD)))
        .await?;

    // Imported from Docker, for comparison.
    let (imported, _imported_dir) = store(true).await?;
    imported.ensure_image(&local, None, None).await?;
    let from_docker = imported.unpacked(&local).await?.ok_or("not imported")?;

    // Pulled, on a machine without Docker.
    let (pulled, _pulled_dir) = store(false).await?;
    let denied = pulled.ensure_image(&remote, None, None).await;
    assert!(
        matches!(denied, Err(EngineError::RegistryDenied { .. })),
        "no credentials: {denied:?}"
    );
    let wrong = pulled
        .ensure_image(&remote, Some(registry.auth("not-the-password")), None)
        .await;
    match &wrong {
        Err(error @ EngineError::RegistryDenied { message, .. }) => {
            assert!(message.contains("401"), "{message}");
            assert!(!error.is_infrastructure());
        }
        other => panic!("a wrong password: {other:?}"),
    }
    assert!(matches!(
        pulled.check_registry_access(&remote, None).await,
        Err(EngineError::RegistryDenied { .. })
    ));
    pulled
        .check_registry_access(&remote, Some(registry.auth(PASSWORD)))
        .await?;
    let missing = format!("{}/oci/none:1", registry.address);
    assert!(matches!(
        pulled
            .ensure_image(&missing, Some(registry.auth(PASSWORD)), None)
            .await,
        Err(EngineError::ImageNotFound { .. })
    ));
    let wrong_digest = format!(
        "{}/oci/whiteouts@sha256:{}",
        registry.address,
        "0".repeat(64)
    );
    assert!(matches!(
        pulled
            .ensure_image(&wrong_digest, Some(registry.auth(PASSWORD)), None)
            .await,
        Err(EngineError::ImageNotFound { .. })
    ));
    assert!(pulled.list_images().await?.is_empty());

    // Many tasks at once: one pull, every caller gets it.
    let pulled = Arc::new(pulled);
    let mut callers = Vec::new();
    for _ in 0..6 {
        let (pulled, remote, auth) = (Arc::clone(&pulled), remote.clone(), registry.auth(PASSWORD));
        callers.push(tokio::spawn(async move {
            pulled.ensure_image(&remote, Some(auth), None).await
        }));
    }
    for caller in callers {
        assert_eq!(caller.await??, ImagePresence::Pulled);
    }
    let from_registry = pulled.unpacked(&remote).await?.ok_or("not pulled")?;
    assert_eq!(from_registry.id, from_docker.id, "the same config");
    let names = |image: &UnpackedImage| -> Vec<String> {
        image
            .layers
            .iter()
            .map(|l| {
                l.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .collect()
    };
    assert_eq!(
        names(&from_registry),
        names(&from_docker),
        "the same layer digests"
    );
    for (a, b) in from_registry.layers.iter().zip(&from_docker.layers) {
        assert_eq!(
            listing(a),
            listing(b),
            "the same content in {}",
            a.display()
        );
    }
    let local_image = pulled.local_image(&remote).await?.ok_or("no local image")?;
    assert_eq!(local_image.repo_digests.len(), 1);
    assert!(
        local_image.repo_digests[0]
            .starts_with(&format!("{}/oci/whiteouts@sha256:", registry.address))
    );

    // Pulled by its digest: the same image.
    let by_digest = local_image.repo_digests[0].clone();
    assert_eq!(
        pulled
            .ensure_image(&by_digest, Some(registry.auth(PASSWORD)), None)
            .await?,
        ImagePresence::Pulled
    );
    assert_eq!(
        pulled.image_id(&by_digest).await?,
        Some(from_docker.id.clone())
    );

    // A registry that serves a layer other than its digest says: refused, nothing kept.
    let (fresh, _fresh_dir) = store(false).await?;
    let manifest: serde_json::Value = reqwest::Client::new()
        .get(format!(
            "http://{}/v2/oci/whiteouts/manifests/{}",
            registry.address,
            std::process::id()
        ))
        .header(
            "Accept",
            "application/vnd.docker.distribution.manifest.v2+json",
        )
        .basic_auth(USER, Some(PASSWORD))
        .send()
        .await?
        .json()
        .await?;
    let top = manifest["layers"]
        .as_array()
        .and_then(|layers| layers.last())
        .and_then(|layer| layer["digest"].as_str())
        .ok_or("no layers in the manifest")?
        .to_owned();
    let blob = registry.blob_file(&top);
    let mut bytes = std::fs::read(&blob)?;
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&blob, &bytes)?;
    let corrupt = fresh
        .ensure_image(&remote, Some(registry.auth(PASSWORD)), None)
        .await;
    assert!(
        matches!(corrupt, Err(EngineError::PullFailed { .. })),
        "a corrupt layer: {corrupt:?}"
    );
    assert!(fresh.list_images().await?.is_empty());
    // The other layers' downloads, stopped with the pull, clean up behind themselves.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_dir(fresh.root().join("tmp"))?.count() > 0 {
        assert!(Instant::now() < deadline, "temporary layers left behind");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let top_dir = fresh
        .root()
        .join("layers/sha256")
        .join(from_docker.layers[2].file_name().ok_or("no name")?);
    assert!(!top_dir.exists(), "no layer of unchecked content");
    Ok(())
}

/// Figures: the python stack image imported from Docker into a cold store, again into the
/// warm one (nothing to do), the disk it takes, the engine's own export for comparison, and a
/// second stack sharing its base layer. Run with
/// `cargo test --release -p stevedore-engine --test oci_images -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement: needs the local stack images (stevedore stack build-local)"]
async fn python_stack_import_figures() -> TestResult {
    let _engine = docker_or_skip!();
    let image = std::env::var("STEVEDORE_OCI_BENCH_IMAGE")
        .unwrap_or_else(|_| "stevedore/stack-python:3.11-local".to_owned());
    let sibling = std::env::var("STEVEDORE_OCI_BENCH_SIBLING")
        .unwrap_or_else(|_| "stevedore/stack-node:18-local".to_owned());

    let began = Instant::now();
    let saved = Command::new("sh")
        .arg("-c")
        .arg(format!("docker save {image} > /dev/null"))
        .status()?;
    assert!(saved.success());
    let export_alone = began.elapsed();

    let (store, _dir) = store(true).await?;
    let began = Instant::now();
    store.ensure_image(&image, None, None).await?;
    let cold = began.elapsed();
    let began = Instant::now();
    let presence = store.ensure_image(&image, None, None).await?;
    let warm = began.elapsed();
    assert_eq!(presence, ImagePresence::AlreadyPresent);
    let began = Instant::now();
    let unpacked = store.unpacked(&image).await?.ok_or("not unpacked")?;
    let lookup = began.elapsed();
    let disk = |path: &Path| -> String {
        Command::new("du")
            .arg("-sb")
            .arg(path)
            .output()
            .map(|out| {
                String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .next()
                    .unwrap_or("?")
                    .to_owned()
            })
            .unwrap_or_default()
    };
    let on_disk = disk(&store.root().join("layers"));
    let docker_size = Command::new("docker")
        .args(["image", "inspect", "-f", "{{.Size}}", &image])
        .output()?;
    println!(
        "oci image store: {image}: {} layers; cold import {:.2} s (the engine's export alone, \
         `docker save > /dev/null`: {:.2} s), warm ensure_image {:.2} ms, unpacked lookup \
         {:.3} ms; files {} bytes, {on_disk} bytes on disk (du -sb), Docker says {} bytes",
        unpacked.layers.len(),
        cold.as_secs_f64(),
        export_alone.as_secs_f64(),
        warm.as_secs_f64() * 1e3,
        lookup.as_secs_f64() * 1e3,
        store.disk_bytes(),
        String::from_utf8_lossy(&docker_size.stdout).trim()
    );

    if store.ensure_image(&sibling, None, None).await.is_ok() {
        // Only its own layers were unpacked: the time of a store that has the base.
        let (fresh, _fresh_dir) = self::store(true).await?;
        let began = Instant::now();
        fresh.ensure_image(&sibling, None, None).await?;
        let alone = began.elapsed();
        store.remove_image(&sibling).await?;
        let began = Instant::now();
        store.ensure_image(&sibling, None, None).await?;
        let sharing = began.elapsed();
        println!(
            "oci image store: {sibling}: into an empty store {:.2} s, beside {image} (its base \
             layer hashed, not unpacked) {:.2} s; the layers of both take {} bytes on disk",
            alone.as_secs_f64(),
            sharing.as_secs_f64(),
            disk(&store.root().join("layers"))
        );
    }
    Ok(())
}
