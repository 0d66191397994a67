//! Turning a [`LightweightObject`] (or trainable variables) into the tensors the forward pass applies.
//!
//! | method | where it acts (PEFT / AdapterHub semantics) |
//! |---|---|
//! | LoRA | `y = W x + b + s * B A x` on every targeted linear layer, `s = alpha / r` (or `alpha / sqrt(r)` with rsLoRA; `rank_pattern`/`alpha_pattern` per module); with `bias="all"` the stored biases (`...base_layer.bias`, layer-norm biases, the embeddings' layer-norm bias) replace the model's |
//! | IA3 | a vector shaped (out, 1) scales the layer's output (bias included); one shaped (1, in) (PEFT's `feedforward_modules`) scales its input |
//! | prefix tuning | `prompt_embeddings` (T, L*2*H) viewed as (T, L*2, heads, head_dim): layer i's key prefix is chunk 2i, its value prefix chunk 2i+1, prepended to the keys/values; the mask is extended with ones. On a grouped-query decoder H = kv_heads * head_dim (PEFT's choice for such models); the prefix keys are not rotated, and the real tokens' positions start at T (the prefix is PEFT's cached past) |
//! | prompt tuning | `prompt_embeddings` (T, H) prepended to the word embeddings (positions then run over virtual + real tokens, as when PEFT passes `inputs_embeds`); pooling covers the real tokens only; on a decoder every token attends to the whole prompt and labels are scored at the real tokens' positions |
//! | BitFit | the stored biases replace the model's |
//! | bottleneck | Houlsby: `h + up(act(down(h)))` after the attention output projection and after the feed-forward output projection, before the residual + layer norm |
//!
//! On decoder (Llama-family) models LoRA, IA3, prefix and prompt tuning apply; BitFit and bottleneck
//! adapters are refused naming the method.
//!
//! Tensors of modules that do not affect the mean-pooled encoder output (the pooler) are accepted and
//! ignored. A tensor whose shape does not fit the base model is an [`EngineError::AdapterShape`] naming
//! the tensor and both shapes.

use super::error::{EngineError, EngineResult};
use super::model::{Activation, LINEAR_SLOTS, LN_SLOTS};
use super::Backbone;
use crate::object::{parse_tensor_name, LightweightObject, Method, MethodKind, Role};
use candle_core::{Device, Tensor};

/// LoRA factors of one linear layer: `a` (r, in), `b` (out, r), and the scaling.
///
/// With `groups` G > 1 the weights are G adapters stacked by [`AdapterSet::stack_lora`] for one forward
/// pass over inputs repeated G times (group-major rows): then `a` holds the transposed factors (G, in, r),
/// `b` the transposed, already scaled factors (G, r, out), and `scale` is 1.
#[derive(Debug, Clone)]
pub struct LoraWeights {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
    pub groups: usize,
}

/// Everything an adapter does to one linear layer.
#[derive(Debug, Clone, Default)]
pub struct LinearAdapter {
    pub lora: Option<LoraWeights>,
    /// IA3 input scaling (in,).
    pub ia3_in: Option<Tensor>,
    /// IA3 output scaling (out,).
    pub ia3_out: Option<Tensor>,
    /// Replacement bias (out,).
    pub bias: Option<Tensor>,
}

impl LinearAdapter {
    pub fn is_empty(&self) -> bool {
        self.lora.is_none()
            && self.ia3_in.is_none()
            && self.ia3_out.is_none()
            && self.bias.is_none()
    }
}

/// A bottleneck adapter: down (b, h) + bias, activation, up (h, b) + bias.
#[derive(Debug, Clone)]
pub struct Bottleneck {
    pub down_weight: Tensor,
    pub down_bias: Tensor,
    pub up_weight: Tensor,
    pub up_bias: Tensor,
    pub activation: Activation,
}

/// Everything an adapter does to one layer.
#[derive(Debug, Clone, Default)]
pub struct LayerAdapter {
    /// One per linear layer of the model's layers, in the backbone's slot order
    /// ([`Backbone::linear_slots`]).
    pub linears: Vec<LinearAdapter>,
    /// Replacement biases of the two layer norms.
    pub norm_bias: [Option<Tensor>; 2],
    /// Prefix keys and values, each (heads, T, head_dim).
    pub prefix: Option<(Tensor, Tensor)>,
    /// Bottleneck adapters after the attention output and after the feed-forward output.
    pub bottlenecks: [Option<Bottleneck>; 2],
}

