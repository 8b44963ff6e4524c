//! Shared helpers for the golden tests: the real models (pulled into the store first, as
//! CI does with `capy pull`) and llama.cpp's reference outputs in `shared/golden/`.
#![allow(dead_code)]

use std::path::PathBuf;

use serde_json::Value;

pub const MODELS: [(&str, &str); 2] = [
    ("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.json"),
    ("gemma3-270m", "gemma-3-270m-q4_k_m.json"),
];

/// The model's path in the store. Fails loudly (never skips) when it is missing.
pub fn model_path(name: &str) -> PathBuf {
    let store = capy_store::Store::open_default();
    match store.resolve(name) {
        Ok(p) => p,
        Err(e) => panic!(
            "{e}. The golden tests need the real models: run `capy pull {name}` (CAPY_HOME={})",
            store.root.display()
        ),
    }
}

/// The golden file, found in `shared/golden` beside the repository (or `CAPY_GOLDEN_DIR`).
pub fn golden(file: &str) -> Value {
    let dir = std::env::var_os("CAPY_GOLDEN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/golden")
        });
    let path = dir.join(file);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading golden file {}: {e}", path.display()));
    serde_json::from_str(&text).expect("golden file is JSON")
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array of token ids")
        .iter()
        .map(|x| x.as_u64().expect("token id") as u32)
        .collect()
}
