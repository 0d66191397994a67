//! Task embeddings and the spaces they live in.
//!
//! **TuPaTE** (Zhou et al., EMNLP 2022): concatenate all tuned parameters of each Transformer layer into one
//! vector, then average those per-layer vectors over the layers. peftdb computes it in f32 whatever the
//! stored dtype, with this fixed order inside a layer:
//!
//! 1. tensors are keyed by their name relative to the layer (`{module}` then role, e.g.
//!    `attention.self.query` + `lora_A`), and sorted by that key in byte order;
//! 2. each tensor is flattened row-major (C order) and appended.
//!
//! Method specifics:
//! - **prefix tuning**: `prompt_embeddings` (tokens x (layers x 2 x dim)) is split per layer into its key and
//!   value parts (`crate::object::layout::prefix_parts`); a layer's vector is key (tokens x dim, row-major)
//!   then value.
//! - **prompt tuning** has no per-layer parameters: the whole prompt table is the single "layer".
//! - tensors outside the Transformer layers (the embedding LayerNorm bias and pooler bias that LoRA with
//!   `bias="all"` saves) are kept in the object but are not part of the embedding.
//! - modules PEFT saves whole (`modules_to_save`: a new `lm_head`, `score` or `classifier`) are kept in the
//!   object, exported with it, and never embedded, not even inside a layer: they are trained copies of
//!   base-model modules, not the adapter's tuned update, and their size would swamp it. The ΔW sketch
//!   skips them for the same reason.
//! - models with two stacks (T5 encoder + decoder) are averaged per stack and the stack averages are
//!   concatenated (encoder first).
//!
//! An object whose layers differ in shape (a LoRA `rank_pattern`, an adapter on some layers only with other
//! modules) cannot be averaged: [`tupate`] returns [`NoEmbedding`] with the reason, and the object is stored
//! without an embedding of this kind.
//!
//! A [`SpaceKey`] (base model, method, embedding kind, per-layer shape signature) names the set of embeddings
//! that are comparable with each other.

pub mod delta;

use crate::object::layout::{parse_tensor_name, prefix_parts, LayerRef, Role, Stack};
use crate::object::{LightweightObject, Method, MethodKind};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Kinds of embedding; the store keys embeddings (and spaces) by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum EmbeddingKind {
    /// TuPaTE: tuned parameters of each layer concatenated, averaged over layers ([`tupate`]).
    #[serde(rename = "tupate")]
    Tupate,
    /// LoRA only: a seeded sketch of the update delta-W = s B A of every module ([`delta_sketch`]);
    /// its cosine estimates the `delta` similarity, so a large zoo is searched through an index.
    #[serde(rename = "delta-sketch")]
    DeltaSketch,
}

impl EmbeddingKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EmbeddingKind::Tupate => "tupate",
            EmbeddingKind::DeltaSketch => "delta-sketch",
        }
    }
}

/// The identity of a space of comparable embeddings.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SpaceKey {
    pub base_model: String,
    pub method: MethodKind,
    pub kind: EmbeddingKind,
    /// Per-layer shape signature: (tensor key relative to the layer, shape), in embedding order. For
    /// two-stack models, entries of the decoder stack are prefixed `decoder/`.
    pub signature: Vec<(String, Vec<usize>)>,
}

impl SpaceKey {
    /// Embedding dimension (sum of the signature's element counts).
    pub fn dim(&self) -> usize {
        self.signature
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// Canonical text of the key, hashed into [`SpaceKey::id`].
    pub fn canonical(&self) -> String {
        let mut s = format!(
            "peftdb-space-v1\n{}\n{}\n{}\n",
            self.base_model,
            self.method.as_str(),
            self.kind.as_str()
        );
        for (k, shape) in &self.signature {
            s.push_str(k);
            s.push(':');
            for (i, d) in shape.iter().enumerate() {
                if i > 0 {
                    s.push('x');
                }
                s.push_str(&d.to_string());
            }
            s.push('\n');
        }
        s
    }

    /// Stable 64-bit id: the first 8 bytes (little-endian) of BLAKE3 of [`SpaceKey::canonical`].
    pub fn id(&self) -> SpaceId {
        let h = blake3::hash(self.canonical().as_bytes());
        SpaceId(u64::from_le_bytes(
            h.as_bytes()[..8].try_into().expect("8 bytes"),
        ))
    }

    /// Human-readable label, e.g. `lora/12288d@sentence-transformers/all-MiniLM-L6-v2`.
    pub fn label(&self) -> String {
        match self.kind {
            EmbeddingKind::Tupate => format!("{}/{}d@{}", self.method, self.dim(), self.base_model),
            k => format!(
                "{}/{}/{}d@{}",
                self.method,
                k.as_str(),
                self.dim(),
                self.base_model
            ),
        }
    }
}

/// A space's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SpaceId(pub u64);

impl fmt::Display for SpaceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl std::str::FromStr for SpaceId {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        u64::from_str_radix(s, 16).map(SpaceId)
    }
}

