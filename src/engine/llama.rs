//! The Llama-family decoder (Llama, SmolLM2, Mistral-style models without attention biases):
//! configuration, weights and the forward pass to next-token logits.
//!
//! Weights come from a GGUF file (what llama.cpp and many PyPI packages ship), dequantized to f32 at load
//! by candle's GGUF reader. Its tensor names are mapped to Hugging Face's (`blk.N.attn_q` to
//! `model.layers.N.self_attn.q_proj`, see [`hf_name`]) and the row permutation llama.cpp's converter applies
//! to the query and key projections (for its interleaved rotary layout) is undone, so the weights are
//! exactly the Hugging Face model's and a PEFT LoRA written for it applies unchanged.
//!
//! The forward pass follows transformers' `LlamaForCausalLM`: RMSNorm, rotary position embeddings on
//! halves (`rotate_half`), grouped-query attention with a causal mask (and a padding mask for
//! left-padded batches, whose positions count real tokens only), a SwiGLU feed-forward block, the final
//! norm and the language-model head (tied to the token embeddings when the file has no `output.weight`).
//! It is composed from candle's ops, so it runs wherever candle does (CPU, CUDA).

use super::adapters::AdapterSet;
use super::error::{EngineError, EngineResult, LoadError};
use super::model::{self, Grad, Linear};
use crate::embed::delta::LoraDelta;
use crate::object::LightweightObject;
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor, D};
use std::path::Path;

/// The architecture hyper-parameters of a Llama-family model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub rope_theta: f64,
    pub rms_eps: f64,
    /// The context length the model was trained for.
    pub max_positions: usize,
    /// Which linear layers carry a bias, in `LINEAR_SLOTS` order (q, k, v, o, gate, up, down): none for
    /// Llama and Mistral, q/k/v for Qwen2, all attention (or MLP) layers for Llama with `attention_bias`
    /// (`mlp_bias`).
    pub linear_bias: [bool; 7],
    /// The Hugging Face `model_type` (`llama`, `mistral`, `qwen2`), written back by
    /// [`LlamaModel::save_hf_folder`].
    pub model_type: String,
}

impl LlamaConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
}

/// The seven linear layers of a Llama layer, by their Hugging Face module path inside the layer (what
/// PEFT's `target_modules` name), with the GGUF name of each.
pub const LINEAR_SLOTS: [(&str, &str); 7] = [
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
];

impl LlamaConfig {
    /// Whether the attention shape is consistent (the reason if not).
    fn check(&self) -> Result<(), String> {
        if self.heads == 0
            || self.kv_heads == 0
            || !self.hidden.is_multiple_of(self.heads)
            || !self.heads.is_multiple_of(self.kv_heads)
            || !self.head_dim().is_multiple_of(2)
            || self.layers == 0
            || self.vocab == 0
        {
            return Err(format!(
                "inconsistent shape: hidden {}, {} heads, {} key/value heads, {} layers, vocabulary {}",
                self.hidden, self.heads, self.kv_heads, self.layers, self.vocab
            ));
        }
        Ok(())
    }
}

/// The `config.json` fields of a Hugging Face Llama-family model that this engine reads.
#[derive(Debug, serde::Deserialize)]
struct HfLlamaConfig {
    model_type: String,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    intermediate_size: usize,
    vocab_size: usize,
    rope_theta: Option<f64>,
    rms_norm_eps: Option<f64>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    hidden_act: Option<String>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    rope_scaling: Option<serde_json::Value>,
    /// transformers 5 writes `rope_theta` and the rope type here.
    rope_parameters: Option<serde_json::Value>,
    head_dim: Option<usize>,
}

/// The Hugging Face `model_type`s this engine runs (Mistral is Llama with a sliding window that only
/// matters beyond its window, thousands of tokens, far above the engine's `max_len`; Qwen2 is Llama with
/// biases on q, k and v, its sliding window likewise far away when used at all).
pub const HF_DECODER_TYPES: [&str; 3] = ["llama", "mistral", "qwen2"];

