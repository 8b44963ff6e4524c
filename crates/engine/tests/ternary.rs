//! Ternary models (TQ1_0, TQ2_0) against llama.cpp b11312 on the same files.
//!
//! Tiny synthetic models (capy_model::synthetic; `bitnet` with per-tensor scale tensors, and
//! `llama` with ternary weights as TriLM's) are quantized by `capy quantize`'s code, which
//! must write the ternary tensors byte for byte as llama-quantize did, then teacher-forced
//! over llama.cpp's tokens under every kernel table this CPU runs; the log-probabilities of
//! llama.cpp's five likeliest tokens at each position must agree (mean |difference| <= 0.05)
//! and the top token must be llama.cpp's wherever it led by 0.5 nats or more.
//! The reference (`tests/data/ternary-reference.json`) comes from `bench/ternary-reference.py`.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use capy_engine::{Batch, Context, ContextParams, Model};
use capy_gguf::{GgmlType, Gguf};
use capy_kernels::Kernels;
use capy_model::quantize::{quantize_file, FileType};
use capy_model::synthetic::{write_synthetic, SyntheticSpec};
use capy_model::Arch;
use common::model_path;
use serde_json::Value;

fn reference() -> Value {
    let p =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/ternary-reference.json");
    serde_json::from_str(&std::fs::read_to_string(&p).expect("reference file")).expect("JSON")
}

