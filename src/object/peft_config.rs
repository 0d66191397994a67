//! PEFT's own rules for `adapter_config.json`: the fields Hugging Face PEFT reads when
//! `PeftModel.from_pretrained` loads a LoRA, IA3, prefix-tuning or prompt-tuning adapter, checked at ingest
//! so that nothing is stored that PEFT cannot load once exported.
//!
//! PEFT builds its config dataclass straight from the JSON (`PeftConfigMixin.from_pretrained` ->
//! `from_peft_type` -> `config_cls(**kwargs)`): no type is checked there, unknown keys are dropped with a
//! warning. A value of the wrong type fails later, in `__post_init__` or while the adapter layers are built.
//! Only fields that PEFT itself checks, or whose wrong type or value makes loading fail (or makes PEFT read
//! the adapter differently from peftdb), are refused; every other key, and null wherever PEFT copes with
//! `None`, is accepted and kept verbatim. Source read: huggingface/peft main at commit 5d602fd (version
//! string 0.20.1.dev0); the real fixtures in tests/fixtures/peft say `"peft_version": "0.21.2"`.
//!
//! | field | rule | where PEFT fails |
//! |---|---|---|
//! | `task_type` (all) | one of `TaskType`'s values, or null | `config.py` `PeftConfigMixin.__post_init__` (ValueError) |
//! | `modules_to_save` (all) | list of strings, or null | `peft_model.py` `PeftModel.modules_to_save` (`set.update`), `tuners_utils.py` `check_target_module_exists` (iterates it) |
//! | `r` | integer >= 1 | `tuners/lora/layer.py` `LoraLayer.update_layer` (`r <= 0` ValueError; `nn.Linear(in, r)`) |
//! | `lora_alpha` | number | `LoraLayer.update_layer` (`lora_alpha / r`) |
//! | `lora_dropout` | number <= 1 | `LoraLayer.update_layer` (`> 0.0`, `nn.Dropout(p)` ValueError for p > 1) |
//! | `rank_pattern` | object of integers >= 1 (not null) | `tuners/lora/model.py` `LoraModel._create_and_replace` (`.keys()`, value is `r`) |
//! | `alpha_pattern` | object of numbers (not null) | `LoraModel._create_and_replace` (`.keys()`, value is `lora_alpha`) |
//! | `target_modules`, `exclude_modules`, `layers_pattern` | string, list of strings, or null | `tuners/lora/config.py` `LoraConfig.__post_init__` (`set(...)`), `check_target_module_exists` |
//! | `layers_to_transform` | integer >= 0, list of them, or null | `check_target_module_exists` (`==` / `in`: a string fails; a layer index read from `\.(\d+)\.` is never negative, so a negative one selects nothing and, alone, makes the injection find no module) |
//! | `bias` | "none", "all" or "lora_only" (not null) | `tuners_utils.py` `BaseTuner._mark_only_adapters_as_trainable` (NotImplementedError) |
//! | `use_rslora`, `use_dora`, `lora_bias` | boolean, or null | `LoraLayer.update_layer` branches on truthiness: the string "false" means true to PEFT but false to peftdb |
//! | `init_lora_weights` | boolean, null, or a name PEFT knows | `LoraLayer.update_layer` / `reset_lora_parameters` / `pissa_init` (ValueError; `.lower()` on a number) |
//! | `target_parameters` | list of strings, or null | `LoraConfig.__post_init__` (TypeError for a string) |
//! | `velora_config`, `kasa_config` | object, or null | `LoraConfig.__post_init__` (TypeError) |
//! | LoRA combinations | regex `target_modules` with `layers_to_transform` / `layers_pattern`; `layers_pattern` without `layers_to_transform`; `lora_bias` with a named init; "loftq" without `loftq_config` | `LoraConfig.__post_init__` (ValueError) |
//! | LoRA "orthogonal" init | every rank even | `LoraLayer.orthogonal_init` (ValueError) |
//! | IA3 `target_modules`, `exclude_modules`, `feedforward_modules` | string, list of strings, or null; a listed `feedforward_modules` within a listed `target_modules` | `tuners/ia3/config.py` `IA3Config.__post_init__` (`set(...)`, subset ValueError), `tuners/ia3/model.py` (`endswith`) |
//! | `num_virtual_tokens` (prefix, prompt) | integer >= 1 (not null) | `peft_model.py` `PeftModel._setup_prompt_encoder` (`arange(num_virtual_tokens * num_transformer_submodules)`), `nn.Embedding` |
//! | `token_dim`, `num_layers`, `num_attention_heads` (prefix), `token_dim` (prompt) | integer >= 1, or null (PEFT fills null from the base model) | `tuners/prefix_tuning/model.py` `PrefixEncoder`, `tuners/prompt_tuning/model.py` `PromptEmbedding` (`nn.Embedding` sizes) |
//! | `num_transformer_submodules` (prefix, prompt) | integer >= 1, or null | `PeftModel._setup_prompt_encoder` (multiplies `num_virtual_tokens`) |
//! | prefix `token_dim`, `num_attention_heads` | `token_dim` a multiple of `num_attention_heads` | `PeftModel.get_prompt` (`view(..., heads, token_dim // heads)`: every forward fails) |
//! | prompt "TEXT" init | `tokenizer_name_or_path` and `prompt_tuning_init_text` set; `tokenizer_kwargs` only with "TEXT" | `tuners/prompt_tuning/config.py` `PromptTuningConfig.__post_init__` (ValueError) |
//!
//! Read but deliberately not checked: `fan_in_fan_out` (PEFT warns and overrides it per layer type:
//! `dispatch_default` in `tuners/lora/layer.py`, `IA3Model._create_new_module`), `inference_mode`
//! (`PeftModel.from_pretrained` overwrites it with `not is_trainable`), `prefix_projection`, `encoder_hidden_size` and `init_weights` (unused by a prefix
//! loaded for inference), `prompt_tuning_init` values other than "TEXT" (compared, never refused), and
//! regex syntax (Python's `re`, not Rust's, decides).

