//! A small fork-join thread pool for the hot path.
//!
//! Owns a fixed set of worker threads that wait (spinning briefly, then parked)
//! for a job, run its tasks, and report back. `ThreadPool::run(n_tasks, f)`
//! calls `f(task)` for every task in `0..n_tasks`, using the calling thread as
//! one of the workers, and returns when all tasks are done. Tasks are handed out
//! by an atomic counter, so which thread runs a task never changes its result:
//! kernels split work by output element, never by reduction.
//!
//! Why not rayon: a decode step makes a few hundred parallel calls of 20-200 µs
//! each, and waking parked threads for each costs more than the work on two
//! cores. Spinning for a short while between calls keeps the hand-off under a
//! microsecond without burning a core when the engine is idle.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins before parking.
const SPIN: Duration = Duration::from_micros(200);

type Job = *const (dyn Fn(usize) + Sync);

struct Shared {
    /// Bumped for every new job; workers compare against the last they ran.
    generation: AtomicUsize,
    /// The job of the current generation (valid while `remaining > 0`).
    job: Mutex<Option<SendJob>>,
    next_task: AtomicUsize,
    n_tasks: AtomicUsize,
    /// Workers (not the caller) still inside the current job.
    active: AtomicUsize,
    shutdown: AtomicBool,
    sleep_lock: Mutex<()>,
    wake: Condvar,
}

#[derive(Clone, Copy)]
struct SendJob(Job);
// SAFETY: the pointee is `Sync` and outlives the job (see `ThreadPool::run`).
unsafe impl Send for SendJob {}

/// A fixed-size pool of worker threads; see the module docs.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    n_threads: usize,
    /// Serialises `run` calls from different threads.
    run_lock: Mutex<()>,
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadPool").field("n_threads", &self.n_threads).finish()
    }
}

impl ThreadPool {
    /// A pool that runs jobs on `n_threads` threads in all (the caller plus
    /// `n_threads - 1` workers). `n_threads` of 0 is treated as 1.
    pub fn new(n_threads: usize) -> Self {
        let n_threads = n_threads.max(1);
        let shared = Arc::new(Shared {
            generation: AtomicUsize::new(0),
            job: Mutex::new(None),
            next_task: AtomicUsize::new(0),
            n_tasks: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            sleep_lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let workers = (1..n_threads)
            .map(|i| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("ouro-kernel-{i}"))
                    .spawn(move || worker_loop(&shared))
                    .expect("spawning a kernel worker thread")
            })
            .collect();
        Self { shared, workers, n_threads, run_lock: Mutex::new(()) }
    }

    /// Number of threads a job runs on, the caller included.
    pub fn n_threads(&self) -> usize {
        self.n_threads
    }

