//! One small matrix, hot in L1, many calls: the kernel's compute ceiling.
use std::time::Instant;

use kernels::{matmul, Format, MatmulScratch, QMatrix, ThreadPool};

fn main() {
    let pool = ThreadPool::new(1);
    for (n, k) in [(16usize, 576usize), (64, 576), (256, 576)] {
        let w = QMatrix::quantize(Format::Q4_1, n, k, &vec![0.01f32; n * k]).unwrap();
        let mut sc = MatmulScratch::default();
        for m in [1usize, 4, 16] {
            let x = vec![0.5f32; m * k];
            let mut o = vec![0f32; m * n];
            let reps = 20000;
            let t = Instant::now();
            for _ in 0..reps {
                matmul(&pool, &w, &x, m, &mut o, &mut sc);
            }
            let dt = t.elapsed().as_secs_f64() / reps as f64;
            let block_rows = (n * k / 32 * m) as f64;
            println!("n={n} k={k} m={m:2}: {:8.2} us/call  {:5.2} ns/block-row", dt * 1e6, dt * 1e9 / block_rows);
        }
    }
}
