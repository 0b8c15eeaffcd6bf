//! Fused attention of new rows against a paged KV cache.
//!
//! The cache is a set of pages in one arena (see [`KvSource`]): page `p` holds
//! [`PAGE`] entries of one (sequence, layer, KV head): first the keys,
//! transposed (`head_dim` rows of `PAGE` values: key `t`, dimension `c` at
//! `c * PAGE + t`), then the values, one `head_dim`-wide row per entry. A
//! sequence's new rows have already been appended to its cache when
//! [`attend`] runs, so row `j` of `n` new rows sees the first
//! `len - (n - 1 - j)` entries of each head (causal within the new rows).
//!
//! One task handles a block of queries (rows times the query heads sharing a
//! KV head) and walks the pages once for all of them: each page's keys and
//! values are read once per block, not once per query. Scores, softmax and
//! the weighted sum of values run in one pass per page (online softmax), so
//! no score matrix is stored. Transposed keys let the scores of eight keys
//! come out of one vector of FMAs, with no horizontal sums. Each query's
//! arithmetic is the same whatever else is in its block or call (batch
//! invariance).

use half::f16;

use crate::cpu::{isa, Isa};
// Tasks write disjoint (row, head) slices through it; the call waits for all.
use crate::matmul::OutPtr;
use crate::pool::ThreadPool;

/// Entries per page (the kernels' page layout is fixed at 16).
pub const PAGE: usize = 16;
/// Queries per task (state for each stays in L1).
pub const QUERY_BLOCK: usize = 16;
/// Largest head dimension the kernels accept.
pub const MAX_HEAD_DIM: usize = 256;

/// Element type of the KV cache.
pub trait KvElem: Copy + Send + Sync + 'static {
    /// Converts to `f32`.
    fn to_f32(self) -> f32;
    /// Converts from `f32` (rounding to nearest).
    fn from_f32(v: f32) -> Self;
    /// Which SIMD load to use.
    const KIND: KvKind;
    /// Converts a slice to `f32` (`dst.len() >= src.len()`).
    fn slice_to_f32(src: &[Self], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
    }
}

/// Storage kinds of KV elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvKind {
    /// `f32`.
    F32,
    /// IEEE half.
    F16,
}

impl KvElem for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
    const KIND: KvKind = KvKind::F32;
}

impl KvElem for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    const KIND: KvKind = KvKind::F16;
    fn slice_to_f32(src: &[Self], dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        src.convert_to_f32_slice(&mut dst[..src.len()]);
    }
}

/// Where the cache of each (sequence, KV head) of one layer lives.
pub trait KvSource: Sync {
    /// Element type.
    type Elem: KvElem;
    /// The page arena.
    fn arena(&self) -> &[Self::Elem];
    /// Page ids and the number of valid entries of `kv_head` of the call's
    /// sequence number `seq` (an index into [`AttnSeq`] order).
    fn head(&self, seq: usize, kv_head: usize) -> (&[u32], usize);
}

/// Shape of the attention.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    /// Query heads.
    pub n_heads: usize,
    /// KV heads (`n_heads % n_kv_heads == 0`).
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Entries per page; must be [`PAGE`].
    pub page_size: usize,
    /// Score scale, usually `1/sqrt(head_dim)`.
    pub scale: f32,
}

impl AttnShape {
    /// Elements of one page (keys then values).
    pub fn page_elems(&self) -> usize {
        2 * self.page_size * self.head_dim
    }
}

/// The new rows of one sequence in a call: rows `row0..row0 + n_rows` of the
/// query and output buffers.
#[derive(Debug, Clone, Copy)]
pub struct AttnSeq {
    /// First row in the batch.
    pub row0: usize,
    /// Number of consecutive rows.
    pub n_rows: usize,
}

/// Attention for every (sequence, query head) of a batch.
///
/// `q` holds the batch's rows, `q_stride` floats apart, query head `h` at
/// offset `h * head_dim`; `out` is written with the same layout and
/// `out_stride`.
#[allow(clippy::too_many_arguments)]
pub fn attend<S: KvSource>(
    pool: &ThreadPool,
    shape: &AttnShape,
    seqs: &[AttnSeq],
    kv: &S,
    q: &[f32],
    q_stride: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    attend_on(isa(), pool, shape, seqs, kv, q, q_stride, out, out_stride)
}

