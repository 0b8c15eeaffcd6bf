//! Weight matrix times a few activation rows: `out[r][j] = x[r] · w[j]`.
//!
//! [`QMatrix`] holds a weight matrix of `rows` output features by `cols` input
//! features in one [`Format`], row-major (one GGUF row per output feature).
//! [`matmul`] multiplies `m` activation rows by it. Work is split over threads
//! by output features; each weight block is read once per tile of up to
//! [`ROW_TILE`] activation rows, so verifying k+1 rows costs little more memory
//! traffic than one.
//!
//! Batch invariance: the value of `out[r][j]` is computed by the same sequence
//! of operations whatever `m` is and whatever the other rows hold: activations
//! are quantized per row, every row of a tile runs the same instructions, and
//! the reduction over `cols` has a fixed order (two accumulators over even and
//! odd blocks, summed at the end). Tests check it bit for bit.

use crate::cpu::{isa, Isa};
use crate::pool::ThreadPool;
use crate::quant::{dequantize_row, read_f16, ActBlocks, Format, BLOCK};

/// Zero bytes after the last packed row (see `load_f16x8` in the AVX2 kernels).
const TAIL_PAD: usize = 32;

/// Activation rows processed together against one weight row.
pub const ROW_TILE: usize = 8;

/// Rows per tile for a weight format (the register budget of its kernel;
/// measured on Zen 3: see `examples/mm.rs`).
pub(crate) fn max_tile(format: Format) -> usize {
    match format {
        // Q8_0 keeps one column per tile (its sign trick needs registers),
        // so it has room for eight rows; Q4 formats take two columns of four.
        Format::Q8_0 => 8,
        _ => 4,
    }
}

/// Errors building a weight matrix.
#[derive(Debug, thiserror::Error)]
pub enum MatrixError {
    /// The byte length does not match `rows * row_bytes(cols)`.
    #[error("weight data has {got} bytes, expected {expected} for {rows}x{cols} {format}")]
    Size {
        /// Bytes given.
        got: usize,
        /// Bytes needed.
        expected: usize,
        /// Output features.
        rows: usize,
        /// Input features.
        cols: usize,
        /// Format name.
        format: &'static str,
    },
    /// A block format needs `cols % 32 == 0`.
    #[error("{format} needs a column count that is a multiple of 32, got {cols}")]
    Cols {
        /// Input features.
        cols: usize,
        /// Format name.
        format: &'static str,
    },
}

/// A weight matrix in one storage format; see the module docs.
#[derive(Debug, Clone)]
pub struct QMatrix {
    format: Format,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    data: Vec<u8>,
}

