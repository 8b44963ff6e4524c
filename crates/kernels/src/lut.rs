//! A lookup-table kernel for ternary weights (T-MAC's method: Wei et al., "T-MAC: CPU
//! Renaissance via Table Lookup for Low-Bit LLM Deployment on Edge", 2024; the ternary pair
//! tables of Microsoft's bitnet.cpp "TL1" kernels), for one activation row (decoding).
//!
//! Instead of multiplying, each pair of activations `(a0, a1)` is pre-combined once per token
//! into a table of the nine sums `(q0 - 1) a0 + (q1 - 1) a1` (`q0`, `q1` in 0..=2), and the
//! weights of a pair, stored as the 4-bit index `3 q0 + q1`, pick their entry: one table
//! lookup per two weights. The sums need 16 bits (|sum| <= 254), so each table is kept as two
//! 16-byte tables of low and high bytes; a byte shuffle (`vpshufb`, NEON `tbl`) looks up
//! sixteen rows at once in each, and interleaving the two results gives the 16-bit sums.
//!
//! Layout ([`LutMatrix`]): groups of sixteen rows; per group, units of 256 values with a
//! 32-byte header (the rows' f16 scales `d`) and 32 chunks of 32 bytes: chunk `c` covers the
//! pairs `4c..4c+4` (values `8c..8c+8`); byte `r` (`r` < 16) holds row `r`'s index of pair
//! `4c` in its low nibble and of pair `4c + 1` in its high nibble, byte `16 + r` those of
//! pairs `4c + 2` and `4c + 3`. 2.125 bits per weight.
//!
//! Tables ([`build_tables`]): per token and chunk, 128 bytes: the low bytes of pair `4c`'s
//! table then of `4c + 2`'s (one 32-byte register, a table per 128-bit lane), their high
//! bytes, then the same for pairs `4c + 1` and `4c + 3`. The activations come quantized as
//! Q8_K ([`crate::repack::quantize_q8x_k`]): one scale `da` per unit, so a row's result is
//! `d * da * sum` per unit, the same integers as the repacked kernel's.

use half::f16;

use crate::blocks::*;
use crate::repack::BlockQ8x;
use crate::{Error, GgmlType, Result, WeightRef};

/// Rows per group.
pub const LUT_ROWS: usize = 16;
/// Header bytes of a unit (sixteen f16 scales).
pub const LUT_HEADER: usize = 32;
/// Bytes of one unit of sixteen rows: header and 32 chunks of 32 bytes.
pub const LUT_UNIT: usize = LUT_HEADER + 32 * 32;
/// Table bytes per 256 activation values.
pub const LUT_TABLE_UNIT: usize = 32 * 128;

/// A ternary matrix in the lookup-table layout (see the module docs).
pub struct LutMatrix {
    pub n_rows: usize,
    pub n_cols: usize,
    data: AlignedBuf,
}

impl LutMatrix {
    /// The units of row group `g`.
    pub fn group(&self, g: usize) -> &[u8] {
        let gb = self.n_cols / QK_K * LUT_UNIT;
        &self.data.as_slice()[g * gb..(g + 1) * gb]
    }
}

