//! The tensor-name parser: maps a tensor name to (layer, module path, role).
//!
//! Recognised layer layouts (after any leading wrapper such as `base_model.model.` or `bert.`):
//!
//! | layout | pattern | stack |
//! |---|---|---|
//! | BERT / RoBERTa / MiniLM | `encoder.layer.{i}.` | `encoder` |
//! | Llama / Qwen / Mistral / Gemma | `model.layers.{i}.` / `layers.{i}.` (Gemma 3: `language_model.layers.{i}.`) | `layers` |
//! | T5 | `encoder.block.{i}.`, `decoder.block.{i}.` | `encoder` / `decoder` |
//! | GPT-2 | `transformer.h.{i}.` / `h.{i}.` | `h` |
//!
//! The first `{layer|layers|block|h}.{integer}` pair in the name is the layer; everything between it and the
//! role suffix is the module path (e.g. `attention.self.query`). Tensors outside any layer (embedding
//! LayerNorm bias, pooler bias, prompt embeddings) have `layer == None`.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Which stack of Transformer layers a layer index belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stack {
    /// A single-stack encoder (BERT `encoder.layer`) or T5's encoder (`encoder.block`).
    Encoder,
    /// T5's decoder (`decoder.block`).
    Decoder,
    /// Decoder-only stacks: Llama/Qwen/Mistral `layers`, GPT-2 `h`.
    Layers,
}

/// A layer: its stack and index. Layers order by stack (encoder before decoder), then index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LayerRef {
    pub stack: Stack,
    pub index: usize,
}

impl fmt::Display for LayerRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.stack {
            Stack::Encoder => write!(f, "encoder.{}", self.index),
            Stack::Decoder => write!(f, "decoder.{}", self.index),
            Stack::Layers => write!(f, "layers.{}", self.index),
        }
    }
}

/// What a tensor is within its module.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    LoraA,
    LoraB,
    /// LoRA on an embedding layer (`lora_embedding_A` / `lora_embedding_B`).
    LoraEmbeddingA,
    LoraEmbeddingB,
    /// IA3 scaling vector (`ia3_l`).
    Ia3,
    /// A bias (BitFit, or LoRA with `bias="all"`/`"lora_only"`).
    Bias,
    /// Bottleneck adapter down-projection weight / bias, up-projection weight / bias.
    AdapterDownWeight,
    AdapterDownBias,
    AdapterUpWeight,
    AdapterUpBias,
    /// Prompt or prefix tuning's virtual-token table.
    PromptEmbeddings,
    /// Anything else, with its suffix.
    Other(String),
}

/// The parsed location of a tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorLocation {
    pub layer: Option<LayerRef>,
    /// Module path inside the layer (or inside the model when `layer` is `None`), e.g. `attention.self.query`.
    pub module: String,
    pub role: Role,
    /// The full module path with wrappers removed, e.g. `encoder.layer.0.attention.self.query`: the name
    /// LoRA's `rank_pattern` keys are matched against.
    pub module_path: String,
}

/// Wrappers that PEFT, AdapterHub and model classes put before the model's own names.
const WRAPPER_PREFIXES: &[&str] = &["base_model.model.", "bert.", "roberta.", "transformer."];

fn is_layer_word(w: &str) -> bool {
    matches!(w, "layer" | "layers" | "block" | "h")
}

/// Parse a tensor name. Never fails: unknown shapes come back as [`Role::Other`] with `layer: None`.
pub fn parse_tensor_name(name: &str) -> TensorLocation {
    let mut body = name;
    loop {
        let before = body;
        for p in WRAPPER_PREFIXES {
            if let Some(rest) = body.strip_prefix(p) {
                // `transformer.h.0` keeps "transformer." out of the path; but a GPT-2 model *is* named
                // transformer, which is fine since "h" identifies the stack.
                body = rest;
            }
        }
        if body == before {
            break;
        }
    }
    let segs: Vec<&str> = body.split('.').collect();
    // Role from the tail.
    let (role, role_start) = parse_role(&segs);
    let module_segs = &segs[..role_start];

    // Find the first layer-word followed by an integer.
    let mut layer = None;
    let mut module_start = 0;
    for i in 0..module_segs.len().saturating_sub(1) {
        if is_layer_word(module_segs[i]) {
            if let Ok(idx) = module_segs[i + 1].parse::<usize>() {
                let prev = if i > 0 {
                    Some(module_segs[i - 1])
                } else {
                    None
                };
                let stack = match (module_segs[i], prev) {
                    ("block", Some("decoder")) => Stack::Decoder,
                    ("layer", _) | ("block", _) => Stack::Encoder,
                    _ => Stack::Layers,
                };
                layer = Some(LayerRef { stack, index: idx });
                module_start = i + 2;
                break;
            }
        }
    }
    let module = if layer.is_some() {
        module_segs[module_start..].join(".")
    } else {
        module_segs.join(".")
    };
    let module = strip_adapter_container(&module);
    TensorLocation {
        layer,
        module,
        role,
        module_path: module_segs.join("."),
    }
}