/// [`attend`] on an explicit instruction set (tests compare the twins).
#[allow(clippy::too_many_arguments)]
pub fn attend_on<S: KvSource>(
    isa: Isa,
    pool: &ThreadPool,
    shape: &AttnShape,
    seqs: &[AttnSeq],
    kv: &S,
    q: &[f32],
    q_stride: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    assert!(shape.page_size == PAGE && shape.head_dim <= MAX_HEAD_DIM && shape.head_dim.is_multiple_of(8));
    assert_eq!(shape.n_heads % shape.n_kv_heads, 0);
    let (group, d) = (shape.n_heads / shape.n_kv_heads, shape.head_dim);
    let blocks_of = |s: &AttnSeq| (s.n_rows * group).div_ceil(QUERY_BLOCK);
    let whole_tasks: usize = seqs.iter().map(|s| blocks_of(s) * shape.n_kv_heads).sum();
    // Too few tasks to keep every thread busy (one decode or verify step):
    // each segment becomes a task of its own and the segments' states are
    // merged afterwards, in the order a whole task merges them.
    let split = whole_tasks < 2 * pool.n_threads();
    let segs_of: Vec<usize> = seqs
        .iter()
        .enumerate()
        .map(|(si, _)| {
            if !split {
                return 1;
            }
            let len = (0..shape.n_kv_heads).map(|g| kv.head(si, g).1).max().unwrap_or(0);
            len.div_ceil(SEGMENT).max(1)
        })
        .collect();
    let n_tasks: usize = seqs.iter().zip(&segs_of).map(|(s, n)| blocks_of(s) * shape.n_kv_heads * n).sum();
    // Split calls keep each (row, head, segment) state here: `m`, `l`, then
    // `head_dim` weighted values.
    let state_len = d + 2;
    let state_base: Vec<usize> = seqs
        .iter()
        .zip(&segs_of)
        .scan(0, |at, (s, n)| {
            let b = *at;
            *at += s.n_rows * shape.n_heads * n;
            Some(b)
        })
        .collect();
    let mut states = if split {
        vec![0f32; seqs.iter().zip(&segs_of).map(|(s, n)| s.n_rows * shape.n_heads * n).sum::<usize>() * state_len]
    } else {
        Vec::new()
    };
    let states_ptr = OutPtr(states.as_mut_ptr());
    let out_ptr = OutPtr(out.as_mut_ptr());
    let out_len = out.len();
    let arena = kv.arena();
    pool.run(n_tasks, |t| {
        // Find the task's sequence, KV head, query block and segment.
        let mut t = t;
        let mut si = 0;
        while t >= blocks_of(&seqs[si]) * shape.n_kv_heads * segs_of[si] {
            t -= blocks_of(&seqs[si]) * shape.n_kv_heads * segs_of[si];
            si += 1;
        }
        let seq = seqs[si];
        let n_segs = segs_of[si];
        let (t, seg) = (t / n_segs, t % n_segs);
        let (g, b) = (t / blocks_of(&seq), t % blocks_of(&seq));
        let (pages, len) = kv.head(si, g);
        let q0 = b * QUERY_BLOCK;
        let nq = (seq.n_rows * group - q0).min(QUERY_BLOCK);
        let pages =
            if split { &pages[(seg * SEGMENT_PAGES).min(pages.len())..((seg + 1) * SEGMENT_PAGES).min(pages.len())] } else { pages };
        let mut block = QueryBlock {
            n: nq,
            t0: if split { seg * SEGMENT } else { 0 },
            ctx: [0; QUERY_BLOCK],
            q: [&[][..]; QUERY_BLOCK],
            out: [std::ptr::null_mut(); QUERY_BLOCK],
            state: split,
        };
        for i in 0..nq {
            let (j, h) = ((q0 + i) / group, g * group + (q0 + i) % group);
            let r = seq.row0 + j;
            block.ctx[i] = len - (seq.n_rows - 1 - j);
            block.q[i] = &q[r * q_stride + h * d..][..d];
            // SAFETY (both): (row, head) slices and (row, head, segment)
            // states are disjoint across tasks and inside their buffers.
            block.out[i] = if split {
                let at = (state_base[si] + (j * shape.n_heads + h) * n_segs + seg) * state_len;
                assert!(at + state_len <= states.len());
                unsafe { states_ptr.get().add(at) }
            } else {
                let at = r * out_stride + h * d;
                assert!(at + d <= out_len);
                unsafe { out_ptr.get().add(at) }
            };
        }
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: every SIMD path includes AVX2, FMA and F16C
            // and F16C; every `out` pointer covers what `state` says.
            i if i.has_avx2() => unsafe { crate::x86::avx2::attend_block(shape, arena, pages, &block) },
            _ => attend_block_ref(shape, arena, pages, &block),
        }
    });
    if !split {
        return;
    }
    let mut acc = [0f32; MAX_HEAD_DIM];
    for ((seq, &n_segs), &base) in seqs.iter().zip(&segs_of).zip(&state_base) {
        for j in 0..seq.n_rows {
            for h in 0..shape.n_heads {
                let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
                acc[..d].fill(0.0);
                for seg in 0..n_segs {
                    let st = &states[(base + (j * shape.n_heads + h) * n_segs + seg) * state_len..][..state_len];
                    merge_state(&mut m, &mut l, &mut acc[..d], st[0], st[1], &st[2..]);
                }
                let at = (seq.row0 + j) * out_stride + h * d;
                normalize(&acc[..d], l, &mut out[at..at + d]);
            }
        }
    }
}