use crate::error::{PeftExpectation, ReadError};
use serde_json::{Map, Value};
use std::path::Path;

/// The values of PEFT's `TaskType` (`src/peft/utils/peft_types.py`).
pub const TASK_TYPES: &[&str] = &[
    "SEQ_CLS",
    "SEQ_2_SEQ_LM",
    "CAUSAL_LM",
    "TOKEN_CLS",
    "QUESTION_ANS",
    "FEATURE_EXTRACTION",
];

/// LoRA's `bias` values (`LoraConfig.bias`, `BaseTuner._mark_only_adapters_as_trainable`).
pub const LORA_BIAS: &[&str] = &["none", "all", "lora_only"];

/// The type (and range) a rule asks of a field's value.
#[derive(Debug, Clone, Copy)]
enum Ty {
    /// An integer >= 1 (a JSON `8.0` is a float to Python, and `nn.Linear` refuses it).
    PositiveInt,
    /// Any JSON number (not a boolean).
    Number,
    /// A dropout probability: a number no greater than 1 (`nn.Dropout` raises above 1; PEFT skips
    /// dropout at or below 0).
    Dropout,
    Bool,
    OneOf(&'static [&'static str]),
    /// A regex string or a list of strings.
    StrOrStrList,
    StrList,
    /// A layer index (>= 0) or a list of them.
    LayerIndices,
    Object,
    /// An object whose values are integers >= 1.
    PositiveIntMap,
    /// An object whose values are numbers.
    NumberMap,
    /// `init_lora_weights`: a boolean or one of the names `LoraLayer.update_layer` handles.
    InitLoraWeights,
}

