//! Weights repacked at load into row-interleaved blocks ("R16").
//!
//! Sixteen consecutive rows are interleaved block by block so that SIMD lanes hold *rows*:
//! one 512-bit dot-product instruction (16 lanes of 32 bits) advances sixteen rows by four
//! values each, per-row scales apply as one vector, and no horizontal sums are needed. Every
//! format is brought to one arithmetic: unsigned values `q` (0..=255) in blocks of 32 with a
//! per-row, per-block scale `d` and offset `c`, so that a weight is `d*q + c`:
//!
//! | source | q | d | c |
//! |---|---|---|---|
//! | Q4_0 | nibble (0..15) | d | -8 d |
//! | Q4_1 | nibble | d | m |
//! | Q5_0 | 5 bits (0..31) | d | -16 d |
//! | Q5_1 | 5 bits | d | m |
//! | Q8_0 | value + 128 | d | -128 d |
//! | Q4_K | nibble | d * sc\[j\] | -dmin * m\[j\] |
//! | Q6_K | value + 32 (0..63) | d * sc per 16 values | -32 d sc (in integers) |
//! | TQ1_0, TQ2_0 | trit (0..2) | d | -d |
//!
//! The 32-element formats keep `d` and `c` as f16 (all the `c` above are exact in f16) in a
//! 64-byte header per block (Q8_0 only `d`, 32 bytes); the K-quants keep their super-block header (`d`, `dmin`, the
//! 6- or 8-bit sub-scales) once per unit of eight blocks and form the per-block f32 scales in
//! the kernel, exactly. A repacked matrix takes about the bytes of the original. Against
//! activations quantized to [`BlockQ8x`] (int8 values, f32 scale `da`, `sa = da * sum`, and
//! the integer sums of both halves), one block contributes `d*da*sum(q*a) + c*sa` to its row.
//!
//! Value byte `64k + 4r + i` of a block (k = 0..8, r = 0..16, i = 0..4) is value `4k + i` of
//! row `r`: an activation's bytes `4k..4k+4`, broadcast to all sixteen 32-bit lanes, line up
//! with chunk `k` of every row. 4-bit values pack chunks `k` and `k + 4` into the low and high
//! nibbles of one 64-byte run; 5-bit values add a bit string of 512 fifth bits, 6-bit values
//! 128 bytes of high bit pairs.

use half::f16;

use crate::blocks::*;
use crate::{Error, GgmlType, Result, WeightRef};

/// Rows per interleaved group.
pub const R16_ROWS: usize = 16;
/// Activation rows the R16 kernels take at once (each unpacked weight block serves them all).
pub const R16_TOKENS: usize = 8;

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
    /// Q4_K: units of eight 32-value blocks (one 256-value super-block) sharing a header of
    /// the sixteen rows' `d`, `dmin` (f16), 6-bit scales and mins (one byte each); blocks
    /// packed as `Q4`. Block `j` of a row has `d = d * sc[j]`, `c = -dmin * m[j]`.
    Q4K,
    /// Q6_K: units of eight blocks with a header of `d` (f16) and the sixteen int8 scales of
    /// each row (one per 16 values); values `q + 32` (0..=63) packed as `Q4` low nibbles, then
    /// 128 bytes of the high two bits (byte `j` holds those of value bytes `j`, `j + 128`,
    /// `j + 256`, `j + 384`, from the low bits up).
    Q6K,
    /// Ternary (TQ1_0, TQ2_0): units of eight blocks with a header of the sixteen rows' `d`
    /// (f16; the offset is `-d`), values 0..=2 in two bits: body byte `64p + m` holds value
    /// bytes `64(p + 2l) + m` at bits `2l` (l = 0..4), so one 32-byte load and a shift give
    /// the values of chunks `p`, `p + 2`, `p + 4`, `p + 6` of an oct. 2.0625 bits per
    /// weight, as TQ2_0; TQ1_0 is unpacked from base 3 into it at load. The SIMD kernels
    /// take activations with one scale per unit ([`quantize_q8x_k`]).
    T2,
}

/// The weight types repacked into R16 blocks (those [`R16Kind::for_type`] maps).
pub const R16_TYPES: [GgmlType; 9] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q6_K,
    GgmlType::TQ1_0,
    GgmlType::TQ2_0,
];

impl R16Kind {
    pub fn for_type(ty: GgmlType) -> Option<R16Kind> {
        match ty {
            GgmlType::Q4_0 | GgmlType::Q4_1 => Some(R16Kind::Q4),
            GgmlType::Q5_0 | GgmlType::Q5_1 => Some(R16Kind::Q5),
            GgmlType::Q8_0 => Some(R16Kind::Q8),
            GgmlType::Q4_K => Some(R16Kind::Q4K),
            GgmlType::Q6_K => Some(R16Kind::Q6K),
            GgmlType::TQ1_0 | GgmlType::TQ2_0 => Some(R16Kind::T2),
            _ => None,
        }
    }

    /// 32-value blocks per unit (a unit is one header and its blocks).
    pub fn blocks_per_unit(self) -> usize {
        match self {
            R16Kind::Q4K | R16Kind::Q6K | R16Kind::T2 => QK_K / 32,
            _ => 1,
        }
    }

    /// Header bytes of a unit of sixteen rows.
    pub fn header_bytes(self) -> usize {
        match self {
            R16Kind::Q4 | R16Kind::Q5 => 64,
            // Q8_0's offset is always -128 d: only `d` is stored
            R16Kind::Q8 => 32,
            R16Kind::Q4K => 32 + 32 + 128 + 128,
            R16Kind::Q6K => 32 + 256,
            R16Kind::T2 => 32,
        }
    }

    /// Value bytes of one 32-value block of sixteen rows.
    pub fn body_bytes(self) -> usize {
        match self {
            R16Kind::Q4 | R16Kind::Q4K => 256,
            R16Kind::Q5 => 256 + 64,
            R16Kind::Q6K => 256 + 128,
            R16Kind::Q8 => 512,
            R16Kind::T2 => 128,
        }
    }

    /// Bytes of one unit of sixteen rows.
    pub fn unit_bytes(self) -> usize {
        self.header_bytes() + self.blocks_per_unit() * self.body_bytes()
    }

    /// Bytes of one group of sixteen rows of `nb` 32-value blocks (whole units).
    pub fn group_bytes(self, nb: usize) -> usize {
        nb / self.blocks_per_unit() * self.unit_bytes()
    }

