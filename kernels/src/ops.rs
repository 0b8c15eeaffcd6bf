//! Row-wise elementwise operations of a transformer layer: RMSNorm, rotary
//! position embedding, SwiGLU and residual adds.
//!
//! All of them work on one row at a time with a fixed order of operations, so
//! they are batch invariant by construction.

use crate::cpu::isa;

/// Sum of squares of `x` in a fixed order.
fn sum_sq(x: &[f32]) -> f32 {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: every SIMD path includes AVX2, FMA and F16C.
        i if i.has_avx2() => unsafe { crate::x86::avx2::dot_f32(x, x) },
        _ => x.iter().map(|v| v * v).sum(),
    }
}

/// Dot product of two equal-length slices in a fixed order.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: every SIMD path includes AVX2, FMA and F16C.
        i if i.has_avx2() => unsafe { crate::x86::avx2::dot_f32(a, b) },
        _ => a.iter().zip(b).map(|(x, y)| x * y).sum(),
    }
}

/// `out = x / sqrt(mean(x^2) + eps) * weight` for one row.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    debug_assert_eq!(x.len(), weight.len());
    let inv = 1.0 / (sum_sq(x) / x.len() as f32 + eps).sqrt();
    for ((o, v), w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * inv * w;
    }
}

/// [`rms_norm`] applied to every `width`-wide row of `x`, in place.
pub fn rms_norm_rows_in_place(x: &mut [f32], width: usize, weight: &[f32], eps: f32) {
    for row in x.chunks_exact_mut(width) {
        let inv = 1.0 / (sum_sq(row) / width as f32 + eps).sqrt();
        for (v, w) in row.iter_mut().zip(weight) {
            *v = *v * inv * w;
        }
    }
}

/// How rotary embeddings pair the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RopeStyle {
    /// Pairs `(2i, 2i+1)`: GGUF Llama checkpoints, whose Q/K weights were
    /// permuted by the converter.
    Interleaved,
    /// Pairs `(i, i + d/2)` ("rotate half"): Hugging Face checkpoints and
    /// GGUF Qwen2/Qwen3.
    Neox,
}

/// Rotates each `head_dim`-wide head of `x` (`n_heads` heads in a row) by
/// the angles whose cosines and sines are `cos`/`sin` (`head_dim / 2` each).
pub fn rope(x: &mut [f32], n_heads: usize, head_dim: usize, cos: &[f32], sin: &[f32], style: RopeStyle) {
    let half = head_dim / 2;
    for h in 0..n_heads {
        let v = &mut x[h * head_dim..(h + 1) * head_dim];
        for i in 0..half {
            let (a, b) = match style {
                RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                RopeStyle::Neox => (i, i + half),
            };
            let (x0, x1) = (v[a], v[b]);
            v[a] = x0 * cos[i] - x1 * sin[i];
            v[b] = x0 * sin[i] + x1 * cos[i];
        }
    }
}

/// `out[i] = silu(gate[i]) * up[i]`.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: every SIMD path includes AVX2, FMA and F16C.
        i if i.has_avx2() => unsafe { crate::x86::avx2::silu_mul(gate, up, out) },
        _ => silu_mul_ref(gate, up, out),
    }
}

/// Portable twin of [`silu_mul`].
pub fn silu_mul_ref(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

/// Softmax of `x` in place (all of it; an empty or all `-inf` slice gives
/// zeros).
pub fn softmax_in_place(x: &mut [f32]) {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: every SIMD path includes AVX2, FMA and F16C.
        i if i.has_avx2() => unsafe { crate::x86::avx2::softmax_in_place(x) },
        _ => softmax_in_place_ref(x),
    }
}

/// Portable twin of [`softmax_in_place`].
pub fn softmax_in_place_ref(x: &mut [f32]) {
    let m = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    if m == f32::NEG_INFINITY {
        x.fill(0.0);
        return;
    }
    let mut z = 0f32;
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        z += *v;
    }
    let inv = if z > 0.0 { 1.0 / z } else { 0.0 };
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `x[i] += y[i]`.
pub fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_gives_unit_mean_square_with_unit_weight() {
        let x: Vec<f32> = (0..576).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let mut out = vec![0f32; 576];
        rms_norm(&x, &vec![1.0; 576], 0.0, &mut out);
        let ms: f32 = out.iter().map(|v| v * v).sum::<f32>() / 576.0;
        assert!((ms - 1.0).abs() < 1e-4);
    }

    #[test]
    fn rope_styles_rotate_the_right_pairs_and_keep_norms() {
        let cos = [0.0f32, 1.0];
        let sin = [1.0f32, 0.0];
        let mut a = vec![1.0f32, 2.0, 3.0, 4.0];
        rope(&mut a, 1, 4, &cos, &sin, RopeStyle::Interleaved);
        // pair (0,1) rotated by 90 degrees, pair (2,3) unchanged
        assert_eq!(a, vec![-2.0, 1.0, 3.0, 4.0]);
        let mut b = vec![1.0f32, 2.0, 3.0, 4.0];
        rope(&mut b, 1, 4, &cos, &sin, RopeStyle::Neox);
        // pair (0,2) rotated by 90 degrees, pair (1,3) unchanged
        assert_eq!(b, vec![-3.0, 2.0, 1.0, 4.0]);
    }

    #[test]
    fn silu_mul_matches_the_formula() {
        let mut out = [0f32; 3];
        silu_mul_ref(&[0.0, 1.0, -2.0], &[2.0, 2.0, 2.0], &mut out);
        let silu = |x: f32| x / (1.0 + (-x).exp());
        assert_eq!(out, [0.0, silu(1.0) * 2.0, silu(-2.0) * 2.0]);
        let g: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 6.0).collect();
        let u = vec![1.5f32; 37];
        let (mut a, mut b) = (vec![0f32; 37], vec![0f32; 37]);
        silu_mul(&g, &u, &mut a);
        silu_mul_ref(&g, &u, &mut b);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-5 * y.abs().max(1.0), "{x} vs {y}");
        }
    }

    #[test]
    fn softmax_matches_the_portable_twin_and_sums_to_one() {
        for n in [1usize, 7, 8, 9, 300] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.7).collect();
            let (mut a, mut b) = (x.clone(), x.clone());
            softmax_in_place(&mut a);
            softmax_in_place_ref(&mut b);
            for (p, q) in a.iter().zip(&b) {
                assert!((p - q).abs() <= 1e-6 * q.max(1e-3), "{n}: {p} vs {q}");
            }
            assert!((a.iter().sum::<f32>() - 1.0).abs() < 1e-5, "{n}");
            // The largest input gets the largest probability.
            let top = (0..n).max_by(|&i, &j| x[i].total_cmp(&x[j])).unwrap();
            assert!(a.iter().all(|&p| p <= a[top]));
        }
        for f in [softmax_in_place, softmax_in_place_ref] {
            let mut v = vec![f32::NEG_INFINITY; 11];
            f(&mut v);
            assert_eq!(v, vec![0.0; 11]);
            let mut e: Vec<f32> = Vec::new();
            f(&mut e);
        }
    }
}
