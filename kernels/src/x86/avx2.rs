//! AVX2 + FMA + F16C kernels.
//!
//! Every function is `unsafe`: callers must have checked that the CPU has
//! AVX2, FMA and F16C (see [`crate::cpu::isa`]).

#![allow(clippy::missing_safety_doc, clippy::needless_range_loop)]

use std::arch::x86_64::*;

use crate::matmul::{Tile, DENSE_TILE};
use crate::quant::Format;

/// Horizontal sum of 8 lanes, in a fixed order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn hsum(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps(v, 1);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_at(p: *const u8) -> f32 {
    let bits = u16::from_le_bytes([*p, *p.add(1)]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_set1_epi16(bits as i16)))
}

/// Lane masks: row `n` keeps the first `n` lanes.
static LANE_MASK: [[i32; 8]; 9] = {
    let mut m = [[0i32; 8]; 9];
    let mut n = 0;
    while n <= 8 {
        let mut l = 0;
        while l < n {
            m[n][l] = -1;
            l += 1;
        }
        n += 1;
    }
    m
};

/// AVX2 twin of [`crate::matmul::dense_cols_ref`]: one tile of rows of a
/// dense (f32 or f16) matrix against columns `j0..j1`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dense_cols(t: &Tile<'_>, j0: usize, j1: usize) {
    let k = t.w.cols();
    macro_rules! dense_cols {
        ($ty:ty, $r:literal) => {
            for j in j0..j1 {
                let mut res = [0f32; DENSE_TILE];
                dense_tile::<$ty, $r>(t.w.dense_row(j), k, t.x, t.r0, &mut res);
                for (i, v) in res[..$r].iter().enumerate() {
                    *t.out.add((t.r0 + i) * t.n + j) = *v;
                }
            }
        };
    }
    macro_rules! dense_rows {
        ($ty:ty) => {
            match t.rt {
                1 => dense_cols!($ty, 1),
                2 => dense_cols!($ty, 2),
                3 => dense_cols!($ty, 3),
                _ => dense_cols!($ty, 4),
            }
        };
    }
    match t.w.format() {
        Format::F16 => dense_rows!(F16W),
        _ => dense_rows!(F32W),
    }
}

/// A dense weight element type.
trait DenseW {
    const BYTES: usize;
    unsafe fn load8(p: *const u8) -> __m256;
    unsafe fn load1(p: *const u8) -> f32;
}
struct F32W;
struct F16W;
impl DenseW for F32W {
    const BYTES: usize = 4;
    #[inline(always)]
    unsafe fn load8(p: *const u8) -> __m256 {
        _mm256_loadu_ps(p as *const f32)
    }
    #[inline(always)]
    unsafe fn load1(p: *const u8) -> f32 {
        (p as *const f32).read_unaligned()
    }
}
impl DenseW for F16W {
    const BYTES: usize = 2;
    #[inline(always)]
    unsafe fn load8(p: *const u8) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
    #[inline(always)]
    unsafe fn load1(p: *const u8) -> f32 {
        f16_at(p)
    }
}

#[inline(always)]
unsafe fn dense_tile<W: DenseW, const R: usize>(wrow: &[u8], k: usize, x: &[f32], r0: usize, res: &mut [f32; DENSE_TILE]) {
    debug_assert!(wrow.len() >= k * W::BYTES);
    let w = wrow.as_ptr();
    let xp = x.as_ptr();
    let mut acc0 = [_mm256_setzero_ps(); R];
    let mut acc1 = [_mm256_setzero_ps(); R];
    let mut c = 0;
    while c + 16 <= k {
        let w0 = W::load8(w.add(c * W::BYTES));
        let w1 = W::load8(w.add((c + 8) * W::BYTES));
        for i in 0..R {
            let xr = xp.add((r0 + i) * k + c);
            acc0[i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), acc0[i]);
            acc1[i] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr.add(8)), acc1[i]);
        }
        c += 16;
    }
    if c + 8 <= k {
        let w0 = W::load8(w.add(c * W::BYTES));
        for i in 0..R {
            acc0[i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp.add((r0 + i) * k + c)), acc0[i]);
        }
        c += 8;
    }
    for i in 0..R {
        let mut s = hsum(_mm256_add_ps(acc0[i], acc1[i]));
        for cc in c..k {
            s += W::load1(w.add(cc * W::BYTES)) * *xp.add((r0 + i) * k + cc);
        }
        res[i] = s;
    }
}

