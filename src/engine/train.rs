//! Few-shot training of a new adapter of any method.
//!
//! AdamW updates the adapter's parameters only (the base model's tensors are never variables); the loss is
//! the cross-entropy of the head-free label scores ([`super::scoring`]). Every `eval_every` steps the dev
//! accuracy is measured; the first evaluation is kept as the "early" checkpoint and the best one (highest
//! dev accuracy, earliest on ties) as "best"; training stops after `patience` evaluations without
//! improvement. With `keep_start` the starting adapter is evaluated first (step 0) and competes for
//! "best", so training never hands back worse on dev than where it started. Everything random
//! (initialisation, batch order) comes from one ChaCha8 stream seeded with `seed`, and candle's CPU
//! kernels reduce in a fixed order, so the same seed gives bit-identical adapters on CPU.
//!
//! Initialisation of new adapters (as the methods' papers / PEFT do, where it fits this model):
//! - LoRA: A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's Kaiming-uniform), B = 0; default r = 8, alpha = 16 on
//!   query and value.
//! - IA3: ones, on key, value and output.dense (output.dense is a feed-forward module: input scaling).
//! - Prefix tuning: N(0, 0.02) key/value prefixes, 20 virtual tokens (on a grouped-query decoder, as wide as
//!   its key/value heads, PEFT's layout).
//! - Prompt tuning: the word embeddings of 20 vocabulary tokens sampled with the seed (Lester et al.).
//! - BitFit: the base model's own biases (every linear layer's and layer norm's, and the embeddings'
//!   layer norm), which training then moves.
//! - Bottleneck (Houlsby): down ~ N(0, 0.02), up = 0, biases 0, so the adapter starts as the identity;
//!   default bottleneck 32 (reduction factor 12 on hidden 384), ReLU.
//!
//! Default learning rates (AdamW, batch 8): LoRA, BitFit, bottleneck 5e-4; IA3 3e-3 (T-Few); prefix 5e-3
//! and prompt 3e-2 (soft prompts need larger steps).

use super::adapters::AdapterSet;
use super::error::{EngineError, EngineResult};
use super::model::{Grad, LN_SLOTS};
use super::scoring::{cross_entropy, ScoreOptions, DEFAULT_TEMPERATURE};
use super::tokenize::TokenIds;
use super::{Backbone, Engine};
use crate::object::build::build_object_for;
use crate::object::{
    BitFitConfig, BottleneckConfig, Ia3Config, LightweightObject, LoraBias, LoraConfig, Method,
    MethodKind, PrefixConfig, PromptConfig, Tensor as StoredTensor,
};
use crate::task::{shuffle, Example};
use candle_core::{DType, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// What kind of adapter to create, and its size.
#[derive(Debug, Clone)]
pub struct MethodSpec {
    pub kind: MethodKind,
    /// LoRA rank.
    pub r: usize,
    /// LoRA alpha.
    pub alpha: f64,
    pub use_rslora: bool,
    /// Target modules (LoRA, IA3); `None` for the method's default.
    pub targets: Option<Vec<String>>,
    /// IA3 feed-forward modules (input scaling); `None` for the default (`output.dense`).
    pub feedforward_modules: Option<Vec<String>>,
    /// Virtual tokens of prefix / prompt tuning.
    pub num_virtual_tokens: usize,
    /// Bottleneck width; `None` for hidden / 12.
    pub bottleneck_size: Option<usize>,
    pub non_linearity: String,
    /// Name of a bottleneck adapter (in its tensor names).
    pub adapter_name: String,
}

impl MethodSpec {
    /// The defaults for a method.
    pub fn new(kind: MethodKind) -> MethodSpec {
        MethodSpec {
            kind,
            r: 8,
            alpha: 16.0,
            use_rslora: false,
            targets: None,
            feedforward_modules: None,
            num_virtual_tokens: 20,
            bottleneck_size: None,
            non_linearity: "relu".into(),
            adapter_name: "peftdb".into(),
        }
    }

    /// The default learning rate of a method (see the module docs).
    pub fn default_lr(kind: MethodKind) -> f64 {
        match kind {
            MethodKind::Lora | MethodKind::Bitfit | MethodKind::Adapter => 5e-4,
            MethodKind::Ia3 => 3e-3,
            MethodKind::Prefix => 5e-3,
            MethodKind::Prompt => 3e-2,
        }
    }
}

/// Training options.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub spec: MethodSpec,
    /// Start from this adapter (a stored object or a PEFT folder) instead of a fresh one; its method
    /// and sizes then replace `spec`'s.
    pub init: Option<LightweightObject>,
    /// `None` for [`MethodSpec::default_lr`].
    pub lr: Option<f64>,
    pub weight_decay: f64,
    pub batch_size: usize,
    /// Stop after this many steps; `None` runs `epochs` epochs.
    pub max_steps: Option<usize>,
    pub epochs: usize,
    /// Evaluate on dev every this many steps (and after the last step).
    pub eval_every: usize,
    /// Stop after this many evaluations without a better dev accuracy; `None` never stops early.
    pub patience: Option<usize>,
    pub seed: u64,
    pub temperature: f64,
    /// Batch size of evaluation.
    pub eval_batch_size: usize,
    /// Base model name written into the adapter's config; `None` for the model folder's name.
    pub base_model_name: Option<String>,
    /// Evaluate the starting adapter on dev before the first step and keep it as a checkpoint (step 0):
    /// the best checkpoint is then never worse on dev than where training started, so a good
    /// initialization is not trained away. A fresh adapter starts as the bare model (LoRA's B is zero).
    pub keep_start: bool,
}

