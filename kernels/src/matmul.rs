//! Weight matrix times a few activation rows: `out[r][j] = x[r] · w[j]`.
//!
//! [`QMatrix`] holds a weight matrix of `rows` output features by `cols` input
//! features in one [`Format`]. Block formats are kept row-interleaved in
//! groups of 16 output rows ([`crate::interleave`]); dense formats row-major.
//! [`matmul`] multiplies `m` activation rows by it. Work is split over threads
//! by groups of output features; each group's weights are read from memory
//! once and then serve every tile of activation rows from the L1 cache, so
//! verifying k+1 rows costs little more memory traffic than one.
//!
//! The arithmetic of one output of a block format, the same on every path
//! (the SIMD kernels keep one output per lane, so they need no horizontal
//! sums and follow this order exactly):
//!
//! ```text
//! acc = 0
//! for each block b, in order:
//!     dot = exact integer dot product of the block's values and the
//!           activation row's 8-bit block (Q4_0's offset -8 and Q8_0's
//!           storage bias folded in with the activation's integer block sum)
//!     acc = fma(dot as f32, d_w[b] * d_a[b], acc)
//!     Q4_1: acc = fma(m_w[b], d_a[b] * sum(q_a[b]), acc)
//! ```
//!
//! Integer sums are exact in any order, and the float operations of each
//! output are in this fixed order whatever `m`, the tile a row fell in, the
//! thread count or the other rows are: results are the same bits alone or in
//! a batch, and on every instruction-set path (checked at start by
//! [`crate::isa_check`], and by the tests).

use crate::cpu::{isa, Isa};
use crate::interleave::{self, GROUP};
use crate::pool::ThreadPool;
use crate::quant::{dequantize_row, read_f16, ActBlocks, Format, BLOCK};

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
    /// Bytes of one row in GGML's layout.
    row_bytes: usize,
    /// Block formats: the interleaved groups; dense formats: the rows.
    data: Vec<u8>,
}

