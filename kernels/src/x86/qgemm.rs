//! Block-format matmul on the row-interleaved layout ([`crate::interleave`]),
//! written once over a vector width and instantiated for each x86 path:
//! `avx512` (16 lanes, `vpdpbusd zmm`), `vnni256` (8 lanes, `vpdpbusd ymm`
//! in its EVEX or AVX-VNNI form) and `avx2` (8 lanes, `vpmaddubsw` +
//! `vpmaddwd`).
//!
//! Each lane is one output row of the group, so a block costs, per
//! activation row, one integer multiply-accumulate per chunk against four
//! broadcast activation bytes, then one conversion and one or two FMAs for
//! the scales: the float operations of [`crate::matmul::group_row_ref`] in
//! its order, lane by lane. Weights are loaded and unpacked once per block
//! for every activation row of the tile.

#![allow(clippy::missing_safety_doc, clippy::needless_range_loop)]

use std::arch::x86_64::*;

use crate::interleave::{CHUNK, GROUP};
use crate::matmul::{tiles, Groups};
use crate::quant::{Format, BLOCK};

/// One vector width and its integer dot product.
trait Lanes {
    type I: Copy;
    type F: Copy;
    /// Output rows per vector.
    const N: usize;
    /// Whether [`Lanes::dot_q8`] multiplies the biased (unsigned) weights,
    /// so the bias must be taken off with the activation block sum.
    const Q8_BIASED: bool;
    /// Activation rows per register tile.
    const TILE: usize;
    unsafe fn load(p: *const u8) -> Self::I;
    unsafe fn set1(v: i32) -> Self::I;
    unsafe fn zero() -> Self::I;
    unsafe fn add(a: Self::I, b: Self::I) -> Self::I;
    /// Low and high nibbles of each byte.
    unsafe fn lo4(v: Self::I) -> Self::I;
    unsafe fn hi4(v: Self::I) -> Self::I;
    /// `acc + dot(w0, a0) + dot(w1, a1)` per lane (four bytes each), `w`
    /// unsigned below 16.
    unsafe fn dot_u4(acc: Self::I, w0: Self::I, a0: i32, w1: Self::I, a1: i32) -> Self::I;
    /// The same with Q8_0's biased weights (`q ^ 0x80`).
    unsafe fn dot_q8(acc: Self::I, w: Self::I, a: i32) -> Self::I;
    unsafe fn zero_f() -> Self::F;
    /// `N` f16 values at `p`.
    unsafe fn f16(p: *const u8) -> Self::F;
    unsafe fn cvt(v: Self::I) -> Self::F;
    unsafe fn mul_s(a: Self::F, s: f32) -> Self::F;
    /// `a * b + c`, fused.
    unsafe fn fma(a: Self::F, b: Self::F, c: Self::F) -> Self::F;
    /// `a * s + c`, fused.
    unsafe fn fma_s(a: Self::F, s: f32, c: Self::F) -> Self::F;
    unsafe fn store(p: *mut f32, v: Self::F);
}

/// AVX2 without VNNI: `vpmaddubsw` pairs (no overflow: 2 x 15 x 127 for Q4,
/// 2 x 128 x 127 for Q8_0 with the sign trick), then `vpmaddwd` by ones.
struct Avx2;
/// 256-bit VNNI in its AVX-512 (EVEX) form.
struct Vnni256Evex;
/// 256-bit VNNI in its AVX-VNNI (VEX) form.
struct Vnni256Vex;
/// 512-bit VNNI.
struct Avx512;

/// The parts of [`Lanes`] that differ between widths only by the
/// intrinsics' names.
macro_rules! lanes_common {
    ($i:ty, $f:ty, $n:expr, $half:ty, $load:ident, $set1:ident, $zero:ident, $add:ident, $and:ident, $srli:ident, $set1_8:ident,
     $zero_f:ident, $load_half:ident, $cvtph:ident, $cvt:ident, $mul:ident, $set1_f:ident, $fmadd:ident, $store:ident) => {
        type I = $i;
        type F = $f;
        const N: usize = $n;
        #[inline(always)]
        unsafe fn load(p: *const u8) -> $i {
            $load(p as *const $i)
        }
        #[inline(always)]
        unsafe fn set1(v: i32) -> $i {
            $set1(v)
        }
        #[inline(always)]
        unsafe fn zero() -> $i {
            $zero()
        }
        #[inline(always)]
        unsafe fn add(a: $i, b: $i) -> $i {
            $add(a, b)
        }
        #[inline(always)]
        unsafe fn lo4(v: $i) -> $i {
            $and(v, $set1_8(0x0F))
        }
        #[inline(always)]
        unsafe fn hi4(v: $i) -> $i {
            $and($srli(v, 4), $set1_8(0x0F))
        }
        #[inline(always)]
        unsafe fn zero_f() -> $f {
            $zero_f()
        }
        #[inline(always)]
        unsafe fn f16(p: *const u8) -> $f {
            $cvtph($load_half(p as *const $half))
        }
        #[inline(always)]
        unsafe fn cvt(v: $i) -> $f {
            $cvt(v)
        }
        #[inline(always)]
        unsafe fn mul_s(a: $f, s: f32) -> $f {
            $mul(a, $set1_f(s))
        }
        #[inline(always)]
        unsafe fn fma(a: $f, b: $f, c: $f) -> $f {
            $fmadd(a, b, c)
        }
        #[inline(always)]
        unsafe fn fma_s(a: $f, s: f32, c: $f) -> $f {
            $fmadd(a, $set1_f(s), c)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: $f) {
            $store(p, v)
        }
    };
}

