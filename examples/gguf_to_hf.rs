//! Writes a Llama-family GGUF file as a Hugging Face folder (config.json, model.safetensors in f32, and the
//! tokenizer.json built from the GGUF's vocabulary) that transformers' `AutoModelForCausalLM` and PEFT
//! load without the `gguf` package, and that peftdb loads as well.
//!
//! Run: cargo run --release --example gguf_to_hf -- MODEL.gguf OUT_DIR
use candle_core::Device;
use peftdb::engine::LlamaModel;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let gguf = PathBuf::from(args.next().ok_or("usage: gguf_to_hf MODEL.gguf OUT_DIR")?);
    let out = PathBuf::from(args.next().ok_or("usage: gguf_to_hf MODEL.gguf OUT_DIR")?);
    let (model, vocab) = LlamaModel::from_gguf(&gguf, &Device::Cpu)?;
    model.save_hf_folder(&out)?;
    vocab
        .tokenizer(&gguf)?
        .save(out.join("tokenizer.json"), true)
        .map_err(|e| format!("writing tokenizer.json: {e}"))?;
    println!("wrote {}", out.display());
    Ok(())
}