/// An embedding and its space.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedding {
    pub space: SpaceKey,
    pub vector: Vec<f32>,
}

/// Why an object has no embedding of a kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoEmbedding {
    pub reason: String,
}

impl fmt::Display for NoEmbedding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

fn role_key(role: &Role) -> String {
    match role {
        Role::LoraA => "lora_A".into(),
        Role::LoraB => "lora_B".into(),
        Role::LoraEmbeddingA => "lora_embedding_A".into(),
        Role::LoraEmbeddingB => "lora_embedding_B".into(),
        Role::Ia3 => "ia3_l".into(),
        Role::Bias => "bias".into(),
        Role::AdapterDownWeight => "adapter_down.weight".into(),
        Role::AdapterDownBias => "adapter_down.bias".into(),
        Role::AdapterUpWeight => "adapter_up.weight".into(),
        Role::AdapterUpBias => "adapter_up.bias".into(),
        Role::PromptEmbeddings => "prompt_embeddings".into(),
        Role::Other(s) => s.clone(),
    }
}

/// The key of a tensor inside its layer (the sort key of the embedding order).
pub fn layer_key(module: &str, role: &Role) -> String {
    if module.is_empty() {
        role_key(role)
    } else {
        format!("{module}.{}", role_key(role))
    }
}

/// The delta-W sketch of a LoRA adapter ([`delta::DeltaSketch`] with its default seed and size): one
/// `p x q` block per adapted module, in module-path order. Its space is keyed by the module paths, so
/// adapters of the same modules share it. `None` for other methods.
pub fn delta_sketch(obj: &LightweightObject) -> Option<Result<Embedding, NoEmbedding>> {
    if obj.method.kind() != MethodKind::Lora {
        return None;
    }
    Some(match delta::LoraDelta::from_object(obj) {
        Ok(d) => delta_sketch_of(&d, &obj.base_model),
        Err(e) => Err(NoEmbedding { reason: e.0 }),
    })
}

/// [`delta_sketch`] of an update already collected from its factors, for adapters of `base_model`.
pub fn delta_sketch_of(
    delta: &delta::LoraDelta,
    base_model: &str,
) -> Result<Embedding, NoEmbedding> {
    let sk = delta::DeltaSketch::default();
    let (paths, vector) = sk.sketch(delta);
    if !vector.iter().all(|v| v.is_finite()) {
        return Err(NoEmbedding {
            reason: "the LoRA update has values that are not finite".into(),
        });
    }
    Ok(Embedding {
        space: SpaceKey {
            base_model: base_model.to_string(),
            method: MethodKind::Lora,
            kind: EmbeddingKind::DeltaSketch,
            signature: paths.into_iter().map(|p| (p, vec![sk.p, sk.q])).collect(),
        },
        vector,
    })
}

