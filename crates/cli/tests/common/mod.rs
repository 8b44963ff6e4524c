//! Helpers for the CLI tests: running the `capy` binary, the real models, golden files and a
//! small loopback HTTP server with Range support.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::Value;

pub fn capy() -> Command {
    Command::new(env!("CARGO_BIN_EXE_capy"))
}

/// Runs capy and returns (exit ok, stdout, stderr).
pub fn run(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut c = capy();
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let Output {
        status,
        stdout,
        stderr,
    } = c.output().expect("capy runs");
    (
        status.success(),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

/// Runs capy with `input` piped to its stdin; returns (exit ok, stdout, stderr).
pub fn run_piped(args: &[&str], env: &[(&str, &str)], input: &[u8]) -> (bool, String, String) {
    let mut c = capy();
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().expect("capy runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("write");
    let out = child.wait_with_output().expect("exits");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn model_path(name: &str) -> PathBuf {
    let store = capy_store::Store::open_default();
    store.resolve(name).unwrap_or_else(|e| {
        panic!(
            "{e}. Run `capy pull {name}` first (CAPY_HOME={})",
            store.root.display()
        )
    })
}

pub fn golden(file: &str) -> Value {
    let dir = std::env::var_os("CAPY_GOLDEN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/golden")
        });
    let text = std::fs::read_to_string(dir.join(file)).expect("golden file");
    serde_json::from_str(&text).expect("golden JSON")
}

pub fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "capy-test-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A route: path -> (content type, body).
pub type Routes = Arc<Mutex<Vec<(String, String, Arc<Vec<u8>>)>>>;

/// A loopback HTTP/1.1 server. `cut_first` > 0 makes the first body response stop after
/// that many bytes (a dropped connection), to test resuming.
pub struct Server {
    pub base: String,
    pub routes: Routes,
    pub requests: Arc<Mutex<Vec<String>>>,
    /// Milliseconds to pause after each 64 KiB of a body (0: send at once).
    pub pause_ms: Arc<AtomicUsize>,
    /// Body bytes written to clients so far.
    pub sent: Arc<AtomicUsize>,
}

impl Server {
    pub fn start(cut_first: usize) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let routes: Routes = Arc::new(Mutex::new(Vec::new()));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (r, q) = (Arc::clone(&routes), Arc::clone(&requests));
        let cut = Arc::new(AtomicUsize::new(cut_first));
        let pause_ms = Arc::new(AtomicUsize::new(0));
        let sent = Arc::new(AtomicUsize::new(0));
        let (p, n) = (Arc::clone(&pause_ms), Arc::clone(&sent));
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (r, q, cut) = (Arc::clone(&r), Arc::clone(&q), Arc::clone(&cut));
                let (p, n) = (Arc::clone(&p), Arc::clone(&n));
                std::thread::spawn(move || {
                    let _ = serve(stream, &r, &q, &cut, &p, &n);
                });
            }
        });
        Server {
            base,
            routes,
            requests,
            pause_ms,
            sent,
        }
    }

    /// A route answering 302 to `location`.
    pub fn redirect(&self, path: &str, location: &str) {
        self.add(path, "redirect", location.as_bytes().to_vec());
    }

    pub fn add(&self, path: &str, content_type: &str, body: Vec<u8>) {
        self.routes.lock().unwrap().push((
            path.to_string(),
            content_type.to_string(),
            Arc::new(body),
        ));
    }
}

fn serve(
    mut s: TcpStream,
    routes: &Routes,
    log: &Mutex<Vec<String>>,
    cut: &AtomicUsize,
    pause_ms: &AtomicUsize,
    sent: &AtomicUsize,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut range_start: Option<usize> = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        let lower = h.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("range: bytes=") {
            range_start = v.trim().trim_end_matches('-').parse().ok();
        }
    }
    log.lock()
        .unwrap()
        .push(format!("{path} range={range_start:?}"));
    let route = routes
        .lock()
        .unwrap()
        .iter()
        .find(|(p, _, _)| *p == path)
        .cloned();
    let Some((_, ct, body)) = route else {
        s.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")?;
        return Ok(());
    };
    if ct == "redirect" {
        let to = String::from_utf8_lossy(&body);
        write!(s, "HTTP/1.1 302 Found\r\nlocation: {to}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")?;
        return Ok(());
    }
    let start = range_start.unwrap_or(0).min(body.len());
    let part = &body[start..];
    let status = if range_start.is_some() {
        "206 Partial Content"
    } else {
        "200 OK"
    };
    write!(s, "HTTP/1.1 {status}\r\ncontent-type: {ct}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", part.len())?;
    let limit = cut.swap(0, Ordering::Relaxed);
    if limit > 0 && limit < part.len() {
        s.write_all(&part[..limit])?;
        return Ok(()); // drop the connection mid-body
    }
    for chunk in part.chunks(64 << 10) {
        s.write_all(chunk)?;
        sent.fetch_add(chunk.len(), Ordering::Relaxed);
        let ms = pause_ms.load(Ordering::Relaxed);
        if ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(ms as u64));
        }
    }
    let mut sink = [0u8; 1];
    let _ = reader.read(&mut sink);
    Ok(())
}
