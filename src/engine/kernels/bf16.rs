//! Reduced-precision products for frozen weights: bf16 operands, exact products, f32 sums.
//!
//! With [`crate::engine::MatmulPrecision::Bf16`] an encoder's frozen linear layers multiply in bf16:
//! each weight is rounded to bf16 once, when the model loads ([`register`] gives it a twin,
//! [`Bf16Weight`]), and each input is rounded when the layer runs. The product of two bf16 numbers is
//! exact in f32 and the sums are f32, so the only loss is the operands' rounding (8 significant bits:
//! a relative error of at most 2^-9 each).
//!
//! - On a CPU with AVX512-BF16 ([`native`]) the twin is packed for [`gemm`], a kernel of `vdpbf16ps`
//!   instructions (32 products each, twice an f32 FMA's 16).
//! - Elsewhere the twin holds the rounded weight as f32, and the f32 linear layer
//!   ([`super::Linear`]) multiplies it with inputs rounded the same way. The same products and f32 sums (in another order), at f32
//!   speed: the option then changes the numbers, not the speed.
//!
//! Layout of the packed form: the right operand B (k x n) is stored in panels of [`NR`] columns; in a
//! panel, each pair of rows (2p, 2p + 1) is [`NR`] `u32`s, column j's two bf16 values (row 2p in the
//! low half), which is the operand `vdpbf16ps` multiplies a broadcast pair of the left operand's row
//! with. An odd k is padded with a zero row. The left operand's rows are rounded into the same pairs
//! ([`pack_rows`]).
//!
//! Every output element is computed by one tile (or one GEMM call) in a fixed order: results do not
//! depend on the number of threads, so training stays bit-deterministic at this precision on a given
//! CPU.
//!
//! The [`super::Linear`] op looks a weight's twin up by the weight's tensor id ([`twin`]) and, when it
//! has one, multiplies with it instead of the f32 weight; the model keeps its twins alive.

use candle_core::{Tensor, TensorId};
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};

/// Columns of a packed panel: four 16-lane vectors.
pub(crate) const NR: usize = 64;
/// Rows of a tile: 6 x 4 accumulators, plus 4 operand vectors and a broadcast, fit AVX-512's 32
/// registers.
const MR: usize = 6;
/// Rows per task: a task's left rows (at most `MC * k / 2` u32) stay in the core's L2 cache while it
/// runs over the panels.
const MC: usize = 96;

/// `x` rounded to bf16 as AVX512-BF16's conversion does: to nearest, ties to even; a denormal to zero
/// of its sign; a NaN kept a (quiet) NaN. Branch-free, so loops over it vectorise.
#[inline(always)]
pub(crate) fn bf16_bits(x: f32) -> u32 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    let nan = (b & 0x7fff_ffff) > 0x7f80_0000;
    let denormal = (b & 0x7f80_0000) == 0;
    let v = if denormal {
        (b >> 16) & 0x8000
    } else {
        rounded
    };
    if nan {
        (b >> 16) | 0x40
    } else {
        v
    }
}

/// The f32 value of bf16 bits.
#[inline(always)]
pub(crate) fn bf16_value(bits: u32) -> f32 {
    f32::from_bits(bits << 16)
}

/// The right operand B (k x n) of [`gemm`], rounded to bf16 and packed in panels of [`NR`] columns.
#[derive(Debug)]
pub(crate) struct PackedB {
    n: usize,
    /// Pairs of rows: `ceil(k / 2)`.
    kp: usize,
    data: Vec<u32>,
}

impl PackedB {
    /// Pack B, whose element (i, j) is `src[i * rs + j * cs]`.
    ///
    /// # Panics
    /// If an element lies outside `src` (callers pass a weight's own shape and strides).
    pub(crate) fn pack(src: &[f32], k: usize, n: usize, rs: usize, cs: usize) -> PackedB {
        let kp = k.div_ceil(2);
        let panels = n.div_ceil(NR);
        let mut data = vec![0u32; panels * kp * NR];
        if k > 0 && n > 0 {
            assert!(
                (k - 1) * rs + (n - 1) * cs < src.len(),
                "PackedB::pack: B outside its buffer"
            );
        }
        data.par_chunks_mut(kp * NR)
            .enumerate()
            .for_each(|(panel, out)| {
                let j0 = panel * NR;
                let cols = (n - j0).min(NR);
                for p in 0..kp {
                    let row = &mut out[p * NR..p * NR + cols];
                    for (jj, d) in row.iter_mut().enumerate() {
                        let j = j0 + jj;
                        let lo = bf16_bits(src[2 * p * rs + j * cs]);
                        let hi = if 2 * p + 1 < k {
                            bf16_bits(src[(2 * p + 1) * rs + j * cs])
                        } else {
                            0
                        };
                        *d = lo | (hi << 16);
                    }
                }
            });
        PackedB { n, kp, data }
    }

