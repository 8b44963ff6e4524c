//! `capy quantize`'s per-tensor choices and output: the plan for each shipped model's own
//! file type reproduces the types llama-quantize gave its tensors, and a quantized copy
//! loads with its metadata and gives nearly the same predictions.

mod common;

use capy_engine::{ContextParams, Engine, GenerateParams, SamplerParams};
use capy_gguf::Gguf;
use capy_model::quantize::{plan, quantize_file, FileType};
use common::{golden, ids, model_path};

#[test]
fn plans_reproduce_the_shipped_files_types() {
    for (name, ft) in [
        ("gemma3-270m", FileType::Q4_K_M),
        ("smollm2-135m", FileType::Q4_1),
    ] {
        let g = Gguf::open(model_path(name)).unwrap();
        let (p, n_fallback) = plan(&g, ft);
        assert_eq!(p.len(), g.tensors().len());
        for t in &p {
            assert_eq!(
                t.to, t.from,
                "{name} {}: {} planned, {} shipped",
                t.name, t.to, t.from
            );
        }
        // both have rows a 256-wide block does not divide (576 and 640 columns)
        assert!(n_fallback > 0, "{name}");
    }
}

/// Teacher-forced logprobs of a golden completion under a model file.
fn logprobs_of(path: &std::path::Path, tokens: &[u32]) -> Vec<f32> {
    let e = Engine::load(path).unwrap();
    let mut s = e.session(ContextParams {
        n_ctx: 128,
        n_outputs: 64,
        n_threads: 2,
        ..Default::default()
    });
    let r = s
        .generate(
            tokens,
            &GenerateParams {
                max_tokens: 1,
                echo: true,
                sampler: SamplerParams::greedy(),
                ..Default::default()
            },
            |_, _| true,
        )
        .unwrap();
    r.prompt_logprobs
        .unwrap()
        .iter()
        .skip(1)
        .map(|p| p.as_ref().unwrap().logprob)
        .collect()
}

#[test]
fn quantized_copies_load_and_predict_alike() {
    let src = model_path("smollm2-135m");
    let g = golden("SmolLM2-135M-Instruct.Q4_1.json");
    let c = &g["completions"][0];
    let mut tokens = ids(&c["prompt_token_ids"]);
    tokens.extend(ids(&c["generated_token_ids"]));
    let base = logprobs_of(&src, &tokens);
    let dir = std::env::temp_dir().join(format!("capy-quantize-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // F32 holds the Q4_1 weights exactly; Q8_0 and Q4_K_M requantize them
    for (ft, tol) in [
        (FileType::F32, 0.06),
        (FileType::Q8_0, 0.08),
        (FileType::Q4_K_M, 0.3),
    ] {
        let out = dir.join(format!("{}.gguf", ft.name()));
        let mut last = (0, 0);
        let r = quantize_file(&src, &out, ft, 2, &mut |d, t, _| last = (d, t)).unwrap();
        assert_eq!(last.0, last.1, "progress reaches the total");
        let q = Gguf::open(&out).unwrap();
        assert_eq!(
            q.get_i64("general.file_type").unwrap(),
            Some(ft.id() as i64)
        );
        let orig = Gguf::open(&src).unwrap();
        assert_eq!(
            q.get_str("tokenizer.chat_template").unwrap(),
            orig.get_str("tokenizer.chat_template").unwrap()
        );
        assert_eq!(r.n_tensors, orig.tensors().len());
        let lp = logprobs_of(&out, &tokens);
        let mean: f32 = lp
            .iter()
            .zip(&base)
            .map(|(a, b)| (a - b).abs())
            .sum::<f32>()
            / lp.len() as f32;
        eprintln!(
            "{}: mean |dlogprob| {mean:.4} over {} positions",
            ft.name(),
            lp.len()
        );
        assert!(mean < tol, "{}: mean |dlogprob| {mean}", ft.name());
    }
    let _ = std::fs::remove_dir_all(&dir);
}
