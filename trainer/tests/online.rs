//! Online speculator training on the real model: traces flow into the
//! trainer, it takes steps and cuts gated versions, checkpoints survive a
//! restart, and hot swaps during load change nothing in greedy outputs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::request::Event;
use engine::spec::speculator::{default_draft_vocab, embedding_tensor, Speculator, DEFAULT_DRAFT_VOCAB};
use engine::spec::{SpecMode, SpecRequest};
use engine::weights::Requant;
use engine::{EngineConfig, EngineHandle, GenerateRequest};
use trainer::speculator::{SpeculatorService, TargetParts, TrainerConfig};

fn model_path() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} is missing: run scripts/fetch-model.sh", p.display());
    p
}

fn start(state: &Path, cfg: impl FnOnce(&mut TrainerConfig)) -> (EngineHandle, SpeculatorService, Arc<Speculator>) {
    let loaded = engine::loader::load(&model_path(), Requant::None, &|_, _| {}).unwrap();
    let m = &loaded.model;
    let embed = embedding_tensor(m).unwrap();
    let target = TargetParts { lm_head: m.lm_head().clone(), embed: embed.clone(), fingerprint: m.fingerprint() };
    let mut tc = TrainerConfig::new(state.to_path_buf());
    cfg(&mut tc);
    let store = trainer::speculator::versions::VersionStore::open(state, 20).unwrap();
    let initial = store
        .load_latest(&target.fingerprint, &embed)
        .unwrap_or_else(|| Speculator::day0(m, embed.clone(), default_draft_vocab(m.config().vocab_size, DEFAULT_DRAFT_VOCAB), 0).unwrap());
    let initial_copy = Arc::new(initial.clone());
    let svc = SpeculatorService::start(tc, target, initial, None).unwrap();
    let e = engine::handle::spawn(
        loaded,
        EngineConfig { kv_cache_bytes: 512 << 20, speculator: Some(svc.slot()), traces: Some(svc.sink()), ..EngineConfig::default() },
    )
    .unwrap();
    svc.set_engine_stats(e.stats_arc());
    (e, svc, initial_copy)
}

fn run(e: &EngineHandle, text: &str, max_tokens: usize, mode: SpecMode) -> Vec<u32> {
    let info = e.info();
    let msgs = vec![engine::chat_template::ChatMessage { role: "user".into(), content: text.into() }];
    let p = info.tokenizer.encode(&info.template.render(&msgs, true).unwrap(), true).unwrap();
    let mut r = GenerateRequest::greedy(p, max_tokens);
    r.speculation = Some(SpecRequest { mode, k: None });
    let mut g = e.submit(r).unwrap();
    let mut out = Vec::new();
    while let Some(ev) = g.events.blocking_recv() {
        match ev {
            Event::Token(t) => out.push(t.token),
            Event::Finished(_) => break,
            Event::Error(m) => panic!("{m}"),
        }
    }
    out
}

const TOPICS: [&str; 6] = ["apples", "rivers", "bicycles", "volcanoes", "libraries", "bridges"];

#[test]
fn traces_train_the_head_cut_gated_versions_and_survive_a_restart() {
    let state = std::env::temp_dir().join(format!("ouro-online-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let (e, svc, _) = start(&state, |c| {
        c.publish_every = 5;
        c.window = 16;
        c.batch = 2;
        c.heldout_every = 4;
        c.max_running = 64;
    });
    for i in 0..24 {
        let t = TOPICS[i % TOPICS.len()];
        run(&e, &format!("Write two sentences about {t}."), 40, SpecMode::Auto);
    }
    let deadline = Instant::now() + Duration::from_secs(240);
    while svc.status().steps < 12 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let st = svc.status();
    assert!(st.traces_received > 20, "{st:?}");
    assert!(st.steps >= 12, "the trainer took only {} steps: {st:?}", st.steps);
    assert!(st.last_loss.is_some_and(f64::is_finite), "{st:?}");
    assert_eq!(st.bad_steps, 0);
    // Versions were cut and judged by the offline gate, with numbers.
    let hist = svc.history();
    let cut: Vec<_> = hist
        .iter()
        .filter(|h| {
            matches!(h.event, trainer::speculator::versions::Event::Accepted | trainer::speculator::versions::Event::RejectedOffline)
        })
        .collect();
    assert!(!cut.is_empty(), "{hist:?}");
    assert!(cut.iter().any(|h| h.simulated.is_some()), "{cut:?}");
    // A snapshot checkpoints the weights being trained.
    let v = svc.snapshot().unwrap();
    let serving = svc.status().serving_version;
    e.shutdown();
    drop(svc);
    // Restart: the serving version loads from disk at once.
    let store = trainer::speculator::versions::VersionStore::open(&state, 20).unwrap();
    assert!(store.versions().contains(&v));
    assert_eq!(store.serving(), Some(serving));
    let (e2, svc2, initial) = start(&state, |_| {});
    assert_eq!(initial.version(), serving);
    assert_eq!(svc2.status().serving_version, serving);
    e2.shutdown();
    // A corrupt serving version is skipped for the newest one that loads.
    let dir = engine::spec::speculator::version_dir(store.root(), serving);
    std::fs::write(dir.join("weights.safetensors"), b"garbage").unwrap();
    let embed = { initial.embed.clone() };
    let fallback = store.load_latest(&initial.manifest.target_fingerprint, &embed).unwrap();
    assert_ne!(fallback.version(), serving);
    std::fs::remove_dir_all(&state).ok();
}

