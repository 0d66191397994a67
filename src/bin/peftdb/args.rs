//! Argument groups several commands share (`#[command(flatten)]`): one definition, one help text and one
//! default per flag.

use anyhow::Result;
use peftdb::engine::{parse_device, Engine, EngineOptions, ScoreOptions, DEFAULT_TEMPERATURE};
use std::path::PathBuf;

/// The base model and how texts are scored (`eval`, `train`, `suggest`, `rerank`).
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Hugging Face model folder (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Maximum tokens per text.
    #[arg(long, default_value_t = 128)]
    pub max_len: usize,
    /// Label-scoring temperature (logits = cosine / T).
    #[arg(long, default_value_t = DEFAULT_TEMPERATURE)]
    pub temperature: f64,
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