/// `out[i] = a · b` over `f32` slices of equal length, fixed reduction order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    let mut c = 0;
    while c + 16 <= n {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(c)), _mm256_loadu_ps(pb.add(c)), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(c + 8)), _mm256_loadu_ps(pb.add(c + 8)), acc1);
        c += 16;
    }
    if c + 8 <= n {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(c)), _mm256_loadu_ps(pb.add(c)), acc0);
        c += 8;
    }
    let mut s = hsum(_mm256_add_ps(acc0, acc1));
    while c < n {
        s += *pa.add(c) * *pb.add(c);
        c += 1;
    }
    s
}

/// `exp(x)` on 8 lanes (Cephes polynomial, relative error about 2e-7 for
/// `x` in [-87, 88]; lanes below -87 give 0).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn exp8(x: __m256) -> __m256 {
    let too_small = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0), _CMP_LT_OQ);
    let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0)), _mm256_set1_ps(88.0));
    let fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    let x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693_359_4), x);
    let x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.121_944_4e-4), x);
    let mut y = _mm256_set1_ps(1.987_569_1e-4);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.398_199_9e-3));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.333_452e-3));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.166_579_6e-2));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.666_666_5e-1));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(0.5));
    let x2 = _mm256_mul_ps(x, x);
    y = _mm256_fmadd_ps(y, x2, _mm256_add_ps(x, _mm256_set1_ps(1.0)));
    let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23));
    _mm256_andnot_ps(too_small, _mm256_mul_ps(y, pow2))
}

#[inline(always)]
unsafe fn load_kv8<T: crate::attention::KvElem>(p: *const T) -> __m256 {
    match T::KIND {
        crate::attention::KvKind::F32 => _mm256_loadu_ps(p as *const f32),
        crate::attention::KvKind::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
    }
}

/// Largest of 8 lanes, in a fixed order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hmax(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps(v, 1);
    let m = _mm_max_ps(lo, hi);
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_movehdup_ps(m));
    _mm_cvtss_f32(m)
}

/// `acc[u] += sum over t < n of p[t] * v[t * d + u]` for `nb` (less than 8)
/// vectors of eight, one vector at a time, `t` ascending.
#[inline(always)]
unsafe fn weigh_values(acc: *mut f32, v: *const f32, p: &[f32; crate::attention::PAGE], n: usize, d: usize, nb: usize) {
    for u in 0..nb {
        let mut r = _mm256_loadu_ps(acc.add(8 * u));
        for t in 0..n {
            r = _mm256_fmadd_ps(_mm256_broadcast_ss(&p[t]), _mm256_loadu_ps(v.add(t * d + 8 * u)), r);
        }
        _mm256_storeu_ps(acc.add(8 * u), r);
    }
}

