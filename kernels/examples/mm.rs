//! Quick matmul timing over all the matrices of SmolLM2-135M's layers, per
//! format and m, with the weight bytes read per second, their share of a
//! memory-bandwidth ceiling measured in the same run (a STREAM-style triad
//! over 3 x 64 MiB on the same threads), and the time relative to m = 1.
//! `cargo run --release -p ouro-kernels --example mm [-- THREADS]`
use std::time::Instant;

use kernels::{matmul, Format, MatmulScratch, QMatrix, ThreadPool};

/// Best of five triads `a = b + 3c`, in GB/s (three arrays' bytes).
fn triad_gbs(pool: &ThreadPool) -> f64 {
    let n = 16 << 20;
    let (b, c) = (vec![1.0f32; n], vec![2.0f32; n]);
    let mut a = vec![0.0f32; n];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        pool.for_each_row(&mut a, 1 << 16, 1, |r, row| {
            let off = r << 16;
            for (i, v) in row.iter_mut().enumerate() {
                *v = b[off + i] + 3.0 * c[off + i];
            }
        });
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&a);
    (3 * n * 4) as f64 / best / 1e9
}

fn main() {
    let threads: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    let pool = ThreadPool::new(threads);
    let ceiling = triad_gbs(&pool);
    println!("memory bandwidth ceiling (triad, {threads} threads): {ceiling:.1} GB/s");
    // All layers' matrices of SmolLM2-135M as one stack: 30 x (qkv 960 + o 576 + gate_up 3072) rows of 576, down 576 rows of 1536.
    for format in [Format::Q4_1, Format::Q8_0, Format::Q4_0] {
        let (n1, k1) = (30 * (960 + 576 + 3072), 576);
        let (n2, k2) = (30 * 576, 1536);
        let w1 = QMatrix::quantize(format, n1, k1, &vec![0.01f32; n1 * k1]).unwrap();
        let w2 = QMatrix::quantize(format, n2, k2, &vec![0.01f32; n2 * k2]).unwrap();
        let bytes = (w1.bytes() + w2.bytes()) as f64;
        let mut sc = MatmulScratch::default();
        let mut one_row = 0.0;
        for m in [1usize, 2, 4, 5, 8, 9, 16, 64] {
            let x1 = vec![0.5f32; m * k1];
            let x2 = vec![0.5f32; m * k2];
            let mut o1 = vec![0f32; m * n1];
            let mut o2 = vec![0f32; m * n2];
            let reps = if m > 16 { 3 } else { 10 };
            matmul(&pool, &w1, &x1, m, &mut o1, &mut sc);
            let t = Instant::now();
            for _ in 0..reps {
                matmul(&pool, &w1, &x1, m, &mut o1, &mut sc);
                matmul(&pool, &w2, &x2, m, &mut o2, &mut sc);
            }
            let dt = t.elapsed().as_secs_f64() / reps as f64;
            if m == 1 {
                one_row = dt;
            }
            let gbs = bytes / dt / 1e9;
            println!(
                "{:5} m={m:3}: {:7.2} ms = {:5.2}x m=1  {:6.1} GB/s = {:4.2}x ceiling  {:7.1} us/row",
                format.name(),
                dt * 1e3,
                dt / one_row,
                gbs,
                gbs / ceiling,
                dt * 1e6 / m as f64
            );
        }
    }
}
