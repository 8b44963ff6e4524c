//! Parity of every SIMD dot product with the scalar reference, for every block format,
//! on seeded random blocks at many lengths; quantization round-trip error bounds; the
//! weight quantizers' bytes against llama.cpp's.

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

parity_test!(
    tq1_0_q8k,
    BlockTQ1_0,
    BlockQ8K,
    256,
    dot_tq1_0,
    quantize::quantize_q8k,
    dequant::dequantize_tq1_0,
    dequant::dequantize_q8k,
    |b: &mut BlockTQ1_0, r: &mut Rng| b.d = r.small_f16()
);
parity_test!(
    tq2_0_q8k,
    BlockTQ2_0,
    BlockQ8K,
    256,
    dot_tq2_0,
    quantize::quantize_q8k,
    dequant::dequantize_tq2_0,
    dequant::dequantize_q8k,
    |b: &mut BlockTQ2_0, r: &mut Rng| {
        b.d = r.small_f16();
        // 2-bit fields hold 0..=2 (3 is no trit)
        for q in b.qs.iter_mut() {
            for l in 0..4 {
                if (*q >> (2 * l)) & 3 == 3 {
                    *q &= !(1 << (2 * l));
                }
            }
        }
    }
);

/// Ternary weights (a scale times -1, 0 or +1) survive both ternary formats exactly, and the
/// two formats hold the same values for any input.
#[test]
fn ternary_formats_are_lossless_on_ternary_weights() {
    let mut rng = Rng::new(7);
    for scale in [1.0f32, 0.0123, 3.5e-3] {
        let x: Vec<f32> = (0..8 * QK_K)
            .map(|_| ((rng.next_u64() % 3) as f32 - 1.0) * scale)
            .collect();
        let d = f16::from_f32(scale).to_f32();
        for y in [TQ1.round_trip(&x), TQ2.round_trip(&x)] {
            for (a, b) in x.iter().zip(&y) {
                assert_eq!(*b, (a / scale).round() * d, "scale {scale}");
            }
        }
        let x = random_acts(&mut rng, 8 * QK_K);
        assert_eq!(TQ1.round_trip(&x), TQ2.round_trip(&x));
    }
    // every trit pattern of a TQ1_0 byte reads back
    for v in 0..243u16 {
        let trits: Vec<u8> = (0..5).rev().map(|n| (v / 3u16.pow(n)) as u8 % 3).collect();
        let byte = (v * 256).div_ceil(243) as u8;
        let got: Vec<u8> = (0..5).map(|n| dequant::tq1_trit(byte, n)).collect();
        assert_eq!(got, trits, "{v}");
    }
}