/// The test's shapes; `bench/ternary-reference.py` makes the same models.
fn spec(arch: Arch) -> SyntheticSpec {
    SyntheticSpec {
        arch,
        n_embd: 256,
        n_layer: 2,
        n_head: 4,
        n_head_kv: 2,
        n_ff: 512,
        n_ctx: 512,
        scale_tensors: arch == Arch::Bitnet,
        ..SyntheticSpec::bitnet_2b()
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `(mean |dlogprob| over the reference's top 5, top-1 mismatches where its margin >= 0.5,
/// positions with such a margin)`.
fn compare(model: &Arc<Model>, kern: &Kernels, r: &Value, n_ctx: usize) -> (f64, usize, usize) {
    let tokens: Vec<u32> = r["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    let steps = r["top5"].as_array().unwrap();
    let mut ctx = Context::new(
        Arc::clone(model),
        ContextParams {
            n_ctx,
            n_batch: n_ctx,
            n_outputs: n_ctx,
            n_threads: 2,
            isa: Some(kern.isa),
            ..Default::default()
        },
    );
    let first = n_ctx / 2;
    let (mut sum, mut n, mut bad, mut confident) = (0.0f64, 0usize, 0, 0);
    let mut step = steps.iter();
    for chunk in tokens.chunks_exact(n_ctx) {
        ctx.kv.clear(0).unwrap();
        let mut batch = Batch::new();
        for (p, &t) in chunk.iter().enumerate().take(n_ctx - 1) {
            batch.push(t, p, 0, p >= first);
        }
        let logits = ctx.decode(&batch).unwrap();
        let n_vocab = model.hp.n_vocab;
        for row in logits.chunks_exact(n_vocab) {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let lse = max as f64
                + row
                    .iter()
                    .map(|&v| ((v - max) as f64).exp())
                    .sum::<f64>()
                    .ln();
            let top = step
                .next()
                .expect("a reference step per position")
                .as_array()
                .unwrap();
            for e in top {
                let (id, lp) = (e[0].as_u64().unwrap() as usize, e[1].as_f64().unwrap());
                sum += (row[id] as f64 - lse - lp).abs();
                n += 1;
            }
            let lp = |i: usize| top[i][1].as_f64().unwrap();
            if lp(0) - lp(1) >= 0.5 {
                confident += 1;
                let best = (0..n_vocab).fold(0, |b, i| if row[i] > row[b] { i } else { b });
                bad += usize::from(best as u64 != top[0][0].as_u64().unwrap());
            }
        }
    }
    assert!(step.next().is_none(), "every reference position compared");
    (sum / n as f64, bad, confident)
}

#[test]
fn ternary_models_match_llama_cpp() {
    let reference = reference();
    let n_ctx = reference["n_ctx"].as_u64().unwrap() as usize;
    let vocab = Gguf::open(model_path("smollm2-135m")).unwrap();
    let dir = std::env::temp_dir().join(format!("capy-ternary-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut report = Vec::new();
    for arch in [Arch::Bitnet, Arch::Llama] {
        let f16 = dir.join(format!("{}-f16.gguf", arch.name()));
        write_synthetic(&spec(arch), &vocab, &f16).unwrap();
        for ft in [FileType::TQ1_0, FileType::TQ2_0] {
            let key = format!("{}-{}", arch.name(), ft.name());
            let r = &reference["models"][&key];
            let path = dir.join(format!("{key}.gguf"));
            quantize_file(&f16, &path, ft, 2, &mut |_, _, _| {}).unwrap();
            // the ternary tensors as llama-quantize wrote them
            let g = Gguf::open(&path).unwrap();
            let want = r["tensor_fnv1a"].as_object().unwrap();
            let mut n_ternary = 0;
            for t in g
                .tensors()
                .iter()
                .filter(|t| matches!(t.ty, GgmlType::TQ1_0 | GgmlType::TQ2_0))
            {
                n_ternary += 1;
                assert_eq!(
                    format!("{:016x}", fnv1a(g.tensor_data(t))),
                    want[&t.name].as_str().unwrap(),
                    "{key} {}: bytes differ from llama-quantize's",
                    t.name
                );
            }
            assert_eq!(n_ternary, want.len(), "{key}");
            let model = Arc::new(Model::load(&path).unwrap());
            for kern in Kernels::all_variants() {
                let (mean, bad, confident) = compare(&model, &kern, r, n_ctx);
                report.push(format!(
                    "{key} {}: mean |dlogprob| {mean:.4}, top-1 {}/{confident}",
                    kern.name,
                    confident - bad
                ));
                assert!(mean <= 0.05, "{key} {}: mean |dlogprob| {mean}", kern.name);
                assert_eq!(
                    bad, 0,
                    "{key} {}: top-1 differs at {bad} of {confident} confident positions",
                    kern.name
                );
                assert!(
                    confident > 20,
                    "{key}: too few confident positions to test ({confident})"
                );
            }
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    println!("{}", report.join("\n"));
}

/// A BitNet per-tensor scale that is not finite (NaN, infinity) is refused at load with the
/// tensor's name, rather than turning every logit into NaN; a NaN weight is refused by
/// `capy quantize`.
#[test]
fn a_non_finite_tensor_scale_is_refused() {
    let vocab = Gguf::open(model_path("smollm2-135m")).unwrap();
    let dir = std::env::temp_dir().join(format!("capy-ternary-nan-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bitnet-f16.gguf");
    write_synthetic(&spec(Arch::Bitnet), &vocab, &path).unwrap();
    assert!(Model::load(&path).is_ok());
    let name = "blk.0.ffn_down.scale";
    let at = {
        let g = Gguf::open(&path).unwrap();
        let info = g.tensor_info(name).unwrap();
        assert_eq!(info.ty, GgmlType::F32);
        (g.data_offset() + info.offset) as usize
    };
    for value in [f32::NAN, f32::INFINITY] {
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let Err(err) = Model::load(&path).map(|_| ()) else {
            panic!("a scale of {value} loaded");
        };
        let err = err.to_string();
        assert!(err.contains(name) && err.contains("not finite"), "{err}");
    }
    // a NaN weight: `capy quantize` refuses the tensor instead of writing NaN scales
    let name = "blk.0.attn_q.weight";
    let at = {
        let g = Gguf::open(&path).unwrap();
        let info = g.tensor_info(name).unwrap();
        assert_eq!(info.ty, GgmlType::F16);
        (g.data_offset() + info.offset) as usize + 2 * 300
    };
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[at..at + 2].copy_from_slice(&0x7E00u16.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let out = dir.join("bitnet-tq2_0.gguf");
    let err = quantize_file(&path, &out, FileType::TQ2_0, 2, &mut |_, _, _| {})
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(err.contains(name) && err.contains("not finite"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
