//! CPU kernels with hand-written backward passes for the operations that dominate a training step: linear layers,
//! norms, softmax and bias adds (convolutions: `model::fused_conv`; attention: `model::fused_attention`).
//!
//! Candle's composed group norm is about ten tensor ops forward and twenty backward, each a full pass over the
//! activations, several of them broadcast reductions; these kernels make one pass each way. They take contiguous
//! f32 tensors on the CPU;
//! `model::nn` decides when they apply and falls back to candle's composed ops otherwise.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::model::fused_attention::{Threads, matmul};
use crate::model::simd;

pub(crate) fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> Result<&'a [f32]> {
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg(format!("{what}: the operand must be contiguous"))
    })?;
    Ok(&storage.as_slice::<f32>()?[start..end])
}

/// Runs `f` on the elements of a CPU f32 tensor in place (copied first only when the tensor is not contiguous):
/// backward passes read weights and gradients this way instead of copying them into a new vector.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(cpu) => Ok(f(contiguous_f32(cpu, layout, "operand")?)),
        _ => candle_core::bail!("fused kernels: expected a CPU tensor"),
    }
}

/// Normalises rows of `row_len` consecutive elements to zero mean and unit variance, then applies a per-weight
/// affine map. Row `r`'s element `j` uses weight `((r % rows_per_sample) * row_len + j) / per_weight`:
/// a layer norm is rows of the last axis (`rows_per_sample` 1, `per_weight` 1); a group norm over (N, C, H, W)
/// is one row per (sample, group) (`rows_per_sample` = groups, `per_weight` = H * W).
#[derive(Clone, Copy, Debug)]
struct Normalize {
    row_len: usize,
    rows_per_sample: usize,
    per_weight: usize,
    eps: f32,
}

impl Normalize {
    /// Weights used by one row, and the index of the first.
    fn weights_per_row(&self) -> usize {
        self.row_len / self.per_weight
    }

    fn weight_count(&self) -> usize {
        self.rows_per_sample * self.weights_per_row()
    }

    fn first_weight(&self, row: usize) -> usize {
        (row % self.rows_per_sample) * self.weights_per_row()
    }

    /// Mean and reciprocal standard deviation of a row (accumulated in f64: rows can hold thousands of values).
    fn moments(&self, row: &[f32]) -> (f32, f32) {
        let n = row.len() as f64;
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        (mean as f32, (1.0 / (var + self.eps as f64).sqrt()) as f32)
    }

    fn check(&self, x_len: usize, weight: &[f32], bias: &[f32]) -> Result<()> {
        if self.row_len == 0
            || !x_len.is_multiple_of(self.row_len)
            || !self.row_len.is_multiple_of(self.per_weight)
        {
            candle_core::bail!(
                "normalize: {x_len} elements do not split into rows of {} with {} per weight",
                self.row_len,
                self.per_weight
            );
        }
        let rows = x_len / self.row_len;
        if !rows.is_multiple_of(self.rows_per_sample) {
            candle_core::bail!(
                "normalize: {rows} rows do not split into samples of {}",
                self.rows_per_sample
            );
        }
        if weight.len() != self.weight_count() || bias.len() != self.weight_count() {
            candle_core::bail!(
                "normalize: expected {} weights and biases, got {} and {}",
                self.weight_count(),
                weight.len(),
                bias.len()
            );
        }
        Ok(())
    }
}

