//! Seeded synthetic adapters and zoos, for property tests, scale benchmarks and the generated demo.
//!
//! These are **not** trained adapters: values are drawn so that tasks of one group are closer to each other
//! than to other groups (value = group component + task component + per-object noise, each uniform in
//! [-1, 1) and weighted), which gives nearest-task search something to find. Real adapters come from the
//! engine's training; use these only where scale or randomness is the point.

use crate::object::{
    AdapterFormat, BitFitConfig, Ia3Config, LightweightObject, LoraBias, LoraConfig, Method,
    MethodKind, PrefixConfig, Tensor,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Shape of a BERT-style base model to generate adapters for.
#[derive(Debug, Clone)]
pub struct ModelShape {
    pub name: String,
    pub layers: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
}

impl ModelShape {
    /// BERT-base (12 layers, 768 hidden).
    pub fn bert_base() -> ModelShape {
        ModelShape {
            name: "bert-base-uncased".into(),
            layers: 12,
            hidden: 768,
            intermediate: 3072,
            heads: 12,
        }
    }
    /// all-MiniLM-L6-v2 (6 layers, 384 hidden).
    pub fn minilm() -> ModelShape {
        ModelShape {
            name: "sentence-transformers/all-MiniLM-L6-v2".into(),
            layers: 6,
            hidden: 384,
            intermediate: 1536,
            heads: 12,
        }
    }
}

/// Where an object sits in the synthetic task structure.
#[derive(Debug, Clone, Copy)]
pub struct Seeds {
    pub group: u64,
    pub task: u64,
    pub object: u64,
}

/// Fills values as 0.5 * group + 0.5 * task + 0.25 * noise (each uniform in [-1, 1)), scaled by `scale`.
struct Gen {
    g: ChaCha8Rng,
    t: ChaCha8Rng,
    o: ChaCha8Rng,
    scale: f32,
}

impl Gen {
    fn new(method: MethodKind, s: Seeds, scale: f32) -> Gen {
        let m = method as u64 * 0x9E37_79B9;
        Gen {
            g: ChaCha8Rng::seed_from_u64(s.group.wrapping_mul(31).wrapping_add(m)),
            t: ChaCha8Rng::seed_from_u64(s.task.wrapping_mul(131).wrapping_add(m).wrapping_add(7)),
            o: ChaCha8Rng::seed_from_u64(
                s.object.wrapping_mul(1031).wrapping_add(m).wrapping_add(13),
            ),
            scale,
        }
    }
    fn values(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let g = self.g.random::<f32>() * 2.0 - 1.0;
                let t = self.t.random::<f32>() * 2.0 - 1.0;
                let o = self.o.random::<f32>() * 2.0 - 1.0;
                self.scale * (0.5 * g + 0.5 * t + 0.25 * o)
            })
            .collect()
    }
}

fn config(v: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec_pretty(&v).expect("json serializes")
}

const P: &str = "base_model.model.encoder.layer";

/// A LoRA adapter (rank `r`, alpha 2r) on the given attention modules (`query`, `key`, `value`).
pub fn lora(m: &ModelShape, r: usize, targets: &[&str], s: Seeds) -> LightweightObject {
    let mut g = Gen::new(MethodKind::Lora, s, 0.05);
    let mut tensors = Vec::new();
    let mut sorted: Vec<&str> = targets.to_vec();
    sorted.sort();
    for i in 0..m.layers {
        for t in &sorted {
            let base = format!("{P}.{i}.attention.self.{t}");
            tensors.push(Tensor::from_f32(
                format!("{base}.lora_A.weight"),
                vec![r, m.hidden],
                &g.values(r * m.hidden),
            ));
            tensors.push(Tensor::from_f32(
                format!("{base}.lora_B.weight"),
                vec![m.hidden, r],
                &g.values(r * m.hidden),
            ));
        }
    }
    let targets = sorted.iter().map(|s| s.to_string()).collect();
    lora_object(&m.name, r, targets, None, tensors)
}

/// A PEFT LoRA object (alpha 2r, no bias, no patterns) around its tensors, with the
/// adapter_config.json PEFT writes for it.
fn lora_object(
    base_model: &str,
    r: usize,
    targets: Vec<String>,
    task_type: Option<&str>,
    tensors: Vec<Tensor>,
) -> LightweightObject {
    let cfg = LoraConfig {
        r,
        alpha: 2.0 * r as f64,
        use_rslora: false,
        rank_pattern: BTreeMap::new(),
        alpha_pattern: BTreeMap::new(),
        target_modules: targets,
        bias: LoraBias::None,
    };
    let config_json = config(json!({
        "peft_type": "LORA",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": 2 * r,
        "lora_dropout": 0.0,
        "target_modules": cfg.target_modules,
        "bias": "none",
        "use_rslora": false,
        "rank_pattern": {},
        "alpha_pattern": {},
        "fan_in_fan_out": false,
        "inference_mode": true,
        "task_type": task_type
    }));
    LightweightObject {
        method: Method::Lora(cfg),
        base_model: base_model.to_string(),
        format: AdapterFormat::Peft,
        tensors,
        metadata: Some(BTreeMap::from([("format".to_string(), "pt".to_string())])),
        config_json,
    }
}

