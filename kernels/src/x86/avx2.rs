//! AVX2 + FMA + F16C kernels.
//!
//! Every function is `unsafe`: callers must have checked that the CPU has
//! AVX2, FMA and F16C (see [`crate::cpu::isa`]).

#![allow(clippy::missing_safety_doc, clippy::needless_range_loop)]

use std::arch::x86_64::*;

use crate::matmul::ROW_TILE;
use crate::quant::{ActBlocks, Format, BLOCK};

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

/// A GGML weight block format as the tile kernel sees it.
trait WBlock {
    const SIZE: usize;
    /// `true` when the loaded values are signed `i8` (needs the sign trick).
    const SIGNED: bool;
    /// `true` when the block has an offset term (`m`).
    const HAS_MIN: bool;
    /// The 32 values (u8 or i8), `d` and `m`.
    unsafe fn load(p: *const u8) -> (__m256i, f32, f32);
}

struct Q8;
struct Q40;
struct Q41;

impl WBlock for Q8 {
    const SIZE: usize = 34;
    const SIGNED: bool = true;
    const HAS_MIN: bool = false;
    #[inline(always)]
    unsafe fn load(p: *const u8) -> (__m256i, f32, f32) {
        (_mm256_loadu_si256(p.add(2) as *const __m256i), f16_at(p), 0.0)
    }
}

#[inline(always)]
unsafe fn unpack_nibbles(p: *const u8) -> __m256i {
    let raw = _mm_loadu_si128(p as *const __m128i);
    let mask = _mm_set1_epi8(0x0F);
    let lo = _mm_and_si128(raw, mask);
    let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
    _mm256_set_m128i(hi, lo)
}

impl WBlock for Q40 {
    const SIZE: usize = 18;
    const SIGNED: bool = false;
    const HAS_MIN: bool = true;
    #[inline(always)]
    unsafe fn load(p: *const u8) -> (__m256i, f32, f32) {
        let d = f16_at(p);
        (unpack_nibbles(p.add(2)), d, -8.0 * d)
    }
}

impl WBlock for Q41 {
    const SIZE: usize = 20;
    const SIGNED: bool = false;
    const HAS_MIN: bool = true;
    #[inline(always)]
    unsafe fn load(p: *const u8) -> (__m256i, f32, f32) {
        (unpack_nibbles(p.add(4)), f16_at(p), f16_at(p.add(2)))
    }
}

/// AVX2 twin of [`crate::matmul::dot_tile_ref`].
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_tile(
    format: Format,
    wrow: &[u8],
    k: usize,
    x: &[f32],
    act: &ActBlocks,
    r0: usize,
    rt: usize,
    res: &mut [f32; ROW_TILE],
) {
    macro_rules! by_rows {
        ($f:ident $(, $t:ty)?) => {
            match rt {
                1 => $f::<$($t,)? 1>(wrow, k, x, act, r0, res),
                2 => $f::<$($t,)? 2>(wrow, k, x, act, r0, res),
                3 => $f::<$($t,)? 3>(wrow, k, x, act, r0, res),
                _ => $f::<$($t,)? 4>(wrow, k, x, act, r0, res),
            }
        };
    }
    match format {
        Format::Q8_0 => by_rows!(qtile, Q8),
        Format::Q4_0 => by_rows!(qtile, Q40),
        Format::Q4_1 => by_rows!(qtile, Q41),
        Format::F32 => by_rows!(dense_tile, F32W),
        Format::F16 => by_rows!(dense_tile, F16W),
    }
}

