//! The ternary kernels side by side on one thread, one token (decoding): the lookup-table
//! kernel ([`capy_kernels::lut`], tables built per token and included) against the repacked
//! integer kernel ([`capy_kernels::matmul::matmul_repacked`], activation quantization
//! included), in billions of weight x activation products per second, per kernel level.
//! Both are first checked against each other.
//!
//! ```sh
//! cargo run --release -p capy-kernels --example lut_bench [-- ROWS COLS]
//! ```
//! ROWS (a multiple of 16, default 6912) and COLS (a multiple of 256, default 2560): BitNet
//! b1.58 2B's FFN shape.

use std::time::Instant;

use capy_kernels::blocks::{cast_blocks_mut, zeroed, AlignedBuf};
use capy_kernels::lut::{build_tables, repack_lut, LUT_ROWS, LUT_TABLE_UNIT};
use capy_kernels::matmul::matmul_repacked;
use capy_kernels::quant::quantize::quantize_tq2_0;
use capy_kernels::repack::{repack, BlockQ8x};
use capy_kernels::{GgmlType, Kernels, ThreadPool, WeightRef};

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (rows, cols) = (
        *args.first().unwrap_or(&6912),
        *args.get(1).unwrap_or(&2560),
    );
    let mut seed = 0x9E37_79B9u64;
    let mut rnd = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    };
    let x: Vec<f32> = (0..rows * cols).map(|_| rnd()).collect();
    let mut bytes = AlignedBuf::new();
    bytes.resize(rows * cols / 256 * 66);
    quantize_tq2_0(&x, cast_blocks_mut(bytes.as_mut_slice()).unwrap());
    let w = WeightRef {
        ty: GgmlType::TQ2_0,
        data: bytes.as_slice(),
        n_rows: rows,
        n_cols: cols,
    };
    let int = repack(w).unwrap().unwrap();
    let lut = repack_lut(w).unwrap().unwrap();
    let act: Vec<f32> = (0..cols).map(|_| rnd() * 3.0).collect();
    let pool = ThreadPool::new(1);
    println!("{rows} x {cols} TQ2_0 weights, 1 thread, 1 token; G products/s (higher is better)");
    println!("{:<20} {:>12} {:>12}", "level", "integer", "lookup");
    for k in Kernels::all_variants() {
        let (mut out, mut scratch) = (vec![0.0f32; rows], AlignedBuf::new());
        let mut a = vec![zeroed::<BlockQ8x>(); cols / 32];
        let mut tables = vec![0u8; cols / 256 * LUT_TABLE_UNIT];
        let mut lut_out = vec![0.0f32; rows];
        let nu = cols / 256;
        let mut run_lut = |lut_out: &mut [f32]| {
            (k.quantize_q8x_k)(&act, &mut a);
            build_tables(&a, &mut tables);
            let da: Vec<f32> = a.chunks(8).map(|b| b[0].d).collect();
            for g in 0..rows / LUT_ROWS {
                let r = (k.lut_gemv)(lut.group(g), nu, &tables, &da);
                lut_out[g * LUT_ROWS..(g + 1) * LUT_ROWS].copy_from_slice(&r);
            }
        };
        matmul_repacked(&k, &pool, &int, &act, &mut out, &mut scratch).unwrap();
        run_lut(&mut lut_out);
        for (a, b) in out.iter().zip(&lut_out) {
            assert!(
                (a - b).abs() <= 1e-3 * a.abs().max(1.0),
                "{}: {a} vs {b}",
                k.name
            );
        }
        let reps = if k.name == "scalar" { 1 } else { 30 };
        let time = |f: &mut dyn FnMut()| {
            let t = Instant::now();
            for _ in 0..reps {
                f();
            }
            (rows * cols * reps) as f64 / t.elapsed().as_secs_f64() / 1e9
        };
        let gi =
            time(&mut || matmul_repacked(&k, &pool, &int, &act, &mut out, &mut scratch).unwrap());
        let gl = time(&mut || run_lut(&mut lut_out));
        println!("{:<20} {gi:>12.2} {gl:>12.2}", k.name);
    }
}