/// Compute the TuPaTE embedding of an object.
pub fn tupate(obj: &LightweightObject) -> Result<Embedding, NoEmbedding> {
    let kind = obj.method.kind();
    let (signature, vector) = match &obj.method {
        Method::Prefix(c) => {
            let t = &obj.tensors[0];
            let vals = t.to_f32();
            let rows = c.num_virtual_tokens;
            let width = c.num_layers * 2 * c.token_dim;
            let d = c.token_dim;
            let mut acc = vec![0f64; 2 * rows * d];
            for part in prefix_parts(c.num_layers, c.token_dim) {
                for row in 0..rows {
                    let src = &vals[row * width + part.col_start..row * width + part.col_end];
                    let dst =
                        &mut acc[part.kv * rows * d + row * d..part.kv * rows * d + (row + 1) * d];
                    for (a, v) in dst.iter_mut().zip(src) {
                        *a += *v as f64;
                    }
                }
            }
            let l = c.num_layers as f64;
            let vector = acc.into_iter().map(|v| (v / l) as f32).collect();
            let sig = vec![
                ("prefix.key".to_string(), vec![rows, d]),
                ("prefix.value".to_string(), vec![rows, d]),
            ];
            (sig, vector)
        }
        Method::Prompt(_) => {
            let t = &obj.tensors[0];
            (
                vec![("prompt_embeddings".to_string(), t.shape.clone())],
                t.to_f32(),
            )
        }
        _ => layered(obj)?,
    };
    if vector.is_empty() {
        return Err(NoEmbedding {
            reason: "no tuned parameters inside Transformer layers".into(),
        });
    }
    Ok(Embedding {
        space: SpaceKey {
            base_model: obj.base_model.clone(),
            method: kind,
            kind: EmbeddingKind::Tupate,
            signature,
        },
        vector,
    })
}

#[allow(clippy::type_complexity)]
fn layered(obj: &LightweightObject) -> Result<(Vec<(String, Vec<usize>)>, Vec<f32>), NoEmbedding> {
    // stack -> layer -> [(key, tensor index)]
    let mut stacks: BTreeMap<Stack, BTreeMap<usize, Vec<(String, usize)>>> = BTreeMap::new();
    // Saved modules (`modules_to_save`) are whole trained copies, not the adapter's tuned parameters.
    let saved = obj.saved_modules();
    for (i, t) in obj.tensors.iter().enumerate() {
        if crate::object::is_saved_module_tensor(&t.name, &saved) {
            continue;
        }
        let loc = parse_tensor_name(&t.name);
        if let Some(LayerRef { stack, index }) = loc.layer {
            stacks
                .entry(stack)
                .or_default()
                .entry(index)
                .or_default()
                .push((layer_key(&loc.module, &loc.role), i));
        }
    }
    if stacks.is_empty() {
        return Err(NoEmbedding {
            reason: "no tensor belongs to a Transformer layer (no encoder.layer.{i} / layers.{i} / block.{i} / h.{i} in any name)".into(),
        });
    }
    let multi = stacks.len() > 1;
    let mut signature = Vec::new();
    let mut vector = Vec::new();
    for (stack, layers) in &mut stacks {
        let prefix = if multi && *stack == Stack::Decoder {
            "decoder/"
        } else {
            ""
        };
        let mut first_sig: Option<(usize, Vec<(String, Vec<usize>)>)> = None;
        let mut acc: Vec<f64> = Vec::new();
        for (layer, entries) in layers.iter_mut() {
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            let sig: Vec<(String, Vec<usize>)> = entries
                .iter()
                .map(|(k, i)| (k.clone(), obj.tensors[*i].shape.clone()))
                .collect();
            match &first_sig {
                None => first_sig = Some((*layer, sig)),
                Some((l0, s0)) => {
                    if *s0 != sig {
                        return Err(NoEmbedding {
                            reason: describe_difference(*l0, s0, *layer, &sig),
                        });
                    }
                }
            }
            // The layer's tensors, concatenated in key order, added into the running sum.
            if acc.is_empty() {
                let len = entries
                    .iter()
                    .map(|(_, i)| obj.tensors[*i].values_len())
                    .sum();
                acc = vec![0f64; len];
            }
            let mut at = 0;
            for (_, i) in entries.iter() {
                let t = &obj.tensors[*i];
                let end = (at + t.values_len()).min(acc.len());
                t.add_to_f64(&mut acc[at..end]);
                at = end;
            }
        }
        let n = layers.len() as f64;
        vector.extend(acc.into_iter().map(|v| (v / n) as f32));
        let (_, sig) = first_sig.expect("non-empty stack");
        signature.extend(sig.into_iter().map(|(k, s)| (format!("{prefix}{k}"), s)));
    }
    Ok((signature, vector))
}