impl CustomOp3 for Normalize {
    fn name(&self) -> &'static str {
        "fused-normalize"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(xs, xs_layout, "normalize input")?;
        let w = contiguous_f32(weight, weight_layout, "normalize weight")?;
        let b = contiguous_f32(bias, bias_layout, "normalize bias")?;
        self.check(x.len(), w, b)?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(self.row_len)
            .zip(x.par_chunks(self.row_len))
            .enumerate()
            .for_each(|(r, (out, row))| {
                let (mean, rstd) = self.moments(row);
                let first = self.first_weight(r);
                for (j, (o, &v)) in out.iter_mut().zip(row).enumerate() {
                    let k = first + j / self.per_weight;
                    *o = (v - mean) * rstd * w[k] + b[k];
                }
            });
        Ok((CpuStorage::F32(out), xs_layout.shape().clone()))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let packed = xs.apply_op3_no_bwd(
            &weight.contiguous()?,
            &grad_res.contiguous()?,
            &NormalizeBackward(*self),
        )?;
        let n = xs.elem_count();
        let w = self.weight_count();
        let grad_xs = packed.narrow(0, 0, n)?.reshape(xs.shape())?;
        let grad_weight = packed.narrow(0, n, w)?.reshape(weight.shape())?;
        let grad_bias = packed.narrow(0, n + w, w)?.reshape(weight.shape())?;
        Ok((Some(grad_xs), Some(grad_weight), Some(grad_bias)))
    }
}

/// The three gradients of [`Normalize`] in one pass, packed as [input (all elements), weight, bias].
struct NormalizeBackward(Normalize);

impl CustomOp3 for NormalizeBackward {
    fn name(&self) -> &'static str {
        "fused-normalize-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.0;
        let x = contiguous_f32(xs, xs_layout, "normalize input")?;
        let w = contiguous_f32(weight, weight_layout, "normalize weight")?;
        let g = contiguous_f32(grad, grad_layout, "normalize gradient")?;
        op.check(x.len(), w, w)?;
        if g.len() != x.len() {
            candle_core::bail!(
                "normalize backward: gradient of {} for {} elements",
                g.len(),
                x.len()
            );
        }
        let per_row = op.weights_per_row();
        let mut grad_x = vec![0f32; x.len()];
        // Each row's contributions to its weights' gradients: [weight grads, bias grads], summed over samples below.
        let mut partial = vec![0f32; x.len() / op.row_len * 2 * per_row];
        grad_x
            .par_chunks_mut(op.row_len)
            .zip(partial.par_chunks_mut(2 * per_row))
            .zip(x.par_chunks(op.row_len).zip(g.par_chunks(op.row_len)))
            .enumerate()
            .for_each(|(r, ((dx, part), (row, gr)))| {
                let (mean, rstd) = op.moments(row);
                let first = op.first_weight(r);
                let (dw, db) = part.split_at_mut(per_row);
                let (mut sum_dxhat, mut sum_dxhat_xhat) = (0f64, 0f64);
                for (j, (&v, &gj)) in row.iter().zip(gr).enumerate() {
                    let xhat = (v - mean) * rstd;
                    let local = j / op.per_weight;
                    dw[local] += gj * xhat;
                    db[local] += gj;
                    let dxhat = gj * w[first + local];
                    sum_dxhat += dxhat as f64;
                    sum_dxhat_xhat += (dxhat * xhat) as f64;
                }
                let n = row.len() as f64;
                let (mean_dxhat, mean_dxhat_xhat) =
                    ((sum_dxhat / n) as f32, (sum_dxhat_xhat / n) as f32);
                for (j, ((d, &v), &gj)) in dx.iter_mut().zip(row).zip(gr).enumerate() {
                    let xhat = (v - mean) * rstd;
                    let dxhat = gj * w[first + j / op.per_weight];
                    *d = rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat);
                }
            });
        let weights = op.weight_count();
        let mut grad_w = vec![0f32; 2 * weights];
        for (r, part) in partial.chunks(2 * per_row).enumerate() {
            let first = op.first_weight(r);
            for k in 0..per_row {
                grad_w[first + k] += part[k];
                grad_w[weights + first + k] += part[per_row + k];
            }
        }
        grad_x.extend(grad_w);
        let len = grad_x.len();
        Ok((CpuStorage::F32(grad_x), Shape::from(len)))
    }
}

