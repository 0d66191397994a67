//! On-disk adapter formats: reading a folder into a [`LightweightObject`] and writing one back.
//!
//! | format | config | weights |
//! |---|---|---|
//! | Hugging Face PEFT (LoRA, IA3, prefix, prompt) | `adapter_config.json` with `peft_type` | `adapter_model.safetensors` |
//! | peftdb BitFit bias set | `adapter_config.json` with `"peft_type": "BITFIT"` (schema/bitfit_config.schema.json) | `adapter_model.safetensors` (bias tensors) |
//! | AdapterHub bottleneck adapter | `adapter_config.json` with a `config` object (`reduction_factor`, `mh_adapter`, ...) | `adapter.safetensors` (or `adapter_model.safetensors`) |
//!
//! Pickle weights (`.bin`, `.pt`, `.pth`, `.ckpt`) are never opened: the error explains how to convert them.
//! Writing is atomic: files go to a temporary sibling folder that is renamed into place, so the output
//! folder appears complete or not at all.

use super::layout::{parse_tensor_name, Role};
use super::peft_config;
use super::safetensors_io;
use super::{
    BitFitConfig, BottleneckConfig, Ia3Config, LightweightObject, LoraBias, LoraConfig, Method,
    PrefixConfig, PromptConfig,
};
use crate::error::{ExportError, ReadError};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The largest adapter_config.json read (a larger one is a JSON bomb, not a config).
pub const MAX_CONFIG_BYTES: u64 = 4 * 1024 * 1024;
/// The largest weights file read (16 GiB).
pub const MAX_WEIGHTS_BYTES: u64 = 16 * 1024 * 1024 * 1024;

/// Which on-disk format an object came from and is written as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdapterFormat {
    Peft,
    Bitfit,
    Adapterhub,
}

impl AdapterFormat {
    /// Name of the weights file this format writes.
    pub fn weights_file(self) -> &'static str {
        match self {
            AdapterFormat::Peft | AdapterFormat::Bitfit => "adapter_model.safetensors",
            AdapterFormat::Adapterhub => "adapter.safetensors",
        }
    }
}

/// Options of [`read_adapter`].
#[derive(Debug, Clone, Default)]
pub struct ReadOptions {
    /// Store tensors holding NaN or infinite values instead of rejecting them.
    pub allow_non_finite: bool,
    /// Base model to record when the config does not name one (or to override it).
    pub base_model: Option<String>,
}

const PICKLE_EXT: &[&str] = &["bin", "pt", "pth", "ckpt", "pkl", "pickle"];

