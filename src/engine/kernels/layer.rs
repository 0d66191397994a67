//! A whole encoder layer as one graph node, for training.
//!
//! Op by op, a layer is nine nodes of candle's graph, and candle's backward pass gives every tensor a
//! node reads a gradient of its own: a zero-filled tensor the node's contribution is added into. For a
//! LoRA training step that is 12.5 MB zeroed and summed per layer (the (N, 3H) projection, the (N, 4H)
//! feed-forward activation, seven (N, H) rows), on the calling thread while the kernels' workers wait
//! (that thread alone had 12% of a 2-thread step's samples, mostly this). [`encoder_layer`] runs the same kernels in the same order
//! (fused query/key/value projection with its LoRA updates, attention, output projection, residual +
//! layer norm, feed-forward with GELU, residual + layer norm) and keeps what its backward pass needs;
//! the backward pass chains the kernels' own backward passes over plain buffers. The graph then holds
//! one node per layer, whose only large gradient is its input's.
//!
//! Values and gradients are those of the op-by-op path: each kernel is called on the same operands, and
//! the two gradients that meet at a residual are summed, as candle sums them, once
//! (`the_layer_op_gives_the_op_by_op_values_and_gradients`).

use super::{
    add_into, err, f32_operand, poisoned, sum_rows, with_f32, Attention, LayerNorm, Linear,
    LoraBlock, LoraLinear, OutView, Res, SendPtr, View3, PAR_CHUNK,
};
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// The frozen weights of one encoder layer, as (weight, bias): weights are (out, in).
#[derive(Clone, Debug)]
pub struct EncoderLayerWeights {
    /// Query, key and value stacked (3H, H), the query rows already scaled by 1/sqrt(head_dim).
    pub qkv: (Tensor, Tensor),
    pub attn_out: (Tensor, Tensor),
    /// Layer norm after attention: (weight, bias), each (H).
    pub ln1: (Tensor, Tensor),
    /// Feed-forward up-projection (I, H), followed by erf-GELU.
    pub inter: (Tensor, Tensor),
    /// Feed-forward down-projection (H, I).
    pub out: (Tensor, Tensor),
    pub ln2: (Tensor, Tensor),
}

/// LoRA on the fused projection: stacked factors `a` (R, H) and `b` (H, R) and their column blocks,
/// as for [`super::lora_linear`].
pub struct EncoderLayerLora<'a> {
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub blocks: Vec<LoraBlock>,
}

/// One encoder layer on rows `x` (B*S, H) of `batch` sequences, differentiable in `x` and the LoRA
/// factors: the same values as the layer op by op (`attention_qkv`, `linear`, `add_layer_norm`,
/// `linear_gelu`, `linear`, `add_layer_norm`), as one node of the graph. `mask`: additive (B, S) or
/// none.
pub fn encoder_layer(
    x: &Tensor,
    batch: usize,
    heads: usize,
    mask: Option<Vec<f32>>,
    w: &EncoderLayerWeights,
    lora: Option<EncoderLayerLora<'_>>,
    eps: f64,
) -> Res<Tensor> {
    let bias = |t: &Tensor| -> Res<Vec<f32>> { t.contiguous()?.to_vec1::<f32>() };
    let ln = |t: &Tensor| -> Res<LayerNorm> {
        Ok(LayerNorm {
            eps: eps as f32,
            w: t.contiguous()?,
        })
    };
    let mut attention = Attention::new(heads, mask, true);
    attention.rows = Some(batch);
    let x = x.contiguous()?;
    let qkv = match &lora {
        Some(l) => Qkv::Lora(LoraLinear {
            w: w.qkv.0.contiguous()?,
            bias: w.qkv.1.contiguous()?,
            blocks: l.blocks.clone(),
        }),
        None => Qkv::Plain(Linear::plain(w.qkv.0.contiguous()?), bias(&w.qkv.1)?),
    };
    let op = EncoderLayer {
        batch,
        qkv,
        attention,
        attn_out: (
            Linear::plain(w.attn_out.0.contiguous()?),
            bias(&w.attn_out.1)?,
        ),
        ln1: (ln(&w.ln1.0)?, bias(&w.ln1.1)?),
        inter: (
            Linear {
                gelu: Some(Mutex::new(Vec::new())),
                differentiable: true,
                ..Linear::plain(w.inter.0.contiguous()?)
            },
            bias(&w.inter.1)?,
        ),
        out: (Linear::plain(w.out.0.contiguous()?), bias(&w.out.1)?),
        ln2: (ln(&w.ln2.0)?, bias(&w.ln2.1)?),
        kept: Mutex::new(Kept::default()),
    };
    match lora {
        Some(l) => x.apply_op3(&l.a.contiguous()?, &l.b.contiguous()?, op),
        None => x.apply_op1(op),
    }
}

