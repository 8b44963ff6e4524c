//! Scalar reference element-wise and row kernels: RMSNorm, softmax, RoPE, gated activations.

/// `out = x / sqrt(mean(x^2) + eps) * w`. `w` may be empty for no weight.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let sum: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    let scale = (1.0 / (sum / x.len() as f64 + eps as f64).sqrt()) as f32;
    if w.is_empty() {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = v * scale;
        }
    } else {
        for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
            *o = v * scale * g;
        }
    }
}

/// In-place RMSNorm. Elements past the end of `w` (all of them when `w` is empty) are
/// only scaled.
pub fn rms_norm_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    let sum: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    let scale = (1.0 / (sum / x.len() as f64 + eps as f64).sqrt()) as f32;
    for (i, v) in x.iter_mut().enumerate() {
        *v *= scale * w.get(i).copied().unwrap_or(1.0);
    }
}

/// In-place softmax over the whole slice.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    if max == f32::NEG_INFINITY {
        return;
    }
    let mut sum = 0.0f64;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v as f64;
    }
    let inv = (1.0 / sum) as f32;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Fills `cos`/`sin` (each `n_dims/2` long) with the rotation of position `pos`:
/// angle_i = pos * freq_scale * base^(-2i/n_dims).
pub fn rope_cache(
    pos: f32,
    base: f32,
    freq_scale: f32,
    n_dims: usize,
    cos: &mut [f32],
    sin: &mut [f32],
) {
    for i in 0..n_dims / 2 {
        let inv_freq = (base as f64).powf(-(2.0 * i as f64) / n_dims as f64);
        let theta = pos as f64 * freq_scale as f64 * inv_freq;
        cos[i] = theta.cos() as f32;
        sin[i] = theta.sin() as f32;
    }
}

/// Rotates one head in place. Normal (GPT-J) style pairs `(x[2i], x[2i+1])`; NeoX style
/// pairs `(x[i], x[i + n_dims/2])`. Dimensions past `n_dims` are left alone.
pub fn rope(x: &mut [f32], cos: &[f32], sin: &[f32], n_dims: usize, neox: bool) {
    rope_pairs(x, cos, sin, n_dims, neox, 0)
}

/// [`rope`] on the pairs from `first` on (the SIMD paths' tails).
pub(crate) fn rope_pairs(
    x: &mut [f32],
    cos: &[f32],
    sin: &[f32],
    n_dims: usize,
    neox: bool,
    first: usize,
) {
    let half = n_dims / 2;
    for i in first..half {
        let (a, b) = if neox {
            (i, i + half)
        } else {
            (2 * i, 2 * i + 1)
        };
        let (x0, x1) = (x[a], x[b]);
        x[a] = x0 * cos[i] - x1 * sin[i];
        x[b] = x0 * sin[i] + x1 * cos[i];
    }
}

#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_COEF_A: f32 = 0.044_715;

/// GELU, tanh approximation (as gemma and ggml use): `0.5 x (1 + tanh(z))`, computed as
/// the equal `x * sigmoid(2z)`, which needs one `exp`.
#[inline]
pub fn gelu(x: f32) -> f32 {
    let z = SQRT_2_OVER_PI * x * (1.0 + GELU_COEF_A * x * x);
    x / (1.0 + (-2.0 * z).exp())
}

/// `gate = silu(gate) * up` (SwiGLU), in place.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = silu(*g) * u;
    }
}

/// `gate = gelu(gate) * up` (GeGLU), in place.
pub fn gelu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = gelu(*g) * u;
    }
}

/// `y += x`.
pub fn add_inplace(y: &mut [f32], x: &[f32]) {
    for (a, &b) in y.iter_mut().zip(x) {
        *a += b;
    }
}

