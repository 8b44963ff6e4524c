//! Perplexity on the GPL-3 text with 512-token chunks, within 1% of llama.cpp's
//! (`llama-perplexity -c 512`: SmolLM2 18.3914, Gemma 3 13.9062).

mod common;

use common::{model_path, run};

fn ppl(model: &str) -> f64 {
    let path = model_path(model);
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
        &[],
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

fn check(model: &str, reference: f64) {
    let p = ppl(model);
    let rel = (p - reference).abs() / reference;
    eprintln!(
        "{model}: PPL {p:.4} vs llama.cpp {reference} ({:+.3}%)",
        (p / reference - 1.0) * 100.0
    );
    assert!(
        rel <= 0.01,
        "{model}: PPL {p} is {:.2}% from llama.cpp's {reference}",
        rel * 100.0
    );
}

#[test]
fn smollm2_perplexity_within_1_percent() {
    check("smollm2-135m", 18.3914);
}

#[test]
fn gemma3_perplexity_within_1_percent() {
    check("gemma3-270m", 13.9062);
}
