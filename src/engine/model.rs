//! The BERT-family encoder: configuration, weights and the forward pass with adapter hooks.
//!
//! The forward pass is written for this engine (not candle-transformers' BERT) so that every adapter
//! method can act where PEFT / AdapterHub put it, and so that the hot path avoids needless copies:
//! query, key and value are one fused matmul when no adapter needs them apart, the three heads' layout
//! change is a single copy, the key transpose is a strided view that the GEMM reads directly, and the
//! softmax scale is folded into the query. Inference uses candle's fused layer-norm and softmax kernels;
//! the differentiable path ([`Grad::Yes`]) composes them from primitive ops, which candle can backprop.

use super::adapters::{AdapterSet, Bottleneck, LayerAdapter, LinearAdapter};
use super::error::{EngineError, EngineResult};
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
            Activation::Gelu => gelu_erf(x),
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
            serde_json::from_slice(&bytes).map_err(|e| EngineError::ModelConfig {
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
            return Err(EngineError::UnsupportedArchitecture {
                path: path.to_path_buf(),
                found: format!(
                    "model_type {:?}, architectures {:?}",
                    self.model_type, self.architectures
                ),
            });
        }
        if let Some(p) = &self.position_embedding_type {
            if p != "absolute" {
                return Err(EngineError::UnsupportedArchitecture {
                    path: path.to_path_buf(),
                    found: format!("position_embedding_type {p:?}"),
                });
            }
        }
        if self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0 {
            return Err(EngineError::ModelConfig {
                path: path.to_path_buf(),
                reason: format!(
                    "hidden_size {} is not a multiple of num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
            });
        }
        self.activation(path)?;
        Ok(())
    }

    pub(crate) fn activation(&self, path: &Path) -> EngineResult<Activation> {
        match self.hidden_act.as_str() {
            "gelu" => Ok(Activation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
            "relu" => Ok(Activation::Relu),
            other => Err(EngineError::UnsupportedArchitecture {
                path: path.to_path_buf(),
                found: format!("hidden_act {other:?}"),
            }),
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
                        return Err(EngineError::MissingWeight {
                            path: self.path.to_path_buf(),
                            tensor: full,
                            hint: " (is this a BERT-family model? names must look like embeddings.word_embeddings.weight, encoder.layer.0.attention.self.query.weight, optionally under bert. or roberta.)".into(),
                        })
                    }
                }
            }
        };
        if t.dims() != shape {
            return Err(EngineError::WeightShape {
                path: self.path.to_path_buf(),
                tensor: full,
                expected: shape.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        Ok(t.to_dtype(DType::F32)?)
    }
}

impl BertModel {
    /// Load `config.json` and `model.safetensors` from a Hugging Face model folder.
    pub fn load(dir: &Path, device: &Device) -> EngineResult<BertModel> {
        let cfg_path = dir.join("config.json");
        if !cfg_path.is_file() {
            return Err(EngineError::ModelFileMissing {
                dir: dir.to_path_buf(),
                file: "config.json",
            });
        }
        let config = BertConfig::from_file(&cfg_path)?;
        let wpath = dir.join("model.safetensors");
        if !wpath.is_file() {
            return Err(EngineError::ModelFileMissing {
                dir: dir.to_path_buf(),
                file: "model.safetensors",
            });
        }
        let map =
            candle_core::safetensors::load(&wpath, device).map_err(|e| EngineError::Weights {
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
        })
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
        let eps = self.config.layer_norm_eps;
        let x2 = x.reshape((b * s, h))?;
        let lin_ad = |slot: usize| la.map(|l| &l.linears[slot]);
        let scale = 1.0 / (hd as f64).sqrt();

        // Query, key, value: (B, nh, S, hd).
        let qkv_plain = [Q, K, V]
            .iter()
            .all(|&k| lin_ad(k).map(|a| a.is_empty()).unwrap_or(true));
        let (q, k, v) = if qkv_plain {
            let qkv =
                frozen_matmul(&x2, &layer.qkv_weight, grad)?.broadcast_add(&layer.qkv_bias)?;
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
        let attn = linear(&layer.linears[ATTN_OUT], lin_ad(ATTN_OUT), &ctx, grad)?;
        let attn = match la.and_then(|l| l.bottlenecks[0].as_ref()) {
            Some(bn) => bottleneck(bn, &attn)?,
            None => attn,
        };
        let ln0_bias = la
            .and_then(|l| l.norm_bias[0].as_ref())
            .unwrap_or(&layer.norms[0].1);
        let h1 = layer_norm(&(attn + &x2)?, &layer.norms[0].0, ln0_bias, eps, grad)?;
        let inter = linear(&layer.linears[INTER], lin_ad(INTER), &h1, grad)?;
        let inter = self.activation.apply(&inter)?;
        let out = linear(&layer.linears[OUT], lin_ad(OUT), &inter, grad)?;
        let out = match la.and_then(|l| l.bottlenecks[1].as_ref()) {
            Some(bn) => bottleneck(bn, &out)?,
            None => out,
        };
        let ln1_bias = la
            .and_then(|l| l.norm_bias[1].as_ref())
            .unwrap_or(&layer.norms[1].1);
        let y = layer_norm(&(out + h1)?, &layer.norms[1].0, ln1_bias, eps, grad)?;
        y.reshape((b, s, h))
    }
}

/// A linear layer with its adapters: IA3 input scaling (feed-forward modules), the bias (replaced by
/// BitFit / LoRA `bias="all"`), LoRA's low-rank update and IA3 output scaling, in PEFT's order.
fn linear(
    base: &Linear,
    ad: Option<&LinearAdapter>,
    x: &Tensor,
    grad: Grad,
) -> candle_core::Result<Tensor> {
    let Some(ad) = ad else {
        return frozen_matmul(x, &base.weight, grad)?.broadcast_add(&base.bias);
    };
    let xin = match &ad.ia3_in {
        Some(s) => x.broadcast_mul(s)?,
        None => x.clone(),
    };
    let bias = ad.bias.as_ref().unwrap_or(&base.bias);
    let mut y = frozen_matmul(&xin, &base.weight, grad)?.broadcast_add(bias)?;
    if let Some(l) = &ad.lora {
        if l.groups > 1 {
            // Stacked adapters: row block g of the batch goes through adapter g (one batched matmul).
            let (n, inp) = x.dims2()?;
            let out = y.dim(1)?;
            let g = l.groups;
            let d = x
                .reshape((g, n / g, inp))?
                .matmul(&l.a)?
                .matmul(&l.b)?
                .reshape((n, out))?;
            y = (y + d)?;
        } else {
            let d = x.matmul(&l.a.t()?)?.matmul(&l.b.t()?)?;
            y = (y + (d * l.scale)?)?;
        }
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

/// `x @ w^T` for a frozen weight `w` (out, in). candle's matmul backward also computes the gradient of
/// the weight, which a frozen base model never needs and which doubles the backward pass; on the CPU the
/// differentiable path uses a custom op whose backward returns the input's gradient only.
fn frozen_matmul(x: &Tensor, w: &Tensor, grad: Grad) -> candle_core::Result<Tensor> {
    if grad == Grad::No || !x.device().is_cpu() || x.dtype() != DType::F32 {
        return x.matmul(&w.t()?);
    }
    x.contiguous()?.apply_op1(FrozenMatmul { w: w.clone() })
}

struct FrozenMatmul {
    w: Tensor,
}

impl candle_core::CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("frozen-matmul: non-contiguous input".into()))?;
        let x = Tensor::from_slice(
            &storage.as_slice::<f32>()?[start..end],
            layout.shape(),
            &Device::Cpu,
        )?;
        let y = x.matmul(&self.w.t()?)?;
        let shape = y.shape().clone();
        let v = y.flatten_all()?.to_vec1::<f32>()?;
        Ok((candle_core::CpuStorage::F32(v), shape))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_res.matmul(&self.w)?))
    }
}

