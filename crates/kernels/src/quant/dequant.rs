//! Scalar dequantization: the definition of every block format's values.

use half::{bf16, f16};

use crate::blocks::*;

/// Integer values and scales of one Q4_K block: `x = d*sc[s]*q - dmin*m[s]` for sub-block s.
pub(crate) fn unpack_q4k(b: &BlockQ4K) -> ([u8; QK_K], [u8; 8], [u8; 8]) {
    let mut q = [0u8; QK_K];
    for j in 0..4 {
        for l in 0..32 {
            let byte = b.qs[32 * j + l];
            q[64 * j + l] = byte & 0xF;
            q[64 * j + 32 + l] = byte >> 4;
        }
    }
    let (sc, m) = unpack_scales_k4(&b.scales);
    (q, sc, m)
}

pub(crate) fn unpack_scales_k4(scales: &[u8; K_SCALE_SIZE]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut m = [0u8; 8];
    for s in 0..8 {
        (sc[s], m[s]) = get_scale_min_k4(s, scales);
    }
    (sc, m)
}

/// Integer values (0..32) and scales of one Q5_K block.
pub(crate) fn unpack_q5k(b: &BlockQ5K) -> ([u8; QK_K], [u8; 8], [u8; 8]) {
    let mut q = [0u8; QK_K];
    for j in 0..4 {
        for l in 0..32 {
            let byte = b.qs[32 * j + l];
            let h = b.qh[l];
            q[64 * j + l] = (byte & 0xF) | (((h >> (2 * j)) & 1) << 4);
            q[64 * j + 32 + l] = (byte >> 4) | (((h >> (2 * j + 1)) & 1) << 4);
        }
    }
    let (sc, m) = unpack_scales_k4(&b.scales);
    (q, sc, m)
}

