//! The repacked-weight GEMM ([`crate::repack`]'s R16 layout) with 256-bit registers, in two
//! forms that share everything but the integer multiply-add: AVX2 (`vpmaddubsw` +
//! `vpmaddwd`) and AVX-VNNI (`vpdpbusd` in its VEX form, Intel's client cores since Alder
//! Lake and AMD's since Zen 5).
//!
//! A 64-byte chunk of the layout holds four values of sixteen rows; its two 32-byte halves
//! are rows 0..8 and 8..16 ("octs"), so one 256-bit register holds four values of eight rows
//! and the layout needs no AVX2 variant. Per block, oct and token, the activation's bytes
//! `4k..4k+4` are broadcast to the eight 32-bit lanes and multiplied with value register `k`:
//!
//! * AVX2: `vpmaddubsw` gives, per row, two 16-bit sums of two products each. Those are
//!   added in 16 bits for as many registers as the values' range allows without overflow
//!   (activations are within -127..=127): all eight for 4-bit values (16 x 15 x 127 <
//!   2^15), four for 5-bit, two for Q6_K's 0..=63; then one `vpmaddwd` by ones per group
//!   widens to 32 bits. Q8's 0..=255 values would saturate `vpmaddubsw`, so they are taken
//!   back to the signed bytes and multiplied as `|w| * (a * sign w)` (at most 2 x 128 x 127),
//!   each register widened on its own; their sum is the signed dot itself, so Q8 skips the
//!   `-128 d * sum(a)` term the unsigned values need.
//! * AVX-VNNI: `vpdpbusd` sums four u8 x i8 products into each 32-bit lane without
//!   intermediate saturation, so every kind takes eight instructions in two chains.
//!
//! Scales are applied per block in f32 exactly as [`crate::repack::gemm_r16_scalar`] does.

use std::arch::x86_64::*;

use crate::blocks::AlignedBuf;

use crate::repack::{
    kind_of, usable_blocks, BlockQ8x, R16Kind, KIND_Q4, KIND_Q4K, KIND_Q5, KIND_Q6K, KIND_Q8,
    KIND_T2, R16_ROWS, R16_TOKENS, T2_TILE_TOKENS, T2_TILE_UNIT_BYTES,
};

/// Evaluates `$e` with `$K` the const kind number of `$kind` (so each kind gets its own
/// monomorphized code).
macro_rules! by_kind {
    ($kind:expr, $K:ident => $e:expr) => {
        match $kind {
            R16Kind::Q4 => {
                const $K: u8 = KIND_Q4;
                $e
            }
            R16Kind::Q5 => {
                const $K: u8 = KIND_Q5;
                $e
            }
            R16Kind::Q8 => {
                const $K: u8 = KIND_Q8;
                $e
            }
            R16Kind::Q4K => {
                const $K: u8 = KIND_Q4K;
                $e
            }
            R16Kind::Q6K => {
                const $K: u8 = KIND_Q6K;
                $e
            }
            R16Kind::T2 => {
                const $K: u8 = KIND_T2;
                $e
            }
        }
    };
}

/// The integer multiply-add of one level.
trait Mac {
    /// Whether Q8's values are used as the signed bytes (`q - 128`) with their magnitudes.
    const SIGNED_Q8: bool;

    /// Per row of an oct: the sums of `v[k] · a[4k..4k+4]` over `k` in 0..4 (values 0..16)
    /// and 4..8 (values 16..32). For Q8 with [`Mac::SIGNED_Q8`], `v` are the magnitudes and
    /// `s` the signed values; otherwise `s` is unused.
    ///
    /// # Safety
    /// The CPU has the level's features.
    unsafe fn dot<const KIND: u8>(
        v: &[__m256i; 8],
        s: &[__m256i; 8],
        a: &[__m256i; 8],
    ) -> (__m256i, __m256i);

    /// The ternary kind's running sum over a unit: `acc` plus, per row, `v[k] · a[4k..4k+4]`
    /// over all `k` (values 0..=2), in the level's accumulator form ([`Mac::finish`] makes
    /// it 32-bit sums).
    ///
    /// # Safety
    /// The CPU has the level's features.
    unsafe fn acc_unit(acc: __m256i, v: &[__m256i; 8], a: &[__m256i; 8]) -> __m256i;

    /// [`Mac::acc_unit`] for half a block: `acc` plus, per row, `v[k] · a[k]` over `k` in
    /// 0..4, in the same accumulator form (a unit's sixteen halves fit it as its eight
    /// blocks do).
    ///
    /// # Safety
    /// The CPU has the level's features.
    unsafe fn acc_half(acc: __m256i, v: &[__m256i; 4], a: &[__m256i; 4]) -> __m256i;

    /// [`Mac::acc_unit`]'s accumulator as eight 32-bit sums.
    ///
    /// # Safety
    /// The CPU has the level's features.
    unsafe fn finish(acc: __m256i) -> __m256i;
}

/// AVX2: `vpmaddubsw`, 16-bit sums while they cannot overflow, `vpmaddwd` by ones.
struct Avx2;
/// AVX-VNNI: `vpdpbusd` (VEX).
struct AvxVnni;

/// The 32-bit sums of pairs of 16-bit lanes.
///
/// # Safety
/// The CPU has AVX2.
#[inline(always)]
unsafe fn widen(x: __m256i) -> __m256i {
    // SAFETY: AVX2 by the caller's contract.
    unsafe { _mm256_madd_epi16(x, _mm256_set1_epi16(1)) }
}

impl Mac for Avx2 {
    const SIGNED_Q8: bool = true;

    #[inline(always)]
    unsafe fn acc_unit(acc: __m256i, v: &[__m256i; 8], a: &[__m256i; 8]) -> __m256i {
        // 16-bit sums for a whole unit: 8 blocks x 8 registers x 2 x 2 x 127 = 32512 < 2^15
        // SAFETY: AVX2 by the caller's contract.
        unsafe {
            let m = |k: usize| _mm256_maddubs_epi16(v[k], a[k]);
            let add = _mm256_add_epi16;
            let lo = add(add(m(0), m(1)), add(m(2), m(3)));
            let hi = add(add(m(4), m(5)), add(m(6), m(7)));
            add(acc, add(lo, hi))
        }
    }

    #[inline(always)]
    unsafe fn acc_half(acc: __m256i, v: &[__m256i; 4], a: &[__m256i; 4]) -> __m256i {
        // each product pair straight into the 16-bit sums (the bound of `acc_unit` holds)
        // SAFETY: AVX2 by the caller's contract.
        unsafe {
            let mut acc = acc;
            for k in 0..4 {
                acc = _mm256_add_epi16(acc, _mm256_maddubs_epi16(v[k], a[k]));
            }
            acc
        }
    }

    #[inline(always)]
    unsafe fn finish(acc: __m256i) -> __m256i {
        // SAFETY: AVX2 by the caller's contract.
        unsafe { widen(acc) }
    }

