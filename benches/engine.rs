//! Engine throughput: forward of 32 x 64 tokens (bare model, and with a LoRA r=8 q,v adapter) and one
//! LoRA training step (batch 8 x 64 tokens, 2 labels: forward of inputs + verbalizers, cosine logits,
//! cross-entropy, backward, AdamW), then the same work in PyTorch + PEFT (benches/torch_reference.py)
//! when torch, transformers and peft are importable, with the ratio.
//!
//! Run: `scripts/fetch-model.sh && cargo bench --bench engine` (PYTHON=... picks the interpreter;
//! `-- none` skips the criterion part and prints only the side-by-side medians).

use candle_core::{Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use criterion::Criterion;
use peftdb::engine::cross_entropy;
use peftdb::engine::{init_adapter, MethodSpec};
use peftdb::engine::{AdapterSet, Batch, Engine, EngineOptions, Grad, MatmulPrecision};
use peftdb::object::MethodKind;
use rand::SeedableRng;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn model_dir() -> PathBuf {
    std::env::var_os("PEFTDB_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2")
        })
}

/// The benchmark's token ids: deterministic, the same formula as torch_reference.py.
fn rows(b: usize, s: usize) -> Vec<Vec<u32>> {
    (0..b)
        .map(|i| {
            (0..s)
                .map(|j| {
                    if j == 0 {
                        101
                    } else if j == s - 1 {
                        102
                    } else {
                        1000 + ((i * s + j) * 7919 % 20000) as u32
                    }
                })
                .collect()
        })
        .collect()
}

struct Setup {
    engine: Engine,
    big: Batch,
    small: Vec<Vec<u32>>,
    labels: Vec<Vec<u32>>,
    targets: Tensor,
    lora_set: AdapterSet,
    vars: Vec<Var>,
}

fn setup(matmul: MatmulPrecision) -> Setup {
    let dir = model_dir();
    assert!(
        dir.join("model.safetensors").is_file(),
        "model not found at {}: run scripts/fetch-model.sh",
        dir.display()
    );
    let opts = EngineOptions {
        matmul,
        ..Default::default()
    };
    let engine = Engine::load_with(&dir, &Device::Cpu, &opts).expect("model loads");
    let r32 = rows(32, 64);
    let r8 = rows(8, 64);
    let pad = engine.tokenizer.pad_id();
    let big = Batch::pad(&as_rows(&r32), pad, &Device::Cpu).expect("batch");
    let small = r8;
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
    let lora_set = AdapterSet::from_named(&engine.model, &method, &named).expect("set");
    Setup {
        engine,
        big,
        small,
        labels,
        targets,
        lora_set,
        vars,
    }
}

fn forward(s: &Setup, adapter: Option<&AdapterSet>) {
    let e = s.engine.embed(&s.big, adapter).expect("forward");
    std::hint::black_box(
        e.sum_all()
            .expect("sum")
            .to_scalar::<f32>()
            .expect("scalar"),
    );
}

fn train_step(s: &Setup, opt: &mut AdamW) {
    let logits = s
        .engine
        .label_logits(
            Some(&s.lora_set),
            &s.labels,
            &as_rows(&s.small),
            0.05,
            Grad::Yes,
        )
        .expect("logits");
    let loss = cross_entropy(&logits, &s.targets).expect("loss");
    let grads = loss.backward().expect("backward");
    opt.step(&grads).expect("step");
}

fn as_rows(r: &[Vec<u32>]) -> Vec<&[u32]> {
    r.iter().map(|x| x.as_slice()).collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn time_it(n: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up
    median(
        (0..n)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn adamw(vars: &[Var]) -> AdamW {
    AdamW::new(
        vars.to_vec(),
        ParamsAdamW {
            lr: 5e-4,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .expect("adamw")
}

fn main() {
    let s = setup(MatmulPrecision::F32);
    let mut opt = adamw(&s.vars);
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(8))
        .configure_from_args();
    c.bench_function("forward 32x64 (base)", |b| b.iter(|| forward(&s, None)));
    c.bench_function("forward 32x64 (LoRA r8 q,v)", |b| {
        b.iter(|| forward(&s, Some(&s.lora_set)))
    });
    c.bench_function("train step LoRA 8x64", |b| {
        b.iter(|| train_step(&s, &mut opt))
    });
    c.final_summary();

    // Side-by-side medians with PyTorch on the same inputs.
    let n = 7;
    let fwd = time_it(n, || forward(&s, None));
    let step = time_it(n, || train_step(&s, &mut opt));
    let threads = candle_core::utils::get_num_threads();
    println!("candle  (threads {threads}): forward 32x64 {fwd:.3} s, train step 8x64 {step:.3} s");
    // The same at bf16 precision of the frozen products (`--matmul bf16`), against f32 in this run.
    let half = setup(MatmulPrecision::Bf16);
    let mut half_opt = adamw(&half.vars);
    let half_fwd = time_it(n, || forward(&half, None));
    let half_step = time_it(n, || train_step(&half, &mut half_opt));
    println!(
        "candle, bf16 products (AVX512-BF16: {}): forward 32x64 {half_fwd:.3} s ({:.2}x of f32), train step 8x64 {half_step:.3} s ({:.2}x of f32)",
        peftdb::engine::bf16_native(),
        half_fwd / fwd,
        half_step / step
    );
    drop(half);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/torch_reference.py");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(&python)
        .arg(&script)
        .arg(model_dir())
        .arg(n.to_string())
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            match serde_json::from_str::<serde_json::Value>(text.trim()) {
                Ok(v) => {
                    let tf = v["forward_s"].as_f64().unwrap_or(f64::NAN);
                    let ts = v["train_step_s"].as_f64().unwrap_or(f64::NAN);
                    println!(
                        "pytorch (threads {}): forward 32x64 {tf:.3} s, train step 8x64 {ts:.3} s (torch {})",
                        v["threads"], v["torch"]
                    );
                    println!(
                        "ratio candle/pytorch: forward {:.2}x, train step {:.2}x (below 1 = candle faster)",
                        fwd / tf,
                        step / ts
                    );
                    println!(
                        "ratio candle bf16 products/pytorch f32: forward {:.2}x, train step {:.2}x",
                        half_fwd / tf,
                        half_step / ts
                    );
                }
                Err(e) => println!("torch reference printed no JSON ({e}): {text}"),
            }
        }
        Ok(o) if o.status.code() == Some(3) => {
            println!(
                "pytorch reference skipped: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )
        }
        Ok(o) => println!(
            "pytorch reference failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => println!("pytorch reference skipped: cannot run {python}: {e}"),
    }
}