#[test]
fn twenty_hot_swaps_under_load_keep_greedy_outputs_identical_and_fail_nothing() {
    let state = std::env::temp_dir().join(format!("ouro-swap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let (e, svc, v0) = start(&state, |c| c.start_paused = true);
    let slot = svc.slot();
    // A second version: the same head with perturbed weights.
    let mut tensors: std::collections::HashMap<String, candle_core::Tensor> =
        v0.head.tensors().into_iter().map(|(n, t)| (n.to_string(), t)).collect();
    let fc = tensors["fc.weight"].clone();
    tensors.insert("fc.weight".into(), (fc * 0.9).unwrap());
    let mut m1 = v0.manifest.clone();
    m1.version = 1000;
    let v1 = Arc::new(Speculator::from_tensors(m1, tensors, v0.embed.clone()).unwrap());
    let prompts: Vec<String> = TOPICS.iter().map(|t| format!("Repeat three times: {t} are interesting. {t} are interesting.")).collect();
    let want: Vec<Vec<u32>> = prompts.iter().map(|p| run(&e, p, 32, SpecMode::Off)).collect();
    let done = std::sync::atomic::AtomicBool::new(false);
    let got: Vec<Vec<u32>> = std::thread::scope(|s| {
        let swapper = s.spawn(|| {
            let mut swaps = 0;
            while swaps < 20 {
                let v = if swaps % 2 == 0 { v1.clone() } else { v0.clone() };
                slot.store(Some(v));
                swaps += 1;
                std::thread::sleep(Duration::from_millis(60));
            }
            swaps
        });
        let hs: Vec<_> =
            prompts.iter().map(|p| s.spawn(|| (0..3).map(|_| run(&e, p, 32, SpecMode::Speculator)).collect::<Vec<_>>())).collect();
        let outs: Vec<Vec<Vec<u32>>> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(swapper.join().unwrap(), 20);
        outs.into_iter()
            .map(|mut v| {
                let first = v.remove(0);
                for other in v {
                    assert_eq!(other, first);
                }
                first
            })
            .collect()
    });
    assert_eq!(got, want, "greedy outputs changed across hot swaps");
    e.shutdown();
    std::fs::remove_dir_all(&state).ok();
}

/// The offline warm start learns: on a corpus the target scores, the head's
/// simulated acceptance length on the held-out chunks rises, and the
/// learning curve is reported every `eval_every` steps.
#[test]
fn pretraining_raises_the_simulated_acceptance_length_and_reports_the_curve() {
    use std::sync::Mutex;
    use trainer::speculator::pretrain::{pretrain, PretrainConfig, Progress};
    let loaded = engine::loader::load(&model_path(), Requant::None, &|_, _| {}).unwrap();
    let m = &loaded.model;
    let embed = embedding_tensor(m).unwrap();
    let initial = Speculator::day0(m, embed, default_draft_vocab(m.config().vocab_size, DEFAULT_DRAFT_VOCAB), 0).unwrap();
    let text: String = (0..40)
        .map(|i| {
            let t = TOPICS[i % TOPICS.len()];
            format!("def count_{t}(items):\n    \"\"\"Counts the {t} in items.\"\"\"\n    return sum(1 for x in items if x == \"{t}\")\n\n")
        })
        .collect();
    let ids = loaded.tokenizer.encode(&text, false).unwrap();
    let chunks: Vec<Vec<u32>> = ids.chunks(64).map(|c| c.to_vec()).filter(|c| c.len() >= 8).collect();
    let state = std::env::temp_dir().join(format!("ouro-pretrain-test-{}", std::process::id()));
    let mut tc = TrainerConfig::new(state.clone());
    tc.lr = Some(1e-4);
    tc.publish_every = u64::MAX;
    tc.heldout_every = 5;
    let cfg = PretrainConfig { trainer: tc, steps: 60, chunk: 64, threads: 2, eval_every: 20 };
    // Day 0 learns at 1e-4 (its note says "untrained", which once read as
    // a warm start and gave it 1e-5).
    assert_eq!(trainer::speculator::default_lr(&initial.manifest), 1e-4);
    let curve = Mutex::new(Vec::new());
    let progress = |p: Progress| {
        if let Progress::Evaluated { step, simulated } = p {
            curve.lock().unwrap().push((step, simulated));
        }
    };
    let mut checkpoints = 0;
    let mut checkpoint = |_: &mut Speculator| -> engine::Result<()> {
        checkpoints += 1;
        Ok(())
    };
    let (spec, before, after) = pretrain(m, &chunks, initial, cfg, 30, &progress, &mut checkpoint).unwrap();
    std::fs::remove_dir_all(&state).ok();
    let (before, after) = (before.unwrap(), after.unwrap());
    let curve = curve.into_inner().unwrap();
    assert_eq!(curve.iter().map(|c| c.0).collect::<Vec<_>>(), vec![20, 40], "{curve:?}");
    assert!(curve.iter().all(|c| c.1.is_some_and(|x| x >= 1.0)), "{curve:?}");
    assert_eq!(checkpoints, 2);
    assert!(before < 1.2, "day 0 already accepts {before}");
    assert!(after > before + 0.3, "60 steps moved the simulated acceptance length only from {before} to {after}: {curve:?}");
    assert!(spec.version() > 0);
    assert_eq!(trainer::speculator::default_lr(&spec.manifest), 1e-5);
    assert!(spec.manifest.simulated.is_some_and(|s| (s.length - after).abs() < 1e-12 && s.chain >= 1));
}