/// [`weigh_values`] for eight vectors (64 dimensions), sums in registers.
#[inline(always)]
unsafe fn weigh_values8(acc: *mut f32, v: *const f32, p: &[f32; crate::attention::PAGE], n: usize, d: usize) {
    let mut r0 = _mm256_loadu_ps(acc);
    let mut r1 = _mm256_loadu_ps(acc.add(8));
    let mut r2 = _mm256_loadu_ps(acc.add(16));
    let mut r3 = _mm256_loadu_ps(acc.add(24));
    let mut r4 = _mm256_loadu_ps(acc.add(32));
    let mut r5 = _mm256_loadu_ps(acc.add(40));
    let mut r6 = _mm256_loadu_ps(acc.add(48));
    let mut r7 = _mm256_loadu_ps(acc.add(56));
    for t in 0..n {
        let pt = _mm256_broadcast_ss(&p[t]);
        let row = v.add(t * d);
        r0 = _mm256_fmadd_ps(pt, _mm256_loadu_ps(row), r0);
        r1 = _mm256_fmadd_ps(pt, _mm256_loadu_ps(row.add(8)), r1);
        r2 = _mm256_fmadd_ps(pt, _mm256_loadu_ps(row.add(16)), r2);
        r3 = _mm256_fmadd_ps(pt, _mm256_loadu_ps(row.add(24)), r3);
        r4 = _mm256_fmadd_ps(pt, _mm256_loadu_ps(row.add(32)), r4);
        r5 = _mm256_fmadd_ps(pt, _mm256_loadu_ps(row.add(40)), r5);
        r6 = _mm256_fmadd_ps(pt, _mm256_loadu_ps(row.add(48)), r6);
        r7 = _mm256_fmadd_ps(pt, _mm256_loadu_ps(row.add(56)), r7);
    }
    _mm256_storeu_ps(acc, r0);
    _mm256_storeu_ps(acc.add(8), r1);
    _mm256_storeu_ps(acc.add(16), r2);
    _mm256_storeu_ps(acc.add(24), r3);
    _mm256_storeu_ps(acc.add(32), r4);
    _mm256_storeu_ps(acc.add(40), r5);
    _mm256_storeu_ps(acc.add(48), r6);
    _mm256_storeu_ps(acc.add(56), r7);
}

/// Scores of the 16 keys of a transposed page for one query: per half, two
/// partial sums over the dimensions (even, odd), added.
#[inline(always)]
unsafe fn scores1(q: *const f32, kt: *const f32, d: usize) -> (__m256, __m256) {
    use crate::attention::PAGE;
    let z = _mm256_setzero_ps();
    let (mut a0, mut a1, mut b0, mut b1) = (z, z, z, z);
    let mut c = 0;
    while c < d {
        let q0 = _mm256_broadcast_ss(&*q.add(c));
        a0 = _mm256_fmadd_ps(q0, _mm256_loadu_ps(kt.add(c * PAGE)), a0);
        b0 = _mm256_fmadd_ps(q0, _mm256_loadu_ps(kt.add(c * PAGE + 8)), b0);
        let q1 = _mm256_broadcast_ss(&*q.add(c + 1));
        a1 = _mm256_fmadd_ps(q1, _mm256_loadu_ps(kt.add((c + 1) * PAGE)), a1);
        b1 = _mm256_fmadd_ps(q1, _mm256_loadu_ps(kt.add((c + 1) * PAGE + 8)), b1);
        c += 2;
    }
    (_mm256_add_ps(a0, a1), _mm256_add_ps(b0, b1))
}

/// [`scores1`] for two queries at once, each key vector loaded once.
#[inline(always)]
unsafe fn scores2(qa: *const f32, qb: *const f32, kt: *const f32, d: usize) -> ((__m256, __m256), (__m256, __m256)) {
    use crate::attention::PAGE;
    let z = _mm256_setzero_ps();
    let (mut a0, mut a1, mut b0, mut b1) = (z, z, z, z);
    let (mut c0, mut c1, mut e0, mut e1) = (z, z, z, z);
    let mut c = 0;
    while c < d {
        let k0l = _mm256_loadu_ps(kt.add(c * PAGE));
        let k0h = _mm256_loadu_ps(kt.add(c * PAGE + 8));
        let x = _mm256_broadcast_ss(&*qa.add(c));
        a0 = _mm256_fmadd_ps(x, k0l, a0);
        b0 = _mm256_fmadd_ps(x, k0h, b0);
        let y = _mm256_broadcast_ss(&*qb.add(c));
        c0 = _mm256_fmadd_ps(y, k0l, c0);
        e0 = _mm256_fmadd_ps(y, k0h, e0);
        let k1l = _mm256_loadu_ps(kt.add((c + 1) * PAGE));
        let k1h = _mm256_loadu_ps(kt.add((c + 1) * PAGE + 8));
        let x = _mm256_broadcast_ss(&*qa.add(c + 1));
        a1 = _mm256_fmadd_ps(x, k1l, a1);
        b1 = _mm256_fmadd_ps(x, k1h, b1);
        let y = _mm256_broadcast_ss(&*qb.add(c + 1));
        c1 = _mm256_fmadd_ps(y, k1l, c1);
        e1 = _mm256_fmadd_ps(y, k1h, e1);
        c += 2;
    }
    ((_mm256_add_ps(a0, a1), _mm256_add_ps(b0, b1)), (_mm256_add_ps(c0, c1), _mm256_add_ps(e0, e1)))
}

