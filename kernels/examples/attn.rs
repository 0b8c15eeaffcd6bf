//! Times attention of a decode/verify step against a long context, in the
//! default model's shape (9 query heads, 3 KV heads, head_dim 64, f16 cache,
//! 30 layers whose pages interleave in one arena as a cache filled step by
//! step): best of 15 rounds, per 30 layer calls, for 1..9 rows.
//! `cargo run --release -p ouro-kernels --example attn [-- CTX]` (`THREADS=n`)
use std::time::Instant;

use half::f16;
use kernels::attention::{attend, AttnSeq, AttnShape, KvSource, PAGE};
use kernels::ThreadPool;

/// One layer's view of the shared arena.
struct Layer<'a> {
    arena: &'a [f16],
    pages: Vec<Vec<u32>>,
    len: usize,
}

impl KvSource for Layer<'_> {
    type Elem = f16;
    fn arena(&self) -> &[f16] {
        self.arena
    }
    fn head(&self, _seq: usize, kv_head: usize) -> (&[u32], usize) {
        (&self.pages[kv_head], self.len)
    }
}

fn main() {
    let ctx: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(640);
    let threads: usize = std::env::var("THREADS").ok().and_then(|s| s.parse().ok()).unwrap_or(2);
    let pool = ThreadPool::new(threads);
    let (n_heads, n_kv, d, layers) = (9usize, 3usize, 64usize, 30usize);
    let shape = AttnShape { n_heads, n_kv_heads: n_kv, head_dim: d, page_size: PAGE, scale: 1.0 / 8.0 };
    let per_head = ctx.div_ceil(PAGE);
    let total = per_head * n_kv * layers;
    let arena: Vec<f16> =
        (0..total * shape.page_elems()).map(|i| f16::from_f32(((i * 2654435761usize) % 1000) as f32 / 500.0 - 1.0)).collect();
    let views: Vec<Layer> = (0..layers)
        .map(|l| Layer {
            arena: &arena,
            pages: (0..n_kv).map(|g| (0..per_head).map(|p| ((p * layers + l) * n_kv + g) as u32).collect()).collect(),
            len: ctx,
        })
        .collect();
    for m in [1usize, 2, 3, 5, 9] {
        let q: Vec<f32> = (0..m * n_heads * d).map(|i| ((i * 7919) % 100) as f32 / 50.0 - 1.0).collect();
        let mut out = vec![0f32; m * n_heads * d];
        let seqs = [AttnSeq { row0: 0, n_rows: m }];
        let mut best = f64::MAX;
        for _ in 0..15 {
            let t = Instant::now();
            for _ in 0..4 {
                for v in &views {
                    attend(&pool, &shape, &seqs, v, &q, n_heads * d, &mut out, n_heads * d);
                }
            }
            best = best.min(t.elapsed().as_secs_f64() / 4.0);
        }
        println!("ctx {ctx} rows {m}: {:7.3} ms per {layers} layers", best * 1e3);
    }
}
