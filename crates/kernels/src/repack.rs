//! Weights repacked at load into row-interleaved blocks ("R16"), for the 32-element formats.
//!
//! Sixteen consecutive rows are interleaved block by block so that SIMD lanes hold *rows*:
//! one 512-bit dot-product instruction (16 lanes of 32 bits) advances sixteen rows by four
//! values each, per-row scales apply as one vector, and no horizontal sums are needed. Every format is
//! brought to one arithmetic: unsigned values `q` (0..=255) with a per-row, per-block scale
//! `d` and offset `c`, so that a weight is `d*q + c`:
//!
//! | source | q | c |
//! |---|---|---|
//! | Q4_0 | nibble (0..15) | -8 d |
//! | Q4_1 | nibble | m |
//! | Q5_0 | 5 bits (0..31) | -16 d |
//! | Q5_1 | 5 bits | m |
//! | Q8_0 | value + 128 | -128 d |
//!
//! `d` and `c` stay f16 (all the `c` above are exact in f16), so a repacked matrix takes the
//! same bytes as the original. Against activations quantized to [`BlockQ8x`] (int8 values,
//! f32 scale `da`, f32 `sa = da * sum(values)`), one block contributes
//! `d*da*sum(q*a) + c*sa` to its row.
//!
//! A block of sixteen rows is a header of the sixteen `d` then the sixteen `c` (f16), then the
//! values. Value byte `64k + 4r + i` (k = 0..8, r = 0..16, i = 0..4) is value `4k + i` of row
//! `r`: an activation's bytes `4k..4k+4`, broadcast to all sixteen 32-bit lanes, line up with
//! chunk `k` of every row. 4-bit values pack chunks `k` and `k + 4` into the low and high
//! nibbles of one 64-byte run; 5-bit values add a bit string of 512 fifth bits.

use half::f16;

use crate::blocks::*;
use crate::{Error, GgmlType, Result, WeightRef};

/// Rows per interleaved group.
pub const R16_ROWS: usize = 16;
/// Activation rows the R16 kernels take at once (each unpacked weight block serves them all).
pub const R16_TOKENS: usize = 8;

/// Bytes of a block's header: sixteen f16 `d`, then sixteen f16 `c`.
pub const HEADER: usize = 64;

/// How the values of a repacked block are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum R16Kind {
    /// 4-bit values: body byte `j` holds value bytes `j` (low nibble) and `j + 256` (high).
    Q4,
    /// 5-bit values: the low nibbles as in `Q4`, then the fifth bits (bit `j` of the
    /// 512-bit string is the fifth bit of value byte `j`).
    Q5,
    /// 8-bit values, one byte each.
    Q8,
}

impl R16Kind {
    pub fn for_type(ty: GgmlType) -> Option<R16Kind> {
        match ty {
            GgmlType::Q4_0 | GgmlType::Q4_1 => Some(R16Kind::Q4),
            GgmlType::Q5_0 | GgmlType::Q5_1 => Some(R16Kind::Q5),
            GgmlType::Q8_0 => Some(R16Kind::Q8),
            _ => None,
        }
    }

    /// Bytes of one block of sixteen rows.
    pub fn block_bytes(self) -> usize {
        HEADER
            + match self {
                R16Kind::Q4 => 256,
                R16Kind::Q5 => 256 + 64,
                R16Kind::Q8 => 512,
            }
    }
}

/// Activation block for repacked weights: f32 scale and sum, as exact as the int8 values.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ8x {
    /// The scale, rounded to f16 precision as in Q8_0/Q8_1.
    pub d: f32,
    /// `d * sum(qs)`.
    pub s: f32,
    pub qs: [i8; 32],
}

const _: () = assert!(std::mem::size_of::<BlockQ8x>() == 40);
// SAFETY: repr(C), two f32 and 32 i8: no padding, every bit pattern valid.
unsafe impl Pod for BlockQ8x {}

/// Quantizes activations to [`BlockQ8x`] (the values and scale of Q8_0).
pub fn quantize_q8x(x: &[f32], y: &mut [BlockQ8x]) {
    for (x, b) in x.chunks_exact(32).zip(y.iter_mut()) {
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = f16::from_f32(amax / 127.0).to_f32();
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in b.qs.iter_mut().zip(x) {
            let r = crate::quant::quantize::nearest_int(v * id);
            *q = r as i8;
            sum += r;
        }
        b.d = d;
        b.s = d * sum as f32;
    }
}

/// A weight matrix repacked into R16 blocks: `n_rows / 16` groups of `n_cols / 32` blocks.
pub struct Repacked {
    pub kind: R16Kind,
    pub n_rows: usize,
    pub n_cols: usize,
    data: AlignedBuf,
}

impl std::fmt::Debug for Repacked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Repacked({:?}, {}x{})",
            self.kind, self.n_rows, self.n_cols
        )
    }
}