/// `y *= s`.
pub fn scale_inplace(y: &mut [f32], s: f32) {
    for a in y.iter_mut() {
        *a *= s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_unit_rms() {
        let x: Vec<f32> = (0..64).map(|i| i as f32 - 20.0).collect();
        let mut out = vec![0.0; 64];
        rms_norm(&x, &[], 0.0, &mut out);
        let ms: f32 = out.iter().map(|v| v * v).sum::<f32>() / 64.0;
        assert!((ms - 1.0).abs() < 1e-5);
    }

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let mut x = vec![1.0, 3.0, -2.0, 3.5, f32::NEG_INFINITY];
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(x[3] > x[1] && x[1] > x[0] && x[0] > x[2]);
        assert_eq!(x[4], 0.0);
    }

    #[test]
    fn rope_preserves_norm_and_position_zero_is_identity() {
        let n = 16;
        let (mut c, mut s) = (vec![0.0; n / 2], vec![0.0; n / 2]);
        let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        for neox in [false, true] {
            rope_cache(0.0, 10000.0, 1.0, n, &mut c, &mut s);
            let mut y = x.clone();
            rope(&mut y, &c, &s, n, neox);
            assert_eq!(x, y);
            rope_cache(17.0, 10000.0, 1.0, n, &mut c, &mut s);
            rope(&mut y, &c, &s, n, neox);
            let n0: f32 = x.iter().map(|v| v * v).sum();
            let n1: f32 = y.iter().map(|v| v * v).sum();
            assert!((n0 - n1).abs() < 1e-4);
            assert_ne!(x, y);
        }
    }

    #[test]
    fn gelu_equals_the_tanh_form() {
        for i in -400..400 {
            let x = i as f32 * 0.05;
            let tanh_form =
                0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + GELU_COEF_A * x * x)).tanh());
            assert!(
                (gelu(x) - tanh_form).abs() <= 1e-6 * x.abs().max(1.0),
                "x={x}"
            );
        }
    }

    #[test]
    fn simd_row_kernels_match_the_reference_at_every_length() {
        use crate::dispatch::Kernels;
        let mut rng = crate::quant::tests::Rng::new(21);
        for kern in Kernels::all_variants() {
            for n in (1..70).chain([576, 640, 1000]) {
                let x: Vec<f32> = (0..n).map(|_| rng.f32() * 12.0).collect();
                let up: Vec<f32> = (0..n).map(|_| rng.f32() * 3.0).collect();
                for (name, f, r) in [
                    (
                        "silu_mul",
                        kern.silu_mul,
                        silu_mul as fn(&mut [f32], &[f32]),
                    ),
                    ("gelu_mul", kern.gelu_mul, gelu_mul),
                ] {
                    let (mut got, mut want) = (x.clone(), x.clone());
                    f(&mut got, &up);
                    r(&mut want, &up);
                    for (g, w) in got.iter().zip(&want) {
                        assert!(
                            (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                            "{:?} {name} n={n}: {g} vs {w}",
                            kern.name
                        );
                    }
                }
                // weighted, unweighted, and a weight shorter than the row
                let w: Vec<f32> = (0..n).map(|_| rng.f32() + 1.5).collect();
                for wl in [n, 0, n / 2] {
                    let (mut got, mut want) = (x.clone(), x.clone());
                    (kern.rms_norm)(&mut got, &w[..wl], 1e-6);
                    rms_norm_inplace(&mut want, &w[..wl], 1e-6);
                    for (g, w) in got.iter().zip(&want) {
                        assert!(
                            (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                            "{:?} rms_norm n={n} w={wl}: {g} vs {w}",
                            kern.name
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn simd_rope_matches_the_reference_in_both_styles() {
        use crate::dispatch::Kernels;
        let mut rng = crate::quant::tests::Rng::new(23);
        for kern in Kernels::all_variants() {
            // head sizes with odd pair counts, and partial rotation (n_dims < head size)
            for (head, n_dims) in [
                (2, 2),
                (6, 6),
                (10, 10),
                (64, 64),
                (128, 128),
                (80, 32),
                (64, 22),
            ] {
                let x: Vec<f32> = (0..head).map(|_| rng.f32() * 4.0).collect();
                let (mut cos, mut sin) = (vec![0.0; n_dims / 2], vec![0.0; n_dims / 2]);
                rope_cache(37.0, 10000.0, 1.0, n_dims, &mut cos, &mut sin);
                for neox in [false, true] {
                    let (mut got, mut want) = (x.clone(), x.clone());
                    (kern.rope)(&mut got, &cos, &sin, n_dims, neox);
                    rope(&mut want, &cos, &sin, n_dims, neox);
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                            "{} rope neox={neox} head={head} n_dims={n_dims} [{i}]: {g} vs {w}",
                            kern.name
                        );
                    }
                    assert_ne!(got, x, "{} rope changed nothing", kern.name);
                }
            }
        }
    }

    #[test]
    fn activations_known_values() {
        assert!((silu(1.0) - 0.731_058_6).abs() < 1e-6);
        assert!((gelu(1.0) - 0.841_192).abs() < 1e-5);
        assert_eq!(gelu(0.0), 0.0);
    }
}
