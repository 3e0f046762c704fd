//! Downloading one file: resume from `<dest>.incomplete`, retry drops and transient errors,
//! verify the hash, then rename into place atomically.
//!
//! The network side runs on the async runtime; writing and hashing run on a blocking thread fed
//! through a bounded channel, so the socket is read while the previous chunk is hashed.

use std::fs::{File, OpenOptions};
use std::io::{IoSlice, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::StreamExt;
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_RANGE, HeaderMap, RANGE};
use sha1::Digest;

use crate::StoreError;
use crate::error::IoContext;
use crate::http::Http;
use crate::remote::Expected;

/// How many times a file that fails its hash check is deleted and fetched again in all.
pub(crate) const HASH_ATTEMPTS: u32 = 3;

/// Running hash of the bytes written so far.
enum Hasher {
    None,
    Sha256(sha2::Sha256),
    GitSha1(sha1::Sha1),
}

impl Hasher {
    fn new(expected: Option<&Expected>, size: Option<u64>) -> Hasher {
        match (expected, size) {
            (Some(Expected::Sha256(_)), _) => Hasher::Sha256(sha2::Sha256::new()),
            (Some(Expected::GitSha1(_)), Some(size)) => {
                let mut h = sha1::Sha1::new();
                h.update(format!("blob {size}\0").as_bytes());
                Hasher::GitSha1(h)
            }
            // A git SHA-1 needs the size up front; the listings always give it, else size-only.
            _ => Hasher::None,
        }
    }

    fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::None => {}
            Hasher::Sha256(h) => h.update(data),
            Hasher::GitSha1(h) => h.update(data),
        }
    }

    fn finish(self) -> Option<String> {
        match self {
            Hasher::None => None,
            Hasher::Sha256(h) => Some(hex::encode(h.finalize())),
            Hasher::GitSha1(h) => Some(hex::encode(h.finalize())),
        }
    }
}

/// The `.incomplete` file, how much of it is written and the hash of those bytes.
struct Partial {
    file: File,
    written: u64,
    hasher: Hasher,
}

impl Partial {
    /// Opens (or creates) the partial file and hashes the bytes already in it, so a resumed
    /// download still verifies the whole file.
    fn open(path: &Path, expected: Option<&Expected>, size: Option<u64>) -> Result<Partial, StoreError> {
        let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).at(path)?;
        let mut len = file.metadata().at(path)?.len();
        if size.is_some_and(|s| len > s) {
            // Longer than the file can be: garbage from an earlier fault.
            file.set_len(0).at(path)?;
            len = 0;
        }
        let mut hasher = Hasher::new(expected, size);
        if len > 0 && !matches!(hasher, Hasher::None) {
            file.seek(SeekFrom::Start(0)).at(path)?;
            let mut buf = vec![0u8; 1 << 20];
            let mut left = len;
            while left > 0 {
                let want = left.min(buf.len() as u64) as usize;
                let n = file.read(&mut buf[..want]).at(path)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                left -= n as u64;
            }
        }
        file.seek(SeekFrom::Start(len)).at(path)?;
        Ok(Partial { file, written: len, hasher })
    }

    fn reset(&mut self, path: &Path, expected: Option<&Expected>, size: Option<u64>) -> Result<(), StoreError> {
        self.file.set_len(0).at(path)?;
        self.file.seek(SeekFrom::Start(0)).at(path)?;
        self.written = 0;
        self.hasher = Hasher::new(expected, size);
        Ok(())
    }
}

/// One file to fetch.
pub(crate) struct FetchJob<'a> {
    pub http: &'a Http,
    pub url: &'a str,
    pub token: Option<&'a str>,
    /// Name for messages (the path in the repository).
    pub name: &'a str,
    pub size: Option<u64>,
    pub expected: Option<&'a Expected>,
    pub incomplete: PathBuf,
    pub dest: PathBuf,
    /// Bytes of this file on disk (progress position).
    pub done: Arc<AtomicU64>,
    /// Bytes received over the network in this run (progress rate).
    pub fetched: Arc<AtomicU64>,
    pub map_status: &'a (dyn Fn(StatusCode, &HeaderMap, String) -> StoreError + Send + Sync),
}

