//! Hand-written CPU kernels for the hot ops of the encoder, as candle custom ops with their backward
//! passes: what candle 0.11 lacks on the CPU.
//!
//! - [`attention`]: softmax(Q K^T + mask) V for all heads in one op, parallel over (batch, head): Q, K
//!   and V are read in place from (B, S, H) rows (strided views of the fused QKV projection included), so
//!   no head transpose or contiguous copy is made, the scores never leave a per-thread buffer at
//!   inference, and the output is written straight into the (B, S, H) layout the output projection
//!   reads. In training the probabilities are kept for the backward pass (dV = P^T dO, dP = dO V^T,
//!   dS = P (dP - rowsum(dP P)), dQ = dS K, dK = dS^T Q): five small GEMMs per head instead of candle's
//!   generic graph of transposes, broadcasts and reductions.
//! - [`linear`]: `x W^T + b` with the bias written first and accumulated into by the GEMM (no separate
//!   broadcast pass, no zero fill); backward returns only the input's gradient and, when the bias is
//!   trained (BitFit, LoRA `bias="all"`), its column sums. The frozen weight gets no gradient. On up
//!   to 16 rows (verbalizers) the weight is read in place, four rows against each weight row, instead
//!   of being packed by gemm. [`linear_gelu`]: the same followed by erf-GELU in place, keeping GELU's
//!   derivative for the backward pass.
//! - [`layer_norm`]: one pass per row forward; backward in one pass per row, with the weight and bias
//!   gradients summed over fixed blocks of rows in a fixed order (bit-identical whatever the threads).
//! - [`gelu_erf`]: exact GELU with a vectorised erf (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7).
//! - [`encoder_layer`] (in `layer.rs`): in training, a whole encoder layer (the kernels above in the
//!   model's order) as one graph node whose backward pass chains theirs over plain buffers, so that
//!   candle's backward pass does not zero-fill and add a gradient for each of the nine tensors the
//!   layer reads op by op.
//!
//! Element loops are compiled for AVX-512 / AVX2+FMA as the CPU allows (runtime dispatch), with a
//! polynomial `exp` (relative error ~2e-7); GEMMs go to the gemm crate (candle's), single-threaded per
//! head inside attention and otherwise split by output columns into one single-threaded call per
//! thread. Every kernel computes each output element in a fixed order, so results do not depend on
//! the number of threads.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

type Res<T> = candle_core::Result<T>;

mod layer;
pub use layer::{encoder_layer, EncoderLayerLora, EncoderLayerWeights};

fn err<T>(msg: impl Into<String>) -> Res<T> {
    Err(candle_core::Error::Msg(msg.into()))
}

/// Thread use of candle's own element-wise ops: unless `CANDLE_NUM_THREADS` is set, run them on the
/// calling thread (sets `CANDLE_NUM_THREADS=1` once, before candle's pool starts).
///
/// candle hands any element-wise op over 64K elements to a pool whose threads spin-wait for work and
/// whose caller spin-waits for them. After these kernels, the engine's remaining such ops are mostly
/// the gradient accumulations of candle's backward pass (memory-bound adds that a second thread barely
/// speeds up); on a machine where the cores are busy, each hand-over can cost the caller a scheduler
/// time slice: it took up to 40% of a LoRA training step on the 2-core build machine. The GEMMs and
/// these kernels use rayon's pool (`RAYON_NUM_THREADS`) and are not affected.
///
/// Also keeps freed memory in the heap ([`crate::memory::keep_freed_memory`]): every candle tensor is a
/// fresh `Vec`, and faulting their pages in again was 17% of a LoRA step.
pub fn tune_threads() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
            std::env::set_var("CANDLE_NUM_THREADS", "1");
        }
        crate::memory::keep_freed_memory();
    });
}

/// Whether the CPU kernels are on for this process ([`set_enabled`]).
static ENABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Turn the CPU kernels off (or back on) for the whole process. Off, the model runs candle's generic ops
/// on the CPU too: the path every other device (CUDA) takes, so tests can check that path's forward pass
/// and gradients on a machine without a GPU (`tests/generic_path.rs`). On by default.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, std::sync::atomic::Ordering::SeqCst);
}

/// Whether the kernels apply: on ([`set_enabled`]), CPU, f32.
pub fn usable(t: &Tensor) -> bool {
    ENABLED.load(std::sync::atomic::Ordering::Relaxed)
        && t.device().is_cpu()
        && t.dtype() == candle_core::DType::F32
}

/// Run `f` on the f32 data of a CPU tensor (its whole storage) and its layout.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32], &Layout) -> Res<R>) -> Res<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(c) => f(c.as_slice::<f32>()?, l),
        _ => err("engine kernels: CPU tensors only"),
    }
}

fn contiguous_slice<'a>(s: &'a [f32], l: &Layout, what: &str) -> Res<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => err(format!("engine kernels: {what} must be contiguous")),
    }
}

/// The f32 elements a contiguous CPU operand holds (`what` names it in the error).
fn f32_operand<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Res<&'a [f32]> {
    contiguous_slice(s.as_slice::<f32>()?, l, what)
}

/// A kept buffer's lock was poisoned by a panic in another thread.
fn poisoned() -> candle_core::Error {
    candle_core::Error::Msg("a kernel's kept buffer was poisoned by a panic".into())
}

fn out_tensor(v: Vec<f32>, shape: impl Into<Shape>) -> Res<Tensor> {
    Tensor::from_vec(v, shape.into(), &candle_core::Device::Cpu)
}

/// A raw pointer that worker threads write disjoint parts of.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer `i` elements on (a method, so that closures capture the whole `SendPtr`).
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// A raw read-only pointer shared with worker threads.
#[derive(Clone, Copy)]
struct SendConst(*const f32);
unsafe impl Send for SendConst {}
unsafe impl Sync for SendConst {}

impl SendConst {
    fn at(self, i: usize) -> *const f32 {
        self.0.wrapping_add(i)
    }
}

fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

fn gemm_par(work: usize) -> gemm::Parallelism {
    // Below ~1 MFLOP a GEMM is over before the threads wake up.
    if threads() > 1 && work >= 1 << 20 {
        gemm::Parallelism::Rayon(threads())
    } else {
        gemm::Parallelism::None
    }
}

/// Denormal floats flushed to zero and read as zero on this thread while it lives (x86-64: the FTZ and
/// DAZ bits of MXCSR); the thread's previous setting comes back on drop. Elsewhere it does nothing.
///
/// An operand below f32's smallest normal (1.2e-38) can cost an x86 core a microcode assist in every
/// multiply that reads it. Such values appear once a model fits its batch (the probability of a wrong
/// label underflows, and its gradient flows back through every layer): on an AVX-512 Xeon (session 24)
/// a 100-step LoRA training took 136 s with them and 18.3 s flushed, with byte-identical checkpoints.
/// Flushing changes an element only where a term below 1.2e-38 would have counted, and it is
/// deterministic. TensorFlow flushes the same way on its own threads.
struct FlushDenormals {
    #[cfg(target_arch = "x86_64")]
    saved: u32,
}

#[cfg(target_arch = "x86_64")]
const FTZ_DAZ: u32 = (1 << 15) | (1 << 6);

impl FlushDenormals {
    /// Set FTZ and DAZ on the calling thread until the guard drops.
    #[inline]
    fn here() -> FlushDenormals {
        #[cfg(target_arch = "x86_64")]
        {
            let saved = read_mxcsr();
            if saved & FTZ_DAZ != FTZ_DAZ {
                write_mxcsr(saved | FTZ_DAZ);
            }
            FlushDenormals { saved }
        }
        #[cfg(not(target_arch = "x86_64"))]
        FlushDenormals {}
    }
}