    #[inline(always)]
    unsafe fn dot<const KIND: u8>(
        v: &[__m256i; 8],
        s: &[__m256i; 8],
        a: &[__m256i; 8],
    ) -> (__m256i, __m256i) {
        // SAFETY: AVX2 by the caller's contract.
        unsafe {
            let m = |k: usize| _mm256_maddubs_epi16(v[k], a[k]);
            let add = _mm256_add_epi16;
            match KIND {
                KIND_Q8 => {
                    // |w| * (a * sign w): one register at a time (2 x 128 x 127 < 2^15)
                    let p =
                        |k: usize| widen(_mm256_maddubs_epi16(v[k], _mm256_sign_epi8(a[k], s[k])));
                    let lo = _mm256_add_epi32(
                        _mm256_add_epi32(p(0), p(1)),
                        _mm256_add_epi32(p(2), p(3)),
                    );
                    let hi = _mm256_add_epi32(
                        _mm256_add_epi32(p(4), p(5)),
                        _mm256_add_epi32(p(6), p(7)),
                    );
                    (lo, hi)
                }
                KIND_Q6K => {
                    // values 0..=63: two registers per 16-bit sum (4 x 63 x 127 < 2^15)
                    let lo = _mm256_add_epi32(widen(add(m(0), m(1))), widen(add(m(2), m(3))));
                    let hi = _mm256_add_epi32(widen(add(m(4), m(5))), widen(add(m(6), m(7))));
                    (lo, hi)
                }
                KIND_Q5 => {
                    // values 0..=31: four registers per 16-bit sum (8 x 31 x 127 < 2^15)
                    let lo = add(add(m(0), m(1)), add(m(2), m(3)));
                    let hi = add(add(m(4), m(5)), add(m(6), m(7)));
                    (
                        _mm256_add_epi32(widen(lo), widen(hi)),
                        _mm256_setzero_si256(),
                    )
                }
                _ => {
                    // 4-bit values: all eight in one 16-bit sum (16 x 15 x 127 < 2^15); the
                    // ternary kind's 0..=2 likewise
                    let lo = add(add(m(0), m(1)), add(m(2), m(3)));
                    let hi = add(add(m(4), m(5)), add(m(6), m(7)));
                    (widen(add(lo, hi)), _mm256_setzero_si256())
                }
            }
        }
    }
}

impl Mac for AvxVnni {
    const SIGNED_Q8: bool = false;

    #[inline(always)]
    unsafe fn acc_unit(acc: __m256i, v: &[__m256i; 8], a: &[__m256i; 8]) -> __m256i {
        // SAFETY: AVX-VNNI by the caller's contract.
        unsafe {
            let mut x = _mm256_dpbusd_avx_epi32(acc, v[0], a[0]);
            let mut y = _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), v[4], a[4]);
            for k in 1..4 {
                x = _mm256_dpbusd_avx_epi32(x, v[k], a[k]);
                y = _mm256_dpbusd_avx_epi32(y, v[k + 4], a[k + 4]);
            }
            _mm256_add_epi32(x, y)
        }
    }

    #[inline(always)]
    unsafe fn acc_half(acc: __m256i, v: &[__m256i; 4], a: &[__m256i; 4]) -> __m256i {
        // SAFETY: AVX-VNNI by the caller's contract.
        unsafe {
            let mut acc = acc;
            for k in 0..4 {
                acc = _mm256_dpbusd_avx_epi32(acc, v[k], a[k]);
            }
            acc
        }
    }

    #[inline(always)]
    unsafe fn finish(acc: __m256i) -> __m256i {
        acc
    }

    #[inline(always)]
    unsafe fn dot<const KIND: u8>(
        v: &[__m256i; 8],
        _s: &[__m256i; 8],
        a: &[__m256i; 8],
    ) -> (__m256i, __m256i) {
        // SAFETY: AVX-VNNI by the caller's contract.
        unsafe {
            let z = _mm256_setzero_si256();
            let mut lo = _mm256_dpbusd_avx_epi32(z, v[0], a[0]);
            let mut hi = _mm256_dpbusd_avx_epi32(z, v[4], a[4]);
            for k in 1..4 {
                lo = _mm256_dpbusd_avx_epi32(lo, v[k], a[k]);
                hi = _mm256_dpbusd_avx_epi32(hi, v[k + 4], a[k + 4]);
            }
            (lo, hi)
        }
    }
}

/// The eight value registers of oct `h` (rows `8h..8h+8`) of one block: register `k` holds
/// values `4k..4k+4` of the oct's rows, unsigned (`q` of [`crate::repack`]).
///
/// # Safety
/// The CPU has AVX2; `body` points to the kind's `body_bytes()` readable bytes; `h < 2`.
#[inline(always)]
unsafe fn oct_values<const KIND: u8>(body: *const u8, h: usize) -> [__m256i; 8] {
    // SAFETY: every offset below is inside the body (see `R16Kind`'s packing).
    unsafe {
        let ld = |o: usize| _mm256_loadu_si256(body.add(o) as *const __m256i);
        if KIND == KIND_Q8 {
            return std::array::from_fn(|k| ld(64 * k + 32 * h));
        }
        if KIND == KIND_T2 {
            let (lo, hi) = (t2_half_values::<0>(body, h), t2_half_values::<1>(body, h));
            return std::array::from_fn(|k| if k < 4 { lo[k] } else { hi[k - 4] });
        }
        let low4 = _mm256_set1_epi8(0x0F);
        let p = [
            ld(32 * h),
            ld(64 + 32 * h),
            ld(128 + 32 * h),
            ld(192 + 32 * h),
        ];
        let mut v: [__m256i; 8] = std::array::from_fn(|k| {
            if k < 4 {
                _mm256_and_si256(p[k], low4)
            } else {
                _mm256_and_si256(_mm256_srli_epi16::<4>(p[k - 4]), low4)
            }
        });
        if KIND == KIND_Q5 {
            // the fifth bits of value bytes 64k + 32h .. +32: four bytes of the bit string
            let bit4 = _mm256_set1_epi8(0x10);
            for (k, x) in v.iter_mut().enumerate() {
                let bits = (body.add(256 + 8 * k + 4 * h) as *const u32).read_unaligned();
                let set = super::avx2::bits_to_bytes(bits);
                *x = _mm256_or_si256(*x, _mm256_and_si256(set, bit4));
            }
        } else if KIND == KIND_Q6K {
            // the high bit pairs of value byte j sit in byte j % 128 at bit 2 (j / 128)
            let three = _mm256_set1_epi8(3);
            let hb = [ld(256 + 32 * h), ld(256 + 64 + 32 * h)];
            for (k, x) in v.iter_mut().enumerate() {
                let s = match k / 2 {
                    0 => hb[k % 2],
                    1 => _mm256_srli_epi16::<2>(hb[k % 2]),
                    2 => _mm256_srli_epi16::<4>(hb[k % 2]),
                    _ => _mm256_srli_epi16::<6>(hb[k % 2]),
                };
                let s = _mm256_slli_epi16::<4>(_mm256_and_si256(s, three));
                *x = _mm256_or_si256(*x, s);
            }
        }
        v
    }
}

