//! Quantized weight matrix x activation rows, and row dequantization.
//!
//! `matmul` quantizes the activations once into the weight type's dot-product partner
//! (Q8_0, Q8_1 or Q8_K; F32 for float weights), then splits the weight rows among the pool's
//! threads; each thread walks its rows in small groups and, for each group, all tokens, so a
//! group of weight rows stays in cache while every token uses it.

use half::{bf16, f16};

use crate::blocks::*;
use crate::dispatch::{Dot4Fn, DotFn, Kernels};
use crate::pool::{split_range, SharedMut, ThreadPool};
use crate::quant::dequant;
use crate::repack::{
    BlockQ8x, R16Kind, Repacked, R16_ROWS, R16_TOKENS, T2_TILE_TOKENS, T2_TILE_UNIT_BYTES,
};
use crate::{Error, GgmlType, Result};

/// A weight matrix in ggml layout: `n_rows` rows of `n_cols` elements each.
#[derive(Clone, Copy, Debug)]
pub struct WeightRef<'a> {
    pub ty: GgmlType,
    pub data: &'a [u8],
    pub n_rows: usize,
    pub n_cols: usize,
}

impl WeightRef<'_> {
    pub fn row_bytes(&self) -> usize {
        self.n_cols / self.ty.block_size() * self.ty.type_size()
    }

    pub fn row(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }
}

/// The activation format a weight type's dot product consumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActType {
    Q8_0,
    Q8_1,
    Q8K,
    F32,
}

impl ActType {
    pub fn for_weight(ty: GgmlType) -> Option<ActType> {
        Some(match ty {
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => ActType::Q8_0,
            GgmlType::Q4_1 | GgmlType::Q5_1 => ActType::Q8_1,
            GgmlType::Q2_K
            | GgmlType::Q3_K
            | GgmlType::Q4_K
            | GgmlType::Q5_K
            | GgmlType::Q6_K
            | GgmlType::TQ1_0
            | GgmlType::TQ2_0 => ActType::Q8K,
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => ActType::F32,
            GgmlType::Q8_1 | GgmlType::Q8_K => return None,
        })
    }

    /// Bytes of one quantized activation row of `n` elements.
    pub fn row_bytes(self, n: usize) -> usize {
        match self {
            ActType::Q8_0 => n / 32 * 34,
            ActType::Q8_1 => n / 32 * 36,
            ActType::Q8K => n / 256 * 292,
            ActType::F32 => n * 4,
        }
    }

    pub fn block_size(self) -> usize {
        match self {
            ActType::Q8_0 | ActType::Q8_1 => 32,
            ActType::Q8K => 256,
            ActType::F32 => 1,
        }
    }
}

fn shape_err(op: &'static str, expected: impl ToString, got: impl ToString) -> Error {
    Error::Shape {
        op,
        expected: expected.to_string(),
        got: got.to_string(),
    }
}

/// Quantizes `x` (`[n_tok, n]`) row by row into `out` in the `act` format.
pub fn quantize_acts(k: &Kernels, act: ActType, x: &[f32], n: usize, out: &mut [u8]) -> Result<()> {
    let rb = act.row_bytes(n);
    let n_tok = x.len() / n.max(1);
    if !n.is_multiple_of(act.block_size()) || out.len() < rb * n_tok {
        return Err(shape_err(
            "quantize_acts",
            format!("{n} a multiple of {}", act.block_size()),
            n,
        ));
    }
    let mis = || Error::Misaligned {
        op: "quantize_acts",
        ty: GgmlType::Q8_K,
    };
    for (xr, or) in x.chunks_exact(n).zip(out.chunks_exact_mut(rb)) {
        match act {
            ActType::Q8_0 => (k.quantize_q8_0)(xr, cast_blocks_mut(or).ok_or_else(mis)?),
            ActType::Q8_1 => (k.quantize_q8_1)(xr, cast_blocks_mut(or).ok_or_else(mis)?),
            ActType::Q8K => (k.quantize_q8k)(xr, cast_blocks_mut(or).ok_or_else(mis)?),
            ActType::F32 => or.copy_from_slice(as_bytes(xr)),
        }
    }
    Ok(())
}

