//! A small client of the OCI distribution API: what pulling an image needs (a manifest,
//! resolved through an index or manifest list to linux/amd64, its config, its layer blobs as
//! streams), with the two ways registries ask for credentials: Docker Hub's bearer tokens
//! (the `WWW-Authenticate: Bearer realm=…` challenge, a token fetched with the user's basic
//! credentials or none) and plain basic auth.
//!
//! Registries are reached over HTTPS, their certificates checked against the system's roots
//! and the operator's extra CA ([`extra_ca_file`](super::OciImagesSettings::extra_ca_file)),
//! never skipped. Loopback registries and
//! [`insecure_registries`](super::OciImagesSettings::insecure_registries) are tried over HTTPS
//! first as well, and over plain HTTP when what answers does not speak TLS, as Docker does; a
//! certificate such a registry presents is checked all the same (where Docker would skip it).
//!
//! Failures are classified from the registry's status alone: 401 and 403 are
//! [`EngineError::RegistryDenied`], a 404 [`EngineError::ImageNotFound`], a 5xx, a refused
//! connection, a failed TLS handshake (an authority this machine does not trust, a
//! certificate for another name, read from rustls's own error) or a stalled transfer
//! [`EngineError::PullFailed`]; everything fetched by digest is checked against it.
//!
//! Not spoken: an identity token from an OAuth login (`RegistryAuth::identity_token`, which
//! Docker trades for a token with a `refresh_token` grant; only user name and password are
//! sent), client certificates, schema 1 manifests, zstd layers.

use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, WWW_AUTHENTICATE};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::engine::RegistryAuth;
use crate::error::EngineError;

/// The registry Docker Hub's short names (`busybox`, `team/app`) live in.
const DOCKER_HUB: &str = "docker.io";
/// Where Docker Hub's distribution API answers.
const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// The manifests this client reads, in the order it prefers them.
const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];
/// The most a manifest or config may weigh: they are read whole.
const MAX_DOCUMENT_BYTES: usize = 8 << 20;

/// An image reference, parsed: where its registry is, its repository there, and its tag or
/// digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ImageName {
    /// `host[:port]`, `docker.io` for Docker Hub.
    pub(crate) registry: String,
    /// `library/busybox`, `team/app`.
    pub(crate) repository: String,
    /// A tag or a `sha256:<hex>` digest.
    pub(crate) reference: String,
}

/// A layer as a manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LayerBlob {
    pub(crate) digest: String,
    pub(crate) size: u64,
    pub(crate) media_type: String,
}

/// What a resolved image manifest says.
#[derive(Debug, Clone)]
pub(crate) struct ResolvedImage {
    /// The digest of the (platform) manifest, for `RepoDigests`.
    pub(crate) manifest_digest: String,
    /// The config blob, checked against its digest.
    pub(crate) config: Bytes,
    pub(crate) config_digest: String,
    pub(crate) layers: Vec<LayerBlob>,
}

/// A client for one pull (or check) of one repository: it keeps the authorization the
/// registry asked for between its requests.
pub(crate) struct RegistrySession<'a> {
    http: &'a reqwest::Client,
    name: ImageName,
    /// `https://host[:port]`, or `http://host[:port]` once a registry that may be reached
    /// over plain HTTP turned out not to speak TLS.
    base: Mutex<String>,
    /// `host[:port]` as the session reaches it, for errors.
    host: String,
    /// Whether the registry may still be reached over plain HTTP: a loopback or insecure
    /// registry whose HTTPS has not been tried yet.
    plain_http_allowed: Mutex<bool>,
    auth: Option<RegistryAuth>,
    /// The `Authorization` header value the last challenge earned.
    authorization: Mutex<Option<String>>,
    /// The reference as the user wrote it, for errors.
    image: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

#[derive(Deserialize)]
struct TokenReply {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
}

// === impl ImageName ===

