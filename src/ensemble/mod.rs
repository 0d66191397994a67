//! Ensembling candidate objects into a new task's initialization (PEWE, Lv et al., ACL 2023).
//!
//! - [`softmax_weights`]: w = softmax(S / tau) over the candidates' indicator scores.
//! - [`merge`] with [`MergeMode::Param`]: O_new = sum_i w_i O_i, tensor by tensor, for candidates of one
//!   method, configuration and shape (exactly as the paper). Baselines: [`average`] (Average of
//!   Checkpoints, or Manual Division when given the objects of the same group) and [`best_single`].
//! - For LoRA, merges of the weight updates delta-W = s B A (s = alpha/r, or alpha/sqrt(r) with rsLoRA, per
//!   module with rank_pattern/alpha_pattern), which accept candidates of different ranks and scalings:
//!   [`MergeMode::DeltaCat`] is exact (B = [w_1 s_1/s B_1 | ... ], A = [A_1; ...], rank = sum of ranks);
//!   [`MergeMode::DeltaSvd`] re-factors sum_i w_i s_i B_i A_i to a target rank by a truncated SVD computed
//!   from the factors (QR of the stacked B and A^T, then the SVD of a small R x R matrix), never forming
//!   delta-W. Tensors that are not LoRA factors (biases saved with `bias="all"`) are averaged with the weights.
//!
//! **One-hot weights reproduce the candidate**: zero-weight candidates are skipped (not added as 0 x value,
//! which would turn -0.0 into +0.0), weight 1 multiplies exactly, and a configuration that does not change is
//! written back verbatim; `Param` and `DeltaCat` give the candidate's exact bytes, `DeltaSvd` gives the same
//! delta-W (to floating-point precision) with re-factored A and B.
//!
//! The output's configuration is the highest-weight candidate's, with `r`/`rank_pattern` updated where the
//! merge changed a module's rank; its scaling (alpha/r or rsLoRA) is what the merged factors are scaled for.

use crate::object::layout::{parse_tensor_name, Role};
use crate::object::{DType, LightweightObject, LoraConfig, Method, Tensor};
use nalgebra::DMatrix;
use std::collections::BTreeMap;
use thiserror::Error;

/// Errors of ensembling.
#[derive(Debug, Error, PartialEq)]
pub enum EnsembleError {
    #[error("no candidates to ensemble")]
    NoCandidates,
    #[error("temperature tau must be a positive finite number (got {0})")]
    BadTemperature(f64),
    #[error("{scores} scores for {candidates} candidates")]
    LengthMismatch { scores: usize, candidates: usize },
    #[error("indicator scores must be finite (score {index} is {value})")]
    NonFiniteScore { index: usize, value: f64 },
    #[error("weights must be non-negative and sum to 1 (sum {0})")]
    BadWeights(f64),
    #[error("candidates are for different base models ({a:?} and {b:?})")]
    BaseModelMismatch { a: String, b: String },
    #[error("candidates {a} and {b} differ in {detail}; parameter-space ensembling needs one method, configuration and shape: for LoRA of different ranks or scalings use a delta merge (--merge delta-cat or delta-svd)")]
    MixedShapes { a: usize, b: usize, detail: String },
    #[error("delta merges are for LoRA; candidate {index} is {method}")]
    NotLora { index: usize, method: String },
    #[error("candidate {index}: tensor {tensor:?} is malformed for a delta merge ({detail})")]
    Malformed {
        index: usize,
        tensor: String,
        detail: String,
    },
}

impl EnsembleError {
    pub fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            EnsembleError::NoCandidates => ErrorKind::NoCandidates,
            EnsembleError::BaseModelMismatch { .. }
            | EnsembleError::MixedShapes { .. }
            | EnsembleError::NotLora { .. }
            | EnsembleError::Malformed { .. } => ErrorKind::InvalidAdapter,
            _ => ErrorKind::InvalidInput,
        }
    }
}

/// How candidates are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeMode {
    /// Weighted average of the parameters (the paper).
    Param,
    /// Exact delta-W merge by concatenating the factors.
    DeltaCat,
    /// Delta-W merge re-factored by truncated SVD to `rank` (default: the highest-weight candidate's rank of
    /// each module).
    DeltaSvd { rank: Option<usize> },
}

