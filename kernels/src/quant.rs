//! GGUF block formats for weights, and the 8-bit blocks activations are
//! quantized to before a quantized matmul.
//!
//! Weight layouts are GGML's, byte for byte (little endian), 32 values a block:
//! - `Q8_0`: `f16 d`, `i8 q[32]`; value = `d * q` (34 bytes).
//! - `Q4_0`: `f16 d`, `u8 qs[16]`; value = `d * (q - 8)`; the low nibbles of
//!   `qs` hold values 0..16, the high nibbles values 16..32 (18 bytes).
//! - `Q4_1`: `f16 d`, `f16 m`, `u8 qs[16]`; value = `d * q + m`, same nibble
//!   order (20 bytes).
//!
//! In memory, ouro keeps block-format matrices row-interleaved
//! ([`crate::interleave`]).
//!
//! Activations are quantized per row into [`ActBlocks`]: 32 `i8` a block with
//! an `f32` scale, the integer block sum and the scaled block sum (which let
//! Q4_0/Q4_1 offsets and the Q8_0 bias be applied once per block instead of
//! once per value). Each row is
//! quantized on its own, so a row's blocks never depend on the other rows of a
//! call: this is the first half of batch invariance.

use half::f16;

/// Values per quantization block, for every format here.
pub const BLOCK: usize = 32;

/// Storage format of a weight matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// Dense `f32`.
    F32,
    /// Dense IEEE half.
    F16,
    /// GGML Q8_0 blocks.
    Q8_0,
    /// GGML Q4_0 blocks.
    Q4_0,
    /// GGML Q4_1 blocks.
    Q4_1,
}

impl Format {
    /// Bytes used by `cols` values of one row. `cols` must be a multiple of
    /// [`BLOCK`] for the block formats.
    pub fn row_bytes(self, cols: usize) -> usize {
        match self {
            Format::F32 => cols * 4,
            Format::F16 => cols * 2,
            Format::Q8_0 => cols / BLOCK * 34,
            Format::Q4_0 => cols / BLOCK * 18,
            Format::Q4_1 => cols / BLOCK * 20,
        }
    }

    /// Whether the format stores 32-value blocks (and so needs quantized
    /// activations and `cols % 32 == 0`).
    pub fn is_blocked(self) -> bool {
        matches!(self, Format::Q8_0 | Format::Q4_0 | Format::Q4_1)
    }

    /// The GGML name of the format.
    pub fn name(self) -> &'static str {
        match self {
            Format::F32 => "f32",
            Format::F16 => "f16",
            Format::Q8_0 => "q8_0",
            Format::Q4_0 => "q4_0",
            Format::Q4_1 => "q4_1",
        }
    }
}

