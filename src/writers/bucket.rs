//! Stores in object storage (`s3://`, `gs://`, `az://`), through the `object_store` crate that
//! arrow and parquet use. A [`StoreLocation`] tells a local folder from a bucket; a [`Bucket`]
//! is a blocking client of one bucket prefix: reads, conditional writes (the commit and the
//! name lock rely on them), listings, and uploads of finished files with bounded memory.
//!
//! Credentials and endpoints come from the standard environment (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL`, ...; `GOOGLE_*`; `AZURE_*`), as
//! the crate's builders read it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{
    Attribute, Attributes, GetOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions,
    PutPayload, RetryConfig, UpdateVersion,
};

use crate::error::{Error, Result};

/// Object-storage schemes this build writes to.
const SCHEMES: [&str; 6] = ["s3", "s3a", "gs", "az", "abfs", "abfss"];

/// Objects up to this size are uploaded in one request; larger ones in parts of this size
/// (S3 needs parts of 5 MiB at least). One part per upload is in memory at a time.
pub const PART_BYTES: usize = 8 << 20;

/// Uploads and downloads running at once. With [`PART_BYTES`] this bounds their memory.
pub const CONCURRENT_TRANSFERS: usize = 8;

/// The user metadata key carrying an object's BLAKE3, so a rerun keeps what is already there.
const BLAKE3_KEY: &str = "blake3";

/// Where a store is: a local (or network file system) folder, or a bucket prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    Local(PathBuf),
    Bucket(String),
}

impl StoreLocation {
    /// `s3://bucket/prefix` (and the other object-storage schemes), `file:///path`, or a plain
    /// path. Any other `scheme://` is refused: it must never become a local folder named after
    /// the scheme.
    pub fn parse(text: &str) -> Result<StoreLocation> {
        let Some((scheme, rest)) = text.split_once("://") else {
            return Ok(StoreLocation::Local(PathBuf::from(text)));
        };
        let scheme = scheme.to_ascii_lowercase();
        if scheme == "file" {
            return Ok(StoreLocation::Local(PathBuf::from(rest)));
        }
        if !SCHEMES.contains(&scheme.as_str()) {
            return Err(Error::usage(
                format!("{text}: stores of scheme `{scheme}://` are not supported"),
                "give a local folder, file:///path, or an object-storage URL: s3://bucket/prefix (also gs://, az://)",
            ));
        }
        let bucket = rest.split('/').next().unwrap_or_default();
        if bucket.is_empty() {
            return Err(Error::usage(
                format!("{text}: the URL names no bucket"),
                "write it as s3://bucket/prefix",
            ));
        }
        Ok(StoreLocation::Bucket(
            text.trim_end_matches('/').to_string(),
        ))
    }

    /// How messages name the store.
    pub fn display(&self) -> String {
        match self {
            StoreLocation::Local(p) => p.display().to_string(),
            StoreLocation::Bucket(url) => url.clone(),
        }
    }
}

/// An object's size, version (for conditional updates) and recorded BLAKE3.
#[derive(Debug, Clone)]
pub struct RemoteObject {
    pub size: u64,
    pub version: UpdateVersion,
    pub blake3: Option<String>,
}

/// A finished local file to upload, with the checksum it was written with.
#[derive(Debug, Clone)]
pub struct Upload {
    pub local: PathBuf,
    pub key: String,
    pub size: u64,
    pub blake3: String,
}

#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Transferred {
    pub objects: u64,
    pub bytes: u64,
    /// Objects already in the bucket with the same size and checksum, left as they were.
    pub kept: u64,
}

/// A blocking client of one bucket prefix.
pub struct Bucket {
    store: Arc<dyn ObjectStore>,
    root: ObjectPath,
    url: String,
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bucket({})", self.url)
    }
}