    /// The bf16 bits of element (i, j).
    fn bits(&self, i: usize, j: usize) -> u32 {
        let pair = self.panel(j)[i / 2 * NR + j % NR];
        if i.is_multiple_of(2) {
            pair & 0xffff
        } else {
            pair >> 16
        }
    }

    /// The panel holding column `j0`.
    fn panel(&self, j0: usize) -> &[u32] {
        let i = j0 / NR * self.kp * NR;
        &self.data[i..i + self.kp * NR]
    }
}

/// Rows of A (`rows` x `k`, row `i` at `a[i * lda..]`) rounded to bf16 pairs, `ceil(k / 2)` `u32`s a
/// row (an odd k padded with a zero).
pub(crate) fn pack_rows(a: &[f32], rows: usize, k: usize, lda: usize) -> Vec<u32> {
    let kp = k.div_ceil(2);
    let mut out = vec![0u32; rows * kp];
    if kp == 0 {
        return out;
    }
    let per = (super::PAR_CHUNK / kp).max(1);
    out.par_chunks_mut(per * kp)
        .enumerate()
        .for_each(|(c, chunk)| {
            for (r, row) in chunk.chunks_exact_mut(kp).enumerate() {
                let i = c * per + r;
                pack_row(row, &a[i * lda..i * lda + k]);
            }
        });
    out
}

multiversion! {
    /// One row of [`pack_rows`].
    fn pack_row(row: &mut [u32], a: &[f32]) {
        let mut pairs = a.chunks_exact(2);
        for (d, p) in row.iter_mut().zip(&mut pairs) {
            *d = bf16_bits(p[0]) | (bf16_bits(p[1]) << 16);
        }
        if let [last] = pairs.remainder() {
            row[a.len() / 2] = bf16_bits(*last);
        }
    }
}

/// A frozen weight W (out, in) rounded to bf16, in the form this CPU multiplies it fastest.
#[derive(Debug)]
pub(crate) struct Bf16Weight {
    pub(crate) out: usize,
    pub(crate) inp: usize,
    form: Form,
}

#[derive(Debug)]
enum Form {
    /// Packed for [`gemm`] (AVX512-BF16): B = W^T (in x out) for `x W^T`, and B = W (out x in) for
    /// `dY W`, packed on first use from the same rounded values.
    Packed { nt: PackedB, nn: OnceLock<PackedB> },
    /// The rounded values as f32, row-major (out, in), for the f32 GEMM.
    Rounded(Vec<f32>),
}

impl Bf16Weight {
    /// W's twin for this CPU.
    fn new(w: &[f32], out: usize, inp: usize) -> Bf16Weight {
        Bf16Weight::new_as(w, out, inp, native())
    }

    /// W's twin packed for [`gemm`] (`packed`: only on a CPU with AVX512-BF16) or rounded for the f32
    /// GEMM.
    fn new_as(w: &[f32], out: usize, inp: usize, packed: bool) -> Bf16Weight {
        let form = if packed {
            Form::Packed {
                nt: PackedB::pack(w, inp, out, 1, inp),
                nn: OnceLock::new(),
            }
        } else {
            Form::Rounded(rounded(w))
        };
        Bf16Weight { out, inp, form }
    }

    /// The rounded form's weight (out, in) as f32, which the f32 linear layer multiplies rounded
    /// inputs with; `None` for the packed form.
    pub(crate) fn rounded(&self) -> Option<&[f32]> {
        match &self.form {
            Form::Rounded(w) => Some(w),
            Form::Packed { .. } => None,
        }
    }