impl QMatrix {
    /// Wraps `data` (`rows` rows of `cols` values in `format`).
    pub fn new(format: Format, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self, MatrixError> {
        if format.is_blocked() && !cols.is_multiple_of(BLOCK) {
            return Err(MatrixError::Cols { cols, format: format.name() });
        }
        let row_bytes = format.row_bytes(cols);
        if data.len() != rows * row_bytes {
            return Err(MatrixError::Size { got: data.len(), expected: rows * row_bytes, rows, cols, format: format.name() });
        }
        let data = if format.is_blocked() {
            let mut packed = Vec::with_capacity(data.len() + TAIL_PAD);
            for row in data.chunks_exact(row_bytes) {
                crate::quant::pack_row(format, row, &mut packed);
            }
            // SIMD kernels load eight scales at once, up to 14 bytes past the
            // last row's scales.
            packed.resize(packed.len() + TAIL_PAD, 0);
            packed
        } else {
            data
        };
        Ok(Self { format, rows, cols, row_bytes, data })
    }

    /// Quantizes a dense row-major `f32` matrix into `format`.
    pub fn quantize(format: Format, rows: usize, cols: usize, values: &[f32]) -> Result<Self, MatrixError> {
        assert_eq!(values.len(), rows * cols, "values must hold rows * cols");
        if format.is_blocked() && !cols.is_multiple_of(BLOCK) {
            return Err(MatrixError::Cols { cols, format: format.name() });
        }
        let mut data = Vec::with_capacity(rows * format.row_bytes(cols));
        for r in values.chunks_exact(cols) {
            crate::quant::quantize_row(format, r, &mut data);
        }
        Self::new(format, rows, cols, data)
    }

    /// Stacks matrices with the same format and `cols` into one whose rows are
    /// theirs in order (e.g. fused Q, K and V projections).
    pub fn stack(parts: &[&QMatrix]) -> Option<Self> {
        let first = parts.first()?;
        if parts.iter().any(|p| p.format != first.format || p.cols != first.cols) {
            return None;
        }
        let mut data = Vec::with_capacity(parts.iter().map(|p| p.data.len()).sum());
        for p in parts {
            data.extend_from_slice(&p.data[..p.rows * p.row_bytes]);
        }
        if first.format.is_blocked() {
            data.resize(data.len() + TAIL_PAD, 0);
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        Some(Self { format: first.format, rows, cols: first.cols, row_bytes: first.row_bytes, data })
    }

    /// A matrix of the given rows of this one, in the same format (e.g. an
    /// LM head restricted to a draft vocabulary).
    pub fn select_rows(&self, rows: &[u32]) -> Self {
        let mut data = Vec::with_capacity(rows.len() * self.row_bytes + TAIL_PAD);
        for &r in rows {
            data.extend_from_slice(self.row_data(r as usize));
        }
        if self.format.is_blocked() {
            data.resize(data.len() + TAIL_PAD, 0);
        }
        Self { format: self.format, rows: rows.len(), cols: self.cols, row_bytes: self.row_bytes, data }
    }

    /// Storage format.
    pub fn format(&self) -> Format {
        self.format
    }
    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Bytes of one row.
    pub(crate) fn row_bytes(&self) -> usize {
        self.row_bytes
    }
    /// Bytes of weight data.
    pub fn bytes(&self) -> usize {
        self.rows * self.row_bytes
    }
    /// Row `r` in the packed layout (see [`crate::quant::pack_row`]).
    pub(crate) fn row_data(&self, r: usize) -> &[u8] {
        &self.data[r * self.row_bytes..(r + 1) * self.row_bytes]
    }
    /// Row `r` in GGML's layout.
    pub fn ggml_row(&self, r: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.row_bytes);
        crate::quant::unpack_row(self.format, self.row_data(r), &mut out);
        out
    }
    /// Decodes row `r` into `out` (`out.len() == cols`).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        if self.format.is_blocked() {
            dequantize_row(self.format, &self.ggml_row(r), out);
        } else {
            dequantize_row(self.format, self.row_data(r), out);
        }
    }
    /// The whole matrix as dense `f32`, row-major.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, o) in out.chunks_exact_mut(self.cols).enumerate() {
            self.dequantize_row(r, o);
        }
        out
    }
}

/// Reusable buffers for [`matmul`].
#[derive(Debug, Default, Clone)]
pub struct MatmulScratch {
    act: ActBlocks,
}

/// Raw output pointer shared by the tasks of one call; each task writes a
/// disjoint set of columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements and the call waits for all of them.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `out[r * w.rows() + j] = x[r * w.cols() ..][..cols] · w.row(j)` for `r < m`.
///
/// `x` holds `m` rows of `w.cols()` values; `out` holds `m` rows of
/// `w.rows()` values. See the module docs for batch invariance.
pub fn matmul(pool: &ThreadPool, w: &QMatrix, x: &[f32], m: usize, out: &mut [f32], scratch: &mut MatmulScratch) {
    matmul_on(isa(), pool, w, x, m, out, scratch)
}

