//! Building new objects (e.g. adapters the engine trained) with the configuration file the real tools
//! write: PEFT's adapter_config.json for LoRA, IA3, prefix and prompt tuning (the fields PEFT 0.21 writes),
//! peftdb's BitFit config, and AdapterHub's bottleneck config (Houlsby placement). The result
//! round-trips through [`write_adapter`](super::write_adapter) + [`read_adapter`](super::read_adapter).

use super::{AdapterFormat, LightweightObject, LoraBias, Method, Tensor};
use serde_json::{json, Value};

/// The adapter_config.json a tool would write for `method` on `base_model`.
pub fn adapter_config(method: &Method, base_model: &str) -> Value {
    match method {
        Method::Lora(c) => json!({
            "alpha_pattern": c.alpha_pattern,
            "auto_mapping": null,
            "base_model_name_or_path": base_model,
            "bias": match c.bias { LoraBias::None => "none", LoraBias::All => "all", LoraBias::LoraOnly => "lora_only" },
            "exclude_modules": null,
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "layer_replication": null,
            "layers_pattern": null,
            "layers_to_transform": null,
            "loftq_config": {},
            "lora_alpha": c.alpha,
            "lora_bias": false,
            "lora_dropout": 0.0,
            "megatron_config": null,
            "megatron_core": "megatron.core",
            "modules_to_save": null,
            "peft_type": "LORA",
            "r": c.r,
            "rank_pattern": c.rank_pattern,
            "revision": null,
            "target_modules": c.target_modules,
            "task_type": "FEATURE_EXTRACTION",
            "use_dora": false,
            "use_rslora": c.use_rslora,
        }),
        Method::Ia3(c) => json!({
            "auto_mapping": null,
            "base_model_name_or_path": base_model,
            "exclude_modules": null,
            "fan_in_fan_out": false,
            "feedforward_modules": c.feedforward_modules,
            "inference_mode": true,
            "init_ia3_weights": true,
            "modules_to_save": null,
            "peft_type": "IA3",
            "revision": null,
            "target_modules": c.target_modules,
            "task_type": "FEATURE_EXTRACTION",
        }),
        Method::Prefix(c) => json!({
            "auto_mapping": null,
            "base_model_name_or_path": base_model,
            "encoder_hidden_size": c.token_dim,
            "inference_mode": true,
            "modules_to_save": null,
            "num_attention_heads": c.num_attention_heads,
            "num_layers": c.num_layers,
            "num_transformer_submodules": 1,
            "num_virtual_tokens": c.num_virtual_tokens,
            "peft_type": "PREFIX_TUNING",
            "prefix_projection": c.prefix_projection,
            "revision": null,
            "task_type": "FEATURE_EXTRACTION",
            "token_dim": c.token_dim,
        }),
        Method::Prompt(c) => json!({
            "auto_mapping": null,
            "base_model_name_or_path": base_model,
            "inference_mode": true,
            "modules_to_save": null,
            "num_transformer_submodules": 1,
            "num_virtual_tokens": c.num_virtual_tokens,
            "peft_type": "PROMPT_TUNING",
            "prompt_tuning_init": "RANDOM",
            "prompt_tuning_init_text": null,
            "revision": null,
            "task_type": "FEATURE_EXTRACTION",
            "token_dim": c.token_dim,
            "tokenizer_kwargs": null,
            "tokenizer_name_or_path": null,
        }),
        Method::Bitfit(_) => json!({
            "peft_type": "BITFIT",
            "base_model_name_or_path": base_model,
        }),
        Method::Adapter(c) => json!({
            "config": {
                "adapter_residual_before_ln": false,
                "architecture": "bottleneck",
                "dropout": 0.0,
                "init_weights": "bert",
                "is_parallel": false,
                "ln_after": false,
                "ln_before": false,
                "mh_adapter": c.mh_adapter,
                "non_linearity": c.non_linearity,
                "original_ln_after": true,
                "original_ln_before": false,
                "output_adapter": c.output_adapter,
                "reduction_factor": c.hidden_size as f64 / c.bottleneck_size.max(1) as f64,
                "residual_before_ln": true,
                "scaling": 1.0,
                "use_gating": false,
            },
            "hidden_size": c.hidden_size,
            "model_class": "BertModel",
            "model_name": base_model,
            "model_type": "bert",
            "name": c.name,
            "version": concat!("peftdb-", env!("CARGO_PKG_VERSION")),
        }),
    }
}

/// Build a new object from a method, its base model and tensors (named as the format expects: PEFT's
/// `base_model.model.…`, AdapterHub's `bert.encoder.layer.{i}.….adapters.{name}.…`).
pub fn build_object(method: Method, base_model: &str, tensors: Vec<Tensor>) -> LightweightObject {
    build_object_for(method, base_model, tensors, false)
}

