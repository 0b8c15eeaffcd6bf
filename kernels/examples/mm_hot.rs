//! One small matrix, hot in cache, many calls: the kernel's compute ceiling.
//! Reports the best of 15 batches (robust against a noisy machine).
//! `FMT=q8|q4_1 THREADS=1 cargo run --release -p ouro-kernels --example mm_hot`
use std::time::Instant;

use kernels::{matmul, Format, MatmulScratch, QMatrix, ThreadPool};

fn main() {
    let threads: usize = std::env::var("THREADS").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let pool = ThreadPool::new(threads);
    let fmt = if std::env::var("FMT").as_deref() == Ok("q8") { Format::Q8_0 } else { Format::Q4_1 };
    for (n, k) in [(256usize, 576usize), (256, 1536)] {
        let w = QMatrix::quantize(fmt, n, k, &vec![0.01f32; n * k]).unwrap();
        let mut sc = MatmulScratch::default();
        for m in [1usize, 2, 4, 5, 8, 16] {
            let x = vec![0.5f32; m * k];
            let mut o = vec![0f32; m * n];
            let reps = 2000 / m;
            let mut best = f64::MAX;
            for _ in 0..15 {
                let t = Instant::now();
                for _ in 0..reps {
                    matmul(&pool, &w, &x, m, &mut o, &mut sc);
                }
                best = best.min(t.elapsed().as_secs_f64() / reps as f64);
            }
            let block_rows = (n * k / 32 * m) as f64;
            println!("{} n={n} k={k} m={m:2}: {:8.2} us/call  {:5.3} ns/block-row", fmt.name(), best * 1e6, best * 1e9 / block_rows);
        }
    }
}