    /// The packed form's `bias + x W^T` for the `n` rows of `x` (n, in): (n, out); `None` for the
    /// rounded form ([`Bf16Weight::rounded`]).
    pub(crate) fn packed_forward(&self, x: &[f32], n: usize, bias: &[f32]) -> Option<Vec<f32>> {
        let Form::Packed { nt, .. } = &self.form else {
            return None;
        };
        let (out, inp) = (self.out, self.inp);
        debug_assert!(x.len() == n * inp && bias.len() == out);
        let rows = pack_rows(x, n, inp, inp);
        let par = n * out * inp >= 1 << 20;
        // SAFETY: a packed twin exists only on a CPU with AVX512-BF16; the GEMM sets all n x out
        // elements.
        Some(unsafe { super::written_by(n * out, |y| gemm(y, out, &rows, n, nt, Some(bias), par)) })
    }

    /// The packed form's `dY W` for the `n` rows of `g` (n, out): (n, in); `None` for the rounded
    /// form.
    pub(crate) fn packed_input_grad(&self, g: &[f32], n: usize) -> Option<Vec<f32>> {
        let Form::Packed { nt, nn } = &self.form else {
            return None;
        };
        let (out, inp) = (self.out, self.inp);
        debug_assert!(g.len() == n * out);
        let nn = nn.get_or_init(|| {
            // W's rounded values, unpacked from the forward packing (rounding them again is exact).
            let mut w = vec![0f32; out * inp];
            for (j, row) in w.chunks_exact_mut(inp.max(1)).enumerate() {
                for (i, v) in row.iter_mut().enumerate() {
                    *v = bf16_value(nt.bits(i, j));
                }
            }
            PackedB::pack(&w, out, inp, inp, 1)
        });
        let rows = pack_rows(g, n, out, out);
        let par = n * out * inp >= 1 << 20;
        // SAFETY: as in `packed_forward`; the GEMM sets all n x in elements.
        Some(unsafe { super::written_by(n * inp, |dx| gemm(dx, inp, &rows, n, nn, None, par)) })
    }
}

/// `v`'s elements rounded to bf16, as f32.
pub(crate) fn rounded(v: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; v.len()];
    out.par_chunks_mut(super::PAR_CHUNK)
        .zip(v.par_chunks(super::PAR_CHUNK))
        .for_each(|(o, v)| round_into(o, v));
    out
}

multiversion! {
    /// `o[i]` = `v[i]` rounded to bf16.
    fn round_into(o: &mut [f32], v: &[f32]) {
        for (o, v) in o.iter_mut().zip(v) {
            *o = bf16_value(bf16_bits(*v));
        }
    }
}

type Registry = Mutex<HashMap<TensorId, Weak<Bf16Weight>>>;

fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Give the frozen weight `w` (out, in), f32 on the CPU, a packed bf16 twin that [`super::linear`]
/// and the ops built on it multiply with from now on. The twin lives as long as the returned `Arc`
/// (the model keeps it); entries of dropped twins are pruned here.
pub(crate) fn register(w: &Tensor) -> candle_core::Result<Arc<Bf16Weight>> {
    let (out, inp) = w.dims2()?;
    let data = w
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let twin = Arc::new(Bf16Weight::new(&data, out, inp));
    let mut r = registry().lock().map_err(|_| super::poisoned())?;
    r.retain(|_, t| t.strong_count() > 0);
    r.insert(w.id(), Arc::downgrade(&twin));
    Ok(twin)
}

/// The bf16 twin of `w`, if [`register`] gave it one that is still alive.
pub(crate) fn twin(w: &Tensor) -> Option<Arc<Bf16Weight>> {
    let r = registry().lock().ok()?;
    r.get(&w.id()).and_then(Weak::upgrade)
}

/// Whether this CPU runs the bf16 products natively (AVX512-BF16).
pub fn native() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512bf16")
            && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `C = init + A B` for A (`m` x k, rounded into pairs by [`pack_rows`]) and the packed B: C is