/// The shape of a Llama-family decoder, for LoRAs of the seven linear layers.
#[derive(Debug, Clone)]
pub struct LlamaShape {
    pub name: String,
    pub layers: usize,
    pub hidden: usize,
    pub intermediate: usize,
    /// Output width of k_proj and v_proj (key/value heads x head size).
    pub kv_dim: usize,
}

impl LlamaShape {
    /// Llama-2-7B: 32 layers, hidden 4096, feed-forward 11008, full multi-head key/value.
    pub fn llama2_7b() -> LlamaShape {
        LlamaShape {
            name: "meta-llama/Llama-2-7b-hf".into(),
            layers: 32,
            hidden: 4096,
            intermediate: 11008,
            kv_dim: 4096,
        }
    }
    /// SmolLM2-135M: 30 layers, hidden 576, feed-forward 1536, 3 key/value heads of 64.
    pub fn smollm2_135m() -> LlamaShape {
        LlamaShape {
            name: "HuggingFaceTB/SmolLM2-135M-Instruct".into(),
            layers: 30,
            hidden: 576,
            intermediate: 1536,
            kv_dim: 192,
        }
    }
}

/// A PEFT LoRA (rank `r`, alpha 2r) of a Llama-family model on all seven linear layers
/// (`q_proj k_proj v_proj o_proj gate_proj up_proj down_proj`), stored in bf16 as LLM LoRAs usually are.
pub fn llama_lora(m: &LlamaShape, r: usize, s: Seeds) -> LightweightObject {
    let mut g = Gen::new(MethodKind::Lora, s, 0.05);
    let (h, f, kv) = (m.hidden, m.intermediate, m.kv_dim);
    // (module, in, out), in the byte order of the names (PEFT writes tensors sorted).
    let mut modules = [
        ("mlp.down_proj", f, h),
        ("mlp.gate_proj", h, f),
        ("mlp.up_proj", h, f),
        ("self_attn.k_proj", h, kv),
        ("self_attn.o_proj", h, h),
        ("self_attn.q_proj", h, h),
        ("self_attn.v_proj", h, kv),
    ];
    modules.sort();
    let bf16 = |name: String, shape: Vec<usize>, values: Vec<f32>| Tensor {
        name,
        dtype: crate::object::DType::BF16,
        shape,
        data: values
            .into_iter()
            .flat_map(|v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
    };
    let mut tensors = Vec::with_capacity(m.layers * modules.len() * 2);
    for i in 0..m.layers {
        for (module, inp, out) in modules {
            let base = format!("base_model.model.model.layers.{i}.{module}");
            tensors.push(bf16(
                format!("{base}.lora_A.weight"),
                vec![r, inp],
                g.values(r * inp),
            ));
            tensors.push(bf16(
                format!("{base}.lora_B.weight"),
                vec![out, r],
                g.values(out * r),
            ));
        }
    }
    let targets: Vec<String> = modules
        .iter()
        .map(|(m, _, _)| m.rsplit('.').next().unwrap_or(m).to_string())
        .collect();
    lora_object(&m.name, r, targets, Some("CAUSAL_LM"), tensors)
}

/// A BitFit bias set: every bias of every layer (query, key, value, attention output, both LayerNorms,
/// intermediate, output).
pub fn bitfit(m: &ModelShape, s: Seeds) -> LightweightObject {
    let mut g = Gen::new(MethodKind::Bitfit, s, 0.1);
    let mut tensors = Vec::new();
    for i in 0..m.layers {
        let mut biases: Vec<(String, usize)> = vec![
            ("attention.output.LayerNorm".into(), m.hidden),
            ("attention.output.dense".into(), m.hidden),
            ("attention.self.key".into(), m.hidden),
            ("attention.self.query".into(), m.hidden),
            ("attention.self.value".into(), m.hidden),
            ("intermediate.dense".into(), m.intermediate),
            ("output.LayerNorm".into(), m.hidden),
            ("output.dense".into(), m.hidden),
        ];
        biases.sort();
        for (module, n) in biases {
            tensors.push(Tensor::from_f32(
                format!("{P}.{i}.{module}.bias"),
                vec![n],
                &g.values(n),
            ));
        }
    }
    LightweightObject {
        method: Method::Bitfit(BitFitConfig {}),
        base_model: m.name.clone(),
        format: AdapterFormat::Bitfit,
        tensors,
        metadata: Some(BTreeMap::from([("format".to_string(), "pt".to_string())])),
        config_json: config(json!({
            "peft_type": "BITFIT",
            "peftdb_format": 1,
            "base_model_name_or_path": m.name,
        })),
    }
}

/// An IA3 adapter on key, value and the feed-forward output.
pub fn ia3(m: &ModelShape, s: Seeds) -> LightweightObject {
    let mut g = Gen::new(MethodKind::Ia3, s, 0.1);
    let mut tensors = Vec::new();
    for i in 0..m.layers {
        for (module, shape) in [
            ("attention.self.key", vec![m.hidden, 1]),
            ("attention.self.value", vec![m.hidden, 1]),
            ("output.dense", vec![1, m.intermediate]),
        ] {
            let n = shape.iter().product();
            let vals: Vec<f32> = g.values(n).into_iter().map(|v| 1.0 + v).collect();
            tensors.push(Tensor::from_f32(
                format!("{P}.{i}.{module}.ia3_l"),
                shape,
                &vals,
            ));
        }
    }
    LightweightObject {
        method: Method::Ia3(Ia3Config {
            target_modules: vec!["key".into(), "value".into(), "output.dense".into()],
            feedforward_modules: vec!["output.dense".into()],
        }),
        base_model: m.name.clone(),
        format: AdapterFormat::Peft,
        tensors,
        metadata: Some(BTreeMap::from([("format".to_string(), "pt".to_string())])),
        config_json: config(json!({
            "peft_type": "IA3",
            "base_model_name_or_path": m.name,
            "target_modules": ["key", "value", "output.dense"],
            "feedforward_modules": ["output.dense"],
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_ia3_weights": true,
            "task_type": null
        })),
    }
}

/// A prefix-tuning adapter with `tokens` virtual tokens.
pub fn prefix(m: &ModelShape, tokens: usize, s: Seeds) -> LightweightObject {
    let mut g = Gen::new(MethodKind::Prefix, s, 0.5);
    let width = m.layers * 2 * m.hidden;
    let t = Tensor::from_f32(
        "prompt_embeddings",
        vec![tokens, width],
        &g.values(tokens * width),
    );
    LightweightObject {
        method: Method::Prefix(PrefixConfig {
            num_virtual_tokens: tokens,
            num_layers: m.layers,
            token_dim: m.hidden,
            num_attention_heads: m.heads,
            prefix_projection: false,
        }),
        base_model: m.name.clone(),
        format: AdapterFormat::Peft,
        tensors: vec![t],
        metadata: Some(BTreeMap::from([("format".to_string(), "pt".to_string())])),
        config_json: config(json!({
            "peft_type": "PREFIX_TUNING",
            "base_model_name_or_path": m.name,
            "num_virtual_tokens": tokens,
            "num_layers": m.layers,
            "token_dim": m.hidden,
            "encoder_hidden_size": m.hidden,
            "num_attention_heads": m.heads,
            "num_transformer_submodules": 1,
            "prefix_projection": false,
            "inference_mode": true,
            "task_type": "FEATURE_EXTRACTION"
        })),
    }
}

/// One adapter of a generated zoo.
#[derive(Debug, Clone)]
pub struct ZooItem {
    pub task: String,
    pub group: String,
    pub method: MethodKind,
    pub path: PathBuf,
}

/// Generate a zoo on disk: `dir/<task>/<method>/` for each task and method, each with a `peftdb.json`
/// sidecar naming the task and its group. Tasks `task-000`.. are spread over `groups` groups.
pub fn write_zoo(
    dir: &Path,
    m: &ModelShape,
    tasks: usize,
    groups: usize,
    methods: &[MethodKind],
    seed: u64,
) -> std::io::Result<Vec<ZooItem>> {
    let mut out = Vec::new();
    for t in 0..tasks {
        let task = format!("task-{t:03}");
        let group_ix = t % groups.max(1);
        let group = format!("group-{group_ix}");
        for (mi, method) in methods.iter().enumerate() {
            let s = Seeds {
                group: seed.wrapping_mul(1000).wrapping_add(group_ix as u64),
                task: seed.wrapping_mul(100_000).wrapping_add(t as u64),
                object: seed
                    .wrapping_mul(10_000_000)
                    .wrapping_add((t * 16 + mi) as u64),
            };
            let obj = match method {
                MethodKind::Lora => lora(m, 8, &["query", "value"], s),
                MethodKind::Bitfit => bitfit(m, s),
                MethodKind::Ia3 => ia3(m, s),
                MethodKind::Prefix => prefix(m, 20, s),
                other => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("synth has no generator for {other}"),
                    ))
                }
            };
            let path = dir.join(&task).join(method.as_str());
            crate::object::write_adapter(&obj, &path).map_err(std::io::Error::other)?;
            std::fs::write(
                path.join("peftdb.json"),
                serde_json::to_vec_pretty(
                    &json!({"task": task, "group": group, "train_size": 100 + 37 * t}),
                )
                .expect("json"),
            )?;
            out.push(ZooItem {
                task: task.clone(),
                group: group.clone(),
                method: *method,
                path,
            });
        }
    }
    Ok(out)
}