impl ImageName {
    /// Parses `reference` the way Docker does: the first component is a registry when it
    /// has a dot or a port or is `localhost`; otherwise the image is Docker Hub's, and a
    /// one-component name is in `library/`. No tag means `latest`.
    pub(crate) fn parse(reference: &str) -> Result<ImageName, EngineError> {
        let invalid = || EngineError::Refused {
            message: format!("{reference:?} is not an image reference"),
        };
        let (name, tag_or_digest) = match reference.split_once('@') {
            Some((name, digest)) => (name, digest.to_owned()),
            None => {
                let last = reference.rfind('/').map_or(0, |slash| slash + 1);
                match reference[last..].rfind(':') {
                    Some(colon) => (
                        &reference[..last + colon],
                        reference[last + colon + 1..].to_owned(),
                    ),
                    None => (reference, "latest".to_owned()),
                }
            }
        };
        if name.is_empty() || tag_or_digest.is_empty() || name.contains("//") {
            return Err(invalid());
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_owned(), rest.to_owned())
            }
            Some(_) => (DOCKER_HUB.to_owned(), name.to_owned()),
            None => (DOCKER_HUB.to_owned(), format!("library/{name}")),
        };
        let allowed = |c: char| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-' | '/')
        };
        if repository.is_empty() || !repository.chars().all(allowed) {
            return Err(invalid());
        }
        Ok(ImageName {
            registry,
            repository,
            reference: tag_or_digest,
        })
    }

    /// `repository@digest` as Docker writes `RepoDigests`.
    pub(crate) fn repo_digest(&self, digest: &str) -> String {
        if self.registry == DOCKER_HUB {
            let short = self
                .repository
                .strip_prefix("library/")
                .unwrap_or(&self.repository);
            format!("{short}@{digest}")
        } else {
            format!("{}/{}@{digest}", self.registry, self.repository)
        }
    }
}

// === impl RegistrySession ===

