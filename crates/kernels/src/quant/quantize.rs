//! Scalar quantization: activations to Q8_0/Q8_1/Q8_K (the dot-product partners) and
//! reference weight quantizers for the 32-element formats.

use half::f16;

use crate::blocks::*;

fn amax(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

/// Round to nearest, ties to even, for |x| < 2^22 (llama.cpp's `nearest_int` and what its
/// SIMD quantizers do): adding 1.5 * 2^23 leaves the integer in the low mantissa bits.
#[inline]
pub fn nearest_int(x: f32) -> i32 {
    let v = x + 12_582_912.0;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

#[inline]
fn round(x: f32) -> i32 {
    nearest_int(x)
}

pub fn quantize_q8_0(x: &[f32], y: &mut [BlockQ8_0]) {
    for (x, b) in x.chunks_exact(QK8_0).zip(y.iter_mut()) {
        let d = amax(x) / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b.d = f16::from_f32(d);
        for (q, &v) in b.qs.iter_mut().zip(x) {
            *q = round(v * id) as i8;
        }
    }
}

pub fn quantize_q8_1(x: &[f32], y: &mut [BlockQ8_1]) {
    for (x, b) in x.chunks_exact(QK8_0).zip(y.iter_mut()) {
        let d = amax(x) / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in b.qs.iter_mut().zip(x) {
            let r = round(v * id);
            *q = r as i8;
            sum += r;
        }
        b.d = f16::from_f32(d);
        b.s = f16::from_f32(sum as f32 * d);
    }
}

pub fn quantize_q8k(x: &[f32], y: &mut [BlockQ8K]) {
    for (x, b) in x.chunks_exact(QK_K).zip(y.iter_mut()) {
        // the signed value of largest magnitude sets the scale, so it maps to -127 exactly
        let max = signed_max(x);
        if max == 0.0 {
            b.d = 0.0;
            b.qs = [0; QK_K];
            b.bsums = [0; QK_K / 16];
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in b.qs.iter_mut().zip(x) {
            *q = round(iscale * v).min(127) as i8;
        }
        for j in 0..QK_K / 16 {
            b.bsums[j] = b.qs[16 * j..16 * j + 16].iter().map(|&q| q as i16).sum();
        }
        b.d = 1.0 / iscale;
    }
}

/// The signed value of largest magnitude.
fn signed_max(x: &[f32]) -> f32 {
    let mut max = 0.0f32;
    let mut amax = 0.0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    max
}

pub fn quantize_q4_0(x: &[f32], y: &mut [BlockQ4_0]) {
    for (x, b) in x.chunks_exact(QK4_0).zip(y.iter_mut()) {
        let d = signed_max(x) / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b.d = f16::from_f32(d);
        for j in 0..16 {
            let q0 = ((x[j] * id + 8.5) as i8).clamp(0, 15) as u8;
            let q1 = ((x[j + 16] * id + 8.5) as i8).clamp(0, 15) as u8;
            b.qs[j] = q0 | (q1 << 4);
        }
    }
}

pub fn quantize_q4_1(x: &[f32], y: &mut [BlockQ4_1]) {
    for (x, b) in x.chunks_exact(QK4_0).zip(y.iter_mut()) {
        let min = x.iter().fold(f32::INFINITY, |m, &v| m.min(v));
        let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b.d = f16::from_f32(d);
        b.m = f16::from_f32(min);
        for j in 0..16 {
            let q0 = (((x[j] - min) * id + 0.5) as i8).clamp(0, 15) as u8;
            let q1 = (((x[j + 16] - min) * id + 0.5) as i8).clamp(0, 15) as u8;
            b.qs[j] = q0 | (q1 << 4);
        }
    }
}

fn pack_q5(q: &[u8; 32]) -> ([u8; 4], [u8; 16]) {
    let mut qs = [0u8; 16];
    let mut h = 0u32;
    for j in 0..16 {
        qs[j] = (q[j] & 0xF) | ((q[j + 16] & 0xF) << 4);
        h |= ((q[j] >> 4) as u32 & 1) << j;
        h |= ((q[j + 16] >> 4) as u32 & 1) << (j + 16);
    }
    (h.to_le_bytes(), qs)
}

pub fn quantize_q5_0(x: &[f32], y: &mut [BlockQ5_0]) {
    for (x, b) in x.chunks_exact(QK4_0).zip(y.iter_mut()) {
        let d = signed_max(x) / -16.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut q = [0u8; 32];
        for j in 0..32 {
            q[j] = ((x[j] * id + 16.5) as i8).clamp(0, 31) as u8;
        }
        b.d = f16::from_f32(d);
        (b.qh, b.qs) = pack_q5(&q);
    }
}

pub fn quantize_q5_1(x: &[f32], y: &mut [BlockQ5_1]) {
    for (x, b) in x.chunks_exact(QK4_0).zip(y.iter_mut()) {
        let min = x.iter().fold(f32::INFINITY, |m, &v| m.min(v));
        let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let d = (max - min) / 31.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut q = [0u8; 32];
        for j in 0..32 {
            q[j] = (((x[j] - min) * id + 0.5) as i8).clamp(0, 31) as u8;
        }
        b.d = f16::from_f32(d);
        b.m = f16::from_f32(min);
        (b.qh, b.qs) = pack_q5(&q);
    }
}
