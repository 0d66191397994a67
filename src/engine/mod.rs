//! The model engine: one interface over a BERT-family encoder or a Llama-family decoder (candle) that runs
//! any stored adapter, scores any task's labels without a task head, and trains new adapters.
//!
//! - [`Backbone`]: the network, `Encoder` ([`BertModel`], `model`) or `Decoder` ([`LlamaModel`], `llama`,
//!   loaded from GGUF). Everything above the engine (training, indicators, rerank, suggest, the transfer
//!   study) goes through [`Engine`] and never asks which.
//! - `adapters`: a [`LightweightObject`] turned into tensors the forward pass applies ([`AdapterSet`]).
//! - `tokenize`: `tokenizer.json` (or a GGUF's vocabulary), tokenize-once [`TokenIds`], padded [`Batch`]es.
//!   A decoder's inputs are wrapped in a prompt ([`EngineOptions::prompt`], default [`DEFAULT_PROMPT`]);
//!   labels are tokenized with [`Engine::tokenize_labels`].
//! - `scoring`: head-free label scoring. Encoders: the logit of label c is `cos(e(x), e(verbalizer_c)) / T`,
//!   both embeddings mean-pooled with the adapter applied. Decoders: the logit is the summed
//!   log-likelihood of `" " + verbalizer_c` after the prompt (times `0.05 / T`). Softmax gives P;
//!   cross-entropy on P is the training and indicator loss. Gradients of that loss w.r.t. an adapter's
//!   tensors (for GraNd) are exposed.
//! - [`train`]: few-shot training of a new adapter (AdamW on the adapter's parameters only, seeded and
//!   deterministic on CPU), returning the "early" and "best" checkpoints as PEFT objects.
//! - `device`: `--device cpu|cuda[:N]`.
//! - `kernels`: hand-written CPU kernels for the hot ops (candle custom ops with their backward passes).
//!
//! Status and limits (honest list):
//! - Checked against Hugging Face PEFT: the bare model, LoRA (r/alpha, rank_pattern, bias="all", rsLoRA),
//!   IA3, prefix and prompt tuning (tests/engine_fixtures.rs, all within 1e-5). BitFit and bottleneck
//!   adapters have no PEFT reference (PEFT has neither); their forward follows the semantics documented in
//!   `adapters` and their gradients are checked by finite differences.
//! - Bottleneck adapters always run with Houlsby placement (adapter on the sub-layer output, its own skip,
//!   then the layer's residual + layer norm); AdapterHub's `original_ln_before`/`residual_before_ln`
//!   variants (Pfeiffer) are not read from the config.
//! - RoBERTa-style configs load (position offset pad+1, `roberta.` prefix) but no RoBERTa model is tested.
//! - The CUDA path compiles with the `cuda` feature; the CPU kernels (`kernels`: attention, linear,
//!   LoRA-QKV, layer norm, GELU) fall back to candle's ops there.
//! - Accuracy after training is tested for LoRA and BitFit; IA3, prefix, prompt and bottleneck training
//!   is covered by the gradient check and (bottleneck) the determinism test only.
//! - Decoders (`tests/decoder.rs`, `tests/decoder_pipeline.rs`): the bare model and PEFT's LoRA (all seven
//!   linear layers), IA3, prefix and prompt tuning score labels as transformers + PEFT do (1e-4); LoRA and
//!   prefix gradients match finite differences; 16-shot LoRA, prompt and prefix adapters trained here load
//!   in PEFT with the same accuracy. BitFit and bottleneck adapters are refused on decoders with a clear
//!   error. Decoders score candidates one by one (no stacked pass) and run candle's composed attention (no
//!   fused CPU kernel: their linear layers use the engine's frozen-linear kernel); every label of an input
//!   shares one sequence (later tokens of multi-token labels packed after the prompt).
//!
//! ```no_run
//! # fn main() -> Result<(), peftdb::engine::EngineError> {
//! use peftdb::engine::{Engine, ScoreOptions};
//! use peftdb::task::Task;
//! let engine = Engine::load("models/all-MiniLM-L6-v2".as_ref(), &candle_core::Device::Cpu)?;
//! let task = Task::load("data/tasks/movie_sentiment".as_ref())?;
//! let probs = engine.label_probs(None, &task.label_texts(), &["a fine film"], &ScoreOptions::default())?;
//! # Ok(()) }
//! ```