/// Per-row values (0..=255 as the unified `q`), scale and offset of one 32-element block.
fn unify(ty: GgmlType, row_block: &[u8]) -> ([u8; 32], f16, f16) {
    let mut q = [0u8; 32];
    let half_of = |b: &[u8], at: usize| f16::from_le_bytes([b[at], b[at + 1]]);
    match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let qs_at = if ty == GgmlType::Q4_0 { 2 } else { 4 };
            for j in 0..16 {
                q[j] = row_block[qs_at + j] & 0xF;
                q[j + 16] = row_block[qs_at + j] >> 4;
            }
            let d = half_of(row_block, 0);
            let c = if ty == GgmlType::Q4_0 {
                f16::from_f32(-8.0 * d.to_f32())
            } else {
                half_of(row_block, 2)
            };
            (q, d, c)
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let (qh_at, qs_at) = if ty == GgmlType::Q5_0 { (2, 6) } else { (4, 8) };
            let h = u32::from_le_bytes([
                row_block[qh_at],
                row_block[qh_at + 1],
                row_block[qh_at + 2],
                row_block[qh_at + 3],
            ]);
            for j in 0..16 {
                q[j] = (row_block[qs_at + j] & 0xF) | ((((h >> j) & 1) as u8) << 4);
                q[j + 16] = (row_block[qs_at + j] >> 4) | ((((h >> (j + 16)) & 1) as u8) << 4);
            }
            let d = half_of(row_block, 0);
            let c = if ty == GgmlType::Q5_0 {
                f16::from_f32(-16.0 * d.to_f32())
            } else {
                half_of(row_block, 2)
            };
            (q, d, c)
        }
        _ => {
            // Q8_0
            for j in 0..32 {
                q[j] = (row_block[2 + j] as i8 as i16 + 128) as u8;
            }
            let d = half_of(row_block, 0);
            (q, d, f16::from_f32(-128.0 * d.to_f32()))
        }
    }
}

/// Repacks a weight matrix; `None` when its type has no R16 form or its rows do not come in
/// groups of sixteen.
pub fn repack(w: WeightRef<'_>) -> Result<Option<Repacked>> {
    let Some(kind) = R16Kind::for_type(w.ty) else {
        return Ok(None);
    };
    if w.n_rows % R16_ROWS != 0 || w.n_cols % 32 != 0 {
        return Ok(None);
    }
    if w.data.len() != w.row_bytes() * w.n_rows {
        return Err(Error::Shape {
            op: "repack",
            expected: (w.row_bytes() * w.n_rows).to_string(),
            got: w.data.len().to_string(),
        });
    }
    let nb = w.n_cols / 32;
    let bb = kind.block_bytes();
    let ts = w.ty.type_size();
    let mut data = AlignedBuf::new();
    data.resize(w.n_rows / R16_ROWS * nb * bb);
    let out = data.as_mut_slice();
    for g in 0..w.n_rows / R16_ROWS {
        for b in 0..nb {
            let dst = &mut out[(g * nb + b) * bb..(g * nb + b + 1) * bb];
            let mut vals = [0u8; 512];
            for r in 0..R16_ROWS {
                let row = w.row(g * R16_ROWS + r);
                let (q, d, c) = unify(w.ty, &row[b * ts..(b + 1) * ts]);
                dst[2 * r..2 * r + 2].copy_from_slice(&d.to_le_bytes());
                dst[32 + 2 * r..32 + 2 * r + 2].copy_from_slice(&c.to_le_bytes());
                for (j, &v) in q.iter().enumerate() {
                    vals[64 * (j / 4) + 4 * r + j % 4] = v;
                }
            }
            let body = &mut dst[HEADER..];
            match kind {
                R16Kind::Q8 => body.copy_from_slice(&vals),
                R16Kind::Q4 | R16Kind::Q5 => {
                    for j in 0..256 {
                        body[j] = (vals[j] & 0xF) | ((vals[j + 256] & 0xF) << 4);
                    }
                    if kind == R16Kind::Q5 {
                        let qh = &mut body[256..320];
                        qh.fill(0);
                        for (j, &v) in vals.iter().enumerate() {
                            qh[j / 8] |= ((v >> 4) & 1) << (j % 8);
                        }
                    }
                }
            }
        }
    }
    Ok(Some(Repacked {
        kind,
        n_rows: w.n_rows,
        n_cols: w.n_cols,
        data,
    }))
}

impl Repacked {
    /// The bytes of block `b` of row group `g`.
    pub fn block(&self, g: usize, b: usize) -> &[u8] {
        let nb = self.n_cols / 32;
        let bb = self.kind.block_bytes();
        &self.data.as_slice()[(g * nb + b) * bb..(g * nb + b + 1) * bb]
    }

    pub fn bytes(&self) -> usize {
        self.data.as_slice().len()
    }