/// Layer norm over the last axis (contiguous f32 on the CPU; weight and bias of the last axis's size).
pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let op = Normalize {
        row_len: xs.dims().last().copied().unwrap_or(1),
        rows_per_sample: 1,
        per_weight: 1,
        eps: eps as f32,
    };
    xs.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)
}

/// Group norm over (N, C, ...) with per-channel weight and bias (contiguous f32 on the CPU).
pub fn group_norm(
    xs: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let dims = xs.dims();
    if dims.len() < 2 || groups == 0 || !dims[1].is_multiple_of(groups) {
        candle_core::bail!(
            "group norm: input of shape {dims:?} does not split into {groups} groups"
        );
    }
    let spatial: usize = dims[2..].iter().product();
    let op = Normalize {
        row_len: dims[1] / groups * spatial,
        rows_per_sample: groups,
        per_weight: spatial,
        eps: eps as f32,
    };
    xs.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)
}

/// Softmax over the last axis whose backward pass is one kernel: dx = y * (dy - sum(dy * y)).
struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, "softmax input")?;
        let len = layout.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(len)
            .zip(x.par_chunks(len))
            .for_each(|(out, row)| {
                out.copy_from_slice(row);
                simd::softmax_row(out, 1.0);
            });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _xs: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            grad_res
                .contiguous()?
                .apply_op2_no_bwd(&res.contiguous()?, &SoftmaxBackward)?,
        ))
    }
}

struct SoftmaxBackward;

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "fused-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        grad: &CpuStorage,
        grad_layout: &Layout,
        probs: &CpuStorage,
        probs_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = contiguous_f32(grad, grad_layout, "softmax gradient")?;
        let y = contiguous_f32(probs, probs_layout, "softmax output")?;
        if g.len() != y.len() {
            candle_core::bail!(
                "softmax backward: gradient of {} for {} elements",
                g.len(),
                y.len()
            );
        }
        let len = probs_layout
            .shape()
            .dims()
            .last()
            .copied()
            .unwrap_or(1)
            .max(1);
        let mut out = vec![0f32; y.len()];
        out.par_chunks_mut(len)
            .zip(g.par_chunks(len).zip(y.par_chunks(len)))
            .for_each(|(out, (g, y))| {
                let dot: f32 = g.iter().zip(y).map(|(a, b)| a * b).sum();
                for ((o, &gj), &yj) in out.iter_mut().zip(g).zip(y) {
                    *o = yj * (gj - dot);
                }
            });
        Ok((CpuStorage::F32(out), probs_layout.shape().clone()))
    }
}

/// Softmax over the last axis (contiguous f32 on the CPU), differentiable.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    xs.contiguous()?.apply_op1(Softmax)
}

/// SiLU `x * sigmoid(x)`; its backward is one pass (`sigmoid(x) (1 + x (1 - sigmoid(x)))`) instead of candle's
/// composition of six.
struct Silu;

impl CustomOp1 for Silu {
    fn name(&self) -> &'static str {
        "silu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, "silu input")?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(1 << 14)
            .zip(x.par_chunks(1 << 14))
            .for_each(|(o, x)| simd::silu(x, o));
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, xs: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(xs.apply_op2_no_bwd(
            &grad_res.contiguous()?,
            &SiluBackward,
        )?))
    }
}

struct SiluBackward;

impl CustomOp2 for SiluBackward {
    fn name(&self) -> &'static str {
        "silu-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(xs, xs_layout, "silu input")?;
        let g = contiguous_f32(grad, grad_layout, "silu gradient")?;
        if x.len() != g.len() {
            candle_core::bail!(
                "silu backward: gradient {:?} for input {:?}",
                grad_layout.dims(),
                xs_layout.dims()
            );
        }
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(1 << 14)
            .zip(x.par_chunks(1 << 14).zip(g.par_chunks(1 << 14)))
            .for_each(|(d, (x, g))| simd::silu_backward(x, g, d));
        Ok((CpuStorage::F32(dx), xs_layout.shape().clone()))
    }
}

