//! A speculator version: the head's weights, its manifest, and the maps
//! between the draft vocabulary and the target's.
//!
//! On disk a version is a folder with `weights.safetensors` and
//! `manifest.json` (format, version, parent version, target fingerprint,
//! head shape, draft vocabulary, SHA-256 of the weights). Both files are
//! written atomically (temp file, fsync, rename; the manifest last), and a
//! load checks the checksum and refuses a speculator made for another model.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::head::{HeadConfig, SpecHead, HEAD_DTYPE};
use crate::error::{EngineError, Result};
use crate::model::Model;

/// Default size of the draft vocabulary.
pub const DEFAULT_DRAFT_VOCAB: usize = 8192;
/// The manifest format this code writes.
pub const MANIFEST_FORMAT: u32 = 1;

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// File format.
    pub format: u32,
    /// This version's number.
    pub version: u64,
    /// The version it was trained from.
    pub parent_version: Option<u64>,
    /// Fingerprint of the target model it drafts for.
    pub target_fingerprint: String,
    /// The head's shape.
    pub config: HeadConfig,
    /// Draft id to target id (`d2t`).
    pub draft_vocab: Vec<u32>,
    /// SHA-256 of `weights.safetensors`, hex.
    pub weights_sha256: String,
    /// Unix seconds when written.
    pub created_unix: u64,
    /// Free text (how it was made).
    pub note: String,
    /// Its simulated acceptance on held-out data when it was made (the
    /// offline gate's number), if it was measured: the speculation policy's
    /// first estimate of its acceptance until live verifications take over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simulated: Option<SimulatedAcceptance>,
}

/// A simulated acceptance length: the mean tokens per verification (accepted
/// drafts plus the target's own) of chains of up to `chain` drafts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SimulatedAcceptance {
    /// Mean tokens per verification, 1 to `chain + 1`.
    pub length: f64,
    /// Drafts per chain.
    pub chain: usize,
}

impl SimulatedAcceptance {
    /// The per-draft acceptance rate `a` under which a chain of `chain`
    /// drafts, each accepted with probability `a` after its predecessor (the
    /// speculation policy's model), yields `length` tokens:
    /// `1 + a + ... + a^chain = length`.
    pub fn per_draft_rate(&self) -> f64 {
        let want = self.length.clamp(1.0, self.chain as f64 + 1.0);
        let tokens = |a: f64| (0..=self.chain).map(|i| a.powi(i as i32)).sum::<f64>();
        let (mut lo, mut hi) = (0.0, 1.0);
        for _ in 0..50 {
            let mid = 0.5 * (lo + hi);
            if tokens(mid) < want {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        0.5 * (lo + hi)
    }
}

/// A loaded speculator.
#[derive(Debug, Clone)]
pub struct Speculator {
    /// The head.
    pub head: SpecHead,
    /// Its manifest.
    pub manifest: Manifest,
    /// The target's embedding table `[vocab, H]`, frozen and shared.
    pub embed: Tensor,
    /// Target id to draft id.
    t2d: HashMap<u32, u32>,
}

fn io<T>(path: &Path, r: std::io::Result<T>) -> Result<T> {
    r.map_err(|e| EngineError::io(path, e))
}

/// Writes `bytes` to `path` atomically: temp file, fsync, rename, fsync dir.
/// On failure (a full or read-only disk) the temp file is removed and `path`
/// is untouched.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let written = (|| -> Result<()> {
        let mut f = io(&tmp, std::fs::File::create(&tmp))?;
        let (head, tail) = bytes.split_at(bytes.len() / 2);
        io(&tmp, f.write_all(head))?;
        if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
            crate::fault::pause(&format!("write:{name}"));
        }
        io(&tmp, f.write_all(tail))?;
        io(&tmp, f.sync_all())?;
        drop(f);
        io(path, std::fs::rename(&tmp, path))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return written;
    }
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The target's embedding table as an `f32` tensor.
pub fn embedding_tensor(model: &Model) -> Result<Tensor> {
    let e = model.embedding();
    Ok(Tensor::from_vec(e.to_f32(), (e.rows(), e.cols()), &Device::Cpu)?)
}