/// For AdapterHub names the module path ends in `adapters.{name}`; keep it (it identifies the placement),
/// and drop PEFT's `base_layer` wrapper (a LoRA-wrapped linear's own bias).
fn strip_adapter_container(module: &str) -> String {
    module
        .strip_suffix(".base_layer")
        .unwrap_or(module)
        .to_string()
}

/// Returns the role and the index of the first segment that belongs to the role suffix.
fn parse_role(segs: &[&str]) -> (Role, usize) {
    let n = segs.len();
    // LoRA: `...{lora_A|lora_B}[.{adapter}].weight` ; embeddings: `lora_embedding_A[.{adapter}]`.
    for (i, s) in segs.iter().enumerate().rev() {
        let role = match *s {
            "lora_A" => Some(Role::LoraA),
            "lora_B" => Some(Role::LoraB),
            "lora_embedding_A" => Some(Role::LoraEmbeddingA),
            "lora_embedding_B" => Some(Role::LoraEmbeddingB),
            "ia3_l" => Some(Role::Ia3),
            _ => None,
        };
        if let Some(r) = role {
            // Only a short tail may follow (adapter name and/or "weight").
            if n - i <= 3 {
                let start = if i > 0 && segs[i - 1] == "base_layer" {
                    i - 1
                } else {
                    i
                };
                return (r, start);
            }
        }
    }
    if n >= 1 && segs[n - 1] == "prompt_embeddings" {
        return (Role::PromptEmbeddings, n - 1);
    }
    // AdapterHub bottleneck: `adapter_down.0.{weight|bias}`, `adapter_up.{weight|bias}`.
    if n >= 2 {
        let last = segs[n - 1];
        if let Some(pos) = segs.iter().rposition(|s| *s == "adapter_down") {
            if n - pos <= 3 {
                let r = if last == "bias" {
                    Role::AdapterDownBias
                } else {
                    Role::AdapterDownWeight
                };
                return (r, pos);
            }
        }
        if segs[n - 2] == "adapter_up" {
            let r = if last == "bias" {
                Role::AdapterUpBias
            } else {
                Role::AdapterUpWeight
            };
            return (r, n - 2);
        }
        if last == "bias" {
            return (Role::Bias, n - 1);
        }
        if last == "weight" {
            return (Role::Other("weight".into()), n - 1);
        }
    }
    if n == 0 {
        return (Role::Other(String::new()), 0);
    }
    (Role::Other(segs[n - 1].to_string()), n - 1)
}

/// One per-layer part of prefix tuning's `prompt_embeddings` (num_virtual_tokens x (num_layers * 2 *
/// token_dim)): for layer `i`, the key prefix is columns `[2i*d, (2i+1)*d)` and the value prefix columns
/// `[(2i+1)*d, (2i+2)*d)`, as PEFT views and permutes it into `past_key_values`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixPart {
    pub layer: usize,
    /// 0 for the key prefix, 1 for the value prefix.
    pub kv: usize,
    pub col_start: usize,
    pub col_end: usize,
}