/// Entries per segment: the unit of work a query's context is split into
/// when a call has too few tasks for the threads, and the unit whose softmax
/// state every path computes on its own and then merges in order (so a row's
/// bits never depend on whether its call was split).
pub const SEGMENT_PAGES: usize = 16;
const SEGMENT: usize = SEGMENT_PAGES * PAGE;

/// Folds the softmax state of a later segment (`mb`, `lb`, `acc_b`: its
/// largest score, sum of `exp(score - mb)` and weighted values) into a
/// running one. An empty segment (`mb` = -inf) changes nothing; an empty
/// running state takes the segment's exactly.
#[inline]
pub(crate) fn merge_state(m: &mut f32, l: &mut f32, acc: &mut [f32], mb: f32, lb: f32, acc_b: &[f32]) {
    if mb == f32::NEG_INFINITY {
        return;
    }
    let mn = m.max(mb);
    let (fa, fb) = ((*m - mn).exp(), (mb - mn).exp());
    *l = *l * fa + lb * fb;
    for (a, b) in acc.iter_mut().zip(acc_b) {
        *a = *a * fa + *b * fb;
    }
    *m = mn;
}

/// The attention output from a final state: `acc / l` (0 for an empty one).
#[inline]
pub(crate) fn normalize(acc: &[f32], l: f32, out: &mut [f32]) {
    let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
    for (o, a) in out.iter_mut().zip(acc) {
        *o = a * inv;
    }
}

/// The queries of one task, against pages that start at entry `t0`.
pub(crate) struct QueryBlock<'a> {
    /// Queries in the block.
    pub n: usize,
    /// The entry the task's first page holds (a multiple of [`SEGMENT`]).
    pub t0: usize,
    /// Entries each query sees (counted from the sequence's first).
    pub ctx: [usize; QUERY_BLOCK],
    /// Each query's `head_dim` values.
    pub q: [&'a [f32]; QUERY_BLOCK],
    /// Where each query's result goes: `head_dim` floats of output, or with
    /// `state` its unnormalized state (`m`, `l`, `head_dim` values).
    pub out: [*mut f32; QUERY_BLOCK],
    /// Whether the task writes states (split call) instead of outputs.
    pub state: bool,
}

impl QueryBlock<'_> {
    /// Writes query `i`'s result: the state, or its normalized output.
    ///
    /// # Safety
    /// `out[i]` must cover `d + 2` floats (state) or `d` floats (output).
    pub(crate) unsafe fn finish(&self, i: usize, m: f32, l: f32, acc: &[f32]) {
        let d = acc.len();
        if self.state {
            let st = std::slice::from_raw_parts_mut(self.out[i], d + 2);
            st[0] = m;
            st[1] = l;
            st[2..].copy_from_slice(acc);
        } else {
            normalize(acc, l, std::slice::from_raw_parts_mut(self.out[i], d));
        }
    }
}