impl FetchJob<'_> {
    /// Downloads into `incomplete` (resuming), verifies and renames to `dest`.
    pub async fn run(&self) -> Result<(), StoreError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let partial = {
                let (path, expected, size) = (self.incomplete.clone(), self.expected.cloned(), self.size);
                blocking(move || Partial::open(&path, expected.as_ref(), size)).await?
            };
            self.done.store(partial.written, Ordering::Relaxed);
            let partial = self.transfer(partial).await?;
            let Partial { file, written, hasher } = partial;
            let actual = hasher.finish();
            match (self.expected, actual) {
                (Some(exp), Some(actual)) if !actual.eq_ignore_ascii_case(exp.hex()) => {
                    tracing::warn!(file = self.name, attempt, expected = exp.hex(), %actual, "hash mismatch, fetching again");
                    drop(file);
                    std::fs::remove_file(&self.incomplete).at(&self.incomplete)?;
                    self.done.store(0, Ordering::Relaxed);
                    if attempt >= HASH_ATTEMPTS {
                        return Err(StoreError::HashMismatch {
                            file: self.name.to_string(),
                            algo: exp.algo(),
                            expected: exp.hex().to_string(),
                            actual,
                            attempts: attempt,
                        });
                    }
                    continue;
                }
                _ => {}
            }
            if let Some(size) = self.size.filter(|&s| s != written) {
                return Err(StoreError::Protocol(format!(
                    "{}: got {written} bytes, the listing says {size}",
                    self.name
                )));
            }
            let (incomplete, dest) = (self.incomplete.clone(), self.dest.clone());
            blocking(move || {
                // Durable before visible: a crash right after the rename must not leave a
                // verified name over unwritten data.
                file.sync_all().at(&incomplete)?;
                drop(file);
                std::fs::rename(&incomplete, &dest).at(&dest)
            })
            .await?;
            return Ok(());
        }
    }

    /// Fetches the rest of the file into `partial`, retrying drops and transient statuses and
    /// resuming from what is on disk each time.
    async fn transfer(&self, mut partial: Partial) -> Result<Partial, StoreError> {
        let retry = &self.http.retry;
        let mut failures = 0u32;
        loop {
            if self.size.is_some_and(|s| partial.written == s) {
                return Ok(partial);
            }
            let start = partial.written;
            let resp = self
                .http
                .send(
                    self.url,
                    || {
                        let mut req = self.http.follow.get(self.url);
                        if let Some(t) = self.token {
                            req = req.header(AUTHORIZATION, format!("Bearer {t}"));
                        }
                        if start > 0 {
                            req = req.header(RANGE, format!("bytes={start}-"));
                        }
                        req
                    },
                    self.map_status,
                )
                .await?;
            match resp.status() {
                StatusCode::PARTIAL_CONTENT => {
                    let range_start = resp
                        .headers()
                        .get(CONTENT_RANGE)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix("bytes "))
                        .and_then(|v| v.split('-').next())
                        .and_then(|v| v.parse::<u64>().ok());
                    if range_start != Some(start) {
                        // A range we did not ask for cannot be appended; start over.
                        partial = self.reset(partial).await?;
                        continue;
                    }
                }
                StatusCode::RANGE_NOT_SATISFIABLE => {
                    // Our partial file does not fit the server's: start over.
                    partial = self.reset(partial).await?;
                    failures += 1;
                    if failures >= retry.max_attempts {
                        return Err(StoreError::Protocol(format!("{}: the server keeps refusing ranges", self.name)));
                    }
                    continue;
                }
                s if s.is_success() => {
                    if start > 0 {
                        // The server ignored `Range` and sends the whole file.
                        partial = self.reset(partial).await?;
                    }
                }
                s => {
                    return Err(StoreError::Http {
                        url: self.url.to_string(),
                        status: s.as_u16(),
                        detail: String::new(),
                    });
                }
            }
            let (p, outcome) = self.stream_body(resp, partial).await;
            partial = p?;
            match outcome {
                Ok(()) if self.size.is_none_or(|s| partial.written == s) => return Ok(partial),
                Ok(()) if self.size.is_some_and(|s| partial.written > s) => {
                    // More bytes than the listing says: this copy is bad, fetch it again.
                    partial = self.reset(partial).await?;
                }
                Ok(()) => {
                    tracing::warn!(file = self.name, written = partial.written, "body ended early, resuming");
                }
                Err(e) => {
                    tracing::warn!(file = self.name, written = partial.written, error = %e, "download dropped, resuming");
                    if partial.written == start {
                        failures += 1;
                    } else {
                        // Progress was made: this is a fresh failure streak.
                        failures = 1;
                    }
                    if failures >= retry.max_attempts {
                        return Err(StoreError::network(self.url, e));
                    }
                    tokio::time::sleep(retry.delay(failures, None)).await;
                }
            }
        }
    }

    async fn reset(&self, mut partial: Partial) -> Result<Partial, StoreError> {
        let (path, expected, size) = (self.incomplete.clone(), self.expected.cloned(), self.size);
        let partial = blocking(move || {
            partial.reset(&path, expected.as_ref(), size)?;
            Ok(partial)
        })
        .await?;
        self.done.store(0, Ordering::Relaxed);
        Ok(partial)
    }

    /// Streams the body into the partial file. Hashing and writing run on two blocking threads
    /// fed with the same chunks (a `Bytes` clone is a reference count), so SHA-256, the slowest
    /// step, has a core to itself. Returns the partial file (or the write error) and whether the
    /// body ended cleanly; either way both threads saw exactly the chunks that were received.
    async fn stream_body(
        &self,
        resp: reqwest::Response,
        partial: Partial,
    ) -> (Result<Partial, StoreError>, Result<(), reqwest::Error>) {
        let Partial { file, written, mut hasher } = partial;
        let (wtx, mut wrx) = tokio::sync::mpsc::channel::<Bytes>(256);
        let (htx, mut hrx) = tokio::sync::mpsc::channel::<Bytes>(256);
        let path = self.incomplete.clone();
        let done = self.done.clone();
        let writer = tokio::task::spawn_blocking(move || -> Result<(File, u64), StoreError> {
            let mut written = written;
            // Small network chunks are gathered into ~1 MiB vectored writes, without copying.
            let mut batch: Vec<Bytes> = Vec::new();
            let mut batch_len = 0usize;
            loop {
                let next = wrx.blocking_recv();
                let end = next.is_none();
                if let Some(c) = next {
                    batch_len += c.len();
                    batch.push(c);
                }
                if batch_len >= (1 << 20) || batch.len() >= 512 || (end && batch_len > 0) {
                    write_batch(&file, &batch).at(&path)?;
                    written += batch_len as u64;
                    done.store(written, Ordering::Relaxed);
                    batch.clear();
                    batch_len = 0;
                }
                if end {
                    return Ok((file, written));
                }
            }
        });
        let hashing = tokio::task::spawn_blocking(move || {
            while let Some(c) = hrx.blocking_recv() {
                hasher.update(&c);
            }
            hasher
        });
        let mut body = resp.bytes_stream();
        let mut outcome = Ok(());
        while let Some(item) = body.next().await {
            match item {
                Ok(chunk) => {
                    self.fetched.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    // A closed channel means the writer stopped on an I/O error, reported below.
                    if wtx.send(chunk.clone()).await.is_err() || htx.send(chunk).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            }
        }
        drop((wtx, htx));
        let failed = |e: tokio::task::JoinError| {
            StoreError::io(&self.incomplete, std::io::Error::other(format!("download thread failed: {e}")))
        };
        let partial = match (writer.await, hashing.await) {
            (Ok(Ok((file, written))), Ok(hasher)) => Ok(Partial { file, written, hasher }),
            (Ok(Err(e)), _) => Err(e),
            (Err(e), _) | (_, Err(e)) => Err(failed(e)),
        };
        (partial, outcome)
    }
}