/// [`lanes_common`] for 256-bit vectors.
macro_rules! lanes256_common {
    () => {
        lanes_common!(
            __m256i,
            __m256,
            8,
            __m128i,
            _mm256_loadu_si256,
            _mm256_set1_epi32,
            _mm256_setzero_si256,
            _mm256_add_epi32,
            _mm256_and_si256,
            _mm256_srli_epi16,
            _mm256_set1_epi8,
            _mm256_setzero_ps,
            _mm_loadu_si128,
            _mm256_cvtph_ps,
            _mm256_cvtepi32_ps,
            _mm256_mul_ps,
            _mm256_set1_ps,
            _mm256_fmadd_ps,
            _mm256_storeu_ps
        );
    };
}

impl Lanes for Avx2 {
    lanes256_common!();
    const Q8_BIASED: bool = false;
    const TILE: usize = 4;
    /// The two `vpmaddubsw` results are added as 16-bit pairs before one
    /// `vpmaddwd` (at most 4 x 15 x 127, no overflow).
    #[inline(always)]
    unsafe fn dot_u4(acc: __m256i, w0: __m256i, a0: i32, w1: __m256i, a1: i32) -> __m256i {
        let p = _mm256_add_epi16(_mm256_maddubs_epi16(w0, _mm256_set1_epi32(a0)), _mm256_maddubs_epi16(w1, _mm256_set1_epi32(a1)));
        _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)))
    }
    #[inline(always)]
    unsafe fn dot_q8(acc: __m256i, w: __m256i, a: i32) -> __m256i {
        let ws = _mm256_xor_si256(w, _mm256_set1_epi8(-128));
        let p = _mm256_maddubs_epi16(_mm256_sign_epi8(ws, ws), _mm256_sign_epi8(_mm256_set1_epi32(a), ws));
        _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)))
    }
}

/// The dot products of a VNNI path: `vpdpbusd` (`$dp`) as is, with the
/// weights' bias taken off by the caller; `$tile` rows per register tile.
macro_rules! vnni_dots {
    ($i:ty, $dp:ident, $set1:ident, $tile:expr) => {
        const Q8_BIASED: bool = true;
        const TILE: usize = $tile;
        #[inline(always)]
        unsafe fn dot_u4(acc: $i, w0: $i, a0: i32, w1: $i, a1: i32) -> $i {
            $dp($dp(acc, w0, $set1(a0)), w1, $set1(a1))
        }
        #[inline(always)]
        unsafe fn dot_q8(acc: $i, w: $i, a: i32) -> $i {
            $dp(acc, w, $set1(a))
        }
    };
}

impl Lanes for Vnni256Evex {
    lanes256_common!();
    vnni_dots!(__m256i, _mm256_dpbusd_epi32, _mm256_set1_epi32, 8);
}

impl Lanes for Vnni256Vex {
    lanes256_common!();
    vnni_dots!(__m256i, _mm256_dpbusd_avx_epi32, _mm256_set1_epi32, 4);
}

impl Lanes for Avx512 {
    lanes_common!(
        __m512i,
        __m512,
        16,
        __m256i,
        _mm512_loadu_si512,
        _mm512_set1_epi32,
        _mm512_setzero_si512,
        _mm512_add_epi32,
        _mm512_and_si512,
        _mm512_srli_epi16,
        _mm512_set1_epi8,
        _mm512_setzero_ps,
        _mm256_loadu_si256,
        _mm512_cvtph_ps,
        _mm512_cvtepi32_ps,
        _mm512_mul_ps,
        _mm512_set1_ps,
        _mm512_fmadd_ps,
        _mm512_storeu_ps
    );
    vnni_dots!(__m512i, _mm512_dpbusd_epi32, _mm512_set1_epi32, 8);
}