/// [`matmul`] on an explicit instruction set (tests compare the twins).
pub fn matmul_on(isa: Isa, pool: &ThreadPool, w: &QMatrix, x: &[f32], m: usize, out: &mut [f32], scratch: &mut MatmulScratch) {
    let (n, k) = (w.rows, w.cols);
    assert_eq!(x.len(), m * k, "x must hold m rows of w.cols() values");
    assert_eq!(out.len(), m * n, "out must hold m rows of w.rows() values");
    if m == 0 || n == 0 {
        return;
    }
    if w.format.is_blocked() {
        scratch.act.quantize(x, m, k);
    }
    let act = &scratch.act;
    let chunk = chunk_cols(n, pool.n_threads());
    let n_tasks = n.div_ceil(chunk);
    let out_ptr = OutPtr(out.as_mut_ptr());
    // Rows per block: the block's activations stay in L1 while every column
    // of the task's chunk passes over them.
    let tile = max_tile(w.format);
    let row_block = (ROW_BLOCK_BYTES / k.max(1)).max(tile) / tile * tile;
    pool.run(n_tasks, |t| {
        let j0 = t * chunk;
        let j1 = (j0 + chunk).min(n);
        for rb in (0..m).step_by(row_block) {
            let mb = (m - rb).min(row_block);
            // Tiles of at most `tile` rows, as even as possible.
            let n_tiles = mb.div_ceil(tile);
            let (base, extra) = (mb / n_tiles, mb % n_tiles);
            let mut r0 = rb;
            for ti in 0..n_tiles {
                let rt = base + usize::from(ti < extra);
                let tile = Tile { w, x, act, r0, rt, out: out_ptr.get(), n };
                tile_cols(isa, &tile, j0, j1);
                r0 += rt;
            }
        }
    });
}

/// Bytes of quantized activations kept hot per row block.
const ROW_BLOCK_BYTES: usize = 16 * 1024;

/// Columns per task: enough tasks to balance threads, few enough that the
/// hand-out cost stays negligible.
fn chunk_cols(n: usize, threads: usize) -> usize {
    let target_tasks = threads * 8;
    (n / target_tasks).clamp(4, 4096) / 4 * 4
}

/// One tile of activation rows (`r0..r0 + rt`) and where its results go:
/// `out[r * n + j]`, written by exactly one task per column.
pub(crate) struct Tile<'a> {
    pub w: &'a QMatrix,
    pub x: &'a [f32],
    pub act: &'a ActBlocks,
    pub r0: usize,
    pub rt: usize,
    pub out: *mut f32,
    pub n: usize,
}

/// Computes `tile` against weight rows (output columns) `j0..j1`.
#[inline]
fn tile_cols(isa: Isa, tile: &Tile<'_>, j0: usize, j1: usize) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only reported when the CPU has AVX2, FMA and
        // F16C; `out` covers every (row, column) of the tile.
        Isa::Avx2 => unsafe { crate::x86::avx2::tile_cols(tile, j0, j1) },
        _ => tile_cols_ref(tile, j0, j1),
    }
}

/// Portable twin of [`crate::x86::avx2::tile_cols`].
pub(crate) fn tile_cols_ref(t: &Tile<'_>, j0: usize, j1: usize) {
    for j in j0..j1 {
        let mut res = [0f32; ROW_TILE];
        dot_tile_ref(t.w.format, t.w.row_data(j), t.w.cols, t.x, t.act, t.r0, t.rt, &mut res);
        for (i, v) in res[..t.rt].iter().enumerate() {
            // SAFETY: the caller owns column j of rows r0..r0 + rt of `out`.
            unsafe { *t.out.add((t.r0 + i) * t.n + j) = *v };
        }
    }
}

