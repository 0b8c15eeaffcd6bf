//! Times the speculator head: catch-up over committed positions and drafting k tokens.
use std::time::Instant;

use candle_core::{Device, Tensor};
use engine::spec::speculator::{default_draft_vocab, embedding_tensor, Speculator};
use engine::spec::{Draft, DraftContext, Drafter, SpecSeqState, SpeculatorDrafter};
use rand::SeedableRng;

fn main() -> anyhow::Result<()> {
    let path = std::env::args().nth(1).unwrap_or_else(|| "models/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let lm = engine::loader::load(path.as_ref(), engine::weights::Requant::None, &|_, _| {})?;
    let embed = embedding_tensor(&lm.model)?;
    let pool = std::sync::Arc::new(kernels::ThreadPool::new(2));
    let spec = std::sync::Arc::new(Speculator::day0(&lm.model, embed, default_draft_vocab(49152, 8192), 1)?.frozen(&pool)?);
    let h = 576;
    let mut st = SpecSeqState::default();
    for p in 0..64 {
        st.commit(p, (p * 7 + 3) as u32, &vec![0.01 * (p as f32); 3 * h]);
    }
    let mut d = SpeculatorDrafter::new(spec.clone());
    let params = engine::sampling::SamplingParams::greedy();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let toks: Vec<u32> = (0..65).collect();
    let mut out = Draft::default();
    let t = Instant::now();
    d.draft(&mut DraftContext { tokens: &toks, state: &mut st, sampling: &params, rng: &mut rng }, 1, &mut out)?;
    println!("catch-up 64 positions + 1 draft: {:?}", t.elapsed());
    for k in [1usize, 2, 4, 8] {
        let t = Instant::now();
        for _ in 0..10 {
            d.draft(&mut DraftContext { tokens: &toks, state: &mut st, sampling: &params, rng: &mut rng }, k, &mut out)?;
        }
        println!("draft k={k}: {:.2} ms", t.elapsed().as_secs_f64() * 100.0);
    }
    let x = Tensor::ones((1, 576), candle_core::DType::F32, &Device::Cpu)?;
    let w = Tensor::ones((8192, 576), candle_core::DType::F32, &Device::Cpu)?;
    let t = Instant::now();
    for _ in 0..100 {
        let _ = x.matmul(&w.t()?)?;
    }
    println!("candle 1x576 @ 576x8192: {:.3} ms", t.elapsed().as_secs_f64() * 10.0);
    Ok(())
}
