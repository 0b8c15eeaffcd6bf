//! The forward pass against independent implementations: candle's stock
//! `quantized_llama` on the real GGUF model, and candle-transformers' f32
//! Llama / Qwen2 / Qwen3 on small random Hugging Face checkpoints written to
//! disk (so the safetensors loader, tensor naming, biases, Q/K norms, RoPE
//! layouts and Llama 3 scaling are all checked).

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::model_path;
use engine::config::ModelConfig;
use engine::kv::{KvCache, KvLayout};
use engine::model::{Batch, BatchSeq, Capture, ForwardOutput, Model, Workspace};
use engine::weights::{GgufSource, HfSource, Requant, TensorName, TensorSource};
use kernels::ThreadPool;

/// Runs `prompt` as one prefill chunk, then `extra` tokens one at a time,
/// returning the logits after the prefill and after each extra token.
fn our_logits(model: &Model, prompt: &[u32], extra: &[u32]) -> Vec<Vec<f32>> {
    let cfg = model.config();
    let layout = KvLayout { n_layers: cfg.n_layers, n_kv_heads: cfg.n_kv_heads, head_dim: cfg.head_dim };
    let mut kv = KvCache::<f32>::new(layout, 64 << 20).unwrap();
    let pool = ThreadPool::new(2);
    let mut ws = Workspace::default();
    let mut out = ForwardOutput::default();
    let s = kv.alloc_seq();
    let mut res = Vec::new();
    let mut pos = 0;
    let mut chunks: Vec<&[u32]> = vec![prompt];
    for t in extra {
        chunks.push(std::slice::from_ref(t));
    }
    for chunk in chunks {
        kv.grow(s, chunk.len()).unwrap();
        let positions: Vec<usize> = (pos..pos + chunk.len()).collect();
        let batch = Batch {
            tokens: chunk,
            positions: &positions,
            seqs: &[BatchSeq { kv: s, n_rows: chunk.len() }],
            logits_rows: &[chunk.len() - 1],
            hidden_rows: &[],
            capture: &[],
        };
        model.forward(&pool, &mut ws, &mut kv, &batch, &mut out).unwrap();
        res.push(out.logits.clone());
        pos += chunk.len();
    }
    res
}

fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| if x > bv { (i, x) } else { (bi, bv) }).0
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// A GGUF source that hands every matrix out as dense `f32`.
struct AsF32<'a>(&'a GgufSource);

impl TensorSource for AsF32<'_> {
    fn path(&self) -> &Path {
        self.0.path()
    }
    fn name_of(&self, t: TensorName) -> String {
        self.0.name_of(t)
    }
    fn shape(&self, t: TensorName) -> Option<Vec<usize>> {
        self.0.shape(t)
    }
    fn native_format(&self, _: TensorName) -> Option<kernels::Format> {
        None
    }
    fn native_bytes(&self, t: TensorName) -> engine::Result<Vec<u8>> {
        self.0.native_bytes(t)
    }
    fn to_f32(&self, t: TensorName) -> engine::Result<Vec<f32>> {
        self.0.to_f32(t)
    }
    fn fallback_format(&self) -> kernels::Format {
        kernels::Format::F32
    }
}