/// Portable twin of the SIMD tile kernels: same integer block sums, same
/// per-block scaling, scalar accumulation.
#[allow(clippy::too_many_arguments)]
pub(crate) fn dot_tile_ref(
    format: Format,
    wrow: &[u8],
    k: usize,
    x: &[f32],
    act: &ActBlocks,
    r0: usize,
    rt: usize,
    res: &mut [f32; ROW_TILE],
) {
    match format {
        Format::F32 | Format::F16 => {
            for (i, out) in res[..rt].iter_mut().enumerate() {
                let xr = &x[(r0 + i) * k..(r0 + i + 1) * k];
                let mut acc = 0f32;
                for (c, xv) in xr.iter().enumerate() {
                    let wv = if format == Format::F32 {
                        f32::from_le_bytes([wrow[4 * c], wrow[4 * c + 1], wrow[4 * c + 2], wrow[4 * c + 3]])
                    } else {
                        read_f16(wrow, 2 * c)
                    };
                    acc += wv * xv;
                }
                *out = acc;
            }
        }
        Format::Q8_0 | Format::Q4_0 | Format::Q4_1 => {
            let nb = k / BLOCK;
            let qb = crate::quant::qs_bytes(format);
            for (i, out) in res[..rt].iter_mut().enumerate() {
                let r = r0 + i;
                let q = act.row(r);
                let mut acc = 0f32;
                let mut corr = 0f32;
                for b in 0..nb {
                    let da = act.d[r * act.stride + b];
                    let qa = &q[b * BLOCK..(b + 1) * BLOCK];
                    let qs = &wrow[b * qb..(b + 1) * qb];
                    let dw = read_f16(wrow, nb * qb + 2 * b);
                    let s: i32 = match format {
                        Format::Q8_0 => (0..BLOCK).map(|i| (qs[i] as i8) as i32 * qa[i] as i32).sum(),
                        _ => (0..16).map(|i| (qs[i] & 0x0F) as i32 * qa[i] as i32 + (qs[i] >> 4) as i32 * qa[16 + i] as i32).sum(),
                    };
                    acc += s as f32 * (dw * da);
                    let mw = match format {
                        Format::Q4_0 => -8.0 * dw,
                        Format::Q4_1 => read_f16(wrow, nb * (qb + 2) + 2 * b),
                        _ => 0.0,
                    };
                    corr += mw * act.s[r * act.stride + b];
                }
                *out = acc + corr;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};

    fn random_matrix(rng: &mut rand::rngs::StdRng, rows: usize, cols: usize) -> Vec<f32> {
        (0..rows * cols).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// f64 reference over the dequantized weights and the unquantized x.
    fn reference(w: &QMatrix, x: &[f32], m: usize) -> Vec<f64> {
        let wf = w.to_f32();
        let (n, k) = (w.rows(), w.cols());
        let mut out = vec![0f64; m * n];
        for r in 0..m {
            for j in 0..n {
                out[r * n + j] = (0..k).map(|c| wf[j * k + c] as f64 * x[r * k + c] as f64).sum();
            }
        }
        out
    }

    const FORMATS: [Format; 5] = [Format::F32, Format::F16, Format::Q8_0, Format::Q4_0, Format::Q4_1];

    #[test]
    fn every_format_matches_an_f64_reference_within_the_activation_quantization_bound() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let pool = ThreadPool::new(2);
        for &format in &FORMATS {
            for &(n, k) in &[(1usize, 32usize), (7, 64), (33, 96), (70, 576)] {
                let k = if format.is_blocked() { k } else { k + 3 };
                let w = QMatrix::quantize(format, n, k, &random_matrix(&mut rng, n, k)).unwrap();
                for m in [1usize, 2, 3, 4, 5, 9, 16] {
                    let x = random_matrix(&mut rng, m, k);
                    let want = reference(&w, &x, m);
                    for isa_ in [Isa::Scalar, isa()] {
                        let mut out = vec![0f32; m * n];
                        matmul_on(isa_, &pool, &w, &x, m, &mut out, &mut MatmulScratch::default());
                        // Activation quantization error: |x - q| <= d/2 per value,
                        // d <= 1/127, weights <= 1 in magnitude.
                        let bound = if format.is_blocked() { k as f64 * 0.5 / 127.0 + 1e-3 } else { 1e-3 * k as f64 / 64.0 };
                        for (a, b) in out.iter().zip(&want) {
                            assert!((*a as f64 - b).abs() <= bound, "{format:?} {isa_:?} n={n} k={k} m={m}: {a} vs {b}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn each_row_is_bit_identical_whatever_shares_the_call() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let pool = ThreadPool::new(2);
        for &format in &FORMATS {
            let (n, k) = (37, 192);
            let w = QMatrix::quantize(format, n, k, &random_matrix(&mut rng, n, k)).unwrap();
            let x = random_matrix(&mut rng, 16, k);
            let mut scratch = MatmulScratch::default();
            let mut alone = vec![0f32; 16 * n];
            for r in 0..16 {
                matmul(&pool, &w, &x[r * k..(r + 1) * k], 1, &mut alone[r * n..(r + 1) * n], &mut scratch);
            }
            for m in 1..=16 {
                let mut out = vec![0f32; m * n];
                matmul(&pool, &w, &x[..m * k], m, &mut out, &mut scratch);
                for (i, (a, b)) in out.iter().zip(&alone[..m * n]).enumerate() {
                    assert_eq!(a.to_bits(), b.to_bits(), "{format:?} m={m} element {i}");
                }
            }
        }
    }

    #[test]
    fn stacking_matrices_concatenates_their_outputs() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let pool = ThreadPool::new(2);
        let a = QMatrix::quantize(Format::Q4_1, 5, 64, &random_matrix(&mut rng, 5, 64)).unwrap();
        let b = QMatrix::quantize(Format::Q4_1, 3, 64, &random_matrix(&mut rng, 3, 64)).unwrap();
        let s = QMatrix::stack(&[&a, &b]).unwrap();
        let x = random_matrix(&mut rng, 2, 64);
        let mut sc = MatmulScratch::default();
        let (mut oa, mut ob, mut os) = (vec![0f32; 10], vec![0f32; 6], vec![0f32; 16]);
        matmul(&pool, &a, &x, 2, &mut oa, &mut sc);
        matmul(&pool, &b, &x, 2, &mut ob, &mut sc);
        matmul(&pool, &s, &x, 2, &mut os, &mut sc);
        for r in 0..2 {
            assert_eq!(&os[r * 8..r * 8 + 5], &oa[r * 5..r * 5 + 5]);
            assert_eq!(&os[r * 8 + 5..r * 8 + 8], &ob[r * 3..r * 3 + 3]);
        }
    }

    #[test]
    fn selected_rows_compute_the_same_outputs() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let pool = ThreadPool::new(2);
        let w = QMatrix::quantize(Format::Q8_0, 10, 64, &random_matrix(&mut rng, 10, 64)).unwrap();
        let s = w.select_rows(&[7, 2, 9]);
        let x = random_matrix(&mut rng, 1, 64);
        let (mut a, mut b) = (vec![0f32; 10], vec![0f32; 3]);
        matmul(&pool, &w, &x, 1, &mut a, &mut MatmulScratch::default());
        matmul(&pool, &s, &x, 1, &mut b, &mut MatmulScratch::default());
        assert_eq!(b, vec![a[7], a[2], a[9]]);
    }

    #[test]
    fn wrong_sizes_are_refused_with_a_clear_error() {
        assert!(matches!(QMatrix::new(Format::Q8_0, 2, 32, vec![0; 10]), Err(MatrixError::Size { .. })));
        assert!(matches!(QMatrix::new(Format::Q4_1, 2, 33, vec![0; 10]), Err(MatrixError::Cols { .. })));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..Default::default() })]

        /// Any format, any shape (odd row counts, one to eight blocks, tails for
        /// dense formats), m = 1..16: within the activation quantization bound
        /// of an f64 reference over the dequantized weights, and every row the
        /// same bits as when computed alone.
        #[test]
        fn matmul_matches_the_reference_and_rows_are_independent(
            f in 0usize..5, n in 1usize..48, blocks in 1usize..9, tail in 0usize..8, m in 1usize..17, seed in any::<u64>()
        ) {
            let format = FORMATS[f];
            let k = blocks * 32 + if format.is_blocked() { 0 } else { tail };
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let w = QMatrix::quantize(format, n, k, &random_matrix(&mut rng, n, k)).unwrap();
            let x = random_matrix(&mut rng, m, k);
            let want = reference(&w, &x, m);
            let pool = ThreadPool::new(2);
            let bound = if format.is_blocked() { k as f64 * 0.5 / 127.0 + 1e-3 } else { 1e-3 * k as f64 / 64.0 };
            for isa_ in [Isa::Scalar, isa()] {
                let mut scratch = MatmulScratch::default();
                let mut out = vec![0f32; m * n];
                matmul_on(isa_, &pool, &w, &x, m, &mut out, &mut scratch);
                for r in 0..m {
                    let mut one = vec![0f32; n];
                    matmul_on(isa_, &pool, &w, &x[r * k..(r + 1) * k], 1, &mut one, &mut scratch);
                    for j in 0..n {
                        let want = want[r * n + j];
                        let got = out[r * n + j];
                        prop_assert!((got as f64 - want).abs() <= bound, "{:?} {:?} n={} k={} m={} row {} col {}: {} vs {}", format, isa_, n, k, m, r, j, got, want);
                        prop_assert_eq!(got.to_bits(), one[j].to_bits(), "{:?} {:?} row {} col {} alone", format, isa_, r, j);
                    }
                }
            }
        }
    }
}