/// row-major with `ldc` elements per row; `init` is a row added to every row of C (a bias, `b.n`
/// long) or none (zeros). Parallel over tasks of up to [`MC`] rows by groups of panels, on rayon's
/// pool when `parallel`.
///
/// # Safety
/// The CPU must have AVX512-F and AVX512-BF16 ([`native`]); `c` must hold `m` rows of `ldc >= b.n`
/// elements, not overlapping `a`, `b` or `init`.
pub(crate) unsafe fn gemm(
    c: *mut f32,
    ldc: usize,
    a: &[u32],
    m: usize,
    b: &PackedB,
    init: Option<&[f32]>,
    parallel: bool,
) {
    let (n, kp) = (b.n, b.kp);
    debug_assert!(a.len() >= m * kp && ldc >= n);
    debug_assert!(init.is_none_or(|i| i.len() >= n));
    if m == 0 || n == 0 {
        return;
    }
    let panels = n.div_ceil(NR);
    let row_tasks = m.div_ceil(MC);
    let threads = if parallel {
        rayon::current_num_threads().max(1)
    } else {
        1
    };
    // Enough tasks for every thread several times over, splitting the panels only when the rows
    // alone do not give them.
    let groups = if row_tasks >= 2 * threads {
        1
    } else {
        panels.min((2 * threads).div_ceil(row_tasks))
    };
    let per_group = panels.div_ceil(groups);
    let cp = super::SendPtr(c);
    let run = |t: usize| {
        let (rt, g) = (t / groups, t % groups);
        let (r0, r1) = (rt * MC, ((rt + 1) * MC).min(m));
        let (p0, p1) = (g * per_group, ((g + 1) * per_group).min(panels));
        for p in p0..p1 {
            let j0 = p * NR;
            let cols = (n - j0).min(NR);
            let panel = b.panel(j0);
            let bias = init.map(|i| &i[j0..j0 + cols]);
            let mut r = r0;
            while r < r1 {
                let rows = (r1 - r).min(MR);
                let ar = &a[r * kp..(r + rows) * kp];
                let cr = cp.at(r * ldc + j0);
                // SAFETY: the CPU's features are the caller's contract; rows r..r + rows, columns
                // j0..j0 + cols of C lie inside it and are written by this task alone.
                unsafe { tile(rows, kp, ar, panel, cr, ldc, cols, bias) };
                r += rows;
            }
        }
    };
    let tasks = row_tasks * groups;
    if threads > 1 && tasks > 1 {
        (0..tasks).into_par_iter().for_each(run);
    } else {
        (0..tasks).for_each(run);
    }
}

