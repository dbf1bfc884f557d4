//! CPU kernels with hand-written backward passes for the operations that dominate a training step: norms,
//! softmax, bias adds and convolutions.
//!
//! Candle's composed group norm is about ten tensor ops forward and twenty backward, each a full pass over the
//! activations, several of them broadcast reductions; these kernels make one pass each way. Convolutions run as
//! one matrix product over the whole batch. They take contiguous f32 tensors on the CPU;
//! `model::nn` decides when they apply and falls back to candle's composed ops otherwise.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg(format!("{what}: the operand must be contiguous"))
    })?;
    Ok(&storage.as_slice::<f32>()?[start..end])
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
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for (o, &v) in out.iter_mut().zip(row) {
                    *o = (v - max).exp();
                    sum += *o;
                }
                out.iter_mut().for_each(|o| *o /= sum);
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

/// The shape of one 2-D convolution (groups 1, dilation 1).
#[derive(Clone, Copy, Debug)]
struct ConvGeometry {
    batch: usize,
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    k_h: usize,
    k_w: usize,
    stride: usize,
    padding: usize,
}

impl ConvGeometry {
    fn new(xs: &Shape, kernel: &Shape, stride: usize, padding: usize) -> Result<Self> {
        let (batch, c_in, h, w) = xs.dims4()?;
        let (c_out, k_c, k_h, k_w) = kernel.dims4()?;
        if k_c != c_in || stride == 0 || h + 2 * padding < k_h || w + 2 * padding < k_w {
            candle_core::bail!(
                "conv2d: input {:?} does not fit kernel {:?} at stride {stride}, padding {padding}",
                xs.dims(),
                kernel.dims()
            );
        }
        Ok(Self {
            batch,
            c_in,
            h,
            w,
            c_out,
            k_h,
            k_w,
            stride,
            padding,
        })
    }

    fn out_h(&self) -> usize {
        (self.h + 2 * self.padding - self.k_h) / self.stride + 1
    }

    fn out_w(&self) -> usize {
        (self.w + 2 * self.padding - self.k_w) / self.stride + 1
    }

    /// Output positions per sample: the rows of one sample's patch matrix.
    fn positions(&self) -> usize {
        self.out_h() * self.out_w()
    }

    /// Input values per patch: the patch matrix's columns.
    fn patch_len(&self) -> usize {
        self.c_in * self.k_h * self.k_w
    }

    /// Patch entry k = (channel, ky, kx) as its parts.
    fn entry(&self, k: usize) -> (usize, usize, usize) {
        (
            k / (self.k_h * self.k_w),
            (k / self.k_w) % self.k_h,
            k % self.k_w,
        )
    }

    /// Input coordinate read by output coordinate `o` at kernel offset `k`, if it is not in the zero padding.
    fn source(&self, o: usize, k: usize, size: usize) -> Option<usize> {
        let i = (o * self.stride + k).checked_sub(self.padding)?;
        (i < size).then_some(i)
    }

    /// For sample `n` at kernel offset (ky, kx), every (column of the patch row, index in the input plane) pair
    /// outside the zero padding: Im2Col gathers along these pairs and Col2Im scatters back along them.
    fn for_each_tap(&self, n: usize, ky: usize, kx: usize, mut visit: impl FnMut(usize, usize)) {
        let (oh, ow) = (self.out_h(), self.out_w());
        for oy in 0..oh {
            let Some(iy) = self.source(oy, ky, self.h) else {
                continue;
            };
            for ox in 0..ow {
                if let Some(ix) = self.source(ox, kx, self.w) {
                    visit((n * oh + oy) * ow + ox, iy * self.w + ix);
                }
            }
        }
    }
}

/// Input patches as a matrix with one row per patch entry (channel, ky, kx) and one column per (sample, output
/// position): rows are built from shifted input rows, and the forward product with the kernel matrix lands
/// channel-major.
struct Im2Col(ConvGeometry);

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let x = contiguous_f32(storage, layout, "conv2d input")?;
        let columns = g.batch * g.positions();
        let mut cols = vec![0f32; g.patch_len() * columns];
        cols.par_chunks_mut(columns)
            .enumerate()
            .for_each(|(k, row)| {
                let (c, ky, kx) = g.entry(k);
                for n in 0..g.batch {
                    let plane = &x[(n * g.c_in + c) * g.h * g.w..][..g.h * g.w];
                    g.for_each_tap(n, ky, kx, |col, i| row[col] = plane[i]);
                }
            });
        Ok((CpuStorage::F32(cols), Shape::from((g.patch_len(), columns))))
    }
}

/// The adjoint of [`Im2Col`]: every patch entry added back onto the input value it was read from.
struct Col2Im(ConvGeometry);

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let cols = contiguous_f32(storage, layout, "patch gradient")?;
        let columns = g.batch * g.positions();
        let mut x = vec![0f32; g.batch * g.c_in * g.h * g.w];
        x.par_chunks_mut(g.h * g.w)
            .enumerate()
            .for_each(|(nc, plane)| {
                let (n, c) = (nc / g.c_in, nc % g.c_in);
                for ky in 0..g.k_h {
                    for kx in 0..g.k_w {
                        let row = &cols[((c * g.k_h + ky) * g.k_w + kx) * columns..][..columns];
                        g.for_each_tap(n, ky, kx, |col, i| plane[i] += row[col]);
                    }
                }
            });
        Ok((CpuStorage::F32(x), Shape::from((g.batch, g.c_in, g.h, g.w))))
    }
}

