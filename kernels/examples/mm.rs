//! Quick matmul timing: `cargo run --release -p ouro-kernels --example mm`.
use std::time::Instant;

use kernels::{matmul, Format, MatmulScratch, QMatrix, ThreadPool};

fn main() {
    let threads: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    let pool = ThreadPool::new(threads);
    // All layers' matrices of SmolLM2-135M as one stack: 30 x (qkv 960 + o 576 + gate_up 3072) rows of 576, down 576 rows of 1536.
    for format in [Format::Q4_1, Format::Q8_0, Format::Q4_0] {
        let (n1, k1) = (30 * (960 + 576 + 3072), 576);
        let (n2, k2) = (30 * 576, 1536);
        let w1 = QMatrix::quantize(format, n1, k1, &vec![0.01f32; n1 * k1]).unwrap();
        let w2 = QMatrix::quantize(format, n2, k2, &vec![0.01f32; n2 * k2]).unwrap();
        let bytes = (w1.bytes() + w2.bytes()) as f64;
        let mut sc = MatmulScratch::default();
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
            println!("{:5} m={m:3}: {:7.2} ms  {:6.1} GB/s  {:7.1} us/row", format.name(), dt * 1e3, bytes / dt / 1e9, dt * 1e6 / m as f64);
        }
    }
}