    /// Runs `f(task)` for every `task` in `0..n_tasks` and returns when all are
    /// done. Runs inline when the pool has one thread or there is one task.
    pub fn run<F: Fn(usize) + Sync>(&self, n_tasks: usize, f: F) {
        if n_tasks == 0 {
            return;
        }
        if self.n_threads == 1 || n_tasks == 1 {
            for t in 0..n_tasks {
                f(t);
            }
            return;
        }
        let _guard = self.run_lock.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        let dyn_f: &(dyn Fn(usize) + Sync) = &f;
        // SAFETY: we erase the lifetime of `f`; every worker finishes using it
        // before `active` reaches zero, and we wait for that below.
        let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(dyn_f) };
        *s.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(SendJob(job));
        s.n_tasks.store(n_tasks, Ordering::Relaxed);
        s.next_task.store(0, Ordering::Relaxed);
        s.active.store(self.n_threads - 1, Ordering::Relaxed);
        s.generation.fetch_add(1, Ordering::Release);
        {
            let _l = s.sleep_lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        run_tasks(s, dyn_f);
        // Wait for the workers to leave the job.
        while s.active.load(Ordering::Acquire) != 0 {}
        *s.job.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// Raw pointer to rows of a buffer shared by the tasks of one call.
#[derive(Clone, Copy)]
struct RowsPtr(*mut f32);
// SAFETY: each task gets a disjoint range of rows; `run` waits for all tasks.
unsafe impl Send for RowsPtr {}
unsafe impl Sync for RowsPtr {}

impl RowsPtr {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}

impl ThreadPool {
    /// Calls `f(row_index, row)` for every `width`-wide row of `data`,
    /// splitting rows over threads when there are at least `2 * min_rows`.
    pub fn for_each_row<F: Fn(usize, &mut [f32]) + Sync>(&self, data: &mut [f32], width: usize, min_rows: usize, f: F) {
        if width == 0 {
            return;
        }
        let rows = data.len() / width;
        if rows < 2 * min_rows.max(1) || self.n_threads == 1 {
            for (i, row) in data.chunks_exact_mut(width).enumerate() {
                f(i, row);
            }
            return;
        }
        let per_task = rows.div_ceil(self.n_threads * 4).max(min_rows);
        let n_tasks = rows.div_ceil(per_task);
        let ptr = RowsPtr(data.as_mut_ptr());
        self.run(n_tasks, |t| {
            for i in t * per_task..((t + 1) * per_task).min(rows) {
                // SAFETY: row i belongs to task t only and lies inside `data`.
                let row = unsafe { std::slice::from_raw_parts_mut(ptr.get().add(i * width), width) };
                f(i, row);
            }
        });
    }
}

fn run_tasks(s: &Shared, f: &(dyn Fn(usize) + Sync)) {
    let n = s.n_tasks.load(Ordering::Relaxed);
    loop {
        let t = s.next_task.fetch_add(1, Ordering::Relaxed);
        if t >= n {
            break;
        }
        f(t);
    }
}

fn worker_loop(s: &Shared) {
    let mut seen = 0usize;
    loop {
        // Wait for a new generation: spin first, then park.
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            if s.shutdown.load(Ordering::Acquire) {
                return;
            }
            if s.generation.load(Ordering::Acquire) != seen {
                break;
            }
            // No `pause` here: in a VM, tight pause loops trigger
            // pause-loop exits that deschedule the vCPU (measured: 10x
            // slower hand-offs). Plain loads of the shared line are cheap.
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(64) || start.elapsed() < SPIN {
                continue;
            }
            let guard = s.sleep_lock.lock().unwrap_or_else(|e| e.into_inner());
            if s.generation.load(Ordering::Acquire) == seen && !s.shutdown.load(Ordering::Acquire) {
                let _ = s.wake.wait_timeout(guard, Duration::from_millis(50)).unwrap_or_else(|e| e.into_inner());
            }
        }
        seen = s.generation.load(Ordering::Acquire);
        let job = *s.job.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(SendJob(job)) = job {
            // SAFETY: the caller of `run` keeps the closure alive until `active`
            // drops to zero, which happens only after this call returns.
            let f = unsafe { &*job };
            run_tasks(s, f);
        }
        s.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        {
            let _l = self.shared.sleep_lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_task_runs_exactly_once() {
        let pool = ThreadPool::new(3);
        for n in [0usize, 1, 2, 7, 100, 1000] {
            let hits: Vec<AtomicU64> = (0..n).map(|_| AtomicU64::new(0)).collect();
            pool.run(n, |t| {
                hits[t].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
    }

    #[test]
    fn many_small_jobs_in_a_row_complete() {
        let pool = ThreadPool::new(2);
        let total = AtomicU64::new(0);
        for _ in 0..10_000 {
            pool.run(4, |t| {
                total.fetch_add(t as u64, Ordering::Relaxed);
            });
        }
        assert_eq!(total.load(Ordering::Relaxed), 10_000 * 6);
    }

    #[test]
    fn pool_survives_idle_periods() {
        let pool = ThreadPool::new(2);
        let total = AtomicU64::new(0);
        pool.run(8, |_| {
            total.fetch_add(1, Ordering::Relaxed);
        });
        std::thread::sleep(Duration::from_millis(120));
        pool.run(8, |_| {
            total.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(total.load(Ordering::Relaxed), 16);
    }
}
