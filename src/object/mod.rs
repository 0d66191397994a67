//! Lightweight objects: the typed model of a parameter-efficient adapter.
//!
//! A [`LightweightObject`] is what every reader produces and every writer consumes: the method and its
//! configuration ([`Method`]), the base model it was tuned on, its tensors ([`Tensor`], bytes kept in their
//! stored dtype) and the verbatim configuration file it came with, so that an export is byte-identical.
//!
//! Submodules:
//! - `layout`: the tensor-name parser (layer index, module path, role) for BERT, Llama/Qwen/Mistral, T5
//!   and GPT-2 layouts, and the per-layer split of prefix tuning's `prompt_embeddings`.
//! - [`safetensors_io`]: a validating safetensors reader that keeps tensor order and metadata, and the writer
//!   that reproduces the file byte for byte.
//! - `formats`: PEFT folders, AdapterHub bottleneck adapters and peftdb's BitFit bias sets.
//! - `peft_config`: the rules PEFT applies to the config fields it reads, checked before anything is stored.

pub(crate) mod build;
pub(crate) mod formats;
pub(crate) mod layout;
pub(crate) mod peft_config;
pub mod safetensors_io;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

pub use crate::dtype::DType;
pub use build::{adapter_config, build_object, build_object_for};
pub use formats::{
    check_output_dir, is_adapter_dir, read_adapter, write_adapter, write_adapter_with,
    AdapterFormat, ReadOptions, MAX_CONFIG_BYTES, MAX_WEIGHTS_BYTES,
};
pub use layout::{parse_tensor_name, LayerRef, Role, TensorLocation};

/// One tensor of an adapter: its name as in the file, dtype, shape and little-endian bytes in that dtype.
#[derive(Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tensor")
            .field("name", &self.name)
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("bytes", &self.data.len())
            .finish()
    }
}

impl Tensor {
    /// Build an f32 tensor from values (used by writers of new adapters and by tests).
    pub fn from_f32(name: impl Into<String>, shape: Vec<usize>, values: &[f32]) -> Tensor {
        let mut data = Vec::with_capacity(values.len() * 4);
        for v in values {
            data.extend_from_slice(&v.to_le_bytes());
        }
        Tensor {
            name: name.into(),
            dtype: DType::F32,
            shape,
            data,
        }
    }

    /// Number of elements (product of the shape).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Add the values, converted to f32 and then f64, to `acc` element by element (`acc[i] += v[i]`, for
    /// as many as both have), without a converted copy of the tensor.
    pub fn add_to_f64(&self, acc: &mut [f64]) {
        match self.f32_in_place() {
            Some(values) => {
                for (a, v) in acc.iter_mut().zip(values) {
                    *a += *v as f64;
                }
            }
            None => {
                let mut acc = acc.iter_mut();
                self.for_each_decoded(|v| {
                    if let Some(a) = acc.next() {
                        *a += v as f64;
                    }
                });
            }
        }
    }

    /// The values where they are: f32 data on a little-endian machine, its bytes f32-aligned (the
    /// allocator always gives that on glibc).
    fn f32_in_place(&self) -> Option<&[f32]> {
        if self.dtype != DType::F32 || cfg!(target_endian = "big") {
            return None;
        }
        bytemuck::try_cast_slice(&self.data[..self.data.len() / 4 * 4]).ok()
    }

    /// Hand `f` each value in order, decoded from its little-endian bytes and converted to f32 (the path
    /// for data that [`Self::f32_in_place`] cannot lend).
    #[inline]
    fn for_each_decoded(&self, mut f: impl FnMut(f32)) {
        fn each<const W: usize>(
            data: &[u8],
            conv: impl Fn([u8; W]) -> f32,
            f: &mut impl FnMut(f32),
        ) {
            for c in data.chunks_exact(W) {
                f(conv(c.try_into().expect("W bytes")));
            }
        }
        match self.dtype {
            DType::F32 => each::<4>(&self.data, f32::from_le_bytes, &mut f),
            DType::F16 => each::<2>(&self.data, |b| half::f16::from_le_bytes(b).to_f32(), &mut f),
            DType::BF16 => each::<2>(
                &self.data,
                |b| half::bf16::from_le_bytes(b).to_f32(),
                &mut f,
            ),
        }
    }