/// A LoRA factor's elements and its (rows, cols).
type Factor<'a> = (&'a [f32], (usize, usize));

enum Qkv {
    Lora(LoraLinear),
    Plain(Linear, Vec<f32>),
}

struct EncoderLayer {
    batch: usize,
    qkv: Qkv,
    attention: Attention,
    attn_out: (Linear, Vec<f32>),
    ln1: (LayerNorm, Vec<f32>),
    inter: (Linear, Vec<f32>),
    out: (Linear, Vec<f32>),
    ln2: (LayerNorm, Vec<f32>),
    kept: Mutex<Kept>,
}

/// What the backward pass reads besides the op's inputs: the fused projection and the inputs of the
/// two layer norms (each a sum of a sublayer's output and its residual).
#[derive(Default)]
struct Kept {
    qkv: Vec<f32>,
    x1: Vec<f32>,
    x2: Vec<f32>,
}

/// `acc += x`, in parallel chunks.
fn accumulate(acc: &mut [f32], x: &[f32]) {
    acc.par_chunks_mut(PAR_CHUNK)
        .zip(x.par_chunks(PAR_CHUNK))
        .for_each(|(a, x)| add_into(a, x));
}

impl EncoderLayer {
    /// (query, key, value) views of the fused (B*S, 3H) rows.
    fn views(&self, n: usize, h: usize) -> Res<[View3; 3]> {
        let b = self.batch;
        if b == 0 || !n.is_multiple_of(b) {
            return err(format!(
                "encoder layer: {n} rows are not {b} sequences of equal length"
            ));
        }
        let s = n / b;
        let part = |j: usize| View3 {
            off: j * h,
            sb: s * 3 * h,
            ss: 3 * h,
            b,
            s,
            h,
        };
        Ok([part(0), part(1), part(2)])
    }

    fn forward(
        &self,
        x: &[f32],
        n: usize,
        h: usize,
        lora: Option<(Factor<'_>, Factor<'_>)>,
    ) -> Res<Vec<f32>> {
        let qkv = match (&self.qkv, lora) {
            (Qkv::Lora(op), Some((a, b))) => op.forward(x, a, b, n, h)?.0,
            (Qkv::Plain(op, bias), None) => op.forward(x, bias, n, h)?.0,
            _ => return err("encoder layer: LoRA factors and op disagree"),
        };
        if qkv.len() != n * 3 * h {
            return err("encoder layer: the fused projection is not (N, 3H)");
        }
        let [q, k, v] = self.views(n, h)?;
        let ctx = self.attention.forward((&qkv, q), (&qkv, k), (&qkv, v))?;
        let (attn, _) = self.attn_out.0.forward(&ctx, &self.attn_out.1, n, h)?;
        drop(ctx);
        let x1 = sum_rows(&attn, x);
        drop(attn);
        let h1 = self.ln1.0.forward(&x1, None, &self.ln1.1, n, h)?;
        let (inter, wide) = self.inter.0.forward(&h1, &self.inter.1, n, h)?;
        let (out, _) = self.out.0.forward(&inter, &self.out.1, n, wide)?;
        drop(inter);
        let x2 = sum_rows(&out, &h1);
        drop((out, h1));
        let y = self.ln2.0.forward(&x2, None, &self.ln2.1, n, h)?;
        *self.kept.lock().map_err(|_| poisoned())? = Kept { qkv, x1, x2 };
        Ok(y)
    }