/// One page's step of a query's online softmax: masks keys past `n`,
/// rescales the state to a new maximum, and leaves the page's weights in `pr`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn page_softmax(
    mut s_lo: __m256,
    mut s_hi: __m256,
    n: usize,
    m: &mut f32,
    l: &mut f32,
    acc: &mut [f32; crate::attention::MAX_HEAD_DIM],
    dv: usize,
    pr: &mut [f32; crate::attention::PAGE],
) {
    use crate::attention::PAGE;
    if n < PAGE {
        let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
        let keep = |k: usize| _mm256_castsi256_ps(_mm256_loadu_si256(LANE_MASK[k].as_ptr() as *const __m256i));
        s_lo = _mm256_blendv_ps(ninf, s_lo, keep(n.min(8)));
        s_hi = _mm256_blendv_ps(ninf, s_hi, keep(n.saturating_sub(8)));
    }
    let bm = hmax(_mm256_max_ps(s_lo, s_hi));
    if bm > *m {
        let f = (*m - bm).exp();
        *l *= f;
        let fv = _mm256_set1_ps(f);
        for cc in 0..dv {
            let ptr = acc.as_mut_ptr().add(8 * cc);
            _mm256_storeu_ps(ptr, _mm256_mul_ps(_mm256_loadu_ps(ptr), fv));
        }
        *m = bm;
    }
    let mv = _mm256_set1_ps(*m);
    let e_lo = exp8(_mm256_sub_ps(s_lo, mv));
    let e_hi = exp8(_mm256_sub_ps(s_hi, mv));
    *l += hsum(_mm256_add_ps(e_lo, e_hi));
    _mm256_storeu_ps(pr.as_mut_ptr(), e_lo);
    _mm256_storeu_ps(pr.as_mut_ptr().add(8), e_hi);
}