impl Bucket {
    /// Connects to the bucket of `url` and checks that it exists and the credentials work.
    pub fn open(url: &str) -> Result<Bucket> {
        let parsed = url::Url::parse(url).map_err(|e| {
            Error::usage(
                format!("{url}: not a valid URL: {e}"),
                "write it as s3://bucket/prefix",
            )
        })?;
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(Error::usage(
                format!("{url}: `?` and `#` cannot be part of a bucket prefix"),
                "use letters, digits, `-`, `_` and `.` in the prefix",
            ));
        }
        // The URL holds the prefix percent-encoded (a space as %20); keys hold it as written.
        let prefix = percent_encoding::percent_decode_str(parsed.path())
            .decode_utf8()
            .map_err(|_| {
                Error::usage(
                    format!("{url}: the prefix is not UTF-8 once decoded"),
                    "write the prefix in plain characters",
                )
            })?
            .trim_matches('/')
            .to_string();
        for segment in prefix.split('/').filter(|s| !s.is_empty()) {
            check_key_segment(url, segment)?;
        }
        // TLS through ring (Cargo.toml); a second install in the process is a no-op.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let store = build_store(&parsed)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| Error::io(PathBuf::from(url), "cannot start the network runtime", e))?;
        let bucket = Bucket {
            store,
            root: ObjectPath::from(prefix.as_str()),
            url: url.to_string(),
            runtime,
        };
        bucket.check_reachable()?;
        Ok(bucket)
    }

    /// Refuses a dataset name that object storage would not keep as written.
    pub fn check_name(&self, name: &str) -> Result<()> {
        check_key_segment(&self.url, name)
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The full URL of `key` (relative to the prefix), for messages.
    pub fn url_of(&self, key: &str) -> String {
        format!("{}/{key}", self.url)
    }

    fn path(&self, key: &str) -> ObjectPath {
        self.root
            .parts()
            .chain(ObjectPath::from(key).parts())
            .collect()
    }

    /// A listing of the prefix: fails on a missing bucket or refused credentials, which a
    /// read of a missing object would not tell apart.
    fn check_reachable(&self) -> Result<()> {
        let store = self.store.clone();
        let root = self.root.clone();
        self.runtime
            .block_on(async move { store.list_with_delimiter(Some(&root)).await })
            .map(|_| ())
            .map_err(|e| remote_error(&self.url, "cannot list the store", e))
    }

    /// The object's bytes and version; `None` when there is no such object.
    pub fn read(&self, key: &str) -> Result<Option<(Vec<u8>, UpdateVersion)>> {
        let path = self.path(key);
        let store = self.store.clone();
        let got = self.runtime.block_on(async move {
            let result = store.get(&path).await?;
            let version = UpdateVersion {
                e_tag: result.meta.e_tag.clone(),
                version: result.meta.version.clone(),
            };
            Ok::<_, object_store::Error>((result.bytes().await?.to_vec(), version))
        });
        absent_as_none(got).map_err(|e| remote_error(&self.url_of(key), "cannot read", e))
    }

    pub fn head(&self, key: &str) -> Result<Option<RemoteObject>> {
        let path = self.path(key);
        let store = self.store.clone();
        let got = self
            .runtime
            .block_on(async move { head_with_checksum(store.as_ref(), &path).await });
        absent_as_none(got).map_err(|e| remote_error(&self.url_of(key), "cannot look up", e))
    }

    /// Writes the object only if there is none yet: `None` when one exists.
    pub fn create(&self, key: &str, bytes: Vec<u8>) -> Result<Option<UpdateVersion>> {
        self.put_mode(key, bytes, PutMode::Create)
    }

    /// Replaces the object only if it is still at `version`: `None` when it changed meanwhile.
    pub fn replace(
        &self,
        key: &str,
        bytes: Vec<u8>,
        version: &UpdateVersion,
    ) -> Result<Option<UpdateVersion>> {
        self.put_mode(key, bytes, PutMode::Update(version.clone()))
    }

    fn put_mode(&self, key: &str, bytes: Vec<u8>, mode: PutMode) -> Result<Option<UpdateVersion>> {
        let path = self.path(key);
        let store = self.store.clone();
        let options = PutOptions::from(mode);
        let put = self.runtime.block_on(async move {
            store
                .put_opts(&path, PutPayload::from(bytes), options)
                .await
        });
        match put {
            Ok(r) => Ok(Some(UpdateVersion::from(r))),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => Ok(None),
            Err(e) => Err(remote_error(&self.url_of(key), "cannot write", e)),
        }
    }

    pub fn put(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        let path = self.path(key);
        let store = self.store.clone();
        self.runtime
            .block_on(async move { store.put(&path, PutPayload::from(bytes)).await })
            .map(|_| ())
            .map_err(|e| remote_error(&self.url_of(key), "cannot write", e))
    }

    pub fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key);
        let store = self.store.clone();
        let deleted = self
            .runtime
            .block_on(async move { store.delete(&path).await });
        absent_as_none(deleted.map(Some))
            .map(|_| ())
            .map_err(|e| remote_error(&self.url_of(key), "cannot delete", e))
    }

    /// Every object under `prefix` (relative to the store), as keys relative to the store,
    /// sorted, with their sizes.
    pub fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        let path = self.path(prefix);
        let store = self.store.clone();
        let root_parts = self.root.parts().count();
        let listed = self.runtime.block_on(async move {
            store
                .list(Some(&path))
                .map_ok(|m| {
                    let key: Vec<String> = m
                        .location
                        .parts()
                        .skip(root_parts)
                        .map(|p| p.as_ref().to_string())
                        .collect();
                    (key.join("/"), m.size)
                })
                .try_collect::<Vec<_>>()
                .await
        });
        let mut keys = listed.map_err(|e| remote_error(&self.url_of(prefix), "cannot list", e))?;
        keys.sort();
        Ok(keys)
    }

    /// Uploads the files, [`CONCURRENT_TRANSFERS`] at a time, each object tagged with its
    /// BLAKE3. An object already there with the same size and BLAKE3 is kept, so a rerun after
    /// a kill uploads only what is missing.
    pub fn upload(&self, files: Vec<Upload>) -> Result<Transferred> {
        let jobs = files.into_iter().map(|f| {
            let store = self.store.clone();
            let path = self.path(&f.key);
            let url = self.url_of(&f.key);
            async move { upload_one(store, path, f).await.map_err(|e| (url, e)) }
        });
        let done = self.run_all(jobs).map_err(|(url, e)| match e {
            Transfer::Local(path, e) => Error::io(path, "cannot read a file to upload", e),
            Transfer::Remote(e) => remote_error(&url, "cannot upload", e),
        })?;
        Ok(done
            .into_iter()
            .fold(Transferred::default(), |mut t, (bytes, kept)| {
                t.objects += 1;
                t.bytes += bytes;
                t.kept += kept as u64;
                t
            }))
    }

    /// Runs transfer jobs, [`CONCURRENT_TRANSFERS`] at a time, until the first fails (with the
    /// URL it was moving).
    fn run_all<T, F>(
        &self,
        jobs: impl Iterator<Item = F>,
    ) -> std::result::Result<Vec<T>, (String, Transfer)>
    where
        F: std::future::Future<Output = std::result::Result<T, (String, Transfer)>>,
    {
        self.runtime.block_on(
            futures::stream::iter(jobs)
                .buffer_unordered(CONCURRENT_TRANSFERS)
                .try_collect(),
        )
    }

    /// Downloads the objects (keys relative to the store) into `dir`, under the same relative
    /// paths, [`CONCURRENT_TRANSFERS`] at a time.
    pub fn download(&self, keys: &[String], dir: &Path) -> Result<Transferred> {
        let jobs = keys.iter().map(|key| {
            let store = self.store.clone();
            let path = self.path(key);
            let url = self.url_of(key);
            let local = dir.join(key);
            async move { download_one(store, path, local).await.map_err(|e| (url, e)) }
        });
        let sizes = self.run_all(jobs).map_err(|(url, e)| match e {
            Transfer::Local(path, e) => Error::io(path, "cannot write a downloaded object", e),
            Transfer::Remote(e) => remote_error(&url, "cannot download", e),
        })?;
        Ok(Transferred {
            objects: sizes.len() as u64,
            bytes: sizes.iter().sum(),
            kept: 0,
        })
    }
}