    /// `(unit_bytes, header_bytes, body_bytes, blocks_per_unit)`: what a kernel walking a
    /// group unit by unit needs.
    pub fn layout(self) -> (usize, usize, usize, usize) {
        (
            self.unit_bytes(),
            self.header_bytes(),
            self.body_bytes(),
            self.blocks_per_unit(),
        )
    }
}

/// [`R16Kind`]s as numbers, for the SIMD kernels' const generics.
pub(crate) const KIND_Q4: u8 = 0;
pub(crate) const KIND_Q5: u8 = 1;
pub(crate) const KIND_Q8: u8 = 2;
pub(crate) const KIND_Q4K: u8 = 3;
pub(crate) const KIND_Q6K: u8 = 4;
pub(crate) const KIND_T2: u8 = 5;

/// The kind numbered `k` (see [`KIND_Q4`]).
pub(crate) const fn kind_of(k: u8) -> R16Kind {
    match k {
        KIND_Q4 => R16Kind::Q4,
        KIND_Q5 => R16Kind::Q5,
        KIND_Q8 => R16Kind::Q8,
        KIND_Q4K => R16Kind::Q4K,
        KIND_T2 => R16Kind::T2,
        _ => R16Kind::Q6K,
    }
}

/// The blocks an R16 kernel may use: whole units only, and no further than the group and
/// every activation row reach.
pub(crate) fn usable_blocks(kind: R16Kind, group: &[u8], nb: usize, acts: &[&[BlockQ8x]]) -> usize {
    let bpu = kind.blocks_per_unit();
    acts.iter()
        .fold(nb.min(group.len() / kind.unit_bytes() * bpu), |n, a| {
            n.min(a.len())
        })
        / bpu
        * bpu
}

/// Activation block for repacked weights: f32 scale and sums, as exact as the int8 values.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ8x {
    /// The scale, rounded to f16 precision as in Q8_0/Q8_1.
    pub d: f32,
    /// `d * sum(qs)`.
    pub s: f32,
    /// `sum(qs[..16])` and `sum(qs[16..])` (Q6_K scales the halves of a block separately
    /// and takes its offset off in integers).
    pub sums: [i16; 2],
    pub qs: [i8; 32],
}

const _: () = assert!(std::mem::size_of::<BlockQ8x>() == 44);
// SAFETY: repr(C), two f32, two i16 and 32 i8: no padding, every bit pattern valid.
unsafe impl Pod for BlockQ8x {}

/// Quantizes activations to [`BlockQ8x`] (the values and scale of Q8_0). The values are
/// taken against the scale as rounded to f16, so they are exact for it, and kept within
/// -127..=127 (a block whose scale is an f16 subnormal, `amax` below about 2e-3, would
/// otherwise round past 127); the SIMD kernels rely on that range.
pub fn quantize_q8x(x: &[f32], y: &mut [BlockQ8x]) {
    for (x, b) in x.chunks_exact(32).zip(y.iter_mut()) {
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = f16::from_f32(amax / 127.0).to_f32();
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sums = [0i32; 2];
        for (i, (q, &v)) in b.qs.iter_mut().zip(x).enumerate() {
            let r = crate::quant::quantize::nearest_int(v * id).clamp(-127, 127);
            *q = r as i8;
            sums[i / 16] += r;
        }
        b.d = d;
        b.s = d * (sums[0] + sums[1]) as f32;
        b.sums = sums.map(|v| v as i16);
    }
}

/// Activations to [`BlockQ8x`] with Q8_K's values and scale: one f32 scale per 256 values,
/// set by the signed value of largest magnitude, which maps to -127
/// ([`crate::quant::quantize::quantize_q8k`], llama.cpp's `quantize_row_q8_K`); each of the
/// eight 32-value blocks carries that scale. The ternary kind takes its activations so, as
/// llama.cpp's TQ1_0/TQ2_0 dot products take Q8_K, so that its results follow llama.cpp's
/// rounding rather than adding another. `x.len()` is a multiple of 256.
pub fn quantize_q8x_k(x: &[f32], y: &mut [BlockQ8x]) {
    let mut k = [zeroed::<BlockQ8K>()];
    for (x, y) in x.chunks_exact(QK_K).zip(y.chunks_exact_mut(QK_K / 32)) {
        crate::quant::quantize::quantize_q8k(x, &mut k);
        for (j, b) in y.iter_mut().enumerate() {
            b.qs.copy_from_slice(&k[0].qs[32 * j..32 * j + 32]);
            b.sums = [k[0].bsums[2 * j], k[0].bsums[2 * j + 1]];
            b.d = k[0].d;
            b.s = b.d * (b.sums[0] as i32 + b.sums[1] as i32) as f32;
        }
    }
}

/// Tokens in a ternary activation tile ([`t2_tile`]).
pub const T2_TILE_TOKENS: usize = 8;
const _: () = assert!(T2_TILE_TOKENS == R16_TOKENS);

/// Bytes of one 256-column unit of a ternary activation tile: the eight tokens' values
/// block by block (`[block][token][32]`, i8), then per token the unit's scale `d` and its
/// `d * sum(qs)` (`[f32; 8]` each).
pub const T2_TILE_UNIT_BYTES: usize = QK_K / 32 * T2_TILE_TOKENS * 32 + 2 * 4 * T2_TILE_TOKENS;

/// Writes eight activation rows of `nb` blocks each (`acts`, token after token, from
/// [`quantize_q8x_k`]) as one tile for [`crate::dispatch::R16T2TilesFn`]: `nb / 8` units
/// of [`T2_TILE_UNIT_BYTES`] into `tile`. The ternary prompt kernel reads the eight
/// tokens' values from one pointer and each unit's scale and offset sum ready-made.
///
/// # Errors
/// [`Error::Shape`] when `nb` is not whole units or the slices are too short.
pub fn t2_tile(acts: &[BlockQ8x], nb: usize, tile: &mut [u8]) -> Result<()> {
    let bpu = R16Kind::T2.blocks_per_unit();
    let n_units = nb / bpu;
    if !nb.is_multiple_of(bpu)
        || acts.len() < T2_TILE_TOKENS * nb
        || tile.len() < n_units * T2_TILE_UNIT_BYTES
    {
        return Err(Error::Shape {
            op: "t2_tile",
            expected: format!("{T2_TILE_TOKENS} rows of {nb} blocks (whole units of {bpu})"),
            got: format!("{} blocks, {} tile bytes", acts.len(), tile.len()),
        });
    }
    let values = bpu * T2_TILE_TOKENS * 32;
    for (u, unit) in tile
        .chunks_exact_mut(T2_TILE_UNIT_BYTES)
        .take(n_units)
        .enumerate()
    {
        let (qs, scales) = unit.split_at_mut(values);
        for t in 0..T2_TILE_TOKENS {
            let row = &acts[t * nb + u * bpu..t * nb + (u + 1) * bpu];
            for (j, b) in row.iter().enumerate() {
                let o = (j * T2_TILE_TOKENS + t) * 32;
                for (d, &q) in qs[o..o + 32].iter_mut().zip(&b.qs) {
                    *d = q as u8;
                }
            }
            let sa: f32 = row.iter().map(|b| b.s).sum();
            scales[4 * t..4 * t + 4].copy_from_slice(&row[0].d.to_le_bytes());
            let o = 4 * (T2_TILE_TOKENS + t);
            scales[o..o + 4].copy_from_slice(&sa.to_le_bytes());
        }
    }
    Ok(())
}