impl TrainConfig {
    pub fn new(kind: MethodKind) -> TrainConfig {
        TrainConfig {
            spec: MethodSpec::new(kind),
            init: None,
            lr: None,
            weight_decay: 0.0,
            batch_size: 8,
            max_steps: None,
            epochs: 10,
            eval_every: 10,
            patience: Some(5),
            seed: 0,
            temperature: DEFAULT_TEMPERATURE,
            eval_batch_size: 64,
            base_model_name: None,
            keep_start: false,
        }
    }
}

/// The data of a training run: verbalizer texts and examples (label indices into `label_texts`).
#[derive(Debug, Clone, Copy)]
pub struct TrainData<'a> {
    pub label_texts: &'a [String],
    pub train: &'a [Example],
    pub dev: &'a [Example],
    pub test: Option<&'a [Example]>,
}

/// One dev evaluation.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalPoint {
    pub step: usize,
    pub dev_accuracy: f64,
    pub dev_loss: f64,
    /// Mean training loss since the previous evaluation (at step 0, with
    /// [`TrainConfig::keep_start`]: the start's loss on the training examples).
    pub train_loss: f64,
}

/// A saved state of the adapter.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub step: usize,
    pub object: LightweightObject,
    pub dev_accuracy: f64,
    pub test_accuracy: Option<f64>,
}

/// What [`train`] returns.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// The first evaluation's adapter.
    pub early: Checkpoint,
    /// The adapter with the best dev accuracy.
    pub best: Checkpoint,
    pub history: Vec<EvalPoint>,
    pub steps: usize,
    pub stopped_early: bool,
}

/// One checkpoint as [`TrainReport`] records it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointReport {
    pub step: usize,
    pub dev_accuracy: f64,
    /// Accuracy on the test split, when one was given.
    pub test_accuracy: Option<f64>,
    /// The adapter folder it was written to.
    pub path: std::path::PathBuf,
}

/// `train_report.json` (schema/train_report.schema.json): what `peftdb train` writes beside its `best`
/// and `early` adapter folders. Every field is required when read back.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainReport {
    pub task: String,
    pub method: String,
    pub train_examples: usize,
    pub steps: usize,
    pub stopped_early: bool,
    /// Wall-clock seconds of the training (model loading excluded).
    pub seconds: f64,
    pub batch_size: usize,
    pub lr: f64,
    /// Maximum tokens per text.
    pub max_len: usize,
    /// The precision of the frozen products it trained under (`--matmul`); reports written before the
    /// option existed have none, and were f32.
    #[serde(default)]
    pub matmul: super::MatmulPrecision,
    pub best: CheckpointReport,
    pub early: CheckpointReport,
    pub history: Vec<EvalPoint>,
}