    /// The raw blocks of row groups `groups`.
    pub(crate) fn groups(&self, groups: std::ops::Range<usize>) -> &[u8] {
        let gb = self.n_cols / 32 * self.kind.block_bytes();
        &self.data.as_slice()[groups.start * gb..groups.end * gb]
    }
}

/// Value byte `j` (0..512, in the interleaved order) of a repacked block.
fn value(kind: R16Kind, block: &[u8], j: usize) -> u8 {
    let body = &block[HEADER..];
    match kind {
        R16Kind::Q8 => body[j],
        R16Kind::Q4 => (body[j % 256] >> (4 * (j / 256))) & 0xF,
        R16Kind::Q5 => {
            ((body[j % 256] >> (4 * (j / 256))) & 0xF) | (((body[256 + j / 8] >> (j % 8)) & 1) << 4)
        }
    }
}

/// Scalar reference: the sixteen rows of group `g` against one activation row.
pub fn gemv_r16_scalar(w: &Repacked, g: usize, a: &[BlockQ8x]) -> [f32; R16_ROWS] {
    let mut out = [0.0f32; R16_ROWS];
    for (b, ab) in a.iter().enumerate().take(w.n_cols / 32) {
        let block = w.block(g, b);
        for (r, o) in out.iter_mut().enumerate() {
            *o += block_row_dot(w.kind, block, r, ab);
        }
    }
    out
}

/// Scalar [`crate::dispatch::R16GemmFn`]: [`gemv_r16_scalar`] per activation row.
pub fn gemm_r16_scalar(
    kind: R16Kind,
    group: &[u8],
    nb: usize,
    acts: [&[BlockQ8x]; R16_TOKENS],
    n_act: usize,
) -> [[f32; R16_ROWS]; R16_TOKENS] {
    let bb = kind.block_bytes();
    let mut out = [[0.0f32; R16_ROWS]; R16_TOKENS];
    for (t, o) in out.iter_mut().enumerate().take(n_act) {
        for (b, ab) in acts[t].iter().enumerate().take(nb) {
            let block = &group[b * bb..(b + 1) * bb];
            for (r, v) in o.iter_mut().enumerate() {
                *v += block_row_dot(kind, block, r, ab);
            }
        }
    }
    out
}

