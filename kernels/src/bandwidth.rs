//! The memory read bandwidth the matmul can reach, measured the way it
//! reads: one buffer the size of the weights, split into contiguous runs
//! handed to the pool's threads as tasks, each run read once front to back
//! with 256-bit loads. The best of several warm passes is the ceiling a
//! memory-bound kernel (one activation row) is judged against.

use std::time::Instant;

use crate::pool::ThreadPool;

/// Reads a `bytes`-byte buffer `passes` times after one warm-up pass and
/// returns the best pass's GB/s.
pub fn read_gbs(pool: &ThreadPool, bytes: usize, passes: usize) -> f64 {
    let buf: Vec<u8> = (0..bytes).map(|i| i as u8).collect();
    // Tasks of 64 KiB or more, about 16 per thread, as the matmul splits.
    let tasks = (pool.n_threads() * 16).min(bytes / 65536).max(1);
    let run = bytes / tasks / 64 * 64;
    let sink = std::sync::atomic::AtomicU64::new(0);
    let mut best = f64::MAX;
    for pass in 0..=passes {
        let t = Instant::now();
        pool.run(tasks, |i| {
            let part = &buf[i * run..(i + 1) * run];
            sink.fetch_xor(read_run(part), std::sync::atomic::Ordering::Relaxed);
        });
        if pass > 0 {
            best = best.min(t.elapsed().as_secs_f64());
        }
    }
    std::hint::black_box(sink.into_inner());
    (tasks * run) as f64 / best / 1e9
}

fn read_run(part: &[u8]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::Isa::Avx2.supported() {
        // SAFETY: AVX2 was just checked.
        return unsafe { crate::x86::avx2::xor_reduce(part) };
    }
    part.chunks_exact(8).fold(0u64, |a, c| a ^ u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
}
