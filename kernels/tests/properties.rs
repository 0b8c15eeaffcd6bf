//! Property tests (proptest) over shapes: random matrix and cache shapes,
//! row counts and lengths, checked against `f64` references and for batch
//! invariance, on the portable kernels and on the CPU's SIMD ones.

use half::f16;
use kernels::attention::{attend_on, PAGE};
use kernels::cpu::{isa, Isa};
use kernels::matmul::matmul_on;
use kernels::{AttnSeq, AttnShape, Format, KvSource, MatmulScratch, QMatrix, ThreadPool};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

fn isas() -> Vec<Isa> {
    let mut v = vec![Isa::Scalar];
    if isa() != Isa::Scalar {
        v.push(isa());
    }
    v
}

fn values(rng: &mut rand::rngs::StdRng, n: usize, span: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-span..span)).collect()
}

const FORMATS: [Format; 5] = [Format::F32, Format::F16, Format::Q8_0, Format::Q4_0, Format::Q4_1];

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

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
        let w = QMatrix::quantize(format, n, k, &values(&mut rng, n * k, 1.0)).unwrap();
        let x = values(&mut rng, m * k, 1.0);
        let wf = w.to_f32();
        let pool = ThreadPool::new(2);
        let bound = if format.is_blocked() { k as f64 * 0.5 / 127.0 + 1e-3 } else { 1e-3 * k as f64 / 64.0 };
        for isa_ in isas() {
            let mut scratch = MatmulScratch::default();
            let mut out = vec![0f32; m * n];
            matmul_on(isa_, &pool, &w, &x, m, &mut out, &mut scratch);
            for r in 0..m {
                let mut one = vec![0f32; n];
                matmul_on(isa_, &pool, &w, &x[r * k..(r + 1) * k], 1, &mut one, &mut scratch);
                for j in 0..n {
                    let want: f64 = (0..k).map(|c| wf[j * k + c] as f64 * x[r * k + c] as f64).sum();
                    let got = out[r * n + j];
                    prop_assert!((got as f64 - want).abs() <= bound, "{:?} {:?} n={} k={} m={} row {} col {}: {} vs {}", format, isa_, n, k, m, r, j, got, want);
                    prop_assert_eq!(got.to_bits(), one[j].to_bits(), "{:?} {:?} row {} col {} alone", format, isa_, r, j);
                }
            }
        }
    }

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
        let (kv, dense) = build(&mut rng, &shape, &[len, other]);
        let w = shape.n_heads * d;
        let q = values(&mut rng, (rows + 1) * w, 2.0);
        let pool = ThreadPool::new(2);
        for isa_ in isas() {
            // Our sequence's rows, then one row of another sequence.
            let mut both = vec![0f32; (rows + 1) * w];
            attend_on(isa_, &pool, &shape, &[AttnSeq { row0: 0, n_rows: rows }, AttnSeq { row0: rows, n_rows: 1 }], &kv, &q, w, &mut both, w);
            let alone_kv = Cache { arena: kv.arena.clone(), heads: vec![kv.heads[0].clone()] };
            let mut alone = vec![0f32; rows * w];
            attend_on(isa_, &pool, &shape, &[AttnSeq { row0: 0, n_rows: rows }], &alone_kv, &q[..rows * w], w, &mut alone, w);
            for j in 0..rows {
                let ctx = len - (rows - 1 - j);
                for h in 0..shape.n_heads {
                    let (kd, vd) = &dense[0][h / group];
                    let qh = &q[j * w + h * d..][..d];
                    let s: Vec<f64> = (0..ctx).map(|t| (0..d).map(|c| qh[c] as f64 * kd[t * d + c] as f64).sum::<f64>() * shape.scale as f64).collect();
                    let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|v| (v - mx).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for c in 0..d {
                        let want = (0..ctx).map(|t| e[t] * vd[t * d + c] as f64).sum::<f64>() / z;
                        let got = both[j * w + h * d + c];
                        prop_assert!((got as f64 - want).abs() < 1e-4, "{:?} len {} rows {} row {} head {}: {} vs {}", isa_, len, rows, j, h, got, want);
                        prop_assert_eq!(got.to_bits(), alone[j * w + h * d + c].to_bits(), "{:?} row {} head {} alone", isa_, j, h);
                    }
                }
            }
        }
    }
}

/// A paged f16 cache: pages in a shuffled order, keys transposed.
struct Cache {
    arena: Vec<f16>,
    heads: Vec<Vec<(Vec<u32>, usize)>>,
}

impl KvSource for Cache {
    type Elem = f16;
    fn arena(&self) -> &[f16] {
        &self.arena
    }
    fn head(&self, seq: usize, kv_head: usize) -> (&[u32], usize) {
        let (p, l) = &self.heads[seq][kv_head];
        (p, *l)
    }
}

/// Dense keys and values of every (sequence, KV head), as the cache holds them.
type Dense = Vec<Vec<(Vec<f32>, Vec<f32>)>>;

fn build(rng: &mut rand::rngs::StdRng, shape: &AttnShape, lens: &[usize]) -> (Cache, Dense) {
    let d = shape.head_dim;
    let total: usize = lens.iter().map(|l| l.div_ceil(PAGE) * shape.n_kv_heads).sum();
    let mut ids: Vec<u32> = (0..total as u32).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, rng.random_range(0..=i));
    }
    let mut arena = vec![f16::from_f32(0.0); total * shape.page_elems()];
    let (mut heads, mut dense, mut next) = (Vec::new(), Vec::new(), 0);
    for &len in lens {
        let (mut hs, mut ds) = (Vec::new(), Vec::new());
        for _ in 0..shape.n_kv_heads {
            let pages: Vec<u32> = ids[next..next + len.div_ceil(PAGE)].to_vec();
            next += pages.len();
            let (mut kd, mut vd) = (vec![0f32; len * d], vec![0f32; len * d]);
            for t in 0..len {
                let base = pages[t / PAGE] as usize * shape.page_elems();
                for c in 0..d {
                    let k = f16::from_f32(rng.random_range(-1.0f32..1.0));
                    let v = f16::from_f32(rng.random_range(-1.0f32..1.0));
                    arena[base + c * PAGE + t % PAGE] = k;
                    arena[base + PAGE * d + (t % PAGE) * d + c] = v;
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
    (Cache { arena, heads }, dense)
}
