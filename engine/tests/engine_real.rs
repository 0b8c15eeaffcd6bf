//! The engine on the real model, through its public handle: batch
//! invariance of greedy decoding, `n > 1`, stop rules, seeds, preemption.
//! One engine (one model load) is shared by every test of this binary.

mod common;

use std::sync::OnceLock;

use common::{chat_prompt, model_path};
use engine::request::{Event, FinishReason};
use engine::sampling::SamplingParams;
use engine::weights::Requant;
use engine::{EngineConfig, EngineHandle, GenerateRequest};

fn engine_with(cfg: EngineConfig) -> EngineHandle {
    engine_in(Requant::None, cfg)
}

fn engine_in(requant: Requant, cfg: EngineConfig) -> EngineHandle {
    let loaded = engine::loader::load(&model_path(), requant, &|_, _| {}).unwrap();
    engine::handle::spawn(loaded, cfg).unwrap()
}

fn shared() -> &'static EngineHandle {
    static E: OnceLock<EngineHandle> = OnceLock::new();
    E.get_or_init(|| engine_with(EngineConfig { kv_cache_bytes: 512 << 20, ..EngineConfig::default() }))
}

/// Tokens and finish reason of each choice.
#[derive(Debug, Clone, PartialEq)]
struct Answer {
    tokens: Vec<Vec<u32>>,
    text: Vec<String>,
    reasons: Vec<FinishReason>,
}

fn run(engine: &EngineHandle, req: GenerateRequest) -> Answer {
    let n = req.n;
    let mut gen = engine.submit(req).unwrap();
    let mut a = Answer { tokens: vec![vec![]; n], text: vec![String::new(); n], reasons: vec![FinishReason::Stop; n] };
    let mut done = 0;
    while let Some(ev) = gen.events.blocking_recv() {
        match ev {
            Event::Token(t) => {
                a.tokens[t.choice].push(t.token);
                a.text[t.choice].push_str(&t.text);
            }
            Event::Finished(f) => {
                a.text[f.choice].push_str(&f.text);
                a.reasons[f.choice] = f.reason;
                done += 1;
                if done == n {
                    break;
                }
            }
            Event::Error(e) => panic!("engine error: {e}"),
        }
    }
    assert_eq!(done, n, "the event stream ended early");
    a
}

const PROMPTS: [&str; 8] = common::CHAT_PROMPTS;