/// For a [`crate::dispatch::R16T2TilesFn`] given `group` (`nb` blocks), `tiles` and an
/// output of `n_out` rows: the whole units' blocks the group holds, and the output rows
/// (eight per tile) that `tiles` and `n_out` both hold.
pub fn t2_tiles_checked(group: &[u8], nb: usize, tiles: &[u8], n_out: usize) -> (usize, usize) {
    let kind = R16Kind::T2;
    let bpu = kind.blocks_per_unit();
    let n_units = (nb / bpu).min(group.len() / kind.unit_bytes());
    let n_tiles = match n_units {
        0 => n_out / T2_TILE_TOKENS,
        n => (tiles.len() / (n * T2_TILE_UNIT_BYTES)).min(n_out / T2_TILE_TOKENS),
    };
    (n_units * bpu, n_tiles * T2_TILE_TOKENS)
}

/// Scalar [`crate::dispatch::R16T2TilesFn`]: the reference of the tile kernels, per unit
/// as they compute (`d * da * sum(q * a) - d * sa` per row, token and unit, `q` the stored
/// 0..=2). Output rows past what `t2_tiles_checked` allows are left as they are.
pub fn gemm_t2_tiles_scalar(group: &[u8], nb: usize, tiles: &[u8], out: &mut [[f32; R16_ROWS]]) {
    let kind = R16Kind::T2;
    let (nb, n) = t2_tiles_checked(group, nb, tiles, out.len());
    let (ub, hb, bb, bpu) = kind.layout();
    let n_units = nb / bpu;
    let values = bpu * T2_TILE_TOKENS * 32;
    let f32_at = |b: &[u8], o: usize| f32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    for (i, o) in out[..n].chunks_exact_mut(T2_TILE_TOKENS).enumerate() {
        let tile = &tiles[i * n_units * T2_TILE_UNIT_BYTES..];
        o.iter_mut().for_each(|r| r.fill(0.0));
        for u in 0..n_units {
            let unit = &group[u * ub..(u + 1) * ub];
            let at = &tile[u * T2_TILE_UNIT_BYTES..(u + 1) * T2_TILE_UNIT_BYTES];
            for r in 0..R16_ROWS {
                let d = f16::from_le_bytes([unit[2 * r], unit[2 * r + 1]]).to_f32();
                for (t, o) in o.iter_mut().enumerate() {
                    let mut isum = 0i32;
                    for j in 0..bpu {
                        let body = &unit[hb + j * bb..hb + (j + 1) * bb];
                        let a = &at[(j * T2_TILE_TOKENS + t) * 32..][..32];
                        for (i, &a) in a.iter().enumerate() {
                            let q = value(kind, body, 64 * (i / 4) + 4 * r + i % 4);
                            isum += q as i32 * a as i8 as i32;
                        }
                    }
                    let da = f32_at(at, values + 4 * t);
                    let sa = f32_at(at, values + 4 * (T2_TILE_TOKENS + t));
                    o[r] += d * da * isum as f32 - d * sa;
                }
            }
        }
    }
}

/// A weight matrix repacked into R16 units: `n_rows / 16` groups of `n_cols / 32` blocks.
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

/// Writes one block's values (`vals[64k + 4r + i]` = value `4k + i` of row `r`) in `kind`'s
/// packing.
fn pack_body(kind: R16Kind, vals: &[u8; 512], body: &mut [u8]) {
    match kind {
        R16Kind::Q8 => body.copy_from_slice(vals),
        R16Kind::T2 => {
            body.fill(0);
            for (j, &v) in vals.iter().enumerate() {
                let (k, m) = (j / 64, j % 64);
                body[64 * (k % 2) + m] |= (v & 3) << (2 * (k / 2));
            }
        }
        _ => {
            for j in 0..256 {
                body[j] = (vals[j] & 0xF) | ((vals[j + 256] & 0xF) << 4);
            }
            let high = &mut body[256..];
            high.fill(0);
            match kind {
                R16Kind::Q5 => {
                    for (j, &v) in vals.iter().enumerate() {
                        high[j / 8] |= ((v >> 4) & 1) << (j % 8);
                    }
                }
                R16Kind::Q6K => {
                    for (j, &v) in vals.iter().enumerate() {
                        high[j % 128] |= ((v >> 4) & 3) << (2 * (j / 128));
                    }
                }
                _ => {}
            }
        }
    }
}

