//! Fixed work for instruction counting under callgrind:
//! `valgrind --tool=callgrind target/release/examples/mm_count M`.
use kernels::{matmul, Format, MatmulScratch, QMatrix, ThreadPool};

fn main() {
    let m: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(4);
    let fmt = if std::env::var("FMT").as_deref() == Ok("q8") { Format::Q8_0 } else { Format::Q4_1 };
    let pool = ThreadPool::new(1);
    let (n, k) = (256usize, 576usize);
    let w = QMatrix::quantize(fmt, n, k, &vec![0.01f32; n * k]).unwrap();
    let x = vec![0.5f32; m * k];
    let mut o = vec![0f32; m * n];
    let mut sc = MatmulScratch::default();
    for _ in 0..200 {
        matmul(&pool, &w, &x, m, &mut o, &mut sc);
    }
    println!("{}", o[0]);
}