/// A folder or dataset name in a key must reach the bucket as written: the characters AWS and
/// GCS advise against in keys (`%`, `#`, `[`, `~`, ...) would be percent-encoded by the client,
/// and other readers would find the dataset under another name. Whitespace is refused too: the
/// client signs a listing of a prefix with a space differently from how it sends it, and S3
/// refuses the request (apache/arrow-rs#2800).
fn check_key_segment(url: &str, segment: &str) -> Result<()> {
    let kept = object_store::path::PathPart::from(segment).as_ref() == segment;
    if kept && !segment.chars().any(char::is_whitespace) {
        return Ok(());
    }
    // `.` alone is encoded only as a whole segment (`.` or `..`), never inside a name.
    let avoided: String = segment
        .chars()
        .filter(|c| c.is_whitespace() || (*c != '.' && key_encodes(*c)))
        .collect();
    let problem = match avoided.is_empty() {
        true => format!("{segment:?} cannot be a folder name in object storage"),
        false => format!("{segment:?} holds characters object storage keys avoid: {avoided:?}"),
    };
    Err(Error::usage(
        format!("{url}: {problem}"),
        "use letters, digits, `-`, `_` and `.` (for a dataset, choose the name with --name)",
    ))
}

fn key_encodes(c: char) -> bool {
    let text = c.to_string();
    object_store::path::PathPart::from(text.as_str()).as_ref() != text
}