pub(crate) mod adapters;
pub(crate) mod device;
pub(crate) mod error;
pub(crate) mod kernels;
pub(crate) mod llama;
pub(crate) mod model;
pub(crate) mod scoring;
pub(crate) mod tokenize;
pub(crate) mod train;

pub use adapters::AdapterSet;
pub use device::parse_device;
pub use error::{EngineError, EngineResult, LoadError};
#[doc(hidden)]
pub use kernels::set_enabled as set_cpu_kernels;
pub use kernels::tune_threads;
pub use llama::{hf_name as llama_hf_name, GgufVocab, LlamaConfig, LlamaModel};
pub use model::{BertConfig, BertModel, Grad};
pub use scoring::{
    cosine_logits, cross_entropy, AdapterGradients, LabelScores, ScoreOptions, DEFAULT_TEMPERATURE,
};
pub use tokenize::{batches, Batch, TextTokenizer, TokenIds, DEFAULT_MAX_LEN};
pub use train::{
    fresh_adapter, init_adapter, train, Checkpoint, CheckpointReport, EvalPoint, MethodSpec,
    Progress as TrainProgress, TrainConfig, TrainData, TrainOutcome, TrainReport,
};

use crate::object::LightweightObject;
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};

/// The default prompt of decoder models: `{text}` is the input text (truncated to `max_len` tokens);
/// each label's verbalizer (`" "` + its text) follows the prompt.
pub const DEFAULT_PROMPT: &str = "Input: {text}\nAnswer:";

/// Options of [`Engine::load_with`].
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Texts are truncated to this many tokens (encoders: special tokens included; decoders: the input
    /// text alone, before the prompt wraps it).
    pub max_len: usize,
    /// Decoder models: the prompt template around each input, with one `{text}` (default
    /// [`DEFAULT_PROMPT`]). Encoders ignore it.
    pub prompt: String,
    /// Decoder models: the dtype the frozen base's matrices (token embeddings, linear layers, head) are
    /// held in: f32 (default), or bf16 / f16 for half the memory. Activations, norms, biases and adapters
    /// stay f32, so training and scoring are unchanged up to the weights' rounding. Encoders take f32
    /// only.
    pub base_dtype: crate::dtype::DType,
    /// Encoder models on the CPU: the precision of the frozen base's matrix products (its six linear
    /// layers). [`MatmulPrecision::F32`] (default) is exact to PEFT's outputs;
    /// [`MatmulPrecision::Bf16`] rounds weights and inputs to bf16 (products exact, sums f32), which a
    /// CPU with AVX512-BF16 multiplies with twice the products per instruction. Measured cost and
    /// speed: README "Performance".
    pub matmul: MatmulPrecision,
}

/// The precision of an encoder's frozen matrix products on the CPU ([`EngineOptions::matmul`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MatmulPrecision {
    /// f32 operands (the default).
    #[default]
    F32,
    /// bf16 operands: the weights rounded once at load, each layer's input as it runs; exact
    /// products, f32 sums. Native on CPUs with AVX512-BF16 ([`bf16_native`]), at f32 speed elsewhere.
    Bf16,
}