impl TrainReport {
    /// The report of `outcome`, whose checkpoints were written to `out/best` and `out/early`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        task: &str,
        cfg: &TrainConfig,
        outcome: &TrainOutcome,
        train_examples: usize,
        seconds: f64,
        max_len: usize,
        matmul: super::MatmulPrecision,
        out: &std::path::Path,
    ) -> TrainReport {
        let ck = |c: &Checkpoint, name: &str| CheckpointReport {
            step: c.step,
            dev_accuracy: c.dev_accuracy,
            test_accuracy: c.test_accuracy,
            path: out.join(name),
        };
        TrainReport {
            task: task.to_string(),
            method: outcome.best.object.method.kind().as_str().to_string(),
            train_examples,
            steps: outcome.steps,
            stopped_early: outcome.stopped_early,
            seconds,
            batch_size: cfg.batch_size,
            // The rate `train` used: the given one, else the default of the method trained.
            lr: cfg
                .lr
                .unwrap_or_else(|| MethodSpec::default_lr(outcome.best.object.method.kind())),
            max_len,
            matmul,
            best: ck(&outcome.best, "best"),
            early: ck(&outcome.early, "early"),
            history: outcome.history.clone(),
        }
    }
}

/// Progress reports (the library never prints; the CLI draws bars from these).
#[derive(Debug, Clone)]
pub enum Progress {
    Step {
        step: usize,
        total: usize,
        loss: f32,
    },
    Eval(EvalPoint),
}

fn normal(rng: &mut ChaCha8Rng, std: f32) -> f32 {
    // Box-Muller.
    let u1: f32 = rng.random::<f32>().max(1e-12);
    let u2: f32 = rng.random::<f32>();
    std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}

fn matches_target(module_path: &str, targets: &[String]) -> bool {
    targets
        .iter()
        .any(|t| crate::object::module_matches(module_path, t))
}