    /// Number of values the data holds (its bytes over the dtype's width).
    pub fn values_len(&self) -> usize {
        self.data.len() / self.dtype.size()
    }

    /// The values converted to f32, whatever the stored dtype.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.numel());
        self.extend_f32(&mut out);
        out
    }

    /// Append the values, converted to f32, to `out`: f32 data in one copy, other dtypes decoded.
    pub fn extend_f32(&self, out: &mut Vec<f32>) {
        match self.f32_in_place() {
            Some(values) => out.extend_from_slice(values),
            None => {
                out.reserve(self.values_len());
                self.for_each_decoded(|v| out.push(v));
            }
        }
    }

    /// Index of the first element that is NaN or infinite, if any: the first whose exponent bits are all
    /// ones. Blocks of 64 bytes are tested without branches (the compiler vectorises that), and only a
    /// block that holds one is searched element by element.
    pub fn first_non_finite(&self) -> Option<usize> {
        fn first<const W: usize>(data: &[u8], exp: u32) -> Option<usize> {
            let word = |c: &[u8]| -> u32 {
                let mut b = [0u8; 4];
                b[..W].copy_from_slice(&c[..W]);
                u32::from_le_bytes(b)
            };
            let bad = |c: &[u8]| word(c) & exp == exp;
            let blocks = data.chunks_exact(64);
            let tail = blocks.remainder();
            for (i, block) in blocks.enumerate() {
                if block.chunks_exact(W).fold(false, |any, c| any | bad(c)) {
                    return block
                        .chunks_exact(W)
                        .position(bad)
                        .map(|j| i * (64 / W) + j);
                }
            }
            tail.chunks_exact(W)
                .position(bad)
                .map(|j| (data.len() - tail.len()) / W + j)
        }
        match self.dtype {
            DType::F32 => first::<4>(&self.data, 0x7f80_0000),
            DType::F16 => first::<2>(&self.data, 0x7c00),
            DType::BF16 => first::<2>(&self.data, 0x7f80),
        }
    }
}

/// The kind of parameter-efficient method, without its hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MethodKind {
    Lora,
    Ia3,
    Prefix,
    Prompt,
    Bitfit,
    /// Bottleneck (Houlsby / Pfeiffer) adapter.
    Adapter,
}

impl MethodKind {
    pub const ALL: [MethodKind; 6] = [
        MethodKind::Lora,
        MethodKind::Ia3,
        MethodKind::Prefix,
        MethodKind::Prompt,
        MethodKind::Bitfit,
        MethodKind::Adapter,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            MethodKind::Lora => "lora",
            MethodKind::Ia3 => "ia3",
            MethodKind::Prefix => "prefix",
            MethodKind::Prompt => "prompt",
            MethodKind::Bitfit => "bitfit",
            MethodKind::Adapter => "adapter",
        }
    }
    pub fn parse(s: &str) -> Option<MethodKind> {
        MethodKind::ALL
            .into_iter()
            .find(|m| m.as_str().eq_ignore_ascii_case(s))
    }
}

impl std::str::FromStr for MethodKind {
    type Err = String;
    /// The one parser of a method name (`lora`, `ia3`, ...; any case), for the CLI and the records alike.
    fn from_str(s: &str) -> Result<Self, String> {
        MethodKind::parse(s).ok_or_else(|| {
            let all: Vec<&str> = MethodKind::ALL.iter().map(|m| m.as_str()).collect();
            format!("unknown method {s:?}; one of {}", all.join(", "))
        })
    }
}

impl fmt::Display for MethodKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// LoRA's `bias` option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LoraBias {
    #[default]
    None,
    All,
    LoraOnly,
}

/// LoRA hyper-parameters, as in PEFT's `LoraConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub use_rslora: bool,
    /// Per-module rank overrides; keys are module-name suffixes (PEFT matches them as `(.*\.)?key$`).
    pub rank_pattern: BTreeMap<String, usize>,
    pub alpha_pattern: BTreeMap<String, f64>,
    pub target_modules: Vec<String>,
    pub bias: LoraBias,
}

