//! Flash attention: query rows against the KV cache in tiles of [`KV_TILE`] positions, with
//! an online softmax, so scores are never held for the whole context and every key and value
//! tile is read once for all the query rows that share it (the heads of one GQA group and a
//! block of consecutive tokens).
//!
//! The cache is paged ([`KvView`]): keys are stored transposed per block of [`KV_TILE`]
//! positions (`[head_dim, KV_TILE]` for each head), values row-major within the block
//! (`[KV_TILE, n_embd_v]`), f16 or 8-bit codes with scales ([`crate::kvquant`]). Then both
//! products are the same small GEMM with an f16 (or 8-bit, converted in the loop) right-hand
//! side, [`gemm_f16b`] (or [`crate::kvquant::gemm_q8b`]):
//!
//! * scores `S[R, KV_TILE] = Q[R, head_dim] · Kᵀ[head_dim, KV_TILE]`
//! * output `O[R, head_dim_v] += P[R, n] · V[n, head_dim_v]`
//!
//! The scalar functions here are the reference definitions of the two kernels the table
//! dispatches ([`gemm_f16b`], [`exp_sum`]); [`flash_attn`] is the algorithm on top.

use half::f16;

use crate::dispatch::Kernels;
use crate::kvquant::KvType;

/// Positions per key/value tile (also the granularity of the transposed key layout).
pub const KV_TILE: usize = 64;

/// Query rows per work item that flash attention aims for.
pub const TARGET_ROWS: usize = 64;

/// `c[m, n] += a[m, k] · b[k, n]`: row-major with leading dimensions `lda`, `ldb`, `ldc`;
/// `b` is f16. The reference definition of the `gemm_f16b` kernel.
#[allow(clippy::too_many_arguments)]
pub fn gemm_f16b(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f16],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
) {
    check_gemm(m, n, k, a.len(), lda, b.len(), ldb, c.len(), ldc);
    gemm_f16b_tail(m, n, k, a, lda, b, ldb, c, ldc, 0);
}

/// [`gemm_f16b`] on columns `j0..n` only (all of them for the reference, the columns left
/// after the vector blocks for the SIMD paths).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_f16b_tail(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f16],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    j0: usize,
) {
    if j0 >= n {
        return;
    }
    for i in 0..m {
        for kk in 0..k {
            let av = a[i * lda + kk];
            for j in j0..n {
                c[i * ldc + j] += av * b[kk * ldb + j].to_f32();
            }
        }
    }
}

/// The bounds every `gemm_f16b` implementation checks before touching memory.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_gemm(
    m: usize,
    n: usize,
    k: usize,
    a_len: usize,
    lda: usize,
    b_len: usize,
    ldb: usize,
    c_len: usize,
    ldc: usize,
) {
    let need = |rows: usize, cols: usize, ld: usize| {
        if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * ld + cols
        }
    };
    assert!(
        lda >= k && ldb >= n && ldc >= n,
        "gemm_f16b: leading dimensions too small"
    );
    assert!(
        a_len >= need(m, k, lda) && b_len >= need(k, n, ldb) && c_len >= need(m, n, ldc),
        "gemm_f16b: slices too short"
    );
}

/// `x[i] = exp(x[i] - sub)`, returning the sum of the new values. The reference definition
/// of the `exp_sum` kernel.
pub fn exp_sum(x: &mut [f32], sub: f32) -> f32 {
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - sub).exp();
        sum += *v;
    }
    sum
}

/// Scores of the attention: scale, optional `tanh` soft-cap, head sizes.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub head_dim: usize,
    pub head_dim_v: usize,
    /// multiplies `q·k` (usually `1/sqrt(head_dim)`)
    pub scale: f32,
    /// `softcap * tanh(s / softcap)` on the scaled scores; 0 = none
    pub softcap: f32,
}

/// Keys or values of a cache's blocks, in one of the [`KvType`] formats.
#[derive(Clone, Copy, Debug)]
pub enum KvData<'a> {
    F16(&'a [f16]),
    /// 8-bit codes and their f32 scales ([`crate::kvquant`])
    Q8 {
        ty: KvType,
        codes: &'a [u8],
        scales: &'a [f32],
    },
}