/// The four-token float dots give each token exactly what the table's one-token dot gives
/// (batch size never changes a logit), and agree with the scalar reference.
#[test]
fn float_dot4_equals_the_one_token_dot_bit_for_bit() {
    let mut rng = Rng::new(11);
    let mut covered = 0;
    for n in (0..70).chain([576, 1536, 2049]) {
        let x = random_acts(&mut rng, n);
        let xh: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
        let ys: Vec<Vec<f32>> = (0..4).map(|_| random_acts(&mut rng, n)).collect();
        let refs: [&[f32]; 4] = std::array::from_fn(|i| ys[i].as_slice());
        for k in Kernels::all_variants() {
            if let Some(d4) = k.dot4_f32 {
                covered += 1;
                let got = d4(&x, refs);
                for t in 0..4 {
                    assert_eq!(
                        got[t].to_bits(),
                        (k.dot_f32)(&x, refs[t]).to_bits(),
                        "{} n={n}",
                        k.name
                    );
                    let want = dot::vec_dot_f32(&x, refs[t]);
                    assert!(
                        (got[t] - want).abs() < 1e-4 * (n as f32).sqrt().max(1.0),
                        "{} n={n}",
                        k.name
                    );
                }
            }
            if let Some(d4) = k.dot4_f16 {
                let got = d4(&xh, refs);
                for t in 0..4 {
                    assert_eq!(
                        got[t].to_bits(),
                        (k.dot_f16)(&xh, refs[t]).to_bits(),
                        "{} n={n}",
                        k.name
                    );
                    let want = dot::vec_dot_f16_f32(&xh, refs[t]);
                    assert!(
                        (got[t] - want).abs() < 1e-4 * (n as f32).sqrt().max(1.0),
                        "{} n={n}",
                        k.name
                    );
                }
            }
        }
    }
    // the x86 AVX2 table has them wherever it runs
    if Kernels::all_variants().iter().any(|k| k.isa == Isa::Avx2) {
        assert!(covered > 0);
    }
}

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
/// round trip on `0.1 + 2 cosf(i)` (the sum in double, as there), n = 4096.
fn round_trip_mse<B: Pod>(bs: usize, q: fn(&[f32], &mut [B]), d: fn(&[B], &mut [f32])) -> f32 {
    let n = 32 * 128;
    let x: Vec<f32> = (0..n)
        .map(|i| (0.1 + (2.0 * (i as f32).cos()) as f64) as f32)
        .collect();
    let mut rng = Rng::new(1);
    let mut blocks: Vec<B> = random_blocks(&mut rng, n / bs, |_: &mut B, _| {});
    q(&x, &mut blocks);
    let mut y = vec![0.0; n];
    d(&blocks, &mut y);
    let sum: f64 = x
        .iter()
        .zip(&y)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    (sum.sqrt() / n as f64) as f32
}