/// A merge mode by name, as the CLI and reports spell it (`param`, `delta-cat`, `delta-svd`); the SVD rank
/// is a separate setting ([`MergeKind::mode`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeKind {
    Param,
    DeltaCat,
    DeltaSvd,
}

impl MergeKind {
    pub const ALL: [MergeKind; 3] = [MergeKind::Param, MergeKind::DeltaCat, MergeKind::DeltaSvd];
    pub fn as_str(self) -> &'static str {
        match self {
            MergeKind::Param => "param",
            MergeKind::DeltaCat => "delta-cat",
            MergeKind::DeltaSvd => "delta-svd",
        }
    }
    /// The merge this name means, with the SVD rank for `delta-svd` (None: the best candidate's).
    pub fn mode(self, rank: Option<usize>) -> MergeMode {
        match self {
            MergeKind::Param => MergeMode::Param,
            MergeKind::DeltaCat => MergeMode::DeltaCat,
            MergeKind::DeltaSvd => MergeMode::DeltaSvd { rank },
        }
    }
}

impl MergeMode {
    /// The name of this merge ([`MergeKind`]), without its rank.
    pub fn kind(self) -> MergeKind {
        match self {
            MergeMode::Param => MergeKind::Param,
            MergeMode::DeltaCat => MergeKind::DeltaCat,
            MergeMode::DeltaSvd { .. } => MergeKind::DeltaSvd,
        }
    }
}

impl std::str::FromStr for MergeKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        MergeKind::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown merge {s:?}; one of param, delta-cat, delta-svd"))
    }
}

impl std::fmt::Display for MergeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// softmax(S / tau), computed stably.
pub fn softmax_weights(scores: &[f64], tau: f64) -> Result<Vec<f64>, EnsembleError> {
    if !(tau.is_finite() && tau > 0.0) {
        return Err(EnsembleError::BadTemperature(tau));
    }
    if scores.is_empty() {
        return Err(EnsembleError::NoCandidates);
    }
    if let Some((index, &value)) = scores.iter().enumerate().find(|(_, s)| !s.is_finite()) {
        return Err(EnsembleError::NonFiniteScore { index, value });
    }
    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = scores.iter().map(|s| ((s - max) / tau).exp()).collect();
    let z: f64 = e.iter().sum();
    Ok(e.into_iter().map(|x| x / z).collect())
}

/// Average of the candidates (Average of Checkpoints; Manual Division when given one group's objects).
pub fn average(cands: &[&LightweightObject]) -> Result<LightweightObject, EnsembleError> {
    if cands.is_empty() {
        return Err(EnsembleError::NoCandidates);
    }
    let w = vec![1.0 / cands.len() as f64; cands.len()];
    merge(cands, &w, MergeMode::Param)
}

/// The candidate with the highest score (ties: the first).
pub fn best_single(
    cands: &[&LightweightObject],
    scores: &[f64],
) -> Result<LightweightObject, EnsembleError> {
    check_inputs(cands, scores)?;
    let mut best = 0;
    for (i, s) in scores.iter().enumerate() {
        if *s > scores[best] {
            best = i;
        }
    }
    Ok(cands[best].clone())
}

fn check_inputs(cands: &[&LightweightObject], w: &[f64]) -> Result<(), EnsembleError> {
    if cands.is_empty() {
        return Err(EnsembleError::NoCandidates);
    }
    if w.len() != cands.len() {
        return Err(EnsembleError::LengthMismatch {
            scores: w.len(),
            candidates: cands.len(),
        });
    }
    for c in cands {
        if c.base_model != cands[0].base_model {
            return Err(EnsembleError::BaseModelMismatch {
                a: cands[0].base_model.clone(),
                b: c.base_model.clone(),
            });
        }
    }
    Ok(())
}

