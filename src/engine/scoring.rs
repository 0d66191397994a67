//! Head-free label scoring.
//!
//! The logit of label c for input x is `cos(e(x), e(v_c)) / T`, where `e` is the mean-pooled encoder
//! output *with the adapter applied* and `v_c` is the label's verbalizer text (task.json's
//! `labels[].text`); `P = softmax(logits)`, and the cross-entropy of P against the gold label is both the
//! training loss and the indicators' loss.
//!
//! Why this choice: any adapter (trained on any labels, or on none) can score any task without a
//! task-specific head, which the indicators need; the cosine is the similarity the sentence encoder was
//! trained with, so the base model is already a sensible zero-shot classifier; and the temperature
//! ([`ScoreOptions::temperature`], default [`DEFAULT_TEMPERATURE`] = 0.05, i.e. the scale 20 that
//! sentence-transformers uses for in-batch contrastive training) turns cosines in [-1, 1] into a usable
//! spread of probabilities. Label embeddings are computed with the same adapter, so training moves both
//! sides; in training they get gradients too.

use super::adapters::AdapterSet;
use super::error::{EngineError, EngineResult};
use super::llama::LlamaModel;
use super::model::Grad;
use super::tokenize::{Batch, TokenIds};
use super::{Backbone, Engine};
use crate::object::LightweightObject;
use candle_core::{Tensor, Var, D};

/// The default temperature (logits are cosines / 0.05).
pub const DEFAULT_TEMPERATURE: f64 = 0.05;

/// Options of label scoring.
#[derive(Debug, Clone)]
pub struct ScoreOptions {
    pub temperature: f64,
    /// Inputs per forward pass.
    pub batch_size: usize,
}

impl Default for ScoreOptions {
    fn default() -> Self {
        ScoreOptions {
            temperature: DEFAULT_TEMPERATURE,
            batch_size: 32,
        }
    }
}

impl ScoreOptions {
    fn check(&self) -> EngineResult<()> {
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(EngineError::InvalidArgument(format!(
                "temperature must be a positive number, got {}",
                self.temperature
            )));
        }
        Ok(())
    }
}

/// Logits and probabilities of a set of inputs over a task's labels.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelScores {
    /// (inputs x labels) logits.
    pub logits: Vec<Vec<f32>>,
    /// (inputs x labels) softmax probabilities.
    pub probs: Vec<Vec<f32>>,
}

impl LabelScores {
    /// Index of the most probable label of each input (ties: the first).
    pub fn predictions(&self) -> Vec<usize> {
        self.logits
            .iter()
            .map(|r| {
                r.iter()
                    .enumerate()
                    .fold(
                        (0, f32::NEG_INFINITY),
                        |acc, (i, &v)| if v > acc.1 { (i, v) } else { acc },
                    )
                    .0
            })
            .collect()
    }

    /// Fraction of inputs whose prediction equals the target.
    pub fn accuracy(&self, targets: &[usize]) -> f64 {
        let p = self.predictions();
        let hits = p.iter().zip(targets).filter(|(a, b)| a == b).count();
        hits as f64 / targets.len().max(1) as f64
    }

    /// Mean cross-entropy against the targets.
    pub fn cross_entropy(&self, targets: &[usize]) -> f64 {
        let s: f64 = self
            .probs
            .iter()
            .zip(targets)
            .map(|(p, &t)| -(p[t].max(1e-30) as f64).ln())
            .sum();
        s / targets.len().max(1) as f64
    }
}

/// Gradients of the mean cross-entropy w.r.t. each tensor of an adapter.
#[derive(Debug, Clone)]
pub struct AdapterGradients {
    pub loss: f32,
    /// (tensor name, gradient values in the tensor's shape, row-major), in the object's tensor order.
    pub grads: Vec<(String, Vec<f32>)>,
}