/// An adapter ready for the forward pass (see the module docs for what each method does).
#[derive(Debug, Clone)]
pub struct AdapterSet {
    pub kind: MethodKind,
    pub layers: Vec<LayerAdapter>,
    pub embeddings_norm_bias: Option<Tensor>,
    /// Prompt tuning's virtual tokens (T, H).
    pub prompt: Option<Tensor>,
    /// Number of prefix-tuning virtual tokens (0 if none).
    pub prefix_len: usize,
}

/// Convert a stored tensor to an f32 candle tensor.
pub fn to_candle(t: &crate::object::Tensor, device: &Device) -> EngineResult<Tensor> {
    Ok(Tensor::from_vec(t.to_f32(), t.shape.as_slice(), device)?)
}

fn check_shape(name: &str, t: &Tensor, expected: &[usize]) -> EngineResult<()> {
    if t.dims() != expected {
        return Err(EngineError::AdapterShape {
            tensor: name.to_string(),
            expected: expected.to_vec(),
            found: t.dims().to_vec(),
        });
    }
    Ok(())
}

/// Where a bias tensor goes.
enum BiasSlot {
    Linear(usize, usize),
    Norm(usize, usize),
    Embeddings,
    Ignored,
}

fn bias_slot(name: &str, num_layers: usize) -> EngineResult<BiasSlot> {
    let loc = parse_tensor_name(name);
    let module = loc
        .module
        .strip_suffix(".base_layer")
        .unwrap_or(&loc.module);
    match loc.layer {
        Some(l) => {
            check_layer(name, l.index, num_layers)?;
            if let Some(k) = LINEAR_SLOTS.iter().position(|s| *s == module) {
                Ok(BiasSlot::Linear(l.index, k))
            } else if let Some(k) = LN_SLOTS.iter().position(|s| *s == module) {
                Ok(BiasSlot::Norm(l.index, k))
            } else {
                Err(EngineError::AdapterTensor {
                    tensor: name.into(),
                    reason: format!("no bias {module:?} in a BERT layer"),
                })
            }
        }
        None => {
            let m = loc.module_path.as_str();
            if m == "embeddings.LayerNorm" {
                Ok(BiasSlot::Embeddings)
            } else if m.starts_with("pooler") {
                Ok(BiasSlot::Ignored)
            } else {
                Err(EngineError::AdapterTensor {
                    tensor: name.into(),
                    reason: "not a bias of this BERT model".into(),
                })
            }
        }
    }
}

fn check_layer(name: &str, index: usize, num_layers: usize) -> EngineResult<()> {
    if index >= num_layers {
        return Err(EngineError::AdapterTensor {
            tensor: name.into(),
            reason: format!(
                "layer {index}, but the base model has {num_layers} layers; the adapter was trained for another base model"
            ),
        });
    }
    Ok(())
}

fn linear_slot(
    name: &str,
    num_layers: usize,
    slots: &[&str],
    arch: &str,
) -> EngineResult<Option<(usize, usize)>> {
    let loc = parse_tensor_name(name);
    match loc.layer {
        Some(l) => {
            check_layer(name, l.index, num_layers)?;
            match slots.iter().position(|s| *s == loc.module) {
                Some(k) => Ok(Some((l.index, k))),
                None => Err(EngineError::AdapterTensor {
                    tensor: name.into(),
                    reason: format!(
                        "module {:?} is not a linear layer of {arch} ({slots:?})",
                        loc.module
                    ),
                }),
            }
        }
        None if loc.module_path.starts_with("pooler") => Ok(None),
        None => Err(EngineError::AdapterTensor {
            tensor: name.into(),
            reason: "adapters on the embeddings or outside the encoder layers are not supported"
                .into(),
        }),
    }
}

impl LayerAdapter {
    /// Nothing on any of `slots` linear layers.
    pub fn empty(slots: usize) -> LayerAdapter {
        LayerAdapter {
            linears: vec![LinearAdapter::default(); slots],
            ..Default::default()
        }
    }
}

