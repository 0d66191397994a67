//! The Llama-family decoder on the real SmolLM2-135M-Instruct GGUF (scripts/fetch-decoder.sh) against
//! Hugging Face transformers (tests/fixtures/decoder/reference.json, written by scripts/decoder_reference.py
//! from the same file): next-token logits with and without a PEFT LoRA on all seven linear layers, the
//! verbalizers' log-likelihoods, and the tokenizer built from the GGUF metadata.

mod common;

use candle_core::{Device, Tensor};
use peftdb::engine::LlamaModel;
use peftdb::object::{read_adapter, ReadOptions};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn gguf() -> PathBuf {
    let p = std::env::var_os("PEFTDB_DECODER_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("models/smollm2-135m-instruct"))
        .join("model.gguf");
    assert!(
        p.is_file(),
        "decoder test model not found at {}: run scripts/fetch-decoder.sh",
        p.display()
    );
    p
}

fn reference() -> Value {
    let p = root().join("tests/fixtures/decoder/reference.json");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn model() -> &'static (LlamaModel, peftdb::engine::GgufVocab) {
    static M: OnceLock<(LlamaModel, peftdb::engine::GgufVocab)> = OnceLock::new();
    M.get_or_init(|| LlamaModel::from_gguf(&gguf(), &Device::Cpu).expect("the GGUF loads"))
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// Last-position logits of one sequence.
fn last_logits(m: &LlamaModel, ids: &[u32]) -> Vec<f32> {
    let t = Tensor::from_slice(ids, (1, ids.len()), &Device::Cpu).unwrap();
    let logits = m.forward(&t, None).unwrap();
    logits
        .get(0)
        .unwrap()
        .get(ids.len() - 1)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn log_softmax_at(logits: &[f32], id: usize) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let z: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    logits[id] as f64 - max - z.ln()
}

/// The first 8 logits, the top 5 (ids and values) and each verbalizer's log-likelihood match transformers.
fn check(m: &LlamaModel, want: &Value, verbalizers: Option<&Value>, what: &str) {
    let ids: Vec<u32> = want["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let got = last_logits(m, &ids);
    for (i, (g, w)) in got
        .iter()
        .zip(floats(&want["last_logits_first8"]))
        .enumerate()
    {
        assert!(
            (*g as f64 - w).abs() < 1e-4,
            "{what}: logit {i}: {g} vs {w}"
        );
    }
    let mut order: Vec<usize> = (0..got.len()).collect();
    order.sort_by(|a, b| got[*b].total_cmp(&got[*a]));
    let top: Vec<u64> = order[..5].iter().map(|&i| i as u64).collect();
    let want_top: Vec<u64> = want["top5_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(top, want_top, "{what}: top 5 tokens");
    for (i, w) in order[..5].iter().zip(floats(&want["top5_logits"])) {
        assert!((got[*i] as f64 - w).abs() < 1e-4, "{what}: top logit {i}");
    }
    for (verb, v) in verbalizers
        .and_then(|v| v.as_object())
        .into_iter()
        .flatten()
    {
        let id = v["ids"][0].as_u64().unwrap() as usize;
        let ll = log_softmax_at(&got, id);
        let w = v["sum"].as_f64().unwrap();
        assert!(
            (ll - w).abs() < 1e-4,
            "{what}: log-likelihood of {verb:?}: {ll} vs {w}"
        );
    }
}

#[test]
fn the_gguf_loads_as_the_hugging_face_model() {
    let (m, vocab) = model();
    let r = reference();
    let c = &r["config"];
    assert_eq!(m.config.hidden as u64, c["hidden_size"].as_u64().unwrap());
    assert_eq!(
        m.config.layers as u64,
        c["num_hidden_layers"].as_u64().unwrap()
    );
    assert_eq!(
        m.config.heads as u64,
        c["num_attention_heads"].as_u64().unwrap()
    );
    assert_eq!(
        m.config.kv_heads as u64,
        c["num_key_value_heads"].as_u64().unwrap()
    );
    assert_eq!(
        m.config.intermediate as u64,
        c["intermediate_size"].as_u64().unwrap()
    );
    assert_eq!(m.config.vocab as u64, c["vocab_size"].as_u64().unwrap());
    assert_eq!(m.config.rope_theta, c["rope_theta"].as_f64().unwrap());
    assert_eq!(
        (vocab.bos, vocab.eos, vocab.add_bos),
        (Some(1), Some(2), false)
    );
    // Hugging Face names for every weight: 30 layers of 9, the embeddings and the final norm (tied head).
    let names: Vec<String> = m.named_weights().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.len(), 30 * 9 + 2);
    assert!(names.contains(&"model.layers.29.mlp.down_proj.weight".to_string()));
}

#[test]
fn logits_match_transformers_on_every_prompt() {
    let (m, _) = model();
    let r = reference();
    for p in r["prompts"].as_array().unwrap() {
        check(
            m,
            &p["outputs"],
            p.get("verbalizer_loglik"),
            p["text"].as_str().unwrap(),
        );
    }
}

#[test]
fn a_peft_lora_on_all_seven_modules_matches_transformers() {
    let (m, _) = model();
    let r = reference();
    let lora = read_adapter(
        &root().join("tests/fixtures/decoder/lora_r8_all"),
        &ReadOptions::default(),
    )
    .expect("the PEFT LoRA reads");
    assert_eq!(lora.tensors.len(), 30 * 7 * 2);
    let with = m.with_lora(&lora).expect("the LoRA fits");
    check(
        &with,
        &r["lora"]["outputs"],
        r["lora"].get("verbalizer_loglik"),
        "lora",
    );
    // The LoRA changes the answer (so the check above is not the bare model's).
    let bare = last_logits(
        m,
        &[21465, 42, 253, 8264, 28, 4138, 4771, 30, 18279, 2572, 42],
    );
    let lora_top = r["lora"]["outputs"]["top5_ids"][0].as_u64().unwrap() as usize;
    assert!(bare[lora_top] < bare[2606]);
}

#[test]
fn a_lora_for_another_model_names_the_tensor_and_both_shapes() {
    let (m, _) = model();
    let bert = read_adapter(&common::fixture("lora_r8_qv"), &ReadOptions::default()).unwrap();
    let e = m.with_lora(&bert).expect_err("a BERT LoRA does not fit");
    assert!(e.to_string().contains("attention.self.query"), "{e}");
}

#[test]
fn the_tokenizer_built_from_the_gguf_equals_transformers() {
    let (_, vocab) = model();
    let tok = vocab
        .tokenizer(&gguf())
        .expect("a byte-level BPE tokenizer");
    let r = reference();
    for p in r["prompts"].as_array().unwrap() {
        let text = p["text"].as_str().unwrap();
        let enc = tok.encode(text, true).unwrap();
        let want: Vec<u32> = p["ids"]["default"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(enc.get_ids(), &want[..], "{text:?}");
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
    }
    // And on real, messy texts: the tokenizer transformers builds from the same GGUF (its tokenizer.json).
    let reference =
        tokenizers::Tokenizer::from_file(root().join("tests/fixtures/decoder/tokenizer.json"))
            .unwrap();
    let mut n = 0;
    for task in ["tweet_sentiment", "bbc_topic", "social_support"] {
        let t = peftdb::task::Task::load(&common::task_dir(task)).unwrap();
        for ex in &t.dev {
            let a = tok.encode(ex.text.as_str(), true).unwrap();
            let b = reference.encode(ex.text.as_str(), true).unwrap();
            assert_eq!(a.get_ids(), b.get_ids(), "{task}: {:?}", ex.text);
            n += 1;
        }
    }
    assert!(n > 500);
}

#[test]
fn a_left_padded_batch_gives_each_sequence_its_own_logits() {
    let (m, vocab) = model();
    let tok = vocab.tokenizer(&gguf()).unwrap();
    let texts = [
        "Review: a wonderful, moving film. Sentiment:",
        "The capital of France is",
        "ok",
    ];
    let ids: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| tok.encode(*t, true).unwrap().get_ids().to_vec())
        .collect();
    let len = ids.iter().map(Vec::len).max().unwrap();
    let pad = vocab.eos.unwrap();
    let (mut flat, mut mask) = (Vec::new(), Vec::new());
    for row in &ids {
        flat.extend(std::iter::repeat_n(pad, len - row.len()).chain(row.iter().copied()));
        mask.extend(
            std::iter::repeat_n(0u32, len - row.len()).chain(std::iter::repeat_n(1, row.len())),
        );
    }
    let batch = Tensor::from_vec(flat, (ids.len(), len), &Device::Cpu).unwrap();
    let mask = Tensor::from_vec(mask, (ids.len(), len), &Device::Cpu).unwrap();
    let logits = m.forward(&batch, Some(&mask)).unwrap();
    for (i, row) in ids.iter().enumerate() {
        let alone = last_logits(m, row);
        let batched: Vec<f32> = logits
            .get(i)
            .unwrap()
            .get(len - 1)
            .unwrap()
            .to_vec1()
            .unwrap();
        let worst = alone
            .iter()
            .zip(&batched)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        // Rounding only: the batch's matrix products sum in another order (seen: 2.4e-4 on logits of
        // about 15 after 30 layers). Attending to padding or shifted positions moves them by whole units.
        assert!(
            worst < 1e-3,
            "{:?}: padded batch differs by {worst}",
            texts[i]
        );
        let argmax = |v: &[f32]| (0..v.len()).max_by(|a, b| v[*a].total_cmp(&v[*b])).unwrap();
        assert_eq!(argmax(&alone), argmax(&batched), "{:?}", texts[i]);
    }
}

#[test]
fn label_log_likelihoods_match_transformers_and_chain_multi_token_verbalizers() {
    let (m, vocab) = model();
    let tok = vocab.tokenizer(&gguf()).unwrap();
    let r = reference();
    let p = &r["prompts"][0];
    let ids = |t: &str| tok.encode(t, false).unwrap().get_ids().to_vec();
    let prompt = ids(p["text"].as_str().unwrap());
    // " positive" and " negative" are one token each; "very good" is several.
    let verbs = [ids(" positive"), ids(" negative"), ids(" very good indeed")];
    assert!(verbs[2].len() > 1);
    let pad = vocab.eos.unwrap();
    let ll = m
        .label_logliks(&[prompt.clone(), ids("ok")], &verbs, false, 2, pad)
        .unwrap();
    for (i, verb) in [" positive", " negative"].iter().enumerate() {
        let want = p["verbalizer_loglik"][verb]["sum"].as_f64().unwrap();
        assert!(
            (ll[0][i] - want).abs() < 1e-4,
            "{verb}: {} vs {want}",
            ll[0][i]
        );
    }
    // A multi-token verbalizer: the chain rule over separate forward passes.
    let mut chained = 0.0;
    let mut ctx = prompt.clone();
    for &t in &verbs[2] {
        chained += log_softmax_at(&last_logits(m, &ctx), t as usize);
        ctx.push(t);
    }
    assert!(
        (ll[0][2] - chained).abs() < 1e-3,
        "{} vs {chained}",
        ll[0][2]
    );
    let mean = m.label_logliks(&[prompt], &verbs, true, 8, pad).unwrap();
    assert!((mean[0][2] - chained / verbs[2].len() as f64).abs() < 1e-3);
    let e = m
        .label_logliks(&[ids("ok")], &[vec![]], false, 1, pad)
        .unwrap_err();
    assert!(e.to_string().contains("tokenizes to nothing"), "{e}");
}

/// A small GGUF file with these metadata and one f32 tensor.
fn write_gguf(path: &Path, metadata: &[(&str, candle_core::quantized::gguf_file::Value)]) {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    let t = Tensor::zeros((4, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, GgmlDType::F32).unwrap();
    let md: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md, &[("token_embd.weight", &q)]).unwrap();
}

#[test]
fn bad_gguf_files_are_refused_naming_the_file_and_what_is_supported() {
    use candle_core::quantized::gguf_file::Value;
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"not a gguf file at all").unwrap();
    let e = LlamaModel::from_gguf(&junk, &Device::Cpu).unwrap_err();
    assert!(
        e.to_string().contains("junk.gguf") && e.to_string().contains("llama architecture"),
        "{e}"
    );

    let mamba = dir.path().join("mamba.gguf");
    write_gguf(
        &mamba,
        &[("general.architecture", Value::String("mamba".into()))],
    );
    let e = LlamaModel::from_gguf(&mamba, &Device::Cpu).unwrap_err();
    assert!(
        e.to_string().contains("\"mamba\"") && e.to_string().contains("Llama-family"),
        "{e}"
    );

    let no_vocab = dir.path().join("novocab.gguf");
    write_gguf(
        &no_vocab,
        &[("general.architecture", Value::String("llama".into()))],
    );
    let e = LlamaModel::from_gguf(&no_vocab, &Device::Cpu).unwrap_err();
    assert!(e.to_string().contains("tokenizer.json beside"), "{e}");

    let no_layers = dir.path().join("nolayers.gguf");
    write_gguf(
        &no_layers,
        &[
            ("general.architecture", Value::String("llama".into())),
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            (
                "tokenizer.ggml.tokens",
                Value::Array(vec![Value::String("a".into()); 4]),
            ),
            ("llama.embedding_length", Value::U32(32)),
            ("llama.attention.head_count", Value::U32(2)),
            ("llama.feed_forward_length", Value::U32(64)),
        ],
    );
    let e = LlamaModel::from_gguf(&no_layers, &Device::Cpu).unwrap_err();
    assert!(
        e.to_string().contains("llama.block_count is missing"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------------------
// The decoder behind the engine's one interface (`Engine`: tokenize, prepare, label_logits, score,
// ce_gradients, train).

fn engine(prompt: &str) -> peftdb::engine::Engine {
    use peftdb::engine::{Engine, EngineOptions};
    Engine::load_with(
        &gguf(),
        &Device::Cpu,
        &EngineOptions {
            max_len: 64,
            prompt: prompt.to_string(),
            ..Default::default()
        },
    )
    .expect("the GGUF loads as an engine")
}

fn lora_fixture() -> peftdb::object::LightweightObject {
    read_adapter(
        &root().join("tests/fixtures/decoder/lora_r8_all"),
        &ReadOptions::default(),
    )
    .expect("the PEFT LoRA reads")
}

/// How far `e`'s log-likelihoods of " positive" and " negative" after the first reference prompt are from
/// transformers' (f32), bare and with the PEFT LoRA on all seven modules: (what, verbalizer, |difference|).
fn reference_loglik_errors(e: &peftdb::engine::Engine) -> Vec<(&'static str, &'static str, f64)> {
    use peftdb::engine::{Grad, DEFAULT_TEMPERATURE};
    let r = reference();
    let text = r["prompts"][0]["text"].as_str().unwrap();
    let inputs = e.tokenize(&[text]).unwrap();
    let rows: Vec<&[u32]> = inputs.iter().map(|r| r.as_slice()).collect();
    let labels = e.tokenize_labels(&["positive", "negative"]).unwrap();
    let set = e
        .prepare(&lora_fixture())
        .expect("the LoRA fits the engine");
    let mut out = Vec::new();
    for (adapter, want, what) in [
        (None, &r["prompts"][0]["verbalizer_loglik"], "bare"),
        (Some(&set), &r["lora"]["verbalizer_loglik"], "lora"),
    ] {
        let l = e
            .label_logits(adapter, &labels, &rows, DEFAULT_TEMPERATURE, Grad::No)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (i, verb) in [" positive", " negative"].into_iter().enumerate() {
            let w = want[verb]["sum"].as_f64().unwrap();
            out.push((what, verb, (l[0][i] as f64 - w).abs()));
        }
    }
    out
}

#[test]
fn the_engine_scores_labels_bare_and_with_an_unmerged_peft_lora_as_transformers() {
    use peftdb::engine::{Grad, DEFAULT_TEMPERATURE};
    let e = engine("{text}");
    assert!(e.model.is_decoder());
    let r = reference();
    let text = r["prompts"][0]["text"].as_str().unwrap();
    let inputs = e.tokenize(&[text]).unwrap();
    assert_eq!(
        inputs[0],
        r["lora"]["outputs"]["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect::<Vec<_>>()
    );
    for (what, verb, err) in reference_loglik_errors(&e) {
        assert!(err < 1e-4, "{what} {verb}: off by {err}");
    }
    let labels = e.tokenize_labels(&["positive", "negative"]).unwrap();
    let rows: Vec<&[u32]> = inputs.iter().map(|r| r.as_slice()).collect();
    // The temperature scales the log-likelihoods relative to the default.
    let half = e
        .label_logits(None, &labels, &rows, DEFAULT_TEMPERATURE * 2.0, Grad::No)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let w = r["prompts"][0]["verbalizer_loglik"][" positive"]["sum"]
        .as_f64()
        .unwrap();
    assert!((half[0][0] as f64 - w / 2.0).abs() < 1e-4);
}

#[test]
fn engine_scores_of_multi_token_labels_and_batches_equal_the_models_log_likelihoods() {
    use peftdb::engine::ScoreOptions;
    let e = engine(peftdb::engine::DEFAULT_PROMPT);
    let (m, vocab) = model();
    let texts = [
        "a wonderful, moving film",
        "dull",
        "I would not watch it again, not even for free, and I told my friends so",
    ];
    let inputs = e.tokenize(&texts).unwrap();
    // The prompt wraps each text.
    let tail = vocab.tokenizer(&gguf()).unwrap();
    let answer = tail.encode("\nAnswer:", false).unwrap().get_ids().to_vec();
    assert!(inputs.iter().all(|i| i.ends_with(&answer)));
    let labels = e
        .tokenize_labels(&["positive", "very bad indeed", "so-so"])
        .unwrap();
    assert!(labels[1].len() > 1);
    let want = m.label_logliks(&inputs, &labels, false, 64, 2).unwrap();
    for bs in [1, 2, 8] {
        let got = e
            .score(
                None,
                &labels,
                &inputs,
                &ScoreOptions {
                    batch_size: bs,
                    ..Default::default()
                },
            )
            .unwrap();
        for (g, w) in got.logits.iter().zip(&want) {
            for (a, b) in g.iter().zip(w) {
                assert!((*a as f64 - b).abs() < 2e-3, "batch {bs}: {a} vs {b}");
            }
        }
        let p: f32 = got.probs[0].iter().sum();
        assert!((p - 1.0).abs() < 1e-5);
    }
    // A long text is cut where its max_len-th token ends; the template is tokenized around it as one string.
    let short = peftdb::engine::Engine::load_with(
        &gguf(),
        &Device::Cpu,
        &peftdb::engine::EngineOptions {
            max_len: 8,
            ..Default::default()
        },
    )
    .unwrap();
    let cut = short.tokenizer.truncate_text(texts[2]).unwrap();
    assert!(texts[2].starts_with(cut) && cut.len() < texts[2].len());
    assert_eq!(short.tokenizer.tokenize_full(&[cut]).unwrap()[0].len(), 8);
    let whole = short
        .tokenizer
        .tokenize_full(&[format!("Input: {cut}\nAnswer:")])
        .unwrap();
    assert_eq!(short.tokenize(&[texts[2]]).unwrap(), whole);
    let err = e.tokenize_labels(&["positive", " "]).unwrap_err();
    assert!(err.to_string().contains("label 1"), "{err}");
}

/// The cross-entropy gradients of `obj` on two inputs (gold labels 0 and 1): the directional derivative
/// along the gradient, (L(x + eps d) - L(x - eps d)) / 2 eps, equals its norm within 5%.
fn check_gradients(
    e: &peftdb::engine::Engine,
    obj: &peftdb::object::LightweightObject,
    labels: &[Vec<u32>],
    inputs: &[Vec<u32>],
) {
    let opts = peftdb::engine::ScoreOptions::default();
    let g = e.ce_gradients(obj, labels, inputs, &[0, 1], &opts).unwrap();
    let norm = g.norm();
    assert!(norm > 0.0);
    let loss_at = |eps: f32| -> f64 {
        let mut o = obj.clone();
        for (t, (_, gr)) in o.tensors.iter_mut().zip(&g.grads) {
            let v: Vec<f32> = t
                .to_f32()
                .iter()
                .zip(gr)
                .map(|(x, d)| x + eps * d / norm as f32)
                .collect();
            *t = peftdb::object::Tensor::from_f32(t.name.clone(), t.shape.clone(), &v);
        }
        let set = e.prepare(&o).unwrap();
        e.score(Some(&set), labels, inputs, &opts)
            .unwrap()
            .cross_entropy(&[0, 1])
    };
    let eps = 1e-2;
    let fd = (loss_at(eps) - loss_at(-eps)) / (2.0 * eps as f64);
    assert!(
        (fd - norm).abs() < 0.05 * norm,
        "finite difference {fd} vs gradient norm {norm}"
    );
}

/// Each text's (row's) log-likelihood of each verbalizer equals the reference's `want[text][verbalizer]`
/// within 1e-4.
fn assert_logliks(got: &[Vec<f32>], want: &Value, verbs: &[&str], what: &str) {
    for (i, row) in got.iter().enumerate() {
        for (c, v) in verbs.iter().enumerate() {
            let w = want[i][v].as_f64().unwrap();
            assert!(
                (row[c] as f64 - w).abs() < 1e-4,
                "{what}, text {i}, {v:?}: {} vs {w}",
                row[c]
            );
        }
    }
}

/// A PEFT prompt-learning adapter from `tests/fixtures/decoder/{dir}` with its first tensor of `shape`
/// scores the two reference texts' verbalizers (one left-padded batch, a three-token verbalizer among them)
/// as transformers + PEFT did (`{file}`'s `key` log-likelihoods) within 1e-4, and `moved` = (text,
/// verbalizer, min): that log-likelihood differs from the bare model's by more than min. Returns the engine, the adapter, the
/// tokenized labels and inputs.
fn check_against_reference(
    dir: &str,
    file: &str,
    key: &str,
    shape: &[usize],
    moved: (usize, &str, f64),
) -> (
    peftdb::engine::Engine,
    peftdb::object::LightweightObject,
    Vec<Vec<u32>>,
    Vec<Vec<u32>>,
) {
    use peftdb::engine::{Grad, DEFAULT_TEMPERATURE};
    let e = engine("Input: {text}\nAnswer:");
    let r: Value = serde_json::from_slice(
        &std::fs::read(root().join("tests/fixtures/decoder").join(file)).unwrap(),
    )
    .unwrap();
    let obj = read_adapter(
        &root().join("tests/fixtures/decoder").join(dir),
        &ReadOptions::default(),
    )
    .expect("the PEFT adapter reads");
    assert_eq!(obj.tensors[0].shape, shape);
    let set = e.prepare(&obj).expect("the adapter fits the decoder");
    let texts = ["a wonderful, moving film", "dull and far too long"];
    let verbs = [" positive", " negative", " very bad indeed"];
    let inputs = e.tokenize(&texts).unwrap();
    let rows: Vec<&[u32]> = inputs.iter().map(|r| r.as_slice()).collect();
    let labels = e.tokenize_labels(&verbs.map(|v| v.trim_start())).unwrap();
    let got = e
        .label_logits(Some(&set), &labels, &rows, DEFAULT_TEMPERATURE, Grad::No)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let want = &r[key]["logliks"];
    assert_logliks(&got, want, &verbs, key);
    // The adapter changes the scores (the check above is not the bare model's).
    let (i, v, min) = moved;
    let d = want[i][v].as_f64().unwrap() - r["bare"][i][v].as_f64().unwrap();
    assert!(d.abs() > min, "{d}");
    (e, obj, labels, inputs)
}

#[test]
fn decoder_lora_gradients_match_finite_differences() {
    let e = engine(peftdb::engine::DEFAULT_PROMPT);
    let mut obj = lora_fixture();
    // Two layers' q and v only keep the check quick; values from the real PEFT adapter.
    obj.tensors.retain(|t| {
        (t.name.contains("layers.3.") || t.name.contains("layers.17."))
            && (t.name.contains("q_proj") || t.name.contains("v_proj"))
    });
    assert_eq!(obj.tensors.len(), 8);
    let inputs = e.tokenize(&["a wonderful, moving film", "dull"]).unwrap();
    // One label of several tokens: its packed continuation is differentiated too.
    let labels = e.tokenize_labels(&["positive", "very bad indeed"]).unwrap();
    assert!(labels[1].len() > 1);
    check_gradients(&e, &obj, &labels, &inputs);
}

#[test]
fn decoder_adapters_the_engine_cannot_run_yet_are_refused_clearly() {
    use peftdb::engine::{fresh_adapter, MethodSpec, TrainConfig};
    use peftdb::object::MethodKind;
    let e = engine(peftdb::engine::DEFAULT_PROMPT);
    for kind in [MethodKind::Bitfit, MethodKind::Adapter] {
        let mut cfg = TrainConfig::new(kind);
        cfg.spec = MethodSpec::new(kind);
        let err = fresh_adapter(&e, &cfg).unwrap_err();
        assert!(err.to_string().contains("decoder"), "{kind:?}: {err}");
    }
    // A fresh prefix has PEFT's grouped-query layout: per virtual token, 30 layers x (key, value) x the
    // 3 key/value heads of 64; a causal LM's config with token_dim 192 and 3 heads.
    let prefix = fresh_adapter(&e, &TrainConfig::new(MethodKind::Prefix)).unwrap();
    assert_eq!(prefix.tensors[0].shape, vec![20, 30 * 2 * 192]);
    let cfg: Value = serde_json::from_slice(&prefix.config_json).unwrap();
    assert_eq!(
        (
            &cfg["task_type"],
            &cfg["token_dim"],
            &cfg["num_attention_heads"]
        ),
        (
            &Value::from("CAUSAL_LM"),
            &Value::from(192),
            &Value::from(3)
        )
    );
    e.prepare(&prefix).expect("a fresh prefix fits");
    // A fresh prompt: rows of the decoder's word embeddings, a causal LM's PEFT config.
    let prompt = fresh_adapter(&e, &TrainConfig::new(MethodKind::Prompt)).unwrap();
    assert_eq!(prompt.tensors[0].shape, vec![20, 576]);
    let cfg: Value = serde_json::from_slice(&prompt.config_json).unwrap();
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    e.prepare(&prompt).expect("a fresh prompt fits");
    // A fresh LoRA targets q_proj and v_proj of every layer, with PEFT's names.
    let lora = fresh_adapter(&e, &TrainConfig::new(MethodKind::Lora)).unwrap();
    assert_eq!(lora.tensors.len(), 30 * 2 * 2);
    assert!(lora.tensors.iter().any(|t| t.name
        == "base_model.model.model.layers.29.self_attn.v_proj.lora_B.weight"
        && t.shape == vec![192, 8]));
    e.prepare(&lora).expect("a fresh LoRA fits");
    // A BERT LoRA names the module and the decoder's slots.
    let bert = read_adapter(&common::fixture("lora_r8_qv"), &ReadOptions::default()).unwrap();
    let err = e.prepare(&bert).unwrap_err();
    assert!(err.to_string().contains("q_proj"), "{err}");
}

#[test]
fn a_hugging_face_folder_of_the_model_loads_and_scores_as_the_gguf() {
    use peftdb::engine::{
        Engine, EngineError, EngineOptions, Grad, LoadError, DEFAULT_TEMPERATURE,
    };
    let (m, _) = model();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("smollm2-hf");
    m.save_hf_folder(&dir).unwrap();
    std::fs::copy(
        root().join("tests/fixtures/decoder/tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    let opts = EngineOptions {
        max_len: 64,
        ..Default::default()
    };
    let hf = Engine::load_with(&dir, &Device::Cpu, &opts).expect("the folder loads");
    let gg = engine(peftdb::engine::DEFAULT_PROMPT);
    assert!(hf.model.is_decoder());
    let texts = ["a wonderful, moving film", "Café — naïve 東京 😀"];
    let inputs = hf.tokenize(&texts).unwrap();
    assert_eq!(inputs, gg.tokenize(&texts).unwrap());
    let labels = hf
        .tokenize_labels(&["positive", "very bad indeed"])
        .unwrap();
    let rows: Vec<&[u32]> = inputs.iter().map(|r| r.as_slice()).collect();
    let set_hf = hf.prepare(&lora_fixture()).unwrap();
    let set_gg = gg.prepare(&lora_fixture()).unwrap();
    for (a, b) in [(None, None), (Some(&set_hf), Some(&set_gg))] {
        let x = hf
            .label_logits(a, &labels, &rows, DEFAULT_TEMPERATURE, Grad::No)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let y = gg
            .label_logits(b, &labels, &rows, DEFAULT_TEMPERATURE, Grad::No)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(x, y);
    }
    // What the folder loader refuses, naming the file and the reason.
    let cfg_path = dir.join("config.json");
    let cfg: Value = serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    for (key, value, want) in [
        (
            "rope_scaling",
            serde_json::json!({"rope_type": "llama3", "factor": 8.0}),
            "rope_scaling",
        ),
        (
            "rope_parameters",
            serde_json::json!({"rope_type": "yarn", "rope_theta": 1e4}),
            "yarn",
        ),
        ("model_type", serde_json::json!("gemma"), "gemma"),
    ] {
        let mut bad = cfg.clone();
        bad[key] = value;
        std::fs::write(&cfg_path, bad.to_string()).unwrap();
        let e = Engine::load_with(&dir, &Device::Cpu, &opts).unwrap_err();
        assert!(
            matches!(
                e,
                EngineError::Load(LoadError::UnsupportedArchitecture { .. })
            ) && e.to_string().contains(want),
            "{key}: {e}"
        );
        assert!(e.to_string().contains("config.json"), "{e}");
    }
    // A config that promises biases the weights lack names the missing tensor.
    let mut bad = cfg.clone();
    bad["attention_bias"] = true.into();
    std::fs::write(&cfg_path, bad.to_string()).unwrap();
    let e = Engine::load_with(&dir, &Device::Cpu, &opts).unwrap_err();
    assert!(
        matches!(e, EngineError::Load(LoadError::MissingWeight { .. }))
            && e.to_string()
                .contains("model.layers.0.self_attn.q_proj.bias"),
        "{e}"
    );
    // A config that does not fit the weights names the tensor and both shapes.
    let mut bad = cfg.clone();
    bad["intermediate_size"] = 1000.into();
    std::fs::write(&cfg_path, bad.to_string()).unwrap();
    let e = Engine::load_with(&dir, &Device::Cpu, &opts).unwrap_err();
    assert!(
        matches!(e, EngineError::Load(LoadError::WeightShape { .. })),
        "{e}"
    );
    assert!(
        e.to_string().contains("gate_proj") && e.to_string().contains("1536"),
        "{e}"
    );
    // No tokenizer: says which file is missing.
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let e = Engine::load_with(&dir, &Device::Cpu, &opts).unwrap_err();
    assert!(e.to_string().contains("tokenizer.json"), "{e}");
}

#[test]
fn a_peft_ia3_adapter_runs_on_the_decoder_as_in_peft() {
    use peftdb::engine::{Grad, DEFAULT_TEMPERATURE};
    let e = engine("Input: {text}\nAnswer:");
    let r: Value = serde_json::from_slice(
        &std::fs::read(root().join("tests/fixtures/decoder/ia3_reference.json")).unwrap(),
    )
    .unwrap();
    let ia3 = read_adapter(
        &root().join("tests/fixtures/decoder/ia3_kvd"),
        &ReadOptions::default(),
    )
    .expect("the PEFT IA3 reads");
    // k_proj and v_proj scale their outputs, down_proj (a feed-forward module) its input, in 30 layers.
    assert_eq!(ia3.tensors.len(), 30 * 3);
    let set = e.prepare(&ia3).expect("the IA3 fits the decoder");
    let texts = ["a wonderful, moving film", "dull and far too long"];
    let verbs = [" positive", " negative", " very bad indeed"];
    let inputs = e.tokenize(&texts).unwrap();
    let rows: Vec<&[u32]> = inputs.iter().map(|r| r.as_slice()).collect();
    let labels = e.tokenize_labels(&verbs.map(|v| v.trim_start())).unwrap();
    for (adapter, want, what) in [
        (None, &r["bare"], "bare"),
        (Some(&set), &r["ia3"]["logliks"], "ia3"),
    ] {
        let got = e
            .label_logits(adapter, &labels, &rows, DEFAULT_TEMPERATURE, Grad::No)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_logliks(&got, want, &verbs, what);
    }
    // The adapter changes the scores (the check above is not the bare model's).
    let d = r["ia3"]["logliks"][0][" positive"].as_f64().unwrap()
        - r["bare"][0][" positive"].as_f64().unwrap();
    assert!(d.abs() > 0.05, "{d}");
}

/// Prompt tuning on the decoder: PEFT's table (scripts/decoder_prompt_reference.py) goes before the input
/// embeddings, and the verbalizers' log-likelihoods (two texts of different lengths in one left-padded
/// batch, a three-token verbalizer among them) match transformers + PEFT within 1e-4.
#[test]
fn a_peft_prompt_tuning_adapter_runs_on_the_decoder_as_in_peft() {
    check_against_reference(
        "prompt_t8",
        "prompt_reference.json",
        "prompt",
        &[8, 576],
        (0, " positive", 0.05),
    );
}

/// Prefix tuning on the decoder: PEFT's prefix (scripts/decoder_prefix_reference.py; grouped-query layout,
/// 3 key/value heads) goes in as cached past keys and values, unrotated, with the text's positions starting
/// after it; the verbalizers' log-likelihoods of a left-padded batch match transformers + PEFT within 1e-4.
/// Its gradients (the table is one tensor, differentiated through every layer's attention) match finite
/// differences.
#[test]
fn a_peft_prefix_tuning_adapter_runs_and_trains_on_the_decoder_as_in_peft() {
    let (e, prefix, labels, inputs) = check_against_reference(
        "prefix_t6",
        "prefix_reference.json",
        "prefix",
        &[6, 30 * 2 * 192],
        (1, " negative", 0.5),
    );
    check_gradients(&e, &prefix, &labels, &inputs);
}

/// Biased Llama-family decoders from Hugging Face folders (scripts/decoder_tiny_reference.py): a Qwen2
/// (biases on q, k, v; `rope_parameters` as transformers 5 writes them; tied head) and a Llama with
/// `attention_bias` and `mlp_bias` (biases on all seven linear layers). Logits of a left-padded batch of
/// three sequences match transformers within 1e-4 at every real position, with the same argmax over the
/// vocabulary; `save_hf_folder` writes them back (model_type and biases kept) and they reload identically.
#[test]
fn biased_decoders_qwen2_and_llama_with_biases_load_from_hugging_face_folders() {
    use candle_core::DType;
    let r: Value = serde_json::from_slice(
        &std::fs::read(root().join("tests/fixtures/decoder/tiny_reference.json")).unwrap(),
    )
    .unwrap();
    let seqs: Vec<Vec<u32>> = serde_json::from_value(r["sequences"].clone()).unwrap();
    let n = seqs.iter().map(Vec::len).max().unwrap();
    let ids: Vec<u32> = seqs
        .iter()
        .flat_map(|s| std::iter::repeat_n(0, n - s.len()).chain(s.iter().copied()))
        .collect();
    let mask: Vec<u32> = seqs
        .iter()
        .flat_map(|s| std::iter::repeat_n(0, n - s.len()).chain(std::iter::repeat_n(1, s.len())))
        .collect();
    let ids = Tensor::from_vec(ids, (seqs.len(), n), &Device::Cpu).unwrap();
    let mask = Tensor::from_vec(mask, (seqs.len(), n), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let logits_of = |m: &LlamaModel| -> Vec<Vec<Vec<f32>>> {
        m.forward(&ids, Some(&mask))
            .unwrap()
            .to_vec3::<f32>()
            .unwrap()
    };
    let tmp = tempfile::tempdir().unwrap();
    for (name, model_type, biased) in [
        (
            "qwen2_tiny",
            "qwen2",
            [true, true, true, false, false, false, false],
        ),
        ("llama_biased_tiny", "llama", [true; 7]),
    ] {
        let m = LlamaModel::from_hf_folder(
            &root().join("tests/fixtures/decoder").join(name),
            &Device::Cpu,
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(m.config.linear_bias, biased, "{name}");
        assert_eq!(m.config.model_type, model_type);
        let got = logits_of(&m);
        let (want, argmax) = (&r[name]["logits"], &r[name]["argmax"]);
        for (i, s) in seqs.iter().enumerate() {
            for p in 0..s.len() {
                let row = &got[i][n - s.len() + p];
                for (j, w) in want[i][p].as_array().unwrap().iter().enumerate() {
                    let w = w.as_f64().unwrap();
                    assert!(
                        (row[j] as f64 - w).abs() < 1e-4,
                        "{name}, sequence {i}, position {p}, logit {j}: {} vs {w}",
                        row[j]
                    );
                }
                let best = (0..row.len())
                    .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                    .unwrap();
                assert_eq!(best as u64, argmax[i][p].as_u64().unwrap(), "{name}");
            }
        }
        let out = tmp.path().join(name);
        m.save_hf_folder(&out).unwrap();
        let again = LlamaModel::from_hf_folder(&out, &Device::Cpu).unwrap();
        assert_eq!(again.config, m.config, "{name}");
        assert_eq!(logits_of(&again), got, "{name}");
    }
}

/// A frozen base held in bf16 (`EngineOptions::base_dtype`, `--dtype bf16`): the embeddings, linear
/// layers and head take half the memory, activations and adapters stay f32, and the model scores and
/// trains as the f32 one up to the weights' rounding: the verbalizers' log-likelihoods, bare and with
/// PEFT's LoRA, stay close to transformers' f32 ones, the label chosen on real test texts is the f32
/// engine's, and LoRA gradients through the bf16 base match finite differences and point where the f32
/// base's do. An encoder refuses a bf16 base, naming the fix.
#[test]
fn a_bf16_base_halves_the_weights_and_scores_and_trains_as_the_f32_one() {
    use peftdb::engine::{Engine, EngineOptions, ScoreOptions};
    use peftdb::object::DType;
    let load = |base_dtype: DType| {
        Engine::load_with(
            &gguf(),
            &Device::Cpu,
            &EngineOptions {
                max_len: 64,
                prompt: "{text}".into(),
                base_dtype,
                ..Default::default()
            },
        )
        .expect("the GGUF loads")
    };
    let (half, full) = (load(DType::BF16), load(DType::F32));
    let bytes = |e: &Engine| -> usize {
        let peftdb::engine::Backbone::Decoder(m) = &e.model else {
            panic!("a decoder")
        };
        m.named_weights()
            .iter()
            .map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    };
    let peftdb::engine::Backbone::Decoder(m) = &half.model else {
        panic!("a decoder")
    };
    assert_eq!(m.base_dtype(), candle_core::DType::BF16);
    for (name, t) in m.named_weights() {
        let want = if name.ends_with("norm.weight") {
            candle_core::DType::F32
        } else {
            candle_core::DType::BF16
        };
        assert_eq!(t.dtype(), want, "{name}");
    }
    let ratio = bytes(&half) as f64 / bytes(&full) as f64;
    assert!((0.5..0.501).contains(&ratio), "bf16 / f32 bytes {ratio}");

    // Against transformers in f32: bare and with the PEFT LoRA on all seven modules.
    let worst = reference_loglik_errors(&half)
        .into_iter()
        .map(|(_, _, e)| e)
        .fold(0f64, f64::max);
    eprintln!("bf16 base: worst log-likelihood difference from transformers in f32 {worst:.4}");
    assert!(worst < 0.15, "{worst}");

    // Real test texts: the same label as the f32 engine on (nearly) every one.
    let t = peftdb::task::Task::load(&common::task_dir("movie_sentiment")).unwrap();
    let texts: Vec<&str> = t.test[..24].iter().map(|x| x.text.as_str()).collect();
    let opts = ScoreOptions::default();
    let score = |e: &Engine| {
        let ids = e.tokenize(&texts).unwrap();
        let labels = e.tokenize_labels(&t.label_texts()).unwrap();
        e.score(None, &labels, &ids, &opts).unwrap().probs
    };
    let (ph, pf) = (score(&half), score(&full));
    let argmax = |p: &Vec<f32>| {
        p.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0
    };
    let same = ph
        .iter()
        .zip(&pf)
        .filter(|(a, b)| argmax(a) == argmax(b))
        .count();
    let dp = ph
        .iter()
        .flatten()
        .zip(pf.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!("bf16 base: {same}/24 labels as f32, largest probability difference {dp:.4}");
    assert!(same >= 23 && dp < 0.1, "{same}/24, {dp}");

    // Training through the bf16 base: gradients match finite differences and the f32 base's direction.
    let mut obj = lora_fixture();
    obj.tensors.retain(|t| {
        (t.name.contains("layers.3.") || t.name.contains("layers.17."))
            && (t.name.contains("q_proj") || t.name.contains("v_proj"))
    });
    let inputs = half
        .tokenize(&["a wonderful, moving film", "dull"])
        .unwrap();
    let labels = half
        .tokenize_labels(&["positive", "very bad indeed"])
        .unwrap();
    check_gradients(&half, &obj, &labels, &inputs);
    let flat = |e: &Engine| -> Vec<f32> {
        let g = e
            .ce_gradients(&obj, &labels, &inputs, &[0, 1], &opts)
            .unwrap();
        g.grads.into_iter().flat_map(|(_, v)| v).collect()
    };
    let (gh, gf) = (flat(&half), flat(&full));
    let dot: f64 = gh.iter().zip(&gf).map(|(a, b)| (a * b) as f64).sum();
    let norm = |v: &[f32]| v.iter().map(|x| (x * x) as f64).sum::<f64>().sqrt();
    let cos = dot / (norm(&gh) * norm(&gf));
    eprintln!("bf16 base: gradient cosine with the f32 base's {cos:.5}");
    assert!(cos > 0.99, "{cos}");

    // The LoRA merge keeps the base's dtype.
    assert_eq!(
        m.with_lora(&lora_fixture()).unwrap().base_dtype(),
        candle_core::DType::BF16
    );

    // An encoder is refused, naming the fix.
    let err = Engine::load_with(
        &common::model_dir(),
        &Device::Cpu,
        &EngineOptions {
            base_dtype: DType::BF16,
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("decoder") && err.contains("f32"), "{err}");
    // The CLI: the same refusal (exit 1), and a dtype it does not know is a usage error (exit 2).
    let eval = |model: &Path, dtype: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_peftdb"))
            .arg("eval")
            .arg("--model")
            .arg(model)
            .arg("--task")
            .arg(common::task_dir("movie_sentiment"))
            .args(["--dtype", dtype])
            .output()
            .unwrap()
    };
    let o = eval(&common::model_dir(), "bf16");
    let msg = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{msg}");
    assert!(msg.contains("decoder models only"), "{msg}");
    let o = eval(&gguf(), "f64");
    let msg = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{msg}");
    assert!(msg.contains("f32, bf16 or f16"), "{msg}");
}

/// `--matmul bf16` (an encoder's frozen products in bf16) from the CLI: the encoder evaluates a task to
/// within one example in 100 of f32's accuracy, a decoder is refused naming the option it has instead
/// (`--dtype`), and an unknown precision is a usage error.
#[test]
fn cli_matmul_bf16_evaluates_encoders_and_refuses_decoders() {
    let eval = |model: &Path, matmul: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_peftdb"))
            .args(["eval", "--json", "--split", "dev", "--max-len", "64"])
            .arg("--model")
            .arg(model)
            .arg("--task")
            .arg(common::task_dir("movie_sentiment"))
            .args(["--matmul", matmul])
            .output()
            .unwrap()
    };
    let acc = |o: std::process::Output| -> f64 {
        let v: serde_json::Value = serde_json::from_slice(&common::stdout_of(o)).unwrap();
        v["accuracy"].as_f64().unwrap()
    };
    let exact = acc(eval(&common::model_dir(), "f32"));
    let half = acc(eval(&common::model_dir(), "bf16"));
    eprintln!("movie_sentiment dev: accuracy {exact:.3} (f32 products), {half:.3} (bf16)");
    assert!(exact > 0.6, "{exact}");
    assert!((half - exact).abs() <= 0.01, "bf16 {half} vs f32 {exact}");
    let o = eval(&gguf(), "bf16");
    let msg = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{msg}");
    assert!(
        msg.contains("encoder models") && msg.contains("--dtype bf16"),
        "{msg}"
    );
    let o = eval(&common::model_dir(), "f16");
    let msg = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{msg}");
    assert!(msg.contains("f32 (exact) or bf16"), "{msg}");
}