/// What a tile kernel needs of one group and its activation rows.
struct TileArgs {
    /// The group's interleaved data.
    gd: *const u8,
    /// Which `N`-lane part of the group (0, or 0 and 1 for 8 lanes).
    h: usize,
    nb: usize,
    k: usize,
    q: *const i8,
    d: *const f32,
    s: *const f32,
    isum: *const i32,
    stride: usize,
    r0: usize,
    /// Where row `r0`'s first output of this part goes.
    out: *mut f32,
    n: usize,
    /// Outputs of this part that exist.
    valid: usize,
    /// Whether to prefetch the weights ahead (the first pass over a group;
    /// later tiles and parts find the group in L1).
    prefetch: bool,
}

/// How far ahead of the block being read the first pass prefetches.
const PREFETCH_BYTES: usize = 2048;

/// Prefetches the `len` bytes `PREFETCH_BYTES` past `p`, a line at a time (a
/// prefetch past the end of the weights is harmless: the address is formed
/// without in-bounds pointer arithmetic and never dereferenced).
#[inline(always)]
unsafe fn prefetch_ahead(p: *const u8, len: usize) {
    let ahead = p.wrapping_add(PREFETCH_BYTES);
    let mut off = 0;
    while off < len {
        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(off) as *const i8);
        off += 64;
    }
}

/// Stores `acc[i]` as the outputs of row `r0 + i` (`valid` lanes of them).
#[inline(always)]
unsafe fn store_rows<L: Lanes, const R: usize>(t: &TileArgs, acc: &[L::F; R]) {
    for (i, v) in acc.iter().enumerate() {
        let o = t.out.add(i * t.n);
        if t.valid == L::N {
            L::store(o, *v);
        } else {
            let mut tmp = [0f32; GROUP];
            L::store(tmp.as_mut_ptr(), *v);
            std::ptr::copy_nonoverlapping(tmp.as_ptr(), o, t.valid);
        }
    }
}

/// Starts block `b` of a tile: prefetches ahead on the first pass over the
/// group and returns each row's two integer accumulators, the first holding
/// `offset * sum(q_a)` (how a weight offset or storage bias is taken off).
#[inline(always)]
unsafe fn block_start<L: Lanes, const R: usize>(
    t: &TileArgs,
    base: *const u8,
    gbb: usize,
    b: usize,
    offset: i32,
) -> ([L::I; R], [L::I; R]) {
    if t.prefetch {
        prefetch_ahead(base, gbb);
    }
    let mut s0 = [L::zero(); R];
    if offset != 0 {
        for (i, s) in s0.iter_mut().enumerate() {
            *s = L::set1(offset * *t.isum.add((t.r0 + i) * t.stride + b));
        }
    }
    (s0, [L::zero(); R])
}

/// Q4_0 (`MIN = false`) or Q4_1 (`MIN = true`): R activation rows against
/// one part of a group.
#[inline(always)]
unsafe fn tile_q4<L: Lanes, const MIN: bool, const R: usize>(t: &TileArgs) {
    let gbb = if MIN { 20 * GROUP } else { 18 * GROUP };
    let (lane_off, scale_off) = (t.h * L::N * 4, t.h * L::N * 2);
    let mut acc = [L::zero_f(); R];
    for b in 0..t.nb {
        let base = t.gd.add(b * gbb);
        let (mut s0, mut s1) = block_start::<L, R>(t, base, gbb, b, if MIN { 0 } else { -8 });
        for c in 0..4 {
            let v = L::load(base.add(c * CHUNK + lane_off));
            let (lo, hi) = (L::lo4(v), L::hi4(v));
            for i in 0..R {
                let qa = t.q.add((t.r0 + i) * t.k + b * BLOCK) as *const i32;
                let (a_lo, a_hi) = (qa.add(c).read_unaligned(), qa.add(4 + c).read_unaligned());
                // Two chains per row (even and odd chunks) for the latency.
                if c % 2 == 0 {
                    s0[i] = L::dot_u4(s0[i], lo, a_lo, hi, a_hi);
                } else {
                    s1[i] = L::dot_u4(s1[i], lo, a_lo, hi, a_hi);
                }
            }
        }
        let dw = L::f16(base.add(16 * GROUP + scale_off));
        for i in 0..R {
            let at = (t.r0 + i) * t.stride + b;
            acc[i] = L::fma(L::cvt(L::add(s0[i], s1[i])), L::mul_s(dw, *t.d.add(at)), acc[i]);
        }
        if MIN {
            let mw = L::f16(base.add(18 * GROUP + scale_off));
            for i in 0..R {
                acc[i] = L::fma_s(mw, *t.s.add((t.r0 + i) * t.stride + b), acc[i]);
            }
        }
    }
    store_rows::<L, R>(t, &acc);
}