/// Combine candidates with the given weights (non-negative, summing to 1).
pub fn merge(
    cands: &[&LightweightObject],
    weights: &[f64],
    mode: MergeMode,
) -> Result<LightweightObject, EnsembleError> {
    check_inputs(cands, weights)?;
    let sum: f64 = weights.iter().sum();
    if weights.iter().any(|w| !w.is_finite() || *w < 0.0) || (sum - 1.0).abs() > 1e-6 {
        return Err(EnsembleError::BadWeights(sum));
    }
    // Highest weight first; zero weights dropped.
    let mut order: Vec<usize> = (0..cands.len()).filter(|&i| weights[i] > 0.0).collect();
    order.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]).then(a.cmp(&b)));
    match mode {
        MergeMode::Param => merge_params(cands, weights, &order),
        MergeMode::DeltaCat => merge_delta(cands, weights, &order, None),
        MergeMode::DeltaSvd { rank } => merge_delta(cands, weights, &order, Some(rank)),
    }
}

/// Weighted sum of tensors of one shape, accumulated in f64, returned in `dtype`. Starts from the first
/// term (no 0.0 + x, which would lose the sign of -0.0).
fn weighted_sum(terms: &[(f64, &Tensor)], dtype: DType, name: &str, shape: &[usize]) -> Tensor {
    let mut acc: Vec<f64> = terms[0]
        .1
        .to_f32()
        .into_iter()
        .map(|v| terms[0].0 * v as f64)
        .collect();
    for (w, t) in &terms[1..] {
        for (a, v) in acc.iter_mut().zip(t.to_f32()) {
            *a += w * v as f64;
        }
    }
    from_f64(name, shape, &acc, dtype)
}

fn from_f64(name: &str, shape: &[usize], vals: &[f64], dtype: DType) -> Tensor {
    let mut data = Vec::with_capacity(vals.len() * dtype.size());
    for v in vals {
        let f = *v as f32;
        match dtype {
            DType::F32 => data.extend_from_slice(&f.to_le_bytes()),
            DType::F16 => data.extend_from_slice(&half::f16::from_f32(f).to_le_bytes()),
            DType::BF16 => data.extend_from_slice(&half::bf16::from_f32(f).to_le_bytes()),
        }
    }
    Tensor {
        name: name.to_string(),
        dtype,
        shape: shape.to_vec(),
        data,
    }
}

fn merge_params(
    cands: &[&LightweightObject],
    w: &[f64],
    order: &[usize],
) -> Result<LightweightObject, EnsembleError> {
    let base = cands[order[0]];
    for (i, c) in cands.iter().enumerate() {
        if c.method != base.method {
            return Err(EnsembleError::MixedShapes {
                a: order[0],
                b: i,
                detail: format!(
                    "method configuration ({} vs {})",
                    base.method.summary(),
                    c.method.summary()
                ),
            });
        }
        if c.tensors.len() != base.tensors.len() {
            return Err(EnsembleError::MixedShapes {
                a: order[0],
                b: i,
                detail: format!(
                    "number of tensors ({} vs {})",
                    base.tensors.len(),
                    c.tensors.len()
                ),
            });
        }
    }
    let mut tensors = Vec::with_capacity(base.tensors.len());
    for t in &base.tensors {
        let mut terms = Vec::with_capacity(order.len());
        for &i in order {
            let other = cands[i]
                .tensor(&t.name)
                .ok_or_else(|| EnsembleError::MixedShapes {
                    a: order[0],
                    b: i,
                    detail: format!("tensors (no {:?})", t.name),
                })?;
            if other.shape != t.shape {
                return Err(EnsembleError::MixedShapes {
                    a: order[0],
                    b: i,
                    detail: format!(
                        "the shape of {:?} ({:?} vs {:?})",
                        t.name, t.shape, other.shape
                    ),
                });
            }
            terms.push((w[i], other));
        }
        tensors.push(weighted_sum(&terms, t.dtype, &t.name, &t.shape));
    }
    Ok(LightweightObject {
        tensors,
        ..base.clone()
    })
}

struct LoraFactors<'a> {
    a: &'a Tensor,
    b: &'a Tensor,
}

/// A LoRA candidate split into its config, its (A, B) factors by module path, and its other tensors.
type LoraParts<'a> = (
    &'a LoraConfig,
    BTreeMap<String, LoraFactors<'a>>,
    Vec<&'a Tensor>,
);