impl Drop for FlushDenormals {
    #[inline]
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        if self.saved & FTZ_DAZ != FTZ_DAZ {
            write_mxcsr(self.saved);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[inline]
fn read_mxcsr() -> u32 {
    let mut v = 0u32;
    // SAFETY: stores the SSE control and status register into a local.
    unsafe {
        std::arch::asm!("stmxcsr [{}]", in(reg) &mut v, options(nostack, preserves_flags));
    }
    v
}

#[cfg(target_arch = "x86_64")]
#[inline]
fn write_mxcsr(v: u32) {
    // SAFETY: loads a value read from MXCSR with only the FTZ and DAZ bits changed (every x86-64 CPU
    // has both), or restores a value read before.
    unsafe {
        std::arch::asm!("ldmxcsr [{}]", in(reg) &v, options(nostack, preserves_flags, readonly));
    }
}

/// A matrix operand of [`mm`]: `rows x cols`, element (i, j) at `ptr + i * rs + j * cs`.
#[derive(Clone, Copy)]
struct Mat {
    ptr: *const f32,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl Mat {
    /// The row-major `rows x cols` matrix at `ptr`, `ld` elements from one row to the next.
    fn new(ptr: *const f32, rows: usize, cols: usize, ld: usize) -> Mat {
        Mat {
            ptr,
            rows,
            cols,
            rs: ld,
            cs: 1,
        }
    }

    /// Its transpose (a view: nothing moves).
    fn t(self) -> Mat {
        Mat {
            ptr: self.ptr,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// Where [`mm`] writes: a row-major matrix with `ld` elements per row, overwritten (`set`) or added
/// to (`add`), the product multiplied by `scale`.
#[derive(Clone, Copy)]
struct Dst {
    ptr: *mut f32,
    ld: usize,
    add: bool,
    scale: f32,
}

impl Dst {
    fn set(ptr: *mut f32, ld: usize) -> Dst {
        Dst {
            ptr,
            ld,
            add: false,
            scale: 1.0,
        }
    }

    fn add(ptr: *mut f32, ld: usize) -> Dst {
        Dst {
            add: true,
            ..Dst::set(ptr, ld)
        }
    }

    fn scaled(self, scale: f32) -> Dst {
        Dst { scale, ..self }
    }
}

/// dst = [dst +] scale * lhs * rhs: the one call into `gemm`.
///
/// # Safety
/// Every operand's `rows x cols` elements, at its strides, must lie inside its buffer, and `dst`'s
/// `lhs.rows x rhs.cols` elements inside its own; `dst` must not overlap the operands.
unsafe fn mm(dst: Dst, lhs: Mat, rhs: Mat, par: gemm::Parallelism) {
    debug_assert_eq!(lhs.cols, rhs.rows, "mm: inner dimensions");
    if let gemm::Parallelism::Rayon(t) = par {
        // One single-threaded GEMM per thread on its own block of output columns. Left to itself,
        // gemm packs a row-major left operand on the calling thread while the workers wait (a
        // serial 5% of a training step); split here, every thread packs its own block in
        // parallel. Measured against gemm's own split and against blocks of rows: 5-10% off a
        // training step, 2-5% off a forward pass.
        //
        // The result does not depend on the number of threads: gemm's k-blocking depends on k
        // alone, and the conditions keep every block off gemm's small-matrix paths (which sum in
        // another order): over 64 rows, blocks of at least 17 columns, k over 2.
        let (m, n, k) = (lhs.rows, rhs.cols, lhs.cols);
        let blocks = t.min(n / 32);
        if blocks > 1 && m > 64 && k > 2 {
            let edge = move |c: usize| {
                if c == blocks {
                    n
                } else {
                    c * n / blocks / 16 * 16
                }
            };
            let (d, l, r) = (SendPtr(dst.ptr), SendConst(lhs.ptr), SendConst(rhs.ptr));
            let (ld, add, scale) = (dst.ld, dst.add, dst.scale);
            let (lrs, lcs) = (lhs.rs, lhs.cs);
            let (rrs, rcs) = (rhs.rs, rhs.cs);
            (0..blocks).into_par_iter().for_each(move |c| {
                let (j0, j1) = (edge(c), edge(c + 1));
                let dst = Dst {
                    ptr: d.at(j0),
                    ld,
                    add,
                    scale,
                };
                let lhs = Mat {
                    ptr: l.at(0),
                    rows: m,
                    cols: k,
                    rs: lrs,
                    cs: lcs,
                };
                let rhs = Mat {
                    ptr: r.at(j0 * rcs),
                    rows: k,
                    cols: j1 - j0,
                    rs: rrs,
                    cs: rcs,
                };
                // SAFETY: blocks of the caller's operands; the blocks of dst are disjoint.
                unsafe { mm(dst, lhs, rhs, gemm::Parallelism::None) }
            });
            return;
        }
    }
    let _flush = FlushDenormals::here();
    gemm::gemm(
        lhs.rows,
        rhs.cols,
        lhs.cols,
        dst.ptr,
        1,
        dst.ld as isize,
        dst.add,
        lhs.ptr,
        lhs.cs as isize,
        lhs.rs as isize,
        rhs.ptr,
        rhs.cs as isize,
        rhs.rs as isize,
        if dst.add { 1.0 } else { 0.0 },
        dst.scale,
        false,
        false,
        false,
        par,
    )
}

// ---------------------------------------------------------------------------------------------------
// Vectorised element loops.

/// Defines `fn $name(args)` whose body is compiled three times (AVX-512, AVX2+FMA, baseline) and
/// dispatched at run time on the CPU's features; helpers it calls must be `#[inline(always)]`.
macro_rules! multiversion {
    ($(#[$m:meta])* fn $name:ident($($a:ident: $t:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        fn $name($($a: $t),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn imp($($a: $t),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v4($($a: $t),*) {
                    imp($($a),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v3($($a: $t),*) {
                    imp($($a),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the features v4 is compiled for.
                    return unsafe { v4($($a),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: as above.
                    return unsafe { v3($($a),*) };
                }
            }
            imp($($a),*)
        }
    };
}

const LANES: usize = 16;

pub(crate) mod bf16;

/// exp(x) for x <= 0 range-reduced by powers of two, degree-6 polynomial (relative error ~2e-7);
/// branch-free so that loops over it vectorise.
#[inline(always)]
pub(crate) fn exp_poly(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let k = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = (-k).mul_add(1.428_606_8e-6, (-k).mul_add(0.693_145_75, x));
    let p = r
        .mul_add(0.001_388_888_9, 0.008_333_452)
        .mul_add(r, 0.041_666_41)
        .mul_add(r, 0.166_666_67)
        .mul_add(r, 0.5)
        .mul_add(r, 1.0)
        .mul_add(r, 1.0);
    // 2^k from the bits of k + 1.5 * 2^23, whose low mantissa bits hold the integer k exactly
    // (|k| <= 127 after the clamp). `k as i32` would be the same number, but its saturating,
    // NaN-checking semantics kept LLVM from vectorising it: 16 scalar conversions per vector
    // made GELU 14% of a forward pass.
    let k_bits = (k + 12_582_912.0).to_bits().wrapping_sub(0x4B40_0000 - 127);
    p * f32::from_bits(k_bits << 23)
}

#[inline(always)]
fn row_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut ch = x.chunks_exact(LANES);
    for c in &mut ch {
        for i in 0..LANES {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    let mut m = acc
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    for &v in ch.remainder() {
        m = if v > m { v } else { m };
    }
    m
}

#[inline(always)]
fn row_sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut ch = x.chunks_exact(LANES);
    for c in &mut ch {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    let mut s = 0f32;
    for a in acc {
        s += a;
    }
    for &v in ch.remainder() {
        s += v;
    }
    s
}

#[inline(always)]
fn row_dot(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut cx = x.chunks_exact(LANES);
    let mut cy = y.chunks_exact(LANES);
    for (a, b) in (&mut cx).zip(&mut cy) {
        for i in 0..LANES {
            acc[i] += a[i] * b[i];
        }
    }
    let mut s = 0f32;
    for a in acc {
        s += a;
    }
    for (a, b) in cx.remainder().iter().zip(cy.remainder()) {
        s += a * b;
    }
    s
}

multiversion! {
    /// In-place softmax of each row of `scores` (rows of `n`), with an optional additive mask (n).
    fn softmax_rows(scores: &mut [f32], n: usize, mask: Option<&[f32]>) {
        for row in scores.chunks_exact_mut(n) {
            if let Some(m) = mask {
                for (v, &a) in row.iter_mut().zip(m) {
                    *v += a;
                }
            }
            let mx = row_max(row);
            for v in row.iter_mut() {
                *v = exp_poly(*v - mx);
            }
            let inv = 1.0 / row_sum(row);
            for v in row.iter_mut() {
                *v *= inv;
            }
        }
    }
}

multiversion! {
    /// Softmax backward in place: `ds = p (ds - rowsum(ds p))`, rows of `n`.
    fn softmax_bwd_rows(ds: &mut [f32], p: &[f32], n: usize) {
        for (d, pr) in ds.chunks_exact_mut(n).zip(p.chunks_exact(n)) {
            let c = row_dot(d, pr);
            for (x, &y) in d.iter_mut().zip(pr) {
                *x = y * (*x - c);
            }
        }
    }
}

multiversion! {
    /// `acc += x`, element-wise.
    fn add_into(acc: &mut [f32], x: &[f32]) {
        for (a, v) in acc.iter_mut().zip(x) {
            *a += v;
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Attention.

/// A (B, S, H) operand read in place: element (b, s, c) at `off + b*sb + s*ss + c`.
#[derive(Clone, Copy, Debug)]
struct View3 {
    off: usize,
    sb: usize,
    ss: usize,
    b: usize,
    s: usize,
    h: usize,
}

fn view3(l: &Layout, what: &str) -> Res<View3> {
    let d = l.dims();
    let st = l.stride();
    if d.len() != 3 || st[2] != 1 {
        return err(format!(
            "attention: {what} must be (B, S, H) with unit stride on H, got dims {d:?} strides {st:?}"
        ));
    }
    Ok(View3 {
        off: l.start_offset(),
        sb: st[0],
        ss: st[1],
        b: d[0],
        s: d[1],
        h: d[2],
    })
}

/// Multi-head attention. `q`: (B, Sq, H), already scaled by 1/sqrt(head_dim); `k`, `v`: (B, Skv, H)
/// (any row and batch strides, unit stride along H); `mask`: additive (B, Skv) or none; returns the
/// context (B, Sq, H) (heads concatenated along H). `differentiable` keeps the probabilities for the
/// backward pass.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<Vec<f32>>,
    differentiable: bool,
) -> Res<Tensor> {
    let op = Attention::new(heads, mask, differentiable);
    if differentiable {
        q.apply_op3(k, v, op)
    } else {
        q.apply_op3_no_bwd(k, v, &op)
    }
}

/// [`attention`] on the rows of a fused projection `qkv` (B*S, 3H) (query, key, value side by side
/// on the last dimension) of `batch` = B sequences: one input, so the backward pass writes one
/// (B*S, 3H) gradient (no narrow backward), and the context comes back as the (B*S, H) rows the
/// output projection reads (no reshape nodes around it, each of which would cost the backward pass
/// a zero-filled gradient and an addition).
pub fn attention_qkv(
    qkv: &Tensor,
    batch: usize,
    heads: usize,
    mask: Option<Vec<f32>>,
    differentiable: bool,
) -> Res<Tensor> {
    let mut op = Attention::new(heads, mask, differentiable);
    op.rows = Some(batch);
    if differentiable {
        qkv.apply_op1(op)
    } else {
        qkv.apply_op1_no_bwd(&op)
    }
}

struct Attention {
    heads: usize,
    /// `Some(B)`: the fused operand and the output are 2-D rows (B*S, ..) of B sequences.
    rows: Option<usize>,
    mask: Option<Vec<f32>>,
    /// The probabilities (B, heads, Sq, Skv), kept by the forward pass for the backward pass.
    probs: Option<Mutex<Vec<f32>>>,
}

/// Where a backward pass writes one operand's gradient: (b, s, c) at `ptr + b*sb + s*rs + c`.
#[derive(Clone, Copy)]
struct OutView {
    ptr: SendPtr,
    sb: usize,
    rs: usize,
}

/// The three (B, S, H) views of a fused (B, S, 3H) projection, or of its (B*S, 3H) rows when `rows`
/// gives B.
fn split_qkv(l: &Layout, rows: Option<usize>) -> Res<(View3, View3, View3)> {
    let all = match rows {
        None => view3(l, "qkv")?,
        Some(b) => {
            let (d, st) = (l.dims(), l.stride());
            if d.len() != 2 || st[1] != 1 || b == 0 || d[0] % b != 0 {
                return err(format!(
                    "attention: qkv must be (B*S, 3H) rows of {b} sequences with unit stride on H, \
                     got dims {d:?} strides {st:?}"
                ));
            }
            let s = d[0] / b;
            View3 {
                off: l.start_offset(),
                sb: s * st[0],
                ss: st[0],
                b,
                s,
                h: d[1],
            }
        }
    };
    if all.h % 3 != 0 {
        return err("attention: the fused projection's last dimension is not 3H");
    }
    let h = all.h / 3;
    let part = |j: usize| View3 {
        off: all.off + j * h,
        h,
        ..all
    };
    Ok((part(0), part(1), part(2)))
}

impl Attention {
    fn new(heads: usize, mask: Option<Vec<f32>>, differentiable: bool) -> Attention {
        Attention {
            heads,
            rows: None,
            mask,
            probs: differentiable.then(|| Mutex::new(Vec::new())),
        }
    }

    fn check(&self, q: &View3, k: &View3, v: &View3) -> Res<usize> {
        if q.b != k.b || q.b != v.b || k.s != v.s || q.h != k.h || q.h != v.h {
            return err(format!(
                "attention: shapes q {q:?} k {k:?} v {v:?} do not fit"
            ));
        }
        if self.heads == 0 || !q.h.is_multiple_of(self.heads) {
            return err("attention: H is not a multiple of the head count");
        }
        if let Some(m) = &self.mask {
            if m.len() != q.b * k.s {
                return err("attention: mask is not (B, Skv)");
            }
        }
        Ok(q.h / self.heads)
    }

    /// The context (B, Sq, H); keeps the probabilities when differentiable.
    fn forward(
        &self,
        (qs, q): (&[f32], View3),
        (ks, k): (&[f32], View3),
        (vs, v): (&[f32], View3),
    ) -> Res<Vec<f32>> {
        let hd = self.check(&q, &k, &v)?;
        let (b, sq, skv, h, nh) = (q.b, q.s, k.s, q.h, self.heads);
        // The output and the kept probabilities are written whole below (every (batch, head) unit
        // sets its rows of its head's columns), so neither is zero-filled first.
        let mut out: Vec<f32> = Vec::with_capacity(b * sq * h);
        let optr = SendPtr(out.as_mut_ptr());
        let mut kept: Option<Vec<f32>> = self
            .probs
            .as_ref()
            .map(|_| Vec::with_capacity(b * nh * sq * skv));
        let pptr = kept.as_mut().map(|p| SendPtr(p.as_mut_ptr()));
        let mask = self.mask.as_deref();
        (0..b * nh).into_par_iter().for_each_init(
            || vec![0f32; if pptr.is_some() { 0 } else { sq * skv }],
            |scratch, u| {
                let (bi, hi) = (u / nh, u % nh);
                // Unit u owns probs[u*sq*skv .. (u+1)*sq*skv].
                let sp: *mut f32 = match pptr {
                    Some(p) => p.at(u * sq * skv),
                    None => scratch.as_mut_ptr(),
                };
                let qp = qs[q.off + bi * q.sb + hi * hd..].as_ptr();
                let kp = ks[k.off + bi * k.sb + hi * hd..].as_ptr();
                let vp = vs[v.off + bi * v.sb + hi * hd..].as_ptr();
                let none = gemm::Parallelism::None;
                // SAFETY: all pointers stay inside their operands (checked shapes), unit u writes
                // only its own head's columns of the output.
                unsafe {
                    // scores = Q K^T: rhs(kk, j) = K[j, kk].
                    mm(
                        Dst::set(sp, skv),
                        Mat::new(qp, sq, hd, q.ss),
                        Mat::new(kp, skv, hd, k.ss).t(),
                        none,
                    );
                }
                // SAFETY: the GEMM above set all sq x skv scores of this unit.
                let scores = unsafe { std::slice::from_raw_parts_mut(sp, sq * skv) };
                softmax_rows(scores, skv, mask.map(|m| &m[bi * skv..(bi + 1) * skv]));
                unsafe {
                    // out[b, :, head] = P V.
                    let o = optr.at(bi * sq * h + hi * hd);
                    mm(
                        Dst::set(o, h),
                        Mat::new(scores.as_ptr(), sq, skv, skv),
                        Mat::new(vp, skv, hd, v.ss),
                        none,
                    );
                }
            },
        );
        // SAFETY: every unit wrote its part of both (see above); the units cover all of them.
        unsafe {
            out.set_len(b * sq * h);
            if let Some(p) = kept.as_mut() {
                p.set_len(b * nh * sq * skv);
            }
        }
        if let (Some(slot), Some(p)) = (&self.probs, kept) {
            *slot.lock().map_err(|_| poisoned())? = p;
        }
        Ok(out)
    }

    /// Writes dQ, dK, dV for the output gradient `go` (B, Sq, H) contiguous.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        (qs, q): (&[f32], View3),
        (ks, k): (&[f32], View3),
        (vs, v): (&[f32], View3),
        go: &[f32],
        dq: OutView,
        dk: OutView,
        dv: OutView,
    ) -> Res<()> {
        let Some(slot) = &self.probs else {
            return err("attention: backward of a forward run without gradients");
        };
        let probs = slot.lock().map_err(|_| poisoned())?;
        let hd = self.check(&q, &k, &v)?;
        let (b, sq, skv, h, nh) = (q.b, q.s, k.s, q.h, self.heads);
        if probs.len() != b * nh * sq * skv || go.len() != b * sq * h {
            return err("attention: kept probabilities or gradient do not fit");
        }
        (0..b * nh).into_par_iter().for_each_init(
            || vec![0f32; sq * skv],
            |ds, u| {
                let (bi, hi) = (u / nh, u % nh);
                let p = &probs[u * sq * skv..(u + 1) * sq * skv];
                let qp = qs[q.off + bi * q.sb + hi * hd..].as_ptr();
                let kp = ks[k.off + bi * k.sb + hi * hd..].as_ptr();
                let vp = vs[v.off + bi * v.sb + hi * hd..].as_ptr();
                let gp = go[bi * sq * h + hi * hd..].as_ptr();
                let at = |o: OutView| o.ptr.at(bi * o.sb + hi * hd);
                let none = gemm::Parallelism::None;
                // SAFETY: as in the forward pass; unit u writes only its own head's columns.
                unsafe {
                    // dV = P^T dO.
                    mm(
                        Dst::set(at(dv), dv.rs),
                        Mat::new(p.as_ptr(), sq, skv, skv).t(),
                        Mat::new(gp, sq, hd, h),
                        none,
                    );
                    // dP = dO V^T.
                    mm(
                        Dst::set(ds.as_mut_ptr(), skv),
                        Mat::new(gp, sq, hd, h),
                        Mat::new(vp, skv, hd, v.ss).t(),
                        none,
                    );
                }
                // dS = P (dP - rowsum(dP P)).
                softmax_bwd_rows(ds, p, skv);
                unsafe {
                    // dQ = dS K.
                    mm(
                        Dst::set(at(dq), dq.rs),
                        Mat::new(ds.as_ptr(), sq, skv, skv),
                        Mat::new(kp, skv, hd, k.ss),
                        none,
                    );
                    // dK = dS^T Q.
                    mm(
                        Dst::set(at(dk), dk.rs),
                        Mat::new(ds.as_ptr(), sq, skv, skv).t(),
                        Mat::new(qp, sq, hd, q.ss),
                        none,
                    );
                }
            },
        );
        Ok(())
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "peftdb-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Res<(CpuStorage, Shape)> {
        let (q, k, v) = (view3(l1, "q")?, view3(l2, "k")?, view3(l3, "v")?);
        let out = self.forward(
            (s1.as_slice::<f32>()?, q),
            (s2.as_slice::<f32>()?, k),
            (s3.as_slice::<f32>()?, v),
        )?;
        Ok((CpuStorage::F32(out), Shape::from((q.b, q.s, q.h))))
    }

    fn bwd(
        &self,
        qt: &Tensor,
        kt: &Tensor,
        vt: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Res<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (b, sq, h) = qt.dims3()?;
        let skv = kt.dim(1)?;
        let mut dq = vec![0f32; b * sq * h];
        let mut dk = vec![0f32; b * skv * h];
        let mut dv = vec![0f32; b * skv * h];
        let ov = |d: &mut Vec<f32>, s: usize| OutView {
            ptr: SendPtr(d.as_mut_ptr()),
            sb: s * h,
            rs: h,
        };
        let (oq, ok, ovv) = (ov(&mut dq, sq), ov(&mut dk, skv), ov(&mut dv, skv));
        with_f32(qt, |qs, l1| {
            with_f32(kt, |ks, l2| {
                with_f32(vt, |vs, l3| {
                    with_f32(&grad, |gs, lg| {
                        self.backward(
                            (qs, view3(l1, "q")?),
                            (ks, view3(l2, "k")?),
                            (vs, view3(l3, "v")?),
                            contiguous_slice(gs, lg, "grad")?,
                            oq,
                            ok,
                            ovv,
                        )
                    })
                })
            })
        })?;
        Ok((
            Some(out_tensor(dq, (b, sq, h))?),
            Some(out_tensor(dk, (b, skv, h))?),
            Some(out_tensor(dv, (b, skv, h))?),
        ))
    }
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "peftdb-attention-qkv"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Res<(CpuStorage, Shape)> {
        let x = s.as_slice::<f32>()?;
        let (q, k, v) = split_qkv(l, self.rows)?;
        let out = self.forward((x, q), (x, k), (x, v))?;
        let shape = match self.rows {
            None => Shape::from((q.b, q.s, q.h)),
            Some(_) => Shape::from((q.b * q.s, q.h)),
        };
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Res<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let (b, s, h3) = match self.rows {
            None => arg.dims3()?,
            Some(b) => {
                let (n, h3) = arg.dims2()?;
                (b, n / b.max(1), h3)
            }
        };
        let h = h3 / 3;
        // dQ, dK and dV are each set whole by the backward pass (every unit sets its rows of its
        // head's columns), so the gradient is not zero-filled first.
        let mut d: Vec<f32> = Vec::with_capacity(b * s * h3);
        let base = SendPtr(d.as_mut_ptr());
        let part = |j: usize| OutView {
            ptr: SendPtr(base.at(j * h)),
            sb: s * h3,
            rs: h3,
        };
        with_f32(arg, |xs, l| {
            let (q, k, v) = split_qkv(l, self.rows)?;
            with_f32(&grad, |gs, lg| {
                self.backward(
                    (xs, q),
                    (xs, k),
                    (xs, v),
                    contiguous_slice(gs, lg, "grad")?,
                    part(0),
                    part(1),
                    part(2),
                )
            })
        })?;
        // SAFETY: the backward pass returned Ok, so it set all three parts (see above).
        unsafe { d.set_len(b * s * h3) };
        let d = match self.rows {
            None => out_tensor(d, (b, s, h3))?,
            Some(_) => out_tensor(d, (b * s, h3))?,
        };
        Ok(Some(d))
    }
}

// ---------------------------------------------------------------------------------------------------
// Column sums in a fixed order (bias and layer-norm parameter gradients).

const ROW_BLOCK: usize = 64;

/// Sum over rows of `f(row_index)`'s contribution, (n rows) -> (width): rows are summed in fixed blocks
/// of [`ROW_BLOCK`], blocks in parallel, then the block sums in order: bit-identical for any thread count.
fn block_col_sums(
    n: usize,
    width: usize,
    outputs: usize,
    f: impl Fn(std::ops::Range<usize>, &mut [Vec<f32>]) + Sync,
) -> Vec<Vec<f32>> {
    let blocks = n.div_ceil(ROW_BLOCK);
    let partial: Vec<Vec<Vec<f32>>> = (0..blocks)
        .into_par_iter()
        .map(|bl| {
            let mut acc = vec![vec![0f32; width]; outputs];
            f(bl * ROW_BLOCK..n.min((bl + 1) * ROW_BLOCK), &mut acc);
            acc
        })
        .collect();
    let mut total = vec![vec![0f32; width]; outputs];
    for p in partial {
        for (t, p) in total.iter_mut().zip(p) {
            add_into(t, &p);
        }
    }
    total
}

// ---------------------------------------------------------------------------------------------------
// Linear layer with a frozen weight.

/// `x W^T + b` for a frozen weight `w` (out, in); `x` (N, in). Differentiable in `x` and `b`.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor, differentiable: bool) -> Res<Tensor> {
    linear_op(x, w, b, None, differentiable)
}

/// `gelu(x W^T + b)` (erf GELU, as [`gelu_erf`]) in one op: the activation is applied in place
/// and, when differentiable, its derivative kept for the backward pass, so the pre-activation is
/// neither a graph node of its own nor re-derived (erf, exp) on the way back.
pub fn linear_gelu(x: &Tensor, w: &Tensor, b: &Tensor, differentiable: bool) -> Res<Tensor> {
    linear_op(x, w, b, Some(Mutex::new(Vec::new())), differentiable)
}

fn linear_op(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    gelu: Option<Mutex<Vec<f32>>>,
    differentiable: bool,
) -> Res<Tensor> {
    let w = w.contiguous()?;
    let op = Linear {
        twin: bf16::twin(&w),
        w,
        gelu,
        differentiable,
    };
    let x = x.contiguous()?;
    if differentiable {
        x.apply_op2(b, op)
    } else {
        x.apply_op2_no_bwd(b, &op)
    }
}

struct Linear {
    w: Tensor,
    /// The weight's bf16 twin ([`bf16::register`]): when there is one, the products run in bf16.
    twin: Option<std::sync::Arc<bf16::Bf16Weight>>,
    /// `Some` when erf-GELU follows ([`linear_gelu`]); holds gelu'(pre) once a differentiable
    /// forward pass has run.
    gelu: Option<Mutex<Vec<f32>>>,
    differentiable: bool,
}

/// Rows of `x` up to which [`Linear`] reads its weight in place instead of calling gemm: with a
/// handful of rows (a task's verbalizers: 6 tokens for two one-word labels) gemm's packing of the
/// weight costs several times the product itself, while the product only needs each weight row
/// read once. Measured on the verbalizer pass of a LoRA training step: see `docs/engine.md`.
const SMALL_ROWS: usize = 16;

/// Four dot products of rows of `x` with one weight row `w` (all the same length), each summed in
/// a fixed order; written like [`row_dot`] so that it compiles to vector FMAs.
#[inline(always)]
fn dots4(x: [&[f32]; 4], w: &[f32]) -> [f32; 4] {
    let mut acc = [[0f32; LANES]; 4];
    for ((((c0, c1), c2), c3), cw) in x[0]
        .chunks_exact(LANES)
        .zip(x[1].chunks_exact(LANES))
        .zip(x[2].chunks_exact(LANES))
        .zip(x[3].chunks_exact(LANES))
        .zip(w.chunks_exact(LANES))
    {
        for i in 0..LANES {
            acc[0][i] += c0[i] * cw[i];
            acc[1][i] += c1[i] * cw[i];
            acc[2][i] += c2[i] * cw[i];
            acc[3][i] += c3[i] * cw[i];
        }
    }
    let k = w.len() / LANES * LANES;
    let mut out = [0f32; 4];
    for ((o, a), xr) in out.iter_mut().zip(&acc).zip(&x) {
        let mut s = 0f32;
        for v in a {
            s += v;
        }
        for (p, q) in xr[k..].iter().zip(&w[k..]) {
            s += p * q;
        }
        *o = s;
    }
    out
}

multiversion! {
    /// `t[jj * n + i] = x_i . w_jj` for the `n` rows of `x` (each `k` long) and the rows of the
    /// weight block `w` (each `k` long): the block's outputs, transposed.
    fn small_rows_block(t: &mut [f32], x: &[f32], n: usize, k: usize, w: &[f32]) {
        for (jj, wr) in w.chunks_exact(k).enumerate() {
            let o = &mut t[jj * n..(jj + 1) * n];
            // Rows four at a time (four independent sums in flight); a last group of fewer
            // repeats its last row and keeps only its own results.
            for i in (0..n).step_by(4) {
                let r = |a: usize| {
                    let row = (i + a).min(n - 1);
                    &x[row * k..(row + 1) * k]
                };
                let d = dots4([r(0), r(1), r(2), r(3)], wr);
                let m = (n - i).min(4);
                o[i..i + m].copy_from_slice(&d[..m]);
            }
        }
    }
}

/// `y += x W^T` for few rows of `x` (N <= [`SMALL_ROWS`]) and `w` (out, in) row-major, reading
/// each weight row once; parallel over blocks of output features when the product is large.
fn small_rows_linear(y: &mut [f32], x: &[f32], n: usize, inp: usize, w: &[f32], out: usize) {
    const BLOCK: usize = 64;
    if n == 0 || inp == 0 {
        return; // nothing to add
    }
    let yp = SendPtr(y.as_mut_ptr());
    let run = |b: usize| {
        let (j0, j1) = (b * BLOCK, ((b + 1) * BLOCK).min(out));
        let mut t = vec![0f32; (j1 - j0) * n];
        small_rows_block(&mut t, x, n, inp, &w[j0 * inp..j1 * inp]);
        for (jj, col) in t.chunks_exact(n).enumerate() {
            for (i, v) in col.iter().enumerate() {
                // SAFETY: row i, column j0 + jj of the (n, out) output; blocks own disjoint columns.
                unsafe { *yp.at(i * out + j0 + jj) += v };
            }
        }
    };
    let blocks = out.div_ceil(BLOCK);
    if threads() > 1 && n * out * inp >= 1 << 20 {
        (0..blocks).into_par_iter().for_each(run);
    } else {
        (0..blocks).for_each(run);
    }
}

/// `n` rows, each a copy of `row`, filled in parallel when large.
fn repeat_rows(row: &[f32], n: usize) -> Vec<f32> {
    let w = row.len();
    let mut y: Vec<f32> = Vec::with_capacity(n * w);
    let fill = |rows: &mut [std::mem::MaybeUninit<f32>]| {
        for r in rows.chunks_exact_mut(w.max(1)) {
            for (d, &v) in r.iter_mut().zip(row) {
                d.write(v);
            }
        }
    };
    let spare = &mut y.spare_capacity_mut()[..n * w];
    if n * w < 4 * PAR_CHUNK || w == 0 {
        fill(spare);
    } else {
        let rows_per = (PAR_CHUNK / w).max(1);
        spare.par_chunks_mut(rows_per * w).for_each(fill);
    }
    // SAFETY: all n * w elements were written above.
    unsafe { y.set_len(n * w) };
    y
}

/// `len` zeros, written by the pool's threads in chunks when large. A large `vec![0f32; len]` is a
/// memset on the calling thread alone (the heap keeps freed memory, so the allocation gets no fresh
/// zero pages) while the kernels' workers wait: 2% of a training step's samples.
pub(super) fn zeroed(len: usize) -> Vec<f32> {
    if len < 4 * PAR_CHUNK {
        return vec![0f32; len];
    }
    let mut v: Vec<f32> = Vec::with_capacity(len);
    v.spare_capacity_mut()[..len]
        .par_chunks_mut(PAR_CHUNK)
        .for_each(|c| {
            for x in c {
                x.write(0.0);
            }
        });
    // SAFETY: all len elements were written above.
    unsafe { v.set_len(len) };
    v
}

/// `a + r`, element by element, in parallel chunks (a residual sum: a layer norm's input).
pub(super) fn sum_rows(a: &[f32], r: &[f32]) -> Vec<f32> {
    let mut s = zeroed(a.len());
    s.par_chunks_mut(PAR_CHUNK)
        .zip(a.par_chunks(PAR_CHUNK))
        .zip(r.par_chunks(PAR_CHUNK))
        .for_each(|((s, a), r)| add_vec(s, a, r));
    s
}

/// A vector of `len` elements that `write` fills completely through the pointer it is given (a
/// GEMM that overwrites its destination), without zeroing it first.
///
/// # Safety
/// `write` must initialise every one of the `len` elements.
unsafe fn written_by(len: usize, write: impl FnOnce(*mut f32)) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(len);
    write(v.as_mut_ptr());
    // SAFETY: the caller's contract.
    unsafe { v.set_len(len) };
    v
}

impl Linear {
    /// The linear layer alone, for another op's forward or backward pass.
    fn plain(w: Tensor) -> Linear {
        Linear {
            twin: bf16::twin(&w),
            w,
            gelu: None,
            differentiable: false,
        }
    }

    /// `x W^T + bias` (N, out) and out.
    fn forward(&self, x: &[f32], bias: &[f32], n: usize, inp: usize) -> Res<(Vec<f32>, usize)> {
        with_f32(&self.w, |ws, lw| {
            let w = contiguous_slice(ws, lw, "w")?;
            let (out, win) = lw.shape().dims2()?;
            if win != inp || bias.len() != out || x.len() != n * inp {
                return err(format!(
                    "linear: x (.., {inp}), w ({out}, {win}), bias {}",
                    bias.len()
                ));
            }
            // Reduced precision: the packed twin's kernel (the bias starts every sum), then GELU
            // if it follows; or the f32 path below on the rounded weight and rounded inputs.
            let twin = self.bf16_twin(out, win)?;
            if let Some(mut y) = twin.and_then(|t| t.packed_forward(x, n, bias)) {
                self.gelu_in_place(&mut y)?;
                return Ok((y, out));
            }
            let rounded_x;
            let (x, w) = match twin.and_then(|t| t.rounded()) {
                Some(rw) => {
                    rounded_x = bf16::rounded(x);
                    (&rounded_x[..], rw)
                }
                None => (x, w),
            };
            if self.gelu.is_some() && n > SMALL_ROWS {
                // The GEMM overwrites y, and the bias is added in GELU's own pass over it: one
                // pass over the (N, I) activation fewer than writing the bias first. Where gemm
                // sums k in one block (MiniLM's k = 384: the test below), the bits are those of
                // the bias-first form; otherwise the bias joins the sum last instead of first.
                // SAFETY: shapes checked; the GEMM sets all n x out elements.
                let mut y = unsafe {
                    written_by(n * out, |y| {
                        mm(
                            Dst::set(y, out),
                            Mat::new(x.as_ptr(), n, inp, inp),
                            Mat::new(w.as_ptr(), out, inp, inp).t(),
                            gemm_par(n * out * inp),
                        )
                    })
                };
                let rows = (PAR_CHUNK / out.max(1)).max(1) * out;
                if self.differentiable {
                    let mut d: Vec<f32> = zeroed(y.len());
                    y.par_chunks_mut(rows)
                        .zip(d.par_chunks_mut(rows))
                        .for_each(|(yc, dc)| bias_gelu_fwd_grad_rows(yc, dc, bias));
                    if let Some(keep) = &self.gelu {
                        *keep.lock().map_err(|_| poisoned())? = d;
                    }
                } else {
                    y.par_chunks_mut(rows)
                        .for_each(|yc| bias_gelu_rows(yc, bias));
                }
                return Ok((y, out));
            }
            let mut y = repeat_rows(bias, n);
            if n <= SMALL_ROWS {
                small_rows_linear(&mut y, x, n, inp, w, out);
            } else {
                // SAFETY: shapes checked.
                unsafe {
                    mm(
                        Dst::add(y.as_mut_ptr(), out),
                        Mat::new(x.as_ptr(), n, inp, inp),
                        Mat::new(w.as_ptr(), out, inp, inp).t(),
                        gemm_par(n * out * inp),
                    );
                }
            }
            self.gelu_in_place(&mut y)?;
            Ok((y, out))
        })
    }

    /// Apply the GELU that follows (if any) to the pre-activation `y` in place, keeping its
    /// derivative when differentiable.
    fn gelu_in_place(&self, y: &mut [f32]) -> Res<()> {
        if let Some(keep) = &self.gelu {
            if self.differentiable {
                let mut d: Vec<f32> = zeroed(y.len());
                y.par_chunks_mut(PAR_CHUNK)
                    .zip(d.par_chunks_mut(PAR_CHUNK))
                    .for_each(|(yc, dc)| gelu_fwd_grad_vec(yc, dc));
                *keep.lock().map_err(|_| poisoned())? = d;
            } else {
                y.par_chunks_mut(PAR_CHUNK).for_each(gelu_inplace_vec);
            }
        }
        Ok(())
    }

    /// The bf16 twin of the weight, checked against the weight's shape.
    fn bf16_twin(&self, out: usize, inp: usize) -> Res<Option<&bf16::Bf16Weight>> {
        match &self.twin {
            Some(t) if (t.out, t.inp) != (out, inp) => err(format!(
                "linear: the weight's bf16 twin is ({}, {}), the weight ({out}, {inp})",
                t.out, t.inp
            )),
            t => Ok(t.as_deref()),
        }
    }

    /// The gradient of a [`linear_gelu`]'s pre-activation: `g * gelu'(pre)`, with the derivative its
    /// forward pass kept.
    fn pre_activation_grad(&self, g: &[f32]) -> Res<Vec<f32>> {
        let Some(keep) = &self.gelu else {
            return err("linear: no GELU to differentiate");
        };
        let d = keep.lock().map_err(|_| poisoned())?;
        if d.len() != g.len() {
            return err("linear_gelu: backward pass without its forward pass");
        }
        let mut p = zeroed(g.len());
        p.par_chunks_mut(PAR_CHUNK)
            .zip(g.par_chunks(PAR_CHUNK))
            .zip(d.par_chunks(PAR_CHUNK))
            .for_each(|((pc, gc), dc)| mul_vec(pc, gc, dc));
        Ok(p)
    }

    /// `dY W` (N, in) for `dY` (N, out).
    fn input_grad(&self, g: &[f32], n: usize, out: usize) -> Res<Vec<f32>> {
        with_f32(&self.w, |ws, lw| {
            let w = contiguous_slice(ws, lw, "w")?;
            let (wout, inp) = lw.shape().dims2()?;
            if wout != out || g.len() != n * out {
                return err("linear: gradient does not fit the weight");
            }
            let twin = self.bf16_twin(out, inp)?;
            if let Some(dx) = twin.and_then(|t| t.packed_input_grad(g, n)) {
                return Ok(dx);
            }
            let rounded_g;
            let (g, w) = match twin.and_then(|t| t.rounded()) {
                Some(rw) => {
                    rounded_g = bf16::rounded(g);
                    (&rounded_g[..], rw)
                }
                None => (g, w),
            };
            // SAFETY: shapes checked; the GEMM overwrites all n x inp elements of dx.
            let dx = unsafe {
                written_by(n * inp, |dx| {
                    mm(
                        Dst::set(dx, inp),
                        Mat::new(g.as_ptr(), n, out, out),
                        Mat::new(w.as_ptr(), out, inp, inp),
                        gemm_par(n * out * inp),
                    )
                })
            };
            Ok(dx)
        })
    }
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "peftdb-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Res<(CpuStorage, Shape)> {
        let x = f32_operand(s1, l1, "x")?;
        let bias = f32_operand(s2, l2, "bias")?;
        let (n, inp) = l1.shape().dims2()?;
        let (y, out) = self.forward(x, bias, n, inp)?;
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Res<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (n, out) = grad.dims2()?;
        let inp = self.w.dim(1)?;
        let (dx, db) = with_f32(&grad, |gs, lg| {
            let g = contiguous_slice(gs, lg, "grad")?;
            // Through the GELU first: the gradient of the pre-activation.
            let pre;
            let g = if self.gelu.is_some() {
                pre = self.pre_activation_grad(g)?;
                &pre[..]
            } else {
                g
            };
            // No trained parameter below this layer's input: its gradient is never used.
            let dx = x
                .track_op()
                .then(|| self.input_grad(g, n, out))
                .transpose()?;
            let db = if b.track_op() {
                let s = block_col_sums(n, out, 1, |rows, acc| {
                    add_into_rows(&mut acc[0], &g[rows.start * out..rows.end * out]);
                });
                Some(out_tensor(s.into_iter().next().unwrap_or_default(), out)?)
            } else {
                None
            };
            Ok((dx, db))
        })?;
        Ok((dx.map(|dx| out_tensor(dx, (n, inp))).transpose()?, db))
    }
}

// ---------------------------------------------------------------------------------------------------
// Linear layer with a frozen weight and LoRA updates on column blocks of its output.

/// One LoRA update of a [`lora_linear`]: output columns `col..col + out`, ranks `r0..r0 + r` of the
/// stacked factors, scale `scale`.
#[derive(Clone, Copy, Debug)]
pub struct LoraBlock {
    pub col: usize,
    pub r0: usize,
    pub r: usize,
    pub scale: f32,
}

/// `x W^T + b` plus, for each block j, `scale_j * x A_j^T B_j^T` added to output columns
/// `col_j..col_j + out`: `a` stacks the A factors by rows (sum r, in), `b` the B factors by columns
/// (out, sum r). One op for the fused query/key/value projection with LoRA on some of them; gradients
/// for `x`, `a` and `b` (the weight and bias are frozen).
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    bias: &Tensor,
    a: &Tensor,
    b: &Tensor,
    blocks: Vec<LoraBlock>,
    differentiable: bool,
) -> Res<Tensor> {
    let op = LoraLinear {
        w: w.contiguous()?,
        bias: bias.contiguous()?,
        blocks,
    };
    let (x, a, b) = (x.contiguous()?, a.contiguous()?, b.contiguous()?);
    if differentiable {
        x.apply_op3(&a, &b, op)
    } else {
        x.apply_op3_no_bwd(&a, &b, &op)
    }
}

struct LoraLinear {
    w: Tensor,
    bias: Tensor,
    blocks: Vec<LoraBlock>,
}

impl LoraLinear {
    /// (out of each block, sum of ranks) after checking the shapes.
    fn check(&self, n_in: usize, n_out: usize, a: (usize, usize), b: (usize, usize)) -> Res<usize> {
        let (rr, ain) = a;
        let (bo, br) = b;
        if ain != n_in || br != rr {
            return err(format!("lora-linear: a {a:?}, b {b:?}, input width {n_in}"));
        }
        for bl in &self.blocks {
            if bl.r0 + bl.r > rr || bl.col + bo > n_out {
                return err(format!(
                    "lora-linear: block {bl:?} outside a {a:?} / output {n_out}"
                ));
            }
        }
        Ok(bo)
    }

    /// `x W^T + b` plus the blocks' updates, for rows `x` (N, in) and the factors `a`, `b` with their
    /// dims; returns (y, out).
    fn forward(
        &self,
        x: &[f32],
        (a, adims): (&[f32], (usize, usize)),
        (b, bdims): (&[f32], (usize, usize)),
        n: usize,
        inp: usize,
    ) -> Res<(Vec<f32>, usize)> {
        let base = Linear::plain(self.w.clone());
        let (mut y, out) = with_f32(&self.bias, |bs, lb| {
            base.forward(x, contiguous_slice(bs, lb, "bias")?, n, inp)
        })?;
        let rr = adims.0;
        let bo = self.check(inp, out, adims, bdims)?;
        if a.len() != rr * inp || b.len() != bo * rr {
            return err("lora-linear: factor storage does not match its dims");
        }
        let t = LoraLinear::down(x, a, n, inp, rr);
        for bl in &self.blocks {
            // SAFETY: block inside the output and the factors (checked).
            unsafe {
                let dst = Dst::add(y.as_mut_ptr().add(bl.col), out).scaled(bl.scale);
                let tj = Mat::new(t.as_ptr().add(bl.r0), n, bl.r, rr);
                let bj = Mat::new(b.as_ptr().add(bl.r0), bo, bl.r, rr);
                mm(dst, tj, bj.t(), gemm_par(n * bo * bl.r));
            }
        }
        Ok((y, out))
    }

    /// (dx, da, db) for the output gradient `g` (N, out); dx only when `want_dx` (empty otherwise).
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        x: &[f32],
        a: &[f32],
        b: &[f32],
        g: &[f32],
        (n, inp, out): (usize, usize, usize),
        (rr, bo): (usize, usize),
        want_dx: bool,
    ) -> Res<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        if x.len() != n * inp || g.len() != n * out || a.len() != rr * inp || b.len() != bo * rr {
            return err("lora-linear: backward operands do not fit");
        }
        let mut dx = if want_dx {
            Linear::plain(self.w.clone()).input_grad(g, n, out)?
        } else {
            Vec::new()
        };
        // u = scale_j * dY_j B_j (N, R), per block.
        let mut u = vec![0f32; n * rr];
        let mut db = vec![0f32; bo * rr];
        let t = LoraLinear::down(x, a, n, inp, rr);
        for bl in &self.blocks {
            // SAFETY: blocks checked against the shapes.
            unsafe {
                let gj = Mat::new(g.as_ptr().add(bl.col), n, bo, out);
                let bj = Mat::new(b.as_ptr().add(bl.r0), bo, bl.r, rr);
                let tj = Mat::new(t.as_ptr().add(bl.r0), n, bl.r, rr);
                let u_j = Dst::set(u.as_mut_ptr().add(bl.r0), rr).scaled(bl.scale);
                mm(u_j, gj, bj, gemm_par(n * bl.r * bo));
                // dB_j = scale_j dY_j^T t_j (out, r).
                let db_j = Dst::set(db.as_mut_ptr().add(bl.r0), rr).scaled(bl.scale);
                mm(db_j, gj.t(), tj, gemm::Parallelism::None);
            }
        }
        let mut da = vec![0f32; rr * inp];
        // SAFETY: shapes checked.
        unsafe {
            // dX += u A.
            if want_dx {
                mm(
                    Dst::add(dx.as_mut_ptr(), inp),
                    Mat::new(u.as_ptr(), n, rr, rr),
                    Mat::new(a.as_ptr(), rr, inp, inp),
                    gemm_par(n * inp * rr),
                );
            }
            // dA = u^T X (R, in).
            mm(
                Dst::set(da.as_mut_ptr(), inp),
                Mat::new(u.as_ptr(), n, rr, rr).t(),
                Mat::new(x.as_ptr(), n, inp, inp),
                gemm::Parallelism::None,
            );
        }
        Ok((dx, da, db))
    }

    /// t = x A^T (N, R).
    fn down(x: &[f32], a: &[f32], n: usize, inp: usize, rr: usize) -> Vec<f32> {
        let mut t = vec![0f32; n * rr];
        // SAFETY: shapes checked by the caller.
        unsafe {
            mm(
                Dst::set(t.as_mut_ptr(), rr),
                Mat::new(x.as_ptr(), n, inp, inp),
                Mat::new(a.as_ptr(), rr, inp, inp).t(),
                gemm_par(n * rr * inp),
            );
        }
        t
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "peftdb-lora-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        x_layout: &Layout,
        a_s: &CpuStorage,
        a_layout: &Layout,
        b_s: &CpuStorage,
        b_layout: &Layout,
    ) -> Res<(CpuStorage, Shape)> {
        let x = f32_operand(xs, x_layout, "x")?;
        let a = f32_operand(a_s, a_layout, "a")?;
        let b = f32_operand(b_s, b_layout, "b")?;
        let (n, inp) = x_layout.shape().dims2()?;
        let (y, out) = self.forward(
            x,
            (a, a_layout.shape().dims2()?),
            (b, b_layout.shape().dims2()?),
            n,
            inp,
        )?;
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }

    fn bwd(
        &self,
        xt: &Tensor,
        at: &Tensor,
        bt: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Res<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (n, out) = grad.dims2()?;
        let (rr, inp) = at.dims2()?;
        let bo = self.check(inp, out, (rr, inp), bt.dims2()?)?;
        let (dx, da, db) = with_f32(xt, |xs, lx| {
            let x = contiguous_slice(xs, lx, "x")?;
            with_f32(at, |as_, la| {
                let a = contiguous_slice(as_, la, "a")?;
                with_f32(bt, |bs, lb| {
                    let b = contiguous_slice(bs, lb, "b")?;
                    with_f32(&grad, |gs, lg| {
                        let g = contiguous_slice(gs, lg, "grad")?;
                        // No trained parameter below this layer's input (the first layer's, for a
                        // LoRA): its gradient is never used, and it is this backward's largest GEMM.
                        self.backward(x, a, b, g, (n, inp, out), (rr, bo), xt.track_op())
                    })
                })
            })
        })?;
        Ok((
            xt.track_op()
                .then(|| out_tensor(dx, (n, inp)))
                .transpose()?,
            at.track_op()
                .then(|| out_tensor(da, (rr, inp)))
                .transpose()?,
            bt.track_op()
                .then(|| out_tensor(db, (bo, rr)))
                .transpose()?,
        ))
    }
}

// ---------------------------------------------------------------------------------------------------
// Layer norm.

/// Layer norm over the last dimension, `(x - mean) / sqrt(var + eps) * w + b`, with a frozen weight `w`
/// (BERT's layer-norm weights are never trained here; biases are, by BitFit and LoRA `bias="all"`):
/// differentiable in `x` and `b`.
pub fn layer_norm(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
    differentiable: bool,
) -> Res<Tensor> {
    let dims = x.dims().to_vec();
    let h = *dims.last().unwrap_or(&0);
    let x2 = x.contiguous()?.reshape(((), h))?;
    let op = LayerNorm {
        eps: eps as f32,
        w: w.contiguous()?,
    };
    let y = if differentiable {
        x2.apply_op2(b, op)?
    } else {
        x2.apply_op2_no_bwd(b, &op)?
    };
    y.reshape(dims)
}

/// `layer_norm(a + r)` in one pass (the residual connections): `a`, `r` (N, H).
pub fn add_layer_norm(
    a: &Tensor,
    r: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
    differentiable: bool,
) -> Res<Tensor> {
    let op = LayerNorm {
        eps: eps as f32,
        w: w.contiguous()?,
    };
    let (a, r) = (a.contiguous()?, r.contiguous()?);
    if differentiable {
        a.apply_op3(&r, b, op)
    } else {
        a.apply_op3_no_bwd(&r, b, &op)
    }
}

struct LayerNorm {
    eps: f32,
    w: Tensor,
}

#[inline(always)]
fn mean_rstd(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = row_sum(x) / n;
    let mut acc = [0f32; LANES];
    let mut ch = x.chunks_exact(LANES);
    for c in &mut ch {
        for i in 0..LANES {
            let d = c[i] - mean;
            acc[i] += d * d;
        }
    }
    let mut var = 0f32;
    for a in acc {
        var += a;
    }
    for &v in ch.remainder() {
        var += (v - mean) * (v - mean);
    }
    (mean, 1.0 / (var / n + eps).sqrt())
}

multiversion! {
    /// Layer norm of rows of `w.len()`: `y = (x - mean) rstd w + b`.
    fn ln_fwd_rows(y: &mut [f32], x: &[f32], w: &[f32], b: &[f32], eps: f32) {
        let h = w.len();
        for (yr, xr) in y.chunks_exact_mut(h).zip(x.chunks_exact(h)) {
            let (mean, rstd) = mean_rstd(xr, eps);
            for i in 0..h {
                yr[i] = (xr[i] - mean) * rstd * w[i] + b[i];
            }
        }
    }
}

multiversion! {
    /// Layer norm's input gradient, rows of `w.len()`:
    /// `dx = rstd (gw - mean(gw) - xhat mean(gw xhat))`, `gw = g w`.
    fn ln_bwd_rows(dx: &mut [f32], x: &[f32], g: &[f32], w: &[f32], eps: f32) {
        let h = w.len();
        for ((dr, xr), gr) in dx.chunks_exact_mut(h).zip(x.chunks_exact(h)).zip(g.chunks_exact(h)) {
            let (mean, rstd) = mean_rstd(xr, eps);
            let mut s1 = [0f32; LANES];
            let mut s2 = [0f32; LANES];
            let mut i = 0;
            while i + LANES <= h {
                for l in 0..LANES {
                    let gw = gr[i + l] * w[i + l];
                    s1[l] += gw;
                    s2[l] += gw * (xr[i + l] - mean) * rstd;
                }
                i += LANES;
            }
            let (mut a, mut c) = (0f32, 0f32);
            for l in 0..LANES {
                a += s1[l];
                c += s2[l];
            }
            for j in i..h {
                let gw = gr[j] * w[j];
                a += gw;
                c += gw * (xr[j] - mean) * rstd;
            }
            let (a, c) = (a / h as f32, c / h as f32);
            for j in 0..h {
                let xh = (xr[j] - mean) * rstd;
                dr[j] = rstd * (gr[j] * w[j] - a - xh * c);
            }
        }
    }
}

multiversion! {
    /// `acc` (w) += every row of `x` (rows of `acc.len()`).
    fn add_into_rows(acc: &mut [f32], x: &[f32]) {
        let w = acc.len();
        for row in x.chunks_exact(w) {
            for (a, v) in acc.iter_mut().zip(row) {
                *a += v;
            }
        }
    }
}

multiversion! {
    /// `out = a + r`.
    fn add_vec(out: &mut [f32], a: &[f32], r: &[f32]) {
        for ((o, x), y) in out.iter_mut().zip(a).zip(r) {
            *o = x + y;
        }
    }
}

impl LayerNorm {
    /// Forward of rows `x` (N, H), or of `x + r`.
    fn forward(
        &self,
        x: &[f32],
        r: Option<&[f32]>,
        b: &[f32],
        n: usize,
        h: usize,
    ) -> Res<Vec<f32>> {
        with_f32(&self.w, |ws, lw| {
            let w = contiguous_slice(ws, lw, "w")?;
            if w.len() != h || b.len() != h || x.len() != n * h {
                return err("layer-norm: weight/bias do not match the last dimension");
            }
            let mut y = zeroed(n * h);
            let eps = self.eps;
            y.par_chunks_mut(h * ROW_BLOCK)
                .enumerate()
                .for_each(|(i, yb)| {
                    let xb = &x[i * h * ROW_BLOCK..i * h * ROW_BLOCK + yb.len()];
                    match r {
                        Some(r) => {
                            let rb = &r[i * h * ROW_BLOCK..i * h * ROW_BLOCK + yb.len()];
                            let mut sum = vec![0f32; yb.len()];
                            add_vec(&mut sum, xb, rb);
                            ln_fwd_rows(yb, &sum, w, b, eps);
                        }
                        None => ln_fwd_rows(yb, xb, w, b, eps),
                    }
                });
            Ok(y)
        })
    }

    /// (dx, db) for the rows `x` (the layer norm's input) and the output gradient `grad`.
    fn backward(&self, x: &[f32], grad: &Tensor, want_b: bool) -> Res<(Tensor, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (n, h) = grad.dims2()?;
        let (dx, db) = with_f32(&grad, |gs, lg| {
            self.backward_rows(x, contiguous_slice(gs, lg, "grad")?, n, h, want_b)
        })?;
        Ok((
            out_tensor(dx, (n, h))?,
            db.map(|db| out_tensor(db, h)).transpose()?,
        ))
    }

    /// [`LayerNorm::backward`] on slices: (dx, db) for rows `x` (N, H) and the gradient `g` (N, H).
    fn backward_rows(
        &self,
        x: &[f32],
        g: &[f32],
        n: usize,
        h: usize,
        want_b: bool,
    ) -> Res<(Vec<f32>, Option<Vec<f32>>)> {
        let eps = self.eps;
        with_f32(&self.w, |ws, lw| {
            let w = contiguous_slice(ws, lw, "w")?;
            if w.len() != h || x.len() != n * h || g.len() != n * h {
                return err("layer-norm: backward operands do not fit");
            }
            let mut dx = zeroed(n * h);
            dx.par_chunks_mut(h * ROW_BLOCK)
                .zip(x.par_chunks(h * ROW_BLOCK))
                .zip(g.par_chunks(h * ROW_BLOCK))
                .for_each(|((db, xb), gb)| ln_bwd_rows(db, xb, gb, w, eps));
            let db = want_b.then(|| {
                let s = block_col_sums(n, h, 1, |rows, acc| {
                    add_into_rows(&mut acc[0], &g[rows.start * h..rows.end * h]);
                });
                s.into_iter().next().unwrap_or_default()
            });
            Ok((dx, db))
        })
    }
}

impl CustomOp2 for LayerNorm {
    fn name(&self) -> &'static str {
        "peftdb-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Res<(CpuStorage, Shape)> {
        let x = f32_operand(s1, l1, "x")?;
        let b = f32_operand(s2, l2, "b")?;
        let (n, h) = l1.shape().dims2()?;
        let y = self.forward(x, None, b, n, h)?;
        Ok((CpuStorage::F32(y), Shape::from((n, h))))
    }

    fn bwd(
        &self,
        xt: &Tensor,
        bt: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Res<(Option<Tensor>, Option<Tensor>)> {
        let (dx, db) = with_f32(xt, |xs, lx| {
            self.backward(contiguous_slice(xs, lx, "x")?, grad, bt.track_op())
        })?;
        Ok((Some(dx), db))
    }
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "peftdb-add-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Res<(CpuStorage, Shape)> {
        let a = f32_operand(s1, l1, "a")?;
        let r = f32_operand(s2, l2, "r")?;
        let b = f32_operand(s3, l3, "b")?;
        let (n, h) = l1.shape().dims2()?;
        if l2.shape() != l1.shape() {
            return err("add-layer-norm: the two inputs differ in shape");
        }
        let y = self.forward(a, Some(r), b, n, h)?;
        Ok((CpuStorage::F32(y), Shape::from((n, h))))
    }

    fn bwd(
        &self,
        at: &Tensor,
        rt: &Tensor,
        bt: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Res<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, db) = with_f32(at, |as_, la| {
            with_f32(rt, |rs, lr| {
                let a = contiguous_slice(as_, la, "a")?;
                let r = contiguous_slice(rs, lr, "r")?;
                self.backward(&sum_rows(a, r), grad, bt.track_op())
            })
        })?;
        let dr = rt.track_op().then(|| dx.clone());
        let da = at.track_op().then_some(dx);
        Ok((da, dr, db))
    }
}

// ---------------------------------------------------------------------------------------------------
// GELU.

/// `(erf(x), exp(-x^2))`: erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7) and the exponential
/// it is built on.
#[inline(always)]
fn erf_parts(x: f32) -> (f32, f32) {
    let a = x.abs();
    let t = 1.0 / a.mul_add(0.327_591_1, 1.0);
    let e = exp_poly(-a * a);
    let q = t
        .mul_add(1.061_405_4, -1.453_152_1)
        .mul_add(t, 1.421_413_7)
        .mul_add(t, -0.284_496_74)
        .mul_add(t, 0.254_829_6);
    let y = (-q * t).mul_add(e, 1.0);
    (if x < 0.0 { -y } else { y }, e)
}

const PAR_CHUNK: usize = 16 * 1024;

/// erf-GELU and its derivative at `v`: `(x Phi(x), Phi(x) + x phi(x))`, the derivative sharing the
/// value's `exp`. The one formula of both: [`gelu_f`] and the backward passes call it.
#[inline(always)]
fn gelu_and_grad(v: f32) -> (f32, f32) {
    let (erf, e) = erf_parts(v * std::f32::consts::FRAC_1_SQRT_2);
    let cdf = 0.5 * (1.0 + erf);
    (0.5 * v * (1.0 + erf), cdf + v * 0.398_942_3 * e)
}

multiversion! {
    /// `y = gelu(y)` in place, and `d = gelu'(y)` (of the value before).
    fn gelu_fwd_grad_vec(y: &mut [f32], d: &mut [f32]) {
        for (v, dv) in y.iter_mut().zip(d.iter_mut()) {
            let (g, gd) = gelu_and_grad(*v);
            *v = g;
            *dv = gd;
        }
    }
}

multiversion! {
    /// Rows of `y` (each `bias.len()` wide): `y = gelu(y + bias)` in place, and `d = gelu'(y + bias)`.
    fn bias_gelu_fwd_grad_rows(y: &mut [f32], d: &mut [f32], bias: &[f32]) {
        for (yr, dr) in y.chunks_exact_mut(bias.len()).zip(d.chunks_exact_mut(bias.len())) {
            for ((v, dv), &b) in yr.iter_mut().zip(dr.iter_mut()).zip(bias) {
                let (g, gd) = gelu_and_grad(*v + b);
                *v = g;
                *dv = gd;
            }
        }
    }
}

multiversion! {
    /// Rows of `y` (each `bias.len()` wide): `y = gelu(y + bias)` in place.
    fn bias_gelu_rows(y: &mut [f32], bias: &[f32]) {
        for yr in y.chunks_exact_mut(bias.len()) {
            for (v, &b) in yr.iter_mut().zip(bias) {
                *v = gelu_f(*v + b);
            }
        }
    }
}

multiversion! {
    /// `y = gelu(y)` in place.
    fn gelu_inplace_vec(y: &mut [f32]) {
        for v in y.iter_mut() {
            *v = gelu_f(*v);
        }
    }
}

multiversion! {
    /// `out = a * b`, element by element.
    fn mul_vec(out: &mut [f32], a: &[f32], b: &[f32]) {
        for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
            *o = x * y;
        }
    }
}

multiversion! {
    /// `out = g * gelu'(x)`, `gelu'(x) = Phi(x) + x phi(x)`.
    fn gelu_bwd_vec(out: &mut [f32], x: &[f32], g: &[f32]) {
        for ((o, &v), &gv) in out.iter_mut().zip(x).zip(g) {
            *o = gv * gelu_and_grad(v).1;
        }
    }
}

/// Exact (erf) GELU, `x Phi(x)`, with its analytic backward.
pub fn gelu_erf(x: &Tensor, differentiable: bool) -> Res<Tensor> {
    let x = x.contiguous()?;
    if differentiable {
        x.apply_op1(GeluErf)
    } else {
        x.apply_op1_no_bwd(&GeluErf)
    }
}

struct GeluErf;

#[inline(always)]
fn gelu_f(v: f32) -> f32 {
    gelu_and_grad(v).0
}

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "peftdb-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Res<(CpuStorage, Shape)> {
        let mut out = f32_operand(s, l, "x")?.to_vec();
        if out.len() < 4 * PAR_CHUNK {
            gelu_inplace_vec(&mut out);
        } else {
            out.par_chunks_mut(PAR_CHUNK).for_each(gelu_inplace_vec);
        }
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Res<Option<Tensor>> {
        // d/dx x Phi(x) = Phi(x) + x phi(x).
        let grad = grad.contiguous()?;
        let d = with_f32(arg, |xs, lx| {
            let x = contiguous_slice(xs, lx, "x")?;
            with_f32(&grad, |gs, lg| {
                let g = contiguous_slice(gs, lg, "grad")?;
                let mut out = vec![0f32; x.len()];
                out.par_chunks_mut(PAR_CHUNK)
                    .zip(x.par_chunks(PAR_CHUNK))
                    .zip(g.par_chunks(PAR_CHUNK))
                    .for_each(|((o, xc), gc)| gelu_bwd_vec(o, xc, gc));
                Ok(out)
            })
        })?;
        Ok(Some(out_tensor(d, arg.shape().clone())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var, D};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        // Deterministic pseudo-random values in [-1, 1).
        let n: usize = shape.iter().product();
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    fn reference_attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        nh: usize,
        mask: Option<&Tensor>,
    ) -> Tensor {
        let (b, sq, h) = q.dims3().unwrap();
        let skv = k.dim(1).unwrap();
        let hd = h / nh;
        let heads = |t: &Tensor, s: usize| {
            t.reshape((b, s, nh, hd))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (qh, kh, vh) = (heads(q, sq), heads(k, skv), heads(v, skv));
        let mut scores = qh.matmul(&kh.t().unwrap()).unwrap();
        if let Some(m) = mask {
            scores = scores
                .broadcast_add(&m.reshape((b, 1, 1, skv)).unwrap())
                .unwrap();
        }
        let mx = scores.max_keepdim(D::Minus1).unwrap().detach();
        let e = scores.broadcast_sub(&mx).unwrap().exp().unwrap();
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
        p.matmul(&vh)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, sq, h))
            .unwrap()
    }

    fn padding_mask(b: usize, skv: usize) -> (Vec<f32>, Tensor) {
        // Row i masks its last i positions (additive -1e9), at least one position stays visible.
        let m: Vec<f32> = (0..b)
            .flat_map(|i| (0..skv).map(move |j| if j + i >= skv && j > 0 { -1e9 } else { 0.0 }))
            .collect();
        let t = Tensor::from_vec(m.clone(), (b, skv), &Device::Cpu).unwrap();
        (m, t)
    }

    #[test]
    fn mm_handles_transposed_views_strides_scale_and_accumulation() {
        // Naive dst[i][j] = [dst +] scale * sum_k lhs(i, k) rhs(k, j) for every transpose pair, operands
        // read from inside wider rows (ld > cols) and the result written into a wider destination.
        let (m, n, k, pad) = (5, 7, 3, 2);
        let data = |len: usize, seed: u64| rand(&[len], seed).to_vec1::<f32>().unwrap();
        for (lt, rt) in [(false, false), (true, false), (false, true), (true, true)] {
            // A stored (r x c) row-major matrix with ld = c + pad, viewed transposed when asked.
            let (lr, lc) = if lt { (k, m) } else { (m, k) };
            let (rr, rc) = if rt { (n, k) } else { (k, n) };
            let lbuf = data(lr * (lc + pad), 1);
            let rbuf = data(rr * (rc + pad), 2);
            let at = |buf: &[f32], ld: usize, t: bool, i: usize, j: usize| {
                if t {
                    buf[j * ld + i]
                } else {
                    buf[i * ld + j]
                }
            };
            for (add, scale) in [(false, 1.0f32), (true, 1.0), (false, 0.5), (true, -2.0)] {
                let ld = n + pad;
                let mut dst = data(m * ld, 3);
                let mut want = dst.clone();
                for i in 0..m {
                    for j in 0..n {
                        let dot: f32 = (0..k)
                            .map(|kk| {
                                at(&lbuf, lc + pad, lt, i, kk) * at(&rbuf, rc + pad, rt, kk, j)
                            })
                            .sum();
                        let base = if add { want[i * ld + j] } else { 0.0 };
                        want[i * ld + j] = base + scale * dot;
                    }
                }
                let view = |ptr: *const f32, r: usize, c: usize, t: bool| {
                    let v = Mat::new(ptr, r, c, c + pad);
                    if t {
                        v.t()
                    } else {
                        v
                    }
                };
                let out = if add { Dst::add } else { Dst::set };
                // SAFETY: every view lies inside its buffer (sizes above).
                unsafe {
                    mm(
                        out(dst.as_mut_ptr(), ld).scaled(scale),
                        view(lbuf.as_ptr(), lr, lc, lt),
                        view(rbuf.as_ptr(), rr, rc, rt),
                        gemm::Parallelism::None,
                    );
                }
                for (idx, (g, w)) in dst.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() < 1e-5,
                        "lt {lt} rt {rt} add {add} scale {scale}: element {idx} {g} vs {w}"
                    );
                }
            }
        }
    }

    /// A product of normal operands that falls below f32's smallest normal is flushed to zero inside
    /// [`mm`], a denormal operand reads as zero there, and the calling thread's MXCSR (control bits and
    /// sticky status flags) is the same after.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn mm_flushes_denormals_and_restores_the_thread_setting() {
        let before = read_mxcsr();
        assert_eq!(
            before & FTZ_DAZ,
            0,
            "the test thread starts with IEEE denormals"
        );
        // A denormal; outside the guard, the same arithmetic keeps it.
        let tiny = f32::MIN_POSITIVE / 4.0;
        assert_eq!(
            std::hint::black_box(tiny) * std::hint::black_box(1.0f32),
            tiny
        );
        let small = 1e-20f32; // small * small = 1e-40: below the normal range
        assert!((small * small) > 0.0 && (small * small) < f32::MIN_POSITIVE);
        for (l, r) in [(small, small), (tiny, 1.0), (1.0, tiny)] {
            let (lhs, rhs) = (vec![l; 4], vec![r; 4]);
            let mut dst = vec![7.0f32; 1];
            let before = read_mxcsr();
            // SAFETY: a 1x4 by 4x1 product into a 1x1 destination, every view inside its buffer.
            unsafe {
                mm(
                    Dst::set(dst.as_mut_ptr(), 1),
                    Mat::new(lhs.as_ptr(), 1, 4, 4),
                    Mat::new(rhs.as_ptr(), 4, 1, 1),
                    gemm::Parallelism::None,
                );
            }
            assert_eq!(dst[0].to_bits(), 0, "{l:e} x {r:e}: {:e}", dst[0]);
            assert_eq!(read_mxcsr(), before);
        }
        let before = read_mxcsr();
        {
            let _g = FlushDenormals::here();
            assert_eq!(read_mxcsr() & FTZ_DAZ, FTZ_DAZ);
            let _nested = FlushDenormals::here();
            assert_eq!(
                std::hint::black_box(tiny) * std::hint::black_box(1.0f32),
                0.0
            );
        }
        assert_eq!(read_mxcsr(), before);
    }

    #[test]
    fn exp_poly_is_accurate() {
        let mut worst = 0f32;
        for i in -8700..=8800 {
            let x = i as f32 / 100.0;
            let (a, e) = (exp_poly(x), x.exp());
            worst = worst.max(((a - e) / e).abs());
        }
        assert!(worst < 1e-6, "relative error {worst}");
        assert!(exp_poly(-1e9) < 1e-37 && exp_poly(-1e9) >= 0.0);
    }

    #[test]
    fn exp_poly_scales_by_the_power_of_two_an_integer_cast_gives() {
        // exp_poly with 2^k through `k as i32`, which LLVM did not vectorise.
        let cast = |x: f32| -> f32 {
            let x = x.clamp(-87.0, 88.0);
            let k = (x * std::f32::consts::LOG2_E + 0.5).floor();
            let r = (-k).mul_add(1.428_606_8e-6, (-k).mul_add(0.693_145_75, x));
            let p = r
                .mul_add(0.001_388_888_9, 0.008_333_452)
                .mul_add(r, 0.041_666_41)
                .mul_add(r, 0.166_666_67)
                .mul_add(r, 0.5)
                .mul_add(r, 1.0)
                .mul_add(r, 1.0);
            p * f32::from_bits(((k as i32 + 127) as u32) << 23)
        };
        let mut n = 0;
        for bits in (0..=u32::MAX).step_by(4099) {
            let x = f32::from_bits(bits);
            if x.is_nan() {
                assert!(exp_poly(x).is_nan());
                continue;
            }
            assert_eq!(exp_poly(x).to_bits(), cast(x).to_bits(), "x = {x:e}");
            n += 1;
        }
        assert!(n > 1_000_000);
    }

    #[test]
    fn attention_forward_matches_generic_ops() {
        // (B, Sq, Skv, H, heads, masked): the real MiniLM shape, odd sizes, a prefix-like Skv > Sq.
        for (i, &(b, sq, skv, h, nh, masked)) in [
            (2, 64, 64, 384, 12, false),
            (3, 5, 5, 8, 2, true),
            (2, 7, 27, 24, 3, true),
            (1, 1, 1, 4, 1, false),
        ]
        .iter()
        .enumerate()
        {
            let s = i as u64 * 10;
            let q = (rand(&[b, sq, h], s) * 0.5).unwrap();
            let k = rand(&[b, skv, h], s + 1);
            let v = rand(&[b, skv, h], s + 2);
            let (mv, mt) = padding_mask(b, skv);
            let (mv, mt) = if masked {
                (Some(mv), Some(mt))
            } else {
                (None, None)
            };
            let want = reference_attention(&q, &k, &v, nh, mt.as_ref());
            for diff in [false, true] {
                let got = attention(&q, &k, &v, nh, mv.clone(), diff).unwrap();
                let d = max_diff(&got, &want);
                assert!(d < 2e-6, "case {i} (differentiable {diff}): max diff {d}");
            }
        }
    }

    #[test]
    fn attention_reads_strided_views_of_a_fused_projection() {
        let (b, s, h, nh) = (2, 9, 16, 4);
        let qkv = rand(&[b, s, 3 * h], 7);
        let (q, k, v) = (
            qkv.narrow(2, 0, h).unwrap(),
            qkv.narrow(2, h, h).unwrap(),
            qkv.narrow(2, 2 * h, h).unwrap(),
        );
        assert!(!q.is_contiguous());
        let got = attention(&q, &k, &v, nh, None, false).unwrap();
        let want = reference_attention(
            &q.contiguous().unwrap(),
            &k.contiguous().unwrap(),
            &v.contiguous().unwrap(),
            nh,
            None,
        );
        assert!(max_diff(&got, &want) < 2e-6);
    }

    #[test]
    fn attention_backward_matches_generic_gradients() {
        for (i, &(b, sq, skv, h, nh, masked)) in [
            (2, 64, 64, 384, 12, true),
            (3, 5, 5, 8, 2, true),
            (2, 6, 11, 12, 3, false),
        ]
        .iter()
        .enumerate()
        {
            let s = 100 + i as u64 * 10;
            let q = Var::from_tensor(&(rand(&[b, sq, h], s) * 0.5).unwrap()).unwrap();
            let k = Var::from_tensor(&rand(&[b, skv, h], s + 1)).unwrap();
            let v = Var::from_tensor(&rand(&[b, skv, h], s + 2)).unwrap();
            let r = rand(&[b, sq, h], s + 3);
            let (mv, mt) = padding_mask(b, skv);
            let (mv, mt) = if masked {
                (Some(mv), Some(mt))
            } else {
                (None, None)
            };
            let loss = |out: Tensor| (out * &r).unwrap().sum_all().unwrap();
            let g_ref = loss(reference_attention(&q, &k, &v, nh, mt.as_ref()))
                .backward()
                .unwrap();
            let g = loss(attention(&q, &k, &v, nh, mv, true).unwrap())
                .backward()
                .unwrap();
            for (name, t) in [("q", &q), ("k", &k), ("v", &v)] {
                let (a, e) = (g.get(t).unwrap(), g_ref.get(t).unwrap());
                let d = max_diff(a, e);
                assert!(d < 1e-5, "case {i}: d{name} max diff {d}");
            }
        }
    }

    #[test]
    fn attention_backward_through_strided_views() {
        let (b, s, h, nh) = (2, 5, 8, 2);
        let qkv = Var::from_tensor(&rand(&[b, s, 3 * h], 31)).unwrap();
        let r = rand(&[b, s, h], 32);
        let parts = |t: &Tensor| {
            (
                t.narrow(2, 0, h).unwrap(),
                t.narrow(2, h, h).unwrap(),
                t.narrow(2, 2 * h, h).unwrap(),
            )
        };
        let (q, k, v) = parts(&qkv);
        let g = (attention(&q, &k, &v, nh, None, true).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (q, k, v) = parts(&qkv);
        let g_ref = (reference_attention(&q, &k, &v, nh, None) * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(max_diff(g.get(&qkv).unwrap(), g_ref.get(&qkv).unwrap()) < 1e-5);
    }

    #[test]
    fn linear_matches_matmul_and_its_gradients() {
        for (i, &(n, inp, out)) in [(512, 384, 1152), (7, 5, 3), (2048, 384, 1536)]
            .iter()
            .enumerate()
        {
            let s = 200 + i as u64 * 10;
            let x = Var::from_tensor(&rand(&[n, inp], s)).unwrap();
            let w = rand(&[out, inp], s + 1);
            let bias = Var::from_tensor(&rand(&[out], s + 2)).unwrap();
            let r = rand(&[n, out], s + 3);
            let want = x
                .matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&bias)
                .unwrap();
            let got = linear(&x, &w, &bias, true).unwrap();
            let d = max_diff(&got, &want);
            assert!(d < 1e-4, "case {i}: forward max diff {d}");
            let g = (got * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g_ref = (want * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let dx = max_diff(g.get(&x).unwrap(), g_ref.get(&x).unwrap());
            let db = max_diff(g.get(&bias).unwrap(), g_ref.get(&bias).unwrap());
            assert!(dx < 1e-4 && db < 1e-3, "case {i}: dx {dx} db {db}");
            // A frozen bias gets no gradient.
            let c = Tensor::zeros(out, DType::F32, &Device::Cpu).unwrap();
            let g = (linear(&x, &w, &c, true).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            assert!(g.get(&c).is_none());
        }
    }

    #[test]
    fn linear_gelu_is_linear_then_gelu_in_values_and_gradients() {
        for (i, &(n, inp, out)) in [(512, 384, 1536), (7, 5, 3)].iter().enumerate() {
            let s = 300 + i as u64 * 10;
            let x = Var::from_tensor(&(rand(&[n, inp], s) * 3.0).unwrap()).unwrap();
            let w = rand(&[out, inp], s + 1);
            let bias = Var::from_tensor(&rand(&[out], s + 2)).unwrap();
            let r = rand(&[n, out], s + 3);
            let two = gelu_erf(&linear(&x, &w, &bias, true).unwrap(), true).unwrap();
            let one = linear_gelu(&x, &w, &bias, true).unwrap();
            // The same GEMM and the same erf: the same bits.
            assert_eq!(max_diff(&one, &two), 0.0, "case {i}: forward");
            let frozen = linear_gelu(&x, &w, &bias, false).unwrap();
            assert_eq!(
                max_diff(&frozen, &two),
                0.0,
                "case {i}: forward without gradients"
            );
            let g1 = (one * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (two * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let dx = max_diff(g1.get(&x).unwrap(), g2.get(&x).unwrap());
            let db = max_diff(g1.get(&bias).unwrap(), g2.get(&bias).unwrap());
            assert!(dx < 1e-5 && db < 1e-4, "case {i}: dx {dx} db {db}");
            // And against candle's own erf GELU on a plain matmul.
            let want = x
                .matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&bias)
                .unwrap()
                .gelu_erf()
                .unwrap();
            let g3 = (want * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let dx = max_diff(g1.get(&x).unwrap(), g3.get(&x).unwrap());
            assert!(dx < 1e-3, "case {i}: dx against candle {dx}");
        }
    }

    #[test]
    fn a_linear_layer_on_a_few_rows_reads_its_weight_in_place_and_matches_matmul() {
        // Up to SMALL_ROWS rows the weight is read in place (four rows at a time, the last group
        // padded); above it gemm runs. Both sides of the threshold, ragged lengths, any threads.
        for (i, &(n, inp, out)) in [
            (1, 384, 1152),
            (3, 384, 1536),
            (6, 384, 384),
            (7, 37, 70),
            (16, 1536, 384),
            (17, 384, 1152),
        ]
        .iter()
        .enumerate()
        {
            let s = 500 + i as u64 * 10;
            let x = Var::from_tensor(&rand(&[n, inp], s)).unwrap();
            let w = rand(&[out, inp], s + 1);
            let bias = rand(&[out], s + 2);
            let want = x
                .matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&bias)
                .unwrap();
            let run = || linear(&x, &w, &bias, true).unwrap();
            let got = run();
            let d = max_diff(&got, &want);
            assert!(d < 1e-4, "case {i} ({n} rows): max diff {d}");
            let three = rayon::ThreadPoolBuilder::new()
                .num_threads(3)
                .build()
                .unwrap()
                .install(run);
            assert_eq!(
                max_diff(&got, &three),
                0.0,
                "case {i}: thread count changed the bits"
            );
        }
    }

    #[test]
    fn a_split_gemm_gives_the_bits_of_one_gemm_for_any_thread_count() {
        // Shapes of a training step (tokens x hidden x 3*hidden, ...) and ragged ones; both the
        // forward layout (x W^T) and the backward one (dY W).
        for (i, &(m, k, n)) in [
            (512, 384, 1152),
            (512, 1536, 384),
            (65, 29, 83),
            (37, 29, 83),
            (6, 384, 1536),
            (70, 2, 300),
        ]
        .iter()
        .enumerate()
        {
            let s = 400 + i as u64 * 10;
            let x = rand(&[m, k], s).to_vec2::<f32>().unwrap().concat();
            let w = rand(&[n, k], s + 1).to_vec2::<f32>().unwrap().concat();
            let wt = rand(&[k, n], s + 2).to_vec2::<f32>().unwrap().concat();
            let run = |rhs_t: bool, par: gemm::Parallelism| {
                let mut y = vec![f32::NAN; m * n];
                let rhs = if rhs_t {
                    Mat::new(w.as_ptr(), n, k, k).t()
                } else {
                    Mat::new(wt.as_ptr(), k, n, n)
                };
                // SAFETY: the operands are m x k, k x n and m x n buffers.
                unsafe {
                    mm(
                        Dst::set(y.as_mut_ptr(), n),
                        Mat::new(x.as_ptr(), m, k, k),
                        rhs,
                        par,
                    )
                };
                y
            };
            for rhs_t in [true, false] {
                let one = run(rhs_t, gemm::Parallelism::None);
                assert!(
                    one.iter().all(|v| v.is_finite()),
                    "case {i}: a value not written"
                );
                for t in [2, 3, 7] {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(t)
                        .build()
                        .unwrap();
                    let split = pool.install(|| run(rhs_t, gemm::Parallelism::Rayon(t)));
                    assert!(
                        one == split,
                        "case {i} ({rhs_t}): {t} threads differ from one"
                    );
                }
            }
        }
    }

    #[test]
    fn attention_on_a_fused_projection_matches_and_backprops() {
        for (i, &(b, s, h, nh, masked)) in [(8, 64, 384, 12, false), (3, 5, 8, 2, true)]
            .iter()
            .enumerate()
        {
            let qkv = Var::from_tensor(&rand(&[b, s, 3 * h], 600 + i as u64)).unwrap();
            let r = rand(&[b, s, h], 610 + i as u64);
            let (mv, mt) = padding_mask(b, s);
            let (mv, mt) = if masked {
                (Some(mv), Some(mt))
            } else {
                (None, None)
            };
            let parts = |t: &Tensor| {
                (
                    t.narrow(2, 0, h).unwrap(),
                    t.narrow(2, h, h).unwrap(),
                    t.narrow(2, 2 * h, h).unwrap(),
                )
            };
            let rows = qkv.reshape((b * s, 3 * h)).unwrap();
            let got = attention_qkv(&rows, b, nh, mv, true)
                .unwrap()
                .reshape((b, s, h))
                .unwrap();
            let (q, k, v) = parts(&qkv);
            let want = reference_attention(&q, &k, &v, nh, mt.as_ref());
            let d = max_diff(&got, &want);
            assert!(d < 2e-6, "case {i}: forward max diff {d}");
            let g = (got * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g_ref = (want * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let d = max_diff(g.get(&qkv).unwrap(), g_ref.get(&qkv).unwrap());
            assert!(d < 1e-5, "case {i}: dqkv max diff {d}");
        }
    }

    #[test]
    fn lora_linear_matches_generic_ops_and_gradients() {
        // (N, in, H, blocks as (slot, rank)): LoRA r=8 on query and value of MiniLM, and an odd case
        // with different ranks on all three.
        for (i, (n, inp, h, slots)) in [
            (512, 384, 384, vec![(0usize, 8usize), (2, 8)]),
            (7, 5, 3, vec![(0, 2), (1, 1), (2, 3)]),
        ]
        .into_iter()
        .enumerate()
        {
            let seed = 700 + i as u64 * 20;
            let x = Var::from_tensor(&rand(&[n, inp], seed)).unwrap();
            let w = rand(&[3 * h, inp], seed + 1);
            let bias = rand(&[3 * h], seed + 2);
            let gy = rand(&[n, 3 * h], seed + 3);
            let mut a_parts = Vec::new();
            let mut b_parts = Vec::new();
            let mut blocks = Vec::new();
            let mut r0 = 0;
            for (j, &(slot, r)) in slots.iter().enumerate() {
                let sd = seed + 4 + 2 * j as u64;
                a_parts.push(Var::from_tensor(&rand(&[r, inp], sd)).unwrap());
                b_parts.push(Var::from_tensor(&rand(&[h, r], sd + 1)).unwrap());
                let scale = 0.5 + j as f32;
                blocks.push(LoraBlock {
                    col: slot * h,
                    r0,
                    r,
                    scale,
                });
                r0 += r;
            }
            let a = Tensor::cat(
                &a_parts.iter().map(|v| v.as_tensor()).collect::<Vec<_>>(),
                0,
            )
            .unwrap();
            let bm = Tensor::cat(
                &b_parts.iter().map(|v| v.as_tensor()).collect::<Vec<_>>(),
                1,
            )
            .unwrap();
            let got = lora_linear(&x, &w, &bias, &a, &bm, blocks.clone(), true).unwrap();
            // Generic: base + per block scale * x A^T B^T into its columns.
            let mut cols: Vec<Tensor> = (0..3)
                .map(|j| {
                    x.matmul(&w.narrow(0, j * h, h).unwrap().t().unwrap())
                        .unwrap()
                        .broadcast_add(&bias.narrow(0, j * h, h).unwrap())
                        .unwrap()
                })
                .collect();
            for (j, &(slot, _)) in slots.iter().enumerate() {
                let d = x
                    .matmul(&a_parts[j].t().unwrap())
                    .unwrap()
                    .matmul(&b_parts[j].t().unwrap())
                    .unwrap();
                cols[slot] = (&cols[slot] + (d * blocks[j].scale as f64).unwrap()).unwrap();
            }
            let want = Tensor::cat(&cols, 1).unwrap();
            let d = max_diff(&got, &want);
            assert!(d < 1e-4, "case {i}: forward max diff {d}");
            let g = (got * &gy).unwrap().sum_all().unwrap().backward().unwrap();
            let g_ref = (want * &gy).unwrap().sum_all().unwrap().backward().unwrap();
            let d = max_diff(g.get(&x).unwrap(), g_ref.get(&x).unwrap());
            assert!(d < 1e-3, "case {i}: dx max diff {d}");
            for j in 0..slots.len() {
                let da = max_diff(g.get(&a_parts[j]).unwrap(), g_ref.get(&a_parts[j]).unwrap());
                let db = max_diff(g.get(&b_parts[j]).unwrap(), g_ref.get(&b_parts[j]).unwrap());
                assert!(
                    da < 1e-2 && db < 1e-2,
                    "case {i} block {j}: dA {da} dB {db}"
                );
            }
        }
    }

    fn reference_layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Tensor {
        let h = x.dim(D::Minus1).unwrap() as f64;
        let mean = (x.sum_keepdim(D::Minus1).unwrap() / h).unwrap();
        let xc = x.broadcast_sub(&mean).unwrap();
        let var = (xc.sqr().unwrap().sum_keepdim(D::Minus1).unwrap() / h).unwrap();
        let xn = xc
            .broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
            .unwrap();
        xn.broadcast_mul(w).unwrap().broadcast_add(b).unwrap()
    }

    #[test]
    fn layer_norm_matches_candle_and_its_gradients() {
        for (i, &(n, h)) in [(512, 384), (3, 7), (2048, 384), (130, 8), (70, 37)]
            .iter()
            .enumerate()
        {
            let s = 300 + i as u64 * 10;
            let x = Var::from_tensor(&((rand(&[n, h], s) * 3.0).unwrap() + 0.5).unwrap()).unwrap();
            let r = Var::from_tensor(&rand(&[n, h], s + 4)).unwrap();
            let w = rand(&[h], s + 1);
            let b = Var::from_tensor(&rand(&[h], s + 2)).unwrap();
            let gy = rand(&[n, h], s + 3);
            let eps = 1e-12;
            let fused = candle_nn::ops::layer_norm(&x, &w, &b, eps as f32).unwrap();
            let got = layer_norm(&x, &w, &b, eps, true).unwrap();
            let d = max_diff(&got, &fused);
            assert!(d < 1e-5, "case {i}: forward vs candle_nn max diff {d}");
            let want = reference_layer_norm(&x, &w, &b, eps);
            let g = (got * &gy).unwrap().sum_all().unwrap().backward().unwrap();
            let g_ref = (want * &gy).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, t, tol) in [("x", &x, 1e-4), ("b", &b, 1e-3)] {
                let d = max_diff(g.get(t).unwrap(), g_ref.get(t).unwrap());
                assert!(d < tol, "case {i}: d{name} max diff {d}");
            }
            // The residual form: layer_norm(x + r).
            let got = add_layer_norm(&x, &r, &w, &b, eps, true).unwrap();
            let want = reference_layer_norm(&(x.as_tensor() + r.as_tensor()).unwrap(), &w, &b, eps);
            let d = max_diff(&got, &want);
            assert!(d < 1e-5, "case {i}: add-layer-norm forward max diff {d}");
            let g = (got * &gy).unwrap().sum_all().unwrap().backward().unwrap();
            let g_ref = (want * &gy).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, t, tol) in [("x", &x, 1e-4), ("r", &r, 1e-4), ("b", &b, 1e-3)] {
                let d = max_diff(g.get(t).unwrap(), g_ref.get(t).unwrap());
                assert!(d < tol, "case {i}: add-layer-norm d{name} max diff {d}");
            }
        }
        // (B, S, H) input keeps its shape.
        let x = rand(&[2, 3, 8], 9);
        let (w, b) = (rand(&[8], 10), rand(&[8], 11));
        let y = layer_norm(&x, &w, &b, 1e-5, false).unwrap();
        assert_eq!(y.dims(), &[2, 3, 8]);
    }

    #[test]
    fn gelu_matches_candle_and_finite_differences() {
        for (i, &n) in [1usize, 17, 512 * 1536, 100_003].iter().enumerate() {
            let x = Var::from_tensor(&(rand(&[n], 400 + i as u64) * 6.0).unwrap()).unwrap();
            let got = gelu_erf(&x, true).unwrap();
            let d = max_diff(&got, &x.gelu_erf().unwrap());
            assert!(d < 1e-6, "n {n}: forward max diff {d}");
            let g = got.sum_all().unwrap().backward().unwrap();
            let dx = g.get(&x).unwrap().to_vec1::<f32>().unwrap();
            let xs = x.to_vec1::<f32>().unwrap();
            let f = |v: f64| {
                0.5 * v * (1.0 + erf_parts((v / std::f64::consts::SQRT_2) as f32).0 as f64)
            };
            for (j, (&v, &gd)) in xs.iter().zip(&dx).enumerate().step_by(97) {
                let e = 1e-3;
                let fd = (f(v as f64 + e) - f(v as f64 - e)) / (2.0 * e);
                assert!((fd - gd as f64).abs() < 1e-3, "n {n} at {j}: {gd} vs {fd}");
            }
        }
    }

    #[test]
    fn kernels_are_deterministic_across_thread_counts() {
        let run = || {
            let x = Var::from_tensor(&rand(&[300, 24], 500)).unwrap();
            let w = rand(&[24], 501);
            let b = Var::from_tensor(&rand(&[24], 502)).unwrap();
            let y = layer_norm(&x, &w, &b, 1e-12, true).unwrap();
            let g = (y * rand(&[300, 24], 503))
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            g.get(&b).unwrap().to_vec1::<f32>().unwrap()
        };
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(run);
        let three = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap()
            .install(run);
        assert_eq!(one, three);
    }
}