impl<'a> RegistrySession<'a> {
    /// A session for `image` on its registry over HTTPS, falling back to plain HTTP when
    /// `plain_http` says the registry is one that may be reached so (loopback registries
    /// always are, as Docker treats them) and it does not speak TLS.
    pub(crate) fn new(
        http: &'a reqwest::Client,
        image: &str,
        auth: Option<RegistryAuth>,
        plain_http: &dyn Fn(&str) -> bool,
    ) -> Result<Self, EngineError> {
        let name = ImageName::parse(image)?;
        let host = if name.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            name.registry.as_str()
        };
        Ok(RegistrySession {
            http,
            base: Mutex::new(format!("https://{host}")),
            plain_http_allowed: Mutex::new(is_loopback(host) || plain_http(host)),
            host: host.to_owned(),
            name,
            auth,
            authorization: Mutex::new(None),
            image: image.to_owned(),
        })
    }

    pub(crate) fn name(&self) -> &ImageName {
        &self.name
    }

    /// The reference as the caller wrote it.
    pub(crate) fn image(&self) -> &str {
        &self.image
    }

    /// The manifest of the image for linux/amd64 and its config.
    pub(crate) async fn resolve(&self) -> Result<ResolvedImage, EngineError> {
        let (mut digest, mut manifest) = self.manifest(&self.name.reference).await?;
        if manifest.manifests.is_some() {
            let chosen = manifest
                .manifests
                .unwrap_or_default()
                .into_iter()
                .find(|entry| {
                    entry
                        .platform
                        .as_ref()
                        .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
                })
                .ok_or_else(|| EngineError::ImageNotFound {
                    image: format!("{} (for linux/amd64)", self.image),
                })?;
            (digest, manifest) = self.manifest(&chosen.digest).await?;
        }
        let (Some(config), Some(layers)) = (manifest.config, manifest.layers) else {
            return Err(EngineError::PullFailed {
                image: self.image.clone(),
                message: format!(
                    "the manifest {digest} ({}) is not an image manifest this store reads",
                    manifest.media_type.unwrap_or_default()
                ),
            });
        };
        let config_bytes = self.document_blob(&config.digest).await?;
        Ok(ResolvedImage {
            manifest_digest: digest,
            config: config_bytes,
            config_digest: config.digest,
            layers: layers
                .into_iter()
                .map(|layer| LayerBlob {
                    digest: layer.digest,
                    size: layer.size,
                    media_type: layer.media_type,
                })
                .collect(),
        })
    }

    /// Asks for the image's manifest, nothing more: whether these credentials may pull it.
    pub(crate) async fn check(&self) -> Result<(), EngineError> {
        self.manifest(&self.name.reference).await.map(drop)
    }

    /// The blob `digest` as a response whose body streams; the caller checks the digest of
    /// what it reads.
    pub(crate) async fn blob(&self, digest: &str) -> Result<reqwest::Response, EngineError> {
        let path = format!("/v2/{}/blobs/{digest}", self.name.repository);
        self.get(&path, None).await
    }

    /// A manifest by tag or digest, with its digest (checked when it was asked by digest).
    async fn manifest(&self, reference: &str) -> Result<(String, Manifest), EngineError> {
        let path = format!("/v2/{}/manifests/{reference}", self.name.repository);
        let response = self.get(&path, Some(&MANIFEST_TYPES.join(", "))).await?;
        let content_type = header_text(response.headers(), CONTENT_TYPE);
        let bytes = self.read_document(response).await?;
        let digest = sha256_digest(&bytes);
        if reference.contains(':') && reference != digest {
            return Err(self.mismatch("manifest", reference, &digest));
        }
        let mut manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|error| EngineError::PullFailed {
                image: self.image.clone(),
                message: format!("the manifest cannot be read: {error}"),
            })?;
        if manifest.media_type.is_none() {
            manifest.media_type = content_type;
        }
        Ok((digest, manifest))
    }

    /// A small blob (a config) read whole and checked against its digest.
    async fn document_blob(&self, digest: &str) -> Result<Bytes, EngineError> {
        let response = self.blob(digest).await?;
        let bytes = self.read_document(response).await?;
        let actual = sha256_digest(&bytes);
        if actual != digest {
            return Err(self.mismatch("config", digest, &actual));
        }
        Ok(bytes)
    }

    async fn read_document(&self, mut response: reqwest::Response) -> Result<Bytes, EngineError> {
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| self.transport(&e))? {
            bytes.extend_from_slice(&chunk);
            if bytes.len() > MAX_DOCUMENT_BYTES {
                return Err(EngineError::PullFailed {
                    image: self.image.clone(),
                    message: format!("a manifest or config larger than {MAX_DOCUMENT_BYTES} bytes"),
                });
            }
        }
        Ok(Bytes::from(bytes))
    }

    /// GETs `path` on the registry with the session's authorization, answering one
    /// challenge of the registry (then asking again); fails with the status's
    /// classification. The first answer over HTTPS settles whether a registry that may be
    /// reached over plain HTTP is.
    async fn get(
        &self,
        path: &str,
        accept: Option<&str>,
    ) -> Result<reqwest::Response, EngineError> {
        let mut challenged = false;
        loop {
            let url = format!("{}{path}", self.base());
            let mut request = self.http.get(&url);
            if let Some(accept) = accept {
                request = request.header(ACCEPT, accept);
            }
            let authorization = lock(&self.authorization).clone();
            if let Some(authorization) = authorization {
                request = request.header(AUTHORIZATION, authorization);
            }
            let sent = request.send().await;
            let plain_http_allowed = std::mem::take(&mut *lock(&self.plain_http_allowed));
            let response = match sent {
                Ok(response) => response,
                Err(error) if plain_http_allowed && speaks_no_tls(&error) => {
                    tracing::debug!(registry = %self.host, "no TLS: reached over plain HTTP");
                    *lock(&self.base) = format!("http://{}", self.host);
                    continue;
                }
                Err(error) => return Err(self.transport(&error)),
            };
            let status = response.status();
            if status.is_success() {
                return Ok(response);
            }
            if status == StatusCode::UNAUTHORIZED && !challenged {
                challenged = true;
                let challenge = header_text(response.headers(), WWW_AUTHENTICATE);
                let earned = self.answer(challenge.as_deref()).await?;
                *lock(&self.authorization) = Some(earned);
                continue;
            }
            let body = response.text().await.unwrap_or_default();
            return Err(self.refusal(status, &body));
        }
    }

    /// The `Authorization` value that answers the registry's challenge.
    async fn answer(&self, challenge: Option<&str>) -> Result<String, EngineError> {
        let challenge = challenge.unwrap_or_default();
        let (scheme, parameters) = challenge.split_once(' ').unwrap_or((challenge, ""));
        if scheme.eq_ignore_ascii_case("basic") {
            let (Some(user), password) = self.basic_credentials() else {
                return Err(self.needs_credentials());
            };
            return Ok(basic_header(&user, password.as_deref()));
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(EngineError::PullFailed {
                image: self.image.clone(),
                message: format!(
                    "the registry asks for credentials in a way this client does not speak: {challenge:?}"
                ),
            });
        }
        let parameters = challenge_parameters(parameters);
        let realm = parameters
            .iter()
            .find(|(key, _)| key == "realm")
            .map(|(_, value)| value.clone())
            .ok_or_else(|| EngineError::PullFailed {
                image: self.image.clone(),
                message: format!("a bearer challenge without realm: {challenge:?}"),
            })?;
        let query = {
            let mut query = form_urlencoded::Serializer::new(String::new());
            if let Some((_, service)) = parameters.iter().find(|(key, _)| key == "service") {
                query.append_pair("service", service);
            }
            query.append_pair(
                "scope",
                &format!("repository:{}:pull", self.name.repository),
            );
            query.finish()
        };
        let separator = if realm.contains('?') { '&' } else { '?' };
        let mut request = self.http.get(format!("{realm}{separator}{query}"));
        if let (Some(user), password) = self.basic_credentials() {
            request = request.basic_auth(user, password);
        }
        let response = request.send().await.map_err(|e| self.transport(&e))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(self.refusal(status, &body));
        }
        let reply: TokenReply = response
            .json()
            .await
            .map_err(|error| EngineError::PullFailed {
                image: self.image.clone(),
                message: format!("the token service's answer cannot be read: {error}"),
            })?;
        let token = reply
            .token
            .or(reply.access_token)
            .ok_or_else(|| EngineError::PullFailed {
                image: self.image.clone(),
                message: "the token service answered no token".to_owned(),
            })?;
        Ok(format!("Bearer {token}"))
    }

    fn basic_credentials(&self) -> (Option<String>, Option<String>) {
        match &self.auth {
            Some(auth) => (auth.username.clone(), auth.password.clone()),
            None => (None, None),
        }
    }

    fn needs_credentials(&self) -> EngineError {
        EngineError::RegistryDenied {
            image: self.image.clone(),
            message: EngineError::answered(
                401,
                "the registry requires credentials, and none were given for it",
            ),
        }
    }

    /// A registry's refusal, by status alone.
    fn refusal(&self, status: StatusCode, body: &str) -> EngineError {
        let message = EngineError::answered(status.as_u16(), body.trim());
        match status.as_u16() {
            401 if self.auth.is_none() => self.needs_credentials(),
            401 | 403 => EngineError::RegistryDenied {
                image: self.image.clone(),
                message,
            },
            404 => EngineError::ImageNotFound {
                image: self.image.clone(),
            },
            400..=499 if status != StatusCode::TOO_MANY_REQUESTS => {
                EngineError::Refused { message }
            }
            _ => EngineError::PullFailed {
                image: self.image.clone(),
                message,
            },
        }
    }

    /// Where the session reaches the registry: `https://host[:port]` or `http://…`.
    fn base(&self) -> String {
        lock(&self.base).clone()
    }

    /// A transport failure: the registry out of reach, a TLS handshake that failed (said in
    /// words an operator can act on), or a transfer that stalled.
    pub(crate) fn transport(&self, error: &reqwest::Error) -> EngineError {
        let message = match tls_error(error) {
            Some(tls) => format!(
                "TLS with the registry at {} failed: {}",
                self.base(),
                tls_reason(tls, &self.host)
            ),
            None => format!("the registry at {} cannot be read: {error:#}", self.base()),
        };
        EngineError::PullFailed {
            image: self.image.clone(),
            message,
        }
    }

    pub(crate) fn mismatch(&self, what: &str, expected: &str, actual: &str) -> EngineError {
        EngineError::PullFailed {
            image: self.image.clone(),
            message: format!("the registry sent a {what} whose digest is {actual}, not {expected}"),
        }
    }
}