impl LoraConfig {
    /// Rank and alpha that apply to a module (its full dotted path, e.g.
    /// `encoder.layer.0.attention.self.query`), following PEFT's suffix matching of the patterns.
    pub fn rank_alpha_for(&self, module_path: &str) -> (usize, f64) {
        let r = pattern_lookup(&self.rank_pattern, module_path).unwrap_or(self.r);
        let alpha = pattern_lookup(&self.alpha_pattern, module_path).unwrap_or(self.alpha);
        (r, alpha)
    }

    /// The LoRA scaling of a module: alpha/r, or alpha/sqrt(r) with rsLoRA.
    pub fn scaling_for(&self, module_path: &str) -> f64 {
        let (r, alpha) = self.rank_alpha_for(module_path);
        if r == 0 {
            return 0.0;
        }
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }
}

/// PEFT's module-name rule: `key` names the module at `module_path` when it is the whole path or a suffix
/// starting at a `.` boundary (`re.match(rf"(.*\.)?{key}$", path)`): "value" matches
/// "encoder.layer.3.attention.self.value" but not "...self.xvalue".
/// `modules_to_save` of an adapter_config.json (a list of module names, or one name; null or absent
/// means none).
pub fn saved_modules_of(config_json: &[u8]) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_slice(config_json).unwrap_or_default();
    match v.get("modules_to_save") {
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|m| m.as_str().map(str::to_string))
            .collect(),
        Some(serde_json::Value::String(m)) => vec![m.clone()],
        _ => Vec::new(),
    }
}

/// Whether tensor `name` belongs to one of the `saved` modules. PEFT saves a module of
/// `modules_to_save` under its own path with its parameter name (`base_model.model.lm_head.weight`,
/// `base_model.model.classifier.bias`); the wrapper's `modules_to_save.{adapter}` segments may appear too.
pub fn is_saved_module_tensor(name: &str, saved: &[String]) -> bool {
    if saved.is_empty() {
        return false;
    }
    let Some((module, _param)) = name.rsplit_once('.') else {
        return false;
    };
    let module = module.strip_prefix("base_model.model.").unwrap_or(module);
    let module = match module.split_once(".modules_to_save") {
        Some((m, _)) => m,
        None => module,
    };
    saved.iter().any(|m| module_matches(module, m))
}

pub fn module_matches(module_path: &str, key: &str) -> bool {
    module_path == key
        || (module_path.ends_with(key)
            && module_path.as_bytes()[module_path.len() - key.len() - 1] == b'.')
}

fn pattern_lookup<V: Copy>(patterns: &BTreeMap<String, V>, module_path: &str) -> Option<V> {
    // PEFT: the first key k (in insertion order) with re.match(rf"(.*\.)?{k}$", name). JSON object order is
    // not kept by our config map, so prefer the longest matching key, which is what users mean by a
    // specific override ("layer.0.attention.self.query" over "query").
    patterns
        .iter()
        .filter(|(k, _)| module_matches(module_path, k))
        .max_by_key(|(k, _)| k.len())
        .map(|(_, v)| *v)
}

/// IA3 hyper-parameters, as in PEFT's `IA3Config`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ia3Config {
    pub target_modules: Vec<String>,
    pub feedforward_modules: Vec<String>,
}

/// Prefix tuning (P-tuning v2 style key/value prefixes in every layer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefixConfig {
    pub num_virtual_tokens: usize,
    pub num_layers: usize,
    pub token_dim: usize,
    pub num_attention_heads: usize,
    /// PEFT's reparameterisation; only its output (`prompt_embeddings`) is stored and used.
    pub prefix_projection: bool,
}

/// Prompt tuning (virtual tokens before the input, in the embedding layer only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptConfig {
    pub num_virtual_tokens: usize,
    pub token_dim: usize,
}

/// BitFit: replacement biases (peftdb's own format, see schema/bitfit_config.schema.json).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct BitFitConfig {}