impl AdapterSet {
    /// Stack several LoRA adapters of one layout (the same modules with the same ranks, nothing but LoRA
    /// factors: no bias, IA3, prefix...) into one set whose forward pass applies adapter g to the g-th
    /// block of a batch repeated once per adapter. `None` when they cannot be stacked (the caller then
    /// runs them one by one).
    pub fn stack_lora(sets: &[&AdapterSet]) -> Option<AdapterSet> {
        let first = sets.first()?;
        let g = sets.len();
        let plain = |s: &AdapterSet| {
            s.kind == MethodKind::Lora
                && s.prompt.is_none()
                && s.embeddings_norm_bias.is_none()
                && s.prefix_len == 0
                && s.layers.len() == first.layers.len()
                && s.layers.iter().all(|l| {
                    l.prefix.is_none()
                        && l.norm_bias.iter().all(|b| b.is_none())
                        && l.bottlenecks.iter().all(|b| b.is_none())
                        && l.linears
                            .iter()
                            .all(|a| a.ia3_in.is_none() && a.ia3_out.is_none() && a.bias.is_none())
                })
        };
        if g < 2 || !sets.iter().all(|s| plain(s)) {
            return None;
        }
        let slots = first.layers.first().map(|l| l.linears.len()).unwrap_or(0);
        let mut out = AdapterSet {
            kind: MethodKind::Lora,
            layers: vec![LayerAdapter::empty(slots); first.layers.len()],
            embeddings_norm_bias: None,
            prompt: None,
            prefix_len: 0,
        };
        for (li, layer) in out.layers.iter_mut().enumerate() {
            for (k, lin) in layer.linears.iter_mut().enumerate() {
                let loras: Vec<Option<&LoraWeights>> = sets
                    .iter()
                    .map(|s| s.layers[li].linears[k].lora.as_ref())
                    .collect();
                if loras.iter().all(|l| l.is_none()) {
                    continue;
                }
                let loras: Vec<&LoraWeights> = loras.into_iter().collect::<Option<Vec<_>>>()?;
                let (d0, d1) = (loras[0].a.dims(), loras[0].b.dims());
                if loras
                    .iter()
                    .any(|l| l.groups != 1 || l.a.dims() != d0 || l.b.dims() != d1)
                {
                    return None;
                }
                let at: Vec<Tensor> = loras
                    .iter()
                    .map(|l| l.a.t())
                    .collect::<Result<_, _>>()
                    .ok()?;
                let bt: Vec<Tensor> = loras
                    .iter()
                    .map(|l| l.b.t().and_then(|t| t * l.scale))
                    .collect::<Result<_, _>>()
                    .ok()?;
                lin.lora = Some(LoraWeights {
                    a: Tensor::stack(&at, 0).ok()?.contiguous().ok()?,
                    b: Tensor::stack(&bt, 0).ok()?.contiguous().ok()?,
                    scale: 1.0,
                    groups: g,
                });
            }
        }
        Some(out)
    }

    /// Prepare a stored adapter for `model` (tensors converted to f32 on the model's device).
    pub fn from_object(model: &Backbone, obj: &LightweightObject) -> EngineResult<AdapterSet> {
        let saved = obj.saved_modules();
        if let Some(t) = obj
            .tensors
            .iter()
            .find(|t| crate::object::is_saved_module_tensor(&t.name, &saved))
        {
            return Err(EngineError::AdapterTensor {
                tensor: t.name.clone(),
                reason: format!(
                    "a module the adapter saves whole (modules_to_save {saved:?}); the engine runs the \
                     base model's own modules, so it cannot score this adapter as trained (it stays \
                     stored, searchable and exportable; re-train without modules_to_save to rerank it)"
                ),
            });
        }
        let named = obj
            .tensors
            .iter()
            .map(|t| Ok((t.name.clone(), to_candle(t, model.device())?)))
            .collect::<EngineResult<Vec<_>>>()?;
        AdapterSet::from_named(model, &obj.method, &named)
    }