/// The HTTP client every session of a store shares: connections kept, a deadline on
/// connecting and on each read, so a registry that stalls fails the pull instead of hanging;
/// certificates checked by the platform's verifier against the system's roots and
/// `extra_roots` (an operator's CA for private registries).
pub(crate) fn http_client(
    stall: Duration,
    extra_roots: Vec<reqwest::Certificate>,
) -> Result<reqwest::Client, EngineError> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(30).min(stall))
        .read_timeout(stall)
        .user_agent(concat!("stevedore/", env!("CARGO_PKG_VERSION")));
    if !extra_roots.is_empty() {
        builder = builder.tls_certs_merge(extra_roots);
    }
    builder
        .build()
        .map_err(|error| EngineError::protocol(format!("no HTTP client: {error:#}")))
}

/// The certificates of a PEM bundle (`extra_ca_file`), refused when it holds none.
pub(crate) fn extra_roots(
    path: &std::path::Path,
) -> Result<Vec<reqwest::Certificate>, EngineError> {
    let pem = std::fs::read(path).map_err(|error| EngineError::LocalIo {
        path: path.display().to_string(),
        message: error.to_string(),
    })?;
    let invalid = |why: String| EngineError::LocalIo {
        path: path.display().to_string(),
        message: format!("not a PEM bundle of CA certificates: {why}"),
    };
    let certificates = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|error| invalid(format!("{error:#}")))?;
    if certificates.is_empty() {
        return Err(invalid("it holds no certificate".to_owned()));
    }
    Ok(certificates)
}