/// A fresh adapter for `spec` on `engine`'s model: its method and initial tensors.
pub fn init_adapter(
    engine: &Engine,
    spec: &MethodSpec,
    rng: &mut ChaCha8Rng,
) -> EngineResult<(Method, Vec<StoredTensor>)> {
    let backbone = &engine.model;
    let (nl, h) = (backbone.num_layers(), backbone.hidden_size());
    let slots = backbone.linear_slots();
    let dims = |k: usize| backbone.linear_dims(k);
    let prefix = backbone.layer_prefix();
    let decoder = backbone.is_decoder();
    let bert = || {
        match backbone {
        Backbone::Encoder(m) => Ok(m),
        Backbone::Decoder(_) => Err(EngineError::InvalidArgument(format!(
            "{} training is not supported on decoder (Llama-family) models yet; use lora, ia3, prefix or prompt",
            spec.kind.as_str()
        ))),
    }
    };
    let default_targets = |bert: &[&str], llama: &[&str]| -> Vec<String> {
        let t = if decoder { llama } else { bert };
        t.iter().map(|s| s.to_string()).collect()
    };
    // Every linear layer a target list selects: its module path and (out, in) dimensions.
    let selected = |targets: &[String]| -> Vec<(String, (usize, usize))> {
        (0..nl)
            .flat_map(|i| slots.iter().enumerate().map(move |(k, slot)| (i, k, slot)))
            .map(|(i, k, slot)| (format!("{prefix}.{i}.{slot}"), dims(k)))
            .filter(|(path, _)| matches_target(path, targets))
            .collect()
    };
    let mut tensors = Vec::new();
    let method = match spec.kind {
        MethodKind::Lora => {
            if spec.r == 0 {
                return Err(EngineError::InvalidArgument(
                    "LoRA rank r must be at least 1".into(),
                ));
            }
            let targets = spec
                .targets
                .clone()
                .unwrap_or_else(|| default_targets(&["query", "value"], &["q_proj", "v_proj"]));
            for (path, (out, inp)) in selected(&targets) {
                let bound = 1.0 / (inp as f32).sqrt();
                let a: Vec<f32> = (0..spec.r * inp)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                tensors.push(StoredTensor::from_f32(
                    format!("base_model.model.{path}.lora_A.weight"),
                    vec![spec.r, inp],
                    &a,
                ));
                tensors.push(StoredTensor::from_f32(
                    format!("base_model.model.{path}.lora_B.weight"),
                    vec![out, spec.r],
                    &vec![0.0; out * spec.r],
                ));
            }
            if tensors.is_empty() {
                return Err(EngineError::InvalidArgument(format!(
                    "LoRA targets {targets:?} match no linear layer ({slots:?})"
                )));
            }
            Method::Lora(LoraConfig {
                r: spec.r,
                alpha: spec.alpha,
                use_rslora: spec.use_rslora,
                rank_pattern: Default::default(),
                alpha_pattern: Default::default(),
                target_modules: targets,
                bias: LoraBias::None,
            })
        }
        MethodKind::Ia3 => {
            // PEFT's defaults for BERT and for Llama.
            let targets = spec.targets.clone().unwrap_or_else(|| {
                default_targets(
                    &["key", "value", "output.dense"],
                    &["k_proj", "v_proj", "down_proj"],
                )
            });
            let ff = spec
                .feedforward_modules
                .clone()
                .unwrap_or_else(|| default_targets(&["output.dense"], &["down_proj"]));
            for (path, (out, inp)) in selected(&targets) {
                let shape = if matches_target(&path, &ff) {
                    vec![1, inp]
                } else {
                    vec![out, 1]
                };
                let n = shape[0] * shape[1];
                tensors.push(StoredTensor::from_f32(
                    format!("base_model.model.{path}.ia3_l"),
                    shape,
                    &vec![1.0; n],
                ));
            }
            if tensors.is_empty() {
                return Err(EngineError::InvalidArgument(format!(
                    "IA3 targets {targets:?} match no linear layer"
                )));
            }
            Method::Ia3(Ia3Config {
                target_modules: targets,
                feedforward_modules: ff,
            })
        }
        MethodKind::Prefix => {
            // Keys/values per layer: all heads' on an encoder, the key/value heads' on a grouped-query
            // decoder (as PEFT lays out a prefix for such models).
            let (heads, width) = match backbone {
                Backbone::Encoder(m) => (m.config.num_attention_heads, h),
                Backbone::Decoder(m) => {
                    (m.config.kv_heads, m.config.kv_heads * m.config.head_dim())
                }
            };
            let t = spec.num_virtual_tokens;
            if t == 0 {
                return Err(EngineError::InvalidArgument(
                    "prefix length must be at least 1".into(),
                ));
            }
            let v: Vec<f32> = (0..t * nl * 2 * width).map(|_| normal(rng, 0.02)).collect();
            tensors.push(StoredTensor::from_f32(
                "prompt_embeddings",
                vec![t, nl * 2 * width],
                &v,
            ));
            Method::Prefix(PrefixConfig {
                num_virtual_tokens: t,
                num_layers: nl,
                token_dim: width,
                num_attention_heads: heads,
                prefix_projection: false,
            })
        }
        MethodKind::Prompt => {
            // Rows of the word embeddings of random vocabulary tokens (past the first 1000, which hold
            // special and byte tokens), on encoders and decoders alike.
            let table = match backbone {
                Backbone::Encoder(m) => &m.word_embeddings,
                Backbone::Decoder(m) => m.word_embeddings(),
            };
            let vocab = table.dim(0)?;
            let t = spec.num_virtual_tokens;
            if t == 0 {
                return Err(EngineError::InvalidArgument(
                    "prompt length must be at least 1".into(),
                ));
            }
            let lo = 1000.min(vocab - 1);
            let ids: Vec<u32> = (0..t).map(|_| rng.random_range(lo..vocab) as u32).collect();
            let idx = Tensor::from_vec(ids, t, &engine.device)?;
            let rows = table.index_select(&idx, 0)?.to_dtype(DType::F32)?;
            let v = rows.flatten_all()?.to_vec1::<f32>()?;
            tensors.push(StoredTensor::from_f32("prompt_embeddings", vec![t, h], &v));
            Method::Prompt(PromptConfig {
                num_virtual_tokens: t,
                token_dim: h,
            })
        }
        MethodKind::Bitfit => {
            let bert = bert()?;
            let vals = |t: &Tensor| t.to_vec1::<f32>();
            tensors.push(StoredTensor::from_f32(
                "base_model.model.embeddings.LayerNorm.bias",
                vec![h],
                &vals(&bert.embeddings_norm.1)?,
            ));
            for (i, layer) in bert.layers.iter().enumerate() {
                for (k, slot) in slots.iter().enumerate() {
                    let b = &layer.linears[k].bias;
                    tensors.push(StoredTensor::from_f32(
                        format!("base_model.model.encoder.layer.{i}.{slot}.bias"),
                        vec![b.dims()[0]],
                        &vals(b)?,
                    ));
                }
                for (k, slot) in LN_SLOTS.iter().enumerate() {
                    tensors.push(StoredTensor::from_f32(
                        format!("base_model.model.encoder.layer.{i}.{slot}.bias"),
                        vec![h],
                        &vals(&layer.norms[k].1)?,
                    ));
                }
            }
            Method::Bitfit(BitFitConfig {})
        }
        MethodKind::Adapter => {
            bert()?;
            let b = spec.bottleneck_size.unwrap_or((h / 12).max(1));
            if b == 0 {
                return Err(EngineError::InvalidArgument(
                    "bottleneck size must be at least 1".into(),
                ));
            }
            if super::model::Activation::parse(&spec.non_linearity).is_none() {
                return Err(EngineError::InvalidArgument(format!(
                    "unknown non_linearity {:?} (relu, swish, gelu, tanh)",
                    spec.non_linearity
                )));
            }
            let name = &spec.adapter_name;
            if name.is_empty() || name.contains('.') {
                return Err(EngineError::InvalidArgument(format!(
                    "adapter name {name:?} must be non-empty and without dots"
                )));
            }
            for i in 0..nl {
                for place in ["attention.output", "output"] {
                    let p = format!("bert.encoder.layer.{i}.{place}.adapters.{name}");
                    let down: Vec<f32> = (0..b * h).map(|_| normal(rng, 0.02)).collect();
                    tensors.push(StoredTensor::from_f32(
                        format!("{p}.adapter_down.0.weight"),
                        vec![b, h],
                        &down,
                    ));
                    tensors.push(StoredTensor::from_f32(
                        format!("{p}.adapter_down.0.bias"),
                        vec![b],
                        &vec![0.0; b],
                    ));
                    tensors.push(StoredTensor::from_f32(
                        format!("{p}.adapter_up.weight"),
                        vec![h, b],
                        &vec![0.0; h * b],
                    ));
                    tensors.push(StoredTensor::from_f32(
                        format!("{p}.adapter_up.bias"),
                        vec![h],
                        &vec![0.0; h],
                    ));
                }
            }
            Method::Adapter(BottleneckConfig {
                name: name.clone(),
                hidden_size: h,
                bottleneck_size: b,
                non_linearity: spec.non_linearity.to_ascii_lowercase(),
                mh_adapter: true,
                output_adapter: true,
            })
        }
    };
    Ok((method, tensors))
}