impl AdapterGradients {
    /// The L2 norm of all gradients together (GraNd).
    pub fn norm(&self) -> f64 {
        self.grads
            .iter()
            .flat_map(|(_, g)| g.iter())
            .map(|&v| (v as f64) * (v as f64))
            .sum::<f64>()
            .sqrt()
    }
}

/// Row-normalise (B, H) embeddings.
fn l2_normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    let n = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::INFINITY)?;
    x.broadcast_div(&n)
}

/// Logits (B, C) from input embeddings (B, H) and label embeddings (C, H).
pub fn cosine_logits(
    inputs: &Tensor,
    labels: &Tensor,
    temperature: f64,
) -> candle_core::Result<Tensor> {
    let a = l2_normalize(inputs)?;
    let b = l2_normalize(labels)?;
    a.matmul(&b.t()?)? / temperature
}

/// Mean cross-entropy of logits (B, C) against u32 targets (B).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    candle_nn::loss::cross_entropy(logits, targets)
}

impl Engine {
    /// Label logits (B, C) of token rows (inputs from [`Engine::tokenize`], labels from
    /// [`Engine::tokenize_labels`]), with the adapter applied. Encoders: the cosine of the inputs' and
    /// verbalizers' embeddings / T. Decoders: each verbalizer's summed token log-likelihood after the
    /// input's prompt, times `DEFAULT_TEMPERATURE / T` (at the default temperature, the log-likelihood
    /// itself). `grad` selects the differentiable forward (training, gradients).
    pub fn label_logits(
        &self,
        adapter: Option<&AdapterSet>,
        labels: &[TokenIds],
        inputs: &[&[u32]],
        temperature: f64,
        grad: Grad,
    ) -> EngineResult<Tensor> {
        match &self.model {
            Backbone::Encoder(_) => {
                let pad = self.tokenizer.pad_id();
                let lab_rows: Vec<&[u32]> = labels.iter().map(|r| r.as_slice()).collect();
                let lab = Batch::pad(&lab_rows, pad, &self.device)?;
                let inp = Batch::pad(inputs, pad, &self.device)?;
                let e_in = self.embed_grad(&inp, adapter, grad)?;
                let e_lab = self.embed_grad(&lab, adapter, grad)?;
                Ok(cosine_logits(&e_in, &e_lab, temperature)?)
            }
            Backbone::Decoder(m) => {
                let ll =
                    decoder_logliks(m, self.tokenizer.pad_id(), adapter, labels, inputs, grad)?;
                Ok((ll * (DEFAULT_TEMPERATURE / temperature))?)
            }
        }
    }

    /// Score tokenized inputs against tokenized verbalizers (encoders compute label embeddings once).
    pub fn score(
        &self,
        adapter: Option<&AdapterSet>,
        labels: &[TokenIds],
        inputs: &[TokenIds],
        opts: &ScoreOptions,
    ) -> EngineResult<LabelScores> {
        opts.check()?;
        let pad = self.tokenizer.pad_id();
        let e_lab = match &self.model {
            Backbone::Encoder(_) => {
                let lab_rows: Vec<&[u32]> = labels.iter().map(|r| r.as_slice()).collect();
                let lab = Batch::pad(&lab_rows, pad, &self.device)?;
                Some(self.embed(&lab, adapter)?)
            }
            Backbone::Decoder(_) => None,
        };
        // Batches of similar lengths pad less: score in length order, hand back in input order. (Rows are
        // independent: padding is masked, so the numbers do not depend on the batching.)
        let mut order: Vec<usize> = (0..inputs.len()).collect();
        order.sort_by_key(|&i| (inputs[i].len(), i));
        let mut logits = vec![Vec::new(); inputs.len()];
        let mut probs = vec![Vec::new(); inputs.len()];
        let mut at = 0;
        for chunk in order.chunks(opts.batch_size.max(1)) {
            let rows: Vec<&[u32]> = chunk.iter().map(|&i| inputs[i].as_slice()).collect();
            let l = match &e_lab {
                Some(e_lab) => {
                    let b = Batch::pad(&rows, pad, &self.device)?;
                    cosine_logits(&self.embed(&b, adapter)?, e_lab, opts.temperature)?
                }
                None => self.label_logits(adapter, labels, &rows, opts.temperature, Grad::No)?,
            };
            let p = candle_nn::ops::softmax_last_dim(&l)?;
            for (lr, pr) in l.to_vec2::<f32>()?.into_iter().zip(p.to_vec2::<f32>()?) {
                logits[order[at]] = lr;
                probs[order[at]] = pr;
                at += 1;
            }
        }
        Ok(LabelScores { logits, probs })
    }

