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

/// `--kl-divergence-base` written from a text, then read back with `--kl-divergence`: the
/// same model against its own saved distributions agrees to the file's precision, and a
/// truncated or foreign file is refused with a message.
#[test]
fn kl_divergence_against_a_saved_base() {
    let path = model_path("smollm2-135m");
    let m = path.to_str().unwrap();
    let dir = std::env::temp_dir().join(format!("capy-kld-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let base = dir.join("base.kld");
    let b = base.to_str().unwrap();
    let common = ["-c", "128", "--chunks", "2", "-t", "2"];
    let f = "/usr/share/common-licenses/GPL-3";
    let (ok, _, err) = run(
        &[
            &["perplexity", "-m", m, "-f", f, "--kl-divergence-base", b],
            &common[..],
        ]
        .concat(),
        &[],
    );
    assert!(ok, "{err}");
    // header, 256 tokens, 2 x 63 records of 49152 + 4 u16
    let n_vocab = 49152u64;
    let want = 20 + 256 * 4 + 2 * 63 * (n_vocab + 4) * 2;
    assert_eq!(std::fs::metadata(&base).unwrap().len(), want);
    let (ok, out, err) = run(
        &[
            "perplexity",
            "-m",
            m,
            "--kl-divergence-base",
            b,
            "--kl-divergence",
            "-t",
            "2",
        ],
        &[],
    );
    assert!(ok, "{err}");
    let field = |name: &str| -> f64 {
        let line = out
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{out}"));
        line[name.len()..]
            .split_whitespace()
            .next()
            .unwrap()
            .trim_end_matches('%')
            .parse()
            .unwrap()
    };
    assert_eq!(field("positions:"), 126.0, "{out}");
    assert!(field("mean KLD:") < 1e-4, "{out}");
    assert!(field("mean |dlogprob|:") < 2e-3, "{out}");
    assert_eq!(field("same top token:"), 100.0, "{out}");
    let compare = || {
        run(
            &[
                "perplexity",
                "-m",
                m,
                "--kl-divergence-base",
                b,
                "--kl-divergence",
            ],
            &[],
        )
    };
    // a record that is no distribution (its scale NaN) is refused, not averaged in
    let mut bytes = std::fs::read(&base).unwrap();
    let rec0 = 20 + 256 * 4;
    bytes[rec0..rec0 + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&base, &bytes).unwrap();
    let (ok, _, err) = compare();
    assert!(
        !ok && err.contains("not a probability distribution"),
        "{err}"
    );
    // another vocabulary with a huge context: refused before a cache is sized for it
    let n_ctx = 1_000_000usize;
    let mut other = b"_logits_".to_vec();
    for v in [n_ctx as i32, 1, 1] {
        other.extend_from_slice(&v.to_le_bytes());
    }
    other.resize(20 + n_ctx * 4 + (n_ctx - 1 - n_ctx / 2) * 6 * 2, 0);
    std::fs::write(&base, &other).unwrap();
    let (ok, _, err) = compare();
    assert!(!ok && err.contains("vocabulary of 1"), "{err}");
    // a base file is never written over the text it is computed from
    let text = dir.join("text.txt");
    std::fs::copy(f, &text).unwrap();
    let t = text.to_str().unwrap();
    let (ok, _, err) = run(
        &[
            &["perplexity", "-m", m, "-f", t, "--kl-divergence-base", t],
            &common[..],
        ]
        .concat(),
        &[],
    );
    assert!(!ok && err.contains("would overwrite the text"), "{err}");
    assert_eq!(std::fs::read(&text).unwrap(), std::fs::read(f).unwrap());
    // a file cut short
    let bytes = std::fs::read(&base).unwrap();
    std::fs::write(&base, &bytes[..bytes.len() - 7]).unwrap();
    let (ok, _, err) = compare();
    assert!(!ok && err.contains("needs"), "{err}");
    // a header whose sizes overflow
    let mut huge = b"_logits_".to_vec();
    for v in [i32::MAX, 49152, i32::MAX] {
        huge.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(&base, &huge).unwrap();
    let (ok, _, err) = compare();
    assert!(!ok && err.contains("needs"), "{err}");
    std::fs::write(&base, b"not a logits file").unwrap();
    let (ok, _, err) = compare();
    assert!(!ok && err.contains("not a llama-perplexity"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
