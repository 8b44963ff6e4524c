//! Parity of every SIMD dot product with the scalar reference, for every block format,
//! on seeded random blocks at many lengths; quantization round-trip error bounds.

use half::f16;

use super::{dequant, dot, quantize};
use crate::blocks::*;
use crate::dispatch::{Isa, Kernels};

/// xorshift64*: deterministic test data without a dependency.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub(crate) fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    pub(crate) fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
    fn small_f16(&mut self) -> f16 {
        f16::from_f32(self.f32() * 0.05)
    }
}

fn random_blocks<T: Pod>(rng: &mut Rng, n: usize, fix: impl Fn(&mut T, &mut Rng)) -> Vec<T> {
    let bytes = rng.bytes(n * std::mem::size_of::<T>());
    let mut buf = AlignedBuf::new();
    buf.resize(bytes.len());
    buf.as_mut_slice().copy_from_slice(&bytes);
    let mut v: Vec<T> = cast_blocks::<T>(buf.as_slice()).unwrap().to_vec();
    for b in v.iter_mut() {
        fix(b, rng);
    }
    v
}

fn random_acts(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.f32() * 3.0).collect()
}

const LENGTHS: [usize; 7] = [1, 2, 3, 5, 8, 17, 40];

fn check<W: Pod, A: Pod>(
    name: &str,
    pick: impl Fn(&Kernels) -> fn(&[W], &[A]) -> f32,
    w: &[W],
    a: &[A],
    dequant_w: impl Fn(&[W], &mut [f32]),
    dequant_a: impl Fn(&[A], &mut [f32]),
    n: usize,
) {
    let reference = pick(&Kernels::SCALAR)(w, a);
    // the reference equals the dot of the dequantized vectors up to rounding
    let (mut fw, mut fa) = (vec![0.0; n], vec![0.0; n]);
    dequant_w(w, &mut fw);
    dequant_a(a, &mut fa);
    let exact: f64 = fw.iter().zip(&fa).map(|(x, y)| *x as f64 * *y as f64).sum();
    let mag: f64 = fw
        .iter()
        .zip(&fa)
        .map(|(x, y)| (*x as f64 * *y as f64).abs())
        .sum();
    assert!(
        (reference as f64 - exact).abs() <= 1e-4 * mag + 1e-5,
        "{name}: scalar {reference} vs dequantized {exact} (n={n})"
    );
    for k in Kernels::all_variants() {
        let got = pick(&k)(w, a);
        assert!(
            (got - reference).abs() <= 1e-5 * mag as f32 + 1e-6,
            "{name} {}: {got} vs scalar {reference} (n={n})",
            k.name
        );
    }
}

macro_rules! parity_test {
    ($test:ident, $W:ty, $A:ty, $bs:expr, $pick:ident, $quant_a:path, $deq_w:path, $deq_a:path, $fix:expr) => {
        #[test]
        fn $test() {
            let mut rng = Rng::new(stringify!($test).len() as u64);
            for &nb in &LENGTHS {
                for _ in 0..4 {
                    let n = nb * $bs;
                    let w: Vec<$W> = random_blocks(&mut rng, nb, $fix);
                    let x = random_acts(&mut rng, n);
                    let mut a: Vec<$A> = random_blocks(&mut rng, nb, |_: &mut $A, _| {});
                    $quant_a(&x, &mut a);
                    check(stringify!($test), |k| k.$pick, &w, &a, $deq_w, $deq_a, n);
                }
            }
        }
    };
}