impl Speculator {
    /// Builds a speculator from saved tensors.
    pub fn from_tensors(manifest: Manifest, tensors: HashMap<String, Tensor>, embed: Tensor) -> Result<Self> {
        let vb = VarBuilder::from_tensors(tensors, HEAD_DTYPE, &Device::Cpu);
        let head = SpecHead::load(vb, &manifest.config)?;
        Ok(Self::new(head, manifest, embed))
    }

    /// Wraps a head (e.g. one the trainer just trained).
    pub fn new(head: SpecHead, manifest: Manifest, embed: Tensor) -> Self {
        let t2d = manifest.draft_vocab.iter().enumerate().map(|(d, &t)| (t, d as u32)).collect();
        Self { head, manifest, embed, t2d }
    }

    /// This version with its head frozen for serving (see
    /// [`SpecHead::frozen`]).
    pub fn frozen(&self, pool: &std::sync::Arc<kernels::ThreadPool>) -> Result<Self> {
        Ok(Self { head: self.head.frozen(pool)?, ..self.clone() })
    }

    /// The draft id of a target token, if it is in the draft vocabulary.
    pub fn t2d(&self, token: u32) -> Option<u32> {
        self.t2d.get(&token).copied()
    }

    /// The target id of a draft token.
    pub fn d2t(&self, draft: u32) -> u32 {
        self.manifest.draft_vocab[draft as usize]
    }

    /// Version number.
    pub fn version(&self) -> u64 {
        self.manifest.version
    }

    /// The weights as safetensors bytes.
    pub fn weights_bytes(&self) -> Result<Vec<u8>> {
        let tensors: Vec<(&str, Tensor)> = self.head.tensors();
        let views: Vec<(String, Tensor)> = tensors.into_iter().map(|(n, t)| (n.to_string(), t)).collect();
        let map: HashMap<String, Tensor> = views.into_iter().collect();
        let tmp = std::env::temp_dir().join(format!("ouro-spec-{}-{:?}.safetensors", std::process::id(), std::thread::current().id()));
        candle_core::safetensors::save(&map, &tmp)?;
        let bytes = io(&tmp, std::fs::read(&tmp))?;
        let _ = std::fs::remove_file(&tmp);
        Ok(bytes)
    }

    /// Saves this version into `dir` (created if needed), atomically; the
    /// manifest's checksum is filled in.
    /// A folder this call created is removed again when the save fails.
    pub fn save(&mut self, dir: &Path) -> Result<()> {
        let fresh = !dir.exists();
        io(dir, std::fs::create_dir_all(dir))?;
        let saved = (|| -> Result<()> {
            let bytes = self.weights_bytes()?;
            self.manifest.weights_sha256 = sha256_hex(&bytes);
            write_atomic(&dir.join("weights.safetensors"), &bytes)?;
            let json = serde_json::to_vec_pretty(&self.manifest).map_err(|e| EngineError::model(dir, e.to_string()))?;
            write_atomic(&dir.join("manifest.json"), &json)
        })();
        if saved.is_err() && fresh {
            let _ = std::fs::remove_dir_all(dir);
        }
        saved
    }