/// Bottleneck adapter (AdapterHub's `adapters` library layout).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BottleneckConfig {
    /// Adapter name as it appears in the tensor names (`...adapters.{name}.adapter_down...`).
    pub name: String,
    pub hidden_size: usize,
    pub bottleneck_size: usize,
    /// `relu`, `swish`/`silu`, `gelu`, `tanh`.
    pub non_linearity: String,
    /// Adapter after the attention output (Houlsby's first adapter).
    pub mh_adapter: bool,
    /// Adapter after the feed-forward output.
    pub output_adapter: bool,
}

/// A method with its hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Method {
    Lora(LoraConfig),
    Ia3(Ia3Config),
    Prefix(PrefixConfig),
    Prompt(PromptConfig),
    Bitfit(BitFitConfig),
    Adapter(BottleneckConfig),
}

impl Method {
    /// A short human description, e.g. `lora r=8 alpha=16 rslora`.
    pub fn summary(&self) -> String {
        match self {
            Method::Lora(c) => {
                let mut s = format!("lora r={} alpha={}", c.r, c.alpha);
                if c.use_rslora {
                    s.push_str(" rslora");
                }
                if !c.rank_pattern.is_empty() {
                    s.push_str(&format!(" rank_pattern={:?}", c.rank_pattern));
                }
                if !c.alpha_pattern.is_empty() {
                    s.push_str(&format!(" alpha_pattern={:?}", c.alpha_pattern));
                }
                s.push_str(&format!(" targets={:?}", c.target_modules));
                if c.bias != LoraBias::None {
                    s.push_str(&format!(" bias={:?}", c.bias));
                }
                s
            }
            Method::Ia3(c) => format!(
                "ia3 targets={:?} feedforward={:?}",
                c.target_modules, c.feedforward_modules
            ),
            Method::Prefix(c) => format!(
                "prefix tokens={} layers={} dim={}",
                c.num_virtual_tokens, c.num_layers, c.token_dim
            ),
            Method::Prompt(c) => {
                format!("prompt tokens={} dim={}", c.num_virtual_tokens, c.token_dim)
            }
            Method::Bitfit(_) => "bitfit".into(),
            Method::Adapter(c) => format!(
                "adapter bottleneck={} hidden={} {}",
                c.bottleneck_size, c.hidden_size, c.non_linearity
            ),
        }
    }

    pub fn kind(&self) -> MethodKind {
        match self {
            Method::Lora(_) => MethodKind::Lora,
            Method::Ia3(_) => MethodKind::Ia3,
            Method::Prefix(_) => MethodKind::Prefix,
            Method::Prompt(_) => MethodKind::Prompt,
            Method::Bitfit(_) => MethodKind::Bitfit,
            Method::Adapter(_) => MethodKind::Adapter,
        }
    }
}

/// A parameter-efficient adapter ("lightweight object") in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct LightweightObject {
    pub method: Method,
    /// The base model it was tuned on, as named by its config (`base_model_name_or_path`, `model_name`).
    pub base_model: String,
    /// Which on-disk format it was read from / is written as.
    pub format: AdapterFormat,
    /// Tensors in file order.
    pub tensors: Vec<Tensor>,
    /// The safetensors `__metadata__` map, kept for byte-identical export.
    pub metadata: Option<BTreeMap<String, String>>,
    /// The configuration file's exact bytes (adapter_config.json), written back verbatim on export.
    pub config_json: Vec<u8>,
}

