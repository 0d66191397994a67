//! The BERT-family encoder: configuration, weights and the forward pass with adapter hooks.
//!
//! The forward pass is written for this engine (not candle-transformers' BERT) so that every adapter
//! method can act where PEFT / AdapterHub put it. On the CPU (f32) it runs on the engine's own kernels
//! ([`super::kernels`]): query, key and value are one fused projection (LoRA updates on q/k/v inside the
//! same op, the softmax scale folded into the query), attention is one op that reads the heads in
//! place, and the residual adds are fused into the layer norms; every kernel has its backward pass, so
//! inference and training ([`Grad::Yes`]) share the path. Elsewhere (CUDA) it is composed from candle's
//! ops: the heads' layout change is a single copy, the key transpose a strided view.

use super::adapters::{AdapterSet, Bottleneck, LayerAdapter, LinearAdapter, LoraWeights};
use super::error::{EngineError, EngineResult, LoadError};
use super::kernels;
use candle_core::{DType, Device, Tensor, D};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::Path;

/// The six linear layers of a BERT layer, by their module path inside the layer.
pub const LINEAR_SLOTS: [&str; 6] = [
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
];
/// Indices into [`LINEAR_SLOTS`].
pub const Q: usize = 0;
pub const K: usize = 1;
pub const V: usize = 2;
pub const ATTN_OUT: usize = 3;
pub const INTER: usize = 4;
pub const OUT: usize = 5;
/// The two layer norms of a BERT layer.
pub const LN_SLOTS: [&str; 2] = ["attention.output.LayerNorm", "output.LayerNorm"];

/// Whether the forward pass must be differentiable (training, gradients) or may use fused kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grad {
    No,
    Yes,
}

/// Activation of the feed-forward block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Exact (erf) GELU: Hugging Face's `gelu`.
    Gelu,
    /// tanh-approximated GELU: `gelu_new`, `gelu_pytorch_tanh`.
    GeluTanh,
    Relu,
    /// swish / SiLU (bottleneck adapters).
    Silu,
    Tanh,
}

impl Activation {
    pub fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Activation::Gelu if kernels::usable(x) => kernels::gelu_erf(x, true),
            Activation::Gelu => x.gelu_erf(),
            Activation::GeluTanh => x.gelu(),
            Activation::Relu => x.relu(),
            Activation::Silu => x.silu(),
            Activation::Tanh => x.tanh(),
        }
    }

    /// Parse an AdapterHub / Hugging Face activation name.
    pub fn parse(name: &str) -> Option<Activation> {
        match name.to_ascii_lowercase().as_str() {
            "gelu" | "gelu_orig" => Some(Activation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Activation::GeluTanh),
            "relu" => Some(Activation::Relu),
            "swish" | "silu" => Some(Activation::Silu),
            "tanh" => Some(Activation::Tanh),
            _ => None,
        }
    }
}

/// The fields of a Hugging Face `config.json` the engine uses.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    #[serde(default)]
    pub model_type: String,
    #[serde(default)]
    pub architectures: Vec<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: Option<usize>,
    #[serde(default)]
    pub position_embedding_type: Option<String>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}