/// One tile: `rows` (<= [`MR`]) rows of A times one panel, into `cols` (<= [`NR`]) columns of C.
///
/// # Safety
/// As for [`gemm`]; `c` must hold `rows` rows of `ldc` elements, of which the first `cols` are written.
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    rows: usize,
    kp: usize,
    a: &[u32],
    panel: &[u32],
    c: *mut f32,
    ldc: usize,
    cols: usize,
    bias: Option<&[f32]>,
) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's contract.
    unsafe {
        match rows {
            6 => x86::tile::<6>(kp, a, panel, c, ldc, cols, bias),
            5 => x86::tile::<5>(kp, a, panel, c, ldc, cols, bias),
            4 => x86::tile::<4>(kp, a, panel, c, ldc, cols, bias),
            3 => x86::tile::<3>(kp, a, panel, c, ldc, cols, bias),
            2 => x86::tile::<2>(kp, a, panel, c, ldc, cols, bias),
            _ => x86::tile::<1>(kp, a, panel, c, ldc, cols, bias),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        // Unreachable: `native` is false off x86-64, so no twin is packed.
        let _ = (rows, kp, a, panel, c, ldc, cols, bias);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::NR;
    use std::arch::x86_64::*;

    /// The AVX512-BF16 tile: `M` rows x four 16-lane vectors of accumulators, one `vdpbf16ps` per
    /// row, vector and pair of k. Sums start at zero and the bias joins last.
    ///
    /// # Safety
    /// The CPU must have AVX512-F and AVX512-BF16; `c` as for [`super::tile`].
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn tile<const M: usize>(
        kp: usize,
        a: &[u32],
        panel: &[u32],
        c: *mut f32,
        ldc: usize,
        cols: usize,
        bias: Option<&[f32]>,
    ) {
        debug_assert!(a.len() >= M * kp && panel.len() >= kp * NR);
        let mut acc = [[_mm512_setzero_ps(); 4]; M];
        let ap = a.as_ptr();
        let bp = panel.as_ptr();
        for p in 0..kp {
            // SAFETY: pair p of the panel's NR columns and of the tile's M rows (asserted above).
            unsafe {
                let b: [__m512bh; 4] = std::array::from_fn(|q| {
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                        bp.add(p * NR + 16 * q) as *const __m512i,
                    ))
                });
                for (r, acc) in acc.iter_mut().enumerate() {
                    let pair = *ap.add(r * kp + p) as i32;
                    let av = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(pair));
                    for q in 0..4 {
                        acc[q] = _mm512_dpbf16_ps(acc[q], av, b[q]);
                    }
                }
            }
        }
        for q in 0..4 {
            let left = cols.saturating_sub(16 * q).min(16);
            if left == 0 {
                break;
            }
            let mask: __mmask16 = if left == 16 {
                0xffff
            } else {
                (1u16 << left) - 1
            };
            // SAFETY: columns 16q..16q + left < cols of the bias and of each row of the tile.
            unsafe {
                let init = match bias {
                    Some(b) => _mm512_maskz_loadu_ps(mask, b.as_ptr().add(16 * q)),
                    None => _mm512_setzero_ps(),
                };
                for (r, acc) in acc.iter().enumerate() {
                    _mm512_mask_storeu_ps(
                        c.add(r * ldc + 16 * q),
                        mask,
                        _mm512_add_ps(init, acc[q]),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn round(x: f32) -> f64 {
        bf16_value(bf16_bits(x)) as f64
    }

    #[test]
    fn rounding_is_to_nearest_even_with_denormals_flushed_and_nan_kept() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to the even (1.0).
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: ties to the even (1 + 2^-6).
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(bf16_bits(1.0 + 1.0 / 200.0), 0x3f81);
        assert_eq!(bf16_bits(-2.5), half::bf16::from_f32(-2.5).to_bits() as u32);
        assert_eq!(bf16_bits(f32::from_bits(1)), 0);
        assert_eq!(bf16_bits(-f32::from_bits(1)), 0x8000);
        assert_eq!(bf16_bits(f32::INFINITY), 0x7f80);
        assert_eq!(bf16_bits(f32::MAX), 0x7f80, "rounds up to infinity");
        assert!(bf16_value(bf16_bits(f32::NAN)).is_nan());
        // Normal values round as the `half` crate does.
        for x in data(10_000, 3) {
            let x = x * 1e3;
            assert_eq!(
                bf16_bits(x),
                half::bf16::from_f32(x).to_bits() as u32,
                "{x}"
            );
        }
    }

    /// The product of the bf16-rounded operands in f64, `init` added.
    fn reference(
        a: &[f32],
        m: usize,
        k: usize,
        b: &[f32],
        n: usize,
        init: Option<&[f32]>,
    ) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = init.map_or(0.0, |v| v[j] as f64);
                for t in 0..k {
                    s += round(a[i * k + t]) * round(b[t * n + j]);
                }
                c[i * n + j] = s;
            }
        }
        c
    }

    #[test]
    fn the_product_is_that_of_the_rounded_operands_at_every_edge() {
        if no_bf16_instructions() {
            return;
        }
        // Odd k, rows not a multiple of the tile, columns not a multiple of the panel, and enough
        // rows for several tasks.
        for &(m, k, n) in &[
            (1, 1, 1),
            (7, 5, 3),
            (13, 33, 65),
            (200, 64, 130),
            (5, 384, 64),
        ] {
            let a = data(m * k, 1 + m as u64);
            let b = data(k * n, 2 + n as u64);
            let bias = data(n, 9);
            let packed = PackedB::pack(&b, k, n, n, 1);
            let rows = pack_rows(&a, m, k, k);
            for (init, par) in [(None, false), (Some(&bias[..]), true)] {
                let ldc = n + 3;
                let mut c = vec![f32::NAN; m * ldc];
                // SAFETY: c holds m rows of ldc >= n.
                unsafe { gemm(c.as_mut_ptr(), ldc, &rows, m, &packed, init, par) };
                let want = reference(&a, m, k, &b, n, init);
                for i in 0..m {
                    for j in 0..n {
                        let (got, w) = (c[i * ldc + j] as f64, want[i * n + j]);
                        // f32 sums of k exact products: k roundings of at most 2^-24 of a
                        // partial sum each.
                        assert!(
                            (got - w).abs() <= 1e-6 * (k as f64 + 1.0),
                            "({m},{k},{n}) [{i},{j}]: {got} vs {w}"
                        );
                    }
                    assert!(
                        c[i * ldc + n..(i + 1) * ldc].iter().all(|v| v.is_nan()),
                        "wrote past the columns"
                    );
                }
            }
        }
    }

    #[test]
    fn a_transposed_packing_multiplies_by_the_transpose() {
        if no_bf16_instructions() {
            return;
        }
        let (m, k, n) = (9, 20, 70);
        let a = data(m * k, 4);
        let w = data(n * k, 5); // (n, k): B = W^T
        let packed = PackedB::pack(&w, k, n, 1, k);
        let mut wt = vec![0f32; k * n];
        for j in 0..n {
            for t in 0..k {
                wt[t * n + j] = w[j * k + t];
            }
        }
        let direct = PackedB::pack(&wt, k, n, n, 1);
        assert_eq!(packed.data, direct.data);
        let rows = pack_rows(&a, m, k, k);
        let mut c = vec![0f32; m * n];
        // SAFETY: c holds m rows of n.
        unsafe { gemm(c.as_mut_ptr(), n, &rows, m, &packed, None, true) };
        let want = reference(&a, m, k, &wt, n, None);
        for (g, w) in c.iter().zip(&want) {
            assert!((*g as f64 - w).abs() < 1e-5);
        }
    }

    /// Tests of the kernel itself run only where its instructions do.
    fn no_bf16_instructions() -> bool {
        if !native() {
            eprintln!(
                "skipped: this CPU has no AVX512-BF16, so no weight is packed for the kernel"
            );
        }
        !native()
    }

    #[test]
    fn both_forms_multiply_both_ways_with_the_same_rounded_values() {
        // Through the linear layer that uses them, with few rows (its few-row path) and more.
        let (out, inp) = (70, 33);
        let w = data(out * inp, 10);
        let bias = data(out, 13);
        let mut wt = vec![0f32; inp * out];
        for j in 0..out {
            for i in 0..inp {
                wt[i * out + j] = w[j * inp + i];
            }
        }
        let wten = Tensor::from_vec(w.clone(), (out, inp), &candle_core::Device::Cpu).unwrap();
        let forms = if native() {
            &[true, false][..]
        } else {
            &[false][..]
        };
        for &packed in forms {
            let linear = super::super::Linear {
                twin: Some(Arc::new(Bf16Weight::new_as(&w, out, inp, packed))),
                ..super::super::Linear::plain(wten.clone())
            };
            for m in [8, 40] {
                let x = data(m * inp, 11);
                let g = data(m * out, 12);
                let (y, _) = linear.forward(&x, &bias, m, inp).unwrap();
                let dx = linear.input_grad(&g, m, out).unwrap();
                let want_y = reference(&x, m, inp, &wt, out, Some(&bias));
                let want_dx = reference(&g, m, out, &w, inp, None);
                for (got, want) in y.iter().zip(&want_y).chain(dx.iter().zip(&want_dx)) {
                    assert!(
                        (*got as f64 - want).abs() < 1e-5,
                        "packed {packed}, {m} rows: {got} vs {want}"
                    );
                }
            }
            if let Some(t) = &linear.twin {
                if let Form::Packed { nt, nn } = &t.form {
                    assert_eq!(nt.data, PackedB::pack(&wt, inp, out, out, 1).data);
                    assert_eq!(
                        nn.get().unwrap().data,
                        PackedB::pack(&w, out, inp, inp, 1).data
                    );
                }
            }
        }
    }

    #[test]
    fn results_do_not_depend_on_threads() {
        if no_bf16_instructions() {
            return;
        }
        let (m, k, n) = (300, 96, 200);
        let a = data(m * k, 6);
        let b = data(k * n, 7);
        let packed = PackedB::pack(&b, k, n, n, 1);
        let rows = pack_rows(&a, m, k, k);
        let run = |par: bool| {
            let mut c = vec![0f32; m * n];
            // SAFETY: c holds m rows of n.
            unsafe { gemm(c.as_mut_ptr(), n, &rows, m, &packed, None, par) };
            c
        };
        let one = run(false);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        assert_eq!(one, pool.install(|| run(true)));
    }

    #[test]
    fn a_registered_twin_lives_as_long_as_its_owner_keeps_it() {
        let w = Tensor::from_vec(data(12, 8), (3, 4), &candle_core::Device::Cpu).unwrap();
        assert!(twin(&w).is_none());
        let t = register(&w).unwrap();
        assert_eq!((t.out, t.inp), (3, 4));
        assert!(twin(&w).is_some());
        assert!(twin(&w.clone()).is_some(), "a clone is the same tensor");
        assert!(
            twin(&(&w * 1.0).unwrap()).is_none(),
            "another tensor has none"
        );
        drop(t);
        assert!(twin(&w).is_none());
    }
}