impl HfLlamaConfig {
    fn config(&self, path: &Path) -> EngineResult<LlamaConfig> {
        let unsupported = |found: String| LoadError::UnsupportedArchitecture {
            path: path.to_path_buf(),
            found,
        };
        if !HF_DECODER_TYPES.contains(&self.model_type.as_str()) {
            return Err(unsupported(format!("model_type {:?}", self.model_type)).into());
        }
        if let Some(act) = self.hidden_act.as_deref().filter(|a| *a != "silu") {
            return Err(unsupported(format!("hidden_act {act:?} (Llama uses silu)")).into());
        }
        if let Some(r) = self.rope_scaling.as_ref().filter(|r| !r.is_null()) {
            return Err(
                unsupported(format!("rope_scaling {r} (plain rotary embeddings only)")).into(),
            );
        }
        let rope = self.rope_parameters.as_ref().filter(|r| !r.is_null());
        if let Some(t) = rope
            .and_then(|r| r.get("rope_type"))
            .filter(|t| t.as_str() != Some("default"))
        {
            return Err(unsupported(format!(
                "rope_parameters.rope_type {t} (plain rotary embeddings only)"
            ))
            .into());
        }
        let rope_theta = self.rope_theta.or_else(|| {
            rope.and_then(|r| r.get("rope_theta"))
                .and_then(|v| v.as_f64())
        });
        let (attn, mlp) = (
            self.attention_bias.unwrap_or(false),
            self.mlp_bias.unwrap_or(false),
        );
        let linear_bias = if self.model_type == "qwen2" {
            [true, true, true, false, false, false, false]
        } else {
            [attn, attn, attn, attn, mlp, mlp, mlp]
        };
        let config = LlamaConfig {
            hidden: self.hidden_size,
            layers: self.num_hidden_layers,
            heads: self.num_attention_heads,
            kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            intermediate: self.intermediate_size,
            vocab: self.vocab_size,
            rope_theta: rope_theta.unwrap_or(10_000.0),
            rms_eps: self.rms_norm_eps.unwrap_or(1e-6),
            max_positions: self.max_position_embeddings.unwrap_or(2048),
            linear_bias,
            model_type: self.model_type.clone(),
        };
        if let Some(hd) = self
            .head_dim
            .filter(|&hd| hd != config.hidden / config.heads.max(1))
        {
            return Err(unsupported(format!(
                "head_dim {hd} other than hidden_size / num_attention_heads"
            ))
            .into());
        }
        config.check().map_err(|reason| LoadError::ModelConfig {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(config)
    }
}

/// Whole-model tensors: (Hugging Face name, GGUF name).
const GLOBAL_NAMES: [(&str, &str); 3] = [
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
];

/// Per-layer modules other than the linear layers: (Hugging Face module, GGUF module).
const NORM_SLOTS: [(&str, &str); 2] = [
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "ffn_norm"),
];

/// The GGUF name of a Hugging Face weight of a Llama model (the inverse of [`hf_name`]).
fn gguf_name(hf: &str) -> String {
    if let Some((_, g)) = GLOBAL_NAMES.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let rest = hf.strip_prefix("model.layers.").unwrap_or(hf);
    let (layer, rest) = rest.split_once('.').unwrap_or((rest, ""));
    let (module, suffix) = rest.rsplit_once('.').unwrap_or((rest, ""));
    let g = NORM_SLOTS
        .iter()
        .chain(&LINEAR_SLOTS)
        .find(|(h, _)| *h == module)
        .map(|(_, g)| *g)
        .unwrap_or(module);
    format!("blk.{layer}.{g}.{suffix}")
}

/// The Hugging Face name of a GGUF tensor of a Llama model (`blk.3.attn_q.weight` to
/// `model.layers.3.self_attn.q_proj.weight`), or `None` for a name outside the architecture.
pub fn hf_name(gguf: &str) -> Option<String> {
    if let Some((h, _)) = GLOBAL_NAMES.iter().find(|(_, g)| *g == gguf) {
        return Some(h.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.split_once('.')?;
    let hf = NORM_SLOTS
        .iter()
        .chain(&LINEAR_SLOTS)
        .find(|(_, g)| *g == module)?
        .0;
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// One decoder layer's weights (linear weights are (out, in), f32).
#[derive(Debug, Clone)]
struct Layer {
    attn_norm: Tensor,
    /// q, k, v, o, gate, up, down: the order of [`LINEAR_SLOTS`] (weights (out, in), zero biases: the
    /// engine's frozen-linear kernel and adapter hooks are shared with the encoder).
    linear: Vec<Linear>,
    ffn_norm: Tensor,
}

/// A loaded Llama-family model.
#[derive(Debug, Clone)]
pub struct LlamaModel {
    pub config: LlamaConfig,
    pub device: Device,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    /// `None`: tied to the token embeddings.
    lm_head: Option<Tensor>,
    /// Zeros (vocab): the head's bias for the frozen-linear kernel.
    head_bias: Tensor,
}

/// The GGUF metadata a tokenizer is built from (`tokenizer.ggml.*`).
#[derive(Debug, Clone, Default)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model` (`gpt2` for byte-level BPE).
    pub model: String,
    /// `tokenizer.ggml.pre`: the pre-tokenizer's name.
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    pub merges: Vec<String>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
    /// Control tokens (`tokenizer.ggml.token_type` 3): never split, added as special tokens.
    pub control: Vec<u32>,
}

fn gguf_err(path: &Path, reason: impl Into<String>) -> EngineError {
    LoadError::Gguf {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
    .into()
}

/// `t`, if it has the shape the architecture expects; else the error naming the file, the tensor and both
/// shapes.
fn expect_shape(path: &Path, name: &str, t: Tensor, shape: &[usize]) -> EngineResult<Tensor> {
    if t.dims() != shape {
        return Err(LoadError::WeightShape {
            path: path.to_path_buf(),
            tensor: name.to_string(),
            expected: shape.to_vec(),
            found: t.dims().to_vec(),
        }
        .into());
    }
    Ok(t)
}

/// The architectures this engine runs from GGUF.
pub const GGUF_ARCHITECTURES: [&str; 1] = ["llama"];

impl LlamaModel {
    /// Load a GGUF file: its configuration, its weights dequantized to f32 on `device`, and its vocabulary.
    pub fn from_gguf(path: &Path, device: &Device) -> EngineResult<(LlamaModel, GgufVocab)> {
        LlamaModel::from_gguf_as(path, device, DType::F32)
    }

    /// [`LlamaModel::from_gguf`] with the frozen base's matrices (token embeddings, the seven linear
    /// layers, the head) held in `base` (f32, bf16 or f16), each narrowed as it is dequantized, so the
    /// peak is the narrowed model plus one f32 tensor. Norms and biases stay f32, and every activation is
    /// f32 (see [`LlamaModel::base_dtype`]).
    pub fn from_gguf_as(
        path: &Path,
        device: &Device,
        base: DType,
    ) -> EngineResult<(LlamaModel, GgufVocab)> {
        let mut file = std::fs::File::open(path).map_err(|source| EngineError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| gguf_err(path, format!("not a readable GGUF file: {e}")))?;
        let md = &content.metadata;
        let arch = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if !GGUF_ARCHITECTURES.contains(&arch.as_str()) {
            return Err(LoadError::UnsupportedArchitecture {
                path: path.to_path_buf(),
                found: format!("GGUF general.architecture {arch:?}"),
            }
            .into());
        }
        let get = |key: &str| -> EngineResult<&gguf_file::Value> {
            md.get(&format!("{arch}.{key}"))
                .ok_or_else(|| gguf_err(path, format!("metadata key {arch}.{key} is missing")))
        };
        let int = |key: &str| -> EngineResult<usize> {
            let v = get(key)?;
            v.to_u32()
                .map(|x| x as usize)
                .or_else(|_| v.to_u64().map(|x| x as usize))
                .map_err(|e| gguf_err(path, format!("{arch}.{key}: {e}")))
        };
        let float = |key: &str, default: f64| -> EngineResult<f64> {
            match md.get(&format!("{arch}.{key}")) {
                None => Ok(default),
                Some(v) => v
                    .to_f32()
                    .map(f64::from)
                    .map_err(|e| gguf_err(path, format!("{arch}.{key}: {e}"))),
            }
        };
        let vocab = read_vocab(path, md)?;
        let heads = int("attention.head_count")?;
        let kv_heads = int("attention.head_count_kv").unwrap_or(heads);
        let config = LlamaConfig {
            hidden: int("embedding_length")?,
            layers: int("block_count")?,
            heads,
            kv_heads,
            intermediate: int("feed_forward_length")?,
            vocab: vocab.tokens.len(),
            rope_theta: float("rope.freq_base", 10_000.0)?,
            rms_eps: float("attention.layer_norm_rms_epsilon", 1e-5)?,
            max_positions: int("context_length").unwrap_or(2048),
            linear_bias: [false; 7],
            model_type: "llama".into(),
        };
        config.check().map_err(|reason| gguf_err(path, reason))?;
        let mut tensor = |name: &str, shape: &[usize]| -> EngineResult<Tensor> {
            let info = content
                .tensor_infos
                .get(name)
                .ok_or_else(|| LoadError::MissingWeight {
                    path: path.to_path_buf(),
                    tensor: name.to_string(),
                    hint: String::new(),
                })?;
            let q = info
                .read(&mut file, content.tensor_data_offset, device)
                .map_err(|e| {
                    gguf_err(
                        path,
                        format!(
                            "tensor {name} ({:?}) cannot be dequantized: {e}",
                            info.ggml_dtype
                        ),
                    )
                })?;
            let t = q
                .dequantize(device)
                .and_then(|t| t.to_dtype(DType::F32))
                .map_err(|e| gguf_err(path, format!("tensor {name}: {e}")))?;
            expect_shape(path, name, t, shape)
        };
        let has_head = content.tensor_infos.contains_key("output.weight");
        let model = LlamaModel::assemble(config, device, has_head, base, |hf, shape| {
            let g = gguf_name(hf);
            let w = tensor(&g, shape)?;
            // llama.cpp stores q and k rows permuted for its interleaved rotary layout; undo it.
            let heads = if hf.ends_with("self_attn.q_proj.weight") {
                Some(heads)
            } else if hf.ends_with("self_attn.k_proj.weight") {
                Some(kv_heads)
            } else {
                None
            };
            match heads {
                Some(n) => unpermute(&w, n).map_err(|e| gguf_err(path, format!("{g}: {e}"))),
                None => Ok(w),
            }
        })?;
        Ok((model, vocab))
    }

    /// Build the model from its weights by Hugging Face name (`get(name, shape)` returns an f32 tensor of
    /// that shape). `has_head`: an `lm_head.weight` of its own (else tied to the embeddings). The
    /// matrices (embeddings, linear weights, head) are narrowed to `base` as they come.
    fn assemble(
        config: LlamaConfig,
        device: &Device,
        has_head: bool,
        base: DType,
        mut get: impl FnMut(&str, &[usize]) -> EngineResult<Tensor>,
    ) -> EngineResult<LlamaModel> {
        if !matches!(base, DType::F32 | DType::BF16 | DType::F16) {
            return Err(EngineError::InvalidArgument(format!(
                "a decoder's frozen base is held in f32, bf16 or f16, not {base:?}"
            )));
        }
        // Only the matrices are narrowed; norms and biases stay f32.
        let narrow = |t: Tensor| -> EngineResult<Tensor> { Ok(t.to_dtype(base)?) };
        let (h, f, d) = (config.hidden, config.intermediate, config.head_dim());
        let kv = config.kv_heads * d;
        let embed = narrow(get("model.embed_tokens.weight", &[config.vocab, h])?)?;
        let mut layers = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let p = format!("model.layers.{i}");
            let shapes: [[usize; 2]; 7] =
                [[h, h], [kv, h], [kv, h], [h, h], [f, h], [f, h], [h, f]];
            let mut linear = Vec::with_capacity(7);
            for (k, ((slot, _), shape)) in LINEAR_SLOTS.iter().zip(shapes).enumerate() {
                let weight = narrow(get(&format!("{p}.{slot}.weight"), &shape)?)?;
                let bias = if config.linear_bias[k] {
                    get(&format!("{p}.{slot}.bias"), &shape[..1])?
                } else {
                    Tensor::zeros(shape[0], DType::F32, device)?
                };
                linear.push(Linear { weight, bias });
            }
            layers.push(Layer {
                attn_norm: get(&format!("{p}.input_layernorm.weight"), &[h])?,
                linear,
                ffn_norm: get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
            });
        }
        let norm = get("model.norm.weight", &[h])?;
        let lm_head = if has_head {
            Some(narrow(get("lm_head.weight", &[config.vocab, h])?)?)
        } else {
            None
        };
        let head_bias = Tensor::zeros(config.vocab, DType::F32, device)?;
        Ok(LlamaModel {
            config,
            device: device.clone(),
            embed,
            layers,
            norm,
            lm_head,
            head_bias,
        })
    }

    /// Load a Hugging Face folder of a Llama-family model: `config.json` (`model_type` llama or mistral)
    /// and `model.safetensors` (or the shards `model.safetensors.index.json` lists), any float dtype,
    /// widened to f32 on `device`.
    pub fn from_hf_folder(dir: &Path, device: &Device) -> EngineResult<LlamaModel> {
        LlamaModel::from_hf_folder_as(dir, device, DType::F32)
    }

    /// [`LlamaModel::from_hf_folder`] with the frozen base's matrices held in `base` (f32, bf16 or f16;
    /// see [`LlamaModel::from_gguf_as`]).
    pub fn from_hf_folder_as(dir: &Path, device: &Device, base: DType) -> EngineResult<LlamaModel> {
        let cfg_path = dir.join("config.json");
        let bytes = std::fs::read(&cfg_path).map_err(|source| EngineError::Io {
            path: cfg_path.clone(),
            source,
        })?;
        let hf: HfLlamaConfig =
            serde_json::from_slice(&bytes).map_err(|e| LoadError::ModelConfig {
                path: cfg_path.clone(),
                reason: e.to_string(),
            })?;
        let config = hf.config(&cfg_path)?;
        // Weights: one file, or the shards of an index.
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<std::path::PathBuf> = if index.is_file() {
            let v: serde_json::Value = std::fs::read(&index)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .ok_or_else(|| LoadError::ModelConfig {
                    path: index.clone(),
                    reason: "not a safetensors index (JSON with a weight_map)".into(),
                })?;
            let mut shards: Vec<String> = v["weight_map"]
                .as_object()
                .map(|m| {
                    m.values()
                        .filter_map(|f| f.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            shards.sort();
            shards.dedup();
            shards.into_iter().map(|f| dir.join(f)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        let mut weights = std::collections::HashMap::new();
        for file in &files {
            let map =
                candle_core::safetensors::load(file, device).map_err(|e| LoadError::Weights {
                    path: file.clone(),
                    reason: e.to_string(),
                })?;
            weights.extend(map);
        }
        let weights_path = files[0].clone();
        let has_head =
            weights.contains_key("lm_head.weight") && !hf.tie_word_embeddings.unwrap_or(false);
        LlamaModel::assemble(config, device, has_head, base, |name, shape| {
            let t = weights.remove(name).ok_or_else(|| LoadError::MissingWeight {
                path: weights_path.clone(),
                tensor: name.to_string(),
                hint: " (a Llama-family checkpoint names its weights model.layers.N.self_attn.q_proj.weight ...)".into(),
            })?;
            expect_shape(&weights_path, name, t.to_dtype(DType::F32)?, shape)
        })
    }

    /// Write this model as a Hugging Face folder (`config.json` for `LlamaForCausalLM` and
    /// `model.safetensors`, the matrices in the base's dtype, norms and biases f32): what
    /// [`LlamaModel::from_hf_folder`] and transformers load.
    pub fn save_hf_folder(&self, dir: &Path) -> EngineResult<()> {
        let io = |path: &Path, source: std::io::Error| EngineError::Io {
            path: path.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let c = &self.config;
        let b = c.linear_bias;
        let architecture = match c.model_type.as_str() {
            "qwen2" => "Qwen2ForCausalLM",
            "mistral" => "MistralForCausalLM",
            _ => "LlamaForCausalLM",
        };
        let cfg = serde_json::json!({
            "architectures": [architecture],
            "model_type": c.model_type,
            "hidden_size": c.hidden,
            "num_hidden_layers": c.layers,
            "num_attention_heads": c.heads,
            "num_key_value_heads": c.kv_heads,
            "intermediate_size": c.intermediate,
            "vocab_size": c.vocab,
            "rope_theta": c.rope_theta,
            "rms_norm_eps": c.rms_eps,
            "max_position_embeddings": c.max_positions,
            "tie_word_embeddings": self.lm_head.is_none(),
            "hidden_act": "silu",
            "attention_bias": b[3],
            "mlp_bias": b[4],
            "torch_dtype": match self.base_dtype() {
                DType::BF16 => "bfloat16",
                DType::F16 => "float16",
                _ => "float32",
            },
        });
        let path = dir.join("config.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&cfg).unwrap_or_default())
            .map_err(|e| io(&path, e))?;
        let map: std::collections::HashMap<String, Tensor> =
            self.named_weights().into_iter().collect();
        let path = dir.join("model.safetensors");
        candle_core::safetensors::save(&map, &path).map_err(|e| EngineError::Io {
            path,
            source: std::io::Error::other(e),
        })
    }

    /// This model with a LoRA adapter's updates `scale * B A` merged into the weights it targets (the seven
    /// linear layers of any decoder layer, `rank_pattern`/`alpha_pattern`/rsLoRA scalings as PEFT computes
    /// them): for inference, the same outputs as PEFT applying the adapter unmerged, up to rounding.
    pub fn with_lora(&self, obj: &LightweightObject) -> EngineResult<LlamaModel> {
        let delta = LoraDelta::from_object(obj).map_err(|e| EngineError::Adapter(e.0))?;
        let mut out = self.clone();
        for (path, m) in &delta.modules {
            let (layer, slot) = layer_slot(path).ok_or_else(|| EngineError::AdapterTensor {
                tensor: path.clone(),
                reason: format!(
                    "not one of a Llama layer's seven linear layers ({})",
                    LINEAR_SLOTS.map(|(s, _)| s).join(", ")
                ),
            })?;
            let Some(l) = out.layers.get_mut(layer) else {
                return Err(EngineError::AdapterTensor {
                    tensor: path.clone(),
                    reason: format!("layer {layer}, but the model has {}", self.config.layers),
                });
            };
            let w = &l.linear[slot].weight;
            let (rows, cols) = w.dims2()?;
            if (m.d, m.k) != (rows, cols) {
                return Err(EngineError::AdapterShape {
                    tensor: format!("{path} (B A)"),
                    expected: vec![rows, cols],
                    found: vec![m.d, m.k],
                });
            }
            let a = Tensor::from_slice(&m.a, (m.r, m.k), &self.device)?;
            let b = Tensor::from_slice(&m.b, (m.d, m.r), &self.device)?;
            // Merged in f32, then held in the base's dtype again.
            let merged = (w.to_dtype(DType::F32)? + (b.matmul(&a)? * m.scale)?)?;
            l.linear[slot].weight = merged.to_dtype(w.dtype())?;
        }
        Ok(out)
    }

    /// The log-likelihood of each label's verbalizer tokens after each prompt, `(prompts, labels)`: the
    /// language-model head's way to score a classification task. Every (prompt, verbalizer) pair is one
    /// left-padded sequence, in batches of `batch` sequences; a label's score is the sum of its tokens'
    /// log-probabilities, or their mean (`mean`), each read at the position before the token.
    pub fn label_logliks(
        &self,
        prompts: &[Vec<u32>],
        verbalizers: &[Vec<u32>],
        mean: bool,
        batch: usize,
        pad: u32,
    ) -> EngineResult<Vec<Vec<f64>>> {
        if let Some(i) = verbalizers.iter().position(Vec::is_empty) {
            return Err(EngineError::InvalidArgument(format!(
                "the verbalizer of label {i} tokenizes to nothing; give it a non-empty text"
            )));
        }
        if let Some(i) = prompts.iter().position(Vec::is_empty) {
            return Err(EngineError::InvalidArgument(format!(
                "prompt {i} tokenizes to nothing"
            )));
        }
        let pairs: Vec<(usize, usize)> = (0..prompts.len())
            .flat_map(|p| (0..verbalizers.len()).map(move |l| (p, l)))
            .collect();
        let mut out = vec![vec![0f64; verbalizers.len()]; prompts.len()];
        for chunk in pairs.chunks(batch.max(1)) {
            let rows: Vec<Vec<u32>> = chunk
                .iter()
                .map(|&(p, l)| [prompts[p].as_slice(), verbalizers[l].as_slice()].concat())
                .collect();
            let len = rows.iter().map(Vec::len).max().unwrap_or(0);
            let (mut ids, mut mask) = (Vec::with_capacity(rows.len() * len), Vec::new());
            for r in &rows {
                ids.extend(std::iter::repeat_n(pad, len - r.len()).chain(r.iter().copied()));
                mask.extend(
                    std::iter::repeat_n(0u32, len - r.len()).chain(std::iter::repeat_n(1, r.len())),
                );
            }
            let ids = Tensor::from_vec(ids, (rows.len(), len), &self.device)?;
            let mask = Tensor::from_vec(mask, (rows.len(), len), &self.device)?;
            let hidden = self.hidden_states(&ids, Some(&mask), None, Grad::No)?;
            // Only the positions that predict a verbalizer token go through the (large) head.
            let mut picks = Vec::new();
            for (row, &(_, l)) in chunk.iter().enumerate() {
                let n = verbalizers[l].len();
                for j in 0..n {
                    picks.push((row * len + len - n - 1 + j) as u32);
                }
            }
            let flat = hidden.reshape((rows.len() * len, self.config.hidden))?;
            let sel = flat.index_select(&Tensor::new(picks.as_slice(), &self.device)?, 0)?;
            let logp = candle_nn::ops::log_softmax(&self.head_logits(&sel, Grad::No)?, D::Minus1)?;
            let logp: Vec<Vec<f32>> = logp.to_vec2()?;
            let mut at = 0;
            for &(p, l) in chunk {
                let v = &verbalizers[l];
                let total: f64 = v
                    .iter()
                    .enumerate()
                    .map(|(j, &tok)| logp[at + j][tok as usize] as f64)
                    .sum();
                at += v.len();
                out[p][l] = if mean { total / v.len() as f64 } else { total };
            }
        }
        Ok(out)
    }

    /// The Hugging Face weights by name (`model.layers.0.self_attn.q_proj.weight` ...), for checks and for
    /// writing the model as a Hugging Face folder.
    pub fn named_weights(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed.clone())];
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.input_layernorm.weight"), l.attn_norm.clone()));
            for (k, ((slot, _), w)) in LINEAR_SLOTS.iter().zip(&l.linear).enumerate() {
                out.push((format!("{p}.{slot}.weight"), w.weight.clone()));
                if self.config.linear_bias[k] {
                    out.push((format!("{p}.{slot}.bias"), w.bias.clone()));
                }
            }
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                l.ffn_norm.clone(),
            ));
        }
        out.push(("model.norm.weight".to_string(), self.norm.clone()));
        if let Some(w) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), w.clone()));
        }
        out
    }

    /// Next-token logits (batch, tokens, vocab) for token ids (batch, tokens), u32. `mask` (batch, tokens,
    /// 1 for a token, 0 for padding) allows left-padded batches: padding is never attended to and the
    /// positions of the real tokens start at 0, as if each sequence were alone.
    pub fn forward(&self, ids: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let hidden = self.hidden_states(ids, mask, None, Grad::No)?;
        let (b, t, h) = hidden.dims3()?;
        self.head_logits(&hidden.reshape((b * t, h))?, Grad::No)?
            .reshape((b, t, self.config.vocab))
    }

    /// The language-model head's logits (N, vocab) of hidden states (N, hidden). With [`Grad::Yes`] the
    /// pass is differentiable in the hidden states (the frozen head gets no gradient).
    pub fn head_logits(&self, hidden: &Tensor, grad: Grad) -> candle_core::Result<Tensor> {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let frozen = Linear {
            weight: head.clone(),
            bias: self.head_bias.clone(),
        };
        model::linear(&frozen, None, hidden, grad)
    }

    /// The final hidden states (batch, tokens, hidden), after the last norm, with an optional adapter
    /// (LoRA and IA3 on the seven linear layers, see [`crate::engine::AdapterSet`]). [`Grad::Yes`] keeps the pass
    /// differentiable (training, gradients).
    pub fn hidden_states(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        adapter: Option<&AdapterSet>,
        grad: Grad,
    ) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let dev = &self.device;
        // Positions: 0.. over the real tokens of each sequence (left padding gets position 0).
        let mask_f = match mask {
            Some(m) => m.to_dtype(DType::F32)?,
            None => Tensor::ones((b, t), DType::F32, dev)?,
        };
        let positions = (mask_f.cumsum(1)? - 1.0)?.relu()?; // (b, t)

        // Additive attention bias (b, 1, t, t): causal, and no padding key.
        let causal = causal_bias(t, dev)?;
        let pad = ((mask_f - 1.0)? * 1e30)?.reshape((b, 1, 1, t))?;
        let bias = causal.broadcast_add(&pad)?;
        self.hidden_states_with(ids, &positions, &bias, adapter, grad)
    }