/// Greedy-decodes `steps` tokens with candle's stock quantized Llama and
/// returns the tokens and the logits before each of them.
fn candle_greedy(path: &Path, prompt: &[u32], steps: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut file = std::fs::File::open(path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let mut m = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap();
    let (mut toks, mut logits) = (Vec::new(), Vec::new());
    let x = Tensor::new(prompt, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let mut l = m.forward(&x, 0).unwrap().squeeze(0).unwrap().to_vec1::<f32>().unwrap();
    for step in 0..steps {
        let next = argmax(&l) as u32;
        logits.push(l);
        toks.push(next);
        let x = Tensor::new(&[next], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        l = m.forward(&x, prompt.len() + step).unwrap().squeeze(0).unwrap().to_vec1::<f32>().unwrap();
    }
    (toks, logits)
}

#[test]
fn real_gguf_model_matches_candle_quantized_llama() {
    let path = model_path();
    let src = GgufSource::open(&path).unwrap();
    let vocab = src.shape(TensorName::Embed).unwrap()[0];
    let mut cfg = ModelConfig::from_gguf(src.metadata(), vocab, &path).unwrap();
    cfg.tie_embeddings = !src.contains(TensorName::Output);
    // Arbitrary valid token ids (a chat-like prompt).
    let prompt: Vec<u32> = vec![1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198];

    // 1. Structure: with every weight dequantized to f32 on both sides, the
    //    two implementations agree to float rounding.
    let exact = Model::load(cfg.clone(), &AsF32(&src), Requant::None, &|_, _| {}).unwrap();
    // candle reads CANDLE_DEQUANTIZE_ALL once per thread: use fresh threads.
    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    let (toks, ref_f32) = std::thread::scope(|s| s.spawn(|| candle_greedy(&path, &prompt, 6)).join().unwrap());
    std::env::remove_var("CANDLE_DEQUANTIZE_ALL");
    let ours_f32 = our_logits(&exact, &prompt, &toks[..5]);
    for (i, (a, b)) in ours_f32.iter().zip(&ref_f32).enumerate() {
        let d = max_abs_diff(a, b);
        assert!(d < 2e-3, "f32 weights, step {i}: logits differ by {d}");
    }

    // 2. Quantized: Q4_1 weights with 8-bit activations on both sides. Both
    //    deviate from the f32 logits by activation rounding; ours must stay
    //    as close to f32 as candle's own quantized path is.
    let quant = Model::load(cfg, &src, Requant::None, &|_, _| {}).unwrap();
    let (qtoks, ref_q) = std::thread::scope(|s| s.spawn(|| candle_greedy(&path, &prompt, 6)).join().unwrap());
    assert_eq!(qtoks, toks, "candle's quantized and f32 greedy paths disagree");
    let ours_q = our_logits(&quant, &prompt, &toks[..5]);
    for i in 0..6 {
        let ours_err = max_abs_diff(&ours_q[i], &ref_f32[i]);
        let candle_err = max_abs_diff(&ref_q[i], &ref_f32[i]);
        eprintln!("step {i}: |ours - f32| {ours_err}, |candle - f32| {candle_err}");
        assert_eq!(argmax(&ours_q[i]), argmax(&ref_q[i]), "step {i}: argmax differs");
        assert!(ours_err <= 1.5 * candle_err + 0.05, "step {i}: ours deviates {ours_err} from f32, candle {candle_err}");
    }
}

/// Writes a random checkpoint for `arch` to `dir` and returns its config.json text.
fn write_random_checkpoint(dir: &Path, arch: &str, tie: bool) -> String {
    let dev = Device::Cpu;
    let (h, i, l, nh, nkv, d, v) = (64usize, 96usize, 2usize, 4usize, 2usize, 16usize, 120usize);
    let mut ts: HashMap<String, Tensor> = HashMap::new();
    let mut add = |name: String, shape: &[usize], scale: f64| {
        let t = (Tensor::randn(0f32, 1f32, shape, &dev).unwrap() * scale).unwrap();
        ts.insert(name, t);
    };
    add("model.embed_tokens.weight".into(), &[v, h], 1.0);
    if !tie {
        add("lm_head.weight".into(), &[v, h], 0.2);
    }
    for li in 0..l {
        let p = |s: &str| format!("model.layers.{li}.{s}");
        for (n, rows, cols) in [("q_proj", nh * d, h), ("k_proj", nkv * d, h), ("v_proj", nkv * d, h), ("o_proj", h, nh * d)] {
            add(p(&format!("self_attn.{n}.weight")), &[rows, cols], 0.15);
        }
        if arch == "qwen2" {
            add(p("self_attn.q_proj.bias"), &[nh * d], 0.5);
            add(p("self_attn.k_proj.bias"), &[nkv * d], 0.5);
            add(p("self_attn.v_proj.bias"), &[nkv * d], 0.5);
        }
        if arch == "qwen3" {
            add(p("self_attn.q_norm.weight"), &[d], 0.3);
            add(p("self_attn.k_norm.weight"), &[d], 0.3);
        }
        add(p("mlp.gate_proj.weight"), &[i, h], 0.15);
        add(p("mlp.up_proj.weight"), &[i, h], 0.15);
        add(p("mlp.down_proj.weight"), &[h, i], 0.15);
        add(p("input_layernorm.weight"), &[h], 0.3);
        add(p("post_attention_layernorm.weight"), &[h], 0.3);
    }
    add("model.norm.weight".into(), &[h], 0.3);
    // Norm weights around 1, not 0.
    for (name, t) in ts.iter_mut() {
        if name.ends_with("norm.weight") {
            *t = (t.clone() + 1.0).unwrap();
        }
    }
    candle_core::safetensors::save(&ts, dir.join("model.safetensors")).unwrap();
    let arch_name = match arch {
        "llama" => "LlamaForCausalLM",
        "qwen2" => "Qwen2ForCausalLM",
        _ => "Qwen3ForCausalLM",
    };
    let rope_scaling = if arch == "llama" {
        r#","rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":32}"#
    } else {
        ""
    };
    let text = format!(
        r#"{{"architectures":["{arch_name}"],"vocab_size":{v},"hidden_size":{h},"intermediate_size":{i},"num_hidden_layers":{l},
        "num_attention_heads":{nh},"num_key_value_heads":{nkv},"head_dim":{d},"max_position_embeddings":256,"rope_theta":10000.0,
        "rms_norm_eps":1e-6,"tie_word_embeddings":{tie},"sliding_window":256,"max_window_layers":2,"use_sliding_window":false,
        "hidden_act":"silu","attention_bias":{bias}{rope_scaling}}}"#,
        bias = arch == "qwen2"
    );
    std::fs::write(dir.join("config.json"), &text).unwrap();
    text
}

fn reference_logits(dir: &Path, arch: &str, cfg_text: &str, prompt: &[u32], extra: &[u32]) -> Vec<Vec<f32>> {
    let dev = Device::Cpu;
    let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, &dev).unwrap() };
    let to_vec = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut out = Vec::new();
    let mut steps: Vec<(Vec<u32>, usize)> = vec![(prompt.to_vec(), 0)];
    for (j, t) in extra.iter().enumerate() {
        steps.push((vec![*t], prompt.len() + j));
    }
    match arch {
        "llama" => {
            use candle_transformers::models::llama;
            let c: llama::LlamaConfig = serde_json::from_str(cfg_text).unwrap();
            let c = c.into_config(false);
            let m = llama::Llama::load(vb, &c).unwrap();
            let mut cache = llama::Cache::new(true, DType::F32, &c, &dev).unwrap();
            for (ids, pos) in steps {
                let x = Tensor::new(ids.as_slice(), &dev).unwrap().unsqueeze(0).unwrap();
                out.push(to_vec(m.forward(&x, pos, &mut cache).unwrap()));
            }
        }
        "qwen2" => {
            use candle_transformers::models::qwen2;
            let c: qwen2::Config = serde_json::from_str(cfg_text).unwrap();
            let mut m = qwen2::ModelForCausalLM::new(&c, vb).unwrap();
            for (ids, pos) in steps {
                let x = Tensor::new(ids.as_slice(), &dev).unwrap().unsqueeze(0).unwrap();
                out.push(to_vec(m.forward(&x, pos).unwrap()));
            }
        }
        _ => {
            use candle_transformers::models::qwen3;
            let c: qwen3::Config = serde_json::from_str(cfg_text).unwrap();
            let mut m = qwen3::ModelForCausalLM::new(&c, vb).unwrap();
            for (ids, pos) in steps {
                let x = Tensor::new(ids.as_slice(), &dev).unwrap().unsqueeze(0).unwrap();
                out.push(to_vec(m.forward(&x, pos).unwrap()));
            }
        }
    }
    out
}

