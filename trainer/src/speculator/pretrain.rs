//! Offline warm start: self-distillation of the speculator on a corpus.
//!
//! The target model scores the corpus (one forward pass per chunk, capturing
//! its feature layers and final hidden states at every position), which
//! gives exactly what live traces give: for each position, the token after
//! it, the target's features and the target's distribution of the token
//! after that. The head then trains on these with the online objective, so a
//! user can start serving from a warm speculator.

use candle_core::Tensor;
use engine::kv::{KvCache, KvLayout};
use engine::model::{Batch, BatchSeq, Capture, ForwardOutput, Model, Workspace};
use engine::spec::speculator::Speculator;
use engine::trace::Trace;
use kernels::ThreadPool;

use super::replay::Replay;
use super::{TargetParts, Trainer, TrainerConfig};

/// Offline training settings.
#[derive(Debug, Clone)]
pub struct PretrainConfig {
    /// Trainer settings (objective, window, batch, learning rate).
    pub trainer: TrainerConfig,
    /// Optimizer steps.
    pub steps: u64,
    /// Tokens per scored chunk.
    pub chunk: usize,
    /// Compute threads for scoring.
    pub threads: usize,
    /// Steps between evaluations of the simulated acceptance length on the
    /// held-out chunks (0: only before and after).
    pub eval_every: u64,
}

/// Progress of a warm start.
#[derive(Debug, Clone, Copy)]
pub enum Progress {
    /// Scored `done` of `total` chunks.
    Scoring {
        /// Chunks scored.
        done: usize,
        /// Chunks in all.
        total: usize,
    },
    /// Took `step` of `steps` optimizer steps.
    Training {
        /// Steps taken.
        step: u64,
        /// Steps in all.
        steps: u64,
        /// Loss of the last step.
        loss: Option<f64>,
    },
    /// Evaluated the head after `step` steps (`--eval-every`).
    Evaluated {
        /// Steps taken.
        step: u64,
        /// Simulated acceptance length on the held-out chunks.
        simulated: Option<f64>,
    },
}

/// Scores `chunks` (token ids) with `model` into a replay window.
pub fn score(
    model: &Model,
    chunks: &[Vec<u32>],
    layers: [usize; 3],
    threads: usize,
    replay: &mut Replay,
    progress: &dyn Fn(Progress),
) -> engine::Result<()> {
    let cfg = model.config();
    let h = cfg.hidden_size;
    let layout = KvLayout { n_layers: cfg.n_layers, n_kv_heads: cfg.n_kv_heads, head_dim: cfg.head_dim };
    let longest = chunks.iter().map(Vec::len).max().unwrap_or(0);
    let mut kv = KvCache::<half::f16>::new(layout, (longest + 32) * cfg.kv_bytes_per_token(2) * 2)
        .ok_or_else(|| engine::EngineError::Invalid { param: None, message: "cannot reserve a KV cache for scoring".into() })?;
    let pool = ThreadPool::new(threads);
    let mut ws = Workspace::default();
    let mut out = ForwardOutput::default();
    let capture = [Capture::After(layers[0]), Capture::After(layers[1]), Capture::After(layers[2]), Capture::Final];
    for (i, c) in chunks.iter().enumerate() {
        if c.len() < 3 {
            continue;
        }
        let s = kv.alloc_seq();
        kv.grow(s, c.len()).map_err(|e| engine::EngineError::Invalid { param: None, message: e.to_string() })?;
        let positions: Vec<usize> = (0..c.len()).collect();
        let rows: Vec<usize> = (0..c.len()).collect();
        let batch = Batch {
            tokens: c,
            positions: &positions,
            seqs: &[BatchSeq { kv: s, n_rows: c.len() }],
            logits_rows: &[],
            hidden_rows: &rows,
            capture: &capture,
        };
        model.forward(&pool, &mut ws, &mut kv, &batch, &mut out)?;
        kv.free_seq(s);
        // Positions 0..n-1 are committed (the token after each is known).
        let n = c.len() - 1;
        let mut features = Vec::with_capacity(n * 3 * h);
        let mut last = Vec::with_capacity(n * h);
        for r in 0..n {
            let row = &out.hidden[r * 4 * h..(r + 1) * 4 * h];
            features.extend_from_slice(&row[..3 * h]);
            last.extend_from_slice(&row[3 * h..]);
        }
        replay.ingest(&Trace {
            seq_id: i as u64 + 1,
            start_pos: 0,
            tokens: c[..n].to_vec(),
            next_tokens: c[1..].to_vec(),
            discard: false,
            drafter: None,
            drafts: Vec::new(),
            accepted: 0,
            features,
            last_hidden: last,
            speculator_version: None,
            prefill: false,
        });
        progress(Progress::Scoring { done: i + 1, total: chunks.len() });
    }
    Ok(())
}

/// Trains `initial` on `chunks` scored by `model`; calls `checkpoint` with
/// the current weights every `every` steps and returns the final version.
pub fn pretrain(
    model: &Model,
    chunks: &[Vec<u32>],
    initial: Speculator,
    cfg: PretrainConfig,
    every: u64,
    progress: &dyn Fn(Progress),
    checkpoint: &mut dyn FnMut(&mut Speculator) -> engine::Result<()>,
) -> engine::Result<(Speculator, Option<f64>, Option<f64>)> {
    let layers = initial.manifest.config.feature_layers;
    let mut replay = Replay::new(cfg.trainer.replay_bytes.max(1 << 30), cfg.trainer.heldout_every);
    score(model, chunks, layers, cfg.threads, &mut replay, progress)?;
    let embed: Tensor = initial.embed.clone();
    let target = TargetParts { lm_head: model.lm_head().clone(), embed, fingerprint: model.fingerprint() };
    let base_version = initial.version();
    let mut t = Trainer::offline(cfg.trainer.clone(), target, initial, replay).map_err(candle)?;
    let before = t.simulated(&t.head, &t.target).map_err(candle)?;
    let mut last_loss = None;
    while t.steps < cfg.steps {
        let before_steps = t.steps;
        t.step().map_err(candle)?;
        if t.steps == before_steps {
            // A skipped (non-finite) step: try again; bad steps restore the
            // last good weights by themselves.
            continue;
        }
        last_loss = t.shared.status.lock().unwrap_or_else(|e| e.into_inner()).last_loss;
        progress(Progress::Training { step: t.steps, steps: cfg.steps, loss: last_loss });
        if cfg.eval_every > 0 && t.steps.is_multiple_of(cfg.eval_every) && t.steps < cfg.steps {
            let simulated = t.simulated(&t.head, &t.target).map_err(candle)?;
            progress(Progress::Evaluated { step: t.steps, simulated });
        }
        if every > 0 && t.steps.is_multiple_of(every) {
            let mut s = t.snapshot_version(&format!("warm start: {} steps offline", t.steps)).map_err(candle)?;
            s.manifest.version = base_version + 1;
            checkpoint(&mut s)?;
        }
    }
    let mut s = t.snapshot_version(&format!("trained offline: {} steps", t.steps)).map_err(candle)?;
    s.manifest.version = base_version + 1;
    let after = t.simulated(&s.head, &t.target).map_err(candle)?;
    s.manifest.simulated = after.map(|length| engine::spec::speculator::SimulatedAcceptance { length, chain: t.simulated_chain() });
    let _ = last_loss;
    Ok((s, before, after))
}

fn candle(e: candle_core::Error) -> engine::EngineError {
    engine::EngineError::Candle(e)
}