/// [`weigh_values`] for two queries over the same values (`nb` vectors of
/// eight), each value vector loaded once; four vectors at a time.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn weigh_values2(
    acc_a: *mut f32,
    acc_b: *mut f32,
    v: *const f32,
    pa: &[f32; crate::attention::PAGE],
    pb: &[f32; crate::attention::PAGE],
    n: usize,
    d: usize,
    nb: usize,
) {
    let mut u0 = 0;
    while u0 + 4 <= nb {
        let (a, b) = (acc_a.add(8 * u0), acc_b.add(8 * u0));
        let (mut ra0, mut ra1, mut ra2, mut ra3) =
            (_mm256_loadu_ps(a), _mm256_loadu_ps(a.add(8)), _mm256_loadu_ps(a.add(16)), _mm256_loadu_ps(a.add(24)));
        let (mut rb0, mut rb1, mut rb2, mut rb3) =
            (_mm256_loadu_ps(b), _mm256_loadu_ps(b.add(8)), _mm256_loadu_ps(b.add(16)), _mm256_loadu_ps(b.add(24)));
        for t in 0..n {
            let row = v.add(t * d + 8 * u0);
            let (x, y) = (_mm256_broadcast_ss(&pa[t]), _mm256_broadcast_ss(&pb[t]));
            let v0 = _mm256_loadu_ps(row);
            ra0 = _mm256_fmadd_ps(x, v0, ra0);
            rb0 = _mm256_fmadd_ps(y, v0, rb0);
            let v1 = _mm256_loadu_ps(row.add(8));
            ra1 = _mm256_fmadd_ps(x, v1, ra1);
            rb1 = _mm256_fmadd_ps(y, v1, rb1);
            let v2 = _mm256_loadu_ps(row.add(16));
            ra2 = _mm256_fmadd_ps(x, v2, ra2);
            rb2 = _mm256_fmadd_ps(y, v2, rb2);
            let v3 = _mm256_loadu_ps(row.add(24));
            ra3 = _mm256_fmadd_ps(x, v3, ra3);
            rb3 = _mm256_fmadd_ps(y, v3, rb3);
        }
        _mm256_storeu_ps(a, ra0);
        _mm256_storeu_ps(a.add(8), ra1);
        _mm256_storeu_ps(a.add(16), ra2);
        _mm256_storeu_ps(a.add(24), ra3);
        _mm256_storeu_ps(b, rb0);
        _mm256_storeu_ps(b.add(8), rb1);
        _mm256_storeu_ps(b.add(16), rb2);
        _mm256_storeu_ps(b.add(24), rb3);
        u0 += 4;
    }
    while u0 < nb {
        let (a, b) = (acc_a.add(8 * u0), acc_b.add(8 * u0));
        let (mut ra, mut rb) = (_mm256_loadu_ps(a), _mm256_loadu_ps(b));
        for t in 0..n {
            let vv = _mm256_loadu_ps(v.add(t * d + 8 * u0));
            ra = _mm256_fmadd_ps(_mm256_broadcast_ss(&pa[t]), vv, ra);
            rb = _mm256_fmadd_ps(_mm256_broadcast_ss(&pb[t]), vv, rb);
        }
        _mm256_storeu_ps(a, ra);
        _mm256_storeu_ps(b, rb);
        u0 += 1;
    }
}

/// Asks for the `bytes` at `p` to be brought into cache (no fault if
/// unmapped: prefetches never trap).
#[inline(always)]
unsafe fn prefetch_bytes(p: *const u8, bytes: usize) {
    let mut o = 0;
    while o < bytes {
        _mm_prefetch(p.add(o) as *const i8, _MM_HINT_T0);
        o += 64;
    }
}