impl MatmulPrecision {
    /// Parse `f32` or `bf16` (any case), as the CLI's `--matmul` takes it.
    pub fn parse(s: &str) -> EngineResult<MatmulPrecision> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(MatmulPrecision::F32),
            "bf16" => Ok(MatmulPrecision::Bf16),
            _ => Err(EngineError::InvalidArgument(format!(
                "matmul precision {s:?}: f32 (exact) or bf16 (faster on CPUs with AVX512-BF16)"
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MatmulPrecision::F32 => "f32",
            MatmulPrecision::Bf16 => "bf16",
        }
    }
}

/// Whether this CPU multiplies bf16 natively (AVX512-BF16), which makes [`MatmulPrecision::Bf16`]
/// faster than f32; without it the bf16 products run at f32 speed.
pub fn bf16_native() -> bool {
    kernels::bf16::native()
}

/// Parse a base dtype as the CLI's `--dtype` and Python's `Model(dtype=)` take it: `f32`, `bf16` or
/// `f16`, in any case.
pub fn parse_base_dtype(s: &str) -> EngineResult<crate::dtype::DType> {
    crate::dtype::DType::parse(&s.to_uppercase()).ok_or_else(|| {
        EngineError::InvalidArgument(format!(
            "dtype {s:?}: the base model's dtype is f32, bf16 or f16"
        ))
    })
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            max_len: tokenize::DEFAULT_MAX_LEN,
            prompt: DEFAULT_PROMPT.to_string(),
            base_dtype: crate::dtype::DType::F32,
            matmul: MatmulPrecision::F32,
        }
    }
}

/// The network behind an [`Engine`]: a BERT-family encoder (labels scored by the cosine of mean-pooled
/// embeddings) or a Llama-family decoder (labels scored by their verbalizers' log-likelihood after a
/// prompt). Everything above the engine (training, indicators, rerank, suggest) sees one interface.
#[derive(Debug, Clone)]
pub enum Backbone {
    Encoder(BertModel),
    Decoder(LlamaModel),
}

impl Backbone {
    pub fn device(&self) -> &Device {
        match self {
            Backbone::Encoder(m) => &m.device,
            Backbone::Decoder(m) => &m.device,
        }
    }

    pub fn is_decoder(&self) -> bool {
        matches!(self, Backbone::Decoder(_))
    }

    /// `BERT` or `Llama`, for messages.
    pub fn arch_name(&self) -> &'static str {
        match self {
            Backbone::Encoder(_) => "BERT",
            Backbone::Decoder(_) => "Llama",
        }
    }

    pub fn num_layers(&self) -> usize {
        match self {
            Backbone::Encoder(m) => m.config.num_hidden_layers,
            Backbone::Decoder(m) => m.config.layers,
        }
    }

    pub fn hidden_size(&self) -> usize {
        match self {
            Backbone::Encoder(m) => m.config.hidden_size,
            Backbone::Decoder(m) => m.config.hidden,
        }
    }

    /// The linear layers of one layer, by module path inside the layer (what PEFT's `target_modules`
    /// match), in the order [`AdapterSet`]'s `linears` use.
    pub fn linear_slots(&self) -> Vec<&'static str> {
        match self {
            Backbone::Encoder(_) => model::LINEAR_SLOTS.to_vec(),
            Backbone::Decoder(_) => llama::LINEAR_SLOTS.iter().map(|(s, _)| *s).collect(),
        }
    }

    /// (out, in) of linear slot `k`.
    pub fn linear_dims(&self, k: usize) -> (usize, usize) {
        match self {
            Backbone::Encoder(m) => {
                let (h, f) = (m.config.hidden_size, m.config.intermediate_size);
                match k {
                    model::INTER => (f, h),
                    model::OUT => (h, f),
                    _ => (h, h),
                }
            }
            Backbone::Decoder(m) => {
                let c = &m.config;
                let (h, f, kv) = (c.hidden, c.intermediate, c.kv_heads * c.head_dim());
                match k {
                    1 | 2 => (kv, h),
                    4 | 5 => (f, h),
                    6 => (h, f),
                    _ => (h, h),
                }
            }
        }
    }

    /// The layer-stack prefix of module paths (`encoder.layer` or `model.layers`).
    pub fn layer_prefix(&self) -> &'static str {
        match self {
            Backbone::Encoder(_) => "encoder.layer",
            Backbone::Decoder(_) => "model.layers",
        }
    }
}

/// How a decoder wraps inputs: the template's text before and after the input, and the tokenizer's start
/// token(s). The rendered prompt is tokenized as one string (so a space before the input merges with its
/// first word, as it would in any text), after the input is cut to `max_len` tokens.
#[derive(Debug, Clone)]
pub struct DecoderPrompt {
    pub template: String,
    before: String,
    after: String,
    start: Vec<u32>,
}