    /// Prepare an adapter from named tensors (PEFT / AdapterHub names). The tensors are used as given,
    /// so tensors of [`candle_core::Var`]s keep their gradients (training).
    pub fn from_named(
        model: &Backbone,
        method: &Method,
        named: &[(String, Tensor)],
    ) -> EngineResult<AdapterSet> {
        let nl = model.num_layers();
        let h = model.hidden_size();
        let slots = model.linear_slots();
        // (out, in) of a linear slot
        let dims = |k: usize| -> (usize, usize) { model.linear_dims(k) };
        let linear_slot = |name: &str| linear_slot(name, nl, &slots, model.arch_name());
        let mut set = AdapterSet {
            kind: method.kind(),
            layers: vec![LayerAdapter::empty(slots.len()); nl],
            embeddings_norm_bias: None,
            prompt: None,
            prefix_len: 0,
        };
        let encoder = match model {
            Backbone::Encoder(m) => Some(m),
            Backbone::Decoder(_) => None,
        };
        let encoder_only = |what: &str| -> EngineError {
            EngineError::Adapter(format!(
                "{what} is not supported on decoder (Llama-family) models yet; LoRA, IA3, prefix and prompt tuning are"
            ))
        };
        let put_bias = |set: &mut AdapterSet, name: &str, t: &Tensor| -> EngineResult<()> {
            if encoder.is_none() {
                return Err(EngineError::AdapterTensor {
                    tensor: name.into(),
                    reason: "Llama-family models have no biases to tune or replace".into(),
                });
            }
            match bias_slot(name, nl)? {
                BiasSlot::Linear(l, k) => {
                    check_shape(name, t, &[dims(k).0])?;
                    set.layers[l].linears[k].bias = Some(t.clone());
                }
                BiasSlot::Norm(l, k) => {
                    check_shape(name, t, &[h])?;
                    set.layers[l].norm_bias[k] = Some(t.clone());
                }
                BiasSlot::Embeddings => {
                    check_shape(name, t, &[h])?;
                    set.embeddings_norm_bias = Some(t.clone());
                }
                BiasSlot::Ignored => {}
            }
            Ok(())
        };
        match method {
            Method::Lora(lc) => {
                // Pair lora_A / lora_B by module path.
                let mut a_of: std::collections::BTreeMap<String, (&str, &Tensor)> =
                    Default::default();
                let mut b_of: std::collections::BTreeMap<String, (&str, &Tensor)> =
                    Default::default();
                for (name, t) in named {
                    let loc = parse_tensor_name(name);
                    match loc.role {
                        Role::LoraA => {
                            a_of.insert(loc.module_path.clone(), (name.as_str(), t));
                        }
                        Role::LoraB => {
                            b_of.insert(loc.module_path.clone(), (name.as_str(), t));
                        }
                        Role::Bias => put_bias(&mut set, name, t)?,
                        _ => {
                            return Err(EngineError::AdapterTensor {
                                tensor: name.clone(),
                                reason: "not a LoRA tensor (lora_A, lora_B or a bias)".into(),
                            })
                        }
                    }
                }
                for (module, (an, a)) in &a_of {
                    let Some((bn, b)) = b_of.get(module) else {
                        return Err(EngineError::AdapterTensor {
                            tensor: an.to_string(),
                            reason: "no matching lora_B".into(),
                        });
                    };
                    let Some((l, k)) = linear_slot(an)? else {
                        continue;
                    };
                    let (out, inp) = dims(k);
                    let r = a.dims().first().copied().unwrap_or(0);
                    check_shape(an, a, &[r, inp])?;
                    check_shape(bn, b, &[out, r])?;
                    set.layers[l].linears[k].lora = Some(LoraWeights {
                        a: (*a).clone(),
                        b: (*b).clone(),
                        scale: lc.scaling_for(module),
                        groups: 1,
                    });
                }
                if let Some((m, (bn, _))) = b_of.iter().find(|(m, _)| !a_of.contains_key(*m)) {
                    return Err(EngineError::AdapterTensor {
                        tensor: bn.to_string(),
                        reason: format!("no matching lora_A for {m}"),
                    });
                }
            }
            Method::Ia3(_) => {
                for (name, t) in named {
                    if parse_tensor_name(name).role != Role::Ia3 {
                        return Err(EngineError::AdapterTensor {
                            tensor: name.clone(),
                            reason: "not an IA3 tensor (ia3_l)".into(),
                        });
                    }
                    let Some((l, k)) = linear_slot(name)? else {
                        continue;
                    };
                    let (out, inp) = dims(k);
                    let d = t.dims();
                    if d.len() == 2 && d[0] == 1 && d[1] != 1 || (d == [1, 1] && inp == 1) {
                        check_shape(name, t, &[1, inp])?;
                        set.layers[l].linears[k].ia3_in = Some(t.flatten_all()?);
                    } else {
                        check_shape(name, t, &[out, 1])?;
                        set.layers[l].linears[k].ia3_out = Some(t.flatten_all()?);
                    }
                }
            }
            Method::Prefix(pc) => {
                // Per layer, the keys' and values' width and heads: the model's on an encoder; on a
                // grouped-query decoder the key/value heads' (PEFT sets token_dim = kv_heads * head_dim and
                // num_attention_heads = kv_heads for such models).
                let (nh, hd) = match model {
                    Backbone::Encoder(m) => (m.config.num_attention_heads, m.config.head_dim()),
                    Backbone::Decoder(m) => (m.config.kv_heads, m.config.head_dim()),
                };
                let kv = nh * hd;
                let (name, t) = single_table(named, "prefix tuning")?;
                let tn = pc.num_virtual_tokens;
                check_shape(name, t, &[tn, nl * 2 * kv])?;
                if pc.num_layers != nl || pc.token_dim != kv {
                    return Err(EngineError::AdapterShape {
                        tensor: name.into(),
                        expected: vec![nl, kv],
                        found: vec![pc.num_layers, pc.token_dim],
                    });
                }
                let part = |c: usize| -> candle_core::Result<Tensor> {
                    t.narrow(1, c * kv, kv)?
                        .reshape((tn, nh, hd))?
                        .transpose(0, 1)?
                        .contiguous()
                };
                for (i, layer) in set.layers.iter_mut().enumerate() {
                    layer.prefix = Some((part(2 * i)?, part(2 * i + 1)?));
                }
                set.prefix_len = tn;
            }
            Method::Prompt(pc) => {
                // Encoders and decoders alike: the table goes before the word embeddings.
                let (name, t) = single_table(named, "prompt tuning")?;
                check_shape(name, t, &[pc.num_virtual_tokens, h])?;
                set.prompt = Some(t.clone());
            }
            Method::Bitfit(_) => {
                if encoder.is_none() {
                    return Err(encoder_only("BitFit"));
                }
                for (name, t) in named {
                    if parse_tensor_name(name).role != Role::Bias {
                        return Err(EngineError::AdapterTensor {
                            tensor: name.clone(),
                            reason: "a BitFit adapter holds only *.bias tensors".into(),
                        });
                    }
                    put_bias(&mut set, name, t)?;
                }
            }
            Method::Adapter(bc) => {
                if encoder.is_none() {
                    return Err(encoder_only("a bottleneck adapter"));
                }
                let act = Activation::parse(&bc.non_linearity).ok_or_else(|| {
                    EngineError::Adapter(format!(
                        "unsupported non_linearity {:?} (relu, swish, gelu, tanh)",
                        bc.non_linearity
                    ))
                })?;
                type Parts = [Option<Tensor>; 4];
                let mut parts: Vec<[Parts; 2]> = vec![Default::default(); nl];
                for (name, t) in named {
                    let loc = parse_tensor_name(name);
                    let role = match loc.role {
                        Role::AdapterDownWeight => 0,
                        Role::AdapterDownBias => 1,
                        Role::AdapterUpWeight => 2,
                        Role::AdapterUpBias => 3,
                        _ => {
                            return Err(EngineError::AdapterTensor {
                                tensor: name.clone(),
                                reason: "not a bottleneck adapter tensor".into(),
                            })
                        }
                    };
                    let placement = match loc.module.rsplit_once(".adapters.") {
                        Some(("attention.output", _)) => 0,
                        Some(("output", _)) => 1,
                        _ => {
                            return Err(EngineError::AdapterTensor {
                                tensor: name.clone(),
                                reason: "bottleneck adapters sit in attention.output or output"
                                    .into(),
                            })
                        }
                    };
                    let Some(l) = loc.layer else {
                        return Err(EngineError::AdapterTensor {
                            tensor: name.clone(),
                            reason: "no layer index".into(),
                        });
                    };
                    check_layer(name, l.index, nl)?;
                    let bsz = bc.bottleneck_size;
                    let want: Vec<usize> = match role {
                        0 => vec![bsz, h],
                        1 => vec![bsz],
                        2 => vec![h, bsz],
                        _ => vec![h],
                    };
                    check_shape(name, t, &want)?;
                    parts[l.index][placement][role] = Some(t.clone());
                }
                for (i, lp) in parts.into_iter().enumerate() {
                    for (p, [dw, db, uw, ub]) in lp.into_iter().enumerate() {
                        match (dw, db, uw, ub) {
                            (Some(dw), Some(db), Some(uw), Some(ub)) => {
                                set.layers[i].bottlenecks[p] = Some(Bottleneck {
                                    down_weight: dw,
                                    down_bias: db,
                                    up_weight: uw,
                                    up_bias: ub,
                                    activation: act,
                                })
                            }
                            (None, None, None, None) => {}
                            _ => {
                                return Err(EngineError::Adapter(format!(
                                    "layer {i}: the bottleneck adapter after {} lacks one of adapter_down.0.weight/bias, adapter_up.weight/bias",
                                    if p == 0 { "attention.output" } else { "output" }
                                )))
                            }
                        }
                    }
                }
            }
        }
        Ok(set)
    }
}

fn single_table<'a>(
    named: &'a [(String, Tensor)],
    what: &str,
) -> EngineResult<(&'a str, &'a Tensor)> {
    match named {
        [(n, t)] => Ok((n.as_str(), t)),
        _ => Err(EngineError::Adapter(format!(
            "{what} expects exactly one prompt_embeddings tensor, found {}",
            named.len()
        ))),
    }
}
