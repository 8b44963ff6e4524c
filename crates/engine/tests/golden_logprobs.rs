//! Teacher-forced against llama.cpp's greedy completions: prompt + golden tokens go through
//! the model once (echo), and at every generated position the logprob of llama.cpp's token
//! and the top-1 choice are compared with the tolerances. Matching either of
//! llama.cpp's two references (F16 flash attention, or F32 without) is accepted.

mod common;

use capy_engine::{ContextParams, Engine, GenerateParams, SamplerParams};
use common::{golden, ids, model_path, MODELS};
use serde_json::Value;

struct Stats {
    mean_abs: f64,
    max_abs: f64,
    top1_mismatch: Vec<String>,
}

/// Compares capy's prompt logprobs (teacher-forced) with one reference's steps.
fn compare(
    label: &str,
    plp: &[Option<capy_engine::generate::PromptLogprob>],
    n_prompt: usize,
    steps: &[Value],
    out: &mut Vec<(f64, bool, String)>,
) {
    for (i, step) in steps.iter().enumerate() {
        // prompt_logprobs[j] predicts token j from tokens before it
        let entry = plp[n_prompt + i]
            .as_ref()
            .expect("a prediction for every position");
        let want_id = step["token_id"].as_u64().unwrap() as u32;
        assert_eq!(entry.id, want_id);
        let diff = (entry.logprob as f64 - step["logprob"].as_f64().unwrap()).abs();
        let top5 = step["top5"].as_array().unwrap();
        let margin = if top5.len() >= 2 {
            top5[0]["logprob"].as_f64().unwrap() - top5[1]["logprob"].as_f64().unwrap()
        } else {
            f64::INFINITY
        };
        let ref_top1 = top5[0]["token_id"].as_u64().unwrap() as u32;
        let ours_top1 = entry.top[0].0;
        let top1_bad = margin >= 0.5 && ours_top1 != ref_top1;
        out.push((
            diff,
            top1_bad,
            format!("{label} step {i}: ours {ours_top1} ref {ref_top1} margin {margin:.3}"),
        ));
        if std::env::var_os("CAPY_GOLDEN_VERBOSE").is_some() && diff > 0.15 {
            let r = step["logprob"].as_f64().unwrap_or(0.0);
            eprintln!(
                "{label} step {i}: logprob of the reference token: ours {:.4}, llama.cpp {r:.4}",
                entry.logprob
            );
        }
    }
}

fn stats(v: &[(f64, bool, String)]) -> Stats {
    Stats {
        mean_abs: v.iter().map(|x| x.0).sum::<f64>() / v.len() as f64,
        max_abs: v.iter().map(|x| x.0).fold(0.0, f64::max),
        top1_mismatch: v.iter().filter(|x| x.1).map(|x| x.2.clone()).collect(),
    }
}

fn run_model(name: &str, file: &str, isa: Option<capy_kernels::Isa>) {
    let engine = Engine::load(model_path(name)).expect("model loads");
    let mut session = engine.session(ContextParams {
        n_ctx: 256,
        n_outputs: 64,
        n_threads: 2,
        isa,
        ..Default::default()
    });
    let name = &format!(
        "{name} ({})",
        isa.map(|i| i.name()).unwrap_or("default kernels")
    );
    let g = golden(file);
    let mut cases: Vec<Value> = g["completions"].as_array().unwrap().clone();
    cases.push(g["chat"]["completion"].clone());
    let params = GenerateParams {
        max_tokens: 1,
        sampler: SamplerParams::greedy(),
        top_logprobs: 5,
        echo: true,
        ..Default::default()
    };
    let (mut primary, mut alt) = (Vec::new(), Vec::new());
    for c in &cases {
        let prompt = ids(&c["prompt_token_ids"]);
        for (reference, out) in [(c, &mut primary), (&c["alt_fa_off_f32kv"], &mut alt)] {
            if reference.is_null() {
                continue;
            }
            let gen = ids(&reference["generated_token_ids"]);
            let mut all = prompt.clone();
            all.extend_from_slice(&gen);
            let r = session
                .generate(&all, &params, |_, _| true)
                .expect("generate");
            let plp = r.prompt_logprobs.expect("echo gives prompt logprobs");
            let steps = reference["steps"].as_array().unwrap();
            assert_eq!(steps.len(), gen.len());
            assert_eq!(plp.len(), all.len());
            let label = format!(
                "{name} {:?}",
                c["prompt"]
                    .as_str()
                    .unwrap_or("")
                    .chars()
                    .take(24)
                    .collect::<String>()
            );
            compare(&label, &plp, prompt.len(), steps, out);
        }
    }
    let (p, a) = (stats(&primary), stats(&alt));
    eprintln!(
        "{name}: vs llama.cpp default: mean |dlogprob| {:.4}, max {:.4}, top-1 mismatches {}; vs F32: mean {:.4}, max {:.4}, mismatches {}",
        p.mean_abs, p.max_abs, p.top1_mismatch.len(), a.mean_abs, a.max_abs, a.top1_mismatch.len()
    );
    let ok = |s: &Stats| s.mean_abs <= 0.06 && s.max_abs <= 0.4 && s.top1_mismatch.is_empty();
    assert!(
        ok(&p) || ok(&a),
        "{name}: outside tolerance. default: mean {:.4} max {:.4} {:?}; f32: mean {:.4} max {:.4} {:?}",
        p.mean_abs, p.max_abs, p.top1_mismatch, a.mean_abs, a.max_abs, a.top1_mismatch
    );
}

#[test]
fn smollm2_teacher_forced_matches_llama_cpp() {
    run_model(MODELS[0].0, MODELS[0].1, None);
}

#[test]
fn gemma3_teacher_forced_matches_llama_cpp() {
    run_model(MODELS[1].0, MODELS[1].1, None);
}

/// Gemma 3 with every SIMD level below this CPU's best (`CAPY_ISA=avx2` on an AVX-512
/// machine, say); the test above runs the best one.
#[test]
fn gemma3_teacher_forced_at_every_lower_simd_level() {
    use capy_kernels::Isa;
    let best = Isa::best();
    let lower: Vec<Isa> = Isa::all_available()
        .into_iter()
        .filter(|&i| i != Isa::Scalar && i != best)
        .collect();
    if lower.is_empty() {
        // the best level is this CPU's only SIMD level: the test above ran it
        let simd = Isa::all_available().len() - 1;
        assert!(simd <= 1, "{simd} SIMD levels but none below the best");
    }
    for isa in lower {
        run_model(MODELS[1].0, MODELS[1].1, Some(isa));
    }
}

/// The scalar reference kernels (and every SIMD level) meet the same tolerances.
#[test]
fn smollm2_teacher_forced_with_every_isa() {
    for isa in capy_kernels::Isa::all_available() {
        run_model(MODELS[0].0, MODELS[0].1, Some(isa));
    }
}