parity_test!(
    q4_0_q8_0,
    BlockQ4_0,
    BlockQ8_0,
    32,
    dot_q4_0,
    quantize::quantize_q8_0,
    dequant::dequantize_q4_0,
    dequant::dequantize_q8_0,
    |b: &mut BlockQ4_0, r: &mut Rng| b.d = r.small_f16()
);
parity_test!(
    q4_1_q8_1,
    BlockQ4_1,
    BlockQ8_1,
    32,
    dot_q4_1,
    quantize::quantize_q8_1,
    dequant::dequantize_q4_1,
    dequant::dequantize_q8_1,
    |b: &mut BlockQ4_1, r: &mut Rng| {
        b.d = r.small_f16();
        b.m = r.small_f16();
    }
);
parity_test!(
    q5_0_q8_0,
    BlockQ5_0,
    BlockQ8_0,
    32,
    dot_q5_0,
    quantize::quantize_q8_0,
    dequant::dequantize_q5_0,
    dequant::dequantize_q8_0,
    |b: &mut BlockQ5_0, r: &mut Rng| b.d = r.small_f16()
);
parity_test!(
    q5_1_q8_1,
    BlockQ5_1,
    BlockQ8_1,
    32,
    dot_q5_1,
    quantize::quantize_q8_1,
    dequant::dequantize_q5_1,
    dequant::dequantize_q8_1,
    |b: &mut BlockQ5_1, r: &mut Rng| {
        b.d = r.small_f16();
        b.m = r.small_f16();
    }
);
parity_test!(
    q8_0_q8_0,
    BlockQ8_0,
    BlockQ8_0,
    32,
    dot_q8_0,
    quantize::quantize_q8_0,
    dequant::dequantize_q8_0,
    dequant::dequantize_q8_0,
    |b: &mut BlockQ8_0, r: &mut Rng| b.d = r.small_f16()
);
parity_test!(
    q2k_q8k,
    BlockQ2K,
    BlockQ8K,
    256,
    dot_q2k,
    quantize::quantize_q8k,
    dequant::dequantize_q2k,
    dequant::dequantize_q8k,
    |b: &mut BlockQ2K, r: &mut Rng| {
        b.d = r.small_f16();
        b.dmin = r.small_f16();
    }
);
parity_test!(
    q3k_q8k,
    BlockQ3K,
    BlockQ8K,
    256,
    dot_q3k,
    quantize::quantize_q8k,
    dequant::dequantize_q3k,
    dequant::dequantize_q8k,
    |b: &mut BlockQ3K, r: &mut Rng| b.d = r.small_f16()
);
parity_test!(
    q4k_q8k,
    BlockQ4K,
    BlockQ8K,
    256,
    dot_q4k,
    quantize::quantize_q8k,
    dequant::dequantize_q4k,
    dequant::dequantize_q8k,
    |b: &mut BlockQ4K, r: &mut Rng| {
        b.d = r.small_f16();
        b.dmin = r.small_f16();
    }
);
parity_test!(
    q5k_q8k,
    BlockQ5K,
    BlockQ8K,
    256,
    dot_q5k,
    quantize::quantize_q8k,
    dequant::dequantize_q5k,
    dequant::dequantize_q8k,
    |b: &mut BlockQ5K, r: &mut Rng| {
        b.d = r.small_f16();
        b.dmin = r.small_f16();
    }
);
parity_test!(
    q6k_q8k,
    BlockQ6K,
    BlockQ8K,
    256,
    dot_q6k,
    quantize::quantize_q8k,
    dequant::dequantize_q6k,
    dequant::dequantize_q8k,
    |b: &mut BlockQ6K, r: &mut Rng| b.d = r.small_f16()
);

#[test]
fn float_dots_every_tail_length() {
    let mut rng = Rng::new(7);
    for n in 0..70 {
        let x = random_acts(&mut rng, n);
        let y = random_acts(&mut rng, n);
        let xh: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
        let r32 = dot::vec_dot_f32(&x, &y);
        let r16 = dot::vec_dot_f16_f32(&xh, &y);
        for k in Kernels::all_variants() {
            assert!(
                ((k.dot_f32)(&x, &y) - r32).abs() < 1e-4,
                "f32 {} n={n}",
                k.name
            );
            assert!(
                ((k.dot_f16)(&xh, &y) - r16).abs() < 1e-4,
                "f16 {} n={n}",
                k.name
            );
        }
    }
}

#[test]
fn axpy_f16_every_tail_length() {
    let mut rng = Rng::new(11);
    for n in 0..40 {
        let x: Vec<f16> = random_acts(&mut rng, n)
            .iter()
            .map(|&v| f16::from_f32(v))
            .collect();
        let y0 = random_acts(&mut rng, n);
        let mut want = y0.clone();
        dot::axpy_f16(&mut want, 0.37, &x);
        for k in Kernels::all_variants() {
            let mut got = y0.clone();
            (k.axpy_f16)(&mut got, 0.37, &x);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-5, "{} n={n}: {g} vs {w}", k.name);
            }
        }
    }
}

/// llama.cpp's test-quantize-fns data, metric and thresholds: `sqrt(sum sq err) / n` of a
/// round trip on `0.1 + 2 cos(i)`, n = 4096.
fn round_trip_mse<B: Pod>(bs: usize, q: fn(&[f32], &mut [B]), d: fn(&[B], &mut [f32])) -> f32 {
    let n = 32 * 128;
    let x: Vec<f32> = (0..n).map(|i| 0.1 + 2.0 * (i as f32).cos()).collect();
    let mut rng = Rng::new(1);
    let mut blocks: Vec<B> = random_blocks(&mut rng, n / bs, |_: &mut B, _| {});
    q(&x, &mut blocks);
    let mut y = vec![0.0; n];
    d(&blocks, &mut y);
    x.iter()
        .zip(&y)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f32>()
        .sqrt()
        / n as f32
}

#[test]
fn quantization_error_under_llama_cpp_thresholds() {
    const MAX_ERR: f32 = 0.002;
    let cases = [
        (
            "q4_0",
            round_trip_mse(32, quantize::quantize_q4_0, dequant::dequantize_q4_0),
        ),
        (
            "q4_1",
            round_trip_mse(32, quantize::quantize_q4_1, dequant::dequantize_q4_1),
        ),
        (
            "q5_0",
            round_trip_mse(32, quantize::quantize_q5_0, dequant::dequantize_q5_0),
        ),
        (
            "q5_1",
            round_trip_mse(32, quantize::quantize_q5_1, dequant::dequantize_q5_1),
        ),
        (
            "q8_0",
            round_trip_mse(32, quantize::quantize_q8_0, dequant::dequantize_q8_0),
        ),
        (
            "q8_1",
            round_trip_mse(32, quantize::quantize_q8_1, dequant::dequantize_q8_1),
        ),
        (
            "q8_k",
            round_trip_mse(256, quantize::quantize_q8k, dequant::dequantize_q8k),
        ),
    ];
    for (name, err) in cases {
        assert!(err < MAX_ERR, "{name}: error {err}");
        assert!(
            err > 0.0,
            "{name}: a lossy format with zero error means the test is broken"
        );
    }
}