#[inline(always)]
pub(crate) fn read_f16(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// Decodes one row of `cols` values stored in `format` into `out`.
pub fn dequantize_row(format: Format, row: &[u8], out: &mut [f32]) {
    let cols = out.len();
    match format {
        Format::F32 => {
            for (i, o) in out.iter_mut().enumerate() {
                *o = f32::from_le_bytes([row[4 * i], row[4 * i + 1], row[4 * i + 2], row[4 * i + 3]]);
            }
        }
        Format::F16 => {
            for (i, o) in out.iter_mut().enumerate() {
                *o = read_f16(row, 2 * i);
            }
        }
        Format::Q8_0 => {
            for b in 0..cols / BLOCK {
                let blk = &row[b * 34..(b + 1) * 34];
                let d = read_f16(blk, 0);
                for i in 0..BLOCK {
                    out[b * BLOCK + i] = d * (blk[2 + i] as i8) as f32;
                }
            }
        }
        Format::Q4_0 | Format::Q4_1 => {
            let (size, qs_at) = if format == Format::Q4_0 { (18, 2) } else { (20, 4) };
            for b in 0..cols / BLOCK {
                let blk = &row[b * size..(b + 1) * size];
                let d = read_f16(blk, 0);
                let m = if format == Format::Q4_0 { -8.0 * d } else { read_f16(blk, 2) };
                for i in 0..16 {
                    let byte = blk[qs_at + i];
                    out[b * BLOCK + i] = d * (byte & 0x0F) as f32 + m;
                    out[b * BLOCK + 16 + i] = d * (byte >> 4) as f32 + m;
                }
            }
        }
    }
}

/// Encodes `values` (one row) into `format`, appending to `out`. The block
/// quantizers follow GGML's reference code, so a re-quantized model matches
/// what `llama-quantize` would write.
pub fn quantize_row(format: Format, values: &[f32], out: &mut Vec<u8>) {
    match format {
        Format::F32 => {
            for v in values {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        Format::F16 => {
            for v in values {
                out.extend_from_slice(&f16::from_f32(*v).to_bits().to_le_bytes());
            }
        }
        Format::Q8_0 => {
            for blk in values.chunks_exact(BLOCK) {
                let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
                out.extend(blk.iter().map(|v| (v * id).round() as i8 as u8));
            }
        }
        Format::Q4_0 => {
            for blk in values.chunks_exact(BLOCK) {
                // GGML: the value of largest magnitude maps to -8.
                let mut max = 0f32;
                let mut amax = 0f32;
                for &v in blk {
                    if v.abs() > amax {
                        amax = v.abs();
                        max = v;
                    }
                }
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
                for i in 0..16 {
                    let q0 = ((blk[i] * id + 8.5) as i32).min(15) as u8;
                    let q1 = ((blk[16 + i] * id + 8.5) as i32).min(15) as u8;
                    out.push(q0 | (q1 << 4));
                }
            }
        }
        Format::Q4_1 => {
            for blk in values.chunks_exact(BLOCK) {
                let min = blk.iter().fold(f32::INFINITY, |a, &v| a.min(v));
                let max = blk.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
                out.extend_from_slice(&f16::from_f32(min).to_bits().to_le_bytes());
                for i in 0..16 {
                    let q0 = (((blk[i] - min) * id + 0.5) as i32).min(15) as u8;
                    let q1 = (((blk[16 + i] - min) * id + 0.5) as i32).min(15) as u8;
                    out.push(q0 | (q1 << 4));
                }
            }
        }
    }
}

/// Activation rows quantized to 8-bit blocks, reused across calls.
///
/// Row `r`, block `b`: values `q[r * cols + 32 * b ..][..32]`, scale
/// `d[r * stride + b]`, integer sum `isum[r * stride + b] = sum(q)` and
/// `s[r * stride + b] = d * sum(q)` (the sums apply Q4_0/Q4_1 offsets and the
/// Q8_0 bias once per block). `stride` is the block count rounded up to 8 and
/// the padding holds zeros, so eight scales load at once.
#[derive(Debug, Default, Clone)]
pub struct ActBlocks {
    pub(crate) q: Vec<i8>,
    pub(crate) d: Vec<f32>,
    pub(crate) s: Vec<f32>,
    pub(crate) isum: Vec<i32>,
    pub(crate) cols: usize,
    pub(crate) rows: usize,
    pub(crate) stride: usize,
}

impl ActBlocks {
    /// Quantizes `m` rows of `cols` values (`x.len() == m * cols`,
    /// `cols % 32 == 0`), replacing the previous contents without shrinking
    /// the buffers.
    pub fn quantize(&mut self, x: &[f32], m: usize, cols: usize) {
        self.quantize_on(crate::cpu::isa(), x, m, cols)
    }

    /// [`ActBlocks::quantize`] on an explicit path (the start-up check runs
    /// before the path in use is known). Every path gives the same bits.
    pub fn quantize_on(&mut self, isa: crate::cpu::Isa, x: &[f32], m: usize, cols: usize) {
        debug_assert_eq!(x.len(), m * cols);
        debug_assert_eq!(cols % BLOCK, 0);
        let nb = cols / BLOCK;
        let stride = nb.div_ceil(8) * 8;
        self.q.resize(m * cols, 0);
        self.d.clear();
        self.d.resize(m * stride, 0.0);
        self.s.clear();
        self.s.resize(m * stride, 0.0);
        self.isum.clear();
        self.isum.resize(m * stride, 0);
        self.cols = cols;
        self.rows = m;
        self.stride = stride;
        // Every SIMD path has AVX2; the result is the same bits either way.
        let simd = isa.has_avx2();
        for r in 0..m {
            for b in 0..nb {
                let i = r * nb + b;
                let (xb, qb) = (&x[i * BLOCK..(i + 1) * BLOCK], &mut self.q[i * BLOCK..(i + 1) * BLOCK]);
                let (d, sum) = if simd { quantize_act_block_simd(xb, qb) } else { quantize_act_block(xb, qb) };
                self.d[r * stride + b] = d;
                self.s[r * stride + b] = d * sum as f32;
                self.isum[r * stride + b] = sum;
            }
        }
    }

    /// Scale of block `b` of row `r`.
    pub fn scale(&self, r: usize, b: usize) -> f32 {
        self.d[r * self.stride + b]
    }

    /// The quantized values of row `r`.
    pub fn row(&self, r: usize) -> &[i8] {
        &self.q[r * self.cols..(r + 1) * self.cols]
    }
}

/// [`quantize_act_block`] with AVX2 (the same bits: the max is exact and
/// the conversion rounds to nearest even, as `round_ties_even` does).
#[inline]
fn quantize_act_block_simd(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: called only when the path in use has AVX2.
        unsafe { crate::x86::avx2::quantize_act_block(x, q) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    quantize_act_block(x, q)
}

/// Quantizes one block of 32 activations: `d = max|x| / 127`,
/// `q = round_ties_even(x / d)`. Returns `(d, sum(q))`.
#[inline]
pub(crate) fn quantize_act_block(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0i32;
    for (qi, &v) in q.iter_mut().zip(x) {
        let r = (v * id).round_ties_even() as i32;
        *qi = r as i8;
        sum += r;
    }
    (d, sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    }

    #[test]
    fn quantize_then_dequantize_stays_within_the_format_step() {
        let mut seed = 7;
        let values: Vec<f32> = (0..256).map(|_| lcg(&mut seed) * 3.0).collect();
        for (format, tol) in
            [(Format::F32, 0.0), (Format::F16, 2e-3), (Format::Q8_0, 3.0 / 127.0), (Format::Q4_0, 3.0 / 7.0), (Format::Q4_1, 6.0 / 15.0)]
        {
            let mut bytes = Vec::new();
            quantize_row(format, &values, &mut bytes);
            assert_eq!(bytes.len(), format.row_bytes(values.len()), "{format:?}");
            let mut back = vec![0f32; values.len()];
            dequantize_row(format, &bytes, &mut back);
            for (a, b) in values.iter().zip(&back) {
                assert!((a - b).abs() <= tol + 1e-6, "{format:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn activation_blocks_hold_scale_and_integer_sum() {
        let mut seed = 3;
        let x: Vec<f32> = (0..64).map(|_| lcg(&mut seed)).collect();
        let mut a = ActBlocks::default();
        a.quantize(&x, 1, 64);
        for b in 0..2 {
            let q = &a.row(0)[b * 32..(b + 1) * 32];
            assert_eq!(a.s[b], a.scale(0, b) * q.iter().map(|&v| v as i32).sum::<i32>() as f32);
            for i in 0..32 {
                assert!((q[i] as f32 * a.scale(0, b) - x[b * 32 + i]).abs() <= a.scale(0, b) * 0.5 + 1e-7);
            }
        }
    }

    #[test]
    fn the_simd_activation_quantizer_gives_the_portable_bits() {
        if !crate::cpu::Isa::Avx2.supported() {
            println!("skipped: this CPU lacks AVX2");
            return;
        }
        let mut seed = 11;
        for case in 0..200 {
            let mut x: Vec<f32> = (0..32).map(|_| lcg(&mut seed) * 4.0).collect();
            // Exact ties (k + 0.5 steps) and an all-zero block.
            if case % 3 == 0 {
                x = (0..32).map(|i| (i as f32 - 16.0) * 0.5 * (127.0 / 8.0)).collect();
            }
            if case == 1 {
                x = vec![0.0; 32];
            }
            let (mut a, mut b) = ([0i8; 32], [0i8; 32]);
            let ra = quantize_act_block(&x, &mut a);
            let rb = quantize_act_block_simd(&x, &mut b);
            assert_eq!((ra.0.to_bits(), ra.1), (rb.0.to_bits(), rb.1), "case {case}");
            assert_eq!(a, b, "case {case}");
        }
    }

    #[test]
    fn zero_block_quantizes_to_zero_scale() {
        let mut a = ActBlocks::default();
        a.quantize(&[0.0; 32], 1, 32);
        assert_eq!(a.scale(0, 0), 0.0);
        assert!(a.row(0).iter().all(|&q| q == 0));
    }
}