    /// Score several adapters on the same inputs. LoRA adapters of one layout run **together**: they are
    /// stacked ([`AdapterSet::stack_lora`]) and the batch is repeated once per adapter, so each batch of
    /// inputs is one forward pass for all of them; anything else (or `stack` <= 1) runs one by one. The
    /// result is the same as calling [`Engine::score`] for each (up to float rounding).
    pub fn score_many(
        &self,
        adapters: &[&AdapterSet],
        labels: &[TokenIds],
        inputs: &[TokenIds],
        opts: &ScoreOptions,
        stack: usize,
    ) -> EngineResult<Vec<LabelScores>> {
        opts.check()?;
        let mut out = Vec::with_capacity(adapters.len());
        let mut i = 0;
        while i < adapters.len() {
            let end = (i + stack.max(1)).min(adapters.len());
            let group = &adapters[i..end];
            // Decoders score each adapter alone (no stacked pass for them yet).
            let stacked = match self.model {
                Backbone::Encoder(_) => AdapterSet::stack_lora(group),
                Backbone::Decoder(_) => None,
            };
            match stacked {
                Some(stacked) => {
                    out.extend(self.score_stacked(&stacked, group.len(), labels, inputs, opts)?)
                }
                None => {
                    for a in group {
                        out.push(self.score(Some(a), labels, inputs, opts)?);
                    }
                }
            }
            i = end;
        }
        Ok(out)
    }

    fn score_stacked(
        &self,
        stacked: &AdapterSet,
        g: usize,
        labels: &[TokenIds],
        inputs: &[TokenIds],
        opts: &ScoreOptions,
    ) -> EngineResult<Vec<LabelScores>> {
        let pad = self.tokenizer.pad_id();
        let repeat = |rows: &[TokenIds]| -> Vec<Vec<u32>> {
            (0..g).flat_map(|_| rows.iter().cloned()).collect()
        };
        let nl = labels.len();
        let lab_rep = repeat(labels);
        let lab_rows: Vec<&[u32]> = lab_rep.iter().map(|r| r.as_slice()).collect();
        let lab = Batch::pad(&lab_rows, pad, &self.device)?;
        let e_lab = self.embed(&lab, Some(stacked))?;
        let h = e_lab.dim(1)?;
        let e_lab = e_lab.reshape((g, nl, h))?;
        let mut out: Vec<LabelScores> = (0..g)
            .map(|_| LabelScores {
                logits: Vec::with_capacity(inputs.len()),
                probs: Vec::with_capacity(inputs.len()),
            })
            .collect();
        for chunk in inputs.chunks(opts.batch_size.max(1)) {
            let rep = repeat(chunk);
            let rows: Vec<&[u32]> = rep.iter().map(|r| r.as_slice()).collect();
            let b = Batch::pad(&rows, pad, &self.device)?;
            let e_in = self
                .embed(&b, Some(stacked))?
                .reshape((g, chunk.len(), h))?;
            for (gi, o) in out.iter_mut().enumerate() {
                let l = cosine_logits(&e_in.get(gi)?, &e_lab.get(gi)?, opts.temperature)?;
                let p = candle_nn::ops::softmax_last_dim(&l)?;
                o.logits.extend(l.to_vec2::<f32>()?);
                o.probs.extend(p.to_vec2::<f32>()?);
            }
        }
        Ok(out)
    }