/// Repacks a TQ1_0 or TQ2_0 matrix; `None` for other types or rows not in groups of 16.
///
/// # Errors
/// Data of the wrong size or alignment.
pub fn repack_lut(w: WeightRef<'_>) -> Result<Option<LutMatrix>> {
    if !matches!(w.ty, GgmlType::TQ1_0 | GgmlType::TQ2_0)
        || !w.n_rows.is_multiple_of(LUT_ROWS)
        || !w.n_cols.is_multiple_of(QK_K)
    {
        return Ok(None);
    }
    if w.data.len() != w.row_bytes() * w.n_rows {
        return Err(Error::Shape {
            op: "repack_lut",
            expected: (w.row_bytes() * w.n_rows).to_string(),
            got: w.data.len().to_string(),
        });
    }
    let mis = || Error::Misaligned {
        op: "repack_lut",
        ty: w.ty,
    };
    let nu = w.n_cols / QK_K;
    let mut data = AlignedBuf::new();
    data.resize(w.n_rows / LUT_ROWS * nu * LUT_UNIT);
    let out = data.as_mut_slice();
    let ts = w.ty.type_size();
    for g in 0..w.n_rows / LUT_ROWS {
        for u in 0..nu {
            let dst = &mut out[(g * nu + u) * LUT_UNIT..(g * nu + u + 1) * LUT_UNIT];
            for r in 0..LUT_ROWS {
                let src = &w.row(g * LUT_ROWS + r)[u * ts..(u + 1) * ts];
                let (q, d) = crate::quant::dequant::ternary_block(w.ty, src).ok_or_else(mis)?;
                dst[2 * r..2 * r + 2].copy_from_slice(&d.to_le_bytes());
                for p in 0..QK_K / 2 {
                    let idx = 3 * q[2 * p] + q[2 * p + 1];
                    let (c, i) = (p / 4, p % 4);
                    let byte = LUT_HEADER + 32 * c + 16 * (i / 2) + r;
                    dst[byte] |= idx << (4 * (i % 2));
                }
            }
        }
    }
    Ok(Some(LutMatrix {
        n_rows: w.n_rows,
        n_cols: w.n_cols,
        data,
    }))
}

/// The units a kernel may read: at most `n_units`, and no more than `group`, `tables` and
/// `da` hold.
pub(crate) fn usable_units(group: &[u8], n_units: usize, tables: &[u8], da: &[f32]) -> usize {
    n_units
        .min(da.len())
        .min(group.len() / LUT_UNIT)
        .min(tables.len() / LUT_TABLE_UNIT)
}

/// The nine pair sums of `(a0, a1)` (index `3 q0 + q1`), zero beyond.
fn pair_table(a0: i8, a1: i8) -> [i16; 16] {
    std::array::from_fn(|i| {
        if i < 9 {
            ((i / 3) as i16 - 1) * a0 as i16 + ((i % 3) as i16 - 1) * a1 as i16
        } else {
            0
        }
    })
}

/// One token's tables (`n_cols / 256 * LUT_TABLE_UNIT` bytes into `out`) from its
/// activations, quantized with one scale per 256 values.
pub fn build_tables(a: &[BlockQ8x], out: &mut [u8]) {
    for (c, chunk) in out.chunks_exact_mut(128).enumerate().take(a.len() * 32 / 8) {
        // values 8c..8c+8 of the row
        let (b, o) = (c / 4, 8 * (c % 4));
        let q = &a[b].qs[o..o + 8];
        for (i, pos) in [(0, 0), (2, 16), (1, 64), (3, 80)] {
            let t = pair_table(q[2 * i], q[2 * i + 1]);
            for e in 0..16 {
                chunk[pos + e] = t[e] as u8;
                chunk[pos + 32 + e] = (t[e] >> 8) as u8;
            }
        }
    }
}