/// Exact (erf) GELU. On the CPU a custom kernel (erf by Abramowitz & Stegun 7.1.26, |error| < 1.5e-7,
/// vectorisable, split across threads) replaces candle's scalar f64 erf, with its analytic backward.
fn gelu_erf(x: &Tensor) -> candle_core::Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        return x.gelu_erf();
    }
    x.contiguous()?.apply_op1(FastGelu)
}

struct FastGelu;

#[inline(always)]
fn erf_as(x: f32) -> f32 {
    // Abramowitz & Stegun 7.1.26.
    let s = x.signum();
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let y = 1.0
        - (((((1.061_405_4 * t - 1.453_152_1) * t) + 1.421_413_7) * t - 0.284_496_74) * t
            + 0.254_829_6)
            * t
            * (-a * a).exp();
    s * y
}

fn par_map(src: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out = vec![0f32; src.len()];
    out.par_chunks_mut(16 * 1024)
        .zip(src.par_chunks(16 * 1024))
        .for_each(|(o, i)| {
            for (o, &v) in o.iter_mut().zip(i) {
                *o = f(v);
            }
        });
    out
}

impl candle_core::CustomOp1 for FastGelu {
    fn name(&self) -> &'static str {
        "fast-gelu-erf"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("fast-gelu: non-contiguous input".into()))?;
        let src = &storage.as_slice::<f32>()?[start..end];
        let out = par_map(src, |v| {
            0.5 * v * (1.0 + erf_as(v * std::f32::consts::FRAC_1_SQRT_2))
        });
        Ok((candle_core::CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        // d/dx x*Phi(x) = Phi(x) + x*phi(x).
        let x = arg.flatten_all()?.to_vec1::<f32>()?;
        let inv_sqrt_2pi = 0.398_942_3_f32;
        let d = par_map(&x, |v| {
            0.5 * (1.0 + erf_as(v * std::f32::consts::FRAC_1_SQRT_2))
                + v * inv_sqrt_2pi * (-0.5 * v * v).exp()
        });
        let d = Tensor::from_vec(d, arg.shape(), arg.device())?;
        Ok(Some(grad_res.mul(&d)?))
    }
}

fn layer_norm(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
    grad: Grad,
) -> candle_core::Result<Tensor> {
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