/// AVX2 twin of [`crate::attention::attend_block_ref`]: a block of queries
/// against pages of one head (keys transposed in pages), segment by segment.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn attend_block<T: crate::attention::KvElem>(
    shape: &crate::attention::AttnShape,
    arena: &[T],
    pages: &[u32],
    block: &crate::attention::QueryBlock<'_>,
) {
    use crate::attention::{merge_state, MAX_HEAD_DIM, PAGE, QUERY_BLOCK, SEGMENT_PAGES};
    let d = shape.head_dim;
    let dv = d / 8;
    let nq = block.n;
    // The current segment's state of each query, and the merged states of
    // the segments before it.
    let mut m = [f32::NEG_INFINITY; QUERY_BLOCK];
    let mut l = [0f32; QUERY_BLOCK];
    let mut acc = [[0f32; MAX_HEAD_DIM]; QUERY_BLOCK];
    let mut tm = [f32::NEG_INFINITY; QUERY_BLOCK];
    let mut tl = [0f32; QUERY_BLOCK];
    let mut total = [[0f32; MAX_HEAD_DIM]; QUERY_BLOCK];
    let mut qs = [[0f32; MAX_HEAD_DIM]; QUERY_BLOCK];
    let mut max_ctx = 0;
    for i in 0..nq {
        for c in 0..d {
            qs[i][c] = block.q[i][c] * shape.scale;
        }
        max_ctx = max_ctx.max(block.ctx[i]);
    }
    let pe = shape.page_elems();
    let a = arena.as_ptr();
    let mut pr = [0f32; PAGE];
    // An f16 page is converted to f32 once for all the block's queries.
    let mut page_f32 = [0f32; 2 * MAX_HEAD_DIM * PAGE];
    let page_bytes = pe * std::mem::size_of::<T>();
    let mut t0 = block.t0;
    for (pi, &p) in pages.iter().enumerate() {
        if t0 >= max_ctx {
            break;
        }
        // Pages are scattered over the arena, and hardware prefetchers stop
        // at 4 KiB boundaries: fetch the next page while this one is used.
        if let Some(&next) = pages.get(pi + 1) {
            if t0 + PAGE < max_ctx {
                prefetch_bytes(a.add(next as usize * pe) as *const u8, page_bytes);
            }
        }
        let src = a.add(p as usize * pe);
        let page: *const f32 = match T::KIND {
            crate::attention::KvKind::F32 => src as *const f32,
            crate::attention::KvKind::F16 => {
                let dst = page_f32.as_mut_ptr();
                for e in (0..pe).step_by(8) {
                    _mm256_storeu_ps(dst.add(e), load_kv8(src.add(e)));
                }
                dst
            }
        };
        let kt = page;
        let vb = kt.add(PAGE * d);
        let seg_end = (t0 + PAGE).is_multiple_of(SEGMENT_PAGES * PAGE);
        // Queries go two at a time when both see the same keys of this page
        // (each key and value load then serves both); a query's arithmetic
        // is the same alone or paired.
        let mut i = 0;
        while i < nq {
            let ctx = block.ctx[i];
            if t0 >= ctx {
                i += 1;
                continue;
            }
            let n = (ctx - t0).min(PAGE);
            let pair = i + 1 < nq && block.ctx[i + 1] > t0 && (block.ctx[i + 1] - t0).min(PAGE) == n;
            if pair {
                let ((la, ha), (lb, hb)) = scores2(qs[i].as_ptr(), qs[i + 1].as_ptr(), kt, d);
                let mut pb = [0f32; PAGE];
                page_softmax(la, ha, n, &mut m[i], &mut l[i], &mut acc[i], dv, &mut pr);
                page_softmax(lb, hb, n, &mut m[i + 1], &mut l[i + 1], &mut acc[i + 1], dv, &mut pb);
                let (acc_a, acc_b) = acc.split_at_mut(i + 1);
                weigh_values2(acc_a[i].as_mut_ptr(), acc_b[0].as_mut_ptr(), vb, &pr, &pb, n, d, dv);
            } else {
                let (lo, hi) = scores1(qs[i].as_ptr(), kt, d);
                page_softmax(lo, hi, n, &mut m[i], &mut l[i], &mut acc[i], dv, &mut pr);
                let mut cb = 0;
                while cb < dv {
                    let ap = acc[i].as_mut_ptr().add(8 * cb);
                    let v = vb.add(8 * cb);
                    match dv - cb {
                        8.. => weigh_values8(ap, v, &pr, n, d),
                        nb => weigh_values(ap, v, &pr, n, d, nb),
                    }
                    cb += 8;
                }
            }
            // A segment's state joins the total at its last page (or the
            // query's last entry), as in the portable twin.
            for j in i..i + 1 + pair as usize {
                if seg_end || t0 + PAGE >= block.ctx[j] {
                    merge_state(&mut tm[j], &mut tl[j], &mut total[j][..d], m[j], l[j], &acc[j][..d]);
                    (m[j], l[j]) = (f32::NEG_INFINITY, 0.0);
                    acc[j][..d].fill(0.0);
                }
            }
            i += 1 + pair as usize;
        }
        t0 += PAGE;
    }
    for i in 0..nq {
        block.finish(i, tm[i], tl[i], &total[i][..d]);
    }
}

