//! Speed of the repacked-weight matrix product ([`capy_kernels::matmul::matmul_repacked`]:
//! activation quantization and the R16 kernel) on one thread, per kernel level and weight
//! type, in billions of weight x activation products per second. Each level's result is
//! first checked against the scalar reference.
//!
//! ```sh
//! cargo run --release -p capy-kernels --example r16_bench [-- ROWS COLS]
//! ```
//!
//! ROWS (a multiple of 16, default 2048) and COLS (a multiple of 256, default 2048) give the
//! weight matrix's shape. `R16_TYPE=Q4_0` times one type (any case; one of Q4_0, Q4_1, Q5_0,
//! Q5_1, Q8_0, Q4_K, Q6_K, TQ1_0, TQ2_0), `R16_TOKENS=1,8` those token counts (default 1,8,64),
//! `R16_THREADS=2` runs on a pool of that many threads.

use std::time::Instant;

use capy_kernels::blocks::{cast_blocks_mut, AlignedBuf, BlockQ4K, BlockQ6K};
use capy_kernels::matmul::matmul_repacked;
use capy_kernels::quant::quantize;
use capy_kernels::repack::{repack, R16_TYPES};
use capy_kernels::{GgmlType, Kernels, ThreadPool, WeightRef};

/// A small deterministic generator (xorshift).
struct Rng(u64);

