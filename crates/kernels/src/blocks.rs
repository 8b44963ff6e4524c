//! ggml block formats, laid out exactly as in GGUF files, with size asserts.
//!
//! Every block is `#[repr(C)]` plain old data; [`cast_blocks`] views a byte slice from a
//! GGUF mapping as a slice of blocks after checking length and alignment.

use half::f16;

pub const QK4_0: usize = 32;
pub const QK8_0: usize = 32;
pub const QK_K: usize = 256;
/// Bytes of packed 6-bit scales/mins in Q4_K and Q5_K.
pub const K_SCALE_SIZE: usize = 12;

/// Marker for types that are plain old data: any bit pattern is valid, no padding.
///
/// # Safety
/// Implementors must be `#[repr(C)]` (or primitive), contain no padding, no pointers, and
/// accept every bit pattern.
pub unsafe trait Pod: Copy + 'static {}

macro_rules! pod {
    ($($t:ty),*) => { $(
        // SAFETY: repr(C) structs of integers/f16/f32 without padding (sizes asserted below)
        // or primitive numbers; every bit pattern is a valid value.
        unsafe impl Pod for $t {}
    )* };
}

#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; QK4_0 / 2],
}

#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; QK4_0 / 2],
}

#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ5_0 {
    pub d: f16,
    pub qh: [u8; 4],
    pub qs: [u8; QK4_0 / 2],
}

#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ5_1 {
    pub d: f16,
    pub m: f16,
    pub qh: [u8; 4],
    pub qs: [u8; QK4_0 / 2],
}

#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; QK8_0],
}

/// Activation block for Q4_1/Q5_1 dot products: `s = d * sum(qs)`.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ8_1 {
    pub d: f16,
    pub s: f16,
    pub qs: [i8; QK8_0],
}

#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ2K {
    /// low 4 bits: scale, high 4 bits: min, per 16 values
    pub scales: [u8; QK_K / 16],
    pub qs: [u8; QK_K / 4],
    pub d: f16,
    pub dmin: f16,
}

#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ3K {
    pub hmask: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 4],
    pub scales: [u8; 12],
    pub d: f16,
}

#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ4K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; K_SCALE_SIZE],
    pub qs: [u8; QK_K / 2],
}

#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ5K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; K_SCALE_SIZE],
    pub qh: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 2],
}

#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    pub d: f16,
}

/// Activation block for K-quant dot products; `bsums[j]` is the sum of `qs[16j..16j+16]`.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}

/// Ternary block, 1.6875 bits per weight (llama.cpp's `block_tq1_0`): values `q - 1` for
/// trits `q` in 0..=2, times `d`. `qs[0..32]` hold values `0..160` five to a byte (value
/// `32n + m` is trit `n` of byte `m`, most significant first), `qs[32..48]` values
/// `160..240` (value `160 + 16n + m` is trit `n` of byte `32 + m`), `qh` the last sixteen
/// (value `240 + 4n + j` is trit `n` of `qh[j]`). A byte holding trits `t0..t4` (t0 most
/// significant) stores `ceil(256 * sum(t_i 3^(4-i)) / 243)`, so trit `n` is
/// `((byte * 3^n) mod 256) * 3 >> 8`.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockTQ1_0 {
    pub qs: [u8; (QK_K - 4 * QK_K / 64) / 5],
    pub qh: [u8; QK_K / 64],
    pub d: f16,
}

/// Ternary block, 2.0625 bits per weight (llama.cpp's `block_tq2_0`): value `128c + 32l + m`
/// is `((qs[32c + m] >> 2l) & 3) - 1`, times `d`.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockTQ2_0 {
    pub qs: [u8; QK_K / 4],
    pub d: f16,
}

const _: () = {
    assert!(std::mem::size_of::<BlockTQ1_0>() == 54);
    assert!(std::mem::size_of::<BlockTQ2_0>() == 66);
    assert!(std::mem::size_of::<BlockQ4_0>() == 18);
    assert!(std::mem::size_of::<BlockQ4_1>() == 20);
    assert!(std::mem::size_of::<BlockQ5_0>() == 22);
    assert!(std::mem::size_of::<BlockQ5_1>() == 24);
    assert!(std::mem::size_of::<BlockQ8_0>() == 34);
    assert!(std::mem::size_of::<BlockQ8_1>() == 36);
    assert!(std::mem::size_of::<BlockQ2K>() == 84);
    assert!(std::mem::size_of::<BlockQ3K>() == 110);
    assert!(std::mem::size_of::<BlockQ4K>() == 144);
    assert!(std::mem::size_of::<BlockQ5K>() == 176);
    assert!(std::mem::size_of::<BlockQ6K>() == 210);
    assert!(std::mem::size_of::<BlockQ8K>() == 292);
};

pod!(
    BlockQ4_0,
    BlockQ4_1,
    BlockQ5_0,
    BlockQ5_1,
    BlockQ8_0,
    BlockQ8_1,
    BlockQ2K,
    BlockQ3K,
    BlockQ4K,
    BlockQ5K,
    BlockQ6K,
    BlockQ8K,
    BlockTQ1_0,
    BlockTQ2_0,
    f16,
    half::bf16,
    f32,
    u8,
    i8
);