    /// The token embedding table (vocabulary, hidden), in the base's dtype ([`LlamaModel::base_dtype`]).
    pub fn word_embeddings(&self) -> &Tensor {
        &self.embed
    }

    /// The dtype the frozen base's matrices are held in (f32 unless loaded with
    /// [`LlamaModel::from_gguf_as`] or [`LlamaModel::from_hf_folder_as`]). Activations, norms, biases
    /// and adapters are f32 whatever it is: each linear layer widens its bf16 weight for the CPU GEMM
    /// (or runs the matmul in bf16 on other devices) and returns f32.
    pub fn base_dtype(&self) -> DType {
        self.embed.dtype()
    }

    /// [`LlamaModel::hidden_states`] with explicit rotary positions (batch, tokens) f32 and an additive
    /// attention bias (batch, 1, tokens, tokens): any attention pattern, e.g. several continuations of one
    /// prompt packed in one sequence, each seeing the prompt and itself only.
    ///
    /// A prompt-tuning adapter's virtual tokens (T, hidden) go before every sequence, as PEFT passes
    /// `inputs_embeds` for a causal LM: they take positions 0..T among themselves (causal), every token
    /// sees all of them, and the real tokens' positions move up by T. The hidden states returned are the
    /// real tokens' only, so callers index them as without a prompt.
    pub fn hidden_states_with(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        bias: &Tensor,
        adapter: Option<&AdapterSet>,
        grad: Grad,
    ) -> candle_core::Result<Tensor> {
        let prompt = adapter.and_then(|a| a.prompt.as_ref());
        let x = self
            .embed
            .embedding(&ids.flatten_all()?)?
            .to_dtype(DType::F32)?
            .reshape((ids.dim(0)?, ids.dim(1)?, self.config.hidden))?;
        let Some(prompt) = prompt else {
            return self.layers_forward(x, positions, bias, adapter, grad);
        };
        let (b, t) = ids.dims2()?;
        let vt = prompt.dim(0)?;
        let dev = &self.device;
        let x = Tensor::cat(&[&prompt.unsqueeze(0)?.repeat((b, 1, 1))?, &x], 1)?;
        let virtual_pos = Tensor::arange(0f32, vt as f32, dev)?
            .unsqueeze(0)?
            .repeat((b, 1))?;
        let positions = Tensor::cat(&[&virtual_pos, &(positions + vt as f64)?], 1)?;
        // [[causal over the prompt, nothing of the text], [all of the prompt, the text's own bias]].
        let top = Tensor::cat(
            &[
                &causal_bias(vt, dev)?,
                &Tensor::full(f32::NEG_INFINITY, (1, 1, vt, t), dev)?,
            ],
            3,
        )?
        .repeat((b, 1, 1, 1))?;
        let bottom = Tensor::cat(&[&Tensor::zeros((b, 1, t, vt), DType::F32, dev)?, bias], 3)?;
        let bias = Tensor::cat(&[&top, &bottom], 2)?;
        self.layers_forward(x, &positions, &bias, adapter, grad)?
            .narrow(1, vt, t)
    }