/// AVX2 twin of [`crate::ops::softmax_in_place_ref`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn softmax_in_place(x: &mut [f32]) {
    let n = x.len();
    let p = x.as_mut_ptr();
    let mut mv = _mm256_set1_ps(f32::NEG_INFINITY);
    let mut i = 0;
    while i + 8 <= n {
        mv = _mm256_max_ps(mv, _mm256_loadu_ps(p.add(i)));
        i += 8;
    }
    let mut m = hmax(mv);
    for &v in &x[i..] {
        m = m.max(v);
    }
    if m == f32::NEG_INFINITY {
        x.fill(0.0);
        return;
    }
    let mb = _mm256_set1_ps(m);
    let mut zv = _mm256_setzero_ps();
    i = 0;
    while i + 8 <= n {
        let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), mb));
        _mm256_storeu_ps(p.add(i), e);
        zv = _mm256_add_ps(zv, e);
        i += 8;
    }
    let mut z = hsum(zv);
    for v in &mut x[i..] {
        *v = (*v - m).exp();
        z += *v;
    }
    let inv = if z > 0.0 { 1.0 / z } else { 0.0 };
    let iv = _mm256_set1_ps(inv);
    i = 0;
    while i + 8 <= n {
        _mm256_storeu_ps(p.add(i), _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), iv));
        i += 8;
    }
    for v in &mut x[i..] {
        *v *= inv;
    }
}

/// AVX2 twin of [`crate::ops::silu_mul_ref`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let n = out.len().min(gate.len()).min(up.len());
    let one = _mm256_set1_ps(1.0);
    let mut i = 0;
    while i + 8 <= n {
        let g = _mm256_loadu_ps(gate.as_ptr().add(i));
        let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
        let s = _mm256_div_ps(g, _mm256_add_ps(one, e));
        _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_mul_ps(s, _mm256_loadu_ps(up.as_ptr().add(i))));
        i += 8;
    }
    while i < n {
        let g = gate[i];
        out[i] = g / (1.0 + (-g).exp()) * up[i];
        i += 1;
    }
}

/// XOR of every 32-byte chunk of `p` folded to 64 bits: a read of every
/// byte at streaming speed (the bandwidth probe's inner loop).
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn xor_reduce(p: &[u8]) -> u64 {
    let mut a = [_mm256_setzero_si256(); 4];
    let ptr = p.as_ptr();
    let mut i = 0;
    while i + 128 <= p.len() {
        // The matmul's own prefetch distance and pattern.
        _mm_prefetch::<_MM_HINT_T0>(ptr.wrapping_add(i + 2048) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(ptr.wrapping_add(i + 2048 + 64) as *const i8);
        for (j, acc) in a.iter_mut().enumerate() {
            *acc = _mm256_xor_si256(*acc, _mm256_loadu_si256(ptr.add(i + 32 * j) as *const __m256i));
        }
        i += 128;
    }
    let v = _mm256_xor_si256(_mm256_xor_si256(a[0], a[1]), _mm256_xor_si256(a[2], a[3]));
    let mut out = [0u64; 4];
    _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, v);
    out[0] ^ out[1] ^ out[2] ^ out[3]
}

/// One block of 32 activations to `i8`, as [`crate::quant::quantize_act_block`]
/// does it: `d = max|x| / 127`, `q = round_ties_even(x * (127 / max|x|))`.
/// Returns `(d, sum(q))`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_act_block(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    debug_assert!(x.len() >= 32 && q.len() >= 32);
    let p = x.as_ptr();
    let v = [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))];
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
    let mut mx = _mm256_max_ps(_mm256_and_ps(v[0], abs), _mm256_and_ps(v[1], abs));
    mx = _mm256_max_ps(mx, _mm256_max_ps(_mm256_and_ps(v[2], abs), _mm256_and_ps(v[3], abs)));
    let m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
    let d = amax / 127.0;
    let id = if d != 0.0 { 127.0 / amax } else { 0.0 };
    let idv = _mm256_set1_ps(id);
    // cvtps rounds to nearest even under the default rounding mode.
    let i: [__m256i; 4] = std::array::from_fn(|j| _mm256_cvtps_epi32(_mm256_mul_ps(v[j], idv)));
    let sum = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
    let s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    let s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0b01_00_11_10));
    let total = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0b10_11_00_01)));
    // Pack to bytes in order: packs works per 128-bit lane, so fix the order.
    let w01 = _mm256_packs_epi32(i[0], i[1]);
    let w23 = _mm256_packs_epi32(i[2], i[3]);
    let b = _mm256_packs_epi16(w01, w23);
    let b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, b);
    (d, total)
}