#[test]
fn nearest_int_rounds_ties_to_even() {
    for (x, want) in [
        (0.5f32, 0),
        (1.5, 2),
        (2.5, 2),
        (-0.5, 0),
        (-1.5, -2),
        (126.6, 127),
        (-127.0, -127),
        (3.49, 3),
    ] {
        assert_eq!(quantize::nearest_int(x), want, "{x}");
    }
}

#[test]
fn q8k_bsums_and_extremes() {
    let mut rng = Rng::new(3);
    let x = random_acts(&mut rng, 512);
    let mut b: Vec<BlockQ8K> = random_blocks(&mut rng, 2, |_: &mut BlockQ8K, _| {});
    quantize::quantize_q8k(&x, &mut b);
    for blk in &b {
        for j in 0..16 {
            let s: i32 = blk.qs[16 * j..16 * j + 16].iter().map(|&q| q as i32).sum();
            assert_eq!(s, blk.bsums[j] as i32);
        }
        assert!(blk.qs.iter().any(|&q| q == -127 || q == 127));
    }
    let zeros = vec![0.0; 256];
    quantize::quantize_q8k(&zeros, &mut b[..1]);
    assert_eq!(b[0].d, 0.0);
    assert!(b[0].qs.iter().all(|&q| q == 0));
}

macro_rules! parity4_test {
    ($test:ident, $W:ty, $A:ty, $bs:expr, $pick4:ident, $pick:ident, $quant_a:path, $fix:expr) => {
        #[test]
        fn $test() {
            let mut rng = Rng::new(stringify!($test).len() as u64 + 100);
            let mut covered = 0;
            for &nb in &LENGTHS {
                let n = nb * $bs;
                let w: Vec<$W> = random_blocks(&mut rng, nb, $fix);
                let acts: Vec<Vec<$A>> = (0..4)
                    .map(|_| {
                        let x = random_acts(&mut rng, n);
                        let mut a: Vec<$A> = random_blocks(&mut rng, nb, |_: &mut $A, _| {});
                        $quant_a(&x, &mut a);
                        a
                    })
                    .collect();
                let refs: [&[$A]; 4] = std::array::from_fn(|i| acts[i].as_slice());
                for k in Kernels::all_variants() {
                    let Some(dot4) = k.$pick4 else { continue };
                    covered += 1;
                    let got = dot4(&w, refs);
                    for t in 0..4 {
                        let want = (Kernels::SCALAR.$pick)(&w, refs[t]);
                        assert!(
                            (got[t] - want).abs() <= 1e-5 * want.abs().max(1.0) * (n as f32).sqrt(),
                            "{} {}: token {t}: {} vs scalar {want} (n={n})",
                            stringify!($test),
                            k.name,
                            got[t]
                        );
                    }
                }
            }
            // every SIMD table has the multi-token kernels
            let simd = Kernels::all_variants()
                .iter()
                .filter(|k| k.isa != Isa::Scalar)
                .count();
            assert_eq!(covered, simd * LENGTHS.len());
        }
    };
}

parity4_test!(
    dot4_q4_1,
    BlockQ4_1,
    BlockQ8_1,
    32,
    dot4_q4_1,
    dot_q4_1,
    quantize::quantize_q8_1,
    |b: &mut BlockQ4_1, r: &mut Rng| {
        b.d = r.small_f16();
        b.m = r.small_f16();
    }
);
parity4_test!(
    dot4_q5_0,
    BlockQ5_0,
    BlockQ8_0,
    32,
    dot4_q5_0,
    dot_q5_0,
    quantize::quantize_q8_0,
    |b: &mut BlockQ5_0, r: &mut Rng| b.d = r.small_f16()
);
parity4_test!(
    dot4_q8_0,
    BlockQ8_0,
    BlockQ8_0,
    32,
    dot4_q8_0,
    dot_q8_0,
    quantize::quantize_q8_0,
    |b: &mut BlockQ8_0, r: &mut Rng| b.d = r.small_f16()
);
parity4_test!(
    dot4_q4k,
    BlockQ4K,
    BlockQ8K,
    256,
    dot4_q4k,
    dot_q4k,
    quantize::quantize_q8k,
    |b: &mut BlockQ4K, r: &mut Rng| {
        b.d = r.small_f16();
        b.dmin = r.small_f16();
    }
);
parity4_test!(
    dot4_q6k,
    BlockQ6K,
    BlockQ8K,
    256,
    dot4_q6k,
    dot_q6k,
    quantize::quantize_q8k,
    |b: &mut BlockQ6K, r: &mut Rng| b.d = r.small_f16()
);