    /// The decoder stack and the final norm over input embeddings `x` (batch, tokens, hidden).
    fn layers_forward(
        &self,
        mut x: Tensor,
        positions: &Tensor,
        bias: &Tensor,
        adapter: Option<&AdapterSet>,
        grad: Grad,
    ) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let (b, t, _) = x.dims3()?;
        let d = c.head_dim();
        let dev = &self.device;
        // Prefix tuning: PEFT hands the prefix to the model as cached past keys/values, so the real tokens'
        // positions start after it and every token sees all of it.
        let n_prefix = adapter.map(|a| a.prefix_len).unwrap_or(0);
        let shifted;
        let extended;
        let (positions, bias) = if n_prefix > 0 {
            shifted = (positions + n_prefix as f64)?;
            let zeros = Tensor::zeros((b, 1, t, n_prefix), DType::F32, dev)?;
            extended = Tensor::cat(&[&zeros, &bias.broadcast_as((b, 1, t, t))?], 3)?;
            (&shifted, &extended)
        } else {
            (positions, bias)
        };
        let inv_freq: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / c.rope_theta.powf(2.0 * i as f64 / d as f64) as f32)
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, 1, d / 2), dev)?;
        // (b, t, d/2), then over both halves (b, 1, t, d): built once, used by every layer's q and k.
        let freqs = positions.unsqueeze(2)?.broadcast_mul(&inv_freq)?;
        let freqs = Tensor::cat(&[&freqs, &freqs], D::Minus1)?.unsqueeze(1)?;
        let (cos, sin) = (freqs.cos()?, freqs.sin()?);
        let scale = 1.0 / (d as f64).sqrt();
        let n_rep = c.heads / c.kv_heads;
        for (li, l) in self.layers.iter().enumerate() {
            let la = adapter.map(|a| &a.layers[li]);
            let lin = |x: &Tensor, i: usize| -> candle_core::Result<Tensor> {
                let (bb, tt, inp) = x.dims3()?;
                let w = &l.linear[i];
                let ad = la.and_then(|a| a.linears.get(i)).filter(|a| !a.is_empty());
                model::linear(w, ad, &x.reshape((bb * tt, inp))?, grad)?.reshape((
                    bb,
                    tt,
                    w.weight.dim(0)?,
                ))
            };
            let hsn = rms_norm(&x, &l.attn_norm, c.rms_eps)?;
            let q = lin(&hsn, 0)?.reshape((b, t, c.heads, d))?.transpose(1, 2)?;
            let k = lin(&hsn, 1)?
                .reshape((b, t, c.kv_heads, d))?
                .transpose(1, 2)?;
            let v = lin(&hsn, 2)?
                .reshape((b, t, c.kv_heads, d))?
                .transpose(1, 2)?;
            let q = rope(&q.contiguous()?, &cos, &sin)?;
            let k = rope(&k.contiguous()?, &cos, &sin)?;
            // The prefix's keys go in unrotated, as PEFT caches them.
            let (k, v) = match la.and_then(|a| a.prefix.as_ref()) {
                Some((pk, pv)) => {
                    let (h, n, _) = pk.dims3()?;
                    let pk = pk.unsqueeze(0)?.broadcast_as((b, h, n, d))?;
                    let pv = pv.unsqueeze(0)?.broadcast_as((b, h, n, d))?;
                    (
                        Tensor::cat(&[&pk, &k], 2)?,
                        Tensor::cat(&[&pv, &v.contiguous()?], 2)?,
                    )
                }
                None => (k, v),
            };
            let k = repeat_kv(&k, n_rep)?;
            let v = repeat_kv(&v.contiguous()?, n_rep)?;
            let scores =
                (q.matmul(&k.transpose(2, 3)?.contiguous()?)? * scale)?.broadcast_add(bias)?;
            let p = match grad {
                // candle's fused softmax has no backward pass; the composed one has.
                Grad::Yes => candle_nn::ops::softmax(&scores, D::Minus1)?,
                Grad::No => candle_nn::ops::softmax_last_dim(&scores)?,
            };
            let attn = p
                .matmul(&v)?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b, t, c.hidden))?;
            x = (x + lin(&attn, 3)?)?;
            let hsn = rms_norm(&x, &l.ffn_norm, c.rms_eps)?;
            let gate = lin(&hsn, 4)?.silu()?;
            let up = lin(&hsn, 5)?;
            x = (x + lin(&(gate * up)?, 6)?)?;
        }
        rms_norm(&x, &self.norm, c.rms_eps)
    }
}