/// Views bytes as blocks. `None` if the length is not a whole number of blocks or the
/// pointer is not aligned for `T`.
pub fn cast_blocks<T: Pod>(bytes: &[u8]) -> Option<&[T]> {
    let size = std::mem::size_of::<T>();
    if !bytes.len().is_multiple_of(size)
        || !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
    {
        return None;
    }
    // SAFETY: length and alignment checked above; T is Pod so any bytes are a valid T;
    // the lifetime is tied to `bytes`.
    Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, bytes.len() / size) })
}

/// Mutable version of [`cast_blocks`].
pub fn cast_blocks_mut<T: Pod>(bytes: &mut [u8]) -> Option<&mut [T]> {
    let size = std::mem::size_of::<T>();
    if !bytes.len().is_multiple_of(size)
        || !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
    {
        return None;
    }
    // SAFETY: as in cast_blocks; the exclusive borrow of `bytes` is carried over.
    Some(unsafe {
        std::slice::from_raw_parts_mut(bytes.as_mut_ptr() as *mut T, bytes.len() / size)
    })
}

/// A block (or any [`Pod`] value) with every byte zero.
pub fn zeroed<T: Pod>() -> T {
    // SAFETY: T is Pod, so the all-zero bit pattern is a valid value.
    unsafe { std::mem::zeroed() }
}

/// Views a slice of blocks as bytes.
pub fn as_bytes<T: Pod>(blocks: &[T]) -> &[u8] {
    // SAFETY: T is Pod without padding, so every byte is initialized; u8 has alignment 1.
    unsafe {
        std::slice::from_raw_parts(blocks.as_ptr() as *const u8, std::mem::size_of_val(blocks))
    }
}

/// Unpacks the 6-bit scale and min of sub-block `j` (0..8) from Q4_K/Q5_K `scales`.
#[inline]
pub fn get_scale_min_k4(j: usize, q: &[u8; K_SCALE_SIZE]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Unpacks the sixteen 6-bit signed scales (-32..31) of a Q3_K block.
#[inline]
pub fn q3k_scales(packed: &[u8; 12]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for (j, o) in out.iter_mut().enumerate() {
        let low = if j < 8 {
            packed[j] & 0xF
        } else {
            packed[j - 8] >> 4
        };
        let high = (packed[8 + (j % 4)] >> (2 * (j / 4))) & 3;
        *o = ((low | (high << 4)) as i8) - 32;
    }
    out
}

/// One cache line of a [`AlignedBuf`].
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
struct Line([u64; 8]);

/// Heap buffer of bytes aligned to 64 (cache line / zmm), for activation blocks.
#[derive(Default)]
pub struct AlignedBuf {
    words: Vec<Line>,
    len: usize,
}

impl AlignedBuf {
    pub const fn new() -> AlignedBuf {
        AlignedBuf {
            words: Vec::new(),
            len: 0,
        }
    }

    /// Makes the buffer exactly `len` bytes long, growing the allocation if needed.
    pub fn resize(&mut self, len: usize) {
        let words = len.div_ceil(64);
        if self.words.len() < words {
            self.words.resize(words, Line::default());
        }
        self.len = len;
    }

    pub fn as_slice(&self) -> &[u8] {
        &as_bytes_u64(&self.words)[..self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let len = self.len;
        // SAFETY: a line is [u64; 8] without padding; any byte pattern is valid for it.
        let all = unsafe {
            std::slice::from_raw_parts_mut(
                self.words.as_mut_ptr() as *mut u8,
                self.words.len() * 64,
            )
        };
        &mut all[..len]
    }
}

fn as_bytes_u64(w: &[Line]) -> &[u8] {
    // SAFETY: plain integers without padding (a line is 64 bytes, its alignment).
    unsafe { std::slice::from_raw_parts(w.as_ptr() as *const u8, w.len() * 64) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cast_checks_length_and_alignment() {
        let buf = AlignedBuf {
            words: vec![Line::default(); 4],
            len: 256,
        };
        let b = buf.as_slice();
        assert_eq!(b.as_ptr() as usize % 64, 0);
        assert!(cast_blocks::<BlockQ4_0>(&b[..36]).is_some());
        assert!(cast_blocks::<BlockQ4_0>(&b[..35]).is_none());
        assert!(cast_blocks::<BlockQ4_0>(&b[1..37]).is_none());
        assert!(cast_blocks::<BlockQ8K>(&b[..0]).is_some());
    }

    #[test]
    fn q3k_scale_unpacking_matches_ggml_bit_layout() {
        // ggml packs: low nibbles of scales 0..7 in bytes 0..7 (low), 8..15 in (high);
        // the two high bits of scale j in byte 8 + j%4 at bit 2*(j/4).
        let mut scales = [0u8; 16];
        for (j, s) in scales.iter_mut().enumerate() {
            *s = (j as u8 * 5 + 3) & 63;
        }
        let mut packed = [0u8; 12];
        for j in 0..16 {
            let l = scales[j] & 0xF;
            if j < 8 {
                packed[j] |= l;
            } else {
                packed[j - 8] |= l << 4;
            }
            packed[8 + j % 4] |= (scales[j] >> 4) << (2 * (j / 4));
        }
        let got = q3k_scales(&packed);
        for j in 0..16 {
            assert_eq!(got[j] as i32, scales[j] as i32 - 32);
        }
    }
}