/// One side (keys or values) of one KV head: its tile in block `b` starts at element
/// `b * block_stride + off` with rows `stride` apart (keys: `[head_dim, KV_TILE]`, stride
/// `KV_TILE`; values: `[KV_TILE, head_dim_v]`, stride `n_embd_v`); an 8-bit side's scales
/// start at `b * s_block_stride + s_off`, rows `s_stride` apart (keys: `[head_dim / 32,
/// KV_TILE]`; values: `[KV_TILE, head_dim_v / 32]`).
#[derive(Clone, Copy, Debug)]
pub struct KvSide<'a> {
    pub data: KvData<'a>,
    pub block_stride: usize,
    pub off: usize,
    pub stride: usize,
    pub s_block_stride: usize,
    pub s_off: usize,
    pub s_stride: usize,
}

/// One KV head of one sequence's cache, in blocks of [`KV_TILE`] positions: tile `t` (the
/// sequence's positions `t * KV_TILE..`) is in block `blocks[t]` of both sides.
#[derive(Clone, Copy, Debug)]
pub struct KvView<'a> {
    /// the sequence's block table
    pub blocks: &'a [u32],
    pub k: KvSide<'a>,
    pub v: KvSide<'a>,
}

/// `c[m, n] += a[m, k] · tile[k, n]` for the tile of `side` in `block`, converting 8-bit
/// codes inside the product (`key`: the scales run along `k`).
#[allow(clippy::too_many_arguments)]
fn gemm_tile(
    kern: &Kernels,
    side: &KvSide,
    block: usize,
    key: bool,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    c: &mut [f32],
    ldc: usize,
) {
    let at = block * side.block_stride + side.off;
    match side.data {
        KvData::F16(b) => (kern.gemm_f16b)(m, n, k, a, lda, &b[at..], side.stride, c, ldc),
        KvData::Q8 { ty, codes, scales } => {
            let f = match (ty, key) {
                (KvType::Fp8, true) => kern.gemm_fp8_k,
                (KvType::Fp8, false) => kern.gemm_fp8_n,
                (_, true) => kern.gemm_q8_0_k,
                (_, false) => kern.gemm_q8_0_n,
            };
            let sa = block * side.s_block_stride + side.s_off;
            f(
                m,
                n,
                k,
                a,
                lda,
                &codes[at..],
                side.stride,
                &scales[sa..],
                side.s_stride,
                c,
                ldc,
            );
        }
    }
}

/// Per-thread buffers of [`flash_attn`], allocated once for up to `max_rows` query rows.
#[derive(Debug)]
pub struct FlashScratch {
    max_rows: usize,
    head_dim: usize,
    head_dim_v: usize,
    /// `[max_rows, head_dim]` query rows (the caller fills them)
    q: Vec<f32>,
    /// `[max_rows]` visible positions `lo..hi` of each row
    range: Vec<(usize, usize)>,
    /// `[max_rows, KV_TILE]` scores, then probabilities, of one tile
    s: Vec<f32>,
    /// `[max_rows, head_dim_v]` output rows
    o: Vec<f32>,
    /// `[max_rows]` running maximum and sum of each row's softmax
    m: Vec<f32>,
    l: Vec<f32>,
}

impl FlashScratch {
    pub fn new(max_rows: usize, head_dim: usize, head_dim_v: usize) -> FlashScratch {
        FlashScratch {
            max_rows,
            head_dim,
            head_dim_v,
            q: vec![0.0; max_rows * head_dim],
            range: vec![(0, 0); max_rows],
            s: vec![0.0; max_rows * KV_TILE],
            o: vec![0.0; max_rows * head_dim_v],
            m: vec![0.0; max_rows],
            l: vec![0.0; max_rows],
        }
    }

    pub fn max_rows(&self) -> usize {
        self.max_rows
    }

    /// Query row `r` (`head_dim` values) to fill, and the positions `lo..hi` it attends to.
    pub fn set_row(&mut self, r: usize, q: &[f32], lo: usize, hi: usize) {
        let d = self.head_dim;
        self.q[r * d..(r + 1) * d].copy_from_slice(&q[..d]);
        self.range[r] = (lo, hi.max(lo));
    }

    /// Output row `r` after [`flash_attn`].
    pub fn out_row(&self, r: usize) -> &[f32] {
        &self.o[r * self.head_dim_v..(r + 1) * self.head_dim_v]
    }
}

