//! Zero-shot accuracy of a Llama-family decoder (GGUF) on task folders, scoring each label by the
//! log-likelihood of its verbalizer after a prompt, summed over its tokens or averaged per token: the
//! measurement behind README "Decoder LLMs". Prompt template (documented there):
//!
//! ```text
//! {task.json description}\n\nInput: {text, at most 96 tokens}\nAnswer:      verbalizer: " {label text}"
//! ```
//!
//! Run: cargo run --release --example decoder_zero_shot -- MODEL.gguf N TASK_DIR...
//! (N: the first N examples of each dev split; 0 for all).
use candle_core::Device;
use peftdb::engine::LlamaModel;
use peftdb::task::Task;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let gguf = PathBuf::from(args.next().ok_or("MODEL.gguf")?);
    let n: usize = args.next().ok_or("N")?.parse()?;
    let (model, vocab) = LlamaModel::from_gguf(&gguf, &Device::Cpu)?;
    let tok = vocab.tokenizer(&gguf)?;
    let ids = |t: &str| -> Vec<u32> {
        tok.encode(t, false)
            .map(|e| e.get_ids().to_vec())
            .unwrap_or_default()
    };
    let pad = vocab.eos.unwrap_or(0);
    println!("| task | examples | majority | sum | mean | seconds |");
    println!("|---|---|---|---|---|---|");
    for dir in args {
        let task = Task::load(dir.as_ref())?;
        let ex = if n == 0 || n > task.dev.len() {
            &task.dev[..]
        } else {
            &task.dev[..n]
        };
        let head = format!(
            "{}\n\nInput: ",
            task.description.clone().unwrap_or_default()
        );
        let prompts: Vec<Vec<u32>> = ex
            .iter()
            .map(|e| {
                let mut text = ids(&e.text);
                text.truncate(96);
                [ids(&head), text, ids("\nAnswer:")].concat()
            })
            .collect();
        let verbs: Vec<Vec<u32>> = task
            .labels
            .iter()
            .map(|l| ids(&format!(" {}", l.text)))
            .collect();
        let t0 = std::time::Instant::now();
        let sum = model.label_logliks(&prompts, &verbs, false, 16, pad)?;
        let secs = t0.elapsed().as_secs_f64();
        let acc = |scores: &[Vec<f64>], per_token: bool| {
            let right = ex
                .iter()
                .zip(scores)
                .filter(|(e, s)| {
                    let score = |l: usize| {
                        if per_token {
                            s[l] / verbs[l].len() as f64
                        } else {
                            s[l]
                        }
                    };
                    let best = (0..s.len())
                        .max_by(|a, b| score(*a).total_cmp(&score(*b)))
                        .unwrap();
                    best == e.label
                })
                .count();
            right as f64 / ex.len() as f64
        };
        let mut counts = vec![0usize; task.labels.len()];
        ex.iter().for_each(|e| counts[e.label] += 1);
        let majority = *counts.iter().max().unwrap() as f64 / ex.len() as f64;
        println!(
            "| {} | {} | {:.3} | {:.3} | {:.3} | {:.0} |",
            task.name,
            ex.len(),
            majority,
            acc(&sum, false),
            acc(&sum, true),
            secs
        );
    }
    Ok(())
}
