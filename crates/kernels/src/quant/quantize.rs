//! Scalar quantization: activations to Q8_0/Q8_1/Q8_K (the dot-product partners) and
//! reference weight quantizers for the 32-element formats and the K-quant super-blocks.
//!
//! The weight quantizers give the same bytes as llama.cpp's `quantize_row_*_ref`, which is
//! what `llama-quantize` writes without an importance matrix: the same search grids, the
//! same `nearest_int` rounding, every sum accumulated in the same order in f32, and the
//! same f16 rounding of stored scales. The activation quantizers follow llama.cpp's SIMD
//! `quantize_row_q8_*` instead (round half to even).

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

/// Activations to Q8_0, rounding half to even as llama.cpp's AVX2/NEON `quantize_row_q8_0`
/// do. Weights go through [`quantize_q8_0_ref`].
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

/// Activations to Q8_1 (half to even), the partner of Q4_1/Q5_1 weights.
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

/// Activations to Q8_K, the partner of the K-quant weights.
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

/// The signed value of largest magnitude (the first one, if several tie).
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

/// Weights to Q8_0 as llama.cpp's `quantize_row_q8_0_ref`: `roundf`, half away from zero.
/// `x.len()` is `32 * y.len()`.
pub fn quantize_q8_0_ref(x: &[f32], y: &mut [BlockQ8_0]) {
    debug_assert_eq!(x.len(), y.len() * QK8_0);
    for (x, b) in x.chunks_exact(QK8_0).zip(y.iter_mut()) {
        let d = amax(x) / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b.d = f16::from_f32(d);
        for (q, &v) in b.qs.iter_mut().zip(x) {
            *q = (v * id).round() as i8;
        }
    }
}

// The 32-element formats round as llama.cpp does: truncate the biased level plus 0.5 (never
// negative), then clamp from above. (Its Q5_1 does not clamp; the level cannot pass 31.)

/// Weights to Q4_0 as llama.cpp's `quantize_row_q4_0_ref`.
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

/// Weights to Q4_1 as llama.cpp's `quantize_row_q4_1_ref`.
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

/// Weights to Q5_0 as llama.cpp's `quantize_row_q5_0_ref`.
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

/// Weights to Q5_1 as llama.cpp's `quantize_row_q5_1_ref`.
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

// ---------------------------------------------------------------------------------------
// K-quants: 256 values in sub-blocks of 16 or 32. Each sub-block gets a fitted scale (and,
// for the unsigned formats, a min); those are quantized against one f16 super-scale, then
// every value is requantized against its sub-block's scale as stored.

/// Groups whose largest magnitude is below this are all zero (llama.cpp's `GROUP_MAX_EPS`).
const GROUP_MAX_EPS: f32 = 1e-15;

