//! Matmul timing over all the matrices of SmolLM2-135M's layers, per format,
//! instruction-set path and m, with the weight bytes read per second, their
//! share of the read bandwidth measured in the same run the way the matmul
//! reads (`kernels::bandwidth`, same threads, warm, same byte count), and the
//! time relative to m = 1 on the same path. Paths take turns within each
//! (format, m) cell, so a noisy neighbour hits them alike.
//! `cargo run --release -p ouro-kernels --example mm [-- THREADS [FORMATS]]`
//! (FORMATS: comma-separated, e.g. `q4_1,q8_0`).
use std::time::Instant;

use kernels::cpu::Isa;
use kernels::matmul::matmul_on;
use kernels::{Format, MatmulScratch, QMatrix, ThreadPool, FORMATS};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let threads: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    let wanted: Vec<Format> = match args.get(2) {
        Some(list) => FORMATS.into_iter().filter(|f| list.split(',').any(|n| n == f.name())).collect(),
        None => vec![Format::Q4_1, Format::Q8_0, Format::Q4_0],
    };
    let pool = ThreadPool::new(threads);
    let paths: Vec<Isa> = Isa::ALL.into_iter().filter(|i| i.supported() && *i != Isa::Portable).collect();
    println!("cpu paths: {} (in use: {})", paths.iter().map(|i| i.name()).collect::<Vec<_>>().join(", "), kernels::cpu::isa().name());
    // All layers' matrices of SmolLM2-135M as one stack: 30 x (qkv 960 + o 576 + gate_up 3072) rows of 576, down 576 rows of 1536.
    let (n1, k1) = (30 * (960 + 576 + 3072), 576);
    let (n2, k2) = (30 * 576, 1536);
    for format in wanted {
        let w1 = QMatrix::quantize(format, n1, k1, &vec![0.01f32; n1 * k1]).unwrap();
        let w2 = QMatrix::quantize(format, n2, k2, &vec![0.01f32; n2 * k2]).unwrap();
        let bytes = w1.bytes() + w2.bytes();
        let ceiling = kernels::bandwidth::read_gbs(&pool, bytes, 7);
        println!(
            "{}: {:.1} MiB of weights; read bandwidth (same bytes, {threads} threads, warm): {ceiling:.1} GB/s",
            format.name(),
            bytes as f64 / (1 << 20) as f64
        );
        let mut sc = MatmulScratch::default();
        // The same weights called as the forward pass calls them: four
        // matrices a layer, 30 layers, one row (the per-call overhead).
        let layer: Vec<(QMatrix, usize)> = [(960usize, 576usize), (576, 576), (3072, 576), (576, 1536)]
            .iter()
            .map(|&(n, k)| (QMatrix::quantize(format, n, k, &vec![0.01f32; n * k]).unwrap(), k))
            .collect();
        let copies: Vec<Vec<(QMatrix, usize)>> = (0..30).map(|_| layer.clone()).collect();
        let mut per_call = f64::MAX;
        let mut out = vec![0f32; 3072];
        let inputs = [vec![0.5f32; 576], vec![0.5f32; 1536]];
        for _ in 0..20 {
            let t = Instant::now();
            for l in &copies {
                for (w, k) in l {
                    let x = if *k == 576 { &inputs[0] } else { &inputs[1] };
                    kernels::matmul(&pool, w, x, 1, &mut out[..w.rows()], &mut sc);
                }
            }
            per_call = per_call.min(t.elapsed().as_secs_f64());
        }
        println!(
            "{:5} {:8} m=  1 as 120 calls (4 matrices x 30 layers): {:7.2} ms",
            format.name(),
            kernels::cpu::isa().name(),
            per_call * 1e3
        );
        let mut one_row = vec![0.0; paths.len()];
        for m in [1usize, 2, 4, 5, 8, 9, 16, 64] {
            let x1 = vec![0.5f32; m * k1];
            let x2 = vec![0.5f32; m * k2];
            let mut o1 = vec![0f32; m * n1];
            let mut o2 = vec![0f32; m * n2];
            let reps = if m > 16 { 2 } else { 5 };
            let mut best = vec![f64::MAX; paths.len()];
            for _round in 0..3 {
                for (pi, &isa) in paths.iter().enumerate() {
                    matmul_on(isa, &pool, &w1, &x1, m, &mut o1, &mut sc);
                    let t = Instant::now();
                    for _ in 0..reps {
                        matmul_on(isa, &pool, &w1, &x1, m, &mut o1, &mut sc);
                        matmul_on(isa, &pool, &w2, &x2, m, &mut o2, &mut sc);
                    }
                    best[pi] = best[pi].min(t.elapsed().as_secs_f64() / reps as f64);
                }
            }
            for (pi, &isa) in paths.iter().enumerate() {
                let dt = best[pi];
                if m == 1 {
                    one_row[pi] = dt;
                }
                let gbs = bytes as f64 / dt / 1e9;
                println!(
                    "{:5} {:8} m={m:3}: {:7.2} ms = {:5.2}x m=1  {:6.1} GB/s = {:4.2}x read bandwidth  {:7.1} us/row",
                    format.name(),
                    isa.name(),
                    dt * 1e3,
                    dt / one_row[pi],
                    gbs,
                    gbs / ceiling,
                    dt * 1e6 / m as f64
                );
            }
        }
    }
}