fn lora_parts<'a>(index: usize, o: &'a LightweightObject) -> Result<LoraParts<'a>, EnsembleError> {
    let cfg = match &o.method {
        Method::Lora(c) => c,
        m => {
            return Err(EnsembleError::NotLora {
                index,
                method: m.kind().to_string(),
            })
        }
    };
    let mut a_map: BTreeMap<String, &Tensor> = BTreeMap::new();
    let mut b_map: BTreeMap<String, &Tensor> = BTreeMap::new();
    let mut others = Vec::new();
    for t in &o.tensors {
        let loc = parse_tensor_name(&t.name);
        match loc.role {
            Role::LoraA => {
                a_map.insert(loc.module_path, t);
            }
            Role::LoraB => {
                b_map.insert(loc.module_path, t);
            }
            _ => others.push(t),
        }
    }
    let mut out = BTreeMap::new();
    for (m, a) in a_map {
        let b = b_map.remove(&m).ok_or_else(|| EnsembleError::Malformed {
            index,
            tensor: a.name.clone(),
            detail: "no lora_B".into(),
        })?;
        if a.shape.len() != 2 || b.shape.len() != 2 || a.shape[0] != b.shape[1] {
            return Err(EnsembleError::Malformed {
                index,
                tensor: a.name.clone(),
                detail: format!("A {:?} and B {:?} do not share a rank", a.shape, b.shape),
            });
        }
        out.insert(m, LoraFactors { a, b });
    }
    if let Some((_, b)) = b_map.into_iter().next() {
        return Err(EnsembleError::Malformed {
            index,
            tensor: b.name.clone(),
            detail: "no lora_A".into(),
        });
    }
    Ok((cfg, out, others))
}