/// [`build_object`] for a base model known to be a causal language model (`causal_lm`), whose PEFT task
/// type is then `CAUSAL_LM` whatever the tensors' names say (a prompt-tuning table names no layer).
pub fn build_object_for(
    method: Method,
    base_model: &str,
    tensors: Vec<Tensor>,
    causal_lm: bool,
) -> LightweightObject {
    let format = match method {
        Method::Bitfit(_) => AdapterFormat::Bitfit,
        Method::Adapter(_) => AdapterFormat::Adapterhub,
        _ => AdapterFormat::Peft,
    };
    let mut cfg = adapter_config(&method, base_model);
    // PEFT's task type: a decoder-only stack (`model.layers.N`, `h.N`) is a causal language model.
    let decoder_only = tensors.iter().any(|t| {
        super::parse_tensor_name(&t.name)
            .layer
            .is_some_and(|l| l.stack == super::layout::Stack::Layers)
    });
    if (causal_lm || decoder_only) && cfg.get("task_type").is_some() {
        cfg["task_type"] = json!("CAUSAL_LM");
    }
    let mut config_json = serde_json::to_vec_pretty(&cfg).unwrap_or_default();
    config_json.push(b'\n');
    LightweightObject {
        method,
        base_model: base_model.to_string(),
        format,
        tensors,
        metadata: Some(
            [("format".to_string(), "pt".to_string())]
                .into_iter()
                .collect(),
        ),
        config_json,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::object::formats::ReadOptions;
    use crate::object::*;

    fn t(name: &str, shape: Vec<usize>) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        Tensor::from_f32(name, shape, &v)
    }

    fn roundtrip(obj: &LightweightObject) {
        let d = tempfile::tempdir().expect("tempdir");
        let dir = d.path().join("a");
        write_adapter(obj, &dir).expect("writes");
        let back = read_adapter(&dir, &ReadOptions::default()).expect("reads back");
        assert_eq!(back.method, obj.method);
        assert_eq!(back.base_model, obj.base_model);
        assert_eq!(back.format, obj.format);
        assert_eq!(back.tensors, obj.tensors);
    }

    const BASE: &str = "sentence-transformers/all-MiniLM-L6-v2";

    #[test]
    fn every_method_round_trips() {
        let p = "base_model.model.encoder.layer.0";
        let lora = Method::Lora(LoraConfig {
            r: 2,
            alpha: 4.0,
            use_rslora: true,
            rank_pattern: [("value".to_string(), 3)].into_iter().collect(),
            alpha_pattern: Default::default(),
            target_modules: vec!["query".into(), "value".into()],
            bias: LoraBias::None,
        });
        roundtrip(&build_object(
            lora,
            BASE,
            vec![
                t(
                    &format!("{p}.attention.self.query.lora_A.weight"),
                    vec![2, 8],
                ),
                t(
                    &format!("{p}.attention.self.query.lora_B.weight"),
                    vec![8, 2],
                ),
                t(
                    &format!("{p}.attention.self.value.lora_A.weight"),
                    vec![3, 8],
                ),
                t(
                    &format!("{p}.attention.self.value.lora_B.weight"),
                    vec![8, 3],
                ),
            ],
        ));
        let ia3 = Method::Ia3(Ia3Config {
            target_modules: vec!["key".into(), "output.dense".into()],
            feedforward_modules: vec!["output.dense".into()],
        });
        roundtrip(&build_object(
            ia3,
            BASE,
            vec![
                t(&format!("{p}.attention.self.key.ia3_l"), vec![8, 1]),
                t(&format!("{p}.output.dense.ia3_l"), vec![1, 32]),
            ],
        ));
        let prefix = Method::Prefix(PrefixConfig {
            num_virtual_tokens: 3,
            num_layers: 2,
            token_dim: 8,
            num_attention_heads: 2,
            prefix_projection: false,
        });
        roundtrip(&build_object(
            prefix,
            BASE,
            vec![t("prompt_embeddings", vec![3, 32])],
        ));
        let prompt = Method::Prompt(PromptConfig {
            num_virtual_tokens: 4,
            token_dim: 8,
        });
        roundtrip(&build_object(
            prompt,
            BASE,
            vec![t("prompt_embeddings", vec![4, 8])],
        ));
        roundtrip(&build_object(
            Method::Bitfit(BitFitConfig {}),
            BASE,
            vec![
                t(&format!("{p}.attention.self.query.bias"), vec![8]),
                t("base_model.model.embeddings.LayerNorm.bias", vec![8]),
            ],
        ));
        let ad = Method::Adapter(BottleneckConfig {
            name: "peftdb".into(),
            hidden_size: 8,
            bottleneck_size: 2,
            non_linearity: "relu".into(),
            mh_adapter: true,
            output_adapter: true,
        });
        let mut ts = Vec::new();
        for place in ["attention.output", "output"] {
            let q = format!("bert.encoder.layer.0.{place}.adapters.peftdb");
            ts.push(t(&format!("{q}.adapter_down.0.weight"), vec![2, 8]));
            ts.push(t(&format!("{q}.adapter_down.0.bias"), vec![2]));
            ts.push(t(&format!("{q}.adapter_up.weight"), vec![8, 2]));
            ts.push(t(&format!("{q}.adapter_up.bias"), vec![8]));
        }
        roundtrip(&build_object(ad, BASE, ts));
    }
}