fn check_hf_arch(arch: &str, tie: bool) {
    let dir = std::env::temp_dir().join(format!("ouro-ref-{arch}-{tie}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg_text = write_random_checkpoint(&dir, arch, tie);
    let src = HfSource::open(&dir).unwrap();
    let mut cfg = ModelConfig::from_hf_json(&cfg_text, &dir).unwrap();
    cfg.tie_embeddings = tie;
    let model = Model::load(cfg, &src, Requant::None, &|_, _| {}).unwrap();
    // Positions past original_max_position_embeddings (32) exercise the
    // Llama 3 frequency scaling.
    let prompt: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % 120).collect();
    let extra = [5u32, 77, 12, 0, 119];
    let ours = our_logits(&model, &prompt, &extra);
    let theirs = reference_logits(&dir, arch, &cfg_text, &prompt, &extra);
    for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        let d = max_abs_diff(a, b);
        assert!(d < 2e-3, "{arch} step {i}: logits differ by {d}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn hf_llama_with_llama3_rope_scaling_matches_candle() {
    check_hf_arch("llama", false);
}

#[test]
fn hf_qwen2_with_qkv_biases_matches_candle() {
    check_hf_arch("qwen2", true);
}

#[test]
fn hf_qwen3_with_qk_norm_matches_candle() {
    check_hf_arch("qwen3", false);
}

#[test]
fn a_missing_tensor_is_named_in_the_error() {
    let dir = std::env::temp_dir().join(format!("ouro-missing-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg_text = write_random_checkpoint(&dir, "qwen2", true);
    // Re-save without one bias.
    let mut ts = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    ts.remove("model.layers.1.self_attn.k_proj.bias");
    candle_core::safetensors::save(&ts, dir.join("model.safetensors")).unwrap();
    let src = HfSource::open(&dir).unwrap();
    let cfg = ModelConfig::from_hf_json(&cfg_text, &dir).unwrap();
    let err = Model::load(cfg, &src, Requant::None, &|_, _| {}).unwrap_err().to_string();
    assert!(err.contains("model.layers.1.self_attn.k_proj.bias"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn hidden_states_of_chosen_layers_are_returned_for_chosen_rows() {
    let path = model_path();
    let src = GgufSource::open(&path).unwrap();
    let vocab = src.shape(TensorName::Embed).unwrap()[0];
    let mut cfg = ModelConfig::from_gguf(src.metadata(), vocab, &path).unwrap();
    cfg.tie_embeddings = true;
    let model = Model::load(cfg.clone(), &src, Requant::None, &|_, _| {}).unwrap();
    let layout = KvLayout { n_layers: cfg.n_layers, n_kv_heads: cfg.n_kv_heads, head_dim: cfg.head_dim };
    let mut kv = KvCache::<f32>::new(layout, 16 << 20).unwrap();
    let pool = ThreadPool::new(2);
    let s = kv.alloc_seq();
    kv.grow(s, 4).unwrap();
    let caps = [Capture::After(1), Capture::After(14), Capture::Final];
    let batch = Batch {
        tokens: &[1, 4093, 198, 1780],
        positions: &[0, 1, 2, 3],
        seqs: &[BatchSeq { kv: s, n_rows: 4 }],
        logits_rows: &[3],
        hidden_rows: &[1, 3],
        capture: &caps,
    };
    let mut out = ForwardOutput::default();
    model.forward(&pool, &mut Workspace::default(), &mut kv, &batch, &mut out).unwrap();
    let hs = cfg.hidden_size;
    assert_eq!(out.hidden.len(), 2 * 3 * hs);
    // The final hidden state of row 3 times the LM head gives its logits.
    let fin = &out.hidden[(3 + 2) * hs..(3 + 3) * hs];
    let mut logits = vec![0f32; vocab];
    kernels::matmul(&pool, model.lm_head(), fin, 1, &mut logits, &mut kernels::MatmulScratch::default());
    assert_eq!(logits, out.logits);
    // Different layers give different states.
    assert!(max_abs_diff(&out.hidden[..hs], &out.hidden[hs..2 * hs]) > 0.1);
}