/// Q8_0: R activation rows against one part of a group.
#[inline(always)]
unsafe fn tile_q8<L: Lanes, const R: usize>(t: &TileArgs) {
    let gbb = 34 * GROUP;
    let (lane_off, scale_off) = (t.h * L::N * 4, t.h * L::N * 2);
    let mut acc = [L::zero_f(); R];
    for b in 0..t.nb {
        let base = t.gd.add(b * gbb);
        let (mut s0, mut s1) = block_start::<L, R>(t, base, gbb, b, if L::Q8_BIASED { -128 } else { 0 });
        for c in (0..8).step_by(2) {
            let w0 = L::load(base.add(c * CHUNK + lane_off));
            let w1 = L::load(base.add((c + 1) * CHUNK + lane_off));
            for i in 0..R {
                let qa = t.q.add((t.r0 + i) * t.k + b * BLOCK) as *const i32;
                s0[i] = L::dot_q8(s0[i], w0, qa.add(c).read_unaligned());
                s1[i] = L::dot_q8(s1[i], w1, qa.add(c + 1).read_unaligned());
            }
        }
        let dw = L::f16(base.add(32 * GROUP + scale_off));
        for i in 0..R {
            let at = (t.r0 + i) * t.stride + b;
            acc[i] = L::fma(L::cvt(L::add(s0[i], s1[i])), L::mul_s(dw, *t.d.add(at)), acc[i]);
        }
    }
    store_rows::<L, R>(t, &acc);
}

#[inline(always)]
unsafe fn tile<L: Lanes, const R: usize>(format: Format, t: &TileArgs) {
    match format {
        Format::Q8_0 => tile_q8::<L, R>(t),
        Format::Q4_0 => tile_q4::<L, false, R>(t),
        _ => tile_q4::<L, true, R>(t),
    }
}

/// Every group of the job, every part of a group, every tile of rows.
#[inline(always)]
unsafe fn groups<L: Lanes>(job: &Groups<'_>) {
    let w = job.w;
    let act = job.act;
    let format = w.format();
    let (k, nb) = (w.cols(), w.cols() / BLOCK);
    for g in job.g0..job.g1 {
        let gd = w.group(g).as_ptr();
        let valid = job.valid(g);
        for h in 0..GROUP / L::N {
            if h * L::N >= valid {
                break;
            }
            for (r0, rt) in tiles(job.r0, job.m, L::TILE) {
                let t = TileArgs {
                    gd,
                    h,
                    nb,
                    k,
                    q: act.q.as_ptr(),
                    d: act.d.as_ptr(),
                    s: act.s.as_ptr(),
                    isum: act.isum.as_ptr(),
                    stride: act.stride,
                    r0,
                    out: job.out.add(r0 * job.n + g * GROUP + h * L::N),
                    n: job.n,
                    valid: (valid - h * L::N).min(L::N),
                    prefetch: h == 0 && r0 == job.r0,
                };
                match rt {
                    1 => tile::<L, 1>(format, &t),
                    2 => tile::<L, 2>(format, &t),
                    3 => tile::<L, 3>(format, &t),
                    4 => tile::<L, 4>(format, &t),
                    5 => tile::<L, 5>(format, &t),
                    6 => tile::<L, 6>(format, &t),
                    7 => tile::<L, 7>(format, &t),
                    _ => tile::<L, 8>(format, &t),
                }
            }
        }
    }
}

/// The `avx2` path.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn groups_avx2(job: &Groups<'_>) {
    groups::<Avx2>(job)
}

/// The `vnni256` path, in the encoding this CPU has (AVX-512 VL's 32
/// registers allow a taller tile than AVX-VNNI's 16).
pub(crate) unsafe fn groups_vnni256(job: &Groups<'_>) {
    if crate::cpu::has_avx512_vnni_vl() {
        groups_vnni256_evex(job)
    } else {
        groups_vnni256_vex(job)
    }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn groups_vnni256_evex(job: &Groups<'_>) {
    groups::<Vnni256Evex>(job)
}

#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
unsafe fn groups_vnni256_vex(job: &Groups<'_>) {
    groups::<Vnni256Vex>(job)
}

/// The `avx512` path.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn groups_avx512(job: &Groups<'_>) {
    groups::<Avx512>(job)
}