struct Trainable {
    method: Method,
    names: Vec<String>,
    shapes: Vec<Vec<usize>>,
    vars: Vec<Var>,
}

impl Trainable {
    fn set(&self, engine: &Engine, detached: bool) -> EngineResult<AdapterSet> {
        let named: Vec<(String, Tensor)> = self
            .names
            .iter()
            .zip(&self.vars)
            .map(|(n, v)| {
                let t = if detached {
                    v.as_tensor().detach()
                } else {
                    v.as_tensor().clone()
                };
                (n.clone(), t)
            })
            .collect();
        AdapterSet::from_named(&engine.model, &self.method, &named)
    }

    fn snapshot(&self, base_model: &str, causal_lm: bool) -> EngineResult<LightweightObject> {
        let mut tensors = Vec::with_capacity(self.vars.len());
        for ((n, s), v) in self.names.iter().zip(&self.shapes).zip(&self.vars) {
            let vals = v.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            tensors.push(StoredTensor::from_f32(n.clone(), s.clone(), &vals));
        }
        Ok(build_object_for(
            self.method.clone(),
            base_model,
            tensors,
            causal_lm,
        ))
    }
}

fn rows<'a>(ids: &'a [TokenIds], idx: &[usize]) -> Vec<&'a [u32]> {
    idx.iter().map(|&i| ids[i].as_slice()).collect()
}

/// The base model name written into trained adapters: `cfg.base_model_name`, else the model folder's name.
fn base_model_name(engine: &Engine, cfg: &TrainConfig) -> String {
    cfg.base_model_name.clone().unwrap_or_else(|| {
        engine
            .model_dir
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "base-model".into())
    })
}