fn is_pickle(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .map(|e| PICKLE_EXT.contains(&e.to_ascii_lowercase().as_str()))
        .unwrap_or(false)
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ReadError + '_ {
    move |source| ReadError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Read a file, refusing it when larger than `limit` (checked before and while reading).
fn read_limited(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>, ReadError> {
    let mut buf = Vec::new();
    read_limited_into(path, limit, what, &mut buf)?;
    Ok(buf)
}

/// A buffer kept per thread up to this size (its memory stays mapped from one file to the next; a fresh
/// one per file was 3% of ingesting a zoo, mostly the kernel zeroing new pages); a larger file's buffer
/// is freed after use.
const REUSED_READ_BUFFER: usize = 16 << 20;

thread_local! {
    static READ_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// [`read_limited`], handing `f` the bytes in this thread's reused buffer.
fn with_file_bytes<R>(
    path: &Path,
    limit: u64,
    what: &str,
    f: impl FnOnce(&[u8]) -> R,
) -> Result<R, ReadError> {
    crate::memory::with_reused_buffer(&READ_BUFFER, REUSED_READ_BUFFER, |buf| {
        read_limited_into(path, limit, what, buf).map(|()| f(buf))
    })
}

/// [`read_limited`] into `buf` (cleared first).
fn read_limited_into(
    path: &Path,
    limit: u64,
    what: &str,
    buf: &mut Vec<u8>,
) -> Result<(), ReadError> {
    buf.clear();
    let f = fs::File::open(path).map_err(io_err(path))?;
    let len = f.metadata().map_err(io_err(path))?.len();
    if len > limit {
        return Err(ReadError::Config {
            path: path.to_path_buf(),
            reason: format!("{what} is {len} bytes, over the {limit}-byte limit"),
        });
    }
    buf.reserve(len as usize);
    f.take(limit + 1).read_to_end(buf).map_err(io_err(path))?;
    if buf.len() as u64 > limit {
        return Err(ReadError::Config {
            path: path.to_path_buf(),
            reason: format!("{what} grew past the {limit}-byte limit while being read"),
        });
    }
    Ok(())
}

/// Whether a folder looks like an adapter (has an adapter_config.json).
pub fn is_adapter_dir(dir: &Path) -> bool {
    dir.join("adapter_config.json").is_file()
}

/// Read an adapter folder (any supported format) into a validated [`LightweightObject`].
pub fn read_adapter(dir: &Path, opts: &ReadOptions) -> Result<LightweightObject, ReadError> {
    if dir.is_file() {
        if is_pickle(dir) {
            return Err(ReadError::PickleRefused {
                path: dir.to_path_buf(),
            });
        }
        return Err(ReadError::NotAnAdapter {
            path: dir.to_path_buf(),
        });
    }
    let cfg_path = dir.join("adapter_config.json");
    if !cfg_path.is_file() {
        if !dir.exists() {
            return Err(ReadError::Io {
                path: dir.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such folder"),
            });
        }
        return Err(ReadError::NotAnAdapter {
            path: dir.to_path_buf(),
        });
    }
    let config_json = read_limited(&cfg_path, MAX_CONFIG_BYTES, "adapter_config.json")?;
    let cfg: Value = serde_json::from_slice(&config_json).map_err(|e| ReadError::Config {
        path: cfg_path.clone(),
        reason: format!("not valid JSON: {e}"),
    })?;
    let obj = cfg.as_object().ok_or_else(|| ReadError::Config {
        path: cfg_path.clone(),
        reason: "the top level must be a JSON object".into(),
    })?;

    let (format, weights_names): (AdapterFormat, &[&str]) = if let Some(pt) = obj.get("peft_type") {
        let pt = pt.as_str().ok_or_else(|| ReadError::Config {
            path: cfg_path.clone(),
            reason: "peft_type must be a string".into(),
        })?;
        match pt {
            "LORA" | "IA3" | "PREFIX_TUNING" | "PROMPT_TUNING" => {
                (AdapterFormat::Peft, &["adapter_model.safetensors"])
            }
            "BITFIT" => (AdapterFormat::Bitfit, &["adapter_model.safetensors"]),
            other => {
                return Err(ReadError::UnknownPeftType {
                    path: cfg_path,
                    peft_type: other.to_string(),
                })
            }
        }
    } else if obj.get("config").map(|c| c.is_object()).unwrap_or(false) {
        (
            AdapterFormat::Adapterhub,
            &["adapter.safetensors", "adapter_model.safetensors"],
        )
    } else {
        return Err(ReadError::Config {
            path: cfg_path,
            reason: "no peft_type (PEFT) and no config object (AdapterHub)".into(),
        });
    };

    if format == AdapterFormat::Peft {
        // The fields PEFT reads must have the types and values PEFT accepts, or the export would not load.
        peft_config::check(obj, &cfg_path)?;
    }

    let weights_path = weights_names
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file());
    let weights_path = match weights_path {
        Some(p) => p,
        None => {
            // A pickle next to the config gets the conversion message.
            if let Ok(rd) = fs::read_dir(dir) {
                for e in rd.flatten() {
                    let p = e.path();
                    if p.is_file() && is_pickle(&p) {
                        return Err(ReadError::PickleRefused { path: p });
                    }
                }
            }
            return Err(ReadError::MissingWeights {
                dir: dir.to_path_buf(),
                expected: weights_names.join(" or "),
            });
        }
    };
    let st = with_file_bytes(
        &weights_path,
        MAX_WEIGHTS_BYTES,
        "weights file",
        safetensors_io::parse,
    )?
    .map_err(|source| ReadError::Safetensors {
        path: weights_path.clone(),
        source,
    })?;
    let mut tensors = st.tensors;
    if tensors.is_empty() {
        return Err(ReadError::Empty { path: weights_path });
    }
    // Keep data order (the order a byte-identical export writes).
    for w in tensors.windows(2) {
        if w[0].dtype != w[1].dtype {
            return Err(ReadError::MixedDtypes {
                path: weights_path.clone(),
                first: w[0].name.clone(),
                first_dtype: w[0].dtype,
                second: w[1].name.clone(),
                second_dtype: w[1].dtype,
            });
        }
    }
    if !opts.allow_non_finite {
        for t in &tensors {
            if let Some(index) = t.first_non_finite() {
                return Err(ReadError::NonFinite {
                    path: weights_path.clone(),
                    tensor: t.name.clone(),
                    index,
                });
            }
        }
    }

    let base_model = opts
        .base_model
        .clone()
        .or_else(|| {
            obj.get("base_model_name_or_path")
                .or_else(|| obj.get("model_name"))
                .and_then(|v| v.as_str())
                .map(str::to_string)
        })
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ReadError::Config {
            path: cfg_path.clone(),
            reason: "no base model named (set base_model_name_or_path, or pass --base-model)"
                .into(),
        })?;

    let method = match format {
        AdapterFormat::Peft | AdapterFormat::Bitfit => {
            // A module of `modules_to_save` is stored as saved (a whole trained copy), not checked
            // against the method's tensor rules.
            let saved = get_modules(obj, "modules_to_save");
            let own: Vec<&super::Tensor> = tensors
                .iter()
                .filter(|t| !super::is_saved_module_tensor(&t.name, &saved))
                .collect();
            if own.is_empty() {
                return Err(ReadError::MissingTensor {
                    path: weights_path,
                    reason: format!(
                        "only tensors of the modules it saves whole (modules_to_save {saved:?}), none \
                         of the adapter's own"
                    ),
                });
            }
            parse_peft_method(obj, &cfg_path, &weights_path, &own)?
        }
        AdapterFormat::Adapterhub => {
            let all: Vec<&super::Tensor> = tensors.iter().collect();
            parse_adapterhub(obj, &cfg_path, &weights_path, &all)?
        }
    };
    tensors.shrink_to_fit();
    Ok(LightweightObject {
        method,
        base_model,
        format,
        tensors,
        metadata: st.metadata,
        config_json,
    })
}

fn cfg_err(path: &Path, reason: impl Into<String>) -> ReadError {
    ReadError::Config {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn get_usize(
    obj: &serde_json::Map<String, Value>,
    key: &str,
    path: &Path,
) -> Result<usize, ReadError> {
    // Present values were type-checked by `peft_config::check`; what is left is a missing (or null) field
    // that peftdb needs for its shape checks.
    obj.get(key)
        .and_then(|v| v.as_u64())
        .map(|v| v as usize)
        .ok_or_else(|| {
            cfg_err(
                path,
                format!(
                    "{key} is missing or not a non-negative integer; peftdb needs it to check the weights' \
                     shapes (write it as PEFT's save_pretrained does, e.g. from the base model's config)"
                ),
            )
        })
}

/// `num_transformer_submodules` as PEFT uses it: null or missing means 2 for SEQ_2_SEQ_LM, else 1
/// (`PeftModel._setup_prompt_encoder`).
fn transformer_submodules(obj: &serde_json::Map<String, Value>) -> usize {
    match obj
        .get("num_transformer_submodules")
        .and_then(|v| v.as_u64())
    {
        Some(n) => n as usize,
        None if obj.get("task_type").and_then(|v| v.as_str()) == Some("SEQ_2_SEQ_LM") => 2,
        None => 1,
    }
}

fn get_modules(obj: &serde_json::Map<String, Value>, key: &str) -> Vec<String> {
    match obj.get(key) {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        Some(Value::String(s)) => vec![s.clone()],
        _ => Vec::new(),
    }
}

fn parse_peft_method(
    obj: &serde_json::Map<String, Value>,
    cfg_path: &Path,
    wpath: &Path,
    tensors: &[&super::Tensor],
) -> Result<Method, ReadError> {
    let pt = obj["peft_type"].as_str().unwrap_or_default();
    let unexpected = |t: &super::Tensor, method: &str, reason: &str| ReadError::UnexpectedTensor {
        path: wpath.to_path_buf(),
        tensor: t.name.clone(),
        method: method.into(),
        reason: reason.into(),
    };
    match pt {
        "LORA" => {
            let r = get_usize(obj, "r", cfg_path)?;
            if r == 0 {
                return Err(cfg_err(cfg_path, "r must be at least 1"));
            }
            let alpha = obj
                .get("lora_alpha")
                .and_then(|v| v.as_f64())
                .ok_or_else(|| cfg_err(cfg_path, "lora_alpha must be a number"))?;
            let mut rank_pattern = BTreeMap::new();
            if let Some(Value::Object(m)) = obj.get("rank_pattern") {
                for (k, v) in m {
                    let v = v.as_u64().filter(|v| *v > 0).ok_or_else(|| {
                        cfg_err(
                            cfg_path,
                            format!("rank_pattern[{k:?}] must be a positive integer"),
                        )
                    })?;
                    rank_pattern.insert(k.clone(), v as usize);
                }
            }
            let mut alpha_pattern = BTreeMap::new();
            if let Some(Value::Object(m)) = obj.get("alpha_pattern") {
                for (k, v) in m {
                    let v = v.as_f64().ok_or_else(|| {
                        cfg_err(cfg_path, format!("alpha_pattern[{k:?}] must be a number"))
                    })?;
                    alpha_pattern.insert(k.clone(), v);
                }
            }
            let bias = match obj.get("bias").and_then(|v| v.as_str()).unwrap_or("none") {
                "none" => LoraBias::None,
                "all" => LoraBias::All,
                "lora_only" => LoraBias::LoraOnly,
                other => return Err(cfg_err(cfg_path, format!("unknown bias mode {other:?}"))),
            };
            if obj
                .get("use_dora")
                .and_then(|v| v.as_bool())
                .unwrap_or(false)
            {
                return Err(cfg_err(
                    cfg_path,
                    "DoRA (use_dora) adapters are not supported yet",
                ));
            }
            let cfg = LoraConfig {
                r,
                alpha,
                use_rslora: obj
                    .get("use_rslora")
                    .and_then(|v| v.as_bool())
                    .unwrap_or(false),
                rank_pattern,
                alpha_pattern,
                target_modules: get_modules(obj, "target_modules"),
                bias,
            };
            validate_lora(&cfg, wpath, tensors)?;
            Ok(Method::Lora(cfg))
        }
        "IA3" => {
            for t in tensors {
                let loc = parse_tensor_name(&t.name);
                if loc.role != Role::Ia3 {
                    return Err(unexpected(t, "IA3", "only ia3_l tensors are expected"));
                }
                let ok = t.shape.len() == 2 && (t.shape[0] == 1 || t.shape[1] == 1);
                if !ok {
                    return Err(ReadError::ShapeMismatch {
                        path: wpath.to_path_buf(),
                        tensor: t.name.clone(),
                        expected: "a vector shaped (n, 1) or (1, n)".into(),
                        found: t.shape.clone(),
                    });
                }
            }
            Ok(Method::Ia3(Ia3Config {
                target_modules: get_modules(obj, "target_modules"),
                feedforward_modules: get_modules(obj, "feedforward_modules"),
            }))
        }
        "PREFIX_TUNING" => {
            let cfg = PrefixConfig {
                num_virtual_tokens: get_usize(obj, "num_virtual_tokens", cfg_path)?,
                num_layers: get_usize(obj, "num_layers", cfg_path)?,
                token_dim: get_usize(obj, "token_dim", cfg_path)?,
                num_attention_heads: get_usize(obj, "num_attention_heads", cfg_path)?,
                prefix_projection: obj
                    .get("prefix_projection")
                    .and_then(|v| v.as_bool())
                    .unwrap_or(false),
            };
            if transformer_submodules(obj) != 1 {
                return Err(cfg_err(
                    cfg_path,
                    "num_transformer_submodules != 1 (encoder-decoder prefixes; null with task_type \
                     SEQ_2_SEQ_LM means 2) is not supported yet",
                ));
            }
            let t = single_prompt_table(tensors, wpath, "prefix tuning")?;
            let want = [cfg.num_virtual_tokens, cfg.num_layers * 2 * cfg.token_dim];
            if t.shape != want {
                return Err(ReadError::ShapeMismatch {
                    path: wpath.to_path_buf(),
                    tensor: t.name.clone(),
                    expected: format!("{want:?} (num_virtual_tokens, num_layers x 2 x token_dim)"),
                    found: t.shape.clone(),
                });
            }
            Ok(Method::Prefix(cfg))
        }
        "PROMPT_TUNING" => {
            let cfg = PromptConfig {
                num_virtual_tokens: get_usize(obj, "num_virtual_tokens", cfg_path)?,
                token_dim: get_usize(obj, "token_dim", cfg_path)?,
            };
            let subs = transformer_submodules(obj);
            let t = single_prompt_table(tensors, wpath, "prompt tuning")?;
            let want = [cfg.num_virtual_tokens * subs.max(1), cfg.token_dim];
            if t.shape != want {
                return Err(ReadError::ShapeMismatch {
                    path: wpath.to_path_buf(),
                    tensor: t.name.clone(),
                    expected: format!("{want:?} (num_virtual_tokens, token_dim)"),
                    found: t.shape.clone(),
                });
            }
            Ok(Method::Prompt(cfg))
        }
        "BITFIT" => {
            for t in tensors {
                if parse_tensor_name(&t.name).role != Role::Bias || t.shape.len() != 1 {
                    return Err(unexpected(
                        t,
                        "BitFit",
                        "only 1-D tensors named *.bias are expected",
                    ));
                }
            }
            Ok(Method::Bitfit(BitFitConfig {}))
        }
        _ => unreachable!("peft_type checked by the caller"),
    }
}

fn single_prompt_table<'a>(
    tensors: &[&'a super::Tensor],
    wpath: &Path,
    what: &str,
) -> Result<&'a super::Tensor, ReadError> {
    let mut it = tensors.iter();
    let t = *it.next().expect("non-empty checked");
    if let Some(extra) = it.next() {
        return Err(ReadError::UnexpectedTensor {
            path: wpath.to_path_buf(),
            tensor: extra.name.clone(),
            method: what.into(),
            reason: "expected a single prompt_embeddings tensor".into(),
        });
    }
    if parse_tensor_name(&t.name).role != Role::PromptEmbeddings || t.shape.len() != 2 {
        return Err(ReadError::UnexpectedTensor {
            path: wpath.to_path_buf(),
            tensor: t.name.clone(),
            method: what.into(),
            reason: "expected a 2-D tensor named prompt_embeddings".into(),
        });
    }
    Ok(t)
}

/// LoRA: every tensor is an A, a B or (with a bias mode) a bias; A and B come in pairs with matching rank,
/// and each rank is the one the config (r or rank_pattern) gives for that module.
fn validate_lora(
    cfg: &LoraConfig,
    wpath: &Path,
    tensors: &[&super::Tensor],
) -> Result<(), ReadError> {
    // module_path -> (A shape, B shape)
    let mut pairs: BTreeMap<String, (Option<&super::Tensor>, Option<&super::Tensor>)> =
        BTreeMap::new();
    for t in tensors {
        let loc = parse_tensor_name(&t.name);
        match loc.role {
            Role::LoraA | Role::LoraEmbeddingA => {
                pairs.entry(loc.module_path).or_default().0 = Some(t)
            }
            Role::LoraB | Role::LoraEmbeddingB => {
                pairs.entry(loc.module_path).or_default().1 = Some(t)
            }
            Role::Bias if cfg.bias != LoraBias::None => {
                if t.shape.len() != 1 {
                    return Err(ReadError::ShapeMismatch {
                        path: wpath.to_path_buf(),
                        tensor: t.name.clone(),
                        expected: "a 1-D bias".into(),
                        found: t.shape.clone(),
                    });
                }
            }
            _ => {
                return Err(ReadError::UnexpectedTensor {
                    path: wpath.to_path_buf(),
                    tensor: t.name.clone(),
                    method: "LoRA".into(),
                    reason: if cfg.bias == LoraBias::None {
                        "not a lora_A/lora_B tensor, and the config says bias=\"none\"".into()
                    } else {
                        "not a lora_A/lora_B tensor or a bias".into()
                    },
                })
            }
        }
    }
    for (module, (a, b)) in &pairs {
        let (a, b) = match (a, b) {
            (Some(a), Some(b)) => (a, b),
            (Some(t), None) | (None, Some(t)) => {
                return Err(ReadError::MissingTensor {
                    path: wpath.to_path_buf(),
                    reason: format!(
                        "{:?} has no matching lora_{} tensor",
                        t.name,
                        if a.is_some() { "B" } else { "A" }
                    ),
                })
            }
            (None, None) => continue,
        };
        if a.shape.len() != 2 || b.shape.len() != 2 {
            return Err(ReadError::ShapeMismatch {
                path: wpath.to_path_buf(),
                tensor: if a.shape.len() != 2 { &a.name } else { &b.name }.clone(),
                expected: "a 2-D matrix".into(),
                found: if a.shape.len() != 2 {
                    &a.shape
                } else {
                    &b.shape
                }
                .clone(),
            });
        }
        let embedding = parse_tensor_name(&a.name).role == Role::LoraEmbeddingA;
        // Linear: A (r, in), B (out, r). Embedding: A (r, vocab), B (dim, r) as PEFT stores them.
        let (r_a, r_b) = (a.shape[0], b.shape[1]);
        let _ = embedding;
        let (want, _) = cfg.rank_alpha_for(module);
        if r_a != want {
            return Err(ReadError::ShapeMismatch {
                path: wpath.to_path_buf(),
                tensor: a.name.clone(),
                expected: format!(
                    "rank {want} (r / rank_pattern for {module}) as the first dimension"
                ),
                found: a.shape.clone(),
            });
        }
        if r_b != want {
            return Err(ReadError::ShapeMismatch {
                path: wpath.to_path_buf(),
                tensor: b.name.clone(),
                expected: format!(
                    "rank {want} (r / rank_pattern for {module}) as the second dimension"
                ),
                found: b.shape.clone(),
            });
        }
    }
    if pairs.is_empty() {
        return Err(ReadError::MissingTensor {
            path: wpath.to_path_buf(),
            reason: "a LoRA adapter without any lora_A/lora_B tensor".into(),
        });
    }
    Ok(())
}

fn parse_adapterhub(
    obj: &serde_json::Map<String, Value>,
    cfg_path: &Path,
    wpath: &Path,
    tensors: &[&super::Tensor],
) -> Result<Method, ReadError> {
    let c = obj["config"].as_object().expect("checked by caller");
    let mut name: Option<String> = obj.get("name").and_then(|v| v.as_str()).map(str::to_string);
    let mut bottleneck = None;
    let mut hidden = None;
    let (mut mh, mut out) = (false, false);
    for t in tensors {
        let loc = parse_tensor_name(&t.name);
        let is_adapter = matches!(
            loc.role,
            Role::AdapterDownWeight
                | Role::AdapterDownBias
                | Role::AdapterUpWeight
                | Role::AdapterUpBias
        );
        if !is_adapter || loc.layer.is_none() {
            return Err(ReadError::UnexpectedTensor {
                path: wpath.to_path_buf(),
                tensor: t.name.clone(),
                method: "bottleneck adapter".into(),
                reason: "expected ...layer.{i}...adapters.{name}.adapter_down/adapter_up tensors"
                    .into(),
            });
        }
        // module is e.g. "output.adapters.sst-2" or "attention.output.adapters.sst-2"
        let (placement, aname) = match loc.module.rsplit_once(".adapters.") {
            Some(x) => x,
            None => {
                return Err(ReadError::UnexpectedTensor {
                    path: wpath.to_path_buf(),
                    tensor: t.name.clone(),
                    method: "bottleneck adapter".into(),
                    reason: "no `.adapters.{name}.` segment".into(),
                })
            }
        };
        match name.as_deref() {
            None => name = Some(aname.to_string()),
            Some(n) if n == aname => {}
            Some(n) => {
                return Err(ReadError::UnexpectedTensor {
                    path: wpath.to_path_buf(),
                    tensor: t.name.clone(),
                    method: "bottleneck adapter".into(),
                    reason: format!(
                        "adapter name {aname:?} differs from {n:?}; one adapter per folder"
                    ),
                })
            }
        }
        if placement == "attention.output" {
            mh = true;
        } else if placement == "output" {
            out = true;
        }
        if loc.role == Role::AdapterDownWeight {
            if t.shape.len() != 2 {
                return Err(ReadError::ShapeMismatch {
                    path: wpath.to_path_buf(),
                    tensor: t.name.clone(),
                    expected: "(bottleneck, hidden)".into(),
                    found: t.shape.clone(),
                });
            }
            match (bottleneck, hidden) {
                (None, None) => {
                    bottleneck = Some(t.shape[0]);
                    hidden = Some(t.shape[1]);
                }
                (Some(b), Some(h)) if (b, h) == (t.shape[0], t.shape[1]) => {}
                (Some(b), Some(h)) => {
                    return Err(ReadError::ShapeMismatch {
                        path: wpath.to_path_buf(),
                        tensor: t.name.clone(),
                        expected: format!("[{b}, {h}] like the other down-projections"),
                        found: t.shape.clone(),
                    })
                }
                _ => unreachable!(),
            }
        }
    }
    let (bottleneck, hidden) = match (bottleneck, hidden) {
        (Some(b), Some(h)) => (b, h),
        _ => {
            return Err(ReadError::MissingTensor {
                path: wpath.to_path_buf(),
                reason: "no adapter_down weight".into(),
            })
        }
    };
    if let Some(h) = obj.get("hidden_size").and_then(|v| v.as_u64()) {
        if h as usize != hidden {
            return Err(cfg_err(
                cfg_path,
                format!("hidden_size {h} but adapter_down weights are {hidden} wide"),
            ));
        }
    }
    if let Some(rf) = c.get("reduction_factor").and_then(|v| v.as_f64()) {
        if rf > 0.0 && ((hidden as f64 / rf).round() as usize).max(1) != bottleneck {
            return Err(ReadError::ShapeMismatch {
                path: wpath.to_path_buf(),
                tensor: "adapter_down".into(),
                expected: format!(
                    "bottleneck {} (hidden {hidden} / reduction_factor {rf})",
                    (hidden as f64 / rf).round()
                ),
                found: vec![bottleneck, hidden],
            });
        }
    }
    let non_linearity = c
        .get("non_linearity")
        .and_then(|v| v.as_str())
        .unwrap_or("relu")
        .to_ascii_lowercase();
    Ok(Method::Adapter(BottleneckConfig {
        name: name.unwrap_or_default(),
        hidden_size: hidden,
        bottleneck_size: bottleneck,
        non_linearity,
        mh_adapter: c.get("mh_adapter").and_then(|v| v.as_bool()).unwrap_or(mh),
        output_adapter: c
            .get("output_adapter")
            .and_then(|v| v.as_bool())
            .unwrap_or(out),
    }))
}

/// Write an object as a folder in its format: the verbatim config and a safetensors file with the tensors
/// in stored order. `dir` must not exist, or be an empty folder. Atomic: written to a temporary sibling and
/// renamed into place.
pub fn write_adapter(obj: &LightweightObject, dir: &Path) -> Result<(), ExportError> {
    write_adapter_with(obj, dir, &[])
}

/// The rule for an output folder of [`write_adapter`]: it must not exist, or be an empty folder. Callers
/// that compute for a while before writing (`suggest`, `train`) check it first, so a bad `--out` fails
/// at once rather than after the work.
pub fn check_output_dir(dir: &Path) -> Result<(), ExportError> {
    if dir.exists() {
        let empty = dir.is_dir()
            && fs::read_dir(dir)
                .map_err(|source| ExportError::Io {
                    path: dir.to_path_buf(),
                    source,
                })?
                .next()
                .is_none();
        if !empty {
            return Err(ExportError::TargetExists {
                path: dir.to_path_buf(),
            });
        }
    }
    Ok(())
}

/// [`write_adapter`], with extra files (name, bytes) written into the same folder before it is renamed into
/// place, so they appear together with the adapter or not at all.
pub fn write_adapter_with(
    obj: &LightweightObject,
    dir: &Path,
    extras: &[(&str, &[u8])],
) -> Result<(), ExportError> {
    let ioe = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ExportError::Io { path, source }
    };
    check_output_dir(dir)?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(ioe(&parent))?;
    let leaf = dir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "adapter".into());
    let tmp = parent.join(format!(".{leaf}.peftdb-tmp-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(ioe(&tmp))?;
    }
    fs::create_dir(&tmp).map_err(ioe(&tmp))?;
    let result = (|| {
        write_synced(&tmp.join("adapter_config.json"), &obj.config_json)?;
        let st = safetensors_io::serialize(&obj.tensors, obj.metadata.as_ref());
        write_synced(&tmp.join(obj.format.weights_file()), &st)?;
        for (name, bytes) in extras {
            write_synced(&tmp.join(name), bytes)?;
        }
        if dir.exists() {
            fs::remove_dir(dir).map_err(ioe(dir))?;
        }
        fs::rename(&tmp, dir).map_err(ioe(dir))?;
        if let Ok(d) = fs::File::open(&parent) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), ExportError> {
    use std::io::Write;
    let ioe = |source| ExportError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = fs::File::create(path).map_err(ioe)?;
    f.write_all(bytes).map_err(ioe)?;
    f.sync_all().map_err(ioe)?;
    Ok(())
}