/// The store for a URL, configured from the environment (and for S3 an AWS profile). Retries
/// are bounded so that a server that went away ends the run with an error in seconds, not
/// minutes (`SENSORIUM_INGEST_RETRY_SECONDS`, default 30).
fn build_store(url: &url::Url) -> Result<Arc<dyn ObjectStore>> {
    let retry = RetryConfig {
        max_retries: 5,
        retry_timeout: Duration::from_secs(retry_seconds()),
        ..Default::default()
    };
    let built: object_store::Result<Arc<dyn ObjectStore>> = match url.scheme() {
        "gs" => object_store::gcp::GoogleCloudStorageBuilder::from_env()
            .with_url(url.as_str())
            .with_retry(retry)
            .build()
            .map(|s| Arc::new(s) as _),
        "az" | "abfs" | "abfss" => object_store::azure::MicrosoftAzureBuilder::from_env()
            .with_url(url.as_str())
            .with_retry(retry)
            .build()
            .map(|s| Arc::new(s) as _),
        _ => s3_builder(url)?
            .with_retry(retry)
            .build()
            .map(|s| Arc::new(s) as _),
    };
    built.map_err(|e| remote_error(url.as_str(), "cannot use the store", e))
}

/// S3 settings: the environment's `AWS_*` variables first, then the AWS profile's (as the AWS
/// CLI orders them), for keys, region and endpoint. Empty variables count as unset.
fn s3_builder(url: &url::Url) -> Result<object_store::aws::AmazonS3Builder> {
    let env = |key: &str| std::env::var(key).ok().filter(|v| !v.is_empty());
    let profile = super::aws_profile::load(&env)?;
    let profile_keys = match (&profile, env("AWS_ACCESS_KEY_ID")) {
        (Some(p), None) => profile_keys(p)?,
        _ => None,
    };
    let mut builder = object_store::aws::AmazonS3Builder::new();
    for (key, value) in std::env::vars() {
        // A session token belongs to the keys it came with: not to a profile's keys.
        let token = matches!(key.as_str(), "AWS_SESSION_TOKEN" | "AWS_TOKEN");
        if !key.starts_with("AWS_") || value.is_empty() || (token && profile_keys.is_some()) {
            continue;
        }
        if let Ok(config_key) = key.to_ascii_lowercase().parse() {
            builder = builder.with_config(config_key, value);
        }
    }
    builder = builder.with_url(url.as_str());
    let from_profile = |key: &str, vars: &[&str]| match vars.iter().any(|v| env(v).is_some()) {
        true => None,
        false => profile
            .as_ref()
            .and_then(|p| p.get(key))
            .map(str::to_string),
    };
    if let Some(region) = from_profile("region", &["AWS_REGION", "AWS_DEFAULT_REGION"]) {
        builder = builder.with_region(region);
    }
    const ENDPOINT_VARS: [&str; 3] = ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"];
    let endpoint = match from_profile("endpoint_url", &ENDPOINT_VARS) {
        Some(endpoint) => {
            builder = builder.with_endpoint(&endpoint);
            Some(endpoint)
        }
        None => ENDPOINT_VARS.into_iter().find_map(env),
    };
    // A plain-http endpoint (a local S3-compatible server) was asked for explicitly.
    builder = builder.with_allow_http(endpoint.is_some_and(|e| e.starts_with("http://")));
    if let Some((id, secret, token)) = profile_keys {
        builder = builder
            .with_access_key_id(id)
            .with_secret_access_key(secret);
        if let Some(token) = token {
            builder = builder.with_token(token);
        }
    }
    Ok(builder)
}

