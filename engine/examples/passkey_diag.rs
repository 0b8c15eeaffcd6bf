//! Which needle tokens TCA keeps in a passkey prompt. For chosen trials of
//! `ouro tca-bench`'s passkey set (same keys and depths), prints full
//! attention's answer, each budgets file's answer and KV bytes, and with
//! `GRID=1` per layer how many of the key's digit tokens each KV head still
//! holds after the prompt's compression.
//! `cargo run --release -p ouro-engine --example passkey_diag -- BUDGETS[,BUDGETS..] LEN TRIALS T1[,T2..]`
use std::sync::Arc;

use anyhow::{bail, Context};
use engine::kv::{KvCache, SeqKvId};
use engine::tca::passkey;
use engine::tca::solo::Solo;
use engine::tca::{Compressor, TcaBudgets};
use half::f16;
use rand::{Rng, SeedableRng};

/// Positions (in `full`) of the entries head `(layer, g)` of `sparse` still
/// holds: prefill is the same computation until the prompt's compression,
/// so each kept key equals the full cache's key at its position, in order.
fn kept_positions(full: (&KvCache<f16>, SeqKvId), sparse: (&KvCache<f16>, SeqKvId), layer: usize, g: usize, d: usize) -> Vec<usize> {
    let (mut ka, mut kb, mut v) = (vec![0f32; d], vec![0f32; d], vec![0f32; d]);
    let n = sparse.0.head_len(sparse.1, layer, g);
    let total = full.0.head_len(full.1, layer, g);
    let mut kept = Vec::with_capacity(n);
    let mut j = 0;
    for i in 0..n {
        sparse.0.read(sparse.1, layer, g, i, &mut ka, &mut v);
        while j < total {
            full.0.read(full.1, layer, g, j, &mut kb, &mut v);
            j += 1;
            if kb == ka {
                kept.push(j - 1);
                break;
            }
        }
    }
    kept
}

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 5 {
        bail!("usage: passkey_diag BUDGETS[,BUDGETS..] LEN TRIALS T1[,T2..]");
    }
    let lm = engine::loader::load("models/SmolLM2-135M-Instruct.Q4_1.gguf".as_ref(), engine::weights::Requant::None, &|_, _| {})?;
    let (model, tok) = (&lm.model, &lm.tokenizer);
    let c = model.config().clone();
    let mut comps = Vec::new();
    for f in a[1].split(',') {
        let b = TcaBudgets::load(f.as_ref(), &model.fingerprint(), c.n_layers, c.n_kv_heads)?;
        comps.push((f.to_string(), Compressor::new(Arc::new(b))));
    }
    let len: usize = a[2].parse().context("LEN")?;
    let trials: usize = a[3].parse().context("TRIALS")?;
    let pick = a[4].split(',').map(|s| s.parse::<usize>()).collect::<Result<Vec<_>, _>>().context("trial list")?;
    let grid = std::env::var("GRID").is_ok();
    let pool = kernels::ThreadPool::new(2);
    let stop = tok.eos_token_ids().to_vec();
    let mut rng = rand::rngs::StdRng::seed_from_u64(len as u64);
    for t in 0..trials {
        let key: u32 = rng.random_range(10_000..100_000);
        if !pick.contains(&t) {
            continue;
        }
        let p = passkey::prompt(tok, len, key, (t as f32 + 0.5) / trials as f32)?;
        let digits = passkey::digit_positions(tok, &p);
        let mut full = Solo::new(model, &pool, len + 64, None)?;
        let logits = full.feed(&p, 512, false)?;
        let answer = full.greedy(&logits, 8, &stop)?;
        println!("trial {t} key {key} digits at {digits:?}: full {:?}", tok.decode(&answer, true)?);
        for (name, comp) in &comps {
            let mut sparse = Solo::new(model, &pool, len + 64, Some(comp.clone()))?;
            let logits = sparse.feed(&p, 512, false)?;
            if grid {
                for layer in 0..c.n_layers {
                    let row: Vec<String> = (0..c.n_kv_heads)
                        .map(|g| {
                            let kept = kept_positions(full.cache(), sparse.cache(), layer, g, c.head_dim);
                            let hit = digits.iter().filter(|x| kept.binary_search(x).is_ok()).count();
                            format!("{hit:2}/{} of {:4}", digits.len(), kept.len())
                        })
                        .collect();
                    println!("  layer {layer:2}: {}", row.join("  "));
                }
            }
            let answer = tok.decode(&sparse.greedy(&logits, 8, &stop)?, true)?;
            let ok = answer.contains(&key.to_string());
            println!("  {name}: {answer:?} {} KV {} B", if ok { "ok" } else { "MISSED" }, sparse.kv_bytes());
        }
    }
    Ok(())
}
