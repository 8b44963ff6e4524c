//! Perplexity on the GPL-3 text with 512-token chunks, within 1% of llama.cpp's
//! (`llama-perplexity -c 512`: SmolLM2 18.3914, Gemma 3 13.9062), with the best kernels of
//! this CPU and with every lower SIMD level it can run (`CAPY_ISA=avx2` on an AVX-512
//! machine, say). The scalar level is left to the golden tests (a whole perplexity run on
//! the scalar kernels takes minutes).

mod common;

use common::{model_path, run};

fn ppl(model: &str, isa: Option<&str>) -> f64 {
    let path = model_path(model);
    let env: Vec<(&str, &str)> = isa.map(|i| ("CAPY_ISA", i)).into_iter().collect();
    let (ok, out, err) = run(
        &[
            "perplexity",
            "-m",
            path.to_str().unwrap(),
            "-f",
            "/usr/share/common-licenses/GPL-3",
            "-c",
            "512",
            "-t",
            "2",
        ],
        &env,
    );
    assert!(ok, "{err}");
    let line = out.lines().last().expect("a PPL line");
    assert!(line.starts_with("PPL = "), "{line}");
    line["PPL = ".len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn check(model: &str, reference: f64, isa: Option<&str>) {
    let p = ppl(model, isa);
    let rel = (p - reference).abs() / reference;
    let level = isa.unwrap_or("best");
    eprintln!(
        "{model} ({level} kernels): PPL {p:.4} vs llama.cpp {reference} ({:+.3}%)",
        (p / reference - 1.0) * 100.0
    );
    assert!(
        rel <= 0.01,
        "{model} ({level} kernels): PPL {p} is {:.2}% from llama.cpp's {reference}",
        rel * 100.0
    );
}

/// The SIMD levels this CPU can run below its best one.
fn lower_simd_levels() -> Vec<&'static str> {
    use capy_kernels::Isa;
    let best = Isa::best();
    Isa::all_available()
        .into_iter()
        .filter(|&i| i != Isa::Scalar && i != best)
        .map(Isa::name)
        .collect()
}

#[test]
fn smollm2_perplexity_within_1_percent() {
    check("smollm2-135m", 18.3914, None);
}

#[test]
fn gemma3_perplexity_within_1_percent() {
    check("gemma3-270m", 13.9062, None);
}

#[test]
fn perplexity_within_1_percent_at_every_lower_simd_level() {
    let levels = lower_simd_levels();
    eprintln!("lower SIMD levels on this CPU: {levels:?}");
    if levels.is_empty() {
        // the best level is this CPU's only SIMD level: the tests above ran it
        let simd = capy_kernels::Isa::all_available().len() - 1;
        assert!(simd <= 1, "{simd} SIMD levels but none below the best");
    }
    for isa in levels {
        check("smollm2-135m", 18.3914, Some(isa));
        check("gemma3-270m", 13.9062, Some(isa));
    }
}