/// Symmetric fit of a group to `-nmax..nmax`: tries 19 scales around `max / -nmax` and
/// keeps the best by least squares weighted by `x²`. Writes `l` biased by `nmax` (0 for an
/// all-zero group) and returns the scale. llama.cpp's `make_qx_quants` with `rmse_type` 1
/// and no importance weights.
fn make_qx_quants(x: &[f32], nmax: i32, l: &mut [u8]) -> f32 {
    let max = signed_max(x);
    if max.abs() < GROUP_MAX_EPS {
        l.fill(0);
        return 0.0;
    }
    let quant = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    // (sum w*x*q, sum w*q*q) with w = x*x
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
        for &v in x {
            let q = quant(iscale, v) as f32;
            let w = v * v;
            sumlx += w * v * q;
            suml2 += w * q * q;
        }
        (sumlx, suml2)
    };
    let store = |iscale: f32, l: &mut [u8]| {
        for (l, &v) in l.iter_mut().zip(x) {
            *l = (quant(iscale, v) + nmax) as u8;
        }
    };

    let nmax_f = nmax as f32;
    let iscale = -nmax_f / max;
    store(iscale, l);
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in (-9..=9).filter(|&is| is != 0) {
        let iscale = -(nmax_f + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            store(iscale, l);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// Symmetric fit of a group to `-nmax..nmax`: rounds against `max / -nmax`, then moves one
/// value at a time to its best level for the current least-squares scale (weights `x²`),
/// up to five sweeps. Writes `l` biased by `nmax` (0 for an all-zero group) and returns the
/// scale. llama.cpp's `make_q3_quants` with `do_rmse`.
fn make_q3_quants(x: &[f32], nmax: i32, l: &mut [u8]) -> f32 {
    let max = signed_max(x);
    if max.abs() < GROUP_MAX_EPS {
        l.fill(0);
        return 0.0;
    }
    let iscale = -(nmax as f32) / max;
    let mut q = [0i32; 16]; // [x.len()], unbiased levels
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for (q, &v) in q.iter_mut().zip(x) {
        *q = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
        let (w, qf) = (v * v, *q as f32);
        sumlx += w * v * qf;
        suml2 += w * qf * qf;
    }
    for _ in 0..5 {
        let mut changed = false;
        for (q, &v) in q.iter_mut().zip(x) {
            let (w, old) = (v * v, *q as f32);
            // the sums without this value
            let mut slx = sumlx - w * v * old;
            let mut sl2 = suml2 - w * old * old;
            // (written so that a NaN skips the value, as in llama.cpp)
            let new = if slx > 0.0 {
                nearest_int(v * sl2 / slx).clamp(-nmax, nmax - 1)
            } else {
                *q
            };
            if new == *q {
                continue;
            }
            let new_f = new as f32;
            slx += w * v * new_f;
            sl2 += w * new_f * new_f;
            // keep the move if it raises sumlx²/suml2, the energy the fit explains
            if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                *q = new;
                (sumlx, suml2) = (slx, sl2);
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    for (l, &q) in l.iter_mut().zip(&q) {
        *l = (q + nmax) as u8;
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// Where [`make_qkx2_quants`] searches: `nstep + 1` candidate inverse scales
/// `(nmax + rmin + rdelta * i) / (max - min)`.
struct Search {
    nmax: i32,
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    /// Minimize the weighted absolute error instead of the squared one.
    use_mad: bool,
}

/// Affine fit of a group, `x ≈ scale * l - the_min` with `l` in `0..=nmax` and `the_min >= 0`:
/// starts from the min/max range, then for each candidate inverse scale rounds the values
/// and solves the weighted least-squares scale and min for those levels, keeping the
/// candidate with the least weighted error. Writes `l`, returns `(scale, the_min)`.
/// llama.cpp's `make_qkx2_quants`.
fn make_qkx2_quants(x: &[f32], weights: &[f32], s: &Search, l: &mut [u8]) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for (&v, &w) in x.iter().zip(weights).skip(1) {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
        sum_w += w;
        sum_x += w * v;
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.fill(0);
        return (0.0, -min);
    }
    let error = |scale: f32, min: f32, l: &[u8]| {
        let mut err = 0.0f32;
        for ((&q, &v), &w) in l.iter().zip(x).zip(weights) {
            let diff = scale * q as f32 + min - v;
            err += w * if s.use_mad { diff.abs() } else { diff * diff };
        }
        err
    };

    let nmax_f = s.nmax as f32;
    let iscale = nmax_f / (max - min);
    let mut scale = 1.0 / iscale;
    for (l, &v) in l.iter_mut().zip(x) {
        *l = nearest_int(iscale * (v - min)).clamp(0, s.nmax) as u8;
    }
    let mut best_error = error(scale, min, l);

    let mut laux = [0u8; 32]; // [n]
    let laux = &mut laux[..n];
    for is in 0..=s.nstep {
        // `min` is the best min so far: later candidates are measured from it
        let iscale = (s.rmin + s.rdelta * is as f32 + nmax_f) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for ((q, &v), &w) in laux.iter_mut().zip(x).zip(weights) {
            *q = nearest_int(iscale * (v - min)).clamp(0, s.nmax) as u8;
            let qf = *q as f32;
            sum_l += w * qf;
            sum_l2 += w * qf * qf;
            sum_xl += w * qf * v;
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let cur_error = error(this_scale, this_min, laux);
            if cur_error < best_error {
                l.copy_from_slice(laux);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// The largest value of `v` above zero, or 0.
fn max_positive(v: &[f32]) -> f32 {
    v.iter().fold(0.0, |m, &s| if s > m { s } else { m })
}

/// Packs two bits per value: byte `l` of each 32-byte half holds values `l`, `l+32`, `l+64`
/// and `l+96` of that half's 128 (Q2_K and Q3_K `qs`).
fn pack_2bit(l: &[u8; QK_K]) -> [u8; QK_K / 4] {
    let mut qs = [0u8; QK_K / 4];
    for half in 0..2 {
        let l = &l[128 * half..];
        for (i, q) in qs[32 * half..32 * half + 32].iter_mut().enumerate() {
            *q = l[i] | (l[i + 32] << 2) | (l[i + 64] << 4) | (l[i + 96] << 6);
        }
    }
    qs
}

/// Packs eight 6-bit scales and mins as [`get_scale_min_k4`] reads them (Q4_K, Q5_K).
fn pack_scales_k4(sc: &[u8; 8], m: &[u8; 8]) -> [u8; K_SCALE_SIZE] {
    let mut q = [0u8; K_SCALE_SIZE];
    q[..4].copy_from_slice(&sc[..4]);
    q[4..8].copy_from_slice(&m[..4]);
    for j in 4..8 {
        q[j + 4] = (sc[j] & 0xF) | ((m[j] & 0xF) << 4);
        q[j - 4] |= (sc[j] >> 4) << 6;
        q[j] |= (m[j] >> 4) << 6;
    }
    q
}

/// Weights to Q2_K as llama.cpp's `quantize_row_q2_K_ref`: per 16 values an affine fit
/// minimizing the |x|-weighted absolute error, scales and mins to 4 bits.
/// `x.len()` is `256 * y.len()`, as for every K-quant.
pub fn quantize_q2k(x: &[f32], y: &mut [BlockQ2K]) {
    debug_assert_eq!(x.len(), y.len() * QK_K);
    const SEARCH: Search = Search {
        nmax: 3,
        rmin: -0.5,
        rdelta: 0.1,
        nstep: 15,
        use_mad: true,
    };
    for (x, b) in x.chunks_exact(QK_K).zip(y.iter_mut()) {
        let mut l = [0u8; QK_K];
        let mut scales = [0.0f32; QK_K / 16];
        let mut mins = [0.0f32; QK_K / 16];
        for (j, (x, l)) in x.chunks_exact(16).zip(l.chunks_exact_mut(16)).enumerate() {
            let weights: [f32; 16] = std::array::from_fn(|i| x[i].abs());
            (scales[j], mins[j]) = make_qkx2_quants(x, &weights, &SEARCH, l);
        }
        let (max_scale, max_min) = (max_positive(&scales), max_positive(&mins));

        b.scales = [0; QK_K / 16];
        b.d = f16::ZERO;
        b.dmin = f16::ZERO;
        if max_scale > 0.0 {
            let iscale = 15.0 / max_scale;
            for (q, &s) in b.scales.iter_mut().zip(&scales) {
                *q = nearest_int(iscale * s) as u8;
            }
            b.d = f16::from_f32(max_scale / 15.0);
        }
        if max_min > 0.0 {
            let iscale = 15.0 / max_min;
            for (q, &m) in b.scales.iter_mut().zip(&mins) {
                *q |= (nearest_int(iscale * m) << 4) as u8;
            }
            b.dmin = f16::from_f32(max_min / 15.0);
        }

        let (d, dmin) = (b.d.to_f32(), b.dmin.to_f32());
        for (j, (x, l)) in x.chunks_exact(16).zip(l.chunks_exact_mut(16)).enumerate() {
            let dj = d * (b.scales[j] & 0xF) as f32;
            if dj == 0.0 {
                continue; // keep the fitted levels
            }
            let mj = dmin * (b.scales[j] >> 4) as f32;
            for (l, &v) in l.iter_mut().zip(x) {
                *l = nearest_int((v + mj) / dj).clamp(0, 3) as u8;
            }
        }
        b.qs = pack_2bit(&l);
    }
}

/// Weights to Q3_K as llama.cpp's `quantize_row_q3_K_ref`: per 16 values a symmetric fit
/// to -4..3, signed scales to 6 bits.
pub fn quantize_q3k(x: &[f32], y: &mut [BlockQ3K]) {
    debug_assert_eq!(x.len(), y.len() * QK_K);
    for (x, b) in x.chunks_exact(QK_K).zip(y.iter_mut()) {
        let mut l = [0u8; QK_K]; // levels biased by 4
        let mut scales = [0.0f32; QK_K / 16];
        for (j, (x, l)) in x.chunks_exact(16).zip(l.chunks_exact_mut(16)).enumerate() {
            scales[j] = make_q3_quants(x, 4, l);
        }
        // the signed scale of largest magnitude
        let max_scale = signed_max(&scales);

        b.scales = [0; 12];
        b.d = f16::ZERO;
        if max_scale != 0.0 {
            let iscale = -32.0 / max_scale;
            for (j, &s) in scales.iter().enumerate() {
                // llama.cpp keeps the rounded scale in an int8_t before clamping
                let q = (((nearest_int(iscale * s) as i8) as i32).clamp(-32, 31) + 32) as u8;
                if j < 8 {
                    b.scales[j] = q & 0xF;
                } else {
                    b.scales[j - 8] |= (q & 0xF) << 4;
                }
                b.scales[8 + j % 4] |= (q >> 4) << (2 * (j / 4));
            }
            b.d = f16::from_f32(1.0 / iscale);
        }

        let d = b.d.to_f32();
        let sc = q3k_scales(&b.scales);
        for (j, (x, l)) in x.chunks_exact(16).zip(l.chunks_exact_mut(16)).enumerate() {
            let dj = d * sc[j] as f32;
            if dj == 0.0 {
                continue; // keep the fitted levels
            }
            for (l, &v) in l.iter_mut().zip(x) {
                *l = (nearest_int(v / dj).clamp(-4, 3) + 4) as u8;
            }
        }

        // bit 2 of value i goes to hmask[i % 32], bit i / 32
        b.hmask = [0; QK_K / 8];
        for (i, l) in l.iter_mut().enumerate() {
            if *l > 3 {
                b.hmask[i % 32] |= 1 << (i / 32);
                *l -= 4;
            }
        }
        b.qs = pack_2bit(&l);
    }
}

/// Fits the eight 32-value sub-blocks of a Q4_K/Q5_K super-block and stores their scales
/// and mins (6 bits each) in `scales`, `d` and `dmin`; then requantizes every value
/// against the stored scales. Returns the levels (`0..=nmax`).
fn k4_scales_and_levels(
    x: &[f32],
    search: &Search,
    scales_out: &mut [u8; K_SCALE_SIZE],
    d_out: &mut f16,
    dmin_out: &mut f16,
) -> [u8; QK_K] {
    let mut l = [0u8; QK_K];
    let mut scales = [0.0f32; QK_K / 32];
    let mut mins = [0.0f32; QK_K / 32];
    for (j, (x, l)) in x.chunks_exact(32).zip(l.chunks_exact_mut(32)).enumerate() {
        let sum_x2 = x.iter().fold(0.0f32, |s, &v| s + v * v);
        let av_x = (sum_x2 / 32.0).sqrt();
        let weights: [f32; 32] = std::array::from_fn(|i| av_x + x[i].abs());
        (scales[j], mins[j]) = make_qkx2_quants(x, &weights, search, l);
    }
    let (max_scale, max_min) = (max_positive(&scales), max_positive(&mins));

    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    // as llama.cpp, through uint8_t: a negative scale wraps, then clamps to 63
    let sc: [u8; 8] = std::array::from_fn(|j| (nearest_int(inv_scale * scales[j]) as u8).min(63));
    let m: [u8; 8] = std::array::from_fn(|j| (nearest_int(inv_min * mins[j]) as u8).min(63));
    *scales_out = pack_scales_k4(&sc, &m);
    *d_out = f16::from_f32(max_scale / 63.0);
    *dmin_out = f16::from_f32(max_min / 63.0);

    let (d, dmin) = (d_out.to_f32(), dmin_out.to_f32());
    for (j, (x, l)) in x.chunks_exact(32).zip(l.chunks_exact_mut(32)).enumerate() {
        let (sc, m) = get_scale_min_k4(j, scales_out);
        let dj = d * sc as f32;
        if dj == 0.0 {
            continue; // keep the fitted levels
        }
        let mj = dmin * m as f32;
        for (l, &v) in l.iter_mut().zip(x) {
            *l = nearest_int((v + mj) / dj).clamp(0, search.nmax) as u8;
        }
    }
    l
}

/// Weights to Q4_K as llama.cpp's `quantize_row_q4_K_ref`: per 32 values an affine fit
/// weighted by `rms + |x|`, scales and mins to 6 bits.
pub fn quantize_q4k(x: &[f32], y: &mut [BlockQ4K]) {
    debug_assert_eq!(x.len(), y.len() * QK_K);
    const SEARCH: Search = Search {
        nmax: 15,
        rmin: -1.0,
        rdelta: 0.1,
        nstep: 20,
        use_mad: false,
    };
    for (x, b) in x.chunks_exact(QK_K).zip(y.iter_mut()) {
        let l = k4_scales_and_levels(x, &SEARCH, &mut b.scales, &mut b.d, &mut b.dmin);
        // 64 values per 32 bytes: the first 32 in the low nibbles
        for (q, l) in b.qs.chunks_exact_mut(32).zip(l.chunks_exact(64)) {
            for i in 0..32 {
                q[i] = l[i] | (l[i + 32] << 4);
            }
        }
    }
}

/// Weights to Q5_K as llama.cpp's `quantize_row_q5_K_ref`: as Q4_K with 5-bit values and
/// a finer search.
pub fn quantize_q5k(x: &[f32], y: &mut [BlockQ5K]) {
    debug_assert_eq!(x.len(), y.len() * QK_K);
    const SEARCH: Search = Search {
        nmax: 31,
        rmin: -0.5,
        rdelta: 0.1,
        nstep: 15,
        use_mad: false,
    };
    for (x, b) in x.chunks_exact(QK_K).zip(y.iter_mut()) {
        let l = k4_scales_and_levels(x, &SEARCH, &mut b.scales, &mut b.d, &mut b.dmin);
        // low nibbles as Q4_K; bit 4 of value 64c + i (+32) in qh[i], bit 2c (2c + 1)
        b.qh = [0; QK_K / 8];
        let qs = b.qs.chunks_exact_mut(32);
        for (c, (q, l)) in qs.zip(l.chunks_exact(64)).enumerate() {
            for i in 0..32 {
                let (lo, hi) = (l[i], l[i + 32]);
                q[i] = (lo & 0xF) | ((hi & 0xF) << 4);
                b.qh[i] |= ((lo >> 4) << (2 * c)) | ((hi >> 4) << (2 * c + 1));
            }
        }
    }
}

/// Weights to Q6_K as llama.cpp's `quantize_row_q6_K_ref`: per 16 values a symmetric fit
/// to -32..31, signed scales to 8 bits.
pub fn quantize_q6k(x: &[f32], y: &mut [BlockQ6K]) {
    debug_assert_eq!(x.len(), y.len() * QK_K);
    for (x, b) in x.chunks_exact(QK_K).zip(y.iter_mut()) {
        let mut l = [0u8; QK_K]; // levels biased by 32
        let mut scales = [0.0f32; QK_K / 16];
        for (j, (x, l)) in x.chunks_exact(16).zip(l.chunks_exact_mut(16)).enumerate() {
            scales[j] = make_qx_quants(x, 32, l);
        }
        // the signed scale of largest magnitude
        let max_scale = signed_max(&scales);
        if max_scale.abs() < GROUP_MAX_EPS {
            b.ql = [0; QK_K / 2];
            b.qh = [0; QK_K / 4];
            b.scales = [0; QK_K / 16];
            b.d = f16::ZERO;
            continue;
        }

        let iscale = -128.0 / max_scale;
        b.d = f16::from_f32(1.0 / iscale);
        for (q, &s) in b.scales.iter_mut().zip(&scales) {
            *q = nearest_int(iscale * s).min(127) as i8;
        }

        let d = b.d.to_f32();
        for (j, (x, l)) in x.chunks_exact(16).zip(l.chunks_exact_mut(16)).enumerate() {
            let dj = d * b.scales[j] as f32;
            if dj == 0.0 {
                continue; // keep the fitted levels
            }
            for (l, &v) in l.iter_mut().zip(x) {
                *l = (nearest_int(v / dj).clamp(-32, 31) + 32) as u8;
            }
        }

        // per 128 values: low nibbles of i and i+64 share ql[i], of i+32 and i+96 ql[i+32];
        // the four high 2-bit pairs go to qh[i]
        for half in 0..2 {
            let l = &l[128 * half..128 * half + 128];
            let ql = &mut b.ql[64 * half..64 * half + 64];
            let qh = &mut b.qh[32 * half..32 * half + 32];
            for i in 0..32 {
                ql[i] = (l[i] & 0xF) | ((l[i + 64] & 0xF) << 4);
                ql[i + 32] = (l[i + 32] & 0xF) | ((l[i + 96] & 0xF) << 4);
                qh[i] = (l[i] >> 4)
                    | ((l[i + 32] >> 4) << 2)
                    | ((l[i + 64] >> 4) << 4)
                    | ((l[i + 96] >> 4) << 6);
            }
        }
    }
}

/// A weight as a trit for the ternary formats: `round(x / amax) + 1` (0..=2), rounding half
/// away from zero as llama.cpp's `lroundf`.
#[inline]
fn trit(x: f32, id: f32) -> u8 {
    ((x * id).round() as i32 + 1).clamp(0, 2) as u8
}

/// Base-3 trits (most significant first) to a TQ1_0 byte: `ceil(256 * value / 243)`.
#[inline]
fn tq1_byte(trits: impl Iterator<Item = u8>) -> u8 {
    let v = trits.fold(0u16, |q, t| q * 3 + t as u16);
    (v * 256).div_ceil(243) as u8
}

/// Weights to TQ1_0 as llama.cpp's `quantize_row_tq1_0_ref`: `d` = the block's absolute
/// maximum, each value rounded to -1, 0 or +1 times `d` (lossless for weights that already
/// are ternary times one scale, as BitNet b1.58's).
pub fn quantize_tq1_0(x: &[f32], y: &mut [BlockTQ1_0]) {
    debug_assert_eq!(x.len(), y.len() * QK_K);
    for (x, b) in x.chunks_exact(QK_K).zip(y.iter_mut()) {
        let d = amax(x);
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b.d = f16::from_f32(d);
        for m in 0..32 {
            b.qs[m] = tq1_byte((0..5).map(|n| trit(x[m + 32 * n], id)));
        }
        for m in 0..16 {
            b.qs[32 + m] = tq1_byte((0..5).map(|n| trit(x[160 + m + 16 * n], id)));
        }
        for j in 0..4 {
            // four trits and a zero in the least significant place
            b.qh[j] = tq1_byte((0..4).map(|n| trit(x[240 + j + 4 * n], id)).chain([0]));
        }
    }
}

/// Weights to TQ2_0 as llama.cpp's `quantize_row_tq2_0_ref` (the values of
/// [`quantize_tq1_0`], two bits each).
pub fn quantize_tq2_0(x: &[f32], y: &mut [BlockTQ2_0]) {
    debug_assert_eq!(x.len(), y.len() * QK_K);
    for (x, b) in x.chunks_exact(QK_K).zip(y.iter_mut()) {
        let d = amax(x);
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b.d = f16::from_f32(d);
        for c in 0..2 {
            for m in 0..32 {
                b.qs[32 * c + m] = (0..4)
                    .map(|l| trit(x[128 * c + 32 * l + m], id) << (2 * l))
                    .fold(0, |a, v| a | v);
            }
        }
    }
}
