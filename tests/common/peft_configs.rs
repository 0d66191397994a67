//! The config edits shared by tests/hostile.rs (the reader refuses or accepts them) and tests/schemas.rs
//! (schema/peft_adapter_config.schema.json agrees): each is a real PEFT fixture with some fields set.

use serde_json::{json, Value};
use std::path::Path;

/// One hostile config: a real fixture with some fields set, and the field the error must name.
pub struct ConfigCase {
    pub name: &'static str,
    pub fixture: &'static str,
    pub field: &'static str,
    pub set: Vec<(&'static str, Value)>,
    /// The JSON Schema can tell (false: a float with an integral value, which JSON Schema counts as an
    /// integer but Python does not, or a rule between two fields' values that JSON Schema cannot state).
    pub schema_sees: bool,
}

/// Wrong types, out-of-range values, unknown enum strings and forbidden combinations of the config
/// fields PEFT reads (LoRA, IA3, prefix and prompt tuning).
pub fn refused() -> Vec<ConfigCase> {
    let c = |name, fixture, field, set: Vec<(&'static str, Value)>| ConfigCase {
        name,
        fixture,
        field,
        set,
        schema_sees: true,
    };
    let beyond_schema = |mut case: ConfigCase| {
        case.schema_sees = false;
        case
    };
    let lora = "lora_r8_qv";
    vec![
        // Every method: PeftConfig's fields.
        c(
            "cfg_task_type_lowercase",
            lora,
            "task_type",
            vec![("task_type", json!("seq_cls"))],
        ),
        c(
            "cfg_task_type_number",
            "prompt_10",
            "task_type",
            vec![("task_type", json!(3))],
        ),
        c(
            "cfg_modules_to_save_string",
            "ia3",
            "modules_to_save",
            vec![("modules_to_save", json!("classifier"))],
        ),
        // LoRA: types and ranges.
        c("cfg_r_zero", lora, "r", vec![("r", json!(0))]),
        beyond_schema(c("cfg_r_float", lora, "r", vec![("r", json!(8.0))])),
        c(
            "cfg_lora_alpha_string",
            lora,
            "lora_alpha",
            vec![("lora_alpha", json!("16"))],
        ),
        c(
            "cfg_lora_alpha_null",
            lora,
            "lora_alpha",
            vec![("lora_alpha", json!(null))],
        ),
        c(
            "cfg_lora_dropout_above_one",
            lora,
            "lora_dropout",
            vec![("lora_dropout", json!(1.5))],
        ),
        c(
            "cfg_lora_dropout_string",
            lora,
            "lora_dropout",
            vec![("lora_dropout", json!("0.1"))],
        ),
        c(
            "cfg_rank_pattern_null",
            "lora_rank_pattern",
            "rank_pattern",
            vec![("rank_pattern", json!(null))],
        ),
        c(
            "cfg_rank_pattern_zero",
            "lora_rank_pattern",
            "rank_pattern",
            vec![(
                "rank_pattern",
                json!({"layer.0.attention.self.query": 0, "value": 6}),
            )],
        ),
        c(
            "cfg_alpha_pattern_list",
            lora,
            "alpha_pattern",
            vec![("alpha_pattern", json!([16]))],
        ),
        c(
            "cfg_alpha_pattern_string_value",
            lora,
            "alpha_pattern",
            vec![("alpha_pattern", json!({"value": "12"}))],
        ),
        c(
            "cfg_target_modules_number",
            lora,
            "target_modules",
            vec![("target_modules", json!(5))],
        ),
        c(
            "cfg_target_modules_item_not_string",
            lora,
            "target_modules",
            vec![("target_modules", json!(["query", 7]))],
        ),
        c(
            "cfg_exclude_modules_object",
            lora,
            "exclude_modules",
            vec![("exclude_modules", json!({"a": 1}))],
        ),
        c(
            "cfg_layers_to_transform_string",
            lora,
            "layers_to_transform",
            vec![("layers_to_transform", json!("0"))],
        ),
        c(
            "cfg_layers_to_transform_negative",
            lora,
            "layers_to_transform",
            vec![("layers_to_transform", json!([-1]))],
        ),
        c(
            "cfg_layers_pattern_number",
            lora,
            "layers_pattern",
            vec![
                ("layers_pattern", json!(3)),
                ("layers_to_transform", json!([0])),
            ],
        ),
        c(
            "cfg_bias_unknown",
            "lora_bias_all",
            "bias",
            vec![("bias", json!("some"))],
        ),
        c(
            "cfg_bias_null",
            "lora_bias_all",
            "bias",
            vec![("bias", json!(null))],
        ),
        c(
            "cfg_use_rslora_string",
            "lora_rslora",
            "use_rslora",
            vec![("use_rslora", json!("false"))],
        ),
        c(
            "cfg_use_dora_string",
            lora,
            "use_dora",
            vec![("use_dora", json!("false"))],
        ),
        c(
            "cfg_lora_bias_string",
            lora,
            "lora_bias",
            vec![("lora_bias", json!("no"))],
        ),
        c(
            "cfg_init_unknown_name",
            lora,
            "init_lora_weights",
            vec![("init_lora_weights", json!("kaiming"))],
        ),
        c(
            "cfg_init_true_as_string",
            lora,
            "init_lora_weights",
            vec![("init_lora_weights", json!("true"))],
        ),
        c(
            "cfg_init_number",
            lora,
            "init_lora_weights",
            vec![("init_lora_weights", json!(1))],
        ),
        c(
            "cfg_target_parameters_string",
            lora,
            "target_parameters",
            vec![("target_parameters", json!("weight"))],
        ),
        c(
            "cfg_velora_config_string",
            lora,
            "velora_config",
            vec![("velora_config", json!("fast"))],
        ),
        c(
            "cfg_kasa_config_number",
            lora,
            "kasa_config",
            vec![("kasa_config", json!(1))],
        ),
        // LoRA: combinations LoraConfig.__post_init__ and orthogonal_init refuse.
        c(
            "cfg_regex_targets_with_layers",
            lora,
            "layers_to_transform",
            vec![
                ("target_modules", json!(".*(query|value)")),
                ("layers_to_transform", json!([0])),
            ],
        ),
        c(
            "cfg_regex_targets_with_layers_pattern",
            lora,
            "layers_pattern",
            vec![
                ("target_modules", json!(".*(query|value)")),
                ("layers_pattern", json!("layer")),
            ],
        ),
        c(
            "cfg_layers_pattern_without_layers",
            lora,
            "layers_pattern",
            vec![("layers_pattern", json!("layer"))],
        ),
        c(
            "cfg_lora_bias_with_named_init",
            lora,
            "init_lora_weights",
            vec![
                ("lora_bias", json!(true)),
                ("init_lora_weights", json!("gaussian")),
            ],
        ),
        c(
            "cfg_loftq_without_config",
            lora,
            "loftq_config",
            vec![("init_lora_weights", json!("loftq"))],
        ),
        c(
            "cfg_orthogonal_odd_rank",
            "lora_rank_pattern",
            "init_lora_weights",
            vec![
                ("init_lora_weights", json!("orthogonal")),
                ("rank_pattern", json!({"layer.0.attention.self.query": 3})),
            ],
        ),
        // IA3.
        c(
            "cfg_ia3_target_modules_number",
            "ia3",
            "target_modules",
            vec![("target_modules", json!(1))],
        ),
        c(
            "cfg_ia3_feedforward_item_not_string",
            "ia3",
            "feedforward_modules",
            vec![("feedforward_modules", json!([1]))],
        ),
        beyond_schema(c(
            "cfg_ia3_feedforward_not_in_targets",
            "ia3",
            "feedforward_modules",
            vec![("feedforward_modules", json!(["intermediate.dense"]))],
        )),
        c(
            "cfg_ia3_exclude_modules_bool",
            "ia3",
            "exclude_modules",
            vec![("exclude_modules", json!(true))],
        ),
        // Prefix tuning.
        c(
            "cfg_prefix_tokens_zero",
            "prefix_20",
            "num_virtual_tokens",
            vec![("num_virtual_tokens", json!(0))],
        ),
        c(
            "cfg_prefix_tokens_string",
            "prefix_20",
            "num_virtual_tokens",
            vec![("num_virtual_tokens", json!("20"))],
        ),
        c(
            "cfg_prefix_token_dim_negative",
            "prefix_20",
            "token_dim",
            vec![("token_dim", json!(-384))],
        ),
        beyond_schema(c(
            "cfg_prefix_num_layers_float",
            "prefix_20",
            "num_layers",
            vec![("num_layers", json!(6.0))],
        )),
        c(
            "cfg_prefix_heads_zero",
            "prefix_20",
            "num_attention_heads",
            vec![("num_attention_heads", json!(0))],
        ),
        beyond_schema(c(
            "cfg_prefix_heads_not_divisor",
            "prefix_20",
            "num_attention_heads",
            vec![("num_attention_heads", json!(7))],
        )),
        c(
            "cfg_prefix_submodules_string",
            "prefix_20",
            "num_transformer_submodules",
            vec![("num_transformer_submodules", json!("1"))],
        ),
        // Prompt tuning.
        c(
            "cfg_prompt_tokens_null",
            "prompt_10",
            "num_virtual_tokens",
            vec![("num_virtual_tokens", json!(null))],
        ),
        c(
            "cfg_prompt_token_dim_string",
            "prompt_10",
            "token_dim",
            vec![("token_dim", json!("384"))],
        ),
        c(
            "cfg_prompt_submodules_zero",
            "prompt_10",
            "num_transformer_submodules",
            vec![("num_transformer_submodules", json!(0))],
        ),
        c(
            "cfg_prompt_text_without_tokenizer",
            "prompt_10",
            "tokenizer_name_or_path",
            vec![
                ("prompt_tuning_init", json!("TEXT")),
                ("prompt_tuning_init_text", json!("Classify the review")),
            ],
        ),
        c(
            "cfg_prompt_text_without_text",
            "prompt_10",
            "prompt_tuning_init_text",
            vec![
                ("prompt_tuning_init", json!("TEXT")),
                (
                    "tokenizer_name_or_path",
                    json!("sentence-transformers/all-MiniLM-L6-v2"),
                ),
            ],
        ),
        c(
            "cfg_prompt_tokenizer_kwargs_without_text",
            "prompt_10",
            "tokenizer_kwargs",
            vec![("tokenizer_kwargs", json!({"use_fast": true}))],
        ),
    ]
}

/// Values PEFT loads that a checker could wrongly refuse: null where PEFT copes with None, unknown keys (a
/// newer PEFT's), regex strings, initialisation names, "TEXT" prompt initialisation.
pub fn accepted() -> Vec<(&'static str, Value)> {
    vec![
        (
            "lora_r8_qv",
            json!({"task_type": "SEQ_CLS", "future_peft_field": {"nested": [1, null]}, "lora_dropout": 0.1,
               "init_lora_weights": "gaussian", "use_rslora": null, "use_dora": null, "lora_bias": null,
               "layers_to_transform": [0, 1, 2, 3, 4, 5], "layers_pattern": "layer",
               "exclude_modules": ["output.dense"], "modules_to_save": [], "lora_alpha": 16.5}),
        ),
        (
            "lora_r8_qv",
            json!({"target_modules": ".*\\.(query|value)$", "init_lora_weights": "pissa_niter_4",
               "task_type": null, "modules_to_save": null, "target_parameters": null,
               "velora_config": null, "kasa_config": {"beta": 0.0001}}),
        ),
        (
            "lora_rank_pattern",
            json!({"init_lora_weights": "orthogonal", "layers_to_transform": 0}),
        ),
        (
            "lora_bias_all",
            json!({"lora_bias": true, "init_lora_weights": false}),
        ),
        (
            "ia3",
            json!({"feedforward_modules": "output\\.dense", "exclude_modules": [], "target_modules": null}),
        ),
        (
            "prefix_20",
            json!({"num_transformer_submodules": null, "init_weights": "zero", "encoder_hidden_size": null}),
        ),
        (
            "prompt_10",
            json!({"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "Classify the review",
               "tokenizer_name_or_path": "sentence-transformers/all-MiniLM-L6-v2",
               "tokenizer_kwargs": {"use_fast": true}, "num_transformer_submodules": null}),
        ),
    ]
}

/// A fixture's config with `set` applied (each key inserted or replaced).
pub fn edited(fixture_dir: &Path, set: impl IntoIterator<Item = (String, Value)>) -> Value {
    let p = fixture_dir.join("adapter_config.json");
    let mut v: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    let m = v.as_object_mut().unwrap();
    for (k, x) in set {
        m.insert(k, x);
    }
    v
}