/// Eight f16 at `p` as f32.
///
/// # Safety
/// The CPU has F16C; `p` points to 16 readable bytes.
#[inline(always)]
unsafe fn f16x8(p: *const u8) -> __m256 {
    // SAFETY: the caller guarantees 16 bytes.
    unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
}

/// Eight bytes at `p` as f32, unsigned or signed.
///
/// # Safety
/// The CPU has AVX2; `p` points to 8 readable bytes.
#[inline(always)]
unsafe fn bytes8<const SIGNED: bool>(p: *const u8) -> __m256 {
    // SAFETY: the caller guarantees 8 bytes.
    unsafe {
        let b = _mm_loadl_epi64(p as *const __m128i);
        _mm256_cvtepi32_ps(if SIGNED {
            _mm256_cvtepi8_epi32(b)
        } else {
            _mm256_cvtepu8_epi32(b)
        })
    }
}

/// Per-row scales of block `j` of a unit for oct `h`: those of the two sixteen-value halves
/// and the offset `c` (Q6_K's offset is taken off in integers). `d`, `d2`: the unit's `d`
/// and second header value (`c`, `dmin`, or `-128 d` for Q8).
///
/// # Safety
/// The CPU has AVX2; `hp` points to the unit's header.
#[inline(always)]
unsafe fn block_scales<const KIND: u8>(
    hp: *const u8,
    j: usize,
    h: usize,
    d: __m256,
    d2: __m256,
) -> (__m256, __m256, __m256) {
    // SAFETY: header reads inside the kind's header bytes.
    unsafe {
        match KIND {
            KIND_Q4K => {
                let sc = _mm256_mul_ps(d, bytes8::<false>(hp.add(64 + 16 * j + 8 * h)));
                let m = _mm256_mul_ps(d2, bytes8::<false>(hp.add(192 + 16 * j + 8 * h)));
                (sc, sc, _mm256_sub_ps(_mm256_setzero_ps(), m))
            }
            KIND_Q6K => {
                let sa = _mm256_mul_ps(d, bytes8::<true>(hp.add(32 + 32 * j + 8 * h)));
                let sb = _mm256_mul_ps(d, bytes8::<true>(hp.add(48 + 32 * j + 8 * h)));
                (sa, sb, _mm256_setzero_ps())
            }
            _ => (d, d, d2),
        }
    }
}

/// Tokens per pass of the ternary kind's prompt kernel ([`gemm_t2_oct`]).
const T2_PASS: usize = 4;

/// Bytes ahead of the block in use that the kernel asks the cache for.
const PF_DIST: usize = 2048;

/// One token's contribution of one block to the accumulator of one oct: the integer dot
/// product, then the block's scales (`da`, `db`, `c` from [`block_scales`]).
///
/// # Safety
/// As [`Mac::dot`]; the CPU also has FMA.
#[inline(always)]
unsafe fn block_token<M: Mac, const KIND: u8>(
    v: &[__m256i; 8],
    s: &[__m256i; 8],
    (da, db, c): (__m256, __m256, __m256),
    a: &BlockQ8x,
    acc: __m256,
) -> __m256 {
    // SAFETY: features by the caller's contract; the activation's 32 bytes are read as eight
    // unaligned i32.
    unsafe {
        let (i0, i1) = M::dot::<KIND>(v, s, &act_bytes(a));
        let ad = _mm256_set1_ps(a.d);
        if KIND == KIND_Q6K {
            // values are q + 32: take 32 * sum(a) off each half, exactly
            let i0 = _mm256_sub_epi32(i0, _mm256_set1_epi32(32 * a.sums[0] as i32));
            let i1 = _mm256_sub_epi32(i1, _mm256_set1_epi32(32 * a.sums[1] as i32));
            let both = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(i0),
                da,
                _mm256_mul_ps(_mm256_cvtepi32_ps(i1), db),
            );
            _mm256_fmadd_ps(both, ad, acc)
        } else if KIND == KIND_Q8 && M::SIGNED_Q8 {
            // the signed values' products are the dot itself: no offset to take off (the
            // `-128 d` of `c` would only cancel a `128 sum(a)` added back)
            let i = _mm256_add_epi32(i0, i1);
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_mul_ps(da, ad), acc)
        } else {
            let i = _mm256_add_epi32(i0, i1);
            let f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_mul_ps(da, ad), acc);
            _mm256_fmadd_ps(c, _mm256_set1_ps(a.s), f)
        }
    }
}

/// The value registers of oct `h` of one block as [`Mac::dot`] takes them (for AVX2's Q8:
/// magnitudes and signed values).
///
/// # Safety
/// As [`oct_values`].
#[inline(always)]
unsafe fn oct_operands<M: Mac, const KIND: u8>(
    body: *const u8,
    h: usize,
) -> ([__m256i; 8], [__m256i; 8]) {
    // SAFETY: as this function's.
    unsafe {
        let mut v = oct_values::<KIND>(body, h);
        let mut s = v;
        if KIND == KIND_Q8 && M::SIGNED_Q8 {
            for (x, y) in v.iter_mut().zip(s.iter_mut()) {
                *y = _mm256_xor_si256(*x, _mm256_set1_epi8(-128));
                *x = _mm256_abs_epi8(*y);
            }
        }
        (v, s)
    }
}

/// A unit's per-row `d` and second header value (`c`, `dmin`, or `-128 d` for Q8) for oct
/// `h`.
///
/// # Safety
/// The CPU has AVX2 and F16C; `hp` points to the unit's header.
#[inline(always)]
unsafe fn unit_scales<const KIND: u8>(hp: *const u8, h: usize) -> (__m256, __m256) {
    // SAFETY: header reads inside the kind's header bytes.
    unsafe {
        let d = f16x8(hp.add(16 * h));
        let d2 = match KIND {
            KIND_Q8 => _mm256_mul_ps(d, _mm256_set1_ps(-128.0)),
            KIND_T2 => _mm256_sub_ps(_mm256_setzero_ps(), d),
            KIND_Q6K => _mm256_setzero_ps(),
            _ => f16x8(hp.add(32 + 16 * h)),
        };
        (d, d2)
    }
}

/// Calls `f(b, hp, j, body)` for each of the first `nb` blocks of a group: block `b` is
/// block `j` of its unit, whose header starts at `hp`; `body` points to its packed values.
///
/// # Safety
/// `group` holds the `nb` blocks (whole units) of kind `KIND`.
#[inline(always)]
unsafe fn for_blocks<const KIND: u8>(
    group: &[u8],
    nb: usize,
    mut f: impl FnMut(usize, *const u8, usize, *const u8),
) {
    let kind = kind_of(KIND);
    let (ub, hb, bb, bpu) = kind.layout();
    for u in 0..nb / bpu {
        // SAFETY: unit `u` and its blocks lie inside the group (the caller's contract).
        let hp = unsafe { group.as_ptr().add(u * ub) };
        for j in 0..bpu {
            // SAFETY: as above.
            f(u * bpu + j, hp, j, unsafe { hp.add(hb + j * bb) });
        }
    }
}