/// Writes every chunk of `batch` at the file's position with vectored writes.
fn write_batch(mut file: &File, batch: &[Bytes]) -> std::io::Result<()> {
    let (mut idx, mut off) = (0usize, 0usize);
    while idx < batch.len() {
        let slices: Vec<IoSlice<'_>> = std::iter::once(IoSlice::new(&batch[idx][off..]))
            .chain(batch[idx + 1..].iter().map(|b| IoSlice::new(b)))
            .collect();
        let mut n = file.write_vectored(&slices)?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 && idx < batch.len() {
            let rest = batch[idx].len() - off;
            if n >= rest {
                n -= rest;
                idx += 1;
                off = 0;
            } else {
                off += n;
                n = 0;
            }
        }
    }
    Ok(())
}

/// Runs blocking file work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(StoreError::io("(blocking task)", std::io::Error::other(e.to_string()))),
    }
}

/// Hashes a whole file on disk, for files found in a cache without a record of their hash.
pub(crate) fn hash_file(path: &Path, expected: &Expected, size: u64) -> Result<bool, StoreError> {
    let mut hasher = Hasher::new(Some(expected), Some(size));
    let mut file = File::open(path).at(path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).at(path)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finish().is_some_and(|h| h.eq_ignore_ascii_case(expected.hex())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_sha1_matches_git() {
        // `printf 'hello\n' | git hash-object --stdin`
        let mut h = Hasher::new(Some(&Expected::GitSha1(String::new())), Some(6));
        h.update(b"hello\n");
        assert_eq!(h.finish().unwrap(), "ce013625030ba8dba906f756967f9e9ca394464a");
    }

    #[test]
    fn vectored_batches_are_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let f = File::create(&p).unwrap();
        let batch: Vec<Bytes> = (0..600u32).map(|i| Bytes::from(vec![i as u8; 1 + (i as usize % 7) * 1000])).collect();
        write_batch(&f, &batch).unwrap();
        let expected: Vec<u8> = batch.iter().flat_map(|b| b.iter().copied()).collect();
        assert_eq!(std::fs::read(&p).unwrap(), expected);
    }

    #[test]
    fn partial_open_hashes_existing_bytes_and_drops_oversized_ones() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.incomplete");
        std::fs::write(&p, b"hello\n").unwrap();
        let exp = Expected::Sha256(String::new());
        let part = Partial::open(&p, Some(&exp), Some(10)).unwrap();
        assert_eq!(part.written, 6);
        let mut whole = Hasher::new(Some(&exp), None);
        whole.update(b"hello\n");
        assert_eq!(part.hasher.finish(), whole.finish());
        let part = Partial::open(&p, Some(&exp), Some(3)).unwrap();
        assert_eq!(part.written, 0);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 0);
    }
}