/// One row's share of one repacked block against one activation block.
fn block_row_dot(kind: R16Kind, block: &[u8], r: usize, ab: &BlockQ8x) -> f32 {
    let d = f16::from_le_bytes([block[2 * r], block[2 * r + 1]]).to_f32();
    let c = f16::from_le_bytes([block[32 + 2 * r], block[33 + 2 * r]]).to_f32();
    let mut isum = 0i32;
    for j in 0..32 {
        isum += value(kind, block, 64 * (j / 4) + 4 * r + j % 4) as i32 * ab.qs[j] as i32;
    }
    d * ab.d * isum as f32 + c * ab.s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::quantize;
    use crate::quant::tests::Rng;

    fn matrix(ty: GgmlType, rows: usize, cols: usize, rng: &mut Rng) -> Vec<u8> {
        let x: Vec<f32> = (0..rows * cols).map(|_| rng.f32()).collect();
        let mut buf = AlignedBuf::new();
        buf.resize(rows * cols / 32 * ty.type_size());
        let out = buf.as_mut_slice();
        match ty {
            GgmlType::Q4_0 => quantize::quantize_q4_0(&x, cast_blocks_mut(out).unwrap()),
            GgmlType::Q4_1 => quantize::quantize_q4_1(&x, cast_blocks_mut(out).unwrap()),
            GgmlType::Q5_0 => quantize::quantize_q5_0(&x, cast_blocks_mut(out).unwrap()),
            GgmlType::Q5_1 => quantize::quantize_q5_1(&x, cast_blocks_mut(out).unwrap()),
            _ => quantize::quantize_q8_0(&x, cast_blocks_mut(out).unwrap()),
        }
        out.to_vec()
    }

    const R16_TYPES: [GgmlType; 5] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
    ];

    /// Random activations of `cols` values (scaled by `scale`) quantized to `BlockQ8x`.
    fn acts(rng: &mut Rng, cols: usize, scale: f32) -> Vec<BlockQ8x> {
        let x: Vec<f32> = (0..cols).map(|_| rng.f32() * scale).collect();
        let mut a = vec![
            BlockQ8x {
                d: 0.0,
                s: 0.0,
                qs: [0; 32]
            };
            cols / 32
        ];
        quantize_q8x(&x, &mut a);
        a
    }

    #[test]
    fn repacked_rows_compute_the_original_dot_products() {
        let mut rng = Rng::new(5);
        for ty in R16_TYPES {
            let (rows, cols) = (32, 96);
            let bytes = matrix(ty, rows, cols, &mut rng);
            let w = WeightRef {
                ty,
                data: &bytes,
                n_rows: rows,
                n_cols: cols,
            };
            let rp = repack(w).unwrap().unwrap();
            let a = acts(&mut rng, cols, 2.0);
            let mut deq = vec![0.0f32; cols];
            for g in 0..rows / R16_ROWS {
                let got = gemv_r16_scalar(&rp, g, &a);
                for (r, &gr) in got.iter().enumerate() {
                    crate::matmul::dequantize_row(w, g * R16_ROWS + r, &mut deq).unwrap();
                    let want: f32 = deq
                        .iter()
                        .zip(
                            a.iter()
                                .flat_map(|b| b.qs.iter().map(move |&q| q as f32 * b.d)),
                        )
                        .map(|(w, a)| w * a)
                        .sum();
                    assert!(
                        (gr - want).abs() < 1e-3 * want.abs().max(1.0),
                        "{ty} row {}: {gr} vs {want}",
                        g * R16_ROWS + r,
                    );
                }
            }
        }
    }

    #[test]
    fn simd_r16_gemm_matches_the_scalar_kernel() {
        let mut rng = Rng::new(9);
        let mut fast = 0;
        for ty in R16_TYPES {
            for nb in [1usize, 2, 3, 7, 20] {
                let (rows, cols) = (32, 32 * nb);
                let bytes = matrix(ty, rows, cols, &mut rng);
                let w = WeightRef {
                    ty,
                    data: &bytes,
                    n_rows: rows,
                    n_cols: cols,
                };
                let rp = repack(w).unwrap().unwrap();
                let rows_of_acts: Vec<Vec<BlockQ8x>> =
                    (0..R16_TOKENS).map(|_| acts(&mut rng, cols, 3.0)).collect();
                let refs: [&[BlockQ8x]; R16_TOKENS] =
                    std::array::from_fn(|i| rows_of_acts[i].as_slice());
                for n_act in 1..=R16_TOKENS {
                    for g in 0..rows / R16_ROWS {
                        let group = rp.groups(g..g + 1);
                        let want = gemm_r16_scalar(rp.kind, group, nb, refs, n_act);
                        for isa in crate::Isa::all_available() {
                            let k = crate::Kernels::for_isa(isa).unwrap();
                            if k.r16_preferred {
                                fast += 1;
                            }
                            let got = (k.r16_gemm)(rp.kind, group, nb, refs, n_act);
                            for t in 0..R16_TOKENS {
                                for r in 0..R16_ROWS {
                                    let (gv, wv) = (got[t][r], want[t][r]);
                                    assert!(
                                        (gv - wv).abs() <= 1e-4 * wv.abs().max(1.0),
                                        "{ty} {} nb={nb} t={t} r={r}: {gv} vs {wv}",
                                        isa.name()
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
        let any_fast = crate::Isa::all_available()
            .iter()
            .any(|&i| crate::Kernels::for_isa(i).is_some_and(|k| k.r16_preferred));
        assert_eq!(fast > 0, any_fast);
    }

    #[test]
    fn simd_quantize_q8x_matches_the_reference_exactly() {
        let mut rng = Rng::new(17);
        let blank = BlockQ8x {
            d: 0.0,
            s: 0.0,
            qs: [0; 32],
        };
        for kern in crate::Isa::all_available()
            .into_iter()
            .filter_map(crate::Kernels::for_isa)
        {
            for (nb, scale) in [(1, 1.0), (5, 40.0), (18, 1e-3), (3, 0.0)] {
                let mut x: Vec<f32> = (0..nb * 32).map(|_| rng.f32() * scale).collect();
                if nb > 2 {
                    // ties at .5 after scaling, and a block with one large value
                    x[40] = 127.0 * 0.5 / 3.0;
                    x[64..96].fill(0.25);
                    x[70] = -1000.0;
                }
                let (mut want, mut got) = (vec![blank; nb], vec![blank; nb]);
                quantize_q8x(&x, &mut want);
                (kern.quantize_q8x)(&x, &mut got);
                for (g, w) in got.iter().zip(&want) {
                    assert_eq!((g.d, g.s, g.qs), (w.d, w.s, w.qs), "{:?}", kern.isa);
                }
            }
        }
    }

    #[test]
    fn odd_shapes_are_not_repacked() {
        let bytes = vec![0u8; 8 * 34];
        let w = WeightRef {
            ty: GgmlType::Q8_0,
            data: &bytes,
            n_rows: 8,
            n_cols: 32,
        };
        assert!(repack(w).unwrap().is_none());
        let bytes = vec![0u8; 16 * 144];
        let w = WeightRef {
            ty: GgmlType::Q4_K,
            data: &bytes,
            n_rows: 16,
            n_cols: 256,
        };
        assert!(repack(w).unwrap().is_none());
    }
}