/// Fills one unit (header and blocks) of sixteen rows from the source rows' super-block or
/// block `u`.
fn pack_unit(w: &WeightRef<'_>, kind: R16Kind, g: usize, u: usize, dst: &mut [u8]) -> Result<()> {
    let ts = w.ty.type_size();
    let (hb, bb) = (kind.header_bytes(), kind.body_bytes());
    let mut vals = vec![[0u8; 512]; kind.blocks_per_unit()];
    let mis = || Error::Misaligned {
        op: "repack",
        ty: w.ty,
    };
    let mut put = |j: usize, r: usize, q: &[u8]| {
        for (i, &v) in q.iter().enumerate() {
            vals[j][64 * (i / 4) + 4 * r + i % 4] = v;
        }
    };
    for r in 0..R16_ROWS {
        let src = &w.row(g * R16_ROWS + r)[u * ts..(u + 1) * ts];
        match kind {
            R16Kind::Q4K => {
                let b: &BlockQ4K = cast_blocks(src).and_then(|b| b.first()).ok_or(mis())?;
                dst[2 * r..2 * r + 2].copy_from_slice(&b.d.to_le_bytes());
                dst[32 + 2 * r..34 + 2 * r].copy_from_slice(&b.dmin.to_le_bytes());
                let (sc, m) = crate::quant::dequant::unpack_scales_k4(&b.scales);
                for j in 0..8 {
                    dst[64 + 16 * j + r] = sc[j];
                    dst[192 + 16 * j + r] = m[j];
                }
                for c in 0..4 {
                    let lo: [u8; 32] = std::array::from_fn(|l| b.qs[32 * c + l] & 0xF);
                    let hi: [u8; 32] = std::array::from_fn(|l| b.qs[32 * c + l] >> 4);
                    put(2 * c, r, &lo);
                    put(2 * c + 1, r, &hi);
                }
            }
            R16Kind::Q6K => {
                let b: &BlockQ6K = cast_blocks(src).and_then(|b| b.first()).ok_or(mis())?;
                dst[2 * r..2 * r + 2].copy_from_slice(&b.d.to_le_bytes());
                for (s, &sc) in b.scales.iter().enumerate() {
                    dst[32 + 16 * s + r] = sc as u8;
                }
                let q = crate::quant::dequant::unpack_q6k(b);
                for j in 0..8 {
                    let v: [u8; 32] = std::array::from_fn(|i| (q[32 * j + i] + 32) as u8);
                    put(j, r, &v);
                }
            }
            R16Kind::T2 => {
                let (q, d) = crate::quant::dequant::ternary_block(w.ty, src).ok_or(mis())?;
                dst[2 * r..2 * r + 2].copy_from_slice(&d.to_le_bytes());
                for j in 0..8 {
                    put(j, r, &q[32 * j..32 * j + 32]);
                }
            }
            _ => {
                let (q, d, c) = unify(w.ty, src);
                dst[2 * r..2 * r + 2].copy_from_slice(&d.to_le_bytes());
                if kind != R16Kind::Q8 {
                    dst[32 + 2 * r..32 + 2 * r + 2].copy_from_slice(&c.to_le_bytes());
                }
                put(0, r, &q);
            }
        }
    }
    for (j, v) in vals.iter().enumerate() {
        pack_body(kind, v, &mut dst[hb + j * bb..hb + (j + 1) * bb]);
    }
    Ok(())
}

/// Repacks a weight matrix; `None` when its type has no R16 form or its rows do not come in
/// groups of sixteen.
pub fn repack(w: WeightRef<'_>) -> Result<Option<Repacked>> {
    repack_releasing(w, &mut |_, _| {})
}

