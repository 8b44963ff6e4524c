//! Scalar reference dot products of a weight row with a quantized activation row.
//!
//! Integer products are summed exactly per block (per sub-block for K-quants) and scaled in
//! f32, the same arithmetic the SIMD paths use, so their results differ only by the order
//! of float additions.

use half::f16;

use super::dequant::{
    unpack_q2k, unpack_q3k, unpack_q4k, unpack_q5k, unpack_q6k, unpack_tq1_0, unpack_tq2_0,
};
use crate::blocks::*;

fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    a.iter().zip(b).map(|(&x, &y)| x as i32 * y as i32).sum()
}

pub fn vec_dot_q4_0_q8_0(x: &[BlockQ4_0], y: &[BlockQ8_0]) -> f32 {
    let mut sum = 0.0f32;
    for (a, b) in x.iter().zip(y) {
        let mut isum = 0i32;
        for j in 0..16 {
            isum += ((a.qs[j] & 0xF) as i32 - 8) * b.qs[j] as i32;
            isum += ((a.qs[j] >> 4) as i32 - 8) * b.qs[j + 16] as i32;
        }
        sum += isum as f32 * (a.d.to_f32() * b.d.to_f32());
    }
    sum
}

pub fn vec_dot_q4_1_q8_1(x: &[BlockQ4_1], y: &[BlockQ8_1]) -> f32 {
    let mut sum = 0.0f32;
    for (a, b) in x.iter().zip(y) {
        let mut isum = 0i32;
        for j in 0..16 {
            isum += (a.qs[j] & 0xF) as i32 * b.qs[j] as i32;
            isum += (a.qs[j] >> 4) as i32 * b.qs[j + 16] as i32;
        }
        sum += isum as f32 * (a.d.to_f32() * b.d.to_f32()) + a.m.to_f32() * b.s.to_f32();
    }
    sum
}

fn q5_values(qh: &[u8; 4], qs: &[u8; 16]) -> [i32; 32] {
    let h = u32::from_le_bytes(*qh);
    let mut q = [0i32; 32];
    for j in 0..16 {
        q[j] = ((qs[j] & 0xF) as u32 | (((h >> j) & 1) << 4)) as i32;
        q[j + 16] = ((qs[j] >> 4) as u32 | (((h >> (j + 16)) & 1) << 4)) as i32;
    }
    q
}

pub fn vec_dot_q5_0_q8_0(x: &[BlockQ5_0], y: &[BlockQ8_0]) -> f32 {
    let mut sum = 0.0f32;
    for (a, b) in x.iter().zip(y) {
        let q = q5_values(&a.qh, &a.qs);
        let isum: i32 = (0..32).map(|j| (q[j] - 16) * b.qs[j] as i32).sum();
        sum += isum as f32 * (a.d.to_f32() * b.d.to_f32());
    }
    sum
}

pub fn vec_dot_q5_1_q8_1(x: &[BlockQ5_1], y: &[BlockQ8_1]) -> f32 {
    let mut sum = 0.0f32;
    for (a, b) in x.iter().zip(y) {
        let q = q5_values(&a.qh, &a.qs);
        let isum: i32 = (0..32).map(|j| q[j] * b.qs[j] as i32).sum();
        sum += isum as f32 * (a.d.to_f32() * b.d.to_f32()) + a.m.to_f32() * b.s.to_f32();
    }
    sum
}

pub fn vec_dot_q8_0_q8_0(x: &[BlockQ8_0], y: &[BlockQ8_0]) -> f32 {
    let mut sum = 0.0f32;
    for (a, b) in x.iter().zip(y) {
        sum += dot_i8(&a.qs, &b.qs) as f32 * (a.d.to_f32() * b.d.to_f32());
    }
    sum
}

pub fn vec_dot_q2k_q8k(x: &[BlockQ2K], y: &[BlockQ8K]) -> f32 {
    let mut sum = 0.0f32;
    for (a, b) in x.iter().zip(y) {
        let q = unpack_q2k(a);
        let mut isum = 0i32;
        let mut summs = 0i32;
        for g in 0..16 {
            let sc = a.scales[g];
            let s: i32 = (0..16)
                .map(|l| q[16 * g + l] as i32 * b.qs[16 * g + l] as i32)
                .sum();
            isum += (sc & 0xF) as i32 * s;
            summs += (sc >> 4) as i32 * b.bsums[g] as i32;
        }
        sum += b.d * a.d.to_f32() * isum as f32 - b.d * a.dmin.to_f32() * summs as f32;
    }
    sum
}