/// 2-D convolution (groups 1, dilation 1) as one matrix product of the whole batch's patch matrix with the
/// kernel, forward and backward. Candle's tiled CPU convolution multiplies one sample at a time and gathers
/// patches with scalar loops; at the toy model's sizes that was a third of a training step.
struct Conv2dGemm {
    stride: usize,
    padding: usize,
}

/// A CPU tensor holding a copy of a contiguous f32 operand.
fn cpu_tensor(storage: &CpuStorage, layout: &Layout) -> Result<Tensor> {
    let data = contiguous_f32(storage, layout, "conv2d operand")?;
    Tensor::from_slice(data, layout.shape(), &candle_core::Device::Cpu)
}

impl Conv2dGemm {
    fn geometry(&self, xs: &Shape, kernel: &Shape) -> Result<ConvGeometry> {
        ConvGeometry::new(xs, kernel, self.stride, self.padding)
    }
}

/// (C_out, N * positions) back to (N, C_out, out_h, out_w), and the reverse.
fn channel_major_to_image(matrix: &Tensor, g: &ConvGeometry) -> Result<Tensor> {
    matrix
        .reshape((g.c_out, g.batch, g.positions()))?
        .transpose(0, 1)?
        .contiguous()?
        .reshape((g.batch, g.c_out, g.out_h(), g.out_w()))
}

fn image_to_channel_major(image: &Tensor, g: &ConvGeometry) -> Result<Tensor> {
    image
        .reshape((g.batch, g.c_out, g.positions()))?
        .transpose(0, 1)?
        .contiguous()?
        .reshape((g.c_out, g.batch * g.positions()))
}

impl CustomOp2 for Conv2dGemm {
    fn name(&self) -> &'static str {
        "conv2d-gemm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        kernel: &CpuStorage,
        kernel_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.geometry(xs_layout.shape(), kernel_layout.shape())?;
        let patches = cpu_tensor(xs, xs_layout)?.apply_op1_no_bwd(&Im2Col(g))?;
        let kernel = cpu_tensor(kernel, kernel_layout)?.reshape((g.c_out, g.patch_len()))?;
        let out = channel_major_to_image(&kernel.matmul(&patches)?, &g)?;
        let shape = out.shape().clone();
        Ok((CpuStorage::F32(out.flatten_all()?.to_vec1()?), shape))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        kernel: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = self.geometry(xs.shape(), kernel.shape())?;
        let grad_out = image_to_channel_major(grad, &g)?;
        let kernel_matrix = kernel.reshape((g.c_out, g.patch_len()))?;
        let grad_xs = if xs.track_op() {
            Some(
                kernel_matrix
                    .t()?
                    .matmul(&grad_out)?
                    .apply_op1_no_bwd(&Col2Im(g))?,
            )
        } else {
            None
        };
        // Inversion tracks the latent and the mapping networks, not the UNet's weights: no kernel gradient then.
        let grad_kernel = if kernel.track_op() {
            let patches = xs.contiguous()?.apply_op1_no_bwd(&Im2Col(g))?;
            Some(grad_out.matmul(&patches.t()?)?.reshape(kernel.shape())?)
        } else {
            None
        };
        Ok((grad_xs, grad_kernel))
    }
}

/// Largest patch matrix the matrix-product convolution builds (f32 elements, 256 MB). Larger convolutions (an SD
/// VAE decoder at 512x512 would need over a gigabyte per layer) stay on candle's tiled kernel, which gathers
/// patches a tile at a time.
const MAX_PATCH_ELEMENTS: usize = 1 << 26;

/// Whether [`conv2d`] takes this convolution: the shapes fit and its patch matrix stays under the memory cap.
pub fn conv2d_applies(xs: &Tensor, kernel: &Tensor, padding: usize, stride: usize) -> bool {
    ConvGeometry::new(xs.shape(), kernel.shape(), stride, padding)
        .is_ok_and(|g| g.batch * g.positions() * g.patch_len() <= MAX_PATCH_ELEMENTS)
}

/// 2-D convolution, groups 1 and dilation 1 (contiguous f32 on the CPU), differentiable.
pub fn conv2d(xs: &Tensor, kernel: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    xs.contiguous()?
        .apply_op2(&kernel.contiguous()?, Conv2dGemm { stride, padding })
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
    fn large_convolutions_stay_on_candles_tiled_kernel() -> Result<()> {
        let dev = Device::Cpu;
        let kernel = Tensor::zeros((128, 128, 3, 3), candle_core::DType::F32, &dev)?;
        let image = |side: usize| {
            Tensor::zeros((1, 1, 1, 1), candle_core::DType::F32, &dev)?
                .broadcast_as((1, 128, side, side))
        };
        // A UNet level of SD at 64x64 latents: 128 * 9 * 4096 patch entries.
        assert!(conv2d_applies(&image(64)?, &kernel, 1, 1));
        // An SD VAE decoder layer at 512x512: 128 * 9 * 262144, about 1.2 GB of patches.
        assert!(!conv2d_applies(&image(512)?, &kernel, 1, 1));
        // Channels that do not match the kernel are not this kernel's to report.
        assert!(!conv2d_applies(&image(8)?.narrow(1, 0, 64)?, &kernel, 1, 1));
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