    /// (dx, da, db) for the output gradient `g` (N, H); dx empty unless `want_dx`, da and db empty
    /// without LoRA.
    fn backward(
        &self,
        x: &[f32],
        g: &[f32],
        (n, h): (usize, usize),
        lora: Option<(Factor<'_>, Factor<'_>)>,
        want_dx: bool,
    ) -> Res<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let kept = self.kept.lock().map_err(|_| poisoned())?;
        if kept.x2.len() != n * h || g.len() != n * h || x.len() != n * h {
            return err("encoder layer: backward pass without its forward pass");
        }
        // Second residual block: y = ln2(out(gelu(inter(h1))) + h1).
        let (d_x2, _) = self.ln2.0.backward_rows(&kept.x2, g, n, h, false)?;
        let d_inter = self.out.0.input_grad(&d_x2, n, h)?;
        let wide = d_inter.len() / n.max(1);
        let d_pre = self.inter.0.pre_activation_grad(&d_inter)?;
        drop(d_inter);
        let mut d_h1 = self.inter.0.input_grad(&d_pre, n, wide)?;
        drop(d_pre);
        accumulate(&mut d_h1, &d_x2);
        drop(d_x2);
        // First residual block: h1 = ln1(attn_out(attention(qkv(x))) + x).
        let (d_x1, _) = self.ln1.0.backward_rows(&kept.x1, &d_h1, n, h, false)?;
        drop(d_h1);
        let d_ctx = self.attn_out.0.input_grad(&d_x1, n, h)?;
        let h3 = 3 * h;
        let [q, k, v] = self.views(n, h)?;
        let qkv = &kept.qkv;
        let mut d_qkv: Vec<f32> = Vec::with_capacity(n * h3);
        let base = SendPtr(d_qkv.as_mut_ptr());
        let part = |j: usize| OutView {
            ptr: SendPtr(base.at(j * h)),
            sb: q.s * h3,
            rs: h3,
        };
        self.attention.backward(
            (qkv, q),
            (qkv, k),
            (qkv, v),
            &d_ctx,
            part(0),
            part(1),
            part(2),
        )?;
        // SAFETY: the attention's backward pass returned Ok, so it set dQ, dK and dV whole (every
        // (batch, head) unit sets its rows of its head's columns of each).
        unsafe { d_qkv.set_len(n * h3) };
        drop(d_ctx);
        let (mut dx, da, db) = match (&self.qkv, lora) {
            (Qkv::Lora(op), Some(((a, (rr, _)), (b, (bo, _))))) => {
                op.backward(x, a, b, &d_qkv, (n, h, h3), (rr, bo), want_dx)?
            }
            (Qkv::Plain(op, _), None) => {
                let dx = if want_dx {
                    op.input_grad(&d_qkv, n, h3)?
                } else {
                    Vec::new()
                };
                (dx, Vec::new(), Vec::new())
            }
            _ => return err("encoder layer: LoRA factors and op disagree"),
        };
        if want_dx {
            accumulate(&mut dx, &d_x1);
        }
        Ok((dx, da, db))
    }
}

impl CustomOp1 for EncoderLayer {
    fn name(&self) -> &'static str {
        "peftdb-encoder-layer"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Res<(CpuStorage, Shape)> {
        let x = f32_operand(s, l, "x")?;
        let (n, h) = l.shape().dims2()?;
        let y = self.forward(x, n, h, None)?;
        Ok((CpuStorage::F32(y), Shape::from((n, h))))
    }

    fn bwd(&self, xt: &Tensor, _res: &Tensor, grad: &Tensor) -> Res<Option<Tensor>> {
        let (n, h) = xt.dims2()?;
        let grad = grad.contiguous()?;
        let (dx, _, _) = with_f32(xt, |xs, lx| {
            with_f32(&grad, |gs, lg| {
                self.backward(
                    super::contiguous_slice(xs, lx, "x")?,
                    super::contiguous_slice(gs, lg, "grad")?,
                    (n, h),
                    None,
                    true,
                )
            })
        })?;
        Ok(Some(super::out_tensor(dx, (n, h))?))
    }
}