fn describe_difference(
    l0: usize,
    s0: &[(String, Vec<usize>)],
    l1: usize,
    s1: &[(String, Vec<usize>)],
) -> String {
    for (a, b) in s0.iter().zip(s1) {
        if a.0 != b.0 {
            return format!(
                "layers differ in their tensors (layer {l0} has {:?} where layer {l1} has {:?}), so per-layer vectors cannot be averaged",
                a.0, b.0
            );
        }
        if a.1 != b.1 {
            return format!(
                "layers differ in shape ({} is {:?} in layer {l0} but {:?} in layer {l1}, e.g. a LoRA rank_pattern), so per-layer vectors cannot be averaged",
                a.0, a.1, b.1
            );
        }
    }
    format!(
        "layers differ in their number of tensors (layer {l0}: {}, layer {l1}: {}), so per-layer vectors cannot be averaged",
        s0.len(),
        s1.len()
    )
}

/// Cosine similarity of two vectors (0 when either is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        dot += (*x as f64) * (*y as f64);
        na += (*x as f64) * (*x as f64);
        nb += (*y as f64) * (*y as f64);
    }
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        (dot / (na.sqrt() * nb.sqrt())) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::object::{AdapterFormat, LoraBias, LoraConfig, Tensor};
    use proptest::prelude::*;

    fn lora_obj(layers: &[Vec<f32>], r: usize, d: usize) -> LightweightObject {
        let mut tensors = Vec::new();
        for (i, vals) in layers.iter().enumerate() {
            let (a, b) = vals.split_at(r * d);
            tensors.push(Tensor::from_f32(
                format!("base_model.model.encoder.layer.{i}.attention.self.query.lora_A.weight"),
                vec![r, d],
                a,
            ));
            tensors.push(Tensor::from_f32(
                format!("base_model.model.encoder.layer.{i}.attention.self.query.lora_B.weight"),
                vec![d, r],
                b,
            ));
        }
        LightweightObject {
            method: Method::Lora(LoraConfig {
                r,
                alpha: 8.0,
                use_rslora: false,
                rank_pattern: Default::default(),
                alpha_pattern: Default::default(),
                target_modules: vec!["query".into()],
                bias: LoraBias::None,
            }),
            base_model: "m".into(),
            format: AdapterFormat::Peft,
            tensors,
            metadata: None,
            config_json: b"{}".to_vec(),
        }
    }

    proptest! {
        /// An object whose layers are identical embeds to one layer's vector.
        #[test]
        fn identical_layers_embed_to_one_layer(vals in proptest::collection::vec(-10f32..10f32, 2 * 2 * 3),
                                               n_layers in 1usize..6) {
            let layers = vec![vals.clone(); n_layers];
            let e = tupate(&lora_obj(&layers, 2, 3)).unwrap();
            prop_assert_eq!(e.vector.len(), vals.len());
            for (x, y) in e.vector.iter().zip(&vals) {
                prop_assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()));
            }
            prop_assert_eq!(e.space.dim(), vals.len());
        }

        /// The embedding is the mean of the per-layer vectors.
        #[test]
        fn embedding_is_layer_mean(l0 in proptest::collection::vec(-10f32..10f32, 12),
                                   l1 in proptest::collection::vec(-10f32..10f32, 12)) {
            let e = tupate(&lora_obj(&[l0.clone(), l1.clone()], 2, 3)).unwrap();
            for i in 0..12 {
                prop_assert!((e.vector[i] - (l0[i] + l1[i]) / 2.0).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn differing_layers_have_no_embedding() {
        let mut o = lora_obj(&[vec![1.0; 12], vec![1.0; 12]], 2, 3);
        o.tensors[2] = Tensor::from_f32(
            "base_model.model.encoder.layer.1.attention.self.query.lora_A.weight",
            vec![1, 3],
            &[1.0; 3],
        );
        let err = tupate(&o).unwrap_err();
        assert!(err.reason.contains("rank_pattern"), "{}", err.reason);
    }

    #[test]
    fn space_ids_are_stable_and_distinct() {
        let a = tupate(&lora_obj(&[vec![1.0; 12]], 2, 3)).unwrap().space;
        let mut b = a.clone();
        b.base_model = "other".into();
        assert_ne!(a.id(), b.id());
        assert_eq!(a.id(), a.clone().id());
        assert_eq!(a.dim(), 12);
    }

    #[test]
    fn cosine_basics() {
        assert!((cosine(&[1.0, 0.0], &[1.0, 0.0]) - 1.0).abs() < 1e-6);
        assert!(cosine(&[1.0, 0.0], &[0.0, 1.0]).abs() < 1e-6);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 1.0]), 0.0);
    }
}