    /// Loads a version from `dir` for the model whose fingerprint is
    /// `fingerprint`, sharing `embed`. Refuses another model's speculator and
    /// a corrupt or truncated file.
    pub fn load(dir: &Path, fingerprint: &str, embed: Tensor) -> Result<Self> {
        let mpath = dir.join("manifest.json");
        let text = io(&mpath, std::fs::read(&mpath))?;
        let manifest: Manifest =
            serde_json::from_slice(&text).map_err(|e| EngineError::model(&mpath, format!("unreadable manifest: {e}")))?;
        if manifest.format != MANIFEST_FORMAT {
            return Err(EngineError::model(
                &mpath,
                format!("manifest format {} is not supported (expected {MANIFEST_FORMAT})", manifest.format),
            ));
        }
        if manifest.target_fingerprint != fingerprint {
            return Err(EngineError::model(
                dir,
                format!(
                    "this speculator was made for the model with fingerprint {}, but the served model's fingerprint is {fingerprint}",
                    manifest.target_fingerprint
                ),
            ));
        }
        let wpath = dir.join("weights.safetensors");
        let bytes = io(&wpath, std::fs::read(&wpath))?;
        let sum = sha256_hex(&bytes);
        if sum != manifest.weights_sha256 {
            return Err(EngineError::model(
                &wpath,
                format!("checksum mismatch (file {sum}, manifest {}): corrupt or truncated", manifest.weights_sha256),
            ));
        }
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
        if manifest.draft_vocab.len() != manifest.config.draft_vocab_size {
            return Err(EngineError::model(&mpath, "draft vocabulary length does not match the head's configuration"));
        }
        Self::from_tensors(manifest, tensors, embed)
    }

    /// The day-0 speculator for `model`: the decoder layer, final norm and
    /// LM head rows copied from the target's last layer (dequantized), the
    /// feature fusion starting as the identity on the high layer, small
    /// random weights elsewhere. It drafts poorly until trained.
    pub fn day0(model: &Model, embed: Tensor, draft_vocab: Vec<u32>, seed: u64) -> Result<Self> {
        let c = model.config();
        let (h, d) = (c.hidden_size, c.head_dim);
        let n = c.n_layers;
        let cfg = HeadConfig {
            hidden_size: h,
            intermediate_size: c.intermediate_size,
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: d,
            rms_eps: c.rms_eps as f64,
            rope_theta: c.rope_theta as f64,
            feature_layers: default_feature_layers(n),
            draft_vocab_size: draft_vocab.len(),
        };
        let dev = Device::Cpu;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        use rand::{Rng, SeedableRng};
        let mut noise = |len: usize, std: f32| -> Vec<f32> { (0..len).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * std * 1.732).collect() };
        let last = &model.layers[n - 1];
        let q_rows = c.n_heads * d;
        let kv_rows = c.n_kv_heads * d;
        let qkv = last.qkv.to_f32();
        let gate_up = last.gate_up.to_f32();
        let t = |v: Vec<f32>, shape: (usize, usize)| Tensor::from_vec(v, shape, &dev);
        let v1 = |v: Vec<f32>| Tensor::from_vec(v.clone(), v.len(), &dev);
        // [out, 2H] = [small random for the embedding half | target rows].
        let two_h = |rows: &[f32], out: usize, noise: &mut dyn FnMut(usize, f32) -> Vec<f32>| -> Vec<f32> {
            let r = noise(out * h, 0.01);
            let mut w = Vec::with_capacity(out * 2 * h);
            for o in 0..out {
                w.extend_from_slice(&r[o * h..(o + 1) * h]);
                w.extend_from_slice(&rows[o * h..(o + 1) * h]);
            }
            w
        };
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        let mut fc = noise(h * 3 * h, 0.001);
        for i in 0..h {
            fc[i * 3 * h + 2 * h + i] += 1.0;
        }
        tensors.insert("fc.weight".into(), t(fc, (h, 3 * h))?);
        tensors.insert("norm_emb.weight".into(), v1(vec![1.0; h])?);
        tensors.insert("norm_hidden.weight".into(), v1(last.attn_norm.clone())?);
        tensors.insert("layer.q_proj.weight".into(), t(two_h(&qkv[..q_rows * h], q_rows, &mut noise), (q_rows, 2 * h))?);
        tensors.insert(
            "layer.k_proj.weight".into(),
            t(two_h(&qkv[q_rows * h..(q_rows + kv_rows) * h], kv_rows, &mut noise), (kv_rows, 2 * h))?,
        );
        tensors.insert("layer.v_proj.weight".into(), t(two_h(&qkv[(q_rows + kv_rows) * h..], kv_rows, &mut noise), (kv_rows, 2 * h))?);
        tensors.insert("layer.o_proj.weight".into(), t(last.o.to_f32(), (h, q_rows))?);
        tensors.insert("layer.post_norm.weight".into(), v1(last.ffn_norm.clone())?);
        let ffn = c.intermediate_size;
        tensors.insert("layer.gate_proj.weight".into(), t(gate_up[..ffn * h].to_vec(), (ffn, h))?);
        tensors.insert("layer.up_proj.weight".into(), t(gate_up[ffn * h..].to_vec(), (ffn, h))?);
        tensors.insert("layer.down_proj.weight".into(), t(last.down.to_f32(), (h, ffn))?);
        tensors.insert("norm.weight".into(), v1(model.final_norm().to_vec())?);
        let lm = model.lm_head();
        let mut head_rows = Vec::with_capacity(draft_vocab.len() * h);
        let mut row = vec![0f32; h];
        for &tok in &draft_vocab {
            lm.dequantize_row(tok as usize, &mut row);
            head_rows.extend_from_slice(&row);
        }
        tensors.insert("lm_head.weight".into(), t(head_rows, (draft_vocab.len(), h))?);
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            version: 0,
            parent_version: None,
            target_fingerprint: model.fingerprint(),
            config: cfg,
            draft_vocab,
            weights_sha256: String::new(),
            created_unix: crate::unix_now(),
            note: "day 0: target's last layer copied, untrained".into(),
            simulated: None,
        };
        Self::from_tensors(manifest, tensors, embed)
    }
}