/// The per-layer key/value parts of a prefix table with `num_layers` layers and width `token_dim`.
pub fn prefix_parts(num_layers: usize, token_dim: usize) -> Vec<PrefixPart> {
    let mut v = Vec::with_capacity(num_layers * 2);
    for layer in 0..num_layers {
        for kv in 0..2 {
            let c = (2 * layer + kv) * token_dim;
            v.push(PrefixPart {
                layer,
                kv,
                col_start: c,
                col_end: c + token_dim,
            });
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(n: &str) -> (Option<(Stack, usize)>, String, Role) {
        let l = parse_tensor_name(n);
        (l.layer.map(|l| (l.stack, l.index)), l.module, l.role)
    }

    #[test]
    fn bert_lora() {
        assert_eq!(
            loc("base_model.model.encoder.layer.3.attention.self.query.lora_A.weight"),
            (
                Some((Stack::Encoder, 3)),
                "attention.self.query".into(),
                Role::LoraA
            )
        );
        assert_eq!(
            loc("base_model.model.encoder.layer.11.output.dense.lora_B.default.weight"),
            (
                Some((Stack::Encoder, 11)),
                "output.dense".into(),
                Role::LoraB
            )
        );
        let l = parse_tensor_name(
            "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight",
        );
        assert_eq!(l.module_path, "encoder.layer.0.attention.self.query");
    }

    #[test]
    fn bias_all_and_globals() {
        assert_eq!(
            loc("base_model.model.encoder.layer.0.attention.output.dense.base_layer.bias"),
            (
                Some((Stack::Encoder, 0)),
                "attention.output.dense".into(),
                Role::Bias
            )
        );
        assert_eq!(
            loc("base_model.model.embeddings.LayerNorm.bias"),
            (None, "embeddings.LayerNorm".into(), Role::Bias)
        );
        assert_eq!(
            loc("prompt_embeddings"),
            (None, "".into(), Role::PromptEmbeddings)
        );
    }

    /// PEFT LoRA names of the decoder families people share: Qwen2 and Mistral (Llama's names), Gemma 1/2,
    /// and Gemma 3 under its multimodal wrapper (`language_model`, in both orders transformers has used).
    #[test]
    fn qwen2_mistral_and_gemma_lora_names() {
        for (name, layer, module) in [
            (
                "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight",
                0,
                "self_attn.k_proj",
            ),
            (
                "base_model.model.model.layers.17.mlp.gate_proj.lora_B.weight",
                17,
                "mlp.gate_proj",
            ),
            (
                "base_model.model.model.language_model.layers.3.self_attn.o_proj.lora_A.weight",
                3,
                "self_attn.o_proj",
            ),
            (
                "base_model.model.language_model.model.layers.25.mlp.down_proj.lora_B.weight",
                25,
                "mlp.down_proj",
            ),
        ] {
            let (l, m, _) = loc(name);
            assert_eq!(
                (l, m.as_str()),
                (Some((Stack::Layers, layer)), module),
                "{name}"
            );
        }
    }

    #[test]
    fn llama_t5_gpt2() {
        assert_eq!(
            loc("base_model.model.model.layers.31.self_attn.q_proj.lora_A.weight"),
            (
                Some((Stack::Layers, 31)),
                "self_attn.q_proj".into(),
                Role::LoraA
            )
        );
        assert_eq!(
            loc("base_model.model.encoder.block.2.layer.0.SelfAttention.q.lora_B.weight"),
            (
                Some((Stack::Encoder, 2)),
                "layer.0.SelfAttention.q".into(),
                Role::LoraB
            )
        );
        assert_eq!(
            loc("base_model.model.decoder.block.5.layer.1.EncDecAttention.v.lora_A.weight"),
            (
                Some((Stack::Decoder, 5)),
                "layer.1.EncDecAttention.v".into(),
                Role::LoraA
            )
        );
        assert_eq!(
            loc("base_model.model.transformer.h.7.attn.c_attn.lora_A.weight"),
            (Some((Stack::Layers, 7)), "attn.c_attn".into(), Role::LoraA)
        );
    }

    #[test]
    fn ia3_and_adapterhub() {
        assert_eq!(
            loc("base_model.model.encoder.layer.2.attention.self.key.ia3_l"),
            (
                Some((Stack::Encoder, 2)),
                "attention.self.key".into(),
                Role::Ia3
            )
        );
        assert_eq!(
            loc("bert.encoder.layer.4.output.adapters.sst-2.adapter_down.0.weight"),
            (
                Some((Stack::Encoder, 4)),
                "output.adapters.sst-2".into(),
                Role::AdapterDownWeight
            )
        );
        assert_eq!(
            loc("bert.encoder.layer.4.attention.output.adapters.a.adapter_up.bias"),
            (
                Some((Stack::Encoder, 4)),
                "attention.output.adapters.a".into(),
                Role::AdapterUpBias
            )
        );
    }

    proptest::proptest! {
        /// Any layer index, module path and role in any supported layout parses back to its parts.
        #[test]
        fn prop_layouts_parse(layout in 0usize..5, index in 0usize..200,
                              module in proptest::collection::vec("[a-z][a-z_]{0,8}", 1..4),
                              role in 0usize..5) {
            let module: Vec<String> = module.into_iter()
                .filter(|m| !matches!(m.as_str(), "layer" | "layers" | "block" | "h" | "base_layer" | "lora_a" | "bias" | "weight" | "ia3_l"))
                .collect();
            proptest::prop_assume!(!module.is_empty());
            let module = module.join(".");
            let (prefix, stack) = match layout {
                0 => ("base_model.model.encoder.layer", Stack::Encoder),
                1 => ("base_model.model.model.layers", Stack::Layers),
                2 => ("base_model.model.encoder.block", Stack::Encoder),
                3 => ("base_model.model.decoder.block", Stack::Decoder),
                _ => ("base_model.model.transformer.h", Stack::Layers),
            };
            let (suffix, want) = match role {
                0 => ("lora_A.weight", Role::LoraA),
                1 => ("lora_B.weight", Role::LoraB),
                2 => ("lora_A.default.weight", Role::LoraA),
                3 => ("ia3_l", Role::Ia3),
                _ => ("base_layer.bias", Role::Bias),
            };
            let name = format!("{prefix}.{index}.{module}.{suffix}");
            let loc = parse_tensor_name(&name);
            proptest::prop_assert_eq!(loc.layer, Some(LayerRef { stack, index }), "{}", name);
            proptest::prop_assert_eq!(&loc.module, &module, "{}", name);
            proptest::prop_assert_eq!(loc.role, want, "{}", name);
        }

        /// The parser never panics, whatever the name.
        #[test]
        fn prop_parser_total(name in "\\PC{0,80}") {
            let _ = parse_tensor_name(&name);
        }
    }

    #[test]
    fn prefix_split() {
        let p = prefix_parts(6, 384);
        assert_eq!(p.len(), 12);
        assert_eq!((p[0].col_start, p[0].col_end), (0, 384));
        assert_eq!((p[1].kv, p[1].col_start), (1, 384));
        assert_eq!((p[11].layer, p[11].kv, p[11].col_end), (5, 1, 4608));
    }
}
