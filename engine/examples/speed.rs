//! Quick forward-pass timing on a model: prefill 512, decode 128, then
//! forwards of k = 1..16 rows after that context with their ratios to one
//! row (the cost of verifying k - 1 drafts).
//! `cargo run --release -p ouro-engine --example speed -- MODEL [requant] [threads]`
use std::time::Instant;

use engine::kv::{KvCache, KvLayout};
use engine::model::{Batch, BatchSeq, ForwardOutput, Workspace};
use engine::weights::Requant;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let requant = Requant::parse(args.get(2).map(String::as_str).unwrap_or("none")).unwrap_or(Requant::None);
    let threads: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(2);
    let t0 = Instant::now();
    let lm = engine::loader::load(args[1].as_ref(), requant, &|_, _| {})?;
    println!("load {:?} formats {}", t0.elapsed(), lm.model.weight_formats());
    let cfg = lm.model.config().clone();
    let pool = kernels::ThreadPool::new(threads);
    let layout = KvLayout { n_layers: cfg.n_layers, n_kv_heads: cfg.n_kv_heads, head_dim: cfg.head_dim };
    let mut kv = KvCache::<half::f16>::new(layout, 1 << 30).unwrap();
    let mut ws = Workspace::default();
    let mut out = ForwardOutput::default();
    let s = kv.alloc_seq();
    let prompt: Vec<u32> = (0..512).map(|i| (i * 37 % 40000 + 100) as u32).collect();
    let positions: Vec<usize> = (0..512).collect();
    kv.grow(s, 512)?;
    let t = Instant::now();
    lm.model.forward(
        &pool,
        &mut ws,
        &mut kv,
        &Batch {
            tokens: &prompt,
            positions: &positions,
            seqs: &[BatchSeq { kv: s, n_rows: 512 }],
            logits_rows: &[511],
            hidden_rows: &[],
            capture: &[],
        },
        &mut out,
    )?;
    let pf = t.elapsed();
    println!("prefill 512: {:?} = {:.1} tok/s", pf, 512.0 / pf.as_secs_f64());
    let mut pos = 512;
    let t = Instant::now();
    for i in 0..128 {
        kv.grow(s, 1)?;
        lm.model.forward(
            &pool,
            &mut ws,
            &mut kv,
            &Batch {
                tokens: &[(i * 13 + 5) as u32],
                positions: &[pos],
                seqs: &[BatchSeq { kv: s, n_rows: 1 }],
                logits_rows: &[0],
                hidden_rows: &[],
                capture: &[],
            },
            &mut out,
        )?;
        pos += 1;
    }
    let dt = t.elapsed();
    println!("decode 128 (ctx 512..640): {:?} = {:.1} tok/s", dt, 128.0 / dt.as_secs_f64());
    // Verify-sized forwards (k rows after the 640-token context), the row
    // counts taking turns over rounds so that a slow moment of the machine
    // hits all of them; the best round of each is kept.
    let ks = [1usize, 2, 3, 4, 5, 6, 7, 8, 9, 16];
    let mut best = vec![f64::MAX; ks.len()];
    let mut profiles: Vec<engine::model::Profile> = vec![Default::default(); ks.len()];
    for _round in 0..5 {
        for (ki, &k) in ks.iter().enumerate() {
            ws.profile = Some(Default::default());
            let toks: Vec<u32> = (0..k as u32).map(|i| i + 200).collect();
            let pp: Vec<usize> = (pos..pos + k).collect();
            let rows: Vec<usize> = (0..k).collect();
            let reps = 8;
            let t = Instant::now();
            for _ in 0..reps {
                kv.grow(s, k)?;
                lm.model.forward(
                    &pool,
                    &mut ws,
                    &mut kv,
                    &Batch {
                        tokens: &toks,
                        positions: &pp,
                        seqs: &[BatchSeq { kv: s, n_rows: k }],
                        logits_rows: &rows,
                        hidden_rows: &[],
                        capture: &[],
                    },
                    &mut out,
                )?;
                kv.truncate(s, k);
            }
            let ms = t.elapsed().as_secs_f64() * 1000.0 / reps as f64;
            if ms < best[ki] {
                best[ki] = ms;
                profiles[ki] = ws.profile.take().unwrap();
            }
        }
    }
    for (ki, &k) in ks.iter().enumerate() {
        let p = &profiles[ki];
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0 / p.calls as f64;
        println!(
            "forward {k:2} rows: {:6.2} ms = {:4.2}x one row (matmul {:.2}, attention {:.2}, lm_head {:.2}, other {:.2})",
            best[ki],
            best[ki] / best[0],
            ms(p.matmul),
            ms(p.attention),
            ms(p.lm_head),
            ms(p.other)
        );
    }
    Ok(())
}