/// `N` activation rows against the sixteen rows of a group, block by block with both octs
/// inside: each block's bytes are used once and, for one row (decoding), its activation
/// registers serve both octs. Accumulators `[oct][token]` (in memory beyond a few tokens).
///
/// # Safety
/// The CPU has AVX2, FMA, F16C and `M`'s features; `group` holds the `nb` blocks (whole
/// units) of kind `KIND` and every row of `acts` at least `nb` blocks; `acts.len() >= N`.
#[inline(always)]
unsafe fn gemm_blocks<M: Mac, const N: usize, const KIND: u8>(
    group: &[u8],
    nb: usize,
    acts: &[&[BlockQ8x]],
) -> [[__m256; N]; 2] {
    let bb = kind_of(KIND).body_bytes();
    // SAFETY: AVX is enabled on this function (the caller's contract).
    let mut facc = [[unsafe { _mm256_setzero_ps() }; N]; 2];
    // SAFETY: header and body reads inside each unit (`for_blocks`); activation blocks below
    // `nb` exist; features by the caller's contract.
    unsafe {
        for_blocks::<KIND>(group, nb, |b, hp, j, body| {
            let pf = body.wrapping_add(PF_DIST);
            for off in (0..bb).step_by(64) {
                // a prefetch is a hint: it never faults, even past the end
                _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(off) as *const i8);
            }
            for (h, facc) in facc.iter_mut().enumerate() {
                let (d, d2) = unit_scales::<KIND>(hp, h);
                let sc = block_scales::<KIND>(hp, j, h, d, d2);
                let (v, s) = oct_operands::<M, KIND>(body, h);
                for (t, acc) in facc.iter_mut().enumerate() {
                    let a = acts.get_unchecked(t).get_unchecked(b);
                    *acc = block_token::<M, KIND>(&v, &s, sc, a, *acc);
                }
            }
        });
    }
    facc
}

/// An activation block's bytes `4k..4k+4` in every 32-bit lane of register `k`.
///
/// # Safety
/// The CPU has AVX.
#[inline(always)]
unsafe fn act_bytes(a: &BlockQ8x) -> [__m256i; 8] {
    let q = a.qs.as_ptr() as *const i32;
    // SAFETY: the block's 32 bytes are read as eight unaligned i32; AVX by the caller.
    std::array::from_fn(|k| unsafe { _mm256_set1_epi32(q.add(k).read_unaligned()) })
}

/// A ternary unit's contribution for one token: the integer sums `iacc` ([`Mac::acc_unit`])
/// scaled once, `d * da * sum(q * a) - d * sa`, with `sa` the unit's `da * sum(a)`, added
/// to `acc`.
///
/// # Safety
/// The CPU has AVX2, FMA and `M`'s features; `a` holds the unit's `bpu` blocks from `b0`.
#[inline(always)]
unsafe fn t2_unit_result<M: Mac>(
    iacc: __m256i,
    d: __m256,
    a: &[BlockQ8x],
    b0: usize,
    acc: __m256,
) -> __m256 {
    let bpu = R16Kind::T2.blocks_per_unit();
    // SAFETY: the unit's blocks exist (the caller's contract); features likewise.
    unsafe {
        let sa: f32 = (0..bpu).map(|j| a.get_unchecked(b0 + j).s).sum();
        t2_unit_scaled::<M>(iacc, d, a.get_unchecked(b0).d, sa, acc)
    }
}

/// `acc + d * da * sum - d * sa` per row: a ternary unit's integer sums `iacc`
/// ([`Mac::acc_unit`] form) scaled by the rows' `d` and the token's `da`, less `d` times the
/// token's `sa` (`da * sum(a)` over the unit).
///
/// # Safety
/// The CPU has AVX2, FMA and `M`'s features.
#[inline(always)]
unsafe fn t2_unit_scaled<M: Mac>(
    iacc: __m256i,
    d: __m256,
    da: f32,
    sa: f32,
    acc: __m256,
) -> __m256 {
    // SAFETY: features by the caller's contract.
    unsafe {
        let i = _mm256_cvtepi32_ps(M::finish(iacc));
        let f = _mm256_fmadd_ps(i, _mm256_mul_ps(d, _mm256_set1_ps(da)), acc);
        _mm256_fnmadd_ps(d, _mm256_set1_ps(sa), f)
    }
}

