//! The connection layer under hostile clients, over real sockets on loopback: 1,100 idle
//! keep-alive connections used up the file descriptors, slowloris connections were held
//! forever, a 4 MB body got a plain-text 413 and a 20 MB one a closed connection, and a
//! shutdown with an idle connection and a half-sent body never ended.

mod common;

use std::time::{Duration, Instant};

use capy_server::{serve_connections, Limits, Net};
use common::{small_batch, state};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A server on a free loopback port with these limits; `stop` ends it.
async fn start(
    tag: &str,
    limits: Limits,
    net: Net,
) -> (
    std::net::SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let st = state(tag, small_batch());
    let st = capy_server::AppState::with_limits(std::sync::Arc::clone(&st.registry), limits);
    st.load_warm_set().await.expect("loads");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let app = capy_server::app(st);
    let task = tokio::spawn(serve_connections(listener, app, net, async move {
        let _ = rx.await;
    }));
    (addr, tx, task)
}

/// Everything the server sends until it closes the connection (or `wait` passes).
async fn read_all(s: &mut TcpStream, wait: Duration) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn body_json(resp: &str) -> Value {
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("");
    serde_json::from_str(body).unwrap_or(Value::Null)
}

fn net(read_timeout: Duration) -> Net {
    Net {
        max_connections: 8,
        read_timeout,
        shutdown_timeout: Duration::from_secs(2),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_get_413_in_the_api_shape() {
    let limits = Limits {
        max_body: 64 << 10,
        body_timeout: Duration::from_secs(5),
    };
    let (addr, stop, task) = start("net-413", limits, net(Duration::from_secs(5))).await;
    for (path, ollama) in [("/v1/chat/completions", false), ("/api/chat", true)] {
        // declared too large: answered before the body is read
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 20000000\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.expect("write");
        let resp = read_all(&mut s, Duration::from_secs(5)).await;
        assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
        let v = body_json(&resp);
        if ollama {
            assert!(v["error"].as_str().unwrap_or("").contains("limit"), "{v}");
        } else {
            assert_eq!(v["error"]["code"], "request_too_large", "{v}");
        }
        // chunked, no length given: cut off at the limit
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.expect("write");
        let chunk = format!("{:x}\r\n{}\r\n", 32 << 10, "a".repeat(32 << 10));
        for _ in 0..3 {
            if s.write_all(chunk.as_bytes()).await.is_err() {
                break;
            }
        }
        let resp = read_all(&mut s, Duration::from_secs(5)).await;
        assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
    }
    let _ = stop.send(());
    task.await.expect("server ends");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_clients_are_cut_off_and_connections_are_capped() {
    let limits = Limits {
        max_body: 1 << 20,
        body_timeout: Duration::from_millis(800),
    };
    let (addr, stop, task) = start("net-slow", limits, net(Duration::from_millis(800))).await;
    // headers trickled: the connection is closed after the read timeout
    let mut slow = TcpStream::connect(addr).await.expect("connect");
    slow.write_all(b"GET /health HTTP/1.1\r\nhost")
        .await
        .expect("write");
    let t = Instant::now();
    let resp = read_all(&mut slow, Duration::from_secs(5)).await;
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "held {:?}: {resp}",
        t.elapsed()
    );
    // a body trickled: 408 in the API's shape
    let mut slow = TcpStream::connect(addr).await.expect("connect");
    slow.write_all(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{\"mo")
        .await
        .expect("write");
    let resp = read_all(&mut slow, Duration::from_secs(5)).await;
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert!(body_json(&resp)["error"]["message"].is_string(), "{resp}");
    // an idle keep-alive connection is closed too
    let mut idle = TcpStream::connect(addr).await.expect("connect");
    idle.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let t = Instant::now();
    let resp = read_all(&mut idle, Duration::from_secs(5)).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "idle connection held {:?}",
        t.elapsed()
    );
    // at the cap, a new client gets 503 at once, and /health works again once they go
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(TcpStream::connect(addr).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut extra = TcpStream::connect(addr).await.expect("connect");
    extra
        .write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let resp = read_all(&mut extra, Duration::from_secs(2)).await;
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
    assert_eq!(body_json(&resp)["error"]["code"], "too_many_connections");
    // in Ollama's shape on its routes
    let mut extra = TcpStream::connect(addr).await.expect("connect");
    extra
        .write_all(b"GET /api/tags HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let resp = read_all(&mut extra, Duration::from_secs(3)).await;
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
    let v = body_json(&resp);
    assert!(
        v["error"]
            .as_str()
            .unwrap_or("")
            .contains("too many open connections"),
        "{v}"
    );
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut ok = TcpStream::connect(addr).await.expect("connect");
    ok.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    assert!(read_all(&mut ok, Duration::from_secs(2))
        .await
        .starts_with("HTTP/1.1 200"));
    let _ = stop.send(());
    task.await.expect("server ends");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_within_its_deadline_with_idle_and_half_sent_requests() {
    let limits = Limits {
        max_body: 1 << 20,
        body_timeout: Duration::from_secs(60),
    };
    let (addr, stop, task) = start("net-shutdown", limits, net(Duration::from_secs(60))).await;
    let mut idle = TcpStream::connect(addr).await.expect("connect");
    idle.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let mut half = TcpStream::connect(addr).await.expect("connect");
    half.write_all(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{\"mo")
        .await
        .expect("write");
    // a stream in flight
    let mut streaming = TcpStream::connect(addr).await.expect("connect");
    let body = r#"{"model":"m1","prompt":"Once","max_tokens":200,"stream":true,"ignore_eos":true}"#;
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    streaming.write_all(req.as_bytes()).await.expect("write");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the shutdown ends")
        .expect("no panic");
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "took {:?}",
        t.elapsed()
    );
}

/// One plain HTTP/1.1 request on its own connection: (status line, body).
async fn request(addr: std::net::SocketAddr, method: &str, path: &str, body: &str) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    read_all(&mut s, Duration::from_secs(60)).await
}

/// Four concurrent 2 MB `/tokenize` requests pushed `/health` to 2.95 s: tokenizing runs on
/// blocking threads, and a prompt that cannot fit is refused before it is tokenized.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_work_does_not_block_other_requests() {
    let (addr, stop, task) =
        start("net-cpu", Limits::default(), net(Duration::from_secs(30))).await;
    let text = "Hello world, this is a long text. ".repeat(60_000); // 2 MB
    let body = serde_json::json!({"model": "m1", "content": text}).to_string();
    let mut busy = Vec::new();
    for _ in 0..4 {
        let b = body.clone();
        busy.push(tokio::spawn(async move {
            request(addr, "POST", "/tokenize", &b).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        let t = Instant::now();
        let r = request(addr, "GET", "/health", "").await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        worst = worst.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let still_busy = busy.iter().filter(|h| !h.is_finished()).count();
    for h in busy {
        let r = h.await.expect("tokenize");
        assert!(r.starts_with("HTTP/1.1 200"), "{}", &r[..r.len().min(300)]);
    }
    assert!(
        still_busy > 0,
        "the tokenize requests ended before /health was timed"
    );
    assert!(
        worst < Duration::from_millis(500),
        "/health took {worst:?} while tokenizing"
    );
    // 2 MB of chat cannot fit 256 positions: refused at once, not after tokenizing
    let chat = serde_json::json!({"model": "m1", "messages": [{"role": "user", "content": text}]});
    let t = Instant::now();
    let r = request(addr, "POST", "/v1/chat/completions", &chat.to_string()).await;
    assert!(
        r.starts_with("HTTP/1.1 400") && r.contains("context_length_exceeded"),
        "{}",
        &r[..r.len().min(300)]
    );
    assert!(
        t.elapsed() < Duration::from_millis(300),
        "took {:?}",
        t.elapsed()
    );
    let _ = stop.send(());
    task.await.expect("server ends");
}