/// The layer index and linear slot ([`LINEAR_SLOTS`]) of a module path `...layers.{i}.{slot}`.
fn layer_slot(path: &str) -> Option<(usize, usize)> {
    let (_, rest) = path.rsplit_once("layers.")?;
    let (i, module) = rest.split_once('.')?;
    let slot = LINEAR_SLOTS.iter().position(|(s, _)| *s == module)?;
    Some((i.parse().ok()?, slot))
}

/// The additive causal attention bias (1, 1, n, n): 0 where a token may look (itself and before), -inf
/// after.
fn causal_bias(n: usize, dev: &Device) -> candle_core::Result<Tensor> {
    let v: Vec<f32> = (0..n)
        .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(v, (1, 1, n, n), dev)
}

/// transformers' `LlamaRMSNorm`: x / sqrt(mean(x^2) + eps) * w.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
}

/// Rotary embeddings on halves: x * cos + rotate_half(x) * sin, with x (b, heads, t, d) and cos/sin
/// (b, 1, t, d), each half's frequencies repeated over both halves.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// Grouped-query attention: each key/value head serves `n_rep` query heads.
fn repeat_kv(x: &Tensor, n_rep: usize) -> candle_core::Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, kv, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, kv, n_rep, t, d))?
        .contiguous()?
        .reshape((b, kv * n_rep, t, d))
}

