//! `capy quantize IN OUT TYPE`: a model's weights in another type, as llama-quantize makes
//! them (same names, same per-tensor choices for the mixes).

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use capy_model::quantize::{plan, quantize_file, FileType};
use indicatif::{ProgressBar, ProgressStyle};

use crate::common::{default_threads, model_path, threads};

#[derive(clap::Args)]
pub struct QuantizeArgs {
    /// Input model: .gguf path or stored name.
    pub input: String,
    /// Output .gguf path.
    pub output: PathBuf,
    /// F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K_S, Q3_K_M (Q3_K), Q3_K_L,
    /// Q4_K_S, Q4_K_M (Q4_K), Q5_K_S, Q5_K_M (Q5_K), Q6_K, TQ1_0, TQ2_0 (ternary).
    #[arg(value_parser = file_type)]
    pub r#type: FileType,
    /// Threads (by default, all cores).
    #[arg(short = 't', long, default_value_t = default_threads(), value_parser = threads)]
    pub threads: usize,
    /// Overwrite OUT if it exists.
    #[arg(long)]
    pub force: bool,
    /// Print each tensor's type and go no further.
    #[arg(long)]
    pub dry_run: bool,
}

fn file_type(s: &str) -> Result<FileType, String> {
    FileType::parse(s).ok_or_else(|| {
        let names: Vec<&str> = FileType::ALL.iter().map(|t| t.name()).collect();
        format!("unknown type {s:?}; one of {}", names.join(", "))
    })
}

pub fn quantize(a: QuantizeArgs) -> Result<()> {
    let input = model_path(&a.input, false)?;
    if a.dry_run {
        let g = capy_gguf::Gguf::open(&input)
            .with_context(|| format!("reading {}", input.display()))?;
        let (p, n_fallback) = plan(&g, a.r#type);
        for t in &p {
            println!(
                "{:40} {:>20} {:>6} -> {}",
                t.name,
                format!("{:?}", t.dims),
                t.from,
                t.to
            );
        }
        println!("{n_fallback} tensors took a fallback type (rows not a multiple of 256)");
        return Ok(());
    }
    if a.output.exists() && !a.force {
        bail!(
            "{} exists; give --force to overwrite it",
            a.output.display()
        );
    }
    if crate::common::same_file(&input, &a.output) {
        bail!("the output would overwrite the input {}", input.display());
    }
    if a.output.is_dir() {
        bail!("{} is a directory; give a file name", a.output.display());
    }
    // fail now, not after the work, when the output cannot be written
    let probe = a.output.with_extension("gguf.partial");
    std::fs::File::create(&probe)
        .and_then(|_| std::fs::remove_file(&probe))
        .with_context(|| format!("cannot write {}", a.output.display()))?;
    let threads = crate::common::capped_threads(a.threads);
    let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template("{msg:28} [{bar:30}] {bytes}/{total_bytes} {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let t0 = std::time::Instant::now();
    let r = quantize_file(
        &input,
        &a.output,
        a.r#type,
        threads,
        &mut |done, total, name| {
            bar.set_length(total);
            bar.set_position(done);
            bar.set_message(name.to_string());
        },
    )
    .map_err(|e| anyhow!(e))
    .with_context(|| format!("quantizing {} to {}", input.display(), a.r#type.name()))?;
    bar.finish_and_clear();
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    eprintln!(
        "{}: {} tensors, {:.1} MiB -> {:.1} MiB ({}), {:.1} s{}",
        a.output.display(),
        r.n_tensors,
        mib(r.bytes_in),
        mib(r.bytes_out),
        a.r#type.name(),
        t0.elapsed().as_secs_f64(),
        if r.n_fallback > 0 {
            format!(
                "; {} tensors in a fallback type (rows not a multiple of 256, as llama-quantize does)",
                r.n_fallback
            )
        } else {
            String::new()
        }
    );
    Ok(())
}