impl Ty {
    fn expected(self) -> String {
        match self {
            Ty::PositiveInt => "a positive integer".into(),
            Ty::Number => "a number".into(),
            Ty::Dropout => "a number no greater than 1".into(),
            Ty::Bool => "true or false".into(),
            Ty::OneOf(vals) => format!(
                "one of {}",
                vals.iter()
                    .map(|v| format!("{v:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Ty::StrOrStrList => "a list of module names or a regex string".into(),
            Ty::StrList => "a list of strings".into(),
            Ty::LayerIndices => "a layer index (an integer >= 0) or a list of them".into(),
            Ty::Object => "an object".into(),
            Ty::PositiveIntMap => "an object mapping module names to positive integers".into(),
            Ty::NumberMap => "an object mapping module names to numbers".into(),
            Ty::InitLoraWeights => "true, false or an initialisation PEFT knows (\"gaussian\", \"eva\", \"olora\", \"pissa\", \"pissa_niter_<n>\", \"corda\", \"loftq\", \"orthogonal\", \"mica\", \"lora_ga\")".into(),
        }
    }

    /// `None` when `v` fits; otherwise what was found, naming the offending item or key.
    fn mismatch(self, v: &Value) -> Option<String> {
        let bad = || Some(describe(v));
        match self {
            Ty::PositiveInt => (!is_positive_int(v)).then(|| describe(v)),
            Ty::Number => (!v.is_number()).then(|| describe(v)),
            Ty::Dropout => (!v.as_f64().is_some_and(|p| p <= 1.0)).then(|| describe(v)),
            Ty::Bool => (!v.is_boolean()).then(|| describe(v)),
            Ty::OneOf(vals) => {
                (!v.as_str().is_some_and(|s| vals.contains(&s))).then(|| describe(v))
            }
            Ty::StrOrStrList => match v {
                Value::String(_) => None,
                Value::Array(a) => first_bad_item(a, Value::is_string),
                _ => bad(),
            },
            Ty::StrList => match v {
                Value::Array(a) => first_bad_item(a, Value::is_string),
                Value::String(_) => Some(format!("{} (a single string, not a list)", describe(v))),
                _ => bad(),
            },
            Ty::LayerIndices => match v {
                Value::Number(_) if v.as_u64().is_some() => None,
                Value::Array(a) => first_bad_item(a, |x| x.as_u64().is_some()),
                _ => bad(),
            },
            Ty::Object => (!v.is_object()).then(|| describe(v)),
            Ty::PositiveIntMap => match v {
                Value::Object(m) => first_bad_value(m, is_positive_int),
                _ => bad(),
            },
            Ty::NumberMap => match v {
                Value::Object(m) => first_bad_value(m, Value::is_number),
                _ => bad(),
            },
            Ty::InitLoraWeights => match v {
                Value::Bool(_) => None,
                Value::String(s) if known_lora_init(s) => None,
                _ => bad(),
            },
        }
    }
}

/// One field's rule: its type, whether null is fine, what PEFT does with it, and how to fix a bad value.
struct Rule {
    field: &'static str,
    ty: Ty,
    /// Null is accepted (PEFT copes with `None` here).
    null_ok: bool,
    /// What PEFT does with the field (file: function), i.e. why a bad value fails.
    peft: &'static str,
    fix: &'static str,
}

const fn rule(
    field: &'static str,
    ty: Ty,
    null_ok: bool,
    peft: &'static str,
    fix: &'static str,
) -> Rule {
    Rule {
        field,
        ty,
        null_ok,
        peft,
        fix,
    }
}

/// Fields of `PeftConfig` every method reads.
const COMMON: &[Rule] = &[
    rule(
        "task_type",
        Ty::OneOf(TASK_TYPES),
        true,
        "PeftConfigMixin.__post_init__ in config.py raises ValueError for any other task type",
        "set \"task_type\" to one of PEFT's task types, e.g. \"FEATURE_EXTRACTION\" or \"SEQ_CLS\" (spelled in capitals), or to null",
    ),
    rule(
        "modules_to_save",
        Ty::StrList,
        true,
        "PeftModel.modules_to_save (peft_model.py) and check_target_module_exists (tuners/tuners_utils.py) iterate it as module names: anything else fails, a string is split into characters",
        "write \"modules_to_save\" as a list of module names, e.g. [\"classifier\"], or null",
    ),
];

const TARGET_MODULES_PEFT: &str = "LoraConfig.__post_init__ (tuners/lora/config.py) turns a list into a set, and check_target_module_exists (tuners/tuners_utils.py) matches module names against it (a string is a regex)";

const LORA: &[Rule] = &[
    rule(
        "r",
        Ty::PositiveInt,
        false,
        "LoraLayer.update_layer (tuners/lora/layer.py) raises ValueError unless r > 0 and sizes nn.Linear with it, which needs an int",
        "set \"r\" to a positive integer such as 8: the rank of the saved lora_A/lora_B tensors",
    ),
    rule(
        "lora_alpha",
        Ty::Number,
        false,
        "LoraLayer.update_layer (tuners/lora/layer.py) computes the scaling lora_alpha / r",
        "set \"lora_alpha\" to a number such as 16",
    ),
    rule(
        "lora_dropout",
        Ty::Dropout,
        false,
        "LoraLayer.update_layer (tuners/lora/layer.py) compares it with 0.0 and builds nn.Dropout(p), which raises ValueError for p > 1",
        "set \"lora_dropout\" to a number from 0 to 1 such as 0.0 (dropout is off at inference anyway), or remove it",
    ),
    rule(
        "rank_pattern",
        Ty::PositiveIntMap,
        false,
        "LoraModel._create_and_replace (tuners/lora/model.py) calls rank_pattern.keys() (null fails) and gives each value to LoraLayer.update_layer as r",
        "write \"rank_pattern\" as an object mapping module names to positive ranks, e.g. {\"value\": 6}, or {} for none",
    ),
    rule(
        "alpha_pattern",
        Ty::NumberMap,
        false,
        "LoraModel._create_and_replace (tuners/lora/model.py) calls alpha_pattern.keys() (null fails) and uses each value as lora_alpha",
        "write \"alpha_pattern\" as an object mapping module names to numbers, e.g. {\"value\": 12}, or {} for none",
    ),
    rule(
        "target_modules",
        Ty::StrOrStrList,
        true,
        TARGET_MODULES_PEFT,
        "write \"target_modules\" as a list of module names such as [\"query\", \"value\"], a regex string, or null",
    ),
    rule(
        "exclude_modules",
        Ty::StrOrStrList,
        true,
        TARGET_MODULES_PEFT,
        "write \"exclude_modules\" as a list of module names, a regex string, or null",
    ),
    rule(
        "layers_to_transform",
        Ty::LayerIndices,
        true,
        "check_target_module_exists (tuners/tuners_utils.py) compares each module's layer index with it (== for an integer, `in` for a list)",
        "set \"layers_to_transform\" to a layer index such as 0, a list of them such as [0, 1], or null",
    ),
    rule(
        "layers_pattern",
        Ty::StrOrStrList,
        true,
        "check_target_module_exists (tuners/tuners_utils.py) takes len() of it and builds a regex from each pattern",
        "set \"layers_pattern\" to the name of the model's layer list such as \"layer\", a list of such names, or null",
    ),
    rule(
        "bias",
        Ty::OneOf(LORA_BIAS),
        false,
        "BaseTuner._mark_only_adapters_as_trainable (tuners/tuners_utils.py) raises NotImplementedError for any other value, null included",
        "set \"bias\" to \"none\", \"all\" or \"lora_only\", whichever matches the bias tensors saved with the adapter",
    ),
    rule(
        "use_rslora",
        Ty::Bool,
        true,
        "LoraLayer.update_layer (tuners/lora/layer.py) scales by lora_alpha / sqrt(r) for any truthy value (the string \"false\" included) while peftdb reads only a JSON boolean, so PEFT would apply another scaling than the one stored",
        "set \"use_rslora\" to true or false",
    ),
    rule(
        "use_dora",
        Ty::Bool,
        true,
        "LoraLayer.update_layer (tuners/lora/layer.py) switches DoRA on for any truthy value (the string \"false\" included), which peftdb would read as plain LoRA",
        "set \"use_dora\" to false (peftdb does not store DoRA adapters)",
    ),
    rule(
        "lora_bias",
        Ty::Bool,
        true,
        "LoraLayer.update_layer (tuners/lora/layer.py) gives lora_B a bias for any truthy value (nn.Linear(r, out, bias=lora_bias)), the string \"false\" included",
        "set \"lora_bias\" to true or false",
    ),
    rule(
        "init_lora_weights",
        Ty::InitLoraWeights,
        true,
        "LoraLayer.update_layer / reset_lora_parameters / pissa_init (tuners/lora/layer.py) raise ValueError for an initialisation they do not know, and call .lower() on anything that is not a string",
        "set \"init_lora_weights\" to true: the saved lora_A/lora_B replace the initial values when PEFT loads the adapter",
    ),
    rule(
        "target_parameters",
        Ty::StrList,
        true,
        "LoraConfig.__post_init__ (tuners/lora/config.py) raises TypeError for a string",
        "write \"target_parameters\" as a list of parameter names, or null",
    ),
    rule(
        "velora_config",
        Ty::Object,
        true,
        "LoraConfig.__post_init__ (tuners/lora/config.py) raises TypeError unless it is a dict or None",
        "write \"velora_config\" as an object, or null",
    ),
    rule(
        "kasa_config",
        Ty::Object,
        true,
        "LoraConfig.__post_init__ (tuners/lora/config.py) raises TypeError unless it is a dict or None",
        "write \"kasa_config\" as an object, or null",
    ),
];

const IA3_MODULES_PEFT: &str = "IA3Config.__post_init__ (tuners/ia3/config.py) turns a list into a set, and IA3Model (tuners/ia3/model.py) matches module names against it (a string is a regex)";

const IA3: &[Rule] = &[
    rule(
        "target_modules",
        Ty::StrOrStrList,
        true,
        IA3_MODULES_PEFT,
        "write \"target_modules\" as a list of module names such as [\"key\", \"value\", \"output.dense\"], a regex string, or null",
    ),
    rule(
        "exclude_modules",
        Ty::StrOrStrList,
        true,
        IA3_MODULES_PEFT,
        "write \"exclude_modules\" as a list of module names, a regex string, or null",
    ),
    rule(
        "feedforward_modules",
        Ty::StrOrStrList,
        true,
        IA3_MODULES_PEFT,
        "write \"feedforward_modules\" as a list of module names such as [\"output.dense\"], a regex string, or null",
    ),
];

const VIRTUAL_TOKENS_PEFT: &str = "PeftModel._setup_prompt_encoder (peft_model.py) makes torch.arange(num_virtual_tokens * num_transformer_submodules) and the prompt encoder an nn.Embedding of that many rows";
const SUBMODULES_PEFT: &str = "PeftModel._setup_prompt_encoder (peft_model.py) multiplies num_virtual_tokens by it (null means 2 for SEQ_2_SEQ_LM, else 1)";

const PREFIX: &[Rule] = &[
    rule(
        "num_virtual_tokens",
        Ty::PositiveInt,
        false,
        VIRTUAL_TOKENS_PEFT,
        "set \"num_virtual_tokens\" to the number of rows of the saved prompt_embeddings, e.g. 20",
    ),
    rule(
        "token_dim",
        Ty::PositiveInt,
        true,
        "PrefixEncoder (tuners/prefix_tuning/model.py) sizes nn.Embedding(num_virtual_tokens, num_layers * 2 * token_dim) with it",
        "set \"token_dim\" to the base model's hidden size, e.g. 384",
    ),
    rule(
        "num_layers",
        Ty::PositiveInt,
        true,
        "PrefixEncoder (tuners/prefix_tuning/model.py) sizes nn.Embedding(num_virtual_tokens, num_layers * 2 * token_dim) with it",
        "set \"num_layers\" to the base model's number of layers, e.g. 6",
    ),
    rule(
        "num_attention_heads",
        Ty::PositiveInt,
        true,
        "PeftModel.get_prompt (peft_model.py) splits each prefix vector into num_attention_heads heads of token_dim // num_attention_heads",
        "set \"num_attention_heads\" to the base model's number of attention heads, e.g. 12",
    ),
    rule(
        "num_transformer_submodules",
        Ty::PositiveInt,
        true,
        SUBMODULES_PEFT,
        "set \"num_transformer_submodules\" to 1 (encoder-only or decoder-only models), or null",
    ),
];

const PROMPT: &[Rule] = &[
    rule(
        "num_virtual_tokens",
        Ty::PositiveInt,
        false,
        VIRTUAL_TOKENS_PEFT,
        "set \"num_virtual_tokens\" to the number of rows of the saved prompt_embeddings (divided by num_transformer_submodules), e.g. 10",
    ),
    rule(
        "token_dim",
        Ty::PositiveInt,
        true,
        "PromptEmbedding (tuners/prompt_tuning/model.py) builds nn.Embedding(num_virtual_tokens * num_transformer_submodules, token_dim)",
        "set \"token_dim\" to the base model's hidden size, e.g. 384",
    ),
    rule(
        "num_transformer_submodules",
        Ty::PositiveInt,
        true,
        SUBMODULES_PEFT,
        "set \"num_transformer_submodules\" to 1 (encoder-only or decoder-only models), 2 (encoder-decoder), or null",
    ),
];

/// A check of rules that combine several fields of one method's config.
type CrossCheck = fn(&Map<String, Value>, &Path) -> Result<(), ReadError>;

/// Check a PEFT config (`peft_type` LORA, IA3, PREFIX_TUNING or PROMPT_TUNING; other types pass) against
/// the rules PEFT applies when it loads the adapter. The first violation is returned as
/// [`ReadError::ConfigField`] naming the field.
pub fn check(obj: &Map<String, Value>, path: &Path) -> Result<(), ReadError> {
    let (rules, cross): (&[Rule], CrossCheck) = match obj.get("peft_type").and_then(Value::as_str) {
        Some("LORA") => (LORA, lora_combinations),
        Some("IA3") => (IA3, ia3_combinations),
        Some("PREFIX_TUNING") => (PREFIX, prefix_combinations),
        Some("PROMPT_TUNING") => (PROMPT, prompt_combinations),
        _ => return Ok(()),
    };
    for r in COMMON.iter().chain(rules) {
        let Some(v) = obj.get(r.field) else { continue };
        let found = if v.is_null() {
            (!r.null_ok).then(|| "null".to_string())
        } else {
            r.ty.mismatch(v)
        };
        if let Some(found) = found {
            let expected = if r.null_ok {
                format!("{} or null", r.ty.expected())
            } else {
                r.ty.expected()
            };
            return Err(refuse(path, r.field, found, expected, r.peft, r.fix));
        }
    }
    cross(obj, path)
}

fn refuse(
    path: &Path,
    field: &'static str,
    found: String,
    expected: impl Into<String>,
    peft: &'static str,
    fix: &'static str,
) -> ReadError {
    ReadError::ConfigField {
        path: path.to_path_buf(),
        field,
        found,
        peft: Box::new(PeftExpectation {
            expected: expected.into(),
            why: peft,
            fix,
        }),
    }
}

/// Present and not null (PEFT's `is not None`).
fn present<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

/// Python's truthiness of a JSON value.
fn truthy(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64().is_some_and(|x| x != 0.0),
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(m)) => !m.is_empty(),
    }
}

/// The rules of `LoraConfig.__post_init__` that combine fields, and `orthogonal_init`'s even rank.
fn lora_combinations(obj: &Map<String, Value>, path: &Path) -> Result<(), ReadError> {
    const POST_INIT: &str = "LoraConfig.__post_init__ (tuners/lora/config.py) raises ValueError";
    let regex_targets = matches!(obj.get("target_modules"), Some(Value::String(_)));
    for field in ["layers_to_transform", "layers_pattern"] {
        if let (true, Some(v)) = (regex_targets, present(obj, field)) {
            return Err(refuse(
                path,
                field,
                format!("{} while \"target_modules\" is a regex string", describe(v)),
                "null when \"target_modules\" is a regex string",
                POST_INIT,
                "set it to null, or write \"target_modules\" as a list of module names",
            ));
        }
    }
    if truthy(obj.get("layers_pattern")) && present(obj, "layers_to_transform").is_none() {
        return Err(refuse(
            path,
            "layers_pattern",
            format!(
                "{} while \"layers_to_transform\" is not set",
                describe(&obj["layers_pattern"])
            ),
            "null unless \"layers_to_transform\" is set",
            POST_INIT,
            "set \"layers_pattern\" to null, or give \"layers_to_transform\" the layer indices it selects",
        ));
    }
    let init = obj.get("init_lora_weights");
    // Missing means PEFT's default, true.
    let init_is_bool = init.is_none_or(Value::is_boolean);
    if truthy(obj.get("lora_bias")) && !init_is_bool {
        return Err(refuse(
            path,
            "init_lora_weights",
            format!(
                "{} while \"lora_bias\" is true",
                describe(init.unwrap_or(&Value::Null))
            ),
            "true or false when \"lora_bias\" is true",
            POST_INIT,
            "set \"init_lora_weights\" to true: the saved lora_A/lora_B replace the initial values when PEFT loads the adapter",
        ));
    }
    let init_name = init.and_then(Value::as_str);
    // `__post_init__` refuses an empty loftq_config, then calls vars() on anything that is not a dict.
    let loftq_ok = obj
        .get("loftq_config")
        .and_then(Value::as_object)
        .is_some_and(|m| !m.is_empty());
    if init_name == Some("loftq") && !loftq_ok {
        return Err(refuse(
            path,
            "loftq_config",
            format!(
                "{} while \"init_lora_weights\" is \"loftq\"",
                obj.get("loftq_config")
                    .map(describe)
                    .unwrap_or_else(|| "missing".into())
            ),
            "a non-empty object when \"init_lora_weights\" is \"loftq\"",
            POST_INIT,
            "set \"init_lora_weights\" to true (the saved weights replace the initial values), or give \"loftq_config\", e.g. {\"loftq_bits\": 4, \"loftq_iter\": 1}",
        ));
    }
    if init_name == Some("orthogonal") {
        let mut ranks = vec![("\"r\"".to_string(), obj.get("r"))];
        if let Some(Value::Object(m)) = obj.get("rank_pattern") {
            ranks.extend(
                m.iter()
                    .map(|(k, v)| (format!("\"rank_pattern\" at key {}", quote(k)), Some(v))),
            );
        }
        for (what, v) in ranks {
            if let Some(n) = v.and_then(Value::as_u64).filter(|n| n % 2 == 1) {
                return Err(refuse(
                    path,
                    "init_lora_weights",
                    format!("\"orthogonal\" with the odd rank {n} ({what})"),
                    "an even rank everywhere for \"orthogonal\"",
                    "LoraLayer.orthogonal_init (tuners/lora/layer.py) raises ValueError for an odd rank",
                    "set \"init_lora_weights\" to true: the saved lora_A/lora_B replace the initial values when PEFT loads the adapter",
                ));
            }
        }
    }
    Ok(())
}

/// `IA3Config.__post_init__`: listed feed-forward modules must be listed target modules.
fn ia3_combinations(obj: &Map<String, Value>, path: &Path) -> Result<(), ReadError> {
    if let (Some(Value::Array(ff)), Some(Value::Array(targets))) =
        (obj.get("feedforward_modules"), obj.get("target_modules"))
    {
        if let Some(missing) = ff.iter().find(|m| !targets.contains(m)) {
            return Err(refuse(
                path,
                "feedforward_modules",
                format!(
                    "a list holding {}, which \"target_modules\" does not list",
                    describe(missing)
                ),
                "a subset of \"target_modules\"",
                "IA3Config.__post_init__ (tuners/ia3/config.py) raises ValueError",
                "list in \"feedforward_modules\" only modules that \"target_modules\" lists too",
            ));
        }
    }
    Ok(())
}

/// `PeftModel.get_prompt` splits token_dim into num_attention_heads equal heads.
fn prefix_combinations(obj: &Map<String, Value>, path: &Path) -> Result<(), ReadError> {
    let get = |k| obj.get(k).and_then(Value::as_u64);
    // `check`'s rules already refused a zero head count; the filter only keeps the modulo total.
    let heads = get("num_attention_heads").filter(|h| *h > 0);
    if let (Some(dim), Some(heads)) = (get("token_dim"), heads) {
        if dim % heads != 0 {
            return Err(refuse(
                path,
                "num_attention_heads",
                format!("{heads}, which does not divide \"token_dim\" {dim}"),
                "a divisor of \"token_dim\"",
                "PeftModel.get_prompt (peft_model.py) views the prefix as (..., num_attention_heads, token_dim // num_attention_heads): every forward pass fails",
                "set \"num_attention_heads\" to the base model's number of attention heads, e.g. 12",
            ));
        }
    }
    Ok(())
}

/// `PromptTuningConfig.__post_init__`: the "TEXT" initialisation and its companions.
fn prompt_combinations(obj: &Map<String, Value>, path: &Path) -> Result<(), ReadError> {
    const POST_INIT: &str =
        "PromptTuningConfig.__post_init__ (tuners/prompt_tuning/config.py) raises ValueError";
    let text = obj.get("prompt_tuning_init").and_then(Value::as_str) == Some("TEXT");
    let shown = |k: &str| obj.get(k).map(describe).unwrap_or_else(|| "missing".into());
    if text && !truthy(obj.get("tokenizer_name_or_path")) {
        return Err(refuse(
            path,
            "tokenizer_name_or_path",
            format!(
                "{} while \"prompt_tuning_init\" is \"TEXT\"",
                shown("tokenizer_name_or_path")
            ),
            "a tokenizer name when \"prompt_tuning_init\" is \"TEXT\"",
            POST_INIT,
            "set \"tokenizer_name_or_path\" to the base model's tokenizer, or \"prompt_tuning_init\" to \"RANDOM\" (the saved embeddings replace the initial ones)",
        ));
    }
    if text && present(obj, "prompt_tuning_init_text").is_none() {
        return Err(refuse(
            path,
            "prompt_tuning_init_text",
            format!(
                "{} while \"prompt_tuning_init\" is \"TEXT\"",
                shown("prompt_tuning_init_text")
            ),
            "a string when \"prompt_tuning_init\" is \"TEXT\"",
            POST_INIT,
            "set \"prompt_tuning_init_text\" to the initialisation text, or \"prompt_tuning_init\" to \"RANDOM\"",
        ));
    }
    if !text && truthy(obj.get("tokenizer_kwargs")) {
        return Err(refuse(
            path,
            "tokenizer_kwargs",
            format!(
                "{} while \"prompt_tuning_init\" is not \"TEXT\"",
                shown("tokenizer_kwargs")
            ),
            "null unless \"prompt_tuning_init\" is \"TEXT\"",
            POST_INIT,
            "set \"tokenizer_kwargs\" to null",
        ));
    }
    Ok(())
}

fn is_positive_int(v: &Value) -> bool {
    v.as_u64().is_some_and(|n| n >= 1)
}

/// The initialisations `LoraLayer.update_layer` handles: "gaussian", "olora" and "mica" are compared
/// lower-cased, the others exactly; "pissa_niter_<n>" needs an integer n (`pissa_init`).
fn known_lora_init(s: &str) -> bool {
    let lower = s.to_ascii_lowercase();
    matches!(lower.as_str(), "gaussian" | "olora" | "mica")
        || matches!(
            s,
            "eva" | "pissa" | "corda" | "loftq" | "orthogonal" | "lora_ga"
        )
        || s.strip_prefix("pissa_niter_")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

fn first_bad_item(a: &[Value], ok: impl Fn(&Value) -> bool) -> Option<String> {
    a.iter()
        .position(|x| !ok(x))
        .map(|i| format!("a list whose item {i} is {}", describe(&a[i])))
}

fn first_bad_value(m: &Map<String, Value>, ok: impl Fn(&Value) -> bool) -> Option<String> {
    m.iter()
        .find(|(_, v)| !ok(v))
        .map(|(k, v)| format!("an object whose key {} holds {}", quote(k), describe(v)))
}

/// A short description of a JSON value for an error message (strings and keys cut to 48 characters).
fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) if n.is_f64() => format!("the number {n}"),
        Value::Number(n) => format!("the integer {n}"),
        Value::String(s) => format!("the string {}", quote(s)),
        Value::Array(a) => format!("a list of {} item(s)", a.len()),
        Value::Object(m) => format!("an object with {} key(s)", m.len()),
    }
}