/// Scalar reference: the sixteen rows of `group` (`n_units` units) against one token's
/// `tables`, with `da[u]` the activation scale of unit `u`.
pub fn gemv_lut_scalar(group: &[u8], n_units: usize, tables: &[u8], da: &[f32]) -> [f32; LUT_ROWS] {
    let mut out = [0.0f32; LUT_ROWS];
    for u in 0..n_units.min(da.len()) {
        let unit = &group[u * LUT_UNIT..(u + 1) * LUT_UNIT];
        let tab = &tables[u * LUT_TABLE_UNIT..(u + 1) * LUT_TABLE_UNIT];
        for (r, o) in out.iter_mut().enumerate() {
            let mut sum = 0i32;
            for c in 0..32 {
                let t = &tab[128 * c..128 * c + 128];
                for i in 0..4 {
                    let byte = unit[LUT_HEADER + 32 * c + 16 * (i / 2) + r];
                    let idx = ((byte >> (4 * (i % 2))) & 0xF) as usize;
                    // the table of pair i: low bytes at `pos`, high bytes 32 further
                    let pos = [0, 64, 16, 80][i];
                    sum += i16::from_le_bytes([t[pos + idx], t[pos + 32 + idx]]) as i32;
                }
            }
            let d = f16::from_le_bytes([unit[2 * r], unit[2 * r + 1]]).to_f32();
            *o += d * da[u] * sum as f32;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::tests::Rng;
    use crate::repack::quantize_q8x_k;

    fn ternary_matrix(ty: GgmlType, rows: usize, cols: usize, rng: &mut Rng) -> AlignedBuf {
        let x: Vec<f32> = (0..rows * cols).map(|_| rng.f32()).collect();
        let mut buf = AlignedBuf::new();
        buf.resize(rows * cols / QK_K * ty.type_size());
        let out = buf.as_mut_slice();
        match ty {
            GgmlType::TQ1_0 => {
                crate::quant::quantize::quantize_tq1_0(&x, cast_blocks_mut(out).unwrap())
            }
            _ => crate::quant::quantize::quantize_tq2_0(&x, cast_blocks_mut(out).unwrap()),
        }
        buf
    }

    #[test]
    fn lut_kernels_match_the_dequantized_dot_and_the_scalar_reference() {
        let mut rng = Rng::new(31);
        for ty in [GgmlType::TQ1_0, GgmlType::TQ2_0] {
            for nu in [1usize, 3, 10] {
                let (rows, cols) = (32, nu * QK_K);
                let bytes = ternary_matrix(ty, rows, cols, &mut rng);
                let w = WeightRef {
                    ty,
                    data: bytes.as_slice(),
                    n_rows: rows,
                    n_cols: cols,
                };
                let m = repack_lut(w).unwrap().unwrap();
                let x: Vec<f32> = (0..cols).map(|_| rng.f32() * 4.0).collect();
                let mut a = vec![crate::blocks::zeroed::<BlockQ8x>(); cols / 32];
                quantize_q8x_k(&x, &mut a);
                let da: Vec<f32> = a.chunks(8).map(|b| b[0].d).collect();
                let mut tables = vec![0u8; nu * LUT_TABLE_UNIT];
                build_tables(&a, &mut tables);
                for g in 0..rows / LUT_ROWS {
                    let want = gemv_lut_scalar(m.group(g), nu, &tables, &da);
                    for (r, &got) in want.iter().enumerate() {
                        let exact = crate::repack::dequantized_dot(w, g * LUT_ROWS + r, &a);
                        assert!(
                            (got - exact).abs() <= 1e-3 * exact.abs().max(1.0),
                            "{ty} {got} vs {exact}"
                        );
                    }
                    for k in crate::Kernels::all_variants() {
                        let got = (k.lut_gemv)(m.group(g), nu, &tables, &da);
                        for (g, w) in got.iter().zip(&want) {
                            assert!(
                                (g - w).abs() <= 1e-4 * w.abs().max(1.0),
                                "{ty} {}: {g} vs {w}",
                                k.name
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn tables_at_the_extremes_do_not_overflow() {
        // every weight +1 (TQ2_0 bytes 0xAA), every activation -127: the most negative sums
        let (rows, cols) = (16, 4 * QK_K);
        let mut bytes = AlignedBuf::new();
        bytes.resize(rows * cols / QK_K * 66);
        for b in cast_blocks_mut::<BlockTQ2_0>(bytes.as_mut_slice()).unwrap() {
            b.qs = [0xAA; 64];
            b.d = f16::from_f32(0.5);
        }
        let w = WeightRef {
            ty: GgmlType::TQ2_0,
            data: bytes.as_slice(),
            n_rows: rows,
            n_cols: cols,
        };
        let m = repack_lut(w).unwrap().unwrap();
        let mut a = vec![crate::blocks::zeroed::<BlockQ8x>(); cols / 32];
        quantize_q8x_k(&vec![-1.0; cols], &mut a);
        let da: Vec<f32> = a.chunks(8).map(|b| b[0].d).collect();
        let mut tables = vec![0u8; 4 * LUT_TABLE_UNIT];
        build_tables(&a, &mut tables);
        for k in crate::Kernels::all_variants() {
            let got = (k.lut_gemv)(m.group(0), 4, &tables, &da);
            for v in got {
                assert!((v - 0.5 * -(cols as f32)).abs() < 1e-2, "{}: {v}", k.name);
            }
        }
    }
}