/// Attention of rows `0..n_rows` of `sc` (set with [`FlashScratch::set_row`]) against one KV
/// head; results in [`FlashScratch::out_row`]. A row that sees no position gets zeros.
pub fn flash_attn(
    kern: &Kernels,
    sh: &AttnShape,
    kv: &KvView,
    n_rows: usize,
    sc: &mut FlashScratch,
) {
    assert!(n_rows <= sc.max_rows && sh.head_dim == sc.head_dim && sh.head_dim_v == sc.head_dim_v);
    let (d, dv, t) = (sh.head_dim, sh.head_dim_v, KV_TILE);
    let rows = &sc.range[..n_rows];
    let lo_min = rows.iter().map(|r| r.0).min().unwrap_or(0);
    let hi_max = rows.iter().map(|r| r.1).max().unwrap_or(0);
    let q = &mut sc.q[..n_rows * d];
    for v in q.iter_mut() {
        *v *= sh.scale;
    }
    let o = &mut sc.o[..n_rows * dv];
    o.fill(0.0);
    sc.m[..n_rows].fill(f32::NEG_INFINITY);
    sc.l[..n_rows].fill(0.0);
    if hi_max <= lo_min {
        return;
    }
    for tile in lo_min / t..=(hi_max - 1) / t {
        let p0 = tile * t;
        let n = t.min(hi_max - p0);
        let s = &mut sc.s[..n_rows * t];
        s.fill(0.0);
        let block = kv.blocks[tile] as usize;
        gemm_tile(kern, &kv.k, block, true, n_rows, t, d, q, d, s, t);
        for (r, &(lo, hi)) in rows.iter().enumerate() {
            let row = &mut s[r * t..(r + 1) * t];
            let a = lo.clamp(p0, p0 + n) - p0;
            let b = hi.clamp(p0, p0 + n) - p0;
            if a >= b {
                row.fill(0.0);
                continue;
            }
            let seen = &mut row[a..b];
            if sh.softcap > 0.0 {
                for v in seen.iter_mut() {
                    *v = sh.softcap * (*v / sh.softcap).tanh();
                }
            }
            let mx = seen.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let m_new = sc.m[r].max(mx);
            let sum = (kern.exp_sum)(seen, m_new);
            row[..a].fill(0.0);
            row[b..].fill(0.0);
            let corr = (sc.m[r] - m_new).exp();
            sc.l[r] = sc.l[r] * corr + sum;
            sc.m[r] = m_new;
            if corr != 1.0 {
                for v in &mut o[r * dv..(r + 1) * dv] {
                    *v *= corr;
                }
            }
        }
        gemm_tile(kern, &kv.v, block, false, n_rows, dv, n, s, t, o, dv);
    }
    for r in 0..n_rows {
        let l = sc.l[r];
        let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
        for v in &mut o[r * dv..(r + 1) * dv] {
            *v *= inv;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::tests::Rng;

    fn f16s(rng: &mut Rng, n: usize) -> Vec<f16> {
        (0..n).map(|_| f16::from_f32(rng.f32())).collect()
    }

    #[test]
    fn gemm_f16b_matches_reference_at_every_shape() {
        let mut rng = Rng::new(11);
        for kern in Kernels::all_variants() {
            for &(m, n, k) in &[
                (1, 16, 1),
                (3, 64, 64),
                (7, 80, 33),
                (13, 64, 5),
                (64, 64, 64),
                (5, 7, 9),
                (6, 200, 17),
                (2, 256, 64),
            ] {
                let (lda, ldb, ldc) = (k + 3, n + 5, n + 1);
                let a: Vec<f32> = (0..m * lda).map(|_| rng.f32() - 0.5).collect();
                let b = f16s(&mut rng, k * ldb);
                let c0: Vec<f32> = (0..m * ldc).map(|_| rng.f32()).collect();
                let mut want = c0.clone();
                gemm_f16b(m, n, k, &a, lda, &b, ldb, &mut want, ldc);
                let mut got = c0.clone();
                (kern.gemm_f16b)(m, n, k, &a, lda, &b, ldb, &mut got, ldc);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    let col = i % ldc;
                    if col >= n {
                        assert_eq!(g, w, "{:?} wrote outside the matrix", kern.name);
                    }
                    assert!(
                        (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                        "{:?} m={m} n={n} k={k} at {i}: {g} vs {w}",
                        kern.name
                    );
                }
            }
        }
    }

    #[test]
    fn exp_sum_matches_reference_at_every_length() {
        let mut rng = Rng::new(12);
        for kern in Kernels::all_variants() {
            for n in 0..70 {
                let mut x: Vec<f32> = (0..n).map(|_| (rng.f32() - 0.8) * 120.0).collect();
                if n > 3 {
                    x[1] = f32::NEG_INFINITY;
                    x[2] = -1e30;
                    x[3] = 0.0;
                }
                let mut want = x.clone();
                let ws = exp_sum(&mut want, 1.5);
                let mut got = x.clone();
                let gs = (kern.exp_sum)(&mut got, 1.5);
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() <= 2e-6 * w.abs() + 1e-37,
                        "{:?} n={n}: {g} vs {w}",
                        kern.name
                    );
                }
                assert!(
                    (gs - ws).abs() <= 1e-5 * ws.abs(),
                    "{:?}: {gs} vs {ws}",
                    kern.name
                );
            }
        }
    }

    /// Plain attention of one row over positions `lo..hi`, keys given row-major.
    fn naive(
        sh: &AttnShape,
        q: &[f32],
        keys: &[Vec<f32>],
        vals: &[Vec<f32>],
        lo: usize,
        hi: usize,
    ) -> Vec<f32> {
        let mut out = vec![0.0; sh.head_dim_v];
        if hi <= lo {
            return out;
        }
        let mut s: Vec<f32> = (lo..hi)
            .map(|p| {
                let mut v = q.iter().zip(&keys[p]).map(|(a, b)| a * b).sum::<f32>() * sh.scale;
                if sh.softcap > 0.0 {
                    v = sh.softcap * (v / sh.softcap).tanh();
                }
                v
            })
            .collect();
        crate::ops::softmax(&mut s);
        for (w, p) in s.iter().zip(lo..hi) {
            for (o, v) in out.iter_mut().zip(&vals[p]) {
                *o += w * v;
            }
        }
        out
    }

    /// A cache of `n_blocks` blocks in format `ty` for rows `keys`/`vals` (`[n_pos][n_embd]`)
    /// placed in `blocks`; returns the buffers and the values as stored (rounded).
    struct Cache {
        k16: Vec<f16>,
        v16: Vec<f16>,
        kc: Vec<u8>,
        ks: Vec<f32>,
        vc: Vec<u8>,
        vs: Vec<f32>,
    }

    fn build(
        ty: KvType,
        keys: &mut [Vec<f32>],
        vals: &mut [Vec<f32>],
        blocks: &[u32],
        n_blocks: usize,
    ) -> Cache {
        use crate::kvquant::{decode, quantize_group, QK};
        let (ek, ev) = (keys[0].len(), vals[0].len());
        let mut c = Cache {
            k16: vec![f16::ZERO; n_blocks * ek * KV_TILE],
            v16: vec![f16::ZERO; n_blocks * KV_TILE * ev],
            kc: vec![0; n_blocks * ek * KV_TILE],
            ks: vec![0.0; n_blocks * ek / QK * KV_TILE],
            vc: vec![0; n_blocks * KV_TILE * ev],
            vs: vec![0.0; n_blocks * KV_TILE * ev / QK],
        };
        for (p, (krow, vrow)) in keys.iter_mut().zip(vals.iter_mut()).enumerate() {
            let (b, off) = (blocks[p / KV_TILE] as usize, p % KV_TILE);
            let r = b * KV_TILE + off;
            if ty == KvType::F16 {
                for (e, x) in krow.iter_mut().enumerate() {
                    *x = f16::from_f32(*x).to_f32();
                    c.k16[b * ek * KV_TILE + e * KV_TILE + off] = f16::from_f32(*x);
                }
                for (e, x) in vrow.iter_mut().enumerate() {
                    *x = f16::from_f32(*x).to_f32();
                    c.v16[r * ev + e] = f16::from_f32(*x);
                }
                continue;
            }
            for g in 0..ek / QK {
                let at = b * ek * KV_TILE + g * QK * KV_TILE + off;
                let d = quantize_group(ty, &krow[g * QK..(g + 1) * QK], &mut c.kc[at..], KV_TILE);
                c.ks[b * ek / QK * KV_TILE + g * KV_TILE + off] = d;
                for i in 0..QK {
                    krow[g * QK + i] = decode(ty, c.kc[at + i * KV_TILE]) * d;
                }
            }
            for g in 0..ev / QK {
                let at = r * ev + g * QK;
                let d = quantize_group(ty, &vrow[g * QK..(g + 1) * QK], &mut c.vc[at..], 1);
                c.vs[r * ev / QK + g] = d;
                for i in 0..QK {
                    vrow[g * QK + i] = decode(ty, c.vc[at + i]) * d;
                }
            }
        }
        c
    }

    #[test]
    fn flash_attn_matches_plain_attention() {
        use crate::kvquant::QK;
        let mut rng = Rng::new(13);
        for ty in KvType::ALL {
            for &(d, dv, softcap, n_pos) in &[
                (64usize, 64usize, 0.0f32, 150usize),
                (32, 96, 30.0, 64),
                (128, 32, 0.0, 5),
            ] {
                let (n_head_kv, n_tiles) = (2usize, n_pos.div_ceil(KV_TILE));
                let n_embd_k = n_head_kv * d;
                let n_embd_v = n_head_kv * dv;
                let mut keys: Vec<Vec<f32>> = (0..n_pos)
                    .map(|_| (0..n_embd_k).map(|_| rng.f32()).collect())
                    .collect();
                let mut vals: Vec<Vec<f32>> = (0..n_pos)
                    .map(|_| (0..n_embd_v).map(|_| rng.f32()).collect())
                    .collect();
                // the sequence's tiles in blocks out of order among unused ones; the values
                // the cache holds replace the rows (the reference attends to those)
                let n_blocks = n_tiles * 2 + 1;
                let blocks: Vec<u32> = (0..n_tiles)
                    .map(|t| (n_blocks - 1 - 2 * t) as u32)
                    .collect();
                let cache = build(ty, &mut keys, &mut vals, &blocks, n_blocks);
                let sh = AttnShape {
                    head_dim: d,
                    head_dim_v: dv,
                    scale: 1.0 / (d as f32).sqrt() * 3.0,
                    softcap,
                };
                for kern in Kernels::all_variants() {
                    for kvh in 0..n_head_kv {
                        let side = |data, block_stride, off, stride, sbs, s_off, s_stride| KvSide {
                            data,
                            block_stride,
                            off,
                            stride,
                            s_block_stride: sbs,
                            s_off,
                            s_stride,
                        };
                        let (kd, vd) = if ty == KvType::F16 {
                            (KvData::F16(&cache.k16), KvData::F16(&cache.v16))
                        } else {
                            (
                                KvData::Q8 {
                                    ty,
                                    codes: &cache.kc,
                                    scales: &cache.ks,
                                },
                                KvData::Q8 {
                                    ty,
                                    codes: &cache.vc,
                                    scales: &cache.vs,
                                },
                            )
                        };
                        let view = KvView {
                            blocks: &blocks,
                            k: side(
                                kd,
                                n_embd_k * KV_TILE,
                                kvh * d * KV_TILE,
                                KV_TILE,
                                n_embd_k / QK * KV_TILE,
                                kvh * d / QK * KV_TILE,
                                KV_TILE,
                            ),
                            v: side(
                                vd,
                                KV_TILE * n_embd_v,
                                kvh * dv,
                                n_embd_v,
                                KV_TILE * n_embd_v / QK,
                                kvh * dv / QK,
                                n_embd_v / QK,
                            ),
                        };
                        let mut sc = FlashScratch::new(9, d, dv);
                        // causal rows, a sliding window, one row that sees nothing
                        let ranges: Vec<(usize, usize)> = vec![
                            (0, n_pos),
                            (0, 1),
                            (n_pos / 2, n_pos),
                            (n_pos.saturating_sub(3), n_pos - 1),
                            (3.min(n_pos - 1), n_pos),
                            (2, 2),
                            (0, n_pos / 3 + 1),
                        ];
                        let qs: Vec<Vec<f32>> = ranges
                            .iter()
                            .map(|_| (0..d).map(|_| rng.f32()).collect())
                            .collect();
                        for (r, (q, &(lo, hi))) in qs.iter().zip(&ranges).enumerate() {
                            sc.set_row(r, q, lo, hi);
                        }
                        flash_attn(&kern, &sh, &view, ranges.len(), &mut sc);
                        let kh: Vec<Vec<f32>> = keys
                            .iter()
                            .map(|k| k[kvh * d..(kvh + 1) * d].to_vec())
                            .collect();
                        let vh: Vec<Vec<f32>> = vals
                            .iter()
                            .map(|v| v[kvh * dv..(kvh + 1) * dv].to_vec())
                            .collect();
                        for (r, (q, &(lo, hi))) in qs.iter().zip(&ranges).enumerate() {
                            let want = naive(&sh, q, &kh, &vh, lo, hi);
                            for (g, w) in sc.out_row(r).iter().zip(&want) {
                                assert!(
                                    (g - w).abs() <= 1e-4,
                                    "{} {ty} d={d} row {r} ({lo}..{hi}): {g} vs {w}",
                                    kern.name
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