/// Portable twin of the SIMD block kernel: the same page-wise online
/// softmax, query by query, segment by segment.
pub(crate) fn attend_block_ref<T: KvElem>(shape: &AttnShape, arena: &[T], pages: &[u32], block: &QueryBlock<'_>) {
    let d = shape.head_dim;
    for i in 0..block.n {
        let (q, ctx) = (block.q[i], block.ctx[i]);
        let mut total = [0f32; MAX_HEAD_DIM];
        let (mut tm, mut tl) = (f32::NEG_INFINITY, 0f32);
        let mut acc = [0f32; MAX_HEAD_DIM];
        let mut s = [0f32; PAGE];
        let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
        let mut t0 = block.t0;
        for &p in pages {
            if t0 >= ctx {
                break;
            }
            let n = (ctx - t0).min(PAGE);
            let base = p as usize * shape.page_elems();
            let mut bm = f32::NEG_INFINITY;
            for (t, st) in s[..n].iter_mut().enumerate() {
                *st = (0..d).map(|c| q[c] * arena[base + c * PAGE + t].to_f32()).sum::<f32>() * shape.scale;
                bm = bm.max(*st);
            }
            if bm > m {
                let f = (m - bm).exp();
                l *= f;
                for a in acc[..d].iter_mut() {
                    *a *= f;
                }
                m = bm;
            }
            for (t, st) in s[..n].iter().enumerate() {
                let pr = (st - m).exp();
                l += pr;
                let v = &arena[base + PAGE * d + t * d..][..d];
                for (a, vv) in acc[..d].iter_mut().zip(v) {
                    *a += pr * vv.to_f32();
                }
            }
            t0 += PAGE;
            if t0.is_multiple_of(SEGMENT) || t0 >= ctx {
                merge_state(&mut tm, &mut tl, &mut total[..d], m, l, &acc[..d]);
                (m, l) = (f32::NEG_INFINITY, 0.0);
                acc[..d].fill(0.0);
            }
        }
        // SAFETY: `out[i]` covers what `state` says (see `attend_on`).
        unsafe { block.finish(i, tm, tl, &total[..d]) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};

    struct TestKv<T> {
        arena: Vec<T>,
        heads: Vec<Vec<(Vec<u32>, usize)>>, // [seq][kv_head]
    }
    impl<T: KvElem> KvSource for TestKv<T> {
        type Elem = T;
        fn arena(&self) -> &[T] {
            &self.arena
        }
        fn head(&self, seq: usize, kv_head: usize) -> (&[u32], usize) {
            let (p, l) = &self.heads[seq][kv_head];
            (p, *l)
        }
    }

    /// Builds a cache with shuffled page ids and returns it with the dense
    /// keys/values per (seq, kv head) for the reference.
    #[allow(clippy::type_complexity)]
    fn build<T: KvElem>(rng: &mut rand::rngs::StdRng, shape: &AttnShape, lens: &[usize]) -> (TestKv<T>, Vec<Vec<(Vec<f32>, Vec<f32>)>>) {
        let (d, ps) = (shape.head_dim, shape.page_size);
        let total_pages: usize = lens.iter().map(|l| l.div_ceil(ps) * shape.n_kv_heads).sum();
        let mut ids: Vec<u32> = (0..total_pages as u32).collect();
        for i in (1..ids.len()).rev() {
            ids.swap(i, rng.random_range(0..=i));
        }
        let mut arena = vec![T::from_f32(0.0); total_pages * shape.page_elems()];
        let mut next = 0;
        let mut heads = Vec::new();
        let mut dense = Vec::new();
        for &len in lens {
            let mut hs = Vec::new();
            let mut ds = Vec::new();
            for _ in 0..shape.n_kv_heads {
                let np = len.div_ceil(ps);
                let pages: Vec<u32> = ids[next..next + np].to_vec();
                next += np;
                let mut kd = vec![0f32; len * d];
                let mut vd = vec![0f32; len * d];
                for t in 0..len {
                    let base = pages[t / ps] as usize * shape.page_elems();
                    for c in 0..d {
                        let k = T::from_f32(rng.random_range(-1.0f32..1.0));
                        let v = T::from_f32(rng.random_range(-1.0f32..1.0));
                        // Keys transposed, values row by row.
                        arena[base + c * ps + t % ps] = k;
                        arena[base + ps * d + (t % ps) * d + c] = v;
                        kd[t * d + c] = k.to_f32();
                        vd[t * d + c] = v.to_f32();
                    }
                }
                hs.push((pages, len));
                ds.push((kd, vd));
            }
            heads.push(hs);
            dense.push(ds);
        }
        (TestKv { arena, heads }, dense)
    }

    fn reference(shape: &AttnShape, k: &[f32], v: &[f32], ctx: usize, q: &[f32]) -> Vec<f64> {
        let d = shape.head_dim;
        let s: Vec<f64> = (0..ctx).map(|t| (0..d).map(|c| q[c] as f64 * k[t * d + c] as f64).sum::<f64>() * shape.scale as f64).collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = e.iter().sum();
        (0..d).map(|c| (0..ctx).map(|t| e[t] * v[t * d + c] as f64).sum::<f64>() / z).collect()
    }

    fn check<T: KvElem>(seed: u64) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let pool = ThreadPool::new(2);
        for &(nh, nkv, d, ps) in
            &[(9usize, 3usize, 64usize, PAGE), (4, 4, 32, PAGE), (8, 2, 128, PAGE), (2, 1, 64, PAGE), (16, 1, 64, PAGE)]
        {
            let shape = AttnShape { n_heads: nh, n_kv_heads: nkv, head_dim: d, page_size: ps, scale: 1.0 / (d as f32).sqrt() };
            // 300 and 700 entries span two and three segments; alone, those
            // sequences' calls have fewer tasks than 2 x threads and split.
            let lens = [1usize, 17, 300, 700, 70];
            let rows = [1usize, 3, 5, 1, 40];
            let (kv, dense) = build::<T>(&mut rng, &shape, &lens);
            let mut seqs = Vec::new();
            let mut row0 = 0;
            for &n in &rows {
                seqs.push(AttnSeq { row0, n_rows: n });
                row0 += n;
            }
            let q: Vec<f32> = (0..row0 * nh * d).map(|_| rng.random_range(-2.0f32..2.0)).collect();
            for isa_ in Isa::ALL.into_iter().filter(|i| i.supported()) {
                let mut out = vec![0f32; row0 * nh * d];
                attend_on(isa_, &pool, &shape, &seqs, &kv, &q, nh * d, &mut out, nh * d);
                for (si, s) in seqs.iter().enumerate() {
                    for j in 0..s.n_rows {
                        let ctx = lens[si] - (s.n_rows - 1 - j);
                        for h in 0..nh {
                            let (kd, vd) = &dense[si][h / (nh / nkv)];
                            let r = s.row0 + j;
                            let want = reference(&shape, kd, vd, ctx, &q[r * nh * d + h * d..][..d]);
                            let got = &out[r * nh * d + h * d..][..d];
                            for c in 0..d {
                                assert!(
                                    (got[c] as f64 - want[c]).abs() < 1e-4,
                                    "{isa_:?} seq {si} row {j} head {h}: {} vs {}",
                                    got[c],
                                    want[c]
                                );
                            }
                        }
                    }
                }
                // Each sequence alone (a call of few tasks, split by
                // segments) gives the bits it got in the batch (not split).
                for (si, s) in seqs.iter().enumerate() {
                    let alone = TestKv { arena: kv.arena.clone(), heads: vec![kv.heads[si].clone()] };
                    let w = nh * d;
                    let mut one = vec![0f32; s.n_rows * w];
                    let q_s = &q[s.row0 * w..(s.row0 + s.n_rows) * w];
                    attend_on(isa_, &pool, &shape, &[AttnSeq { row0: 0, n_rows: s.n_rows }], &alone, q_s, w, &mut one, w);
                    for (c, v) in one.iter().enumerate() {
                        assert_eq!(v.to_bits(), out[s.row0 * w + c].to_bits(), "{isa_:?} seq {si} alone, element {c}");
                    }
                }
            }
        }
    }

    #[test]
    fn matches_an_f64_reference_with_f32_cache() {
        check::<f32>(11);
    }

    #[test]
    fn matches_an_f64_reference_with_f16_cache() {
        check::<f16>(12);
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_or_with_other_rows() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let pool = ThreadPool::new(2);
        let shape = AttnShape { n_heads: 9, n_kv_heads: 3, head_dim: 64, page_size: 16, scale: 0.125 };
        let (kv, _) = build::<f16>(&mut rng, &shape, &[40]);
        let w = 9 * 64;
        let q: Vec<f32> = (0..5 * w).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        let mut all = vec![0f32; 5 * w];
        attend(&pool, &shape, &[AttnSeq { row0: 0, n_rows: 5 }], &kv, &q, w, &mut all, w);
        // Row j alone sees a cache of 40 - (4 - j) entries.
        for j in 0..5 {
            let mut kv_j = TestKv { arena: kv.arena.clone(), heads: kv.heads.clone() };
            for h in kv_j.heads[0].iter_mut() {
                h.1 = 40 - (4 - j);
            }
            let mut one = vec![0f32; w];
            attend(&pool, &shape, &[AttnSeq { row0: 0, n_rows: 1 }], &kv_j, &q[j * w..(j + 1) * w], w, &mut one, w);
            for c in 0..w {
                assert_eq!(one[c].to_bits(), all[j * w + c].to_bits(), "row {j} element {c}");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..Default::default() })]

        /// Any GQA shape, cache length (one page to several segments) and number
        /// of new rows: each row within 1e-4 of an f64 softmax attention over the
        /// entries it sees, and each row the same bits when its sequence is
        /// alone as when it shares the call with another sequence.
        #[test]
        fn attention_matches_the_reference_and_sequences_are_independent(
            group in 1usize..5, n_kv in 1usize..4, wide in any::<bool>(), len in 1usize..700, rows in 1usize..10,
            other in 1usize..300, seed in any::<u64>()
        ) {
            let d = if wide { 64 } else { 32 };
            let rows = rows.min(len);
            let shape = AttnShape { n_heads: group * n_kv, n_kv_heads: n_kv, head_dim: d, page_size: PAGE, scale: 1.0 / (d as f32).sqrt() };
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let (kv, dense) = build::<f16>(&mut rng, &shape, &[len, other]);
            let w = shape.n_heads * d;
            let q: Vec<f32> = (0..(rows + 1) * w).map(|_| rng.random_range(-2.0f32..2.0)).collect();
            let pool = ThreadPool::new(2);
            for isa_ in Isa::ALL.into_iter().filter(|i| i.supported()) {
                // Our sequence's rows, then one row of another sequence.
                let mut both = vec![0f32; (rows + 1) * w];
                attend_on(isa_, &pool, &shape, &[AttnSeq { row0: 0, n_rows: rows }, AttnSeq { row0: rows, n_rows: 1 }], &kv, &q, w, &mut both, w);
                let alone_kv = TestKv { arena: kv.arena.clone(), heads: vec![kv.heads[0].clone()] };
                let mut alone = vec![0f32; rows * w];
                attend_on(isa_, &pool, &shape, &[AttnSeq { row0: 0, n_rows: rows }], &alone_kv, &q[..rows * w], w, &mut alone, w);
                for j in 0..rows {
                    let ctx = len - (rows - 1 - j);
                    for h in 0..shape.n_heads {
                        let (kd, vd) = &dense[0][h / group];
                        let want = reference(&shape, kd, vd, ctx, &q[j * w + h * d..][..d]);
                        for c in 0..d {
                            let want = want[c];
                            let got = both[j * w + h * d + c];
                            prop_assert!((got as f64 - want).abs() < 1e-4, "{:?} len {} rows {} row {} head {}: {} vs {}", isa_, len, rows, j, h, got, want);
                            prop_assert_eq!(got.to_bits(), alone[j * w + h * d + c].to_bits(), "{:?} row {} head {} alone", isa_, j, h);
                        }
                    }
                }
            }
        }
    }
}