impl QMatrix {
    /// Wraps `data` (`rows` rows of `cols` values in `format`, GGML's layout).
    pub fn new(format: Format, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self, MatrixError> {
        if format.is_blocked() && !cols.is_multiple_of(BLOCK) {
            return Err(MatrixError::Cols { cols, format: format.name() });
        }
        let row_bytes = format.row_bytes(cols);
        if data.len() != rows * row_bytes {
            return Err(MatrixError::Size { got: data.len(), expected: rows * row_bytes, rows, cols, format: format.name() });
        }
        let data = if format.is_blocked() { interleave::pack(format, rows, cols, &data) } else { data };
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

    /// The rows `rows` in GGML's layout, one after the other.
    fn ggml_rows(&self, rows: impl Iterator<Item = usize>) -> Vec<u8> {
        let mut out = Vec::new();
        for r in rows {
            self.append_ggml_row(r, &mut out);
        }
        out
    }

    /// Stacks matrices with the same format and `cols` into one whose rows are
    /// theirs in order (e.g. fused Q, K and V projections).
    pub fn stack(parts: &[&QMatrix]) -> Option<Self> {
        let first = parts.first()?;
        if parts.iter().any(|p| p.format != first.format || p.cols != first.cols) {
            return None;
        }
        let mut data = Vec::with_capacity(parts.iter().map(|p| p.bytes()).sum());
        for p in parts {
            data.extend(p.ggml_rows(0..p.rows));
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        Self::new(first.format, rows, first.cols, data).ok()
    }

    /// A matrix of the given rows of this one, in the same format (e.g. an
    /// LM head restricted to a draft vocabulary).
    pub fn select_rows(&self, rows: &[u32]) -> Self {
        let data = self.ggml_rows(rows.iter().map(|&r| r as usize));
        Self::new(self.format, rows.len(), self.cols, data).expect("rows of a valid matrix form a valid matrix")
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
    /// Bytes of weight data (GGML's size of the matrix).
    pub fn bytes(&self) -> usize {
        self.rows * self.row_bytes
    }
    /// Row `r` of a dense matrix.
    pub(crate) fn dense_row(&self, r: usize) -> &[u8] {
        debug_assert!(!self.format.is_blocked());
        &self.data[r * self.row_bytes..(r + 1) * self.row_bytes]
    }
    /// The interleaved data of group `g` of a block-format matrix.
    pub(crate) fn group(&self, g: usize) -> &[u8] {
        let len = self.cols / BLOCK * interleave::group_block_bytes(self.format);
        &self.data[g * len..(g + 1) * len]
    }
    fn append_ggml_row(&self, r: usize, out: &mut Vec<u8>) {
        if self.format.is_blocked() {
            interleave::unpack_row(self.format, self.cols, &self.data, r, out);
        } else {
            out.extend_from_slice(self.dense_row(r));
        }
    }
    /// Row `r` in GGML's layout.
    pub fn ggml_row(&self, r: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.row_bytes);
        self.append_ggml_row(r, &mut out);
        out
    }
    /// Decodes row `r` into `out` (`out.len() == cols`).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        if self.format.is_blocked() {
            dequantize_row(self.format, &self.ggml_row(r), out);
        } else {
            dequantize_row(self.format, self.dense_row(r), out);
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

/// Raw output pointer shared by the tasks of one call (matmul, attention);
/// each task writes a disjoint set of elements.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub *mut f32);
// SAFETY: tasks write disjoint elements and the call waits for all of them.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper).
    pub fn get(self) -> *mut f32 {
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

/// [`matmul`] on an explicit instruction-set path (tests and benchmarks
/// compare the paths; the caller must know the CPU supports it).
pub fn matmul_on(isa: Isa, pool: &ThreadPool, w: &QMatrix, x: &[f32], m: usize, out: &mut [f32], scratch: &mut MatmulScratch) {
    let (n, k) = (w.rows, w.cols);
    assert_eq!(x.len(), m * k, "x must hold m rows of w.cols() values");
    assert_eq!(out.len(), m * n, "out must hold m rows of w.rows() values");
    assert!(isa.supported(), "the {} path needs CPU features this machine lacks", isa.name());
    if m == 0 || n == 0 {
        return;
    }
    if !w.format.is_blocked() {
        return dense_matmul(isa, pool, w, x, m, out);
    }
    scratch.act.quantize_on(isa, x, m, k);
    let act = &scratch.act;
    let groups = n.div_ceil(GROUP);
    let chunk = groups_per_task(groups, pool.n_threads());
    let n_tasks = groups.div_ceil(chunk);
    let out_ptr = OutPtr(out.as_mut_ptr());
    // Rows per block: the block's activations stay in L1 while every group of
    // the task's chunk passes over them.
    let row_block = (ROW_BLOCK_BYTES / k).max(16);
    pool.run(n_tasks, |t| {
        let g0 = t * chunk;
        let g1 = (g0 + chunk).min(groups);
        for r0 in (0..m).step_by(row_block) {
            let job = Groups { w, act, g0, g1, r0, m: (m - r0).min(row_block), out: out_ptr.get(), n };
            run_groups(isa, &job);
        }
    });
}

/// Bytes of quantized activations kept hot per row block.
const ROW_BLOCK_BYTES: usize = 32 * 1024;

/// Groups per task: enough tasks to balance threads, and long enough runs
/// that each task's weight stream gets going (every task starts with cache
/// misses the prefetch has not covered; a layer's small matrices cut into
/// 16 tasks per thread spent a third of their time there).
fn groups_per_task(groups: usize, threads: usize) -> usize {
    (groups / (threads * TASKS_PER_THREAD)).clamp(MIN_GROUPS_PER_TASK, 256)
}

const TASKS_PER_THREAD: usize = 4;
const MIN_GROUPS_PER_TASK: usize = 6;

/// Groups `g0..g1` of a block-format matrix against activation rows
/// `r0..r0 + m`; results go to `out[r * n + j]`, each written by one task.
pub(crate) struct Groups<'a> {
    pub w: &'a QMatrix,
    pub act: &'a ActBlocks,
    pub g0: usize,
    pub g1: usize,
    pub r0: usize,
    pub m: usize,
    pub out: *mut f32,
    pub n: usize,
}

impl Groups<'_> {
    /// Output columns of group `g` that exist (the last group may be padded).
    pub fn valid(&self, g: usize) -> usize {
        (self.n - g * GROUP).min(GROUP)
    }
}

/// Splits `m` rows starting at `r0` into tiles of at most `cap`, as even as
/// possible: `(first row, rows)` of each. (An iterator, not a callback: a
/// closure would not inherit the SIMD kernels' target features.)
#[inline(always)]
pub(crate) fn tiles(r0: usize, m: usize, cap: usize) -> impl Iterator<Item = (usize, usize)> {
    let n_tiles = m.div_ceil(cap);
    let (base, extra) = (m / n_tiles.max(1), m % n_tiles.max(1));
    (0..n_tiles).map(move |ti| (r0 + ti * base + ti.min(extra), base + usize::from(ti < extra)))
}

fn run_groups(isa: Isa, job: &Groups<'_>) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY (all three): `matmul_on` checked that the CPU supports the
        // path; `out` covers every (row, column) of the job.
        Isa::Avx512 => unsafe { crate::x86::qgemm::groups_avx512(job) },
        #[cfg(target_arch = "x86_64")]
        Isa::Vnni256 => unsafe { crate::x86::qgemm::groups_vnni256(job) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { crate::x86::qgemm::groups_avx2(job) },
        _ => groups_ref(job),
    }
}

/// Portable twin of the SIMD group kernels.
pub(crate) fn groups_ref(job: &Groups<'_>) {
    let nb = job.w.cols / BLOCK;
    for g in job.g0..job.g1 {
        let data = job.w.group(g);
        for r in job.r0..job.r0 + job.m {
            let res = group_row_ref(job.w.format, data, nb, job.act, r);
            for (l, v) in res[..job.valid(g)].iter().enumerate() {
                // SAFETY: the job owns these columns of row r of `out`.
                unsafe { *job.out.add(r * job.n + g * GROUP + l) = *v };
            }
        }
    }
}

/// One activation row against the 16 rows of a group, in the order of the
/// module docs.
pub(crate) fn group_row_ref(format: Format, data: &[u8], nb: usize, act: &ActBlocks, r: usize) -> [f32; GROUP] {
    let gbb = interleave::group_block_bytes(format);
    let qsb = interleave::group_qs_bytes(format);
    let q = act.row(r);
    let mut res = [0f32; GROUP];
    for (l, out) in res.iter_mut().enumerate() {
        let mut acc = 0f32;
        for b in 0..nb {
            let blk = &data[b * gbb..(b + 1) * gbb];
            let qa = &q[b * BLOCK..(b + 1) * BLOCK];
            let at = r * act.stride + b;
            let byte = |c: usize, t: usize| blk[c * interleave::CHUNK + 4 * l + t];
            let dot: i32 = match format {
                Format::Q8_0 => (0..8)
                    .flat_map(|c| (0..4).map(move |t| (c, t)))
                    .map(|(c, t)| ((byte(c, t) ^ 0x80) as i8 as i32) * qa[4 * c + t] as i32)
                    .sum(),
                _ => {
                    let nibbles: i32 = (0..4)
                        .flat_map(|c| (0..4).map(move |t| (c, t)))
                        .map(|(c, t)| {
                            (byte(c, t) & 0x0F) as i32 * qa[4 * c + t] as i32 + (byte(c, t) >> 4) as i32 * qa[16 + 4 * c + t] as i32
                        })
                        .sum();
                    if format == Format::Q4_0 {
                        nibbles - 8 * act.isum[at]
                    } else {
                        nibbles
                    }
                }
            };
            let dw = read_f16(blk, qsb + 2 * l);
            acc = (dot as f32).mul_add(dw * act.d[at], acc);
            if format == Format::Q4_1 {
                acc = read_f16(blk, qsb + 2 * GROUP + 2 * l).mul_add(act.s[at], acc);
            }
        }
        *out = acc;
    }
    res
}

/// Dense formats: each task a run of output columns, tiles of up to four
/// rows sharing each weight load.
fn dense_matmul(isa: Isa, pool: &ThreadPool, w: &QMatrix, x: &[f32], m: usize, out: &mut [f32]) {
    let n = w.rows;
    let chunk = (n / (pool.n_threads() * 8)).clamp(4, 4096) / 4 * 4;
    let n_tasks = n.div_ceil(chunk);
    let out_ptr = OutPtr(out.as_mut_ptr());
    pool.run(n_tasks, |t| {
        let j0 = t * chunk;
        let j1 = (j0 + chunk).min(n);
        for (r0, rt) in tiles(0, m, DENSE_TILE) {
            let tile = Tile { w, x, r0, rt, out: out_ptr.get(), n };
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: every SIMD path includes AVX2, FMA and F16C, which
                // `matmul_on` checked; `out` covers the tile's columns.
                i if i.has_avx2() => unsafe { crate::x86::avx2::dense_cols(&tile, j0, j1) },
                _ => dense_cols_ref(&tile, j0, j1),
            }
        }
    });
}

/// Activation rows per dense tile (each weight load serves all of them).
pub(crate) const DENSE_TILE: usize = 4;

/// One tile of activation rows (`r0..r0 + rt`) of a dense matmul and where
/// its results go: `out[r * n + j]`, written by exactly one task per column.
pub(crate) struct Tile<'a> {
    pub w: &'a QMatrix,
    pub x: &'a [f32],
    pub r0: usize,
    pub rt: usize,
    pub out: *mut f32,
    pub n: usize,
}

/// Portable twin of [`crate::x86::avx2::dense_cols`]: the same 16 partial
/// sums (lane `l` takes columns `c` with `c % 16 == l`, then a last run of
/// eight into lanes 0-7), the same pairwise reduction, then the same
/// sequential tail.
pub(crate) fn dense_cols_ref(t: &Tile<'_>, j0: usize, j1: usize) {
    let k = t.w.cols;
    for j in j0..j1 {
        let wrow = t.w.dense_row(j);
        let wv = |c: usize| {
            if t.w.format == Format::F32 {
                f32::from_le_bytes([wrow[4 * c], wrow[4 * c + 1], wrow[4 * c + 2], wrow[4 * c + 3]])
            } else {
                read_f16(wrow, 2 * c)
            }
        };
        for i in 0..t.rt {
            let xr = &t.x[(t.r0 + i) * k..(t.r0 + i + 1) * k];
            let mut lanes = [0f32; 16];
            let mut c = 0;
            while c + 16 <= k {
                for (l, a) in lanes.iter_mut().enumerate() {
                    *a = wv(c + l).mul_add(xr[c + l], *a);
                }
                c += 16;
            }
            if c + 8 <= k {
                for (l, a) in lanes[..8].iter_mut().enumerate() {
                    *a = wv(c + l).mul_add(xr[c + l], *a);
                }
                c += 8;
            }
            let v: [f32; 8] = std::array::from_fn(|l| lanes[l] + lanes[8 + l]);
            let v4: [f32; 4] = std::array::from_fn(|l| v[l] + v[4 + l]);
            let mut s = (v4[0] + v4[2]) + (v4[1] + v4[3]);
            for (cc, xv) in xr.iter().enumerate().skip(c) {
                s += wv(cc) * xv;
            }
            // SAFETY: the caller owns column j of rows r0..r0 + rt of `out`.
            unsafe { *t.out.add((t.r0 + i) * t.n + j) = s };
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

    use crate::FORMATS;

    /// Every path this CPU has, saying which it lacks.
    pub(crate) fn paths() -> Vec<Isa> {
        let (have, lack): (Vec<Isa>, Vec<Isa>) = Isa::ALL.into_iter().partition(|i| i.supported());
        let names = |v: &[Isa]| v.iter().map(|i| i.name()).collect::<Vec<_>>().join(", ");
        println!(
            "paths run: {}; skipped (the CPU lacks them): {}",
            names(&have),
            if lack.is_empty() { "none".into() } else { names(&lack) }
        );
        have
    }

    #[test]
    fn every_format_matches_an_f64_reference_within_the_activation_quantization_bound() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let pool = ThreadPool::new(2);
        let paths = paths();
        for &format in &FORMATS {
            for &(n, k) in &[(1usize, 32usize), (7, 64), (16, 64), (33, 96), (70, 576)] {
                let k = if format.is_blocked() { k } else { k + 3 };
                let w = QMatrix::quantize(format, n, k, &random_matrix(&mut rng, n, k)).unwrap();
                for m in [1usize, 2, 3, 4, 5, 9, 16] {
                    let x = random_matrix(&mut rng, m, k);
                    let want = reference(&w, &x, m);
                    let mut portable = vec![0f32; m * n];
                    matmul_on(Isa::Portable, &pool, &w, &x, m, &mut portable, &mut MatmulScratch::default());
                    for &isa_ in &paths {
                        let mut out = vec![0f32; m * n];
                        matmul_on(isa_, &pool, &w, &x, m, &mut out, &mut MatmulScratch::default());
                        for (i, (a, b)) in out.iter().zip(&portable).enumerate() {
                            assert_eq!(
                                a.to_bits(),
                                b.to_bits(),
                                "{format:?} {isa_:?} n={n} k={k} m={m} element {i}: not the portable bits"
                            );
                        }
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
        for isa_ in paths() {
            for &format in &FORMATS {
                let (n, k) = (37, 192);
                let w = QMatrix::quantize(format, n, k, &random_matrix(&mut rng, n, k)).unwrap();
                let x = random_matrix(&mut rng, 16, k);
                let mut scratch = MatmulScratch::default();
                let mut alone = vec![0f32; 16 * n];
                for r in 0..16 {
                    matmul_on(isa_, &pool, &w, &x[r * k..(r + 1) * k], 1, &mut alone[r * n..(r + 1) * n], &mut scratch);
                }
                for m in 1..=16 {
                    let mut out = vec![0f32; m * n];
                    matmul_on(isa_, &pool, &w, &x[..m * k], m, &mut out, &mut scratch);
                    for (i, (a, b)) in out.iter().zip(&alone[..m * n]).enumerate() {
                        assert_eq!(a.to_bits(), b.to_bits(), "{format:?} {isa_:?} m={m} element {i}");
                    }
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
            let mut portable = vec![0f32; m * n];
            matmul_on(Isa::Portable, &pool, &w, &x, m, &mut portable, &mut MatmulScratch::default());
            for isa_ in Isa::ALL.into_iter().filter(|i| i.supported()) {
                let mut scratch = MatmulScratch::default();
                let mut out = vec![0f32; m * n];
                matmul_on(isa_, &pool, &w, &x, m, &mut out, &mut scratch);
                prop_assert!(out.iter().zip(&portable).all(|(a, b)| a.to_bits() == b.to_bits()), "{:?} {:?} n={} k={} m={}: not the portable bits", format, isa_, n, k, m);
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
