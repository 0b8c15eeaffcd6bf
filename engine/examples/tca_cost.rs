//! Times TCA's importance scoring (the cost of one decode-time compression)
//! at a given cache length: every (layer, KV head) of the default model's
//! shape scored by 16 observed query rows.
//! `cargo run --release -p ouro-engine --example tca_cost -- [entries]`
use std::time::Instant;

use engine::kv::{KvCache, KvLayout};
use engine::tca::compress::pooled_importance;

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(4000);
    let (n_layers, nkv, d, n_heads, rows) = (30, 3, 64, 9, 16);
    let l = KvLayout { n_layers, n_kv_heads: nkv, head_dim: d };
    let mut kv = KvCache::<half::f16>::new(l, (n / 16 + 2) * l.heads_per_seq() * l.page_elems() * 2).unwrap();
    let id = kv.alloc_seq();
    kv.grow(id, n).unwrap();
    for layer in 0..n_layers {
        for g in 0..nkv {
            for j in 0..n {
                let k: Vec<f32> = (0..d).map(|c| (((j * 31 + c * 7 + layer) % 97) as f32 / 48.0 - 1.0) * 0.3).collect();
                kv.write(id, layer, g, j, &k, &k);
            }
        }
    }
    let q: Vec<f32> = (0..rows * n_heads * d).map(|i| ((i * 13 % 101) as f32 / 50.0 - 1.0) * 0.5).collect();
    let lags: Vec<usize> = (0..rows).rev().collect();
    let mut out = Vec::new();
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        for layer in 0..n_layers {
            for g in 0..nkv {
                pooled_importance(&kv, id, layer, g, n, n_heads, &q, &lags, &mut out);
            }
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!("importance of {n} entries, {rows} rows, 90 heads, one thread: {:.1} ms (sum {})", best * 1e3, out.iter().sum::<f32>());
}