/// Signed values (-32..31) of one Q6_K block; scale `scales[i/16]` applies to value i.
pub(crate) fn unpack_q6k(b: &BlockQ6K) -> [i8; QK_K] {
    let mut q = [0i8; QK_K];
    for half in 0..2 {
        let ql = &b.ql[64 * half..];
        let qh = &b.qh[32 * half..];
        let out = &mut q[128 * half..];
        for l in 0..32 {
            out[l] = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
            out[l + 32] = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
            out[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
            out[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
        }
    }
    q
}

/// Signed values (-4..3) of one Q3_K block; scale `q3k_scales()[i/16]` applies to value i.
pub(crate) fn unpack_q3k(b: &BlockQ3K) -> [i8; QK_K] {
    let mut q = [0i8; QK_K];
    for half in 0..2 {
        for j in 0..4 {
            let shift = 2 * j;
            let m = 1u8 << (4 * half + j);
            for l in 0..32 {
                let low = ((b.qs[32 * half + l] >> shift) & 3) as i8;
                let high = if b.hmask[l] & m != 0 { 0 } else { 4 };
                q[128 * half + 32 * j + l] = low - high;
            }
        }
    }
    q
}

/// Values (0..3) of one Q2_K block; `scales[i/16]` (low nibble scale, high nibble min).
pub(crate) fn unpack_q2k(b: &BlockQ2K) -> [u8; QK_K] {
    let mut q = [0u8; QK_K];
    for half in 0..2 {
        for j in 0..4 {
            for l in 0..32 {
                q[128 * half + 32 * j + l] = (b.qs[32 * half + l] >> (2 * j)) & 3;
            }
        }
    }
    q
}

/// Q5_0/Q5_1 5-bit values of one block.
fn unpack_q5(qh: &[u8; 4], qs: &[u8; 16]) -> [u8; 32] {
    let h = u32::from_le_bytes(*qh);
    let mut q = [0u8; 32];
    for j in 0..16 {
        q[j] = (qs[j] & 0xF) | ((((h >> j) & 1) as u8) << 4);
        q[j + 16] = (qs[j] >> 4) | ((((h >> (j + 16)) & 1) as u8) << 4);
    }
    q
}

pub fn dequantize_q4_0(x: &[BlockQ4_0], y: &mut [f32]) {
    for (b, y) in x.iter().zip(y.chunks_exact_mut(32)) {
        let d = b.d.to_f32();
        for j in 0..16 {
            y[j] = ((b.qs[j] & 0xF) as i32 - 8) as f32 * d;
            y[j + 16] = ((b.qs[j] >> 4) as i32 - 8) as f32 * d;
        }
    }
}

pub fn dequantize_q4_1(x: &[BlockQ4_1], y: &mut [f32]) {
    for (b, y) in x.iter().zip(y.chunks_exact_mut(32)) {
        let (d, m) = (b.d.to_f32(), b.m.to_f32());
        for j in 0..16 {
            y[j] = (b.qs[j] & 0xF) as f32 * d + m;
            y[j + 16] = (b.qs[j] >> 4) as f32 * d + m;
        }
    }
}

pub fn dequantize_q5_0(x: &[BlockQ5_0], y: &mut [f32]) {
    for (b, y) in x.iter().zip(y.chunks_exact_mut(32)) {
        let d = b.d.to_f32();
        let q = unpack_q5(&b.qh, &b.qs);
        for j in 0..32 {
            y[j] = (q[j] as i32 - 16) as f32 * d;
        }
    }
}

pub fn dequantize_q5_1(x: &[BlockQ5_1], y: &mut [f32]) {
    for (b, y) in x.iter().zip(y.chunks_exact_mut(32)) {
        let (d, m) = (b.d.to_f32(), b.m.to_f32());
        let q = unpack_q5(&b.qh, &b.qs);
        for j in 0..32 {
            y[j] = q[j] as f32 * d + m;
        }
    }
}

pub fn dequantize_q8_0(x: &[BlockQ8_0], y: &mut [f32]) {
    for (b, y) in x.iter().zip(y.chunks_exact_mut(32)) {
        let d = b.d.to_f32();
        for j in 0..32 {
            y[j] = b.qs[j] as f32 * d;
        }
    }
}

pub fn dequantize_q8_1(x: &[BlockQ8_1], y: &mut [f32]) {
    for (b, y) in x.iter().zip(y.chunks_exact_mut(32)) {
        let d = b.d.to_f32();
        for j in 0..32 {
            y[j] = b.qs[j] as f32 * d;
        }
    }
}

pub fn dequantize_q2k(x: &[BlockQ2K], y: &mut [f32]) {
    for (b, y) in x.iter().zip(y.chunks_exact_mut(QK_K)) {
        let (d, dmin) = (b.d.to_f32(), b.dmin.to_f32());
        let q = unpack_q2k(b);
        for i in 0..QK_K {
            let sc = b.scales[i / 16];
            y[i] = d * (sc & 0xF) as f32 * q[i] as f32 - dmin * (sc >> 4) as f32;
        }
    }
}

pub fn dequantize_q3k(x: &[BlockQ3K], y: &mut [f32]) {
    for (b, y) in x.iter().zip(y.chunks_exact_mut(QK_K)) {
        let d = b.d.to_f32();
        let sc = q3k_scales(&b.scales);
        let q = unpack_q3k(b);
        for i in 0..QK_K {
            y[i] = d * sc[i / 16] as f32 * q[i] as f32;
        }
    }
}

pub fn dequantize_q4k(x: &[BlockQ4K], y: &mut [f32]) {
    for (b, y) in x.iter().zip(y.chunks_exact_mut(QK_K)) {
        let (d, dmin) = (b.d.to_f32(), b.dmin.to_f32());
        let (q, sc, m) = unpack_q4k(b);
        for i in 0..QK_K {
            let s = i / 32;
            y[i] = d * sc[s] as f32 * q[i] as f32 - dmin * m[s] as f32;
        }
    }
}

pub fn dequantize_q5k(x: &[BlockQ5K], y: &mut [f32]) {
    for (b, y) in x.iter().zip(y.chunks_exact_mut(QK_K)) {
        let (d, dmin) = (b.d.to_f32(), b.dmin.to_f32());
        let (q, sc, m) = unpack_q5k(b);
        for i in 0..QK_K {
            let s = i / 32;
            y[i] = d * sc[s] as f32 * q[i] as f32 - dmin * m[s] as f32;
        }
    }
}

pub fn dequantize_q6k(x: &[BlockQ6K], y: &mut [f32]) {
    for (b, y) in x.iter().zip(y.chunks_exact_mut(QK_K)) {
        let d = b.d.to_f32();
        let q = unpack_q6k(b);
        for i in 0..QK_K {
            y[i] = d * b.scales[i / 16] as f32 * q[i] as f32;
        }
    }
}

/// Trit `n` (0 = most significant) of a TQ1_0 byte, as ggml reads it.
#[inline]
pub(crate) fn tq1_trit(byte: u8, n: usize) -> u8 {
    const POW3: [u8; 5] = [1, 3, 9, 27, 81];
    ((byte.wrapping_mul(POW3[n]) as u16 * 3) >> 8) as u8
}

/// The trits (0..=2; the weight is `d * (q - 1)`) of one TQ1_0 block, in value order.
pub(crate) fn unpack_tq1_0(b: &BlockTQ1_0) -> [u8; QK_K] {
    let mut q = [0u8; QK_K];
    for n in 0..5 {
        for m in 0..32 {
            q[32 * n + m] = tq1_trit(b.qs[m], n);
        }
        for m in 0..16 {
            q[160 + 16 * n + m] = tq1_trit(b.qs[32 + m], n);
        }
    }
    for n in 0..4 {
        for j in 0..4 {
            q[240 + 4 * n + j] = tq1_trit(b.qh[j], n);
        }
    }
    q
}

/// The 2-bit values (0..=2; the weight is `d * (q - 1)`) of one TQ2_0 block, in value order.
pub(crate) fn unpack_tq2_0(b: &BlockTQ2_0) -> [u8; QK_K] {
    let mut q = [0u8; QK_K];
    for c in 0..2 {
        for l in 0..4 {
            for m in 0..32 {
                q[128 * c + 32 * l + m] = (b.qs[32 * c + m] >> (2 * l)) & 3;
            }
        }
    }
    q
}

/// The trits and scale of one TQ1_0 or TQ2_0 block's bytes; `None` for another type or a
/// slice that is not one aligned block.
pub(crate) fn ternary_block(ty: crate::GgmlType, src: &[u8]) -> Option<([u8; QK_K], f16)> {
    match ty {
        crate::GgmlType::TQ1_0 => {
            let b: &BlockTQ1_0 = cast_blocks(src)?.first()?;
            Some((unpack_tq1_0(b), b.d))
        }
        crate::GgmlType::TQ2_0 => {
            let b: &BlockTQ2_0 = cast_blocks(src)?.first()?;
            Some((unpack_tq2_0(b), b.d))
        }
        _ => None,
    }
}

pub fn dequantize_tq1_0(x: &[BlockTQ1_0], y: &mut [f32]) {
    for (b, y) in x.iter().zip(y.chunks_exact_mut(QK_K)) {
        let d = b.d.to_f32();
        for (y, q) in y.iter_mut().zip(unpack_tq1_0(b)) {
            *y = (q as f32 - 1.0) * d;
        }
    }
}

pub fn dequantize_tq2_0(x: &[BlockTQ2_0], y: &mut [f32]) {
    for (b, y) in x.iter().zip(y.chunks_exact_mut(QK_K)) {
        let d = b.d.to_f32();
        for (y, q) in y.iter_mut().zip(unpack_tq2_0(b)) {
            *y = (q as f32 - 1.0) * d;
        }
    }
}

pub fn dequantize_q8k(x: &[BlockQ8K], y: &mut [f32]) {
    for (b, y) in x.iter().zip(y.chunks_exact_mut(QK_K)) {
        for i in 0..QK_K {
            y[i] = b.d * b.qs[i] as f32;
        }
    }
}

pub fn dequantize_f16(x: &[f16], y: &mut [f32]) {
    for (a, b) in x.iter().zip(y.iter_mut()) {
        *b = a.to_f32();
    }
}

pub fn dequantize_bf16(x: &[bf16], y: &mut [f32]) {
    for (a, b) in x.iter().zip(y.iter_mut()) {
        *b = a.to_f32();
    }
}