    /// Tokenize and score texts against verbalizer texts (probabilities, inputs x labels).
    pub fn label_probs<L: AsRef<str>, S: AsRef<str>>(
        &self,
        adapter: Option<&AdapterSet>,
        label_texts: &[L],
        texts: &[S],
        opts: &ScoreOptions,
    ) -> EngineResult<Vec<Vec<f32>>> {
        let labels = self.tokenize_labels(label_texts)?;
        let inputs = self.tokenize(texts)?;
        Ok(self.score(adapter, &labels, &inputs, opts)?.probs)
    }

    /// Gradients of the mean cross-entropy over `inputs` (targets: label indices) w.r.t. every tensor of
    /// `obj`, e.g. for GraNd (call with one input for per-example norms).
    pub fn ce_gradients(
        &self,
        obj: &LightweightObject,
        labels: &[TokenIds],
        inputs: &[TokenIds],
        targets: &[usize],
        opts: &ScoreOptions,
    ) -> EngineResult<AdapterGradients> {
        opts.check()?;
        if inputs.len() != targets.len() || inputs.is_empty() {
            return Err(EngineError::InvalidArgument(format!(
                "{} inputs but {} targets (need the same, non-zero, number)",
                inputs.len(),
                targets.len()
            )));
        }
        if let Some(&t) = targets.iter().find(|&&t| t >= labels.len()) {
            return Err(EngineError::InvalidArgument(format!(
                "target {t} out of range for {} labels",
                labels.len()
            )));
        }
        let mut vars = Vec::with_capacity(obj.tensors.len());
        let mut named = Vec::with_capacity(obj.tensors.len());
        for t in &obj.tensors {
            let v = Var::from_tensor(&super::adapters::to_candle(t, &self.device)?)?;
            named.push((t.name.clone(), v.as_tensor().clone()));
            vars.push(v);
        }
        let set = AdapterSet::from_named(&self.model, &obj.method, &named)?;
        let in_rows: Vec<&[u32]> = inputs.iter().map(|r| r.as_slice()).collect();
        let logits =
            self.label_logits(Some(&set), labels, &in_rows, opts.temperature, Grad::Yes)?;
        let tg: Vec<u32> = targets.iter().map(|&t| t as u32).collect();
        let tg = Tensor::from_vec(tg, targets.len(), &self.device)?;
        let loss = cross_entropy(&logits, &tg)?;
        let store = loss.backward()?;
        let mut grads = Vec::with_capacity(vars.len());
        for (v, t) in vars.iter().zip(&obj.tensors) {
            let g = match store.get(v.as_tensor()) {
                Some(g) => g.flatten_all()?.to_vec1::<f32>()?,
                None => vec![0.0; t.numel()],
            };
            grads.push((t.name.clone(), g));
        }
        Ok(AdapterGradients {
            loss: loss.to_scalar::<f32>()?,
            grads,
        })
    }
}