fn merge_delta(
    cands: &[&LightweightObject],
    w: &[f64],
    order: &[usize],
    svd_rank: Option<Option<usize>>,
) -> Result<LightweightObject, EnsembleError> {
    let parts: Vec<_> = cands
        .iter()
        .enumerate()
        .map(|(i, c)| lora_parts(i, c))
        .collect::<Result<_, _>>()?;
    let base_ix = order[0];
    let base = cands[base_ix];
    let (base_cfg, base_factors, base_others) = &parts[base_ix];
    let mut out_cfg = (*base_cfg).clone();

    // Every module any weighted candidate adapts, and (in the base's naming where it has one) its tensors.
    let mut modules: BTreeMap<String, (String, String, usize, usize)> = BTreeMap::new(); // m -> (A name, B name, out, in)
    for &i in order {
        for (m, f) in &parts[i].1 {
            let (out_dim, in_dim) = (f.b.shape[0], f.a.shape[1]);
            if let Some((_, _, o, n)) = modules.get(m) {
                if (*o, *n) != (out_dim, in_dim) {
                    return Err(EnsembleError::MixedShapes {
                        a: base_ix,
                        b: i,
                        detail: format!("the shape of module {m} ({o}x{n} vs {out_dim}x{in_dim})"),
                    });
                }
                continue;
            }
            let names = base_factors
                .get(m)
                .map(|bf| (bf.a.name.clone(), bf.b.name.clone()))
                .unwrap_or_else(|| (f.a.name.clone(), f.b.name.clone()));
            modules.insert(m.clone(), (names.0, names.1, out_dim, in_dim));
        }
    }
    // New ranks per module, then the output config's scalings.
    let mut new_rank: BTreeMap<String, usize> = BTreeMap::new();
    for (m, (_, _, out_dim, in_dim)) in &modules {
        let total: usize = order
            .iter()
            .filter_map(|&i| parts[i].1.get(m))
            .map(|f| f.a.shape[0])
            .sum();
        let r = match svd_rank {
            None => total,
            Some(target) => {
                let t = target.unwrap_or_else(|| base_cfg.rank_alpha_for(m).0);
                t.min(total).min(*out_dim).min(*in_dim).max(1)
            }
        };
        new_rank.insert(m.clone(), r);
    }
    let mut changed = false;
    for (m, r) in &new_rank {
        if out_cfg.rank_alpha_for(m).0 != *r {
            out_cfg.rank_pattern.insert(m.clone(), *r);
            changed = true;
        }
    }
    let dtype = base.tensors[0].dtype;
    let mut merged: BTreeMap<String, Tensor> = BTreeMap::new();
    for (m, (a_name, b_name, out_dim, in_dim)) in &modules {
        let s_out = out_cfg.scaling_for(m);
        let contrib: Vec<(f64, &LoraFactors)> = order
            .iter()
            .filter_map(|&i| {
                parts[i]
                    .1
                    .get(m)
                    .map(|f| (w[i] * parts[i].0.scaling_for(m), f))
            })
            .collect();
        let (a_t, b_t) = match svd_rank {
            None => {
                // A = [A_1; A_2; ...], B = [c_1 B_1 | c_2 B_2 | ...] with c_i = w_i s_i / s_out.
                let r = new_rank[m];
                let mut a_vals = Vec::with_capacity(r * in_dim);
                let mut b_vals = vec![0f64; out_dim * r];
                let mut col = 0;
                for (ws, f) in &contrib {
                    let c = ws / s_out;
                    a_vals.extend(f.a.to_f32().into_iter().map(|v| v as f64));
                    let ri = f.b.shape[1];
                    let bv = f.b.to_f32();
                    for row in 0..*out_dim {
                        for k in 0..ri {
                            b_vals[row * r + col + k] = c * bv[row * ri + k] as f64;
                        }
                    }
                    col += ri;
                }
                (
                    from_f64(a_name, &[r, *in_dim], &a_vals, dtype),
                    from_f64(b_name, &[*out_dim, r], &b_vals, dtype),
                )
            }
            Some(_) => svd_refactor(
                &contrib,
                new_rank[m],
                s_out,
                *out_dim,
                *in_dim,
                a_name,
                b_name,
                dtype,
            ),
        };
        merged.insert(a_name.clone(), a_t);
        merged.insert(b_name.clone(), b_t);
    }
    // Non-factor tensors (biases): weighted average over the weighted candidates, which must all have them.
    for t in base_others {
        let mut terms = Vec::new();
        for &i in order {
            let other = parts[i]
                .2
                .iter()
                .find(|o| o.name == t.name)
                .ok_or_else(|| EnsembleError::MixedShapes {
                    a: base_ix,
                    b: i,
                    detail: format!("tensors (no {:?})", t.name),
                })?;
            if other.shape != t.shape {
                return Err(EnsembleError::MixedShapes {
                    a: base_ix,
                    b: i,
                    detail: format!("the shape of {:?}", t.name),
                });
            }
            terms.push((w[i], *other));
        }
        let wsum: f64 = terms.iter().map(|(x, _)| x).sum();
        let terms: Vec<(f64, &Tensor)> = terms.into_iter().map(|(x, t)| (x / wsum, t)).collect();
        merged.insert(
            t.name.clone(),
            weighted_sum(&terms, t.dtype, &t.name, &t.shape),
        );
    }
    // Keep the base's tensor order; modules only other candidates adapt go after, sorted by name.
    let mut tensors = Vec::with_capacity(merged.len());
    for t in &base.tensors {
        if let Some(x) = merged.remove(&t.name) {
            tensors.push(x);
        }
    }
    tensors.extend(merged.into_values());
    let config_json = if changed {
        updated_lora_config_json(&base.config_json, &out_cfg)
    } else {
        base.config_json.clone()
    };
    Ok(LightweightObject {
        method: Method::Lora(out_cfg),
        tensors,
        config_json,
        ..base.clone()
    })
}