/// SiLU (contiguous f32 on the CPU), differentiable.
pub fn silu(xs: &Tensor) -> Result<Tensor> {
    xs.contiguous()?.apply_op1(Silu)
}

/// GEGLU: the last axis split in halves (value, gate), output `value * gelu(gate)`. Candle composes it of two
/// strided views, an erf GELU and a product, and differentiates it into about a dozen full passes plus two
/// zero-padded copies of the input; this is one pass each way.
struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, "geglu input")?;
        let width = layout.dims().last().copied().unwrap_or(0);
        if width == 0 || !width.is_multiple_of(2) {
            candle_core::bail!("geglu: the last axis ({width}) must split in two halves");
        }
        let half = width / 2;
        let mut out = vec![0f32; x.len() / 2];
        out.par_chunks_mut(half)
            .zip(x.par_chunks(width))
            .for_each(|(o, row)| {
                let (value, gate) = row.split_at(half);
                simd::geglu_row(value, gate, o);
            });
        let mut dims = layout.dims().to_vec();
        *dims.last_mut().expect("rank >= 1") = half;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(&self, xs: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(xs.apply_op2_no_bwd(
            &grad_res.contiguous()?,
            &GegluBackward,
        )?))
    }
}

/// The input gradient of [`Geglu`]: `[grad * gelu(gate), grad * value * gelu'(gate)]` per row.
struct GegluBackward;

impl CustomOp2 for GegluBackward {
    fn name(&self) -> &'static str {
        "geglu-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(xs, xs_layout, "geglu input")?;
        let g = contiguous_f32(grad, grad_layout, "geglu gradient")?;
        let width = xs_layout.dims().last().copied().unwrap_or(0);
        let half = width / 2;
        if half == 0 || g.len() * 2 != x.len() {
            candle_core::bail!(
                "geglu backward: gradient {:?} for input {:?}",
                grad_layout.dims(),
                xs_layout.dims()
            );
        }
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(width)
            .zip(x.par_chunks(width).zip(g.par_chunks(half)))
            .for_each(|(d, (row, grad))| {
                let (d_value, d_gate) = d.split_at_mut(half);
                let (value, gate) = row.split_at(half);
                simd::geglu_row_backward(value, gate, grad, d_value, d_gate);
            });
        Ok((CpuStorage::F32(dx), xs_layout.shape().clone()))
    }
}

/// GEGLU over the last axis (contiguous f32 on the CPU), differentiable.
pub fn geglu(xs: &Tensor) -> Result<Tensor> {
    xs.contiguous()?.apply_op1(Geglu)
}

/// `xs + bias`, with `xs` viewed as (outer, bias length, inner) and the bias repeated along outer and inner.
/// Candle's broadcast add differentiates into a strided reduction and a gradient accumulation; here the input
/// gradient is the output gradient itself and the bias gradient one contiguous pass.
struct AddBias {
    inner: usize,
}

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "fused-add-bias"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(xs, xs_layout, "bias-add input")?;
        let b = contiguous_f32(bias, bias_layout, "bias")?;
        let slice = b.len() * self.inner;
        if slice == 0 || !x.len().is_multiple_of(slice) {
            candle_core::bail!(
                "bias add: {} elements are not a whole number of {} biases x {} positions",
                x.len(),
                b.len(),
                self.inner
            );
        }
        let mut out = x.to_vec();
        out.par_chunks_mut(slice).for_each(|chunk| {
            for (run, &bias) in chunk.chunks_mut(self.inner).zip(b.iter().cycle()) {
                run.iter_mut().for_each(|v| *v += bias);
            }
        });
        Ok((CpuStorage::F32(out), xs_layout.shape().clone()))
    }

    fn bwd(
        &self,
        _xs: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad_bias = if bias.track_op() {
            let sum = SumPerBias {
                bias_len: bias.elem_count(),
                inner: self.inner,
            };
            Some(
                grad_res
                    .contiguous()?
                    .apply_op1_no_bwd(&sum)?
                    .reshape(bias.shape())?,
            )
        } else {
            None
        };
        Ok((Some(grad_res.clone()), grad_bias))
    }
}