impl LightweightObject {
    pub fn tensor(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The modules its config's `modules_to_save` lists (PEFT trains these whole, e.g. a new `lm_head`
    /// or `classifier`, and saves them beside the adapter's own tensors); empty when there are none.
    pub fn saved_modules(&self) -> Vec<String> {
        saved_modules_of(&self.config_json)
    }

    /// Whether `name` is a tensor of a saved module ([`Self::saved_modules`]): stored and exported with
    /// the adapter, but not one of its tuned updates, so it is not embedded.
    pub fn is_saved_module_tensor(&self, name: &str) -> bool {
        is_saved_module_tensor(name, &self.saved_modules())
    }
    /// Total bytes of tensor data.
    pub fn data_bytes(&self) -> usize {
        self.tensors.iter().map(|t| t.data.len()).sum()
    }
    /// Total number of parameters.
    pub fn num_params(&self) -> usize {
        self.tensors.iter().map(|t| t.numel()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_conversions() {
        let t = Tensor::from_f32("x", vec![3], &[1.0, -2.5, 0.0]);
        assert_eq!(t.to_f32(), vec![1.0, -2.5, 0.0]);
        let mut h = Tensor {
            name: "h".into(),
            dtype: DType::F16,
            shape: vec![2],
            data: vec![],
        };
        for v in [1.5f32, -3.0] {
            h.data
                .extend_from_slice(&half::f16::from_f32(v).to_le_bytes());
        }
        assert_eq!(h.to_f32(), vec![1.5, -3.0]);
        let mut b = h.clone();
        b.dtype = DType::BF16;
        b.data.clear();
        for v in [0.5f32, 4.0] {
            b.data
                .extend_from_slice(&half::bf16::from_f32(v).to_le_bytes());
        }
        assert_eq!(b.to_f32(), vec![0.5, 4.0]);
        assert_eq!(b.first_non_finite(), None);
        let n = Tensor::from_f32("n", vec![2], &[0.0, f32::NAN]);
        assert_eq!(n.first_non_finite(), Some(1));
    }

    proptest::proptest! {
        /// The blocked scan finds what an element-by-element scan finds, for every dtype, at any length,
        /// with NaN/inf at any place (or none); f32 values come back exactly.
        #[test]
        fn first_non_finite_and_to_f32_match_the_element_by_element_definition(
            values in proptest::collection::vec(-1e3f32..1e3, 0..200),
            bad in proptest::option::of((0usize..200, 0u8..3)),
            dtype in 0u8..3,
        ) {
            let mut values = values;
            if let Some((at, which)) = bad {
                if at < values.len() {
                    values[at] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][which as usize];
                }
            }
            let mut t = Tensor::from_f32("t", vec![values.len()], &values);
            let dt = [DType::F32, DType::F16, DType::BF16][dtype as usize];
            if dt != DType::F32 {
                t.dtype = dt;
                t.data = values
                    .iter()
                    .flat_map(|v| match dt {
                        DType::F16 => half::f16::from_f32(*v).to_le_bytes(),
                        _ => half::bf16::from_f32(*v).to_le_bytes(),
                    })
                    .collect();
            }
            let naive = t.to_f32().iter().position(|v| !v.is_finite());
            proptest::prop_assert_eq!(t.first_non_finite(), naive);
            if dt == DType::F32 {
                let back = t.to_f32();
                proptest::prop_assert_eq!(back.len(), values.len());
                for (a, b) in back.iter().zip(&values) {
                    proptest::prop_assert_eq!(a.to_bits(), b.to_bits());
                }
            }
        }
    }

    #[test]
    fn rank_pattern_lookup_follows_suffix_rule() {
        let mut c = LoraConfig {
            r: 4,
            alpha: 8.0,
            use_rslora: false,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            target_modules: vec!["query".into(), "value".into()],
            bias: LoraBias::None,
        };
        c.rank_pattern
            .insert("layer.0.attention.self.query".into(), 2);
        c.rank_pattern.insert("value".into(), 6);
        assert_eq!(
            c.rank_alpha_for("encoder.layer.0.attention.self.query").0,
            2
        );
        assert_eq!(
            c.rank_alpha_for("encoder.layer.10.attention.self.query").0,
            4
        );
        assert_eq!(
            c.rank_alpha_for("encoder.layer.3.attention.self.value").0,
            6
        );
        // "value" must not match "xvalue".
        assert_eq!(
            c.rank_alpha_for("encoder.layer.3.attention.self.xvalue").0,
            4
        );
        assert_eq!(
            c.scaling_for("encoder.layer.3.attention.self.value"),
            8.0 / 6.0
        );
        c.use_rslora = true;
        assert!((c.scaling_for("encoder.layer.3.attention.self.key") - 4.0).abs() < 1e-12);
    }
}