/// EAGLE-3's default feature layers for an `n`-layer target: 1, n/2 - 1, n - 4.
pub fn default_feature_layers(n: usize) -> [usize; 3] {
    [1.min(n - 1), (n / 2).saturating_sub(1), n.saturating_sub(4)]
}

/// The day-0 draft vocabulary: the `size` lowest token ids. BPE assigns ids
/// in merge order, so low ids are the frequent pieces; the trainer re-chooses
/// the vocabulary from observed frequencies when it cuts a version.
pub fn default_draft_vocab(vocab_size: usize, size: usize) -> Vec<u32> {
    (0..size.min(vocab_size) as u32).collect()
}

/// The folder of version `v` under a speculator state directory.
pub fn version_dir(root: &Path, v: u64) -> PathBuf {
    root.join(format!("v{v:06}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_draft_rate_inverts_the_chain_model() {
        let rate = |length, chain| SimulatedAcceptance { length, chain }.per_draft_rate();
        assert!(rate(1.0, 4) < 1e-9);
        assert!(rate(5.0, 4) > 1.0 - 1e-9);
        assert!((rate(1.0 + 0.5 + 0.25 + 0.125 + 0.0625, 4) - 0.5).abs() < 1e-9);
        assert!((rate(1.6, 1) - 0.6).abs() < 1e-9);
        // Out of range lengths are clamped, not extrapolated.
        assert!(rate(0.5, 4) < 1e-9 && rate(9.0, 4) > 1.0 - 1e-9);
    }

    #[test]
    fn manifests_without_a_simulated_acceptance_still_load() {
        let m = Manifest {
            format: MANIFEST_FORMAT,
            version: 3,
            parent_version: Some(2),
            target_fingerprint: "f".into(),
            config: HeadConfig {
                hidden_size: 8,
                intermediate_size: 16,
                n_heads: 2,
                n_kv_heads: 1,
                head_dim: 4,
                rms_eps: 1e-5,
                rope_theta: 10000.0,
                feature_layers: [1, 2, 3],
                draft_vocab_size: 2,
            },
            draft_vocab: vec![1, 2],
            weights_sha256: "00".into(),
            created_unix: 1,
            note: String::new(),
            simulated: Some(SimulatedAcceptance { length: 2.0, chain: 4 }),
        };
        let json = serde_json::to_value(&m).unwrap();
        let mut old = json.clone();
        old.as_object_mut().unwrap().remove("simulated");
        let back: Manifest = serde_json::from_value(old).unwrap();
        assert_eq!(back.simulated, None);
        assert_eq!(serde_json::from_value::<Manifest>(json).unwrap(), m);
    }
}