pub fn vec_dot_q3k_q8k(x: &[BlockQ3K], y: &[BlockQ8K]) -> f32 {
    let mut sum = 0.0f32;
    for (a, b) in x.iter().zip(y) {
        let q = unpack_q3k(a);
        let sc = q3k_scales(&a.scales);
        let mut isum = 0i32;
        for g in 0..16 {
            isum += sc[g] as i32 * dot_i8(&q[16 * g..16 * g + 16], &b.qs[16 * g..16 * g + 16]);
        }
        sum += b.d * a.d.to_f32() * isum as f32;
    }
    sum
}

/// Shared tail of Q4_K/Q5_K: unsigned values with 8 sub-block scales and mins.
fn kquant_with_mins(
    q: &[u8; QK_K],
    sc: &[u8; 8],
    m: &[u8; 8],
    d: f16,
    dmin: f16,
    b: &BlockQ8K,
) -> f32 {
    let mut isum = 0i32;
    let mut summ = 0i32;
    for s in 0..8 {
        let dot: i32 = (0..32)
            .map(|l| q[32 * s + l] as i32 * b.qs[32 * s + l] as i32)
            .sum();
        isum += sc[s] as i32 * dot;
        summ += m[s] as i32 * (b.bsums[2 * s] as i32 + b.bsums[2 * s + 1] as i32);
    }
    b.d * d.to_f32() * isum as f32 - b.d * dmin.to_f32() * summ as f32
}

pub fn vec_dot_q4k_q8k(x: &[BlockQ4K], y: &[BlockQ8K]) -> f32 {
    x.iter()
        .zip(y)
        .map(|(a, b)| {
            let (q, sc, m) = unpack_q4k(a);
            kquant_with_mins(&q, &sc, &m, a.d, a.dmin, b)
        })
        .sum()
}

pub fn vec_dot_q5k_q8k(x: &[BlockQ5K], y: &[BlockQ8K]) -> f32 {
    x.iter()
        .zip(y)
        .map(|(a, b)| {
            let (q, sc, m) = unpack_q5k(a);
            kquant_with_mins(&q, &sc, &m, a.d, a.dmin, b)
        })
        .sum()
}

pub fn vec_dot_q6k_q8k(x: &[BlockQ6K], y: &[BlockQ8K]) -> f32 {
    let mut sum = 0.0f32;
    for (a, b) in x.iter().zip(y) {
        let q = unpack_q6k(a);
        let mut isum = 0i32;
        for g in 0..16 {
            isum +=
                a.scales[g] as i32 * dot_i8(&q[16 * g..16 * g + 16], &b.qs[16 * g..16 * g + 16]);
        }
        sum += b.d * a.d.to_f32() * isum as f32;
    }
    sum
}

/// `sum((q - 1) * a)` over a ternary block's trits `q` and a Q8_K block, scaled by both
/// scales (ggml's `ggml_vec_dot_tq*_q8_K`).
fn dot_ternary(q: &[u8; QK_K], d: f16, y: &BlockQ8K) -> f32 {
    let isum: i32 = q
        .iter()
        .zip(&y.qs)
        .map(|(&q, &a)| (q as i32 - 1) * a as i32)
        .sum();
    isum as f32 * (d.to_f32() * y.d)
}

pub fn vec_dot_tq1_0_q8k(x: &[BlockTQ1_0], y: &[BlockQ8K]) -> f32 {
    x.iter()
        .zip(y)
        .map(|(a, b)| dot_ternary(&unpack_tq1_0(a), a.d, b))
        .sum()
}

pub fn vec_dot_tq2_0_q8k(x: &[BlockTQ2_0], y: &[BlockQ8K]) -> f32 {
    x.iter()
        .zip(y)
        .map(|(a, b)| dot_ternary(&unpack_tq2_0(a), a.d, b))
        .sum()
}

pub fn vec_dot_f32(x: &[f32], y: &[f32]) -> f32 {
    x.iter().zip(y).map(|(a, b)| a * b).sum()
}

pub fn vec_dot_f16_f32(x: &[f16], y: &[f32]) -> f32 {
    x.iter().zip(y).map(|(a, b)| a.to_f32() * b).sum()
}

pub fn vec_dot_bf16_f32(x: &[half::bf16], y: &[f32]) -> f32 {
    x.iter().zip(y).map(|(a, b)| a.to_f32() * b).sum()
}

/// `y += a * x` with `x` in f16 (attention's weighted sum of cached values).
pub fn axpy_f16(y: &mut [f32], a: f32, x: &[f16]) {
    for (o, v) in y.iter_mut().zip(x) {
        *o += a * v.to_f32();
    }
}