impl BertConfig {
    /// Read and validate `config.json`.
    pub fn from_file(path: &Path) -> EngineResult<BertConfig> {
        let bytes = std::fs::read(path).map_err(|source| EngineError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let cfg: BertConfig =
            serde_json::from_slice(&bytes).map_err(|e| LoadError::ModelConfig {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> EngineResult<()> {
        let mt = self.model_type.as_str();
        let arch_ok = self.architectures.is_empty()
            || self.architectures.iter().any(|a| {
                a.starts_with("Bert") || a.starts_with("Roberta") || a.starts_with("XLMRoberta")
            });
        if !matches!(mt, "bert" | "roberta" | "xlm-roberta") || !arch_ok {
            return Err(LoadError::UnsupportedArchitecture {
                path: path.to_path_buf(),
                found: format!(
                    "model_type {:?}, architectures {:?}",
                    self.model_type, self.architectures
                ),
            }
            .into());
        }
        if let Some(p) = &self.position_embedding_type {
            if p != "absolute" {
                return Err(LoadError::UnsupportedArchitecture {
                    path: path.to_path_buf(),
                    found: format!("position_embedding_type {p:?}"),
                }
                .into());
            }
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(LoadError::ModelConfig {
                path: path.to_path_buf(),
                reason: format!(
                    "hidden_size {} is not a multiple of num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
            }
            .into());
        }
        self.activation(path)?;
        Ok(())
    }

    pub(crate) fn activation(&self, path: &Path) -> EngineResult<Activation> {
        match self.hidden_act.as_str() {
            "gelu" => Ok(Activation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
            "relu" => Ok(Activation::Relu),
            other => Err(LoadError::UnsupportedArchitecture {
                path: path.to_path_buf(),
                found: format!("hidden_act {other:?}"),
            }
            .into()),
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// First position id (RoBERTa counts positions from `pad_token_id + 1`).
    pub fn position_offset(&self) -> usize {
        if self.model_type == "bert" {
            0
        } else {
            self.pad_token_id.unwrap_or(1) + 1
        }
    }
}

/// A linear layer: weight (out, in) and bias (out).
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Tensor,
}

/// One encoder layer's weights.
#[derive(Debug, Clone)]
pub struct Layer {
    pub linears: [Linear; 6],
    /// (weight, bias) of the two layer norms ([`LN_SLOTS`]).
    pub norms: [(Tensor, Tensor); 2],
    /// Query, key and value weights stacked: (3H, H), and their biases (3H).
    qkv_weight: Tensor,
    qkv_bias: Tensor,
}

/// A BERT-family encoder in memory.
#[derive(Debug, Clone)]
pub struct BertModel {
    pub config: BertConfig,
    pub activation: Activation,
    pub word_embeddings: Tensor,
    pub position_embeddings: Tensor,
    pub token_type_embeddings: Tensor,
    pub embeddings_norm: (Tensor, Tensor),
    pub layers: Vec<Layer>,
    pub device: Device,
    /// The frozen weights' bf16 twins while the model multiplies in bf16
    /// ([`BertModel::use_bf16_products`]); the kernels find them by the weights' tensor ids.
    bf16: Vec<std::sync::Arc<kernels::bf16::Bf16Weight>>,
}

struct WeightSource<'a> {
    path: &'a Path,
    map: HashMap<String, Tensor>,
    prefix: String,
}

impl WeightSource<'_> {
    fn get(&mut self, name: &str, shape: &[usize]) -> EngineResult<Tensor> {
        let full = format!("{}{}", self.prefix, name);
        let t = match self.map.remove(&full) {
            Some(t) => t,
            None => {
                // Old checkpoints name layer-norm parameters gamma/beta.
                let alt = full
                    .strip_suffix(".weight")
                    .map(|s| format!("{s}.gamma"))
                    .or_else(|| full.strip_suffix(".bias").map(|s| format!("{s}.beta")));
                match alt.and_then(|a| self.map.remove(&a)) {
                    Some(t) if name.contains("LayerNorm") => t,
                    _ => {
                        return Err(LoadError::MissingWeight {
                            path: self.path.to_path_buf(),
                            tensor: full,
                            hint: " (is this a BERT-family model? names must look like embeddings.word_embeddings.weight, encoder.layer.0.attention.self.query.weight, optionally under bert. or roberta.)".into(),
                        }.into())
                    }
                }
            }
        };
        if t.dims() != shape {
            return Err(LoadError::WeightShape {
                path: self.path.to_path_buf(),
                tensor: full,
                expected: shape.to_vec(),
                found: t.dims().to_vec(),
            }
            .into());
        }
        Ok(t.to_dtype(DType::F32)?)
    }
}

impl BertModel {
    /// Load `config.json` and `model.safetensors` from a Hugging Face model folder.
    pub fn load(dir: &Path, device: &Device) -> EngineResult<BertModel> {
        let cfg_path = dir.join("config.json");
        if !cfg_path.is_file() {
            return Err(LoadError::ModelFileMissing {
                dir: dir.to_path_buf(),
                file: "config.json",
            }
            .into());
        }
        let config = BertConfig::from_file(&cfg_path)?;
        let wpath = dir.join("model.safetensors");
        if !wpath.is_file() {
            return Err(LoadError::ModelFileMissing {
                dir: dir.to_path_buf(),
                file: "model.safetensors",
            }
            .into());
        }
        let map =
            candle_core::safetensors::load(&wpath, device).map_err(|e| LoadError::Weights {
                path: wpath.clone(),
                reason: e.to_string(),
            })?;
        let prefix = ["", "bert.", "roberta.", "model."]
            .into_iter()
            .find(|p| map.contains_key(&format!("{p}embeddings.word_embeddings.weight")))
            .unwrap_or("")
            .to_string();
        let mut src = WeightSource {
            path: &wpath,
            map,
            prefix,
        };
        let h = config.hidden_size;
        let f = config.intermediate_size;
        let word_embeddings =
            src.get("embeddings.word_embeddings.weight", &[config.vocab_size, h])?;
        let position_embeddings = src.get(
            "embeddings.position_embeddings.weight",
            &[config.max_position_embeddings, h],
        )?;
        let token_type_embeddings = src.get(
            "embeddings.token_type_embeddings.weight",
            &[config.type_vocab_size, h],
        )?;
        let embeddings_norm = (
            src.get("embeddings.LayerNorm.weight", &[h])?,
            src.get("embeddings.LayerNorm.bias", &[h])?,
        );
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let mut lin = |slot: &str, out: usize, inp: usize| -> EngineResult<Linear> {
                Ok(Linear {
                    weight: src.get(&format!("encoder.layer.{i}.{slot}.weight"), &[out, inp])?,
                    bias: src.get(&format!("encoder.layer.{i}.{slot}.bias"), &[out])?,
                })
            };
            let linears = [
                lin(LINEAR_SLOTS[Q], h, h)?,
                lin(LINEAR_SLOTS[K], h, h)?,
                lin(LINEAR_SLOTS[V], h, h)?,
                lin(LINEAR_SLOTS[ATTN_OUT], h, h)?,
                lin(LINEAR_SLOTS[INTER], f, h)?,
                lin(LINEAR_SLOTS[OUT], h, f)?,
            ];
            let mut ln = |slot: &str| -> EngineResult<(Tensor, Tensor)> {
                Ok((
                    src.get(&format!("encoder.layer.{i}.{slot}.weight"), &[h])?,
                    src.get(&format!("encoder.layer.{i}.{slot}.bias"), &[h])?,
                ))
            };
            let norms = [ln(LN_SLOTS[0])?, ln(LN_SLOTS[1])?];
            // The attention scale 1/sqrt(head_dim) is folded into the fused query weight and bias.
            let scale = 1.0 / (config.head_dim() as f64).sqrt();
            let qkv_weight = Tensor::cat(
                &[
                    &(&linears[Q].weight * scale)?,
                    &linears[K].weight,
                    &linears[V].weight,
                ],
                0,
            )?;
            let qkv_bias = Tensor::cat(
                &[
                    &(&linears[Q].bias * scale)?,
                    &linears[K].bias,
                    &linears[V].bias,
                ],
                0,
            )?;
            layers.push(Layer {
                linears,
                norms,
                qkv_weight,
                qkv_bias,
            });
        }
        let activation = config.activation(&cfg_path)?;
        Ok(BertModel {
            config,
            activation,
            word_embeddings,
            position_embeddings,
            token_type_embeddings,
            embeddings_norm,
            layers,
            device: device.clone(),
            bf16: Vec::new(),
        })
    }

    /// Multiply by the frozen linear weights in bf16 from now on (CPU kernels; see
    /// [`super::MatmulPrecision::Bf16`]): each weight is rounded and packed once, here. Adapters,
    /// embeddings, attention and norms stay f32.
    pub fn use_bf16_products(&mut self) -> EngineResult<()> {
        let mut twins = Vec::new();
        for layer in &self.layers {
            for w in
                std::iter::once(&layer.qkv_weight).chain(layer.linears.iter().map(|l| &l.weight))
            {
                twins.push(kernels::bf16::register(w)?);
            }
        }
        self.bf16 = twins;
        Ok(())
    }

    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    /// The encoder's last hidden state for a padded batch.
    ///
    /// `ids`: (B, S) u32 token ids; `mask`: (B, S) f32 attention mask (1 = token, 0 = padding).
    /// Returns the hidden states (B, S', H) and the pooling mask (B, S'), where S' = S plus the virtual
    /// tokens of prompt tuning (which the pooling mask excludes). Prefix-tuning prefixes live only in the
    /// attention keys/values, so they never appear in the output.
    pub fn forward(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        adapter: Option<&AdapterSet>,
        grad: Grad,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (b, s) = ids.dims2()?;
        let h = self.config.hidden_size;
        let prompt = adapter.and_then(|a| a.prompt.as_ref());
        let n_virtual = prompt.map(|p| p.dims()[0]).unwrap_or(0);
        let total = s + n_virtual;
        let n_past = adapter.map(|a| a.prefix_len).unwrap_or(0);
        if n_past + total + self.config.position_offset() > self.config.max_position_embeddings {
            candle_core::bail!(
                "sequence of {total} tokens is longer than the model's {} positions; lower max_len",
                self.config.max_position_embeddings
            );
        }
        // Embeddings.
        let flat_ids = ids.flatten_all()?;
        let mut x = self
            .word_embeddings
            .index_select(&flat_ids, 0)?
            .reshape((b, s, h))?;
        let mut pool_mask = mask.clone();
        let mut attn_mask = mask.clone();
        if let Some(p) = prompt {
            let p = p.unsqueeze(0)?.broadcast_as((b, n_virtual, h))?;
            x = Tensor::cat(&[&p, &x], 1)?;
            let ones = Tensor::ones((b, n_virtual), DType::F32, ids.device())?;
            let zeros = Tensor::zeros((b, n_virtual), DType::F32, ids.device())?;
            attn_mask = Tensor::cat(&[&ones, mask], 1)?;
            pool_mask = Tensor::cat(&[&zeros, mask], 1)?;
        }
        // With prefix tuning, Hugging Face BERT treats the prefix as cached past keys/values and starts
        // the input's position ids after it (past_key_values_length); PEFT's reference outputs do so.
        let n_prefix = adapter.map(|a| a.prefix_len).unwrap_or(0);
        let off = self.config.position_offset() + n_prefix;
        let pos = self.position_embeddings.narrow(0, off, total)?;
        let tt = self.token_type_embeddings.narrow(0, 0, 1)?;
        let x = x.broadcast_add(&(pos.broadcast_add(&tt)?))?;
        let emb_bias = adapter
            .and_then(|a| a.embeddings_norm_bias.as_ref())
            .unwrap_or(&self.embeddings_norm.1);
        let mut x = layer_norm(
            &x,
            &self.embeddings_norm.0,
            emb_bias,
            self.config.layer_norm_eps,
            grad,
        )?;

        // Additive attention mask, (B, 1, 1, S_kv); the prefix (if any) is always visible.
        let kv_mask = if n_prefix > 0 {
            let ones = Tensor::ones((b, n_prefix), DType::F32, ids.device())?;
            Tensor::cat(&[&ones, &attn_mask], 1)?
        } else {
            attn_mask
        };
        // No padding anywhere: skip the mask (one pass over the scores per layer).
        let add_mask = if kv_mask.min_all()?.to_scalar::<f32>()? >= 1.0 {
            None
        } else {
            Some(
                ((kv_mask - 1.0)? * 1e9)?
                    .reshape((b, 1, 1, n_prefix + total))?
                    .contiguous()?,
            )
        };

        for (i, layer) in self.layers.iter().enumerate() {
            let la = adapter.and_then(|a| a.layers.get(i));
            x = self.layer_forward(layer, la, &x, add_mask.as_ref(), grad)?;
        }
        Ok((x, pool_mask))
    }

    fn layer_forward(
        &self,
        layer: &Layer,
        la: Option<&LayerAdapter>,
        x: &Tensor,
        add_mask: Option<&Tensor>,
        grad: Grad,
    ) -> candle_core::Result<Tensor> {
        let (b, s, h) = x.dims3()?;
        let nh = self.config.num_attention_heads;
        let hd = h / nh;
        let x2 = x.reshape((b * s, h))?;
        let lin_ad = |slot: usize| la.map(|l| &l.linears[slot]);
        let scale = 1.0 / (hd as f64).sqrt();

        if kernels::usable(x) {
            if let Some(y) = self.layer_op(layer, la, &x2, b, add_mask, grad)? {
                return y.reshape((b, s, h));
            }
            let ctx = self.attention_cpu(layer, la, &x2, (b, s, h), add_mask, grad)?;
            return self
                .layer_tail(layer, la, &x2, &ctx, grad)?
                .reshape((b, s, h));
        }
        // Query, key, value: (B, nh, S, hd).
        let qkv_plain = [Q, K, V]
            .iter()
            .all(|&k| lin_ad(k).map(|a| a.is_empty()).unwrap_or(true));
        let (q, k, v) = if qkv_plain {
            let qkv = frozen_linear(&x2, &layer.qkv_weight, &layer.qkv_bias, grad)?;
            let qkv = qkv
                .reshape((b, s, 3, nh, hd))?
                .permute((2, 0, 3, 1, 4))?
                .contiguous()?;
            (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?)
        } else {
            let heads = |t: Tensor| -> candle_core::Result<Tensor> {
                t.reshape((b, s, nh, hd))?.transpose(1, 2)?.contiguous()
            };
            let q = linear(&layer.linears[Q], lin_ad(Q), &x2, grad)?;
            let k = linear(&layer.linears[K], lin_ad(K), &x2, grad)?;
            let v = linear(&layer.linears[V], lin_ad(V), &x2, grad)?;
            (heads((q * scale)?)?, heads(k)?, heads(v)?)
        };
        let (k, v) = match la.and_then(|l| l.prefix.as_ref()) {
            Some((pk, pv)) => {
                let t = pk.dim(1)?;
                let pk = pk.unsqueeze(0)?.broadcast_as((b, nh, t, hd))?;
                let pv = pv.unsqueeze(0)?.broadcast_as((b, nh, t, hd))?;
                (
                    Tensor::cat(&[&pk, &k], 2)?.contiguous()?,
                    Tensor::cat(&[&pv, &v], 2)?.contiguous()?,
                )
            }
            None => (k, v),
        };
        let scores = q.matmul(&k.t()?)?;
        let scores = match add_mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = softmax(&scores, grad)?;
        let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((b * s, h))?;
        self.layer_tail(layer, la, &x2, &ctx, grad)?
            .reshape((b, s, h))
    }

    /// In training, the whole layer as one op ([`kernels::encoder_layer`]) when nothing but LoRA on
    /// the query/key/value projections (one adapter, no prefix) touches it: the graph then holds one
    /// node per layer instead of nine, each of which costs the backward pass a zero-filled gradient
    /// and an addition. `None` where the layer needs the op-by-op path.
    fn layer_op(
        &self,
        layer: &Layer,
        la: Option<&LayerAdapter>,
        x2: &Tensor,
        batch: usize,
        add_mask: Option<&Tensor>,
        grad: Grad,
    ) -> candle_core::Result<Option<Tensor>> {
        let h = self.config.hidden_size;
        let nh = self.config.num_attention_heads;
        if grad != Grad::Yes
            || self.activation != Activation::Gelu
            || x2.rank() != 2
            || !h.is_multiple_of(nh)
            || layer
                .linears
                .iter()
                .any(|l| l.weight.dtype() != x2.dtype() || l.bias.dtype() != x2.dtype())
            || layer.qkv_weight.dtype() != x2.dtype()
        {
            return Ok(None);
        }
        let (loras, lora_only) = qkv_loras(la);
        if !lora_only || loras.iter().any(|(_, w)| w.groups != 1) {
            return Ok(None);
        }
        if let Some(l) = la {
            let plain_tail = [ATTN_OUT, INTER, OUT]
                .iter()
                .all(|&slot| l.linears.get(slot).is_none_or(|a| a.is_empty()));
            if !plain_tail
                || l.prefix.is_some()
                || l.bottlenecks.iter().any(|b| b.is_some())
                || l.norm_bias.iter().any(|b| b.is_some())
            {
                return Ok(None);
            }
        }
        let scale = 1.0 / ((h / nh) as f64).sqrt();
        let mask = match add_mask {
            Some(m) => Some(m.flatten_all()?.to_vec1::<f32>()?),
            None => None,
        };
        let weights = kernels::EncoderLayerWeights {
            qkv: (layer.qkv_weight.clone(), layer.qkv_bias.clone()),
            attn_out: (
                layer.linears[ATTN_OUT].weight.clone(),
                layer.linears[ATTN_OUT].bias.clone(),
            ),
            ln1: layer.norms[0].clone(),
            inter: (
                layer.linears[INTER].weight.clone(),
                layer.linears[INTER].bias.clone(),
            ),
            out: (
                layer.linears[OUT].weight.clone(),
                layer.linears[OUT].bias.clone(),
            ),
            ln2: layer.norms[1].clone(),
        };
        let eps = self.config.layer_norm_eps;
        let stacked = (!loras.is_empty())
            .then(|| stack_qkv_loras(&loras, h, scale))
            .transpose()?;
        let lora = stacked
            .as_ref()
            .map(|(a, b, blocks)| kernels::EncoderLayerLora {
                a,
                b,
                blocks: blocks.clone(),
            });
        if lora.is_none() && !x2.track_op() {
            // Nothing to differentiate in this layer or below it.
            return Ok(None);
        }
        kernels::encoder_layer(x2, batch, nh, mask, &weights, lora, eps).map(Some)
    }

    /// Attention on the CPU kernels: Q, K, V as (B, S, H) (strided views of the fused projection when
    /// only LoRA touches them), one fused attention op, context (B*S, H).
    fn attention_cpu(
        &self,
        layer: &Layer,
        la: Option<&LayerAdapter>,
        x2: &Tensor,
        (b, s, h): (usize, usize, usize),
        add_mask: Option<&Tensor>,
        grad: Grad,
    ) -> candle_core::Result<Tensor> {
        let nh = self.config.num_attention_heads;
        let hd = h / nh;
        let scale = 1.0 / (hd as f64).sqrt();
        let lin_ad = |slot: usize| la.map(|l| &l.linears[slot]);
        let (loras, lora_only) = qkv_loras(la);
        let prefix = la.and_then(|l| l.prefix.as_ref());
        let mask = match add_mask {
            Some(m) => Some(m.flatten_all()?.to_vec1::<f32>()?),
            None => None,
        };
        let differentiable = grad == Grad::Yes;
        let single = loras.iter().all(|(_, l)| l.groups == 1);
        let (q, k, v) = if lora_only && single {
            // One op for the frozen projections (attention scale folded into the query's) and the
            // LoRA updates of their column blocks.
            let qkv = if loras.is_empty() {
                kernels::linear(x2, &layer.qkv_weight, &layer.qkv_bias, differentiable)?
            } else {
                let (a, bm, blocks) = stack_qkv_loras(&loras, h, scale)?;
                kernels::lora_linear(
                    x2,
                    &layer.qkv_weight,
                    &layer.qkv_bias,
                    &a,
                    &bm,
                    blocks,
                    differentiable,
                )?
            };
            if prefix.is_none() {
                return kernels::attention_qkv(&qkv, b, nh, mask, differentiable);
            }
            let qkv = qkv.reshape((b, s, 3 * h))?;
            (
                qkv.narrow(2, 0, h)?,
                qkv.narrow(2, h, h)?,
                qkv.narrow(2, 2 * h, h)?,
            )
        } else if lora_only {
            // Stacked LoRA adapters (inference): the fused projection plus each update.
            let qkv = kernels::linear(x2, &layer.qkv_weight, &layer.qkv_bias, differentiable)?
                .reshape((b, s, 3 * h))?;
            let part = |slot: usize, j: usize| -> candle_core::Result<Tensor> {
                let view = qkv.narrow(2, j * h, h)?;
                match lin_ad(slot).and_then(|a| a.lora.as_ref()) {
                    Some(l) => {
                        let d = lora_delta(l, x2)?;
                        let d = if slot == Q { (d * scale)? } else { d };
                        view + d.reshape((b, s, h))?
                    }
                    None => Ok(view),
                }
            };
            (part(Q, 0)?, part(K, 1)?, part(V, 2)?)
        } else {
            let q = linear(&layer.linears[Q], lin_ad(Q), x2, grad)?;
            let k = linear(&layer.linears[K], lin_ad(K), x2, grad)?;
            let v = linear(&layer.linears[V], lin_ad(V), x2, grad)?;
            (
                (q * scale)?.reshape((b, s, h))?,
                k.reshape((b, s, h))?,
                v.reshape((b, s, h))?,
            )
        };
        let (k, v) = match prefix {
            Some((pk, pv)) => {
                // (heads, T, hd) -> (B, T, H), prepended.
                let t = pk.dim(1)?;
                let flat = |p: &Tensor| -> candle_core::Result<Tensor> {
                    p.transpose(0, 1)?
                        .contiguous()?
                        .reshape((1, t, h))?
                        .broadcast_as((b, t, h))
                };
                (
                    Tensor::cat(&[&flat(pk)?, &k], 1)?,
                    Tensor::cat(&[&flat(pv)?, &v], 1)?,
                )
            }
            None => (k, v),
        };
        kernels::attention(&q, &k, &v, nh, mask, differentiable)?.reshape((b * s, h))
    }

    /// Attention output projection, residual + layer norm, feed-forward, residual + layer norm.
    fn layer_tail(
        &self,
        layer: &Layer,
        la: Option<&LayerAdapter>,
        x2: &Tensor,
        ctx: &Tensor,
        grad: Grad,
    ) -> candle_core::Result<Tensor> {
        let eps = self.config.layer_norm_eps;
        let lin_ad = |slot: usize| la.map(|l| &l.linears[slot]);
        let attn = linear(&layer.linears[ATTN_OUT], lin_ad(ATTN_OUT), ctx, grad)?;
        let attn = match la.and_then(|l| l.bottlenecks[0].as_ref()) {
            Some(bn) => bottleneck(bn, &attn)?,
            None => attn,
        };
        let ln0_bias = la
            .and_then(|l| l.norm_bias[0].as_ref())
            .unwrap_or(&layer.norms[0].1);
        let h1 = add_layer_norm(&attn, x2, &layer.norms[0].0, ln0_bias, eps, grad)?;
        let inter = match lin_ad(INTER) {
            // Only a bias (or nothing) trained here: the linear layer and its GELU in one op.
            ad if self.activation == Activation::Gelu
                && ad.is_none_or(|a| {
                    a.lora.is_none() && a.ia3_in.is_none() && a.ia3_out.is_none()
                })
                && kernels::usable(&h1)
                && h1.rank() == 2
                && layer.linears[INTER].weight.dtype() == h1.dtype() =>
            {
                let base = &layer.linears[INTER];
                let bias = ad.and_then(|a| a.bias.as_ref()).unwrap_or(&base.bias);
                kernels::linear_gelu(&h1, &base.weight, bias, grad == Grad::Yes)?
            }
            ad => self
                .activation
                .apply(&linear(&layer.linears[INTER], ad, &h1, grad)?)?,
        };
        let out = linear(&layer.linears[OUT], lin_ad(OUT), &inter, grad)?;
        let out = match la.and_then(|l| l.bottlenecks[1].as_ref()) {
            Some(bn) => bottleneck(bn, &out)?,
            None => out,
        };
        let ln1_bias = la
            .and_then(|l| l.norm_bias[1].as_ref())
            .unwrap_or(&layer.norms[1].1);
        add_layer_norm(&out, &h1, &layer.norms[1].0, ln1_bias, eps, grad)
    }
}

/// A layer's LoRA adapters on the query/key/value projections, `(slot, weights)`, and whether LoRA is
/// all that touches those projections (no IA3 scaling, no replaced bias).
fn qkv_loras(la: Option<&LayerAdapter>) -> (Vec<(usize, &LoraWeights)>, bool) {
    let ad = |slot: usize| la.and_then(|l| l.linears.get(slot));
    let lora_only = [Q, K, V].iter().all(|&slot| {
        ad(slot).is_none_or(|a| a.ia3_in.is_none() && a.ia3_out.is_none() && a.bias.is_none())
    });
    let loras = [Q, K, V]
        .iter()
        .filter_map(|&slot| ad(slot).and_then(|a| a.lora.as_ref()).map(|l| (slot, l)))
        .collect();
    (loras, lora_only)
}

/// The LoRA adapters of the query/key/value projections (`(slot, weights)`, one group each) stacked
/// for one fused op: A factors by rows, B factors by columns, and each one's column block of the
/// (N, 3H) projection, the query's scale times the attention scale `scale` (folded into the query's
/// frozen weight too).
fn stack_qkv_loras(
    loras: &[(usize, &LoraWeights)],
    h: usize,
    scale: f64,
) -> candle_core::Result<(Tensor, Tensor, Vec<kernels::LoraBlock>)> {
    let mut blocks = Vec::new();
    let mut r0 = 0;
    for (slot, l) in loras {
        let r = l.a.dim(0)?;
        let s = if *slot == Q { l.scale * scale } else { l.scale };
        blocks.push(kernels::LoraBlock {
            col: slot * h,
            r0,
            r,
            scale: s as f32,
        });
        r0 += r;
    }
    let a = Tensor::cat(&loras.iter().map(|(_, l)| &l.a).collect::<Vec<_>>(), 0)?;
    let b = Tensor::cat(&loras.iter().map(|(_, l)| &l.b).collect::<Vec<_>>(), 1)?;
    Ok((a, b, blocks))
}

/// A linear layer with its adapters: IA3 input scaling (feed-forward modules), the bias (replaced by
/// BitFit / LoRA `bias="all"`), LoRA's low-rank update and IA3 output scaling, in PEFT's order.
pub(crate) fn linear(
    base: &Linear,
    ad: Option<&LinearAdapter>,
    x: &Tensor,
    grad: Grad,
) -> candle_core::Result<Tensor> {
    let Some(ad) = ad else {
        return frozen_linear(x, &base.weight, &base.bias, grad);
    };
    let xin = match &ad.ia3_in {
        Some(s) => x.broadcast_mul(s)?,
        None => x.clone(),
    };
    let bias = ad.bias.as_ref().unwrap_or(&base.bias);
    let mut y = frozen_linear(&xin, &base.weight, bias, grad)?;
    if let Some(l) = &ad.lora {
        y = (y + lora_delta(l, x)?)?;
    }
    if let Some(s) = &ad.ia3_out {
        y = y.broadcast_mul(s)?;
    }
    Ok(y)
}

/// Houlsby bottleneck: `h + up(act(down(h)))` (the layer's own residual and layer norm follow).
fn bottleneck(bn: &Bottleneck, h: &Tensor) -> candle_core::Result<Tensor> {
    let d = h
        .matmul(&bn.down_weight.t()?)?
        .broadcast_add(&bn.down_bias)?;
    let d = bn.activation.apply(&d)?;
    let u = d.matmul(&bn.up_weight.t()?)?.broadcast_add(&bn.up_bias)?;
    u + h
}

/// LoRA's update `s * B A x` of a linear layer's input `x` (N, in) -> (N, out).
fn lora_delta(l: &LoraWeights, x: &Tensor) -> candle_core::Result<Tensor> {
    if l.groups > 1 {
        // Stacked adapters: row block g of the batch goes through adapter g (one batched matmul).
        let (n, inp) = x.dims2()?;
        let g = l.groups;
        let d = x.reshape((g, n / g, inp))?.matmul(&l.a)?.matmul(&l.b)?;
        let out = d.dim(2)?;
        d.reshape((n, out))
    } else {
        x.matmul(&l.a.t()?)?.matmul(&l.b.t()?)? * l.scale
    }
}

/// `x @ w^T + b` for a frozen weight `w` (out, in): on the CPU the [`kernels::linear`] op (bias written
/// by the GEMM, backward computes no weight gradient: a frozen base model never needs it, and candle's
/// matmul backward would double the backward GEMMs); elsewhere candle's ops.
///
/// A weight held in a narrower dtype than `x` (a decoder's bf16 or f16 base): on the CPU it is widened
/// for the GEMM (candle's CPU matmul widens bf16 the same way), elsewhere `x` is narrowed and the matmul
/// runs in the weight's dtype; either way the output is in `x`'s dtype.
fn frozen_linear(x: &Tensor, w: &Tensor, b: &Tensor, grad: Grad) -> candle_core::Result<Tensor> {
    if w.dtype() != x.dtype() {
        if kernels::usable(x) && x.rank() == 2 {
            return kernels::linear(x, &w.to_dtype(x.dtype())?, b, grad == Grad::Yes);
        }
        let w = w.detach();
        return x
            .to_dtype(w.dtype())?
            .matmul(&w.t()?)?
            .to_dtype(x.dtype())?
            .broadcast_add(b);
    }
    if kernels::usable(x) && x.rank() == 2 {
        return kernels::linear(x, w, b, grad == Grad::Yes);
    }
    let w = if grad == Grad::Yes {
        w.detach()
    } else {
        w.clone()
    };
    x.matmul(&w.t()?)?.broadcast_add(b)
}

/// `layer_norm(a + r)`: one fused op on the CPU.
fn add_layer_norm(
    a: &Tensor,
    r: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
    grad: Grad,
) -> candle_core::Result<Tensor> {
    if kernels::usable(a) && a.rank() == 2 {
        return kernels::add_layer_norm(a, r, w, b, eps, grad == Grad::Yes);
    }
    layer_norm(&(a + r)?, w, b, eps, grad)
}

fn layer_norm(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
    grad: Grad,
) -> candle_core::Result<Tensor> {
    if kernels::usable(x) {
        return kernels::layer_norm(x, w, b, eps, grad == Grad::Yes);
    }
    match grad {
        Grad::No => candle_nn::ops::layer_norm(&x.contiguous()?, w, b, eps as f32),
        Grad::Yes => {
            let hsz = x.dim(D::Minus1)? as f64;
            let mean = (x.sum_keepdim(D::Minus1)? / hsz)?;
            let xc = x.broadcast_sub(&mean)?;
            let var = (xc.sqr()?.sum_keepdim(D::Minus1)? / hsz)?;
            let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
            xn.broadcast_mul(w)?.broadcast_add(b)
        }
    }
}

fn softmax(x: &Tensor, grad: Grad) -> candle_core::Result<Tensor> {
    match grad {
        Grad::No => candle_nn::ops::softmax_last_dim(x),
        Grad::Yes => {
            // The max shift does not change the result, so it needs no gradient.
            let m = x.max_keepdim(D::Minus1)?.detach();
            let e = x.broadcast_sub(&m)?.exp()?;
            e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
        }
    }
}

/// Mean of the hidden states over the positions where `mask` is 1: (B, S, H), (B, S) -> (B, H).
pub fn mean_pool(hidden: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    let m = mask.unsqueeze(2)?;
    let sum = hidden.broadcast_mul(&m)?.sum(1)?;
    let n = mask.sum_keepdim(1)?.clamp(1e-9, f64::INFINITY)?;
    sum.broadcast_div(&n)
}