/// The profile's static keys `(id, secret, token)`. A profile that takes a role or SSO, or
/// runs a program for its keys, is refused with the command that exports them; one with only
/// settings (a region) leaves the keys to the environment's other sources (instance metadata).
fn profile_keys(
    profile: &super::aws_profile::Profile,
) -> Result<Option<(String, String, Option<String>)>> {
    let refuse = |how: &str| {
        Error::usage(
            format!(
                "AWS profile {}: its credentials come through `{how}`, which sensorium-ingest does not run",
                profile.name
            ),
            format!(
                "export them first: eval \"$(aws configure export-credentials --profile {} --format env)\"",
                profile.name
            ),
        )
    };
    if let Some(key) = profile.role_source() {
        return Err(refuse(key));
    }
    match profile.static_keys() {
        Some((id, secret, token)) => Ok(Some((
            id.to_string(),
            secret.to_string(),
            token.map(str::to_string),
        ))),
        None if profile.has_credential_process() => Err(refuse("credential_process")),
        None => Ok(None),
    }
}

fn retry_seconds() -> u64 {
    std::env::var("SENSORIUM_INGEST_RETRY_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30)
}

enum Transfer {
    Local(PathBuf, std::io::Error),
    Remote(object_store::Error),
}

impl From<object_store::Error> for Transfer {
    fn from(e: object_store::Error) -> Self {
        Transfer::Remote(e)
    }
}

async fn head_with_checksum(
    store: &dyn ObjectStore,
    path: &ObjectPath,
) -> object_store::Result<RemoteObject> {
    let options = GetOptions {
        head: true,
        ..Default::default()
    };
    let result = store.get_opts(path, options).await?;
    Ok(RemoteObject {
        size: result.meta.size,
        version: UpdateVersion {
            e_tag: result.meta.e_tag.clone(),
            version: result.meta.version.clone(),
        },
        blake3: result
            .attributes
            .get(&Attribute::Metadata(BLAKE3_KEY.into()))
            .map(|v| v.to_string()),
    })
}

/// `(bytes sent, kept)`.
async fn upload_one(
    store: Arc<dyn ObjectStore>,
    path: ObjectPath,
    file: Upload,
) -> std::result::Result<(u64, bool), Transfer> {
    let there = match head_with_checksum(store.as_ref(), &path).await {
        Ok(o) => Some(o),
        Err(object_store::Error::NotFound { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    if there.is_some_and(|o| o.size == file.size && o.blake3.as_deref() == Some(&file.blake3)) {
        return Ok((0, true));
    }
    let mut attributes = Attributes::new();
    attributes.insert(
        Attribute::Metadata(BLAKE3_KEY.into()),
        file.blake3.clone().into(),
    );
    let local = File::open(&file.local).map_err(|e| Transfer::Local(file.local.clone(), e))?;
    if file.size as usize <= PART_BYTES {
        let bytes = read_piece(&local, &file.local, 0, file.size as usize)?;
        let options = PutOptions {
            attributes,
            ..Default::default()
        };
        store.put_opts(&path, bytes.into(), options).await?;
        return Ok((file.size, false));
    }
    let mut upload = store.put_multipart_opts(&path, attributes.into()).await?;
    let mut offset = 0u64;
    while offset < file.size {
        let len = PART_BYTES.min((file.size - offset) as usize);
        let piece = match read_piece(&local, &file.local, offset, len) {
            Ok(p) => p,
            Err(e) => {
                let _ = upload.abort().await;
                return Err(e);
            }
        };
        if let Err(e) = upload.put_part(piece.into()).await {
            let _ = upload.abort().await;
            return Err(e.into());
        }
        offset += len as u64;
    }
    upload.complete().await?;
    Ok((file.size, false))
}

fn read_piece(
    file: &File,
    path: &Path,
    offset: u64,
    len: usize,
) -> std::result::Result<Vec<u8>, Transfer> {
    let mut buffer = vec![0u8; len];
    file.read_exact_at(&mut buffer, offset)
        .map_err(|e| Transfer::Local(path.to_path_buf(), e))?;
    Ok(buffer)
}

async fn download_one(
    store: Arc<dyn ObjectStore>,
    path: ObjectPath,
    local: PathBuf,
) -> std::result::Result<u64, Transfer> {
    let mut stream = store.get(&path).await?.into_stream();
    if let Some(parent) = local.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Transfer::Local(parent.into(), e))?;
    }
    let mut file = File::create(&local).map_err(|e| Transfer::Local(local.clone(), e))?;
    let mut size = 0u64;
    while let Some(piece) = stream.next().await {
        let piece = piece?;
        std::io::Write::write_all(&mut file, &piece)
            .map_err(|e| Transfer::Local(local.clone(), e))?;
        size += piece.len() as u64;
    }
    Ok(size)
}

fn absent_as_none<T>(result: object_store::Result<T>) -> object_store::Result<Option<T>> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A failed request, with what it means and what to do.
pub fn remote_error(url: &str, action: &str, e: object_store::Error) -> Error {
    use object_store::Error as E;
    let text = e.to_string();
    let (problem, hint, denied) = match &e {
        E::Unauthenticated { .. } | E::PermissionDenied { .. } => (
            "the server refused the credentials",
            "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or your cloud's variables) and the permissions on the bucket",
            true,
        ),
        _ if text.contains("NoSuchBucket") || text.contains("bucket does not exist") => (
            "the bucket does not exist",
            "create the bucket first, or check its name in the URL",
            false,
        ),
        _ if text.contains("SignatureDoesNotMatch")
            || text.contains("InvalidAccessKeyId")
            || text.contains("403 Forbidden") =>
        (
            "the server refused the credentials",
            "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or your cloud's variables) and the permissions on the bucket",
            true,
        ),
        _ if text.contains("error sending request") || text.contains("onnect") => (
            "the server cannot be reached",
            "check AWS_ENDPOINT_URL and the network, then run the same command again: it resumes where it stopped",
            false,
        ),
        _ => (
            "the request failed",
            "check the URL, the credentials and the server, then run the same command again: it resumes where it stopped",
            false,
        ),
    };
    Error::Remote {
        url: url.to_string(),
        problem: format!("{action}: {problem} ({})", first_line(&text)),
        hint: hint.to_string(),
        denied,
    }
}

fn first_line(text: &str) -> String {
    let line = text.lines().next().unwrap_or_default();
    line.chars().take(300).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_segments_kept_as_written_pass_others_are_named() {
        for fine in ["v1.2", "a+b=c", "x.zarr", "dynamic29156-11-10", "m_1"] {
            assert!(check_key_segment("s3://b/p", fine).is_ok(), "{fine}");
        }
        for (bad, named) in [("mouse#1", "\"#\""), ("lab store", "\" \""), ("é", "\"é\"")] {
            let err = check_key_segment("s3://b/p", bad).unwrap_err().to_string();
            assert!(
                err.contains(&format!("keys avoid: {named}")),
                "{bad}: {err}"
            );
        }
        for whole in [".", ".."] {
            let err = check_key_segment("s3://b/p", whole)
                .unwrap_err()
                .to_string();
            assert!(err.contains("cannot be a folder name"), "{whole}: {err}");
        }
    }

    #[test]
    fn store_locations() {
        let local = |p: &str| StoreLocation::Local(PathBuf::from(p));
        assert_eq!(StoreLocation::parse("store/").unwrap(), local("store/"));
        assert_eq!(
            StoreLocation::parse("file:///data/s").unwrap(),
            local("/data/s")
        );
        assert_eq!(
            StoreLocation::parse("s3://bkt/a/b/").unwrap(),
            StoreLocation::Bucket("s3://bkt/a/b".into())
        );
        assert_eq!(
            StoreLocation::parse("gs://bkt").unwrap(),
            StoreLocation::Bucket("gs://bkt".into())
        );
        for refused in ["ftp://h/s", "s3:///nobucket", "http://h/s", "hdfs://n/s"] {
            assert!(
                matches!(StoreLocation::parse(refused), Err(Error::Usage { .. })),
                "{refused}"
            );
        }
    }
}