impl CustomOp3 for EncoderLayer {
    fn name(&self) -> &'static str {
        "peftdb-encoder-layer-lora"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        a_s: &CpuStorage,
        al: &Layout,
        b_s: &CpuStorage,
        bl: &Layout,
    ) -> Res<(CpuStorage, Shape)> {
        let x = f32_operand(xs, xl, "x")?;
        let a = (f32_operand(a_s, al, "a")?, al.shape().dims2()?);
        let b = (f32_operand(b_s, bl, "b")?, bl.shape().dims2()?);
        let (n, h) = xl.shape().dims2()?;
        let y = self.forward(x, n, h, Some((a, b)))?;
        Ok((CpuStorage::F32(y), Shape::from((n, h))))
    }

    fn bwd(
        &self,
        xt: &Tensor,
        at: &Tensor,
        bt: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Res<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, h) = xt.dims2()?;
        let (adims, bdims) = (at.dims2()?, bt.dims2()?);
        let grad = grad.contiguous()?;
        let want_dx = xt.track_op();
        let (dx, da, db) = with_f32(xt, |xs, lx| {
            with_f32(at, |as_, la| {
                with_f32(bt, |bs, lb| {
                    with_f32(&grad, |gs, lg| {
                        let a = (super::contiguous_slice(as_, la, "a")?, adims);
                        let b = (super::contiguous_slice(bs, lb, "b")?, bdims);
                        self.backward(
                            super::contiguous_slice(xs, lx, "x")?,
                            super::contiguous_slice(gs, lg, "grad")?,
                            (n, h),
                            Some((a, b)),
                            want_dx,
                        )
                    })
                })
            })
        })?;
        let out = super::out_tensor;
        Ok((
            want_dx.then(|| out(dx, (n, h))).transpose()?,
            at.track_op().then(|| out(da, adims)).transpose()?,
            bt.track_op().then(|| out(db, bdims)).transpose()?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{add_layer_norm, attention_qkv, linear, linear_gelu, lora_linear};
    use super::*;
    use candle_core::{Device, Var};

    /// Deterministic pseudo-random values in [-amp, amp).
    fn rand(shape: &[usize], seed: u64, amp: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0) * amp
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn weights(h: usize, i: usize, seed: u64) -> EncoderLayerWeights {
        let lin = |o: usize, n: usize, k: u64| {
            (
                rand(&[o, n], seed + k, 1.0 / (n as f32).sqrt()),
                rand(&[o], seed + k + 100, 0.1),
            )
        };
        let norm = |k: u64| {
            (
                (rand(&[h], seed + k, 0.2) + 1.0).unwrap(),
                rand(&[h], seed + k + 100, 0.1),
            )
        };
        EncoderLayerWeights {
            qkv: lin(3 * h, h, 1),
            attn_out: lin(h, h, 2),
            ln1: norm(3),
            inter: lin(i, h, 4),
            out: lin(h, i, 5),
            ln2: norm(6),
        }
    }

    /// The same layer op by op, as the model ran it before the layer op.
    fn op_by_op(
        x: &Tensor,
        batch: usize,
        heads: usize,
        mask: Option<Vec<f32>>,
        w: &EncoderLayerWeights,
        lora: Option<(&Tensor, &Tensor, Vec<LoraBlock>)>,
    ) -> Tensor {
        let qkv = match lora {
            Some((a, b, blocks)) => lora_linear(x, &w.qkv.0, &w.qkv.1, a, b, blocks, true),
            None => linear(x, &w.qkv.0, &w.qkv.1, true),
        }
        .unwrap();
        let ctx = attention_qkv(&qkv, batch, heads, mask, true).unwrap();
        let attn = linear(&ctx, &w.attn_out.0, &w.attn_out.1, true).unwrap();
        let h1 = add_layer_norm(&attn, x, &w.ln1.0, &w.ln1.1, 1e-12, true).unwrap();
        let inter = linear_gelu(&h1, &w.inter.0, &w.inter.1, true).unwrap();
        let out = linear(&inter, &w.out.0, &w.out.1, true).unwrap();
        add_layer_norm(&out, &h1, &w.ln2.0, &w.ln2.1, 1e-12, true).unwrap()
    }

    fn same(what: &str, a: &Tensor, b: &Tensor) {
        assert_eq!(a.dims(), b.dims(), "{what}: shapes");
        let (a, b) = (
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        let differ = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        assert_eq!(differ, 0, "{what}: {differ} of {} elements differ", a.len());
        assert!(a.iter().any(|v| *v != 0.0), "{what}: all zero");
    }

    /// (batch, seq, hidden, heads, intermediate, masked, LoRA blocks as (slot, rank), x trained).
    type Case = (
        usize,
        usize,
        usize,
        usize,
        usize,
        bool,
        &'static [(usize, usize)],
        bool,
    );

    #[test]
    fn the_layer_op_gives_the_op_by_op_values_and_gradients() {
        // MiniLM's shape with LoRA on query and value; odd sizes with a padding mask and LoRA on the
        // key alone; a frozen input (the first layer); no LoRA (a layer above the adapted ones).
        let cases: [Case; 4] = [
            (8, 64, 384, 12, 1536, false, &[(0, 8), (2, 8)], true),
            (3, 5, 24, 3, 40, true, &[(1, 2)], true),
            (2, 7, 24, 2, 32, true, &[(0, 4), (1, 2), (2, 3)], false),
            (2, 9, 16, 4, 24, true, &[], true),
        ];
        for (ci, &(b, s, h, nh, i, masked, slots, x_trained)) in cases.iter().enumerate() {
            let seed = 1000 * ci as u64;
            let w = weights(h, i, seed);
            let x0 = rand(&[b * s, h], seed + 7, 1.0);
            let xv = Var::from_tensor(&x0).unwrap();
            let x = if x_trained {
                xv.as_tensor().clone()
            } else {
                x0.clone()
            };
            let rr: usize = slots.iter().map(|&(_, r)| r).sum();
            let av = Var::from_tensor(&rand(&[rr.max(1), h], seed + 8, 0.3)).unwrap();
            let bv = Var::from_tensor(&rand(&[h, rr.max(1)], seed + 9, 0.3)).unwrap();
            let mut blocks = Vec::new();
            let mut r0 = 0;
            for &(slot, r) in slots {
                blocks.push(LoraBlock {
                    col: slot * h,
                    r0,
                    r,
                    scale: 0.5 + slot as f32,
                });
                r0 += r;
            }
            let mask = masked.then(|| {
                (0..b * s)
                    .map(|j| if j % s >= s - 1 - j / s { -1e9 } else { 0.0 })
                    .collect::<Vec<f32>>()
            });
            let r = rand(&[b * s, h], seed + 10, 1.0);
            let (a, bm) = (av.as_tensor(), bv.as_tensor());
            let fused = encoder_layer(
                &x,
                b,
                nh,
                mask.clone(),
                &w,
                (!slots.is_empty()).then(|| EncoderLayerLora {
                    a,
                    b: bm,
                    blocks: blocks.clone(),
                }),
                1e-12,
            )
            .unwrap();
            let reference = op_by_op(
                &x,
                b,
                nh,
                mask,
                &w,
                (!slots.is_empty()).then_some((a, bm, blocks)),
            );
            same(&format!("case {ci}: y"), &fused, &reference);
            let g1 = (fused * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (reference * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            if x_trained {
                same(
                    &format!("case {ci}: dx"),
                    g1.get(&xv).unwrap(),
                    g2.get(&xv).unwrap(),
                );
            } else {
                assert!(g1.get(&xv).is_none(), "case {ci}: dx of a frozen input");
            }
            if !slots.is_empty() {
                same(
                    &format!("case {ci}: da"),
                    g1.get(&av).unwrap(),
                    g2.get(&av).unwrap(),
                );
                same(
                    &format!("case {ci}: db"),
                    g1.get(&bv).unwrap(),
                    g2.get(&bv).unwrap(),
                );
            }
        }
    }

    #[test]
    fn a_layer_op_refuses_rows_that_are_not_whole_sequences() {
        let w = weights(8, 16, 5);
        let x = Var::from_tensor(&rand(&[7, 8], 6, 1.0)).unwrap();
        let e = encoder_layer(x.as_tensor(), 2, 2, None, &w, None, 1e-12).unwrap_err();
        assert!(e.to_string().contains("not 2 sequences"), "{e}");
    }
}