#[test]
fn greedy_tokens_are_identical_alone_and_in_a_batch_of_8() {
    let e = shared();
    let reqs: Vec<GenerateRequest> = PROMPTS.iter().map(|p| GenerateRequest::greedy(chat_prompt(e, p), 40)).collect();
    let alone: Vec<Answer> = reqs.iter().map(|r| run(e, r.clone())).collect();
    // All eight at once: they are admitted together and decode in shared steps.
    let batched: Vec<Answer> = std::thread::scope(|s| {
        let handles: Vec<_> = reqs.iter().map(|r| s.spawn(|| run(e, r.clone()))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (a, b)) in alone.iter().zip(&batched).enumerate() {
        assert!(!a.tokens[0].is_empty());
        assert_eq!(a.tokens, b.tokens, "prompt {i} ({}) differs between alone and batched", PROMPTS[i]);
    }
    // And the text is real language, not noise.
    assert!(alone[0].text[0].to_lowercase().contains("sky"), "{}", alone[0].text[0]);
}

/// Every block format the kernels run (the file's Q4_1 above; Q8_0 and Q4_0
/// here, requantized at load): greedy tokens alone equal those in a batch of
/// 8, whatever row tile and thread each row's matmul fell in.
#[test]
fn every_weight_format_decodes_the_same_tokens_alone_and_in_a_batch() {
    println!("kernels path: {}", kernels::cpu::isa().name());
    for requant in [Requant::Q8_0, Requant::Q4_0] {
        let e = engine_in(requant, EngineConfig { kv_cache_bytes: 256 << 20, ..EngineConfig::default() });
        let reqs: Vec<GenerateRequest> = PROMPTS.iter().map(|p| GenerateRequest::greedy(chat_prompt(&e, p), 24)).collect();
        let alone: Vec<Answer> = reqs.iter().map(|r| run(&e, r.clone())).collect();
        let batched: Vec<Answer> = std::thread::scope(|s| {
            let handles: Vec<_> = reqs.iter().map(|r| s.spawn(|| run(&e, r.clone()))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (i, (a, b)) in alone.iter().zip(&batched).enumerate() {
            assert!(!a.tokens[0].is_empty());
            assert_eq!(a.tokens, b.tokens, "{requant:?}: prompt {i} differs between alone and batched");
        }
        e.shutdown();
    }
}

#[test]
fn a_long_prompt_prefilled_in_chunks_gives_the_same_tokens_as_in_one_chunk() {
    let small_chunks = engine_with(EngineConfig { kv_cache_bytes: 256 << 20, max_batch_tokens: 7, ..EngineConfig::default() });
    let e = shared();
    let long = "Here is a story. ".repeat(20) + "Summarize it.";
    let req = GenerateRequest::greedy(chat_prompt(e, &long), 20);
    assert_eq!(run(&small_chunks, req.clone()).tokens, run(e, req).tokens);
    small_chunks.shutdown();
}

#[test]
fn n_choices_share_the_prompt_and_sample_independently() {
    let e = shared();
    let mut req = GenerateRequest::greedy(chat_prompt(e, "Name a color."), 12);
    req.n = 3;
    let greedy = run(e, req.clone());
    assert!(greedy.tokens.iter().all(|t| *t == greedy.tokens[0]), "greedy choices must agree");
    req.sampling = SamplingParams { temperature: 1.0, seed: 7, ..SamplingParams::default() };
    let sampled = run(e, req.clone());
    assert_eq!(sampled.tokens.len(), 3);
    assert!(sampled.tokens.iter().any(|t| *t != sampled.tokens[0]), "three sampled choices were identical: {:?}", sampled.text);
    // The same seed reproduces every choice.
    assert_eq!(run(e, req).tokens, sampled.tokens);
}

#[test]
fn a_stop_string_ends_the_output_before_it() {
    let e = shared();
    let base = GenerateRequest::greedy(chat_prompt(e, "Explain why the sky is blue."), 60);
    let full = run(e, base.clone());
    let text = &full.text[0];
    // Stop on a word from the middle of the greedy answer.
    let word = text.split_whitespace().nth(5).unwrap().to_string();
    let cut = text.find(&word).unwrap();
    let mut req = base;
    req.stop = vec![word.clone()];
    let stopped = run(e, req);
    assert_eq!(stopped.reasons[0], FinishReason::Stop);
    assert_eq!(stopped.text[0], text[..cut], "stop string {word:?}");
}

#[test]
fn max_tokens_ends_with_length_and_eos_with_stop() {
    let e = shared();
    let a = run(e, GenerateRequest::greedy(chat_prompt(e, "Say hello."), 3));
    assert_eq!(a.tokens[0].len(), 3);
    assert_eq!(a.reasons[0], FinishReason::Length);
    let b = run(e, GenerateRequest::greedy(chat_prompt(e, "Say hello."), 200));
    assert_eq!(b.reasons[0], FinishReason::Stop);
    assert!(e.info().tokenizer.eos_token_ids().contains(b.tokens[0].last().unwrap()));
}

#[test]
fn a_full_kv_cache_preempts_and_recomputes_without_changing_tokens() {
    // Room for about 2.5 sequences of 150 tokens: eight at once must preempt.
    let layout_bytes = 30 * 3 * 64 * 2 * 2; // per token, f16
    let tight = engine_with(EngineConfig { kv_cache_bytes: layout_bytes * 400, max_running: 8, ..EngineConfig::default() });
    let e = shared();
    let reqs: Vec<GenerateRequest> = PROMPTS
        .iter()
        .map(|p| {
            let mut r = GenerateRequest::greedy(chat_prompt(e, p), 100);
            r.ignore_eos = true;
            r
        })
        .collect();
    let want: Vec<Answer> = reqs.iter().map(|r| run(e, r.clone())).collect();
    let got: Vec<Answer> = std::thread::scope(|s| {
        let hs: Vec<_> = reqs.iter().map(|r| s.spawn(|| run(&tight, r.clone()))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(tight.stats().preemptions.load(std::sync::atomic::Ordering::Relaxed) > 0, "the test did not exercise preemption");
    assert_eq!(want, got);
    tight.shutdown();
}

#[test]
fn a_prompt_longer_than_the_context_is_refused_naming_the_field() {
    let e = shared();
    let too_long = vec![100u32; e.info().max_model_len];
    let err = e.submit(GenerateRequest::greedy(too_long, 1)).unwrap_err();
    assert!(matches!(err, engine::EngineError::Invalid { param: Some("prompt"), .. }), "{err}");
    let err = e.submit(GenerateRequest::greedy(vec![1, 2, 3], e.info().max_model_len)).unwrap_err();
    assert!(matches!(err, engine::EngineError::Invalid { param: Some("max_tokens"), .. }), "{err}");
}