/// The adapter [`train`] starts from when `cfg.init` is `None`: the same seeded fresh adapter (for LoRA,
/// A random and B zero, so it computes exactly the bare model). This is the "from scratch"
/// initialization, as a PEFT-loadable object.
pub fn fresh_adapter(engine: &Engine, cfg: &TrainConfig) -> EngineResult<LightweightObject> {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let (method, tensors) = init_adapter(engine, &cfg.spec, &mut rng)?;
    Ok(build_object_for(
        method,
        &base_model_name(engine, cfg),
        tensors,
        engine.model.is_decoder(),
    ))
}

/// Train an adapter; see the module docs.
pub fn train(
    engine: &Engine,
    data: &TrainData<'_>,
    cfg: &TrainConfig,
    progress: &mut dyn FnMut(&Progress),
) -> EngineResult<TrainOutcome> {
    let nlab = data.label_texts.len();
    if nlab < 2 {
        return Err(EngineError::InvalidArgument(
            "training needs at least 2 labels".into(),
        ));
    }
    for (what, ex) in [("train", data.train), ("dev", data.dev)] {
        if ex.is_empty() {
            return Err(EngineError::InvalidArgument(format!(
                "the {what} set is empty"
            )));
        }
    }
    if let Some(e) = data
        .train
        .iter()
        .chain(data.dev)
        .chain(data.test.unwrap_or(&[]))
        .find(|e| e.label >= nlab)
    {
        return Err(EngineError::InvalidArgument(format!(
            "example label {} out of range for {nlab} labels",
            e.label
        )));
    }
    if cfg.batch_size == 0 || cfg.eval_every == 0 {
        return Err(EngineError::InvalidArgument(
            "batch size and eval_every must be at least 1".into(),
        ));
    }
    let lr = cfg.lr.unwrap_or_else(|| {
        MethodSpec::default_lr(
            cfg.init
                .as_ref()
                .map(|o| o.method.kind())
                .unwrap_or(cfg.spec.kind),
        )
    });
    if !(lr.is_finite() && lr > 0.0) {
        return Err(EngineError::InvalidArgument(format!(
            "learning rate {lr} must be positive"
        )));
    }
    let base_model = base_model_name(engine, cfg);
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let (method, init) = match &cfg.init {
        Some(obj) => {
            // Check it fits before training.
            engine.prepare(obj)?;
            (obj.method.clone(), obj.tensors.clone())
        }
        None => init_adapter(engine, &cfg.spec, &mut rng)?,
    };
    let mut vars = Vec::with_capacity(init.len());
    for t in &init {
        vars.push(Var::from_vec(
            t.to_f32(),
            t.shape.as_slice(),
            &engine.device,
        )?);
    }
    let tr = Trainable {
        method,
        names: init.iter().map(|t| t.name.clone()).collect(),
        shapes: init.iter().map(|t| t.shape.clone()).collect(),
        vars,
    };
    let train_set = tr.set(engine, false)?;
    let mut opt = AdamW::new(
        tr.vars.clone(),
        ParamsAdamW {
            lr,
            weight_decay: cfg.weight_decay,
            ..Default::default()
        },
    )?;

    // Tokenize once.
    let label_ids = engine.tokenize_labels(data.label_texts)?;
    let text_of = |ex: &[Example]| ex.iter().map(|e| e.text.clone()).collect::<Vec<_>>();
    let train_ids = engine.tokenize(&text_of(data.train))?;
    let dev_ids = engine.tokenize(&text_of(data.dev))?;
    let dev_targets: Vec<usize> = data.dev.iter().map(|e| e.label).collect();
    let score_opts = ScoreOptions {
        temperature: cfg.temperature,
        batch_size: cfg.eval_batch_size.max(1),
    };

    let n = data.train.len();
    let bs = cfg.batch_size.min(n);
    let per_epoch = n.div_ceil(bs);
    let total = cfg.max_steps.unwrap_or(cfg.epochs.max(1) * per_epoch);
    if total == 0 {
        return Err(EngineError::InvalidArgument("zero training steps".into()));
    }
    let mut order: Vec<usize> = Vec::new();
    let mut cursor = 0;
    let mut history = Vec::new();
    let mut early: Option<(usize, LightweightObject, f64)> = None;
    let mut best: Option<(usize, LightweightObject, f64)> = None;
    let mut since_best = 0;
    let mut loss_sum = 0.0f64;
    let mut loss_n = 0usize;
    let mut stopped_early = false;
    let mut step = 0;
    // One dev evaluation of the adapter as it stands.
    let dev_point = |step: usize, train_loss: f64| -> EngineResult<EvalPoint> {
        let eval_set = tr.set(engine, true)?;
        let scores = engine.score(Some(&eval_set), &label_ids, &dev_ids, &score_opts)?;
        Ok(EvalPoint {
            step,
            dev_accuracy: scores.accuracy(&dev_targets),
            dev_loss: scores.cross_entropy(&dev_targets),
            train_loss,
        })
    };
    if cfg.keep_start {
        // Before any step, the training loss is the start's loss on the training examples.
        let train_targets: Vec<usize> = data.train.iter().map(|e| e.label).collect();
        let train_loss = engine
            .score(
                Some(&tr.set(engine, true)?),
                &label_ids,
                &train_ids,
                &score_opts,
            )?
            .cross_entropy(&train_targets);
        let point = dev_point(0, train_loss)?;
        progress(&Progress::Eval(point.clone()));
        best = Some((
            0,
            tr.snapshot(&base_model, engine.model.is_decoder())?,
            point.dev_accuracy,
        ));
        history.push(point);
    }
    while step < total {
        if cursor >= order.len() {
            order = (0..n).collect();
            shuffle(&mut order, &mut rng);
            cursor = 0;
        }
        let end = (cursor + bs).min(order.len());
        let idx = &order[cursor..end];
        cursor = end;
        let tg: Vec<u32> = idx.iter().map(|&i| data.train[i].label as u32).collect();
        let tg = Tensor::from_vec(tg, idx.len(), &engine.device)?;
        let logits = engine.label_logits(
            Some(&train_set),
            &label_ids,
            &rows(&train_ids, idx),
            cfg.temperature,
            Grad::Yes,
        )?;
        let loss = cross_entropy(&logits, &tg)?;
        let grads = loss.backward()?;
        opt.step(&grads)?;
        let lv = loss.to_scalar::<f32>()?;
        if !lv.is_finite() {
            return Err(EngineError::InvalidArgument(format!(
                "training diverged at step {} (loss {lv}); lower the learning rate",
                step + 1
            )));
        }
        step += 1;
        loss_sum += lv as f64;
        loss_n += 1;
        progress(&Progress::Step {
            step,
            total,
            loss: lv,
        });
        if step % cfg.eval_every == 0 || step == total {
            let point = dev_point(step, loss_sum / loss_n.max(1) as f64)?;
            loss_sum = 0.0;
            loss_n = 0;
            progress(&Progress::Eval(point.clone()));
            let acc = point.dev_accuracy;
            history.push(point);
            if early.is_none() {
                early = Some((
                    step,
                    tr.snapshot(&base_model, engine.model.is_decoder())?,
                    acc,
                ));
            }
            if best.as_ref().map(|b| acc > b.2).unwrap_or(true) {
                best = Some((
                    step,
                    tr.snapshot(&base_model, engine.model.is_decoder())?,
                    acc,
                ));
                since_best = 0;
            } else {
                since_best += 1;
                if cfg.patience.map(|p| since_best >= p).unwrap_or(false) {
                    stopped_early = step < total;
                    break;
                }
            }
        }
    }
    let (Some(early), Some(best)) = (early, best) else {
        return Err(EngineError::InvalidArgument("no evaluation ran".into()));
    };
    let test_acc = |obj: &LightweightObject| -> EngineResult<Option<f64>> {
        let Some(test) = data.test else {
            return Ok(None);
        };
        let set = engine.prepare(obj)?;
        let ids = engine.tokenize(&text_of(test))?;
        let targets: Vec<usize> = test.iter().map(|e| e.label).collect();
        Ok(Some(
            engine
                .score(Some(&set), &label_ids, &ids, &score_opts)?
                .accuracy(&targets),
        ))
    };
    let best_test = test_acc(&best.1)?;
    let early_test = if early.0 == best.0 {
        best_test
    } else {
        test_acc(&early.1)?
    };
    Ok(TrainOutcome {
        early: Checkpoint {
            step: early.0,
            object: early.1,
            dev_accuracy: early.2,
            test_accuracy: early_test,
        },
        best: Checkpoint {
            step: best.0,
            object: best.1,
            dev_accuracy: best.2,
            test_accuracy: best_test,
        },
        history,
        steps: step,
        stopped_early,
    })
}