#[inline(always)]
unsafe fn block_dot<F: WBlock>(wv: __m256i, a: __m256i) -> __m256 {
    let p16 = if F::SIGNED { _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(a, wv)) } else { _mm256_maddubs_epi16(wv, a) };
    _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn qtile<F: WBlock, const R: usize>(wrow: &[u8], k: usize, _x: &[f32], act: &ActBlocks, r0: usize, res: &mut [f32; ROW_TILE]) {
    let nb = k / BLOCK;
    debug_assert!(wrow.len() >= nb * F::SIZE);
    let w = wrow.as_ptr();
    let q = act.q.as_ptr();
    let d = act.d.as_ptr();
    let sum = act.sum.as_ptr();
    let mut acc0 = [_mm256_setzero_ps(); R];
    let mut acc1 = [_mm256_setzero_ps(); R];
    let mut corr = [0f32; R];
    let mut b = 0;
    while b < nb {
        // Even block into acc0.
        let (wv, dw, mw) = F::load(w.add(b * F::SIZE));
        for i in 0..R {
            let r = r0 + i;
            let a = _mm256_loadu_si256(q.add(r * k + b * BLOCK) as *const __m256i);
            let da = *d.add(r * nb + b);
            acc0[i] = _mm256_fmadd_ps(block_dot::<F>(wv, a), _mm256_set1_ps(dw * da), acc0[i]);
            if F::HAS_MIN {
                corr[i] += mw * (da * *sum.add(r * nb + b) as f32);
            }
        }
        if b + 1 < nb {
            let b1 = b + 1;
            let (wv, dw, mw) = F::load(w.add(b1 * F::SIZE));
            for i in 0..R {
                let r = r0 + i;
                let a = _mm256_loadu_si256(q.add(r * k + b1 * BLOCK) as *const __m256i);
                let da = *d.add(r * nb + b1);
                acc1[i] = _mm256_fmadd_ps(block_dot::<F>(wv, a), _mm256_set1_ps(dw * da), acc1[i]);
                if F::HAS_MIN {
                    corr[i] += mw * (da * *sum.add(r * nb + b1) as f32);
                }
            }
        }
        b += 2;
    }
    for i in 0..R {
        res[i] = hsum(_mm256_add_ps(acc0[i], acc1[i])) + corr[i];
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

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dense_tile<W: DenseW, const R: usize>(wrow: &[u8], k: usize, x: &[f32], _act: &ActBlocks, r0: usize, res: &mut [f32; ROW_TILE]) {
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

/// AVX2 twin of [`crate::attention::attend_row_ref`]: one query row of one
/// head against the first `ctx` entries of a paged head.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn attend_row<T: crate::attention::KvElem>(
    shape: &crate::attention::AttnShape,
    arena: &[T],
    pages: &[u32],
    ctx: usize,
    q: &[f32],
    out: &mut [f32],
) {
    use crate::attention::{MAX_HEAD_DIM, MAX_PAGE};
    let (d, ps) = (shape.head_dim, shape.page_size);
    let dv = d / 8;
    let mut qv = [_mm256_setzero_ps(); MAX_HEAD_DIM / 8];
    let scale = _mm256_set1_ps(shape.scale);
    for c in 0..dv {
        qv[c] = _mm256_mul_ps(_mm256_loadu_ps(q.as_ptr().add(8 * c)), scale);
    }
    let mut acc = [_mm256_setzero_ps(); MAX_HEAD_DIM / 8];
    // Scores padded to a multiple of 8 with -inf, so exp gives 0 there.
    let mut s = [f32::NEG_INFINITY; MAX_PAGE];
    let mut pr = [0f32; MAX_PAGE];
    let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
    let mut t0 = 0;
    let a = arena.as_ptr();
    let page_elems = shape.page_elems();
    for &p in pages {
        if t0 >= ctx {
            break;
        }
        let n = (ctx - t0).min(ps);
        let base = a.add(p as usize * page_elems);
        let mut bm = f32::NEG_INFINITY;
        for t in 0..n {
            let k = base.add(t * d);
            let mut s0 = _mm256_setzero_ps();
            let mut s1 = _mm256_setzero_ps();
            let mut c = 0;
            while c + 2 <= dv {
                s0 = _mm256_fmadd_ps(qv[c], load_kv8(k.add(8 * c)), s0);
                s1 = _mm256_fmadd_ps(qv[c + 1], load_kv8(k.add(8 * c + 8)), s1);
                c += 2;
            }
            if c < dv {
                s0 = _mm256_fmadd_ps(qv[c], load_kv8(k.add(8 * c)), s0);
            }
            let st = hsum(_mm256_add_ps(s0, s1));
            s[t] = st;
            bm = bm.max(st);
        }
        let n8 = n.div_ceil(8) * 8;
        for st in s[n..n8].iter_mut() {
            *st = f32::NEG_INFINITY;
        }
        if bm > m {
            let f = (m - bm).exp();
            l *= f;
            let fv = _mm256_set1_ps(f);
            for av in acc[..dv].iter_mut() {
                *av = _mm256_mul_ps(*av, fv);
            }
            m = bm;
        }
        let mv = _mm256_set1_ps(m);
        let mut lv = _mm256_setzero_ps();
        for t in (0..n8).step_by(8) {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s.as_ptr().add(t)), mv));
            _mm256_storeu_ps(pr.as_mut_ptr().add(t), e);
            lv = _mm256_add_ps(lv, e);
        }
        l += hsum(lv);
        for t in 0..n {
            let pt = _mm256_set1_ps(pr[t]);
            let v = base.add((ps + t) * d);
            for c in 0..dv {
                acc[c] = _mm256_fmadd_ps(pt, load_kv8(v.add(8 * c)), acc[c]);
            }
        }
        t0 += n;
    }
    let inv = _mm256_set1_ps(if l > 0.0 { 1.0 / l } else { 0.0 });
    for c in 0..dv {
        _mm256_storeu_ps(out.as_mut_ptr().add(8 * c), _mm256_mul_ps(acc[c], inv));
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