/// The bias gradient of [`AddBias`]: the output gradient summed over everything but the bias axis.
struct SumPerBias {
    bias_len: usize,
    inner: usize,
}

impl CustomOp1 for SumPerBias {
    fn name(&self) -> &'static str {
        "fused-sum-per-bias"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = contiguous_f32(storage, layout, "bias-add gradient")?;
        let mut sums = vec![0f64; self.bias_len];
        if self.inner == 1 {
            for row in g.chunks(self.bias_len) {
                sums.iter_mut().zip(row).for_each(|(s, &v)| *s += v as f64);
            }
        } else {
            for (i, run) in g.chunks(self.inner).enumerate() {
                sums[i % self.bias_len] += run.iter().map(|&v| v as f64).sum::<f64>();
            }
        }
        Ok((
            CpuStorage::F32(sums.into_iter().map(|v| v as f32).collect()),
            Shape::from(self.bias_len),
        ))
    }
}

/// `xs + bias` with `xs` viewed as (outer, bias elements, inner): `inner` 1 adds a bias to the last axis, `inner`
/// H * W adds a per-channel bias to (N, C, H, W), and a (N, C) bias with `inner` H * W adds per sample and channel.
/// Contiguous f32 on the CPU.
pub fn add_bias(xs: &Tensor, bias: &Tensor, inner: usize) -> Result<Tensor> {
    xs.contiguous()?
        .apply_op2(&bias.contiguous()?, AddBias { inner })
}

/// PyTorch's Linear without its bias, `xs W^T` over the last axis, for a frozen or trained `W`.
///
/// Candle differentiates a matrix product into both operands' gradients whether or not an operand needs one, so
/// every frozen UNet projection in an inversion's backward pass also paid for a weight gradient as large as its
/// forward product (and a zero-filled buffer to accumulate it in). This op computes the weight gradient only
/// when the weight is tracked. A frozen bias rides along in the op (the product starts from it), so the
/// unbiased product is neither a second pass nor a second tensor kept for the backward pass.
struct Linear {
    frozen_bias: Option<Tensor>,
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(xs, xs_layout, "linear input")?;
        let w = contiguous_f32(weight, weight_layout, "linear weight")?;
        let (out_dim, in_dim) = weight_layout.shape().dims2()?;
        let dims = xs_layout.shape().dims();
        if dims.last() != Some(&in_dim) {
            candle_core::bail!(
                "linear: input {dims:?} does not end in the weight's {in_dim} input features"
            );
        }
        let rows = dims[..dims.len() - 1].iter().product::<usize>();
        let mut out = vec![0f32; rows * out_dim];
        if let Some(bias) = &self.frozen_bias {
            with_f32(bias, |b| {
                if b.len() != out_dim {
                    candle_core::bail!("linear: {} biases for {out_dim} outputs", b.len());
                }
                out.par_chunks_mut(out_dim.max(1))
                    .for_each(|row| row.copy_from_slice(b));
                Ok(())
            })??;
        }
        // W (out x in, row-major) read as W^T (in x out): row stride 1, column stride `in_dim`.
        matmul(
            &mut out,
            (rows, out_dim, in_dim),
            x,
            (in_dim, 1),
            w,
            (1, in_dim),
            self.frozen_bias.is_some(),
            Threads::All,
        );
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("checked above") = out_dim;
        Ok((CpuStorage::F32(out), Shape::from(out_dims)))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (out_dim, in_dim) = weight.dims2()?;
        let grad = grad_res.reshape(((), out_dim))?;
        let grad_xs = if xs.track_op() {
            // grad (rows x out) times W (out x in), on the row-split product (candle's matmul leaves the
            // splitting to gemm, which scaled poorly).
            let rows = grad.dim(0)?;
            let grad_x = with_f32(&grad, |g| {
                with_f32(weight, |w| {
                    let mut grad_x = vec![0f32; rows * in_dim];
                    matmul(
                        &mut grad_x,
                        (rows, in_dim, out_dim),
                        g,
                        (out_dim, 1),
                        w,
                        (in_dim, 1),
                        false,
                        Threads::All,
                    );
                    grad_x
                })
            })??;
            Some(Tensor::from_vec(grad_x, xs.shape(), xs.device())?)
        } else {
            None
        };
        let grad_weight = if weight.track_op() {
            let x = xs.detach().reshape(((), in_dim))?;
            Some(grad.t()?.matmul(&x)?)
        } else {
            None
        };
        Ok((grad_xs, grad_weight))
    }
}