#[test]
fn quantization_error_under_llama_cpp_thresholds() {
    // MAX_QUANTIZATION_TOTAL_ERROR, _2BITS and _3BITS
    const MAX_ERR: f32 = 0.002;
    const MAX_ERR_2BITS: f32 = 0.0075;
    const MAX_ERR_3BITS: f32 = 0.0040;
    let cases = [
        (
            "q4_0",
            round_trip_mse(32, quantize::quantize_q4_0, dequant::dequantize_q4_0),
            MAX_ERR,
        ),
        (
            "q4_1",
            round_trip_mse(32, quantize::quantize_q4_1, dequant::dequantize_q4_1),
            MAX_ERR,
        ),
        (
            "q5_0",
            round_trip_mse(32, quantize::quantize_q5_0, dequant::dequantize_q5_0),
            MAX_ERR,
        ),
        (
            "q5_1",
            round_trip_mse(32, quantize::quantize_q5_1, dequant::dequantize_q5_1),
            MAX_ERR,
        ),
        (
            "q8_0",
            round_trip_mse(32, quantize::quantize_q8_0, dequant::dequantize_q8_0),
            MAX_ERR,
        ),
        (
            "q8_0 ref",
            round_trip_mse(32, quantize::quantize_q8_0_ref, dequant::dequantize_q8_0),
            MAX_ERR,
        ),
        (
            "q8_1",
            round_trip_mse(32, quantize::quantize_q8_1, dequant::dequantize_q8_1),
            MAX_ERR,
        ),
        (
            "q8_k",
            round_trip_mse(256, quantize::quantize_q8k, dequant::dequantize_q8k),
            MAX_ERR,
        ),
        (
            "q2_k",
            round_trip_mse(256, quantize::quantize_q2k, dequant::dequantize_q2k),
            MAX_ERR_2BITS,
        ),
        (
            "q3_k",
            round_trip_mse(256, quantize::quantize_q3k, dequant::dequantize_q3k),
            MAX_ERR_3BITS,
        ),
        (
            "q4_k",
            round_trip_mse(256, quantize::quantize_q4k, dequant::dequantize_q4k),
            MAX_ERR,
        ),
        (
            "q5_k",
            round_trip_mse(256, quantize::quantize_q5k, dequant::dequantize_q5k),
            MAX_ERR,
        ),
        (
            "q6_k",
            round_trip_mse(256, quantize::quantize_q6k, dequant::dequantize_q6k),
            MAX_ERR,
        ),
    ];
    for (name, err, max) in cases {
        assert!(err < max, "{name}: error {err}, llama.cpp allows {max}");
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

// ---------------------------------------------------------------------------------------
// Weight quantizers: round-trip error on several distributions, stability, llama.cpp bytes.

/// `n` blocks of random bytes.
fn garbage_blocks<B: Pod>(n: usize) -> Vec<B> {
    random_blocks(&mut Rng::new(n as u64), n, |_: &mut B, _| {})
}

/// A weight format's quantizer and dequantizer.
struct WeightFormat<B> {
    name: &'static str,
    block: usize,
    quantize: fn(&[f32], &mut [B]),
    dequantize: fn(&[B], &mut [f32]),
}

impl<B: Pod> WeightFormat<B> {
    /// Quantizes into blocks of random bytes: every byte must be written.
    fn quantize(&self, x: &[f32]) -> Vec<B> {
        let mut b = garbage_blocks(x.len() / self.block);
        (self.quantize)(x, &mut b);
        b
    }

    fn round_trip(&self, x: &[f32]) -> Vec<f32> {
        let mut y = vec![0.0; x.len()];
        (self.dequantize)(&self.quantize(x), &mut y);
        y
    }
}

const Q2K: WeightFormat<BlockQ2K> = WeightFormat {
    name: "q2_K",
    block: QK_K,
    quantize: quantize::quantize_q2k,
    dequantize: dequant::dequantize_q2k,
};
const Q3K: WeightFormat<BlockQ3K> = WeightFormat {
    name: "q3_K",
    block: QK_K,
    quantize: quantize::quantize_q3k,
    dequantize: dequant::dequantize_q3k,
};
const Q4K: WeightFormat<BlockQ4K> = WeightFormat {
    name: "q4_K",
    block: QK_K,
    quantize: quantize::quantize_q4k,
    dequantize: dequant::dequantize_q4k,
};
const Q5K: WeightFormat<BlockQ5K> = WeightFormat {
    name: "q5_K",
    block: QK_K,
    quantize: quantize::quantize_q5k,
    dequantize: dequant::dequantize_q5k,
};
const Q6K: WeightFormat<BlockQ6K> = WeightFormat {
    name: "q6_K",
    block: QK_K,
    quantize: quantize::quantize_q6k,
    dequantize: dequant::dequantize_q6k,
};

const TQ1: WeightFormat<BlockTQ1_0> = WeightFormat {
    name: "tq1_0",
    block: QK_K,
    quantize: quantize::quantize_tq1_0,
    dequantize: dequant::dequantize_tq1_0,
};
const TQ2: WeightFormat<BlockTQ2_0> = WeightFormat {
    name: "tq2_0",
    block: QK_K,
    quantize: quantize::quantize_tq2_0,
    dequantize: dequant::dequantize_tq2_0,
};

/// Test weights: `n` values of a named distribution, from integer arithmetic only so every
/// platform gets the same bits.
fn weights(dist: &str, n: usize, seed: u64) -> Vec<f32> {
    // sum of four uniforms: bell-shaped, standard deviation ~0.58
    fn bell(rng: &mut Rng) -> f32 {
        (0..4).map(|_| rng.f32()).sum::<f32>() * 0.5
    }
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|i| match dist {
            "uniform" => rng.f32(),
            "gaussian" => bell(&mut rng) * 0.02,
            // a few values 30x the rest, as in some attention and FFN weights
            "outliers" => bell(&mut rng) * if i % 97 == 13 { 0.6 } else { 0.02 },
            "zeros" => 0.0,
            "constant" => 0.37,
            "negative constant" => -0.21,
            _ => unreachable!("{dist}"),
        })
        .collect()
}

/// Root mean square of `x - y`, over the root mean square of `x`.
fn relative_rmse(x: &[f32], y: &[f32]) -> f64 {
    let err: f64 = x.iter().zip(y).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let rms: f64 = x.iter().map(|&a| (a as f64).powi(2)).sum();
    (err / rms).sqrt()
}

/// Inputs for the llama.cpp byte comparison: the test distributions plus the cases where
/// implementations drift apart: exact rounding ties, bf16-rounded values, power-of-two
/// scales from 2^-60 to 2^20, one-sided and sparse blocks, groups just below and above
/// llama.cpp's 1e-15 all-zero threshold. Integer arithmetic and exact scalings only, so
/// every platform builds the same bits.
fn golden_input() -> Vec<f32> {
    let mut x = Vec::new();
    for (seed, dist) in [
        "uniform",
        "gaussian",
        "outliers",
        "zeros",
        "constant",
        "negative constant",
    ]
    .iter()
    .enumerate()
    {
        x.extend(weights(dist, 2 * QK_K, seed as u64));
    }
    let mut rng = Rng::new(42);
    // halves from -4 to 4: every rounding is a tie
    x.extend((0..2 * QK_K).map(|_| ((rng.next_u64() % 17) as i32 - 8) as f32 * 0.5));
    x.extend((0..2 * QK_K).map(|_| half::bf16::from_f32(rng.f32() * 0.03).to_f32()));
    for b in 0..24 {
        let scale = 2f32.powi(4 * b - 60);
        for i in 0..QK_K {
            let v = rng.f32() * scale;
            x.push(match b % 4 {
                0 => v,
                1 => v.abs() + scale,  // all positive
                2 => -v.abs() - scale, // all negative
                _ if i % 9 == 0 => v,  // sparse
                _ => 0.0,
            });
        }
    }
    // 2^-50 ~ 8.9e-16 is below GROUP_MAX_EPS, 2^-49 above
    x.extend((0..QK_K).map(|i| rng.f32() * 2f32.powi(-50 + (i / 128) as i32)));
    x
}

/// FNV-1a, 64 bits.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Round-trip error of a K-quant on each test distribution, relative to the data's RMS:
/// under `max_rel` for the random ones, near-exact for constant blocks, exact for zeros.
fn check_round_trip<B: Pod>(f: &WeightFormat<B>, max_rel: f64) {
    for (seed, dist) in ["uniform", "gaussian", "outliers"].iter().enumerate() {
        let x = weights(dist, 32 * QK_K, seed as u64);
        let err = relative_rmse(&x, &f.round_trip(&x));
        assert!(err < max_rel, "{} {dist}: relative RMSE {err}", f.name);
        assert!(
            err > 0.0,
            "{} {dist}: lossless means the test is broken",
            f.name
        );
    }
    for dist in ["constant", "negative constant"] {
        let x = weights(dist, 2 * QK_K, 0);
        let err = relative_rmse(&x, &f.round_trip(&x));
        assert!(err < 2e-3, "{} {dist}: relative RMSE {err}", f.name);
    }
    let y = f.round_trip(&[0.0; 2 * QK_K]);
    assert!(y.iter().all(|&v| v == 0.0), "{} zeros: {y:?}", f.name);
}

#[test]
fn k_quant_round_trip_error_per_distribution() {
    // about 1.25x the worst distribution's error (gaussian for q2..q3, outliers above)
    check_round_trip(&Q2K, 0.36);
    check_round_trip(&Q3K, 0.18);
    check_round_trip(&Q4K, 0.12);
    check_round_trip(&Q5K, 0.065);
    check_round_trip(&Q6K, 0.045);
}

/// Quantizing already-quantized weights again (as a requantization from Q8_0 or between
/// K types does) adds less error than the first pass, and the total stays near it.
fn check_requantization<B: Pod>(f: &WeightFormat<B>) {
    for (seed, dist) in ["uniform", "gaussian", "outliers"].iter().enumerate() {
        let x = weights(dist, 32 * QK_K, 10 + seed as u64);
        let y1 = f.round_trip(&x);
        let y2 = f.round_trip(&y1);
        let first = relative_rmse(&x, &y1);
        let second = relative_rmse(&y1, &y2);
        let total = relative_rmse(&x, &y2);
        assert!(
            second <= first && total <= 1.3 * first,
            "{} {dist}: first pass {first}, second {second}, both {total}",
            f.name
        );
    }
}

#[test]
fn k_quant_requantization_is_stable() {
    check_requantization(&Q2K);
    check_requantization(&Q3K);
    check_requantization(&Q4K);
    check_requantization(&Q5K);
    check_requantization(&Q6K);
}

#[test]
fn weight_quantizers_match_llama_cpp_bytes() {
    // FNV-1a of llama.cpp's ggml_quantize_chunk(type, golden_input(), ..., imatrix NULL),
    // i.e. quantize_row_*_ref, from libggml-base 0.25.3 (llama-cpp-python 0.3.36)
    fn hash<B: Pod>(x: &[f32], bs: usize, f: fn(&[f32], &mut [B])) -> u64 {
        let mut b = garbage_blocks(x.len() / bs);
        f(x, &mut b);
        fnv1a(as_bytes(&b))
    }
    let x = golden_input();
    assert_eq!(x.len(), 41 * QK_K);
    let got = [
        ("q2_K", hash(&x, QK_K, quantize::quantize_q2k)),
        ("q3_K", hash(&x, QK_K, quantize::quantize_q3k)),
        ("q4_K", hash(&x, QK_K, quantize::quantize_q4k)),
        ("q5_K", hash(&x, QK_K, quantize::quantize_q5k)),
        ("q6_K", hash(&x, QK_K, quantize::quantize_q6k)),
        ("q4_0", hash(&x, 32, quantize::quantize_q4_0)),
        ("q4_1", hash(&x, 32, quantize::quantize_q4_1)),
        ("q5_0", hash(&x, 32, quantize::quantize_q5_0)),
        ("q5_1", hash(&x, 32, quantize::quantize_q5_1)),
        ("q8_0", hash(&x, 32, quantize::quantize_q8_0_ref)),
    ];
    let want = [
        ("q2_K", 0xaad3_a309_073e_8ea3),
        ("q3_K", 0x97df_5892_861d_fb65),
        ("q4_K", 0x54d9_768e_7e46_80a4),
        ("q5_K", 0x0983_be5e_83dc_d3db),
        ("q6_K", 0x2665_c59b_502b_d94c),
        ("q4_0", 0x258d_de06_9012_77fe),
        ("q4_1", 0x9c0b_2025_4e6c_4b88),
        ("q5_0", 0x91e2_60f4_fcf8_a3d8),
        ("q5_1", 0xe716_4967_3cbd_8f82),
        ("q8_0", 0x060c_80df_0c9f_a8d3),
    ];
    for ((name, got), (_, want)) in got.iter().zip(&want) {
        assert_eq!(got, want, "{name}: bytes differ from llama.cpp's");
    }
}

#[test]
fn q8_0_weights_round_ties_away_from_zero_as_llama_quantize() {
    // amax 127 makes d = 1: every half-integer is an exact tie
    let mut x = [0.0f32; 32];
    x[0] = 127.0;
    x[1..8].copy_from_slice(&[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5]);
    let mut weights = garbage_blocks::<BlockQ8_0>(1);
    quantize::quantize_q8_0_ref(&x, &mut weights);
    assert_eq!(weights[0].qs[..8], [127, 1, 2, 3, -1, -2, -3, 127]);
    // activations keep half to even, as llama.cpp's SIMD quantize_row_q8_0
    let mut acts = garbage_blocks::<BlockQ8_0>(1);
    quantize::quantize_q8_0(&x, &mut acts);
    assert_eq!(acts[0].qs[..8], [127, 0, 2, 2, 0, -2, -2, 126]);
}