/// `sha256:<hex>` of `bytes`.
pub(crate) fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// rustls's error behind a failed request, when TLS is what failed. An `io::Error` hides the
/// error it wraps from `source()`, so each one is opened.
fn tls_error<'e>(error: &'e (dyn std::error::Error + 'static)) -> Option<&'e rustls::Error> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(tls) = error.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(wrapped) = error
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            && let Some(tls) = tls_error(wrapped)
        {
            return Some(tls);
        }
        current = error.source();
    }
    None
}

/// Whether an HTTPS request failed because what answered does not speak TLS (a plain HTTP
/// server answers a handshake with text, or hangs up on it), rather than because of a
/// certificate or a connection that could not be made.
fn speaks_no_tls(error: &reqwest::Error) -> bool {
    match tls_error(error) {
        Some(tls) => matches!(tls, rustls::Error::InvalidMessage(_)),
        None => {
            let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
            while let Some(error) = current {
                if error
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::UnexpectedEof)
                {
                    return true;
                }
                current = error.source();
            }
            false
        }
    }
}

/// A failed handshake in an operator's words.
fn tls_reason(error: &rustls::Error, host: &str) -> String {
    use rustls::CertificateError;
    match error {
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "its certificate is signed by an authority this machine does not trust (add the \
             registry's CA to the system's roots or give it as the extra CA file)"
                .to_owned()
        }
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => format!("its certificate is for another name than {host} ({error})"),
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => format!("its certificate has expired ({error})"),
        rustls::Error::InvalidMessage(_) => format!(
            "it does not speak TLS ({error}); list it among the insecure registries if it \
             serves plain HTTP"
        ),
        other => other.to_string(),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether `host` (with or without port) is this machine.
fn is_loopback(host: &str) -> bool {
    let bare = match host.rsplit_once(':') {
        Some((bare, port)) if port.chars().all(|c| c.is_ascii_digit()) && !bare.ends_with(':') => {
            bare
        }
        _ => host,
    };
    let bare = bare.trim_start_matches('[').trim_end_matches(']');
    bare == "localhost"
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|address| address.is_loopback())
}