fn quote(s: &str) -> String {
    const MAX: usize = 48;
    if s.chars().count() <= MAX {
        format!("{s:?}")
    } else {
        let cut: String = s.chars().take(MAX).collect();
        format!("{cut:?}...")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(v: Value) -> Result<(), ReadError> {
        check(v.as_object().unwrap(), Path::new("cfg.json"))
    }

    fn field_of(v: Value) -> &'static str {
        match run(v) {
            Err(ReadError::ConfigField { field, .. }) => field,
            other => panic!("expected ConfigField, got {other:?}"),
        }
    }

    #[test]
    fn describe_cuts_long_strings_and_names_kinds() {
        assert_eq!(describe(&json!(8.5)), "the number 8.5");
        assert_eq!(describe(&json!(-3)), "the integer -3");
        assert_eq!(describe(&json!([1, 2])), "a list of 2 item(s)");
        let long = "x".repeat(1000);
        let d = describe(&json!(long));
        assert!(d.len() < 70 && d.ends_with("..."), "{d}");
    }

    #[test]
    fn lora_values_peft_loads_pass() {
        let ok = [
            json!({"peft_type": "LORA", "r": 8, "lora_alpha": 16.5, "init_lora_weights": "Gaussian"}),
            json!({"peft_type": "LORA", "r": 8, "init_lora_weights": "pissa_niter_16", "task_type": "SEQ_CLS"}),
            json!({"peft_type": "LORA", "r": 4, "init_lora_weights": "orthogonal", "rank_pattern": {"a": 2}}),
            json!({"peft_type": "LORA", "target_modules": ".*query", "layers_to_transform": null, "lora_dropout": -0.5}),
            json!({"peft_type": "LORA", "layers_pattern": "layer", "layers_to_transform": [0, 5], "lora_bias": true, "init_lora_weights": false}),
            json!({"peft_type": "LORA", "layers_pattern": [], "use_rslora": null, "use_dora": null, "future_field": {"x": [1]}}),
            json!({"peft_type": "LORA", "init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4}}),
            json!({"peft_type": "IA3", "target_modules": ["k", "v"], "feedforward_modules": ".*v"}),
            json!({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 1, "token_dim": null, "num_attention_heads": null}),
            json!({"peft_type": "PROMPT_TUNING", "prompt_tuning_init": "TEXT", "tokenizer_name_or_path": "t", "prompt_tuning_init_text": ""}),
            json!({"peft_type": "BITFIT", "r": "not read"}),
        ];
        for v in ok {
            assert!(run(v.clone()).is_ok(), "{v}: {:?}", run(v.clone()));
        }
    }

    #[test]
    fn each_rule_names_its_field() {
        let bad = [
            (json!({"peft_type": "LORA", "r": 8.0}), "r"),
            (json!({"peft_type": "LORA", "r": true}), "r"),
            (
                json!({"peft_type": "LORA", "lora_alpha": "16"}),
                "lora_alpha",
            ),
            (
                json!({"peft_type": "LORA", "lora_dropout": 1.01}),
                "lora_dropout",
            ),
            (
                json!({"peft_type": "LORA", "rank_pattern": {"q": 0}}),
                "rank_pattern",
            ),
            (
                json!({"peft_type": "LORA", "alpha_pattern": null}),
                "alpha_pattern",
            ),
            (
                json!({"peft_type": "LORA", "layers_to_transform": [0, -1]}),
                "layers_to_transform",
            ),
            (
                json!({"peft_type": "LORA", "init_lora_weights": "PISSA"}),
                "init_lora_weights",
            ),
            (
                json!({"peft_type": "LORA", "init_lora_weights": "pissa_niter_"}),
                "init_lora_weights",
            ),
            (
                json!({"peft_type": "LORA", "init_lora_weights": 1}),
                "init_lora_weights",
            ),
            (
                json!({"peft_type": "LORA", "init_lora_weights": "orthogonal", "r": 4, "rank_pattern": {"a": 3}}),
                "init_lora_weights",
            ),
            (
                json!({"peft_type": "IA3", "task_type": "seq_cls"}),
                "task_type",
            ),
            (
                json!({"peft_type": "PROMPT_TUNING", "modules_to_save": "classifier"}),
                "modules_to_save",
            ),
        ];
        for (v, field) in bad {
            assert_eq!(field_of(v.clone()), field, "{v}");
        }
        // lora_bias true with the default init (true) is fine; with a named init it is not.
        assert!(run(json!({"peft_type": "LORA", "lora_bias": true})).is_ok());
        assert_eq!(
            field_of(json!({"peft_type": "LORA", "lora_bias": true, "init_lora_weights": null})),
            "init_lora_weights"
        );
    }

    #[test]
    fn the_message_names_field_found_expected_and_fix() {
        let e = run(json!({"peft_type": "LORA", "r": "eight"})).unwrap_err();
        let msg = e.to_string();
        for part in [
            "cfg.json",
            "\"r\"",
            "the string \"eight\"",
            "a positive integer",
            "update_layer",
            "such as 8",
        ] {
            assert!(msg.contains(part), "{part:?} missing from {msg}");
        }
    }
}