/// The ternary kind: `N` activation rows against both octs of a group, unit by unit. The
/// activations carry one scale per unit ([`crate::repack::quantize_q8x_k`], Q8_K's), so a
/// unit's integer products are summed whole ([`Mac::acc_unit`]) and scaled once: per row
/// `d * da * sum(q * a) - d * sa`, with `sa` the unit's `da * sum(a)`.
///
/// # Safety
/// As [`gemm_blocks`] with `KIND_T2`; every activation row's blocks share `d` per unit.
#[inline(always)]
unsafe fn gemm_t2<M: Mac, const N: usize>(
    group: &[u8],
    nb: usize,
    acts: &[&[BlockQ8x]],
) -> [[__m256; N]; 2] {
    let (ub, hb, bb, bpu) = R16Kind::T2.layout();
    // SAFETY: AVX is enabled on this function (the caller's contract).
    let mut facc = [[unsafe { _mm256_setzero_ps() }; N]; 2];
    // SAFETY: unit reads inside the group and activation blocks below `nb` (the caller's
    // contract); features by the caller's contract.
    unsafe {
        for u in 0..nb / bpu {
            let hp = group.as_ptr().add(u * ub);
            let mut iacc = [[_mm256_setzero_si256(); N]; 2];
            for j in 0..bpu {
                let body = hp.add(hb + j * bb);
                _mm_prefetch::<_MM_HINT_T0>(body.wrapping_add(PF_DIST) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(body.wrapping_add(PF_DIST + 64) as *const i8);
                let v = [
                    oct_values::<KIND_T2>(body, 0),
                    oct_values::<KIND_T2>(body, 1),
                ];
                for t in 0..N {
                    let ab = act_bytes(acts.get_unchecked(t).get_unchecked(u * bpu + j));
                    for h in 0..2 {
                        iacc[h][t] = M::acc_unit(iacc[h][t], &v[h], &ab);
                    }
                }
            }
            for h in 0..2 {
                let d = f16x8(hp.add(16 * h));
                for t in 0..N {
                    let a = acts.get_unchecked(t);
                    facc[h][t] = t2_unit_result::<M>(iacc[h][t], d, a, u * bpu, facc[h][t]);
                }
            }
        }
    }
    facc
}

/// [`gemm_t2`] for oct `h` alone (prompt processing): each block's values are unpacked once
/// for `N` tokens and the accumulators stay in registers.
///
/// # Safety
/// As [`gemm_t2`]; `h < 2`.
#[inline(always)]
unsafe fn gemm_t2_oct<M: Mac, const N: usize>(
    group: &[u8],
    nb: usize,
    h: usize,
    acts: &[&[BlockQ8x]],
) -> [__m256; N] {
    let (ub, hb, bb, bpu) = R16Kind::T2.layout();
    // SAFETY: AVX is enabled on this function (the caller's contract).
    let mut facc = [unsafe { _mm256_setzero_ps() }; N];
    // SAFETY: as `gemm_t2`'s.
    unsafe {
        for u in 0..nb / bpu {
            let hp = group.as_ptr().add(u * ub);
            let mut iacc = [_mm256_setzero_si256(); N];
            for j in 0..bpu {
                let v = oct_values::<KIND_T2>(hp.add(hb + j * bb), h);
                for (t, acc) in iacc.iter_mut().enumerate() {
                    let ab = act_bytes(acts.get_unchecked(t).get_unchecked(u * bpu + j));
                    *acc = M::acc_unit(*acc, &v, &ab);
                }
            }
            let d = f16x8(hp.add(16 * h));
            for (t, acc) in facc.iter_mut().enumerate() {
                *acc = t2_unit_result::<M>(iacc[t], d, acts.get_unchecked(t), u * bpu, *acc);
            }
        }
    }
    facc
}

/// `N` (at most four) activation rows against oct `h` of a group (prompt processing): the
/// accumulators stay in registers beside the eight value registers, and each block's values
/// are unpacked once for the `N` tokens.
///
/// # Safety
/// As [`gemm_blocks`]; `h < 2`.
#[inline(always)]
unsafe fn gemm_oct<M: Mac, const N: usize, const KIND: u8>(
    group: &[u8],
    nb: usize,
    h: usize,
    acts: &[&[BlockQ8x]],
) -> [__m256; N] {
    // SAFETY: AVX is enabled on this function (the caller's contract).
    let mut facc = [unsafe { _mm256_setzero_ps() }; N];
    // SAFETY: as `gemm_blocks`'.
    unsafe {
        for_blocks::<KIND>(group, nb, |b, hp, j, body| {
            let (d, d2) = unit_scales::<KIND>(hp, h);
            let sc = block_scales::<KIND>(hp, j, h, d, d2);
            let (v, s) = oct_operands::<M, KIND>(body, h);
            for (t, acc) in facc.iter_mut().enumerate() {
                let a = acts.get_unchecked(t).get_unchecked(b);
                *acc = block_token::<M, KIND>(&v, &s, sc, a, *acc);
            }
        });
    }
    facc
}

/// All token counts of one kind. One row, and every row of the kinds whose values take
/// more work or registers to unpack (Q5, Q8, Q6_K), by [`gemm_blocks`]; several rows of the
/// 4-bit kinds by [`gemm_oct`], per oct, in one or two passes of at most four tokens (their
/// values unpack in a few instructions, and register accumulators pay more).
///
/// # Safety
/// As [`gemm_blocks`], for the first `n_act` rows of `acts`.
#[inline(always)]
unsafe fn gemm_kind<M: Mac, const KIND: u8>(
    group: &[u8],
    nb: usize,
    acts: &[&[BlockQ8x]; R16_TOKENS],
    n_act: usize,
    out: &mut [[f32; R16_ROWS]; R16_TOKENS],
) {
    let mut put = |t0: usize, h: usize, accs: &[__m256]| {
        for (o, a) in out[t0..].iter_mut().zip(accs) {
            // SAFETY: storing eight f32 at 8h < 16 of an array of sixteen.
            unsafe { _mm256_storeu_ps(o.as_mut_ptr().add(8 * h), *a) };
        }
    };
    let mut put2 = |accs: &[[__m256; 8]; 2], n: usize| {
        for (h, acc) in accs.iter().enumerate() {
            put(0, h, &acc[..n]);
        }
    };
    /// Pads `[oct][token]` accumulators of `n` tokens to eight.
    fn pad<const N: usize>(a: [[__m256; N]; 2]) -> [[__m256; 8]; 2] {
        // SAFETY: an all-zero __m256 is a valid value.
        let z = unsafe { std::mem::zeroed::<__m256>() };
        a.map(|x| std::array::from_fn(|t| if t < N { x[t] } else { z }))
    }
    // SAFETY: as this function's.
    unsafe {
        if KIND == KIND_T2 && n_act > 2 {
            // per oct, passes of at most T2_PASS tokens, as even as possible
            let passes = n_act.div_ceil(T2_PASS);
            let mut t0 = 0;
            for p in 0..passes {
                let n = (n_act - t0).div_ceil(passes - p);
                let a = &acts[t0..];
                for h in 0..2 {
                    match n {
                        4 => put(t0, h, &gemm_t2_oct::<M, 4>(group, nb, h, a)),
                        3 => put(t0, h, &gemm_t2_oct::<M, 3>(group, nb, h, a)),
                        2 => put(t0, h, &gemm_t2_oct::<M, 2>(group, nb, h, a)),
                        1 => put(t0, h, &gemm_t2_oct::<M, 1>(group, nb, h, a)),
                        _ => {}
                    }
                }
                t0 += n;
            }
            return;
        }
        if KIND == KIND_T2 {
            // one or two tokens (decoding): both octs in one pass
            let a = &acts[..];
            match n_act {
                2 => put2(&pad(gemm_t2::<M, 2>(group, nb, a)), 2),
                1 => put2(&pad(gemm_t2::<M, 1>(group, nb, a)), 1),
                _ => {}
            }
            return;
        }
        if n_act == 1 || !matches!(KIND, KIND_Q4 | KIND_Q4K) {
            let a = &acts[..];
            match n_act {
                8 => put2(&gemm_blocks::<M, 8, KIND>(group, nb, a), 8),
                7 => put2(&pad(gemm_blocks::<M, 7, KIND>(group, nb, a)), 7),
                6 => put2(&pad(gemm_blocks::<M, 6, KIND>(group, nb, a)), 6),
                5 => put2(&pad(gemm_blocks::<M, 5, KIND>(group, nb, a)), 5),
                4 => put2(&pad(gemm_blocks::<M, 4, KIND>(group, nb, a)), 4),
                3 => put2(&pad(gemm_blocks::<M, 3, KIND>(group, nb, a)), 3),
                2 => put2(&pad(gemm_blocks::<M, 2, KIND>(group, nb, a)), 2),
                1 => put2(&pad(gemm_blocks::<M, 1, KIND>(group, nb, a)), 1),
                _ => {}
            }
            return;
        }
        // passes of at most four tokens, as even as possible
        let first = if n_act > 4 { n_act.div_ceil(2) } else { n_act };
        for (t0, n) in [(0, first), (first, n_act - first)] {
            let a = &acts[t0..];
            for h in 0..2 {
                match n {
                    4 => put(t0, h, &gemm_oct::<M, 4, KIND>(group, nb, h, a)),
                    3 => put(t0, h, &gemm_oct::<M, 3, KIND>(group, nb, h, a)),
                    2 => put(t0, h, &gemm_oct::<M, 2, KIND>(group, nb, h, a)),
                    1 => put(t0, h, &gemm_oct::<M, 1, KIND>(group, nb, h, a)),
                    _ => {}
                }
            }
        }
    }
}

// ---- prompt processing over a group unpacked once ------------------------------------------

/// Bytes of one block's oct in the unpacked form: eight value registers, for AVX2's Q8 also
/// the signed values, then the f32 scales `da`, `db`, `c` (eight each).
const fn unpacked_oct_bytes<M: Mac>(kind: R16Kind) -> usize {
    let signed = M::SIGNED_Q8 && matches!(kind, R16Kind::Q8);
    256 + if signed { 256 } else { 0 } + 96
}

/// Unpacks the `nb` blocks (whole units) of a group into `dst`: per block and oct, in that
/// order, the registers [`oct_operands`] gives and the scales [`block_scales`] gives, so a
/// prompt's tokens read them with plain loads instead of unpacking every block again.
///
/// # Safety
/// The CPU has AVX2, FMA, F16C and `M`'s features; `group` holds the `nb` blocks;
/// `dst` holds `2 * nb * unpacked_oct_bytes::<M>(kind)` bytes, 32-byte aligned.
#[inline(always)]
unsafe fn unpack_group<M: Mac, const KIND: u8>(group: &[u8], nb: usize, dst: &mut [u8]) {
    let ob = unpacked_oct_bytes::<M>(kind_of(KIND));
    let signed = KIND == KIND_Q8 && M::SIGNED_Q8;
    // SAFETY: reads inside each unit (`for_blocks`); writes inside `dst` (its size and
    // alignment are the caller's contract).
    unsafe {
        for_blocks::<KIND>(group, nb, |b, hp, j, body| {
            for h in 0..2 {
                let o = dst.as_mut_ptr().add((2 * b + h) * ob);
                let (d, d2) = unit_scales::<KIND>(hp, h);
                let (da, db, c) = block_scales::<KIND>(hp, j, h, d, d2);
                let (v, sv) = oct_operands::<M, KIND>(body, h);
                let vp = o as *mut __m256i;
                for k in 0..8 {
                    _mm256_store_si256(vp.add(k), v[k]);
                    if signed {
                        _mm256_store_si256(vp.add(8 + k), sv[k]);
                    }
                }
                let fp = o.add(ob - 96) as *mut f32;
                _mm256_store_ps(fp, da);
                _mm256_store_ps(fp.add(8), db);
                _mm256_store_ps(fp.add(16), c);
            }
        });
    }
}

/// `N` (at most four) activation rows against oct `h` of an unpacked group, accumulators in
/// registers.
///
/// # Safety
/// The CPU has AVX2, FMA, F16C and `M`'s features; `unpacked` was filled by
/// [`unpack_group`] for the same `M`, kind and `nb`; every row of `acts` holds `nb` blocks;
/// `acts.len() >= N`; `h < 2`.
#[inline(always)]
unsafe fn gemm_unpacked_oct<M: Mac, const N: usize, const KIND: u8>(
    unpacked: &[u8],
    nb: usize,
    h: usize,
    acts: &[&[BlockQ8x]],
) -> [__m256; N] {
    let ob = unpacked_oct_bytes::<M>(kind_of(KIND));
    let signed = KIND == KIND_Q8 && M::SIGNED_Q8;
    // SAFETY: AVX is enabled on this function (the caller's contract).
    let mut facc = [unsafe { _mm256_setzero_ps() }; N];
    // SAFETY: reads inside `unpacked` (the caller's contract) and below `nb` in `acts`.
    unsafe {
        for b in 0..nb {
            let o = unpacked.as_ptr().add((2 * b + h) * ob);
            let vp = o as *const __m256i;
            let v: [__m256i; 8] = std::array::from_fn(|k| _mm256_load_si256(vp.add(k)));
            let fp = o.add(ob - 96) as *const f32;
            let sc = (
                _mm256_load_ps(fp),
                _mm256_load_ps(fp.add(8)),
                _mm256_load_ps(fp.add(16)),
            );
            for (t, acc) in facc.iter_mut().enumerate() {
                let s: [__m256i; 8] = if signed {
                    std::array::from_fn(|k| _mm256_load_si256(vp.add(8 + k)))
                } else {
                    v
                };
                let a = acts.get_unchecked(t).get_unchecked(b);
                *acc = block_token::<M, KIND>(&v, &s, sc, a, *acc);
            }
        }
    }
    facc
}

/// [`gemm_unpacked_oct`] for every kind and token count: per oct, one or two passes of at
/// most four tokens.
///
/// # Safety
/// As [`gemm_unpacked_oct`], for the first `n_act` rows of `acts`.
#[inline(always)]
unsafe fn gemm_unpacked<M: Mac>(
    kind: R16Kind,
    unpacked: &[u8],
    nb: usize,
    acts: [&[BlockQ8x]; R16_TOKENS],
    n_act: usize,
) -> [[f32; R16_ROWS]; R16_TOKENS] {
    let mut out = [[0.0f32; R16_ROWS]; R16_TOKENS];
    let mut put = |t0: usize, h: usize, accs: &[__m256]| {
        for (o, a) in out[t0..].iter_mut().zip(accs) {
            // SAFETY: storing eight f32 at 8h < 16 of an array of sixteen.
            unsafe { _mm256_storeu_ps(o.as_mut_ptr().add(8 * h), *a) };
        }
    };
    let n_act = n_act.min(R16_TOKENS);
    let first = if n_act > 4 { n_act.div_ceil(2) } else { n_act };
    for (t0, n) in [(0, first), (first, n_act - first)] {
        let a = &acts[t0..];
        for h in 0..2 {
            // SAFETY: as this function's.
            unsafe {
                by_kind!(kind, K => match n {
                    4 => put(t0, h, &gemm_unpacked_oct::<M, 4, K>(unpacked, nb, h, a)),
                    3 => put(t0, h, &gemm_unpacked_oct::<M, 3, K>(unpacked, nb, h, a)),
                    2 => put(t0, h, &gemm_unpacked_oct::<M, 2, K>(unpacked, nb, h, a)),
                    1 => put(t0, h, &gemm_unpacked_oct::<M, 1, K>(unpacked, nb, h, a)),
                    _ => {}
                })
            }
        }
    }
    out
}

/// [`unpack_group`] for every kind, after checking the sizes: returns the blocks unpacked.
///
/// # Safety
/// The CPU has AVX2, FMA, F16C and `M`'s features.
#[inline(always)]
unsafe fn unpack<M: Mac>(kind: R16Kind, group: &[u8], nb: usize, dst: &mut AlignedBuf) -> usize {
    let nb = usable_blocks(kind, group, nb, &[]);
    dst.resize(2 * nb * unpacked_oct_bytes::<M>(kind));
    let d = dst.as_mut_slice();
    // SAFETY: `nb` whole units lie in `group`; `dst` is sized for them and 64-byte aligned
    // (`AlignedBuf`); features by the caller's contract.
    unsafe { by_kind!(kind, K => unpack_group::<M, K>(group, nb, d)) }
    nb
}

/// The blocks an unpacked group of `bytes` bytes holds, limited by every activation row.
fn unpacked_blocks<M: Mac>(kind: R16Kind, bytes: usize, nb: usize, acts: &[&[BlockQ8x]]) -> usize {
    acts.iter().fold(
        nb.min(bytes / (2 * unpacked_oct_bytes::<M>(kind))),
        |n, a| n.min(a.len()),
    )
}

/// Every kind.
///
/// # Safety
/// The CPU has AVX2, FMA, F16C and `M`'s features.
#[inline(always)]
unsafe fn gemm<M: Mac>(
    kind: R16Kind,
    group: &[u8],
    nb: usize,
    acts: [&[BlockQ8x]; R16_TOKENS],
    n_act: usize,
) -> [[f32; R16_ROWS]; R16_TOKENS] {
    let n_act = n_act.min(R16_TOKENS);
    let nb = usable_blocks(kind, group, nb, &acts[..n_act]);
    let mut out = [[0.0f32; R16_ROWS]; R16_TOKENS];
    // SAFETY: `nb` from `usable_blocks`; features by the caller's contract.
    unsafe { by_kind!(kind, K => gemm_kind::<M, K>(group, nb, &acts, n_act, &mut out)) }
    out
}

/// Values `4 HALF..4 HALF + 4` of oct `h` of a ternary block (half of what [`oct_values`]
/// gives): chunk `k = p + 2l` sits in run `p` at bits `2l`, so these are runs 0 and 1 shifted
/// by `4 HALF` and `4 HALF + 2`.
///
/// # Safety
/// As [`oct_values`]; `HALF < 2`.
#[inline(always)]
unsafe fn t2_half_values<const HALF: usize>(body: *const u8, h: usize) -> [__m256i; 4] {
    // SAFETY: as `oct_values`'.
    unsafe {
        let ld = |o: usize| _mm256_loadu_si256(body.add(o) as *const __m256i);
        let (p0, p1) = (ld(32 * h), ld(64 + 32 * h));
        let three = _mm256_set1_epi8(3);
        let (a0, a1, b0, b1) = if HALF == 0 {
            (
                p0,
                p1,
                _mm256_srli_epi16::<2>(p0),
                _mm256_srli_epi16::<2>(p1),
            )
        } else {
            (
                _mm256_srli_epi16::<4>(p0),
                _mm256_srli_epi16::<4>(p1),
                _mm256_srli_epi16::<6>(p0),
                _mm256_srli_epi16::<6>(p1),
            )
        };
        [a0, a1, b0, b1].map(|x| _mm256_and_si256(x, three))
    }
}

/// Half `HALF` of one ternary block of oct `h` against the eight tokens of a tile block
/// (`ap`: `[token][32]` values), into their integer accumulators.
///
/// # Safety
/// As [`t2_half_values`]; `ap` points to 256 readable bytes; the CPU has `M`'s features.
#[inline(always)]
unsafe fn t2_tile_half<M: Mac, const HALF: usize>(
    body: *const u8,
    h: usize,
    ap: *const u8,
    iacc: &mut [__m256i; T2_TILE_TOKENS],
) {
    // SAFETY: as this function's.
    unsafe {
        let v = t2_half_values::<HALF>(body, h);
        for (t, acc) in iacc.iter_mut().enumerate() {
            let q = ap.add(32 * t + 16 * HALF) as *const i32;
            let a: [__m256i; 4] =
                std::array::from_fn(|k| _mm256_set1_epi32(q.add(k).read_unaligned()));
            *acc = M::acc_half(*acc, &v, &a);
        }
    }
}

/// [`crate::dispatch::R16T2TilesFn`]: the ternary kind's prompt kernel. Per tile and oct,
/// each block's values are unpacked once for the tile's eight tokens, half a block (four
/// value registers) at a time so that the eight integer accumulators, the values and an
/// activation operand fit the sixteen registers; the eight tokens' values sit at fixed
/// offsets from one pointer (separate rows would take a register each), and their unit
/// scales come with them, summed already. Per unit and token, as [`t2_unit_result`]:
/// `d * da * sum(q * a) - d * sa`.
///
/// # Safety
/// The CPU has AVX2, FMA, F16C and `M`'s features; `group` holds `nb` blocks (whole units);
/// `tiles` holds `out.len() / 8` tiles of `nb / 8` units.
#[inline(always)]
unsafe fn gemm_t2_tiles<M: Mac>(
    group: &[u8],
    nb: usize,
    tiles: &[u8],
    out: &mut [[f32; R16_ROWS]],
) {
    let (ub, hb, bb, bpu) = R16Kind::T2.layout();
    let n_units = nb / bpu;
    let tile_bytes = n_units * T2_TILE_UNIT_BYTES;
    let values = bpu * T2_TILE_TOKENS * 32;
    for (i, o) in out.chunks_exact_mut(T2_TILE_TOKENS).enumerate() {
        // SAFETY: tile `i` and the group's units lie inside the slices (the caller's
        // contract); features likewise.
        unsafe {
            let tp = tiles.as_ptr().add(i * tile_bytes);
            for h in 0..2 {
                let mut facc = [_mm256_setzero_ps(); T2_TILE_TOKENS];
                for u in 0..n_units {
                    let hp = group.as_ptr().add(u * ub);
                    let up = tp.add(u * T2_TILE_UNIT_BYTES);
                    let mut iacc = [_mm256_setzero_si256(); T2_TILE_TOKENS];
                    for j in 0..bpu {
                        let body = hp.add(hb + j * bb);
                        let ap = up.add(j * T2_TILE_TOKENS * 32);
                        t2_tile_half::<M, 0>(body, h, ap, &mut iacc);
                        t2_tile_half::<M, 1>(body, h, ap, &mut iacc);
                    }
                    let d = f16x8(hp.add(16 * h));
                    let sp = up.add(values) as *const f32;
                    for (t, acc) in facc.iter_mut().enumerate() {
                        let da = sp.add(t).read_unaligned();
                        let sa = sp.add(T2_TILE_TOKENS + t).read_unaligned();
                        *acc = t2_unit_scaled::<M>(iacc[t], d, da, sa, *acc);
                    }
                }
                for (o, a) in o.iter_mut().zip(&facc) {
                    _mm256_storeu_ps(o.as_mut_ptr().add(8 * h), *a);
                }
            }
        }
    }
}

/// [`crate::dispatch::R16GemvFn`] of the ternary kind: [`gemm_t2`] for one token, group
/// after group in one loop (no call through the table and no result array per group).
/// Other kinds go to the level's [`crate::dispatch::R16GemmFn`] per group: their kernels
/// are only inlined well one call at a time.
///
/// # Safety
/// The CPU has AVX2, FMA, F16C and `M`'s features.
#[inline(always)]
unsafe fn gemv_t2<M: Mac>(groups: &[u8], nb: usize, act: &[BlockQ8x], out: &mut [f32]) {
    let kind = R16Kind::T2;
    let gb = kind.group_bytes(nb);
    if gb == 0 {
        out.fill(0.0);
        return;
    }
    for (group, o) in groups.chunks_exact(gb).zip(out.chunks_exact_mut(R16_ROWS)) {
        let acts = [act; R16_TOKENS];
        let nb = usable_blocks(kind, group, nb, &acts[..1]);
        // SAFETY: `nb` from `usable_blocks`; features by the caller's contract.
        let [lo, hi] = unsafe { gemm_t2::<M, 1>(group, nb, &acts) };
        // SAFETY: storing eight f32 at 0 and 8 of a chunk of sixteen.
        unsafe {
            _mm256_storeu_ps(o.as_mut_ptr(), lo[0]);
            _mm256_storeu_ps(o.as_mut_ptr().add(8), hi[0]);
        }
    }
}

/// The entry points of one level `$M` (its features `$features`, checked by
/// `Isa::$isa.available()` before the table that holds them is made): the packed kernel
/// `$gemm` ([`crate::dispatch::R16GemmFn`]), its one-token form `$gemv`, the ternary tile
/// kernel `$tiles` and the unpack-once pair `$unpacked`.
macro_rules! level {
    ($M:ty, $features:literal, $isa:literal, $gemm:ident, $gemv:ident, $tiles:ident, $unpacked:ident) => {
        /// [`crate::dispatch::R16T2TilesFn`] of this level.
        pub(super) fn $tiles(group: &[u8], nb: usize, tiles: &[u8], out: &mut [[f32; R16_ROWS]]) {
            #[target_feature(enable = $features)]
            fn inner(group: &[u8], nb: usize, tiles: &[u8], out: &mut [[f32; R16_ROWS]]) {
                // SAFETY: this function's features are the level's; `checked` gives the
                // whole units the group holds and the tiles `tiles` holds.
                unsafe { gemm_t2_tiles::<$M>(group, nb, tiles, out) }
            }
            let (nb, n) = crate::repack::t2_tiles_checked(group, nb, tiles, out.len());
            // SAFETY: only placed in a kernel table after `Isa::$isa.available()` (which
            // covers `$features`) returned true.
            unsafe { inner(group, nb, tiles, &mut out[..n]) }
        }

        /// [`crate::dispatch::R16GemvFn`] of this level.
        pub(super) fn $gemv(
            kind: R16Kind,
            groups: &[u8],
            nb: usize,
            act: &[BlockQ8x],
            out: &mut [f32],
        ) {
            #[target_feature(enable = $features)]
            fn inner(groups: &[u8], nb: usize, act: &[BlockQ8x], out: &mut [f32]) {
                // SAFETY: this function's features are the level's.
                unsafe { gemv_t2::<$M>(groups, nb, act, out) }
            }
            if kind == R16Kind::T2 {
                // SAFETY: only placed in a kernel table after `Isa::$isa.available()`
                // (which covers `$features`) returned true.
                return unsafe { inner(groups, nb, act, out) };
            }
            let gb = kind.group_bytes(nb);
            if gb == 0 {
                out.fill(0.0);
                return;
            }
            for (group, o) in groups.chunks_exact(gb).zip(out.chunks_exact_mut(R16_ROWS)) {
                o.copy_from_slice(&$gemm(kind, group, nb, [act; R16_TOKENS], 1)[0]);
            }
        }

        /// [`crate::dispatch::R16GemmFn`] of this level.
        pub(super) fn $gemm(
            kind: R16Kind,
            group: &[u8],
            nb: usize,
            acts: [&[BlockQ8x]; R16_TOKENS],
            n_act: usize,
        ) -> [[f32; R16_ROWS]; R16_TOKENS] {
            #[target_feature(enable = $features)]
            fn inner(
                kind: R16Kind,
                group: &[u8],
                nb: usize,
                acts: [&[BlockQ8x]; R16_TOKENS],
                n_act: usize,
            ) -> [[f32; R16_ROWS]; R16_TOKENS] {
                // SAFETY: this function's features are the level's.
                unsafe { gemm::<$M>(kind, group, nb, acts, n_act) }
            }
            // SAFETY: only placed in a kernel table after `Isa::$isa.available()` (which
            // covers `$features`) returned true.
            unsafe { inner(kind, group, nb, acts, n_act) }
        }

        /// [`crate::dispatch::R16Unpacked`] of this level.
        pub(super) const $unpacked: crate::dispatch::R16Unpacked = {
            #[target_feature(enable = $features)]
            fn unpack_impl(kind: R16Kind, group: &[u8], nb: usize, dst: &mut AlignedBuf) -> usize {
                // SAFETY: this function's features are the level's.
                unsafe { unpack::<$M>(kind, group, nb, dst) }
            }
            #[target_feature(enable = $features)]
            fn gemm_impl(
                kind: R16Kind,
                unpacked: &[u8],
                nb: usize,
                acts: [&[BlockQ8x]; R16_TOKENS],
                n_act: usize,
            ) -> [[f32; R16_ROWS]; R16_TOKENS] {
                let n_act = n_act.min(R16_TOKENS);
                let nb = unpacked_blocks::<$M>(kind, unpacked.len(), nb, &acts[..n_act]);
                // SAFETY: `nb` blocks lie in `unpacked` and in every activation row
                // (`unpacked_blocks`); the table pairs this with `unpack_impl` of the same
                // level, whose output is an `AlignedBuf` (64-byte aligned); this
                // function's features are the level's.
                unsafe { gemm_unpacked::<$M>(kind, unpacked, nb, acts, n_act) }
            }
            crate::dispatch::R16Unpacked {
                // the 5-bit values take the most work to unpack; the other kinds are as
                // fast or faster packed (the unpacked form trades that work for loads)
                kinds: &[R16Kind::Q5],
                unpack: |kind, group, nb, dst| {
                    // SAFETY: as `$gemm`'s.
                    unsafe { unpack_impl(kind, group, nb, dst) }
                },
                gemm: |kind, unpacked, nb, acts, n_act| {
                    // SAFETY: as `$gemm`'s.
                    unsafe { gemm_impl(kind, unpacked, nb, acts, n_act) }
                },
            }
        };
    };
}

level!(
    Avx2,
    "avx2,fma,f16c",
    "Avx2",
    gemm_r16_avx2,
    gemv_r16_avx2,
    gemm_t2_tiles_avx2,
    UNPACKED_AVX2
);
level!(
    AvxVnni,
    "avx2,fma,f16c,avxvnni",
    "AvxVnni",
    gemm_r16_avxvnni,
    gemv_r16_avxvnni,
    gemm_t2_tiles_avxvnni,
    UNPACKED_AVXVNNI
);