fn header_text(headers: &HeaderMap, name: reqwest::header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
}

fn basic_header(user: &str, password: Option<&str>) -> String {
    use base64::Engine as _;
    let pair = format!("{user}:{}", password.unwrap_or_default());
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    )
}

/// `realm="…",service="…"` as pairs; values may be quoted.
fn challenge_parameters(text: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut rest = text.trim();
    while let Some((key, after)) = rest.split_once('=') {
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (value, remainder) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.find('"') {
                Some(end) => (&quoted[..end], &quoted[end + 1..]),
                None => (quoted, ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            }
        };
        pairs.push((key, value.to_owned()));
        rest = remainder.trim_start_matches(|c: char| c == ',' || c.is_whitespace());
    }
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_as_docker_reads_them() -> Result<(), EngineError> {
        let parsed = |text| ImageName::parse(text);
        assert_eq!(
            parsed("busybox")?,
            ImageName {
                registry: DOCKER_HUB.into(),
                repository: "library/busybox".into(),
                reference: "latest".into()
            }
        );
        assert_eq!(parsed("team/app:2")?.repository, "team/app");
        let local = parsed("127.0.0.1:5000/private/hello:7")?;
        assert_eq!(
            (
                local.registry.as_str(),
                local.repository.as_str(),
                local.reference.as_str()
            ),
            ("127.0.0.1:5000", "private/hello", "7")
        );
        let pinned = parsed("localhost/app@sha256:abcd")?;
        assert_eq!(pinned.reference, "sha256:abcd");
        assert_eq!(
            pinned.repo_digest("sha256:abcd"),
            "localhost/app@sha256:abcd"
        );
        assert_eq!(
            parsed("busybox")?.repo_digest("sha256:1"),
            "busybox@sha256:1"
        );
        assert!(parsed("Upper/Case").is_err());
        assert!(parsed(":tag").is_err());
        Ok(())
    }

    #[test]
    fn bearer_challenges_parse() {
        let pairs = challenge_parameters(
            r#"realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#,
        );
        assert_eq!(
            pairs,
            vec![
                ("realm".into(), "https://auth.example/token".into()),
                ("service".into(), "registry.example".into()),
                ("scope".into(), "repository:a/b:pull".into()),
            ]
        );
    }

    #[test]
    fn registries_are_reached_over_https_and_plain_http_only_where_allowed()
    -> Result<(), EngineError> {
        let http = http_client(Duration::from_secs(5), Vec::new())?;
        let plain_http_allowed = |session: &RegistrySession<'_>| *lock(&session.plain_http_allowed);
        let secure = RegistrySession::new(&http, "registry.example/app:1", None, &|_| false)?;
        assert_eq!(secure.base(), "https://registry.example");
        assert!(!plain_http_allowed(&secure));
        let hub = RegistrySession::new(&http, "busybox", None, &|_| false)?;
        assert_eq!(hub.base(), "https://registry-1.docker.io");
        assert!(!plain_http_allowed(&hub));
        let insecure = |host: &str| host == "registry.example";
        let session = RegistrySession::new(&http, "registry.example/app:1", None, &insecure)?;
        assert_eq!(session.base(), "https://registry.example");
        assert!(plain_http_allowed(&session));
        let local = RegistrySession::new(&http, "127.0.0.1:5000/app", None, &|_| false)?;
        assert_eq!(local.base(), "https://127.0.0.1:5000");
        assert!(plain_http_allowed(&local));
        assert_eq!(local.name().reference, "latest");
        Ok(())
    }

    #[test]
    fn loopback_registries_are_known() {
        for host in [
            "localhost:5000",
            "127.0.0.1:5000",
            "127.0.0.2",
            "[::1]:5000",
            "localhost",
        ] {
            assert!(is_loopback(host), "{host}");
        }
        for host in ["registry.example:5000", "10.0.0.1:5000", "docker.io"] {
            assert!(!is_loopback(host), "{host}");
        }
    }
}
