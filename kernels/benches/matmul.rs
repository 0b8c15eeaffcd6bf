//! Quantized matmul: ouro's kernel against candle's `QMatMul` on the same
//! weights, for the real matrix shapes of SmolLM2-135M and m = 1..16 rows,
//! plus a memory-bandwidth ceiling (STREAM-style triad) measured in the same
//! run. Criterion prints time and GB/s of weight bytes per case; divide by
//! the triad's GB/s for the fraction of the ceiling.
//!
//! `cargo bench -p ouro-kernels --bench matmul`

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kernels::{matmul, Format, MatmulScratch, QMatrix, ThreadPool};

const SHAPES: &[(&str, usize, usize, Format)] = &[
    ("qkv", 960, 576, Format::Q4_1),
    ("gate_up", 3072, 576, Format::Q4_1),
    ("down", 576, 1536, Format::Q4_1),
    ("lm_head", 49152, 576, Format::Q8_0),
];
const ROWS: &[usize] = &[1, 2, 4, 5, 8, 16];

fn weights(n: usize, k: usize) -> Vec<f32> {
    (0..n * k).map(|i| ((i * 2654435761usize) % 1000) as f32 / 500.0 - 1.0).collect()
}

fn bench_matmul(c: &mut Criterion) {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).min(2);
    let pool = ThreadPool::new(threads);
    for &(name, n, k, format) in SHAPES {
        let w = weights(n, k);
        let ours = QMatrix::quantize(format, n, k, &w).unwrap();
        let dtype = if format == Format::Q8_0 { GgmlDType::Q8_0 } else { GgmlDType::Q4_1 };
        let wt = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
        let theirs = QMatMul::from_qtensor(QTensor::quantize(&wt, dtype).unwrap()).unwrap();
        let mut group = c.benchmark_group(format!("matmul/{name}_{}x{}_{}", n, k, format.name()));
        group.throughput(Throughput::Bytes(ours.bytes() as u64));
        group.sample_size(20);
        let mut scratch = MatmulScratch::default();
        for &m in ROWS {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 100) as f32 / 50.0 - 1.0).collect();
            let mut out = vec![0f32; m * n];
            group.bench_with_input(BenchmarkId::new("ouro", m), &m, |b, &m| b.iter(|| matmul(&pool, &ours, &x, m, &mut out, &mut scratch)));
            let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
            group.bench_with_input(BenchmarkId::new("candle", m), &m, |b, _| b.iter(|| theirs.forward(&xt).unwrap()));
        }
        group.finish();
    }
}

/// A STREAM-style triad `a = b + s * c` over 3 x 64 MiB, split over the same
/// threads: the bytes a core pair can stream, the ceiling for weight reads.
fn bench_bandwidth(c: &mut Criterion) {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).min(2);
    let pool = ThreadPool::new(threads);
    let n = 16 << 20; // f32 elements per array
    let b = vec![1.0f32; n];
    let cc = vec![2.0f32; n];
    let mut a = vec![0.0f32; n];
    let mut group = c.benchmark_group("memory_bandwidth");
    group.throughput(Throughput::Bytes((3 * n * 4) as u64));
    group.sample_size(10);
    group.bench_function("triad", |bench| {
        bench.iter(|| {
            pool.for_each_row(&mut a, 1 << 16, 1, |r, row| {
                let off = r << 16;
                for (i, v) in row.iter_mut().enumerate() {
                    *v = b[off + i] + 3.0 * cc[off + i];
                }
            })
        })
    });
    group.finish();
}

criterion_group!(benches, bench_bandwidth, bench_matmul);
criterion_main!(benches);