#[allow(clippy::too_many_arguments)]
fn svd_refactor(
    contrib: &[(f64, &LoraFactors)],
    rank: usize,
    s_out: f64,
    out_dim: usize,
    in_dim: usize,
    a_name: &str,
    b_name: &str,
    dtype: DType,
) -> (Tensor, Tensor) {
    // delta-W = Bc Ac with Bc = [ws_1 B_1 | ...] (out x R) and Ac = [A_1; ...] (R x in).
    let total: usize = contrib.iter().map(|(_, f)| f.a.shape[0]).sum();
    let mut bc = DMatrix::<f64>::zeros(out_dim, total);
    let mut ac = DMatrix::<f64>::zeros(total, in_dim);
    let mut off = 0;
    for (ws, f) in contrib {
        let r = f.a.shape[0];
        let av = f.a.to_f32();
        let bv = f.b.to_f32();
        for k in 0..r {
            for j in 0..in_dim {
                ac[(off + k, j)] = av[k * in_dim + j] as f64;
            }
            for i in 0..out_dim {
                bc[(i, off + k)] = ws * bv[i * r + k] as f64;
            }
        }
        off += r;
    }
    // QR of Bc and Ac^T, SVD of the small core Rb Ra^T.
    let qb = bc.qr();
    let (q_b, r_b) = (qb.q(), qb.r());
    let qa = ac.transpose().qr();
    let (q_a, r_a) = (qa.q(), qa.r());
    let core = &r_b * r_a.transpose();
    let svd = core.svd(true, true);
    let u = svd.u.expect("u requested");
    let v_t = svd.v_t.expect("v_t requested");
    // nalgebra does not sort singular values: order them.
    let mut idx: Vec<usize> = (0..svd.singular_values.len()).collect();
    idx.sort_by(|&x, &y| svd.singular_values[y].total_cmp(&svd.singular_values[x]));
    let left = &q_b * &u; // out x k
    let right = v_t * q_a.transpose(); // k x in
    let mut a_vals = vec![0f64; rank * in_dim];
    let mut b_vals = vec![0f64; out_dim * rank];
    for (k, &c) in idx.iter().take(rank).enumerate() {
        let sq = svd.singular_values[c].max(0.0).sqrt();
        for j in 0..in_dim {
            a_vals[k * in_dim + j] = sq * right[(c, j)];
        }
        for i in 0..out_dim {
            b_vals[i * rank + k] = sq * left[(i, c)] / s_out;
        }
    }
    (
        from_f64(a_name, &[rank, in_dim], &a_vals, dtype),
        from_f64(b_name, &[out_dim, rank], &b_vals, dtype),
    )
}

/// The base candidate's adapter_config.json with `r` and `rank_pattern` replaced.
fn updated_lora_config_json(original: &[u8], cfg: &LoraConfig) -> Vec<u8> {
    let mut v: serde_json::Value =
        serde_json::from_slice(original).unwrap_or_else(|_| serde_json::json!({}));
    if !v.is_object() {
        v = serde_json::json!({});
    }
    v["peft_type"] = "LORA".into();
    v["r"] = cfg.r.into();
    v["rank_pattern"] = serde_json::to_value(&cfg.rank_pattern).expect("map serializes");
    let mut out = serde_json::to_vec_pretty(&v).expect("json serializes");
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::{lora, ModelShape, Seeds};

    #[test]
    fn softmax_matches_direct_computation() {
        let s = [1.0, 2.0, -0.5];
        let tau = 0.5;
        let w = softmax_weights(&s, tau).unwrap();
        let e: Vec<f64> = s.iter().map(|x| (x / tau).exp()).collect();
        let z: f64 = e.iter().sum();
        for (a, b) in w.iter().zip(e.iter().map(|x| x / z)) {
            assert!((a - b).abs() < 1e-12);
        }
        assert_eq!(
            softmax_weights(&s, 0.0),
            Err(EnsembleError::BadTemperature(0.0))
        );
        assert_eq!(
            softmax_weights(&s, -1.0),
            Err(EnsembleError::BadTemperature(-1.0))
        );
        assert!(matches!(
            softmax_weights(&[1.0, f64::NAN], 1.0),
            Err(EnsembleError::NonFiniteScore { index: 1, .. })
        ));
        // Large scores do not overflow.
        let w = softmax_weights(&[1000.0, 999.0], 0.01).unwrap();
        assert!(w[0] > 0.99 && w[0].is_finite());
    }

    fn small(seed: u64) -> LightweightObject {
        let m = ModelShape {
            name: "m".into(),
            layers: 2,
            hidden: 6,
            intermediate: 12,
            heads: 2,
        };
        lora(
            &m,
            2,
            &["query", "value"],
            Seeds {
                group: seed,
                task: seed + 1,
                object: seed + 2,
            },
        )
    }

    #[test]
    fn param_merge_is_the_weighted_sum() {
        let (a, b) = (small(1), small(7));
        let m = merge(&[&a, &b], &[0.25, 0.75], MergeMode::Param).unwrap();
        for (i, t) in m.tensors.iter().enumerate() {
            let (x, y) = (a.tensors[i].to_f32(), b.tensors[i].to_f32());
            for (k, v) in t.to_f32().iter().enumerate() {
                let want = (0.25 * x[k] as f64 + 0.75 * y[k] as f64) as f32;
                assert_eq!(*v, want);
            }
        }
    }
}