impl Rng {
    fn f32(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

fn matrix(ty: GgmlType, rows: usize, cols: usize, rng: &mut Rng) -> AlignedBuf {
    let mut buf = AlignedBuf::new();
    buf.resize(rows * cols / ty.block_size() * ty.type_size());
    let out = buf.as_mut_slice();
    let x: Vec<f32> = (0..rows * cols).map(|_| rng.f32()).collect();
    let small = |rng: &mut Rng| half::f16::from_f32(rng.f32().abs() * 0.01 + 1e-3);
    match ty {
        GgmlType::Q4_0 => quantize::quantize_q4_0(&x, cast_blocks_mut(out).unwrap()),
        GgmlType::Q4_1 => quantize::quantize_q4_1(&x, cast_blocks_mut(out).unwrap()),
        GgmlType::Q5_0 => quantize::quantize_q5_0(&x, cast_blocks_mut(out).unwrap()),
        GgmlType::Q5_1 => quantize::quantize_q5_1(&x, cast_blocks_mut(out).unwrap()),
        GgmlType::Q8_0 => quantize::quantize_q8_0(&x, cast_blocks_mut(out).unwrap()),
        GgmlType::TQ1_0 => quantize::quantize_tq1_0(&x, cast_blocks_mut(out).unwrap()),
        GgmlType::TQ2_0 => quantize::quantize_tq2_0(&x, cast_blocks_mut(out).unwrap()),
        _ => {
            for (b, v) in out.iter_mut().zip(&x) {
                *b = (v.to_bits() >> 7) as u8;
            }
            if ty == GgmlType::Q4_K {
                for b in cast_blocks_mut::<BlockQ4K>(out).unwrap() {
                    (b.d, b.dmin) = (small(rng), small(rng));
                }
            } else {
                for b in cast_blocks_mut::<BlockQ6K>(out).unwrap() {
                    b.d = small(rng);
                }
            }
        }
    }
    buf
}

/// Prints `msg` and the usage line, and exits with status 2.
fn usage(msg: &str) -> ! {
    eprintln!("r16_bench: {msg}");
    eprintln!(
        "usage: [R16_TYPE=Q4_0] [R16_TOKENS=1,8,64] [R16_THREADS=1] r16_bench [ROWS COLS] \
         (ROWS a multiple of 16, COLS a multiple of 256)"
    );
    std::process::exit(2)
}

/// The value of environment variable `name` parsed as a list of positive integers.
fn env_counts(name: &str) -> Option<Vec<usize>> {
    let v = std::env::var(name).ok()?;
    let parsed: Result<Vec<usize>, _> = v.split(',').map(|x| x.trim().parse::<usize>()).collect();
    match parsed {
        Ok(n) if !n.is_empty() && n.iter().all(|&x| x > 0) => Some(n),
        _ => usage(&format!("{name}={v:?} is not a list of positive integers")),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dims: Vec<usize> = args
        .iter()
        .map(|a| {
            a.parse()
                .unwrap_or_else(|_| usage(&format!("{a:?} is not a number")))
        })
        .collect();
    if dims.len() == 1 || dims.len() > 2 {
        usage("give both ROWS and COLS, or neither");
    }
    let (rows, cols) = (
        dims.first().copied().unwrap_or(2048),
        dims.get(1).copied().unwrap_or(2048),
    );
    if rows == 0 || rows % 16 != 0 || cols == 0 || cols % 256 != 0 {
        usage(&format!(
            "{rows} x {cols}: ROWS must be a multiple of 16, COLS of 256"
        ));
    }
    let only = std::env::var("R16_TYPE").ok().map(|v| {
        R16_TYPES
            .into_iter()
            .find(|t| t.to_string().eq_ignore_ascii_case(v.trim()))
            .unwrap_or_else(|| usage(&format!("R16_TYPE={v:?} is not a repacked type")))
    });
    let toks = env_counts("R16_TOKENS").unwrap_or_else(|| vec![1, 8, 64]);
    let threads = env_counts("R16_THREADS").map_or(1, |t| t[0]);
    let pool = ThreadPool::new(threads);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    println!("{rows} x {cols} weights, {threads} thread(s); G products/s (higher is better)");
    print!("{:<8}{:>6}", "type", "n_tok");
    let variants = Kernels::all_variants();
    for k in &variants {
        print!("{:>14}", k.name);
    }
    println!();
    for ty in R16_TYPES {
        if only.is_some_and(|o| o != ty) {
            continue;
        }
        let bytes = matrix(ty, rows, cols, &mut rng);
        let w = WeightRef {
            ty,
            data: bytes.as_slice(),
            n_rows: rows,
            n_cols: cols,
        };
        let rp = match repack(w) {
            Ok(Some(rp)) => rp,
            Ok(None) => usage(&format!("{ty} is not repacked on this build")),
            Err(e) => usage(&format!("{rows} x {cols} {ty}: {e}")),
        };
        for &n_tok in &toks {
            let x: Vec<f32> = (0..n_tok * cols).map(|_| rng.f32()).collect();
            let mut scratch = AlignedBuf::new();
            let mut want = vec![0.0f32; n_tok * rows];
            matmul_repacked(&Kernels::SCALAR, &pool, &rp, &x, &mut want, &mut scratch).unwrap();
            print!("{:<8}{:>6}", ty.to_string(), n_tok);
            for k in &variants {
                let mut out = vec![0.0f32; n_tok * rows];
                matmul_repacked(k, &pool, &rp, &x, &mut out, &mut scratch).unwrap();
                for (g, w) in out.iter().zip(&want) {
                    assert!(
                        (g - w).abs() <= 1e-3 * w.abs().max(1.0),
                        "{} {ty}: {g} vs {w}",
                        k.name
                    );
                }
                if k.name == "scalar" && (n_tok > 8 || only.is_some()) {
                    print!("{:>14}", "-");
                    continue;
                }
                // the best of five runs of about 0.1 s (the machine may be shared)
                let macs = (rows * cols * n_tok) as f64;
                let reps = ((1e8 / macs) as usize).clamp(1, 10_000);
                let mut best = f64::MAX;
                for _ in 0..5 {
                    let t = Instant::now();
                    for _ in 0..reps {
                        matmul_repacked(k, &pool, &rp, &x, &mut out, &mut scratch).unwrap();
                    }
                    best = best.min(t.elapsed().as_secs_f64());
                }
                print!("{:>14.2}", macs * reps as f64 / best / 1e9);
            }
            println!();
        }
    }
    println!("every level matched the scalar reference (within 1e-3 relative)");
}