/// [`repack`], calling `done(offset, len)` for each run of source bytes (offsets into
/// `w.data`, about 1 MiB at a time) as soon as it has been read for the last time, so the
/// caller can let the OS drop those pages while the rest is repacked.
pub fn repack_releasing(
    w: WeightRef<'_>,
    done: &mut dyn FnMut(usize, usize),
) -> Result<Option<Repacked>> {
    let Some(kind) = R16Kind::for_type(w.ty) else {
        return Ok(None);
    };
    if !w.n_rows.is_multiple_of(R16_ROWS) || !w.n_cols.is_multiple_of(w.ty.block_size()) {
        return Ok(None);
    }
    if w.data.len() != w.row_bytes() * w.n_rows {
        return Err(Error::Shape {
            op: "repack",
            expected: (w.row_bytes() * w.n_rows).to_string(),
            got: w.data.len().to_string(),
        });
    }
    let nu = w.n_cols / w.ty.block_size();
    let ub = kind.unit_bytes();
    let mut data = AlignedBuf::new();
    data.resize(w.n_rows / R16_ROWS * nu * ub);
    let out = data.as_mut_slice();
    let group_src = R16_ROWS * w.row_bytes();
    let per_release = (1 << 20) / group_src.max(1) + 1;
    let mut released = 0;
    for g in 0..w.n_rows / R16_ROWS {
        for u in 0..nu {
            pack_unit(
                &w,
                kind,
                g,
                u,
                &mut out[(g * nu + u) * ub..(g * nu + u + 1) * ub],
            )?;
        }
        let read = (g + 1) * group_src;
        if (g + 1) % per_release == 0 || read == w.data.len() {
            done(released, read - released);
            released = read;
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
    pub fn bytes(&self) -> usize {
        self.data.as_slice().len()
    }

    /// The raw units of row groups `groups`.
    pub(crate) fn groups(&self, groups: std::ops::Range<usize>) -> &[u8] {
        let k = self.kind;
        let gb = k.group_bytes(self.n_cols / 32);
        &self.data.as_slice()[groups.start * gb..groups.end * gb]
    }
}

impl Repacked {
    /// Row `r` as f32 (`n_cols` values), for the embedding lookup of a tied output matrix
    /// (so the original pages need not stay resident).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) -> Result<()> {
        if r >= self.n_rows || out.len() != self.n_cols {
            return Err(Error::Shape {
                op: "dequantize_row",
                expected: format!("row < {} of {} values", self.n_rows, self.n_cols),
                got: format!("row {r} of {} values", out.len()),
            });
        }
        let k = self.kind;
        let (ub, bpu, hb, bb) = (
            k.unit_bytes(),
            k.blocks_per_unit(),
            k.header_bytes(),
            k.body_bytes(),
        );
        let (group, lane) = (self.groups(r / R16_ROWS..r / R16_ROWS + 1), r % R16_ROWS);
        for (b, dst) in out.chunks_exact_mut(32).enumerate() {
            let unit = &group[(b / bpu) * ub..(b / bpu + 1) * ub];
            let j = b % bpu;
            let body = &unit[hb + j * bb..];
            let (scale, offset) = row_scales(k, unit, j, lane);
            for (i, o) in dst.iter_mut().enumerate() {
                let q = value(k, body, 64 * (i / 4) + 4 * lane + i % 4) as f32;
                *o = scale[i / 16] * q + offset[i / 16];
            }
        }
        Ok(())
    }
}

/// Row `r`'s weights in block `j` of a unit: `scale[h] * q + offset[h]` for the value halves
/// `h` (0..16, 16..32).
fn row_scales(kind: R16Kind, unit: &[u8], j: usize, r: usize) -> ([f32; 2], [f32; 2]) {
    let f16_at = |at: usize| f16::from_le_bytes([unit[at], unit[at + 1]]).to_f32();
    let d = f16_at(2 * r);
    match kind {
        R16Kind::Q4K => {
            let (sc, m) = (unit[64 + 16 * j + r] as f32, unit[192 + 16 * j + r] as f32);
            let c = -f16_at(32 + 2 * r) * m;
            ([d * sc; 2], [c; 2])
        }
        R16Kind::Q6K => {
            let da = d * unit[32 + 16 * (2 * j) + r] as i8 as f32;
            let db = d * unit[32 + 16 * (2 * j + 1) + r] as i8 as f32;
            ([da, db], [-32.0 * da, -32.0 * db])
        }
        R16Kind::Q8 => ([d; 2], [-128.0 * d; 2]),
        R16Kind::T2 => ([d; 2], [-d; 2]),
        _ => ([d; 2], [f16_at(32 + 2 * r); 2]),
    }
}

/// Value byte `j` (0..512, in the interleaved order) of one block's packed values.
fn value(kind: R16Kind, body: &[u8], j: usize) -> u8 {
    let low = |j: usize| (body[j % 256] >> (4 * (j / 256))) & 0xF;
    match kind {
        R16Kind::Q8 => body[j],
        R16Kind::Q4 | R16Kind::Q4K => low(j),
        R16Kind::Q5 => low(j) | (((body[256 + j / 8] >> (j % 8)) & 1) << 4),
        R16Kind::Q6K => low(j) | (((body[256 + j % 128] >> (2 * (j / 128))) & 3) << 4),
        R16Kind::T2 => (body[64 * (j / 64 % 2) + j % 64] >> (2 * (j / 128))) & 3,
    }
}

/// Scalar reference: the sixteen rows of group `g` against one activation row.
pub fn gemv_r16_scalar(w: &Repacked, g: usize, a: &[BlockQ8x]) -> [f32; R16_ROWS] {
    let nb = w.n_cols / 32;
    gemm_r16_scalar(w.kind, w.groups(g..g + 1), nb, [a; R16_TOKENS], 1)[0]
}

/// Scalar [`crate::dispatch::R16GemmFn`]: block by block, each row's values and scales are
/// read once and dotted with every activation row.
pub fn gemm_r16_scalar(
    kind: R16Kind,
    group: &[u8],
    nb: usize,
    acts: [&[BlockQ8x]; R16_TOKENS],
    n_act: usize,
) -> [[f32; R16_ROWS]; R16_TOKENS] {
    let n_act = n_act.min(R16_TOKENS);
    let nb = usable_blocks(kind, group, nb, &acts[..n_act]);
    let (ub, hb, bb, bpu) = kind.layout();
    let mut out = [[0.0f32; R16_ROWS]; R16_TOKENS];
    for b in 0..nb {
        let (u, j) = (b / bpu, b % bpu);
        let unit = &group[u * ub..(u + 1) * ub];
        let body = &unit[hb + j * bb..hb + (j + 1) * bb];
        for r in 0..R16_ROWS {
            let q: [u8; 32] =
                std::array::from_fn(|i| value(kind, body, 64 * (i / 4) + 4 * r + i % 4));
            let (scale, offset) = row_scales(kind, unit, j, r);
            for (o, a) in out.iter_mut().zip(&acts).take(n_act) {
                o[r] += block_row_dot(kind, &q, scale, offset, &a[b]);
            }
        }
    }
    out
}

/// One row's share of a block: its 32 values `q` (unified, 0..=255) with the block's
/// `scale` and `offset` per sixteen-value half, against one activation block.
fn block_row_dot(
    kind: R16Kind,
    q: &[u8; 32],
    scale: [f32; 2],
    offset: [f32; 2],
    ab: &BlockQ8x,
) -> f32 {
    let (mut lo, mut hi) = (0i32, 0i32);
    for (i, (&q, &a)) in q.iter().zip(&ab.qs).enumerate() {
        let p = q as i32 * a as i32;
        if i < 16 {
            lo += p;
        } else {
            hi += p;
        }
    }
    if kind == R16Kind::Q6K {
        // values are q + 32: the offset comes off in integers, exactly
        let lo = lo - 32 * ab.sums[0] as i32;
        let hi = hi - 32 * ab.sums[1] as i32;
        return ab.d * (scale[0] * lo as f32 + scale[1] * hi as f32);
    }
    // one scale and offset for the whole block
    scale[0] * ab.d * (lo + hi) as f32 + offset[0] * ab.s
}

/// Row `r` of `w` dequantized, dotted with the dequantized activations `a` (test reference).
#[cfg(test)]
pub(crate) fn dequantized_dot(w: WeightRef<'_>, r: usize, a: &[BlockQ8x]) -> f32 {
    let mut deq = vec![0.0f32; w.n_cols];
    crate::matmul::dequantize_row(w, r, &mut deq).unwrap();
    let acts = a
        .iter()
        .flat_map(|b| b.qs.iter().map(move |&q| q as f32 * b.d));
    deq.iter().zip(acts).map(|(w, a)| w * a).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::quantize;
    use crate::quant::tests::Rng;

    fn matrix(ty: GgmlType, rows: usize, cols: usize, rng: &mut Rng) -> Vec<u8> {
        let x: Vec<f32> = (0..rows * cols).map(|_| rng.f32()).collect();
        let mut buf = AlignedBuf::new();
        buf.resize(rows * cols / ty.block_size() * ty.type_size());
        let out = buf.as_mut_slice();
        let small = |rng: &mut Rng| f16::from_f32(rng.f32().abs() * 0.01 + 1e-3);
        match ty {
            // no quantizer for these: random bytes with sane super-block scales
            GgmlType::Q4_K => {
                out.copy_from_slice(&rng.bytes(out.len()));
                for b in cast_blocks_mut::<BlockQ4K>(out).unwrap() {
                    (b.d, b.dmin) = (small(rng), small(rng));
                }
            }
            GgmlType::Q6_K => {
                out.copy_from_slice(&rng.bytes(out.len()));
                for b in cast_blocks_mut::<BlockQ6K>(out).unwrap() {
                    b.d = small(rng);
                }
            }
            GgmlType::Q4_0 => quantize::quantize_q4_0(&x, cast_blocks_mut(out).unwrap()),
            GgmlType::Q4_1 => quantize::quantize_q4_1(&x, cast_blocks_mut(out).unwrap()),
            GgmlType::Q5_0 => quantize::quantize_q5_0(&x, cast_blocks_mut(out).unwrap()),
            GgmlType::Q5_1 => quantize::quantize_q5_1(&x, cast_blocks_mut(out).unwrap()),
            GgmlType::TQ1_0 => quantize::quantize_tq1_0(&x, cast_blocks_mut(out).unwrap()),
            GgmlType::TQ2_0 => quantize::quantize_tq2_0(&x, cast_blocks_mut(out).unwrap()),
            _ => quantize::quantize_q8_0(&x, cast_blocks_mut(out).unwrap()),
        }
        out.to_vec()
    }

    /// Random activations of `cols` values (scaled by `scale`) quantized to `BlockQ8x`.
    fn acts(rng: &mut Rng, cols: usize, scale: f32) -> Vec<BlockQ8x> {
        acts_for(R16Kind::Q4, rng, cols, scale)
    }

    /// [`acts`] as `kind`'s kernels take them (the ternary kind: one scale per 256 values).
    fn acts_for(kind: R16Kind, rng: &mut Rng, cols: usize, scale: f32) -> Vec<BlockQ8x> {
        let x: Vec<f32> = (0..cols).map(|_| rng.f32() * scale).collect();
        let mut a = vec![
            BlockQ8x {
                d: 0.0,
                s: 0.0,
                sums: [0; 2],
                qs: [0; 32]
            };
            cols / 32
        ];
        match kind {
            R16Kind::T2 => quantize_q8x_k(&x, &mut a),
            _ => quantize_q8x(&x, &mut a),
        }
        a
    }

    /// A view of `bytes` as a matrix and its repacked form.
    fn weight_and_repacked(
        ty: GgmlType,
        bytes: &[u8],
        rows: usize,
        cols: usize,
    ) -> (WeightRef<'_>, Repacked) {
        let w = WeightRef {
            ty,
            data: bytes,
            n_rows: rows,
            n_cols: cols,
        };
        (w, repack(w).unwrap().unwrap())
    }

    #[test]
    fn repacked_rows_compute_the_original_dot_products() {
        let mut rng = Rng::new(5);
        for ty in R16_TYPES {
            let (rows, cols) = (32, 3 * ty.block_size());
            let bytes = matrix(ty, rows, cols, &mut rng);
            let (w, rp) = weight_and_repacked(ty, &bytes, rows, cols);
            let a = acts(&mut rng, cols, 2.0);
            for g in 0..rows / R16_ROWS {
                let got = gemv_r16_scalar(&rp, g, &a);
                for (r, &gr) in got.iter().enumerate() {
                    let want = dequantized_dot(w, g * R16_ROWS + r, &a);
                    assert!(
                        (gr - want).abs() < 1e-3 * want.abs().max(1.0),
                        "{ty} row {}: {gr} vs {want}",
                        g * R16_ROWS + r,
                    );
                }
            }
        }
    }

    /// A level's results for one group: the packed kernel's, and the unpack-once kernel's
    /// where the level has one.
    fn every_form(
        k: &crate::Kernels,
        kind: R16Kind,
        group: &[u8],
        nb: usize,
        acts: [&[BlockQ8x]; R16_TOKENS],
        n_act: usize,
    ) -> Vec<(&'static str, [[f32; R16_ROWS]; R16_TOKENS])> {
        let mut out = vec![("packed", (k.r16_gemm)(kind, group, nb, acts, n_act))];
        if let Some(u) = k.r16_unpacked {
            let mut buf = AlignedBuf::new();
            assert_eq!((u.unpack)(kind, group, nb, &mut buf), nb);
            out.push(("unpacked", (u.gemm)(kind, buf.as_slice(), nb, acts, n_act)));
        }
        // the ternary tile kernels take exactly eight tokens, in whole units
        let bpu = R16Kind::T2.blocks_per_unit();
        if kind == R16Kind::T2 && n_act == T2_TILE_TOKENS && nb.is_multiple_of(bpu) {
            let rows: Vec<BlockQ8x> = acts.iter().flat_map(|a| a[..nb].to_vec()).collect();
            let mut tile = vec![0u8; nb / bpu * T2_TILE_UNIT_BYTES];
            t2_tile(&rows, nb, &mut tile).unwrap();
            let tiles_fns: [(&'static str, Option<crate::dispatch::R16T2TilesFn>); 2] = [
                ("tiles (scalar)", Some(gemm_t2_tiles_scalar)),
                ("tiles", k.r16_t2_tiles),
            ];
            for (form, f) in tiles_fns {
                let Some(f) = f else { continue };
                let mut res = [[f32::NAN; R16_ROWS]; R16_TOKENS];
                f(group, nb, &tile, &mut res);
                out.push((form, res));
            }
        }
        out
    }

    /// The first `n_act` token rows of two R16 kernel outputs agree within 1e-4 (relative,
    /// or absolute below 1).
    fn assert_outputs_close(
        got: &[[f32; R16_ROWS]; R16_TOKENS],
        want: &[[f32; R16_ROWS]; R16_TOKENS],
        n_act: usize,
        what: impl Fn() -> String,
    ) {
        for t in 0..n_act {
            for r in 0..R16_ROWS {
                let (gv, wv) = (got[t][r], want[t][r]);
                assert!(
                    (gv - wv).abs() <= 1e-4 * wv.abs().max(1.0),
                    "{} t={t} r={r}: {gv} vs {wv}",
                    what()
                );
            }
        }
    }

    #[test]
    fn simd_r16_gemm_matches_the_scalar_kernel() {
        let mut rng = Rng::new(9);
        let mut fast = 0;
        for ty in R16_TYPES {
            for nb in [1usize, 2, 3, 7, 20] {
                let (rows, cols) = (32, ty.block_size() * nb);
                let nb = cols / 32;
                let bytes = matrix(ty, rows, cols, &mut rng);
                let (_, rp) = weight_and_repacked(ty, &bytes, rows, cols);
                let rows_of_acts: Vec<Vec<BlockQ8x>> = (0..R16_TOKENS)
                    .map(|_| acts_for(rp.kind, &mut rng, cols, 3.0))
                    .collect();
                let refs: [&[BlockQ8x]; R16_TOKENS] =
                    std::array::from_fn(|i| rows_of_acts[i].as_slice());
                for n_act in 1..=R16_TOKENS {
                    for g in 0..rows / R16_ROWS {
                        let group = rp.groups(g..g + 1);
                        let want = gemm_r16_scalar(rp.kind, group, nb, refs, n_act);
                        for k in crate::Kernels::all_variants() {
                            if k.r16_preferred {
                                fast += 1;
                            }
                            for (form, got) in every_form(&k, rp.kind, group, nb, refs, n_act) {
                                assert_outputs_close(&got, &want, R16_TOKENS, || {
                                    format!("{ty} {} {form} nb={nb}", k.name)
                                });
                            }
                        }
                    }
                }
                // the one-token form over both groups at once
                for k in crate::Kernels::all_variants() {
                    let Some(gemv) = k.r16_gemv else { continue };
                    let mut out = vec![f32::NAN; rows];
                    gemv(
                        rp.kind,
                        rp.groups(0..rows / R16_ROWS),
                        nb,
                        refs[0],
                        &mut out,
                    );
                    for (g, got) in out.chunks_exact(R16_ROWS).enumerate() {
                        let group = rp.groups(g..g + 1);
                        let want = gemm_r16_scalar(rp.kind, group, nb, refs, 1)[0];
                        let mut got_rows = [[0.0f32; R16_ROWS]; R16_TOKENS];
                        got_rows[0].copy_from_slice(got);
                        let mut want_rows = [[0.0f32; R16_ROWS]; R16_TOKENS];
                        want_rows[0] = want;
                        assert_outputs_close(&got_rows, &want_rows, 1, || {
                            format!("{ty} {} gemv group {g} nb={nb}", k.name)
                        });
                    }
                }
            }
        }
        let any_fast = crate::Kernels::all_variants()
            .iter()
            .any(|k| k.r16_preferred);
        assert_eq!(fast > 0, any_fast);
    }

    /// A prompt's product against ternary matrices (the tile kernel for whole tiles of
    /// eight tokens, the packed kernel for the rest) matches the scalar level's, two
    /// matrices at once, for token counts around the tile size.
    #[test]
    fn ternary_prompt_products_match_the_scalar_level() {
        let mut rng = Rng::new(12);
        let pool = crate::ThreadPool::new(2);
        let cols = 2 * QK_K;
        for ty in [GgmlType::TQ1_0, GgmlType::TQ2_0] {
            let (b1, b2) = (
                matrix(ty, 32, cols, &mut rng),
                matrix(ty, 48, cols, &mut rng),
            );
            let (_, r1) = weight_and_repacked(ty, &b1, 32, cols);
            let (_, r2) = weight_and_repacked(ty, &b2, 48, cols);
            for n_tok in [1, 7, 8, 13, 19, 32] {
                let x: Vec<f32> = (0..n_tok * cols).map(|_| rng.f32() * 2.0).collect();
                let run = |k: &crate::Kernels| {
                    let (mut o1, mut o2) = (vec![f32::NAN; n_tok * 32], vec![f32::NAN; n_tok * 48]);
                    let mut scratch = AlignedBuf::new();
                    let mut mats = [(&r1, &mut o1[..]), (&r2, &mut o2[..])];
                    crate::matmul::matmul_repacked_many(k, &pool, &mut mats, &x, &mut scratch)
                        .unwrap();
                    [o1, o2].concat()
                };
                let want = run(&crate::Kernels::SCALAR);
                for k in crate::Kernels::all_variants() {
                    for (i, (g, w)) in run(&k).iter().zip(&want).enumerate() {
                        assert!(
                            (g - w).abs() <= 1e-4 * w.abs().max(1.0),
                            "{ty} {} n_tok={n_tok} output {i}: {g} vs {w}",
                            k.name
                        );
                    }
                }
            }
        }
    }

    /// A matrix whose every byte is `fill`, with small finite scales: the extremes of each
    /// format's value range (all 15 for 4-bit, 31 for 5-bit, 63 for Q6_K, -128 or 127 for
    /// Q8_0, +1 for the ternary types: TQ2_0 takes `fill & 0xAA`, as 3 is no trit).
    fn filled_matrix(ty: GgmlType, rows: usize, cols: usize, fill: u8) -> Vec<u8> {
        let mut buf = AlignedBuf::new();
        buf.resize(rows * cols / ty.block_size() * ty.type_size());
        let out = buf.as_mut_slice();
        out.fill(if ty == GgmlType::TQ2_0 {
            fill & 0xAA
        } else {
            fill
        });
        let (d, m) = (f16::from_f32(0.01), f16::from_f32(-0.05));
        match ty {
            GgmlType::Q4_0 => cast_blocks_mut::<BlockQ4_0>(out)
                .unwrap()
                .iter_mut()
                .for_each(|b| b.d = d),
            GgmlType::Q4_1 => cast_blocks_mut::<BlockQ4_1>(out)
                .unwrap()
                .iter_mut()
                .for_each(|b| (b.d, b.m) = (d, m)),
            GgmlType::Q5_0 => cast_blocks_mut::<BlockQ5_0>(out)
                .unwrap()
                .iter_mut()
                .for_each(|b| b.d = d),
            GgmlType::Q5_1 => cast_blocks_mut::<BlockQ5_1>(out)
                .unwrap()
                .iter_mut()
                .for_each(|b| (b.d, b.m) = (d, m)),
            GgmlType::Q8_0 => cast_blocks_mut::<BlockQ8_0>(out)
                .unwrap()
                .iter_mut()
                .for_each(|b| b.d = d),
            GgmlType::Q4_K => cast_blocks_mut::<BlockQ4K>(out)
                .unwrap()
                .iter_mut()
                .for_each(|b| (b.d, b.dmin) = (d, d)),
            GgmlType::TQ1_0 => cast_blocks_mut::<BlockTQ1_0>(out)
                .unwrap()
                .iter_mut()
                .for_each(|b| b.d = d),
            GgmlType::TQ2_0 => cast_blocks_mut::<BlockTQ2_0>(out)
                .unwrap()
                .iter_mut()
                .for_each(|b| b.d = d),
            _ => cast_blocks_mut::<BlockQ6K>(out)
                .unwrap()
                .iter_mut()
                .for_each(|b| b.d = d),
        }
        out.to_vec()
    }

    /// Regression guard for the 16-bit partial sums of the AVX2 kernel: the largest values
    /// of every format against activations of +-127 in every position must not overflow.
    #[test]
    fn r16_gemm_at_the_extremes_of_every_format() {
        let cols = 512;
        let nb = cols / 32;
        let signs: [fn(usize) -> f32; 4] = [
            |_| 1.0,
            |_| -1.0,
            |i| if i % 2 == 0 { 1.0 } else { -1.0 },
            |i| if (i / 4) % 3 == 0 { -1.0 } else { 1.0 },
        ];
        for ty in R16_TYPES {
            let kind = R16Kind::for_type(ty).unwrap();
            let rows_of_acts: Vec<Vec<BlockQ8x>> = (0..R16_TOKENS)
                .map(|t| {
                    let x: Vec<f32> = (0..cols).map(|i| signs[t % 4](i)).collect();
                    let mut a = acts(&mut Rng::new(1), cols, 1.0);
                    match kind {
                        R16Kind::T2 => quantize_q8x_k(&x, &mut a),
                        _ => quantize_q8x(&x, &mut a),
                    }
                    assert!(a[0].qs.iter().all(|q| q.abs() == 127));
                    a
                })
                .collect();
            let refs: [&[BlockQ8x]; R16_TOKENS] =
                std::array::from_fn(|i| rows_of_acts[i].as_slice());
            for fill in [0xFF, 0x80, 0x7F, 0x00] {
                let bytes = filled_matrix(ty, 16, cols, fill);
                let (_, rp) = weight_and_repacked(ty, &bytes, 16, cols);
                let group = rp.groups(0..1);
                for n_act in [1, 4, R16_TOKENS] {
                    let want = gemm_r16_scalar(rp.kind, group, nb, refs, n_act);
                    for k in crate::Kernels::all_variants() {
                        for (form, got) in every_form(&k, rp.kind, group, nb, refs, n_act) {
                            assert_outputs_close(&got, &want, n_act, || {
                                format!("{ty} fill {fill:#x} {} {form}", k.name)
                            });
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn repacked_rows_dequantize_as_the_original() {
        let mut rng = Rng::new(6);
        for ty in R16_TYPES {
            let (rows, cols) = (32, 2 * ty.block_size());
            let bytes = matrix(ty, rows, cols, &mut rng);
            let (w, rp) = weight_and_repacked(ty, &bytes, rows, cols);
            let (mut want, mut got) = (vec![0.0f32; cols], vec![0.0f32; cols]);
            for r in 0..rows {
                crate::matmul::dequantize_row(w, r, &mut want).unwrap();
                rp.dequantize_row(r, &mut got).unwrap();
                for (g, x) in got.iter().zip(&want) {
                    assert!(
                        (g - x).abs() <= 1e-6 * x.abs().max(1.0),
                        "{ty} row {r}: {g} vs {x}"
                    );
                }
            }
            assert!(rp.dequantize_row(rows, &mut got).is_err());
            assert!(rp.dequantize_row(0, &mut got[1..]).is_err());
        }
    }

    #[test]
    fn simd_quantize_q8x_matches_the_reference_exactly() {
        let mut rng = Rng::new(17);
        let blank = BlockQ8x {
            d: 0.0,
            s: 0.0,
            sums: [0; 2],
            qs: [0; 32],
        };
        for kern in crate::Kernels::all_variants() {
            for (nb, scale) in [(1, 1.0), (5, 40.0), (18, 1e-3), (3, 0.0)] {
                let mut x: Vec<f32> = (0..nb * 32).map(|_| rng.f32() * scale).collect();
                if nb > 2 {
                    // ties at .5 after scaling, and a block with one large value
                    x[40] = 127.0 * 0.5 / 3.0;
                    x[64..96].fill(0.25);
                    x[70] = -1000.0;
                }
                if nb > 4 {
                    // a block so small its scale is an f16 subnormal, rounded down: the
                    // largest values would round to 129 without the clamp
                    for (i, v) in x[128..160].iter_mut().enumerate() {
                        *v = if i % 2 == 0 { 1e-4 } else { -1e-4 };
                    }
                }
                let (mut want, mut got) = (vec![blank; nb], vec![blank; nb]);
                quantize_q8x(&x, &mut want);
                if nb > 4 {
                    assert_eq!(want[4].qs[0], 127, "{:?}", want[4]);
                    assert_eq!(want[4].qs[1], -127, "{:?}", want[4]);
                }
                (kern.quantize_q8x)(&x, &mut got);
                for (g, w) in got.iter().zip(&want) {
                    assert_eq!(
                        (g.d, g.s, g.sums, g.qs),
                        (w.d, w.s, w.sums, w.qs),
                        "{:?}",
                        kern.name
                    );
                }
            }
        }
    }

    #[test]
    fn simd_quantize_q8x_k_matches_the_reference_exactly() {
        let mut rng = Rng::new(29);
        for kern in crate::Kernels::all_variants() {
            for (nb, scale) in [(8, 1.0f32), (16, 40.0), (24, 1e-3), (8, 0.0)] {
                let mut x: Vec<f32> = (0..nb * 32).map(|_| rng.f32() * scale).collect();
                if nb > 8 {
                    // two values of the largest magnitude, the positive one first
                    x[300] = 2.0 * scale;
                    x[301] = -2.0 * scale;
                }
                let (mut want, mut got) =
                    (acts(&mut rng, nb * 32, 1.0), acts(&mut rng, nb * 32, 1.0));
                quantize_q8x_k(&x, &mut want);
                (kern.quantize_q8x_k)(&x, &mut got);
                for (g, w) in got.iter().zip(&want) {
                    assert_eq!(
                        (g.d, g.s, g.sums, g.qs),
                        (w.d, w.s, w.sums, w.qs),
                        "{}",
                        kern.name
                    );
                }
                if nb > 8 {
                    assert_eq!(want[9].qs[300 - 288], -127);
                }
            }
        }
    }

    #[test]
    fn q8x_k_holds_q8k_values_and_scale() {
        let mut rng = Rng::new(23);
        for scale in [1.0f32, 50.0, 0.0] {
            let x: Vec<f32> = (0..3 * QK_K).map(|_| rng.f32() * scale).collect();
            let mut k = vec![crate::blocks::zeroed::<BlockQ8K>(); 3];
            quantize::quantize_q8k(&x, &mut k);
            let mut a = acts(&mut rng, 3 * QK_K, 1.0);
            quantize_q8x_k(&x, &mut a);
            for (i, b) in a.iter().enumerate() {
                let kb = &k[i / 8];
                assert_eq!(b.d, kb.d);
                assert_eq!(b.qs[..], kb.qs[32 * (i % 8)..32 * (i % 8) + 32]);
                let sums = [0, 1].map(|h| kb.bsums[2 * (i % 8) + h]);
                assert_eq!(b.sums, sums);
                assert_eq!(b.s, b.d * (sums[0] + sums[1]) as f32);
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
        let bytes = vec![0u8; 16 * 176];
        let w = WeightRef {
            ty: GgmlType::Q5_K,
            data: &bytes,
            n_rows: 16,
            n_cols: 256,
        };
        assert!(repack(w).unwrap().is_none());
    }
}