/// A loaded base model with its tokenizer, on one device.
#[derive(Debug, Clone)]
pub struct Engine {
    pub model: Backbone,
    pub tokenizer: TextTokenizer,
    pub device: Device,
    /// The model folder (for a GGUF file: the folder holding it).
    pub model_dir: PathBuf,
    /// Decoders: the prompt around each input.
    pub prompt: Option<DecoderPrompt>,
}

fn read_tokenizer(path: &Path) -> Result<tokenizers::Tokenizer, LoadError> {
    tokenizers::Tokenizer::from_file(path).map_err(|e| LoadError::Tokenizer {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// The GGUF file a model path names: the path itself when it is a file, else the one `*.gguf` in a
/// folder without `config.json`.
fn gguf_path(path: &Path) -> EngineResult<Option<PathBuf>> {
    if path.is_file() {
        return Ok(Some(path.to_path_buf()));
    }
    if !path.is_dir() || path.join("config.json").is_file() {
        return Ok(None);
    }
    let read = std::fs::read_dir(path).map_err(|source| EngineError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut found: Vec<PathBuf> = read
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|x| x.eq_ignore_ascii_case("gguf"))
        })
        .collect();
    found.sort();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(EngineError::InvalidArgument(format!(
            "{} holds {} GGUF files ({}); pass the one to load as --model",
            path.display(),
            found.len(),
            found
                .iter()
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

impl Engine {
    /// Load a Hugging Face model folder (config.json, model.safetensors or its shards, tokenizer.json) of
    /// a BERT-family encoder or a Llama-family decoder, or a Llama-family GGUF file (or a folder holding
    /// one, with an optional tokenizer.json beside it).
    pub fn load(model_dir: &Path, device: &Device) -> EngineResult<Engine> {
        Engine::load_with(model_dir, device, &EngineOptions::default())
    }

    pub fn load_with(
        model_dir: &Path,
        device: &Device,
        opts: &EngineOptions,
    ) -> EngineResult<Engine> {
        if !model_dir.exists() {
            return Err(EngineError::Io {
                path: model_dir.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such model folder or file (run scripts/fetch-model.sh for the test encoder, scripts/fetch-decoder.sh for the test decoder)",
                ),
            });
        }
        if device.is_cpu() {
            kernels::tune_threads();
        }
        let base = match opts.base_dtype {
            crate::dtype::DType::F32 => DType::F32,
            crate::dtype::DType::BF16 => DType::BF16,
            crate::dtype::DType::F16 => DType::F16,
        };
        let decoder_matmul = || {
            EngineError::InvalidArgument(format!(
                "{}: bf16 matrix products (--matmul bf16) are built for encoder models; a decoder's base can be held in bf16 with --dtype bf16",
                model_dir.display()
            ))
        };
        if let Some(gguf) = gguf_path(model_dir)? {
            if opts.matmul != MatmulPrecision::F32 {
                return Err(decoder_matmul());
            }
            return Engine::load_gguf(&gguf, device, base, opts);
        }
        let model_type = std::fs::read(model_dir.join("config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["model_type"].as_str().map(String::from));
        if model_type
            .as_deref()
            .is_some_and(|t| llama::HF_DECODER_TYPES.contains(&t))
        {
            if opts.matmul != MatmulPrecision::F32 {
                return Err(decoder_matmul());
            }
            return Engine::load_hf_decoder(model_dir, device, base, opts);
        }
        if base != DType::F32 {
            return Err(EngineError::InvalidArgument(format!(
                "{}: a {} base is built for decoder models only; load this encoder in f32 (drop --dtype)",
                model_dir.display(),
                opts.base_dtype.as_str().to_lowercase()
            )));
        }
        for file in ["config.json", "model.safetensors", "tokenizer.json"] {
            if !model_dir.join(file).is_file() {
                return Err(LoadError::ModelFileMissing {
                    dir: model_dir.to_path_buf(),
                    file,
                }
                .into());
            }
        }
        let mut model = BertModel::load(model_dir, device)?;
        if opts.matmul == MatmulPrecision::Bf16 {
            if !device.is_cpu() {
                return Err(EngineError::InvalidArgument(format!(
                    "{}: bf16 matrix products are a CPU option; on {device:?} load in f32 (drop --matmul)",
                    model_dir.display()
                )));
            }
            model.use_bf16_products()?;
        }
        let tokenizer = TextTokenizer::from_file(
            &model_dir.join("tokenizer.json"),
            opts.max_len.min(
                model
                    .config
                    .max_position_embeddings
                    .saturating_sub(model.config.position_offset()),
            ),
        )?;
        Ok(Engine {
            model: Backbone::Encoder(model),
            tokenizer,
            device: device.clone(),
            model_dir: model_dir.to_path_buf(),
            prompt: None,
        })
    }

    fn load_gguf(
        path: &Path,
        device: &Device,
        base: DType,
        opts: &EngineOptions,
    ) -> EngineResult<Engine> {
        let (model, vocab) = LlamaModel::from_gguf_as(path, device, base)?;
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let beside = dir.join("tokenizer.json");
        let (inner, tok_path) = if beside.is_file() {
            (read_tokenizer(&beside)?, beside)
        } else {
            (vocab.tokenizer(path)?, path.to_path_buf())
        };
        let pad = vocab.eos.unwrap_or(0);
        Engine::decoder(model, inner, &tok_path, pad, dir, device, opts)
    }

    fn load_hf_decoder(
        dir: &Path,
        device: &Device,
        base: DType,
        opts: &EngineOptions,
    ) -> EngineResult<Engine> {
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Err(LoadError::ModelFileMissing {
                dir: dir.to_path_buf(),
                file: "tokenizer.json",
            }
            .into());
        }
        let model = LlamaModel::from_hf_folder_as(dir, device, base)?;
        let inner = read_tokenizer(&tok_path)?;
        let pad = ["<|endoftext|>", "</s>", "<pad>", "<|end_of_text|>"]
            .iter()
            .find_map(|t| inner.token_to_id(t))
            .unwrap_or(0);
        Engine::decoder(
            model,
            inner,
            &tok_path,
            pad,
            dir.to_path_buf(),
            device,
            opts,
        )
    }

    /// A decoder engine: the prompt template tokenized once (with the tokenizer's own start token, if its
    /// post-processor adds one).
    fn decoder(
        model: LlamaModel,
        inner: tokenizers::Tokenizer,
        tok_path: &Path,
        pad: u32,
        dir: PathBuf,
        device: &Device,
        opts: &EngineOptions,
    ) -> EngineResult<Engine> {
        let tokenizer = TextTokenizer::from_tokenizer(inner, pad, opts.max_len, tok_path)?;
        let Some((before, after)) = opts.prompt.split_once("{text}") else {
            return Err(EngineError::InvalidArgument(format!(
                "the prompt template {:?} has no {{text}} for the input",
                opts.prompt
            )));
        };
        // A start token (Llama-2's <s>) is whatever the post-processor puts before a text.
        let plain = tokenizer.tokenize_full(&["a"])?.remove(0);
        let special = tokenizer.tokenize(&["a"])?.remove(0);
        let start = if special.len() > plain.len() && special.ends_with(&plain) {
            special[..special.len() - plain.len()].to_vec()
        } else {
            Vec::new()
        };
        let around = tokenizer
            .tokenize_full(&[format!("{before}{after}")])?
            .remove(0);
        if start.len() + around.len() + opts.max_len > model.config.max_positions {
            return Err(EngineError::InvalidArgument(format!(
                "prompt ({} tokens) plus max_len {} exceed the model's {} positions; lower max_len",
                start.len() + around.len(),
                opts.max_len,
                model.config.max_positions
            )));
        }
        Ok(Engine {
            model: Backbone::Decoder(model),
            tokenizer,
            device: device.clone(),
            model_dir: dir,
            prompt: Some(DecoderPrompt {
                template: opts.prompt.clone(),
                before: before.to_string(),
                after: after.to_string(),
                start,
            }),
        })
    }

    /// Prepare a stored adapter for the forward pass (checks every tensor's shape against this model).
    pub fn prepare(&self, obj: &LightweightObject) -> EngineResult<AdapterSet> {
        AdapterSet::from_object(&self.model, obj)
    }

    /// Tokenize input texts once (reuse the result across epochs and adapters). A decoder's inputs come
    /// wrapped in the prompt ([`EngineOptions::prompt`]), the text truncated to `max_len` tokens.
    pub fn tokenize<S: AsRef<str>>(&self, texts: &[S]) -> EngineResult<Vec<TokenIds>> {
        match &self.prompt {
            None => self.tokenizer.tokenize(texts),
            Some(p) => {
                let rendered: Vec<String> = texts
                    .iter()
                    .map(|t| {
                        let t = self.tokenizer.truncate_text(t.as_ref())?;
                        Ok(format!("{}{t}{}", p.before, p.after))
                    })
                    .collect::<EngineResult<_>>()?;
                Ok(self
                    .tokenizer
                    .tokenize_full(&rendered)?
                    .into_iter()
                    .map(|ids| [p.start.as_slice(), ids.as_slice()].concat())
                    .collect())
            }
        }
    }

    /// Tokenize the labels' verbalizer texts. Encoders embed them like inputs; a decoder scores each as
    /// the continuation `" " + text` after the prompt, so an empty one is refused.
    pub fn tokenize_labels<S: AsRef<str>>(&self, labels: &[S]) -> EngineResult<Vec<TokenIds>> {
        if self.prompt.is_none() {
            return self.tokenizer.tokenize(labels);
        }
        if let Some(i) = labels.iter().position(|l| l.as_ref().trim().is_empty()) {
            return Err(EngineError::InvalidArgument(format!(
                "the verbalizer of label {i} ({:?}) is empty; a decoder scores the label's text, so give it one",
                labels[i].as_ref()
            )));
        }
        let spaced: Vec<String> = labels.iter().map(|l| format!(" {}", l.as_ref())).collect();
        let ids = self.tokenizer.tokenize_full(&spaced)?;
        if let Some(i) = ids.iter().position(Vec::is_empty) {
            return Err(EngineError::InvalidArgument(format!(
                "the verbalizer of label {i} ({:?}) tokenizes to nothing; give it a non-empty text",
                labels[i].as_ref()
            )));
        }
        Ok(ids)
    }

    /// Pad token rows into a batch on this engine's device.
    pub fn batch(&self, rows: &[&[u32]]) -> EngineResult<Batch> {
        Batch::pad(rows, self.tokenizer.pad_id(), &self.device)
    }

    /// Mean-pooled embeddings (B, H) of a batch, with an optional adapter.
    pub fn embed(&self, batch: &Batch, adapter: Option<&AdapterSet>) -> EngineResult<Tensor> {
        Ok(self.embed_grad(batch, adapter, Grad::No)?)
    }

    pub(crate) fn embed_grad(
        &self,
        batch: &Batch,
        adapter: Option<&AdapterSet>,
        grad: Grad,
    ) -> candle_core::Result<Tensor> {
        match &self.model {
            Backbone::Encoder(m) => {
                let (h, mask) = m.forward(&batch.ids, &batch.mask, adapter, grad)?;
                model::mean_pool(&h, &mask)
            }
            // Right padding is harmless for a causal model: real tokens never see the padding after them.
            Backbone::Decoder(m) => {
                let h = m.hidden_states(&batch.ids, Some(&batch.mask), adapter, grad)?;
                model::mean_pool(&h, &batch.mask)
            }
        }
    }

    /// Mean-pooled embeddings of texts, `batch_size` at a time.
    pub fn embed_texts<S: AsRef<str>>(
        &self,
        texts: &[S],
        adapter: Option<&AdapterSet>,
        batch_size: usize,
    ) -> EngineResult<Vec<Vec<f32>>> {
        let ids = self.tokenize(texts)?;
        let mut out = Vec::with_capacity(texts.len());
        for b in tokenize::batches(&ids, batch_size, self.tokenizer.pad_id(), &self.device)? {
            out.extend(self.embed(&b, adapter)?.to_vec2::<f32>()?);
        }
        Ok(out)
    }
}
