//! A fixed engine workload to profile (`perf record`): the forward pass and/or the LoRA training step of
//! `benches/engine.rs` (same inputs), repeated.
//!
//! Run: `cargo build --release --example engine_profile && perf record -g
//! target/release/examples/engine_profile forward|train|both [ITERS]`; prints the median time per
//! iteration.

use candle_core::{Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use peftdb::engine::cross_entropy;
use peftdb::engine::{init_adapter, MethodSpec};
use peftdb::engine::{AdapterSet, Batch, Engine, Grad};
use peftdb::object::MethodKind;
use rand::SeedableRng;
use std::path::PathBuf;
use std::time::Instant;

fn rows(b: usize, s: usize) -> Vec<Vec<u32>> {
    (0..b)
        .map(|i| {
            (0..s)
                .map(|j| match j {
                    0 => 101,
                    _ if j == s - 1 => 102,
                    _ => 1000 + ((i * s + j) * 7919 % 20000) as u32,
                })
                .collect()
        })
        .collect()
}

fn batch(r: &[Vec<u32>], pad: u32) -> Batch {
    let rows: Vec<&[u32]> = r.iter().map(|x| x.as_slice()).collect();
    Batch::pad(&rows, pad, &Device::Cpu).expect("batch")
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "both".into());
    let iters: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(10);
    let dir = std::env::var_os("PEFTDB_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2")
        });
    let engine = Engine::load(&dir, &Device::Cpu).expect("model loads (scripts/fetch-model.sh)");
    let pad = engine.tokenizer.pad_id();
    let big = batch(&rows(32, 64), pad);
    let small = rows(8, 64);
    let small: Vec<&[u32]> = small.iter().map(|r| r.as_slice()).collect();
    let labels = engine
        .tokenize_labels(&["positive", "negative"])
        .expect("tok");
    let targets = Tensor::from_vec(
        (0..8u32).map(|i| i % 2).collect::<Vec<_>>(),
        8,
        &Device::Cpu,
    )
    .expect("targets");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let (method, ts) =
        init_adapter(&engine, &MethodSpec::new(MethodKind::Lora), &mut rng).expect("init");
    let vars: Vec<Var> = ts
        .iter()
        .map(|t| Var::from_vec(t.to_f32(), t.shape.as_slice(), &Device::Cpu).expect("var"))
        .collect();
    let named: Vec<(String, Tensor)> = ts
        .iter()
        .zip(&vars)
        .map(|(t, v)| (t.name.clone(), v.as_tensor().clone()))
        .collect();
    let set = AdapterSet::from_named(&engine.model, &method, &named).expect("set");
    let mut opt = AdamW::new(
        vars,
        ParamsAdamW {
            lr: 5e-4,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .expect("adamw");
    let mut times = Vec::new();
    for _ in 0..iters {
        let t = Instant::now();
        if mode == "forward" || mode == "both" {
            let e = engine.embed(&big, None).expect("forward");
            std::hint::black_box(e.sum_all().and_then(|s| s.to_scalar::<f32>()).expect("sum"));
        }
        if mode == "train" || mode == "both" {
            let logits = engine
                .label_logits(Some(&set), &labels, &small, 0.05, Grad::Yes)
                .expect("logits");
            let loss = cross_entropy(&logits, &targets).expect("loss");
            let grads = loss.backward().expect("backward");
            opt.step(&grads).expect("step");
        }
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    println!("{mode}: median {:.3} s over {iters}", times[iters / 2]);
}
