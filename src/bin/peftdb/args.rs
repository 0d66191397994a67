//! Argument groups several commands share (`#[command(flatten)]`): one definition, one help text and one
//! default per flag.

use anyhow::Result;
use peftdb::engine::{
    parse_device, Engine, EngineOptions, MatmulPrecision, ScoreOptions, DEFAULT_TEMPERATURE,
};
use peftdb::suggest::LabelPrior;
use std::path::PathBuf;

/// The base model and how texts are scored (`eval`, `train`, `suggest`, `rerank`).
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// The base model: a Hugging Face folder of a BERT-family encoder (config.json, model.safetensors,
    /// tokenizer.json), or a Llama-family decoder as a GGUF file (or a folder holding one).
    #[arg(long)]
    pub model: PathBuf,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Maximum tokens per text.
    #[arg(long, default_value_t = 128)]
    pub max_len: usize,
    /// Label-scoring temperature: encoders' logits are cosine / T; decoders' are the verbalizers'
    /// log-likelihoods times 0.05 / T (so the default leaves them as they are).
    #[arg(long, default_value_t = DEFAULT_TEMPERATURE)]
    pub temperature: f64,
    /// Decoder models: the prompt around each input text (`{text}`); each label's verbalizer, a space
    /// and its text, follows it. Encoders ignore it.
    #[arg(long, default_value = peftdb::engine::DEFAULT_PROMPT)]
    pub prompt: String,
    /// Decoder models: hold the frozen base's matrices in f32, bf16 or f16 (half the memory; activations
    /// and adapters stay f32). Encoders take f32 only.
    #[arg(long, default_value = "f32", value_parser = parse_base_dtype)]
    pub dtype: peftdb::object::DType,
    /// Encoder models on the CPU: the precision of the frozen layers' matrix products. f32 is exact to
    /// PEFT; bf16 rounds weights and inputs to bf16 (exact products, f32 sums), about 1.4x faster on
    /// a CPU with AVX512-BF16 at a small accuracy cost (README "Performance").
    #[arg(long, default_value = "f32", value_parser = parse_matmul)]
    pub matmul: MatmulPrecision,
}

fn parse_matmul(s: &str) -> Result<MatmulPrecision, String> {
    MatmulPrecision::parse(s).map_err(|e| e.to_string())
}

fn parse_base_dtype(s: &str) -> Result<peftdb::object::DType, String> {
    peftdb::engine::parse_base_dtype(s).map_err(|e| e.to_string())
}

impl ModelArgs {
    /// Load the model on the device.
    pub fn load(&self) -> Result<Engine> {
        let device = parse_device(&self.device)?;
        Ok(Engine::load_with(
            &self.model,
            &device,
            &EngineOptions {
                max_len: self.max_len,
                prompt: self.prompt.clone(),
                base_dtype: self.dtype,
                matmul: self.matmul,
            },
        )?)
    }

    /// Label-scoring options with this temperature.
    pub fn score(&self, batch_size: usize) -> ScoreOptions {
        ScoreOptions {
            temperature: self.temperature,
            batch_size: batch_size.max(1),
        }
    }
}

/// The new task and the few-shot episode drawn from it (`suggest`, `rerank`): the pipeline's one
/// seeding rule (`transfer::Episode::sample`).
#[derive(clap::Args, Debug, Clone)]
pub struct EpisodeArgs {
    /// The new task's folder (task.json + train/dev/test JSONL; only `--shots` per class are used).
    #[arg(long)]
    pub task: PathBuf,
    /// Examples per class: this many train and this many dev shots (the train shots also short-tune the
    /// target adapter of `suggest`); both score the candidates.
    #[arg(long, default_value_t = 16)]
    pub shots: usize,
    /// Seed of the episode (and of the short tune).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The examples are drawn class-balanced (--shots per class); `train` weights each by its class's
    /// share of the task's train split, so scores and the no-harm test reflect your data's label
    /// distribution; `uniform` counts every class alike.
    #[arg(long, default_value = peftdb::suggest::DEFAULT_PRIOR.as_str())]
    pub label_prior: LabelPrior,
}