/// Undo llama.cpp's converter permutation of a query/key weight (rows grouped per head as
/// `(heads, 2, d/2)` were reordered to `(heads, d/2, 2)`): row `h*d + j*2 + s` of the file is row
/// `h*d + s*(d/2) + j` of the Hugging Face weight.
fn unpermute(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let d = rows / heads;
    w.reshape((heads, d / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

fn read_vocab(
    path: &Path,
    md: &std::collections::HashMap<String, gguf_file::Value>,
) -> EngineResult<GgufVocab> {
    let strings = |key: &str| -> EngineResult<Vec<String>> {
        match md.get(key) {
            None => Ok(Vec::new()),
            Some(v) => v
                .to_vec()
                .map_err(|e| gguf_err(path, format!("{key}: {e}")))?
                .iter()
                .map(|s| {
                    s.to_string()
                        .cloned()
                        .map_err(|e| gguf_err(path, format!("{key}: {e}")))
                })
                .collect(),
        }
    };
    let id = |key: &str| md.get(key).and_then(|v| v.to_u32().ok());
    let vocab = GgufVocab {
        model: md
            .get("tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default(),
        pre: md
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .cloned(),
        tokens: strings("tokenizer.ggml.tokens")?,
        merges: strings("tokenizer.ggml.merges")?,
        bos: id("tokenizer.ggml.bos_token_id"),
        eos: id("tokenizer.ggml.eos_token_id"),
        add_bos: md
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false),
        control: md
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.to_vec().ok())
            .map(|types| {
                types
                    .iter()
                    .enumerate()
                    .filter(|(_, t)| t.to_i32().is_ok_and(|t| t == 3))
                    .map(|(i, _)| i as u32)
                    .collect()
            })
            .unwrap_or_default(),
    };
    if vocab.tokens.is_empty() {
        return Err(gguf_err(
            path,
            "no tokenizer.ggml.tokens: the GGUF carries no vocabulary; put a tokenizer.json beside it",
        ));
    }
    Ok(vocab)
}

impl GgufVocab {
    /// The byte-level BPE tokenizer this vocabulary describes (`tokenizer.ggml.model` `gpt2`), built the
    /// way transformers builds it from a GGUF file: no normalizer, GPT-2's byte-level pre-tokenizer without
    /// an added prefix space, the byte-level decoder, and the control tokens as special tokens. No BOS is
    /// added unless `tokenizer.ggml.add_bos_token` says so.
    pub fn tokenizer(&self, path: &Path) -> EngineResult<tokenizers::Tokenizer> {
        if self.model != "gpt2" {
            return Err(gguf_err(
                path,
                format!(
                    "tokenizer.ggml.model {:?} is not supported (byte-level BPE, `gpt2`, is); put a tokenizer.json beside the GGUF file",
                    self.model
                ),
            ));
        }
        let vocab: serde_json::Map<String, serde_json::Value> = self
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), serde_json::json!(i)))
            .collect();
        let merges: Vec<[&str; 2]> = self
            .merges
            .iter()
            .map(|m| {
                let (a, b) = m.split_once(' ').unwrap_or((m.as_str(), ""));
                [a, b]
            })
            .collect();
        let added: Vec<serde_json::Value> = self
            .control
            .iter()
            .map(|&id| {
                serde_json::json!({"id": id, "content": self.tokens[id as usize], "single_word": false,
                    "lstrip": false, "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let single = match (self.add_bos, self.bos) {
            (true, Some(bos)) => serde_json::json!([
                {"SpecialToken": {"id": self.tokens[bos as usize], "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}}
            ]),
            _ => serde_json::json!([{"Sequence": {"id": "A", "type_id": 0}}]),
        };
        let special: serde_json::Map<String, serde_json::Value> = match (self.add_bos, self.bos) {
            (true, Some(bos)) => {
                let t = &self.tokens[bos as usize];
                [(
                    t.clone(),
                    serde_json::json!({"id": t, "ids": [bos], "tokens": [t]}),
                )]
                .into_iter()
                .collect()
            }
            _ => Default::default(),
        };
        let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
            "trim_offsets": true, "use_regex": true});
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": byte_level,
            "post_processor": {"type": "TemplateProcessing", "single": single,
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": special},
            "decoder": byte_level,
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges},
        });
        json.to_string()
            .parse::<tokenizers::Tokenizer>()
            .map_err(|e| {
                LoadError::Tokenizer {
                    path: path.to_path_buf(),
                    reason: format!("the GGUF vocabulary does not make a tokenizer: {e}"),
                }
                .into()
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_names_map_to_hugging_face_names() {
        assert_eq!(
            hf_name("blk.12.attn_q.weight").as_deref(),
            Some("model.layers.12.self_attn.q_proj.weight")
        );
        assert_eq!(
            hf_name("blk.0.ffn_down.weight").as_deref(),
            Some("model.layers.0.mlp.down_proj.weight")
        );
        assert_eq!(
            hf_name("blk.1.ffn_norm.weight").as_deref(),
            Some("model.layers.1.post_attention_layernorm.weight")
        );
        assert_eq!(
            hf_name("token_embd.weight").as_deref(),
            Some("model.embed_tokens.weight")
        );
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }

    #[test]
    fn gguf_and_hugging_face_names_are_inverse() {
        for hf in [
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight",
            "model.layers.7.input_layernorm.weight",
            "model.layers.7.post_attention_layernorm.weight",
            "model.layers.29.self_attn.k_proj.weight",
            "model.layers.0.mlp.down_proj.weight",
        ] {
            assert_eq!(hf_name(&gguf_name(hf)).as_deref(), Some(hf), "{hf}");
        }
        assert_eq!(
            gguf_name("model.layers.3.mlp.up_proj.weight"),
            "blk.3.ffn_up.weight"
        );
    }

    #[test]
    fn unpermute_inverts_the_converters_permutation() {
        // llama.cpp: w.reshape(heads, 2, d/2, cols).swapaxes(1, 2).reshape(rows, cols).
        let (heads, d, cols) = (3usize, 4usize, 2usize);
        let hf: Vec<f32> = (0..heads * d * cols).map(|x| x as f32).collect();
        let hf = Tensor::from_vec(hf, (heads * d, cols), &Device::Cpu).unwrap();
        let permuted = hf
            .reshape((heads, 2, d / 2, cols))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((heads * d, cols))
            .unwrap();
        assert_ne!(
            permuted.to_vec2::<f32>().unwrap(),
            hf.to_vec2::<f32>().unwrap()
        );
        let back = unpermute(&permuted, heads).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), hf.to_vec2::<f32>().unwrap());
    }
}
