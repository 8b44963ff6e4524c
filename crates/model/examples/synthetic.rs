//! Writes a synthetic model ([`capy_model::synthetic`]) for tests and benchmarks.
//!
//! ```sh
//! cargo run --release -p capy-model --example synthetic -- \
//!     --vocab-from ~/.capy/models/smollm2-135m.gguf --out bitnet2b-f16.gguf   # BitNet 2B shape
//! cargo run --release -p capy-model --example synthetic -- --arch llama --no-scale-tensors \
//!     --vocab-from ~/.capy/models/smollm2-135m.gguf --out trilm2b-f16.gguf
//! ```
//! Options (defaults: BitNet b1.58 2B4T's shape, ternary, scale tensors, F16):
//! `--arch llama|bitnet`, `--n-embd`, `--n-layer`, `--n-head`, `--n-head-kv`, `--n-ff`,
//! `--ctx`, `--seed`, `--gaussian` (Gaussian matrices, std `--std`), `--no-scale-tensors`,
//! `--f32`.

use std::path::PathBuf;

use capy_gguf::{GgmlType, Gguf};
use capy_model::synthetic::{write_synthetic, SyntheticSpec};
use capy_model::Arch;

fn main() {
    if let Err(e) = run() {
        eprintln!("synthetic: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut spec = SyntheticSpec::bitnet_2b();
    let (mut out, mut vocab) = (None, None);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--arch" => spec.arch = Arch::parse(&val()?)?,
            "--n-embd" => spec.n_embd = val()?.parse()?,
            "--n-layer" => spec.n_layer = val()?.parse()?,
            "--n-head" => spec.n_head = val()?.parse()?,
            "--n-head-kv" => spec.n_head_kv = val()?.parse()?,
            "--n-ff" => spec.n_ff = val()?.parse()?,
            "--ctx" => spec.n_ctx = val()?.parse()?,
            "--seed" => spec.seed = val()?.parse()?,
            "--std" => spec.std = val()?.parse()?,
            "--gaussian" => spec.ternary = false,
            "--no-scale-tensors" => spec.scale_tensors = false,
            "--f32" => spec.ty = GgmlType::F32,
            "--out" => out = Some(PathBuf::from(val()?)),
            "--vocab-from" => vocab = Some(PathBuf::from(val()?)),
            other => return Err(format!("unknown option {other} (see the source's docs)").into()),
        }
    }
    let out = out.ok_or("--out is required")?;
    let vocab = vocab.ok_or("--vocab-from is required (a GGUF with a tokenizer)")?;
    let g = Gguf::open(&vocab)?;
    let t = std::time::Instant::now();
    let n = write_synthetic(&spec, &g, &out)?;
    println!(
        "wrote {} ({} {}, {:.3} B parameters, {:.1} s)",
        out.display(),
        spec.arch.name(),
        if spec.ternary { "ternary" } else { "Gaussian" },
        n as f64 / 1e9,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