/// Each verbalizer's summed log-likelihood after each prompt, (inputs, labels), differentiable with
/// [`Grad::Yes`]. One left-padded sequence per input holds the prompt and then, packed one after another,
/// every label of several tokens but its last token; each packed continuation attends to the prompt and
/// to itself only, with positions continuing the prompt's, so it sees exactly what it would see alone.
/// Every label's first token is read at the prompt's last position (one forward pass serves all labels);
/// its later tokens at its own continuation. Only the positions that predict a verbalizer token go
/// through the (large) language-model head.
fn decoder_logliks(
    m: &LlamaModel,
    pad: u32,
    adapter: Option<&AdapterSet>,
    labels: &[TokenIds],
    inputs: &[&[u32]],
    grad: Grad,
) -> EngineResult<Tensor> {
    if let Some(i) = labels.iter().position(|v| v.is_empty()) {
        return Err(EngineError::InvalidArgument(format!(
            "the verbalizer of label {i} tokenizes to nothing; give it a non-empty text"
        )));
    }
    if inputs.is_empty() || labels.is_empty() {
        return Err(EngineError::InvalidArgument(
            "scoring needs at least one input and one label".into(),
        ));
    }
    if let Some(i) = inputs.iter().position(|p| p.is_empty()) {
        return Err(EngineError::InvalidArgument(format!(
            "input {i} tokenizes to nothing (with an empty prompt template)"
        )));
    }
    let nl = labels.len();
    let packed: usize = labels.iter().map(|v| v.len() - 1).sum();
    let len = inputs.iter().map(|p| p.len()).max().unwrap_or(1) + packed;
    let longest = inputs.iter().map(|p| p.len()).max().unwrap_or(0)
        + labels.iter().map(|v| v.len() - 1).max().unwrap_or(0);
    if longest > m.config.max_positions {
        return Err(EngineError::InvalidArgument(format!(
            "a prompt with its verbalizer is {longest} tokens, more than the model's {} positions; lower max_len",
            m.config.max_positions
        )));
    }
    let b = inputs.len();
    let mut ids = Vec::with_capacity(b * len);
    let mut positions = Vec::with_capacity(b * len);
    let mut bias = vec![-1e30f32; b * len * len];
    // (flat row in the batch, token, pair = input * labels + label)
    let mut picks: Vec<(usize, u32, usize)> = Vec::new();
    for (i, p) in inputs.iter().enumerate() {
        let start = len - p.len() - packed; // left padding
        ids.extend(std::iter::repeat_n(pad, start));
        positions.extend(std::iter::repeat_n(0f32, start));
        ids.extend_from_slice(p);
        positions.extend((0..p.len()).map(|k| k as f32));
        let row = |q: usize| i * len * len + q * len;
        // Padding queries see themselves (finite, unused); the prompt is causal.
        for q in 0..start {
            bias[row(q) + q] = 0.0;
        }
        for q in 0..p.len() {
            let r = row(start + q);
            bias[r + start..=r + start + q].fill(0.0);
        }
        let last = start + p.len() - 1;
        let mut at = start + p.len();
        for (c, v) in labels.iter().enumerate() {
            let pair = i * nl + c;
            picks.push((i * len + last, v[0], pair));
            let seg = at;
            for (j, &tok) in v[..v.len() - 1].iter().enumerate() {
                ids.push(tok);
                positions.push((p.len() + j) as f32);
                let r = row(seg + j);
                bias[r + start..=r + last].fill(0.0);
                bias[r + seg..=r + seg + j].fill(0.0);
                picks.push((i * len + seg + j, v[j + 1], pair));
            }
            at += v.len() - 1;
        }
    }
    let dev = &m.device;
    let ids = Tensor::from_vec(ids, (b, len), dev)?;
    let positions = Tensor::from_vec(positions, (b, len), dev)?;
    let bias = Tensor::from_vec(bias, (b, 1, len, len), dev)?;
    let hidden = m.hidden_states_with(&ids, &positions, &bias, adapter, grad)?;
    let flat = hidden.reshape((b * len, m.config.hidden))?;
    let rows: Vec<u32> = picks.iter().map(|p| p.0 as u32).collect();
    let sel = flat.index_select(&Tensor::new(rows.as_slice(), dev)?, 0)?;
    let logp = candle_nn::ops::log_softmax(&m.head_logits(&sel, grad)?, D::Minus1)?;
    let toks: Vec<u32> = picks.iter().map(|p| p.1).collect();
    let toks = Tensor::from_vec(toks, (picks.len(), 1), dev)?;
    let tok_logp = logp.gather(&toks, 1)?; // (picks, 1)
                                           // Sum each pair's picks: a (pairs, picks) 0/1 matrix times the picked log-probabilities.
    let np = picks.len();
    let mut sum = vec![0f32; b * nl * np];
    for (k, p) in picks.iter().enumerate() {
        sum[p.2 * np + k] = 1.0;
    }
    let sum = Tensor::from_vec(sum, (b * nl, np), dev)?;
    Ok(sum.matmul(&tok_logp)?.reshape((b, nl))?)
}