/// `xs W^T [+ b]` over the last axis of a CPU f32 `xs` with an (out, in) `weight`; the weight's gradient only when
/// the weight is tracked. `frozen_bias` must not be tracked (it gets no gradient): add a trained bias separately.
pub fn linear(xs: &Tensor, weight: &Tensor, frozen_bias: Option<&Tensor>) -> Result<Tensor> {
    if frozen_bias.is_some_and(|b| b.track_op()) {
        candle_core::bail!("linear: a trained bias cannot be folded into the product");
    }
    xs.contiguous()?.apply_op2(
        &weight.contiguous()?,
        Linear {
            frozen_bias: frozen_bias.cloned(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{D, Device, Var};

    fn relative_error(a: &Tensor, reference: &Tensor) -> Result<f32> {
        let scale = reference.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6);
        Ok((a - reference)?.abs()?.max_all()?.to_scalar::<f32>()? / scale)
    }

    fn random(shape: &[usize], seed: u64, scale: f64, offset: f64) -> Result<Var> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| (rng.random::<f64>() * 2.0 - 1.0) * scale + offset)
            .map(|v| v as f32)
            .collect();
        Var::from_tensor(&Tensor::from_vec(data, shape, &Device::Cpu)?)
    }

    /// Candle's composed ops, differentiated by candle's autograd, are the reference.
    fn composed_norm(
        xs: &Tensor,
        w: &Tensor,
        b: &Tensor,
        groups: Option<usize>,
        eps: f64,
    ) -> Result<Tensor> {
        let dims = xs.dims().to_vec();
        // Rows to normalise: (sample, group, everything in the group) or the last axis.
        let rows = match groups {
            Some(g) => xs.reshape((dims[0], g, ()))?,
            None => xs.clone(),
        };
        let mean = rows.mean_keepdim(D::Minus1)?;
        let centred = rows.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred
            .broadcast_div(&(var + eps)?.sqrt()?)?
            .reshape(dims.as_slice())?;
        // Per-channel affine for a group norm, per-last-axis for a layer norm.
        let mut affine = vec![1; dims.len()];
        match groups {
            Some(_) => affine[1] = dims[1],
            None => affine[dims.len() - 1] = dims[dims.len() - 1],
        }
        normed
            .broadcast_mul(&w.reshape(affine.as_slice())?)?
            .broadcast_add(&b.reshape(affine.as_slice())?)
    }

    /// Values and all three gradients of the fused op against the composed reference, under a loss that weights
    /// every output differently (a plain sum would have zero input gradient).
    fn check_norm(shape: &[usize], weights: usize, groups: Option<usize>) -> Result<()> {
        let x = random(shape, 1, 3.0, 0.7)?;
        let w = random(&[weights], 2, 1.0, 1.0)?;
        let b = random(&[weights], 3, 0.5, 0.0)?;
        let probe = random(shape, 4, 1.0, 0.0)?;
        let eps = 1e-5;
        let fused = match groups {
            Some(g) => group_norm(&x, g, &w, &b, eps)?,
            None => layer_norm(&x, &w, &b, eps)?,
        };
        let reference = composed_norm(&x, &w, &b, groups, eps)?;
        assert!(
            relative_error(&fused, &reference)? < 1e-5,
            "{shape:?}: values"
        );
        let gf = (fused * probe.as_tensor())?.sum_all()?.backward()?;
        let gr = (reference * probe.as_tensor())?.sum_all()?.backward()?;
        for (name, v) in [("input", &x), ("weight", &w), ("bias", &b)] {
            let err = relative_error(gf.get(v).unwrap(), gr.get(v).unwrap())?;
            assert!(
                err < 1e-4,
                "{shape:?} groups {groups:?}: {name} gradient off by {err}"
            );
        }
        Ok(())
    }

    #[test]
    fn fused_group_norm_matches_the_composed_ops_and_their_gradients() -> Result<()> {
        check_norm(&[3, 8, 5, 4], 8, Some(2))?;
        check_norm(&[2, 12, 7, 7], 12, Some(12))?;
        check_norm(&[2, 6, 9], 6, Some(1))
    }

    #[test]
    fn fused_layer_norm_matches_the_composed_ops_and_their_gradients() -> Result<()> {
        check_norm(&[4, 7, 16], 16, None)?;
        check_norm(&[5, 64], 64, None)
    }

    #[test]
    fn fused_softmax_matches_candle_and_its_gradient() -> Result<()> {
        let x = random(&[3, 5, 17], 5, 6.0, 1.0)?;
        let probe = random(&[3, 5, 17], 6, 1.0, 0.0)?;
        let fused = softmax_last_dim(&x)?;
        let reference = candle_nn::ops::softmax(&x, D::Minus1)?;
        assert!(relative_error(&fused, &reference)? < 1e-6);
        let gf = (fused * probe.as_tensor())?.sum_all()?.backward()?;
        let gr = (reference * probe.as_tensor())?.sum_all()?.backward()?;
        assert!(relative_error(gf.get(&x).unwrap(), gr.get(&x).unwrap())? < 1e-5);
        Ok(())
    }

    #[test]
    fn fused_bias_add_matches_broadcast_add_and_its_gradients() -> Result<()> {
        let probe = random(&[3, 4, 5, 2], 7, 1.0, 0.0)?;
        // (shape of the bias, inner, the same bias as a broadcastable tensor)
        let cases: [(&[usize], usize, &[usize]); 3] = [
            (&[2], 1, &[1, 1, 1, 2]),
            (&[4], 10, &[1, 4, 1, 1]),
            (&[3, 4], 10, &[3, 4, 1, 1]),
        ];
        for (bias_shape, inner, broadcast) in cases {
            let x = random(&[3, 4, 5, 2], 8, 2.0, 0.0)?;
            let b = random(bias_shape, 9, 1.0, 0.5)?;
            let fused = add_bias(&x, &b, inner)?;
            let reference = x.broadcast_add(&b.reshape(broadcast)?)?;
            assert!(relative_error(&fused, &reference)? < 1e-6, "{bias_shape:?}");
            let gf = (fused * probe.as_tensor())?.sum_all()?.backward()?;
            let gr = (reference * probe.as_tensor())?.sum_all()?.backward()?;
            for v in [&x, &b] {
                let err = relative_error(gf.get(v).unwrap(), gr.get(v).unwrap())?;
                assert!(err < 1e-5, "{bias_shape:?}: gradient off by {err}");
            }
        }
        Ok(())
    }

    #[test]
    fn fused_linear_matches_candles_product_and_its_gradients() -> Result<()> {
        let w = random(&[6, 5], 12, 1.0, 0.2)?;
        for shape in [&[7, 5][..], &[2, 3, 5], &[2, 2, 3, 5], &[3, 37, 5]] {
            let x = random(shape, 13, 2.0, -0.3)?;
            let mut out_shape = shape.to_vec();
            *out_shape.last_mut().unwrap() = 6;
            let probe = random(&out_shape, 14, 1.0, 0.0)?;
            let fused = linear(&x, &w, None)?;
            let reference = x.broadcast_matmul(&w.t()?)?;
            assert_eq!(fused.dims(), &out_shape[..]);
            assert!(relative_error(&fused, &reference)? < 1e-6, "{shape:?}");
            let gf = (fused * probe.as_tensor())?.sum_all()?.backward()?;
            let gr = (reference * probe.as_tensor())?.sum_all()?.backward()?;
            for (name, v) in [("input", &x), ("weight", &w)] {
                let err = relative_error(gf.get(v).unwrap(), gr.get(v).unwrap())?;
                assert!(err < 1e-5, "{shape:?}: {name} gradient off by {err}");
            }
        }
        // A frozen weight gets no gradient; the input's is the same. A transposed input is read correctly.
        let frozen = w.as_tensor().detach();
        let bias = random(&[6], 17, 1.0, 0.5)?.as_tensor().detach();
        let x = random(&[5, 4], 15, 1.0, 0.0)?;
        let fused = linear(&x.t()?, &frozen, Some(&bias))?;
        let reference = x.t()?.matmul(&frozen.t()?)?.broadcast_add(&bias)?;
        assert!(relative_error(&fused, &reference)? < 1e-6);
        let probe = random(&[4, 6], 16, 1.0, 0.0)?;
        let gf = (fused * &*probe)?.sum_all()?.backward()?;
        let gr = (reference * &*probe)?.sum_all()?.backward()?;
        assert!(gf.get(&frozen).is_none());
        assert!(relative_error(gf.get(&x).unwrap(), gr.get(&x).unwrap())? < 1e-5);
        // A tracked bias cannot be folded in (it would get no gradient).
        let trained_bias = random(&[6], 18, 1.0, 0.0)?;
        assert!(linear(&x.t()?, &frozen, Some(&trained_bias)).is_err());
        Ok(())
    }

    #[test]
    fn fused_geglu_matches_the_composed_ops_and_their_gradient() -> Result<()> {
        let x = random(&[3, 5, 8], 11, 2.0, 0.1)?;
        let half = 4;
        let composed = (x.narrow(2, 0, half)? * x.narrow(2, half, half)?.gelu_erf()?)?;
        let fused = geglu(&x)?;
        assert!(relative_error(&fused, &composed)? < 1e-6);
        let w = random(&[3, 5, 4], 12, 1.0, 0.0)?.as_tensor().detach();
        let gc = (&composed * &w)?.sum_all()?.backward()?;
        let gf = (&fused * &w)?.sum_all()?.backward()?;
        assert!(relative_error(gf.get(&x).expect("grad"), gc.get(&x).expect("grad"))? < 1e-5);
        Ok(())
    }

    #[test]
    fn fused_silu_matches_candle_and_its_gradient() -> Result<()> {
        let x = random(&[4, 3, 7], 13, 6.0, 0.5)?;
        let (composed, fused) = (x.silu()?, silu(&x)?);
        assert!(relative_error(&fused, &composed)? < 1e-6);
        let w = random(&[4, 3, 7], 14, 1.0, 0.0)?.as_tensor().detach();
        let gc = (&composed * &w)?.sum_all()?.backward()?;
        let gf = (&fused * &w)?.sum_all()?.backward()?;
        assert!(relative_error(gf.get(&x).expect("grad"), gc.get(&x).expect("grad"))? < 1e-5);
        Ok(())
    }

    #[test]
    fn a_group_count_that_does_not_divide_the_channels_is_an_error() -> Result<()> {
        let x = Tensor::zeros((1, 6, 2, 2), candle_core::DType::F32, &Device::Cpu)?;
        let w = Tensor::ones(6, candle_core::DType::F32, &Device::Cpu)?;
        let err = group_norm(&x, 4, &w, &w, 1e-5).unwrap_err().to_string();
        assert!(err.contains("4 groups"), "{err}");
        Ok(())
    }
}