/// Checks `x`: `[n_tok, n_cols]` against `out`: `[n_tok, n_rows]` and returns `n_tok`.
fn token_count(n_cols: usize, n_rows: usize, x: &[f32], out: &[f32]) -> Result<usize> {
    if n_cols == 0 || !x.len().is_multiple_of(n_cols) {
        return Err(shape_err(
            "matmul",
            format!("x a multiple of {n_cols}"),
            x.len(),
        ));
    }
    let n_tok = x.len() / n_cols;
    if out.len() != n_tok * n_rows {
        return Err(shape_err("matmul", n_tok * n_rows, out.len()));
    }
    Ok(n_tok)
}

/// Activation values up to which [`quantize_rows`] works on the calling thread alone.
const SERIAL_QUANTIZE_MAX: usize = 16 * 1024;

/// Quantizes the activation rows of `x` into `scratch` (`row_bytes` each), the rows split
/// over the pool; `quant` returns false when it cannot (misaligned destination).
fn quantize_rows(
    pool: &ThreadPool,
    x: &[f32],
    n_tok: usize,
    row_bytes: usize,
    scratch: &mut AlignedBuf,
    ty: GgmlType,
    quant: &(dyn Fn(&[f32], &mut [u8]) -> bool + Sync),
) -> Result<()> {
    let n_cols = x.len() / n_tok.max(1);
    scratch.resize(row_bytes * n_tok);
    if x.len() <= SERIAL_QUANTIZE_MAX {
        // a few rows (decoding): quicker here than a round trip through the pool
        return match quant(x, scratch.as_mut_slice()) {
            true => Ok(()),
            false => Err(Error::Misaligned { op: "matmul", ty }),
        };
    }
    let q = SharedMut::new(scratch.as_mut_slice());
    let failed = std::sync::atomic::AtomicBool::new(false);
    pool.run(&|ith, nth| {
        let toks = split_range(n_tok, ith, nth);
        // SAFETY: each thread quantizes a disjoint range of token rows.
        let dst = unsafe { q.slice(toks.start * row_bytes..toks.end * row_bytes) };
        if !quant(&x[toks.start * n_cols..toks.end * n_cols], dst) {
            failed.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    });
    if failed.into_inner() {
        return Err(Error::Misaligned { op: "matmul", ty });
    }
    Ok(())
}

/// Weight rows processed together per token sweep.
const ROW_GROUP: usize = 16;

/// `out[t][r] = dot(w.row(r), x[t])` for `x`: `[n_tok, n_cols]`, `out`: `[n_tok, n_rows]`.
/// `scratch` holds the quantized activations (grown as needed, reused across calls).
pub fn matmul(
    k: &Kernels,
    pool: &ThreadPool,
    w: WeightRef<'_>,
    x: &[f32],
    out: &mut [f32],
    scratch: &mut AlignedBuf,
) -> Result<()> {
    let n_cols = w.n_cols;
    let n_tok = token_count(n_cols, w.n_rows, x, out)?;
    if !n_cols.is_multiple_of(w.ty.block_size()) || w.data.len() != w.row_bytes() * w.n_rows {
        return Err(shape_err(
            "matmul",
            format!(
                "{} bytes for {}x{} {}",
                w.row_bytes() * w.n_rows,
                w.n_rows,
                n_cols,
                w.ty
            ),
            w.data.len(),
        ));
    }
    let act = ActType::for_weight(w.ty).ok_or(Error::Unsupported {
        op: "matmul",
        ty: w.ty,
    })?;
    quantize_rows(
        pool,
        x,
        n_tok,
        act.row_bytes(n_cols),
        scratch,
        w.ty,
        &|src, dst| quantize_acts(k, act, src, n_cols, dst).is_ok(),
    )?;
    let a = scratch.as_slice();
    let out = SharedMut::new(out);
    let mis = Error::Misaligned {
        op: "matmul",
        ty: w.ty,
    };
    macro_rules! go {
        ($dot:expr) => {
            go!($dot, None)
        };
        ($dot:expr, $dot4:expr) => {
            run_typed(
                pool,
                $dot,
                $dot4,
                cast_blocks(w.data).ok_or(mis)?,
                cast_blocks(a).ok_or(Error::Misaligned {
                    op: "matmul",
                    ty: w.ty,
                })?,
                w.n_rows,
                n_tok,
                &out,
            )
        };
    }
    match w.ty {
        GgmlType::Q4_0 => go!(k.dot_q4_0),
        GgmlType::Q4_1 => go!(k.dot_q4_1, k.dot4_q4_1),
        GgmlType::Q5_0 => go!(k.dot_q5_0, k.dot4_q5_0),
        GgmlType::Q5_1 => go!(k.dot_q5_1),
        GgmlType::Q8_0 => go!(k.dot_q8_0, k.dot4_q8_0),
        GgmlType::Q2_K => go!(k.dot_q2k),
        GgmlType::Q3_K => go!(k.dot_q3k),
        GgmlType::Q4_K => go!(k.dot_q4k, k.dot4_q4k),
        GgmlType::Q5_K => go!(k.dot_q5k),
        GgmlType::Q6_K => go!(k.dot_q6k, k.dot4_q6k),
        GgmlType::TQ1_0 => go!(k.dot_tq1_0),
        GgmlType::TQ2_0 => go!(k.dot_tq2_0),
        GgmlType::F32 => go!(k.dot_f32, k.dot4_f32),
        GgmlType::F16 => go!(k.dot_f16, k.dot4_f16),
        GgmlType::BF16 => go!(k.dot_bf16),
        GgmlType::Q8_1 | GgmlType::Q8_K => {
            return Err(Error::Unsupported {
                op: "matmul",
                ty: w.ty,
            })
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_typed<W: Pod + Sync, A: Pod + Sync>(
    pool: &ThreadPool,
    dot: DotFn<W, A>,
    dot4: Option<Dot4Fn<W, A>>,
    w: &[W],
    a: &[A],
    n_rows: usize,
    n_tok: usize,
    out: &SharedMut<f32>,
) {
    let wpr = w.len() / n_rows.max(1); // blocks per weight row
    let apr = a.len() / n_tok.max(1); // blocks per activation row
    pool.run(&|ith, nth| {
        let rows = split_range(n_rows, ith, nth);
        let mut r0 = rows.start;
        while r0 < rows.end {
            let r1 = (r0 + ROW_GROUP).min(rows.end);
            let mut t = 0;
            if let Some(dot4) = dot4 {
                // four tokens at a time share each unpacked weight block
                while t + 4 <= n_tok {
                    let acts: [&[A]; 4] =
                        std::array::from_fn(|i| &a[(t + i) * apr..(t + i + 1) * apr]);
                    for r in r0..r1 {
                        let v = dot4(&w[r * wpr..(r + 1) * wpr], acts);
                        for (i, &x) in v.iter().enumerate() {
                            // SAFETY: this thread alone owns rows `rows` of every token's output.
                            unsafe { out.write((t + i) * n_rows + r, x) };
                        }
                    }
                    t += 4;
                }
            }
            for t in t..n_tok {
                let ar = &a[t * apr..(t + 1) * apr];
                // SAFETY: this thread alone owns rows `rows` of every token's output row.
                let o = unsafe { out.slice(t * n_rows + r0..t * n_rows + r1) };
                for (r, o) in (r0..r1).zip(o.iter_mut()) {
                    *o = dot(&w[r * wpr..(r + 1) * wpr], ar);
                }
            }
            r0 = r1;
        }
    });
}

/// Dequantizes row `r` of a weight matrix into `out` (`n_cols` long).
pub fn dequantize_row(w: WeightRef<'_>, r: usize, out: &mut [f32]) -> Result<()> {
    if r >= w.n_rows || out.len() != w.n_cols || w.data.len() < w.row_bytes() * w.n_rows {
        return Err(shape_err(
            "dequantize_row",
            format!("row < {} of {} cols", w.n_rows, w.n_cols),
            format!("row {r}, {} cols", out.len()),
        ));
    }
    dequantize(w.ty, w.row(r), out)
}

/// Dequantizes `bytes` of type `ty` into `out` (`out.len()` elements).
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    let mis = Error::Misaligned {
        op: "dequantize",
        ty,
    };
    if ty.bytes_for(out.len() as u64) != Some(bytes.len() as u64) {
        return Err(shape_err("dequantize", bytes.len(), out.len()));
    }
    match ty {
        GgmlType::F32 => out.copy_from_slice(cast_blocks::<f32>(bytes).ok_or(mis)?),
        GgmlType::F16 => dequant::dequantize_f16(cast_blocks::<f16>(bytes).ok_or(mis)?, out),
        GgmlType::BF16 => dequant::dequantize_bf16(cast_blocks::<bf16>(bytes).ok_or(mis)?, out),
        GgmlType::Q4_0 => dequant::dequantize_q4_0(cast_blocks(bytes).ok_or(mis)?, out),
        GgmlType::Q4_1 => dequant::dequantize_q4_1(cast_blocks(bytes).ok_or(mis)?, out),
        GgmlType::Q5_0 => dequant::dequantize_q5_0(cast_blocks(bytes).ok_or(mis)?, out),
        GgmlType::Q5_1 => dequant::dequantize_q5_1(cast_blocks(bytes).ok_or(mis)?, out),
        GgmlType::Q8_0 => dequant::dequantize_q8_0(cast_blocks(bytes).ok_or(mis)?, out),
        GgmlType::Q8_1 => dequant::dequantize_q8_1(cast_blocks(bytes).ok_or(mis)?, out),
        GgmlType::Q2_K => dequant::dequantize_q2k(cast_blocks(bytes).ok_or(mis)?, out),
        GgmlType::Q3_K => dequant::dequantize_q3k(cast_blocks(bytes).ok_or(mis)?, out),
        GgmlType::Q4_K => dequant::dequantize_q4k(cast_blocks(bytes).ok_or(mis)?, out),
        GgmlType::Q5_K => dequant::dequantize_q5k(cast_blocks(bytes).ok_or(mis)?, out),
        GgmlType::Q6_K => dequant::dequantize_q6k(cast_blocks(bytes).ok_or(mis)?, out),
        GgmlType::Q8_K => dequant::dequantize_q8k(cast_blocks(bytes).ok_or(mis)?, out),
        GgmlType::TQ1_0 => dequant::dequantize_tq1_0(cast_blocks(bytes).ok_or(mis)?, out),
        GgmlType::TQ2_0 => dequant::dequantize_tq2_0(cast_blocks(bytes).ok_or(mis)?, out),
    }
    Ok(())
}

/// Tokens from which a level's unpack-once kernel ([`crate::dispatch::R16Unpacked`]) is used.
const R16_UNPACK_MIN_TOKENS: usize = 16;

thread_local! {
    /// The group unpacked by this thread (grown to the largest group, then reused).
    static UNPACKED: std::cell::RefCell<AlignedBuf> = const { std::cell::RefCell::new(AlignedBuf::new()) };
    /// One group's rows for a prompt's tiled tokens ([`crate::dispatch::R16T2TilesFn`]).
    static T2_OUT: std::cell::RefCell<Vec<[f32; R16_ROWS]>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// [`matmul`] for a repacked matrix: activations go to [`BlockQ8x`] once, then each thread
/// takes whole groups of sixteen rows and runs every token through them, `R16_TOKENS` at a
/// time (a prompt against ternary matrices: whole tiles of eight tokens in one call of the
/// level's [`crate::dispatch::R16T2TilesFn`], where it has one).
pub fn matmul_repacked(
    k: &Kernels,
    pool: &ThreadPool,
    w: &Repacked,
    x: &[f32],
    out: &mut [f32],
    scratch: &mut AlignedBuf,
) -> Result<()> {
    matmul_repacked_many(k, pool, &mut [(w, out)], x, scratch)
}

/// [`matmul_repacked`] of several matrices with the same input `x`: `[n_tok, n_cols]` (a
/// layer's Q, K and V projections; its FFN gate and up), each into its own output
/// `[n_tok, n_rows]`. The activations are quantized once and the row groups of all the
/// matrices are shared among the threads in one pass, so there is one quantization and one
/// wait for the slowest thread instead of one per matrix.
///
/// # Errors
/// [`Error::Shape`] when the matrices differ in `n_cols` or an output's length is not
/// `n_tok * n_rows`.
pub fn matmul_repacked_many(
    k: &Kernels,
    pool: &ThreadPool,
    mats: &mut [(&Repacked, &mut [f32])],
    x: &[f32],
    scratch: &mut AlignedBuf,
) -> Result<()> {
    let Some((first, _)) = mats.first() else {
        return Ok(());
    };
    let n_cols = first.n_cols;
    let mut n_tok = 0;
    for (w, out) in mats.iter() {
        if w.n_cols != n_cols {
            return Err(shape_err("matmul", n_cols, w.n_cols));
        }
        n_tok = token_count(n_cols, w.n_rows, x, out)?;
    }
    let nb = n_cols / 32;
    let arb = nb * std::mem::size_of::<BlockQ8x>();
    // the ternary kind's kernels take Q8_K's values and scales (`quantize_q8x_k`, as
    // llama.cpp's TQ dot products); every other kind computes right with them too
    let q8k = mats.iter().any(|(w, _)| w.kind == R16Kind::T2);
    quantize_rows(pool, x, n_tok, arb, scratch, GgmlType::Q8_0, &|src, dst| {
        cast_blocks_mut::<BlockQ8x>(dst)
            .map(|blocks| match q8k {
                true => (k.quantize_q8x_k)(src, blocks),
                false => (k.quantize_q8x)(src, blocks),
            })
            .is_some()
    })?;
    let mis = || Error::Misaligned {
        op: "matmul",
        ty: GgmlType::Q8_0,
    };
    // a prompt against ternary matrices only: the level's tile kernel takes the tokens
    // eight at a time, their activations rearranged into tiles after the quantized rows
    let bpu = R16Kind::T2.blocks_per_unit();
    let tiles_fn = k.r16_t2_tiles.filter(|_| {
        n_tok >= T2_TILE_TOKENS
            && nb.is_multiple_of(bpu)
            && mats.iter().all(|(w, _)| w.kind == R16Kind::T2)
    });
    let n_tiles = if tiles_fn.is_some() {
        n_tok / T2_TILE_TOKENS
    } else {
        0
    };
    let tile_bytes = nb / bpu * T2_TILE_UNIT_BYTES;
    let q_bytes = (n_tok * arb).next_multiple_of(64);
    scratch.resize(q_bytes + n_tiles * tile_bytes);
    let (qs, tiles) = scratch.as_mut_slice().split_at_mut(q_bytes);
    let a: &[BlockQ8x] = cast_blocks(&qs[..n_tok * arb]).ok_or_else(mis)?;
    if n_tiles > 0 {
        let dst = SharedMut::new(tiles);
        let failed = std::sync::atomic::AtomicBool::new(false);
        pool.run(&|ith, nth| {
            for i in (ith..n_tiles).step_by(nth) {
                // SAFETY: tile `i` goes to one thread only.
                let tile = unsafe { dst.slice(i * tile_bytes..(i + 1) * tile_bytes) };
                let rows = &a[i * T2_TILE_TOKENS * nb..(i + 1) * T2_TILE_TOKENS * nb];
                if crate::repack::t2_tile(rows, nb, tile).is_err() {
                    failed.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });
        if failed.into_inner() {
            return Err(shape_err("matmul", "whole ternary units", nb));
        }
    }
    let tiles: &[u8] = tiles;
    let n_tiled = n_tiles * T2_TILE_TOKENS;
    // every matrix's row groups numbered one after the other
    // (first global group, matrix, output); a fixed array: no allocation per call
    let mut jobs: [Option<(usize, &Repacked, SharedMut<f32>)>; 4] = [const { None }; 4];
    if mats.len() > jobs.len() {
        return Err(shape_err("matmul", "at most 4 matrices", mats.len()));
    }
    let mut n_groups = 0;
    for (job, (w, out)) in jobs.iter_mut().zip(mats.iter_mut()) {
        *job = Some((n_groups, *w, SharedMut::new(out)));
        n_groups += w.n_rows / R16_ROWS;
    }
    // groups are handed out in chunks from a shared counter, so a thread slowed down (a
    // busy core, a page fault) does not keep the others waiting at the end
    let chunk = (n_groups / (8 * pool.n_threads())).clamp(1, 64);
    let next = std::sync::atomic::AtomicUsize::new(0);
    pool.run(&|_, _| loop {
        let g0 = next.fetch_add(chunk, std::sync::atomic::Ordering::Relaxed);
        if g0 >= n_groups {
            break;
        }
        let mine = g0..(g0 + chunk).min(n_groups);
        for &(start, w, ref out) in jobs.iter().flatten() {
            let end = start + w.n_rows / R16_ROWS;
            let n_rows = w.n_rows;
            let (lo, hi) = (
                mine.start.max(start) - start,
                mine.end.min(end).max(start) - start,
            );
            if let (1, Some(gemv)) = (n_tok, k.r16_gemv) {
                // one token (decoding): the level's kernel runs over this chunk's groups
                if lo < hi {
                    // SAFETY: as below: each group goes to one thread only.
                    let o = unsafe { out.slice(lo * R16_ROWS..hi * R16_ROWS) };
                    gemv(w.kind, w.groups(lo..hi), nb, &a[..nb], o);
                }
                continue;
            }
            for g in mine.start.max(start)..mine.end.min(end) {
                let g = g - start;
                let group = w.groups(g..g + 1);
                if let Some(tiles_fn) = tiles_fn {
                    // the tiled tokens in one call, into this thread's rows, then to `out`
                    T2_OUT.with_borrow_mut(|res| {
                        res.resize(n_tiled, [0.0; R16_ROWS]);
                        tiles_fn(group, nb, tiles, res);
                        for (t, rr) in res.iter().enumerate() {
                            let base = t * n_rows + g * R16_ROWS;
                            // SAFETY: as below.
                            let o = unsafe { out.slice(base..base + R16_ROWS) };
                            o.copy_from_slice(rr);
                        }
                    });
                }
                // many tokens: unpack the group once for all of them where the level can
                let unpacked = k
                    .r16_unpacked
                    .filter(|u| n_tok >= R16_UNPACK_MIN_TOKENS && u.kinds.contains(&w.kind));
                if let Some(u) = unpacked {
                    UNPACKED.with_borrow_mut(|buf| (u.unpack)(w.kind, group, nb, buf));
                }
                let mut t = n_tiled;
                while t < n_tok {
                    let n = (n_tok - t).min(R16_TOKENS);
                    let acts: [&[BlockQ8x]; R16_TOKENS] = std::array::from_fn(|i| {
                        let row = (t + i).min(n_tok - 1);
                        &a[row * nb..(row + 1) * nb]
                    });
                    let res = match unpacked {
                        Some(u) => UNPACKED
                            .with_borrow(|buf| (u.gemm)(w.kind, buf.as_slice(), nb, acts, n)),
                        None => (k.r16_gemm)(w.kind, group, nb, acts, n),
                    };
                    for (i, rr) in res.iter().enumerate().take(n) {
                        let base = (t + i) * n_rows + g * R16_ROWS;
                        // SAFETY: each group is taken by one thread only (the counter hands
                        // every group out once), so rows g*16..g*16+16 of every token of
                        // this matrix are written by that thread alone.
                        let o = unsafe { out.slice(base..base + R16_ROWS) };
                        o.copy_from_slice(rr);
                    }
                    t += n;
                }
            }
        }
    });
    Ok(())
}
