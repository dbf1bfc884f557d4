//! Building blocks shared by all networks. On the CPU in f32, norms and softmax run as single kernels with
//! hand-written backward passes (`model::fused`); elsewhere candle's kernels serve inference and a
//! differentiable composition serves training (candle's fused softmax and layer norm have no backward pass).
//! Convolutions and bias adds likewise run on `model::fused` kernels for CPU f32.

use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

pub use candle_nn::Conv2dConfig;

use crate::model::{fused, fused_attention, fused_conv};

pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let inner = candle_nn::linear(in_dim, out_dim, vb)?;
    Ok(Linear {
        weight: inner.weight().clone(),
        bias: inner.bias().cloned(),
    })
}

pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let inner = candle_nn::linear_no_bias(in_dim, out_dim, vb)?;
    Ok(Linear {
        weight: inner.weight().clone(),
        bias: None,
    })
}

/// PyTorch's Linear: y = x W^T + b over the last axis.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (out_dim, in_dim) = self.weight.dims2()?;
        flops::add_dense(2 * (xs.elem_count() / in_dim.max(1)) as u64 * (in_dim * out_dim) as u64);
        let product = if fused_kernels_apply(&[xs, &self.weight]) {
            match &self.bias {
                Some(bias) if !bias.track_op() && fused_kernels_apply(&[bias]) => {
                    return fused::linear(xs, &self.weight, Some(bias));
                }
                _ => fused::linear(xs, &self.weight, None)?,
            }
        } else {
            candle_nn::Linear::new(self.weight.clone(), None).forward(xs)?
        };
        match &self.bias {
            Some(bias) => add_bias(&product, bias, 1),
            None => Ok(product),
        }
    }
}

/// Adds `bias` to `xs` viewed as (outer, bias elements, inner): `inner` 1 for a bias on the last axis, H * W for
/// a per-channel bias on (N, C, H, W) or, with a (N, C) bias, one per sample and channel.
pub fn add_bias(xs: &Tensor, bias: &Tensor, inner: usize) -> Result<Tensor> {
    if fused_kernels_apply(&[xs, bias]) {
        return fused::add_bias(xs, bias, inner);
    }
    let m = bias.elem_count();
    xs.reshape(((), m, inner))?
        .broadcast_add(&bias.reshape((1, m, 1))?)?
        .reshape(xs.shape())
}

pub fn conv2d(
    in_c: usize,
    out_c: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        stride,
        padding,
        ..Default::default()
    };
    let weight = vb.get((out_c, in_c, kernel, kernel), "weight")?;
    let bias = vb.get(out_c, "bias")?;
    Ok(Conv2d::new(weight, Some(bias), cfg))
}

/// A 2-D convolution (PyTorch's Conv2d); on the CPU in f32 with groups 1 and dilation 1, a matrix product over the
/// whole batch, forward and backward.
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    cfg: Conv2dConfig,
}

impl Conv2d {
    pub fn new(weight: Tensor, bias: Option<Tensor>, cfg: Conv2dConfig) -> Self {
        Self { weight, bias, cfg }
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let Conv2dConfig {
            padding,
            stride,
            dilation,
            groups,
            ..
        } = self.cfg;
        let fused = groups == 1
            && dilation == 1
            && fused_kernels_apply(&[xs, &self.weight])
            && fused_conv::conv2d_applies(xs, &self.weight, padding, stride);
        // A frozen bias is added inside the fused convolution; a trained one below, to get its gradient.
        let folded_bias = match &self.bias {
            Some(b) if fused && !b.track_op() && fused_kernels_apply(&[b]) => Some(b),
            _ => None,
        };
        let out = if fused {
            fused_conv::conv2d(xs, &self.weight, folded_bias, padding, stride)?
        } else {
            xs.conv2d(&self.weight, padding, stride, dilation, groups)?
        };
        let kernel_taps = self.weight.elem_count() / groups.max(1);
        flops::add_dense(
            2 * out.elem_count() as u64 / out.dim(1)?.max(1) as u64 * kernel_taps as u64,
        );
        if folded_bias.is_some() {
            return Ok(out);
        }
        match &self.bias {
            Some(bias) => add_bias(&out, bias, out.dims()[2..].iter().product()),
            None => Ok(out),
        }
    }
}

/// Matrix product of attention operands (scores or the weighted sum of values), counted as attention FLOPs.
pub fn attention_matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dims = a.dims();
    if dims.len() >= 2 {
        let (m, k) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        let batch = a.elem_count() / (m * k).max(1);
        flops::add_attention(2 * (batch * m * k) as u64 * b.dim(D::Minus1)? as u64);
    }
    a.matmul(b)
}

/// `softmax(scale * q k^T) v` over the last two axes, for attention whose probabilities nobody looks at: on the
/// CPU in f32 a tiled kernel that never holds all the scores (`model::fused_attention`), elsewhere the composed
/// ops with the scores in f32.
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let rank = q.rank();
    if rank >= 2 {
        let (n, d) = (q.dim(rank - 2)?, q.dim(rank - 1)?);
        let heads = q.elem_count() / (n * d).max(1);
        let (m, dv) = (k.dim(rank - 2)?, v.dim(rank - 1)?);
        flops::add_attention(2 * (heads * n * m) as u64 * (d + dv) as u64);
    }
    if fused_kernels_apply(&[q, k, v]) {
        return fused_attention::attention(q, k, v, scale);
    }
    let dtype = q.dtype();
    let upcast = compute_dtype(dtype);
    let scores = (q.to_dtype(upcast)?.matmul(&k.to_dtype(upcast)?.t()?)? * scale)?;
    softmax_last_dim(&scores)?.to_dtype(dtype)?.matmul(v)
}

/// Attention with `heads` heads interleaved in the last axis, as projections produce them: `(batch, tokens,
/// heads * dim)` queries and keys, `(batch, keys, heads * value_dim)` values, output `(batch, queries, heads *
/// value_dim)`. For attention whose probabilities nobody looks at; on the CPU in f32 one fused op splits and merges
/// the heads inside, elsewhere the heads are split and [`scaled_dot_product_attention`] runs on them.
pub fn multi_head_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let (b, n, inner) = q.dims3()?;
    let (_, m, value_inner) = v.dims3()?;
    if fused_kernels_apply(&[q, k, v]) {
        let (d, dv) = (inner / heads.max(1), value_inner / heads.max(1));
        flops::add_attention(2 * (b * heads * n * m) as u64 * (d + dv) as u64);
        return fused_attention::multi_head_attention(q, k, v, heads, scale);
    }
    let split = |x: &Tensor| -> Result<Tensor> {
        let (b, t, width) = x.dims3()?;
        x.reshape((b, t, heads, width / heads.max(1)))?
            .transpose(1, 2)?
            .contiguous()
    };
    let out = scaled_dot_product_attention(&split(q)?, &split(k)?, &split(v)?, scale)?;
    out.transpose(1, 2)?.reshape((b, n, value_inner))
}

/// A tally of the floating-point operations (two per multiply-add) of the matrix products and convolutions run on
/// this thread, split into dense layers (weights times activations) and attention products, for benchmarks.
pub mod flops {
    use std::cell::Cell;

    thread_local! {
        static DENSE: Cell<u64> = const { Cell::new(0) };
        static ATTENTION: Cell<u64> = const { Cell::new(0) };
    }

    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Tally {
        pub dense: u64,
        pub attention: u64,
    }

    impl Tally {
        pub fn total(&self) -> u64 {
            self.dense + self.attention
        }
    }

    pub fn add_dense(n: u64) {
        DENSE.with(|c| c.set(c.get().wrapping_add(n)));
    }

    pub fn add_attention(n: u64) {
        ATTENTION.with(|c| c.set(c.get().wrapping_add(n)));
    }

    /// The tally since the last call (or the thread's start), resetting it.
    pub fn take() -> Tally {
        Tally {
            dense: DENSE.with(|c| c.replace(0)),
            attention: ATTENTION.with(|c| c.replace(0)),
        }
    }
}

/// Whether the fused CPU kernels apply: every operand an f32 tensor on the CPU.
fn fused_kernels_apply(operands: &[&Tensor]) -> bool {
    operands
        .iter()
        .all(|t| matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32)
}

pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?;
    let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?;
    Ok(GroupNorm {
        composed: candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?,
        weight,
        bias,
        groups,
        eps,
    })
}

/// PyTorch's GroupNorm over (N, C, ...).
#[derive(Clone, Debug)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
    composed: candle_nn::GroupNorm,
}

impl Module for GroupNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if fused_kernels_apply(&[xs, &self.weight, &self.bias]) {
            fused::group_norm(xs, self.groups, &self.weight, &self.bias, self.eps)
        } else {
            self.composed.forward(xs)
        }
    }
}

/// SiLU, fused on the CPU in f32.
pub fn silu(xs: &Tensor) -> Result<Tensor> {
    Activation::Silu.forward(xs)
}

/// GEGLU (diffusers' `GEGLU`): the last axis split into value and gate halves, `value * gelu(gate)` (exact GELU).
pub fn geglu(xs: &Tensor) -> Result<Tensor> {
    if fused_kernels_apply(&[xs]) {
        return fused::geglu(xs);
    }
    let half = xs.dim(D::Minus1)? / 2;
    xs.narrow(D::Minus1, 0, half)? * xs.narrow(D::Minus1, half, half)?.gelu_erf()?
}

/// Half-precision tensors are computed in f32 where precision matters (softmax, norms); f32/f64 stay as they are.
pub fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

/// Softmax over the last axis, computed in f32 for half-precision inputs.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    if fused_kernels_apply(&[xs]) {
        return fused::softmax_last_dim(xs);
    }
    let dtype = xs.dtype();
    let xs = xs.to_dtype(compute_dtype(dtype))?;
    let probs = if xs.track_op() {
        candle_nn::ops::softmax(&xs, D::Minus1)?
    } else {
        candle_nn::ops::softmax_last_dim(&xs.contiguous()?)?
    };
    probs.to_dtype(dtype)
}

#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn load(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if fused_kernels_apply(&[xs, &self.weight, &self.bias]) {
            return fused::layer_norm(xs, &self.weight, &self.bias, self.eps);
        }
        let tracked = xs.track_op() || self.weight.track_op() || self.bias.track_op();
        if !tracked && xs.dtype() != DType::F64 {
            return candle_nn::ops::layer_norm(
                &xs.contiguous()?,
                &self.weight,
                &self.bias,
                self.eps as f32,
            );
        }
        let dtype = xs.dtype();
        let xs = xs.to_dtype(compute_dtype(dtype))?;
        let mean = xs.mean_keepdim(D::Minus1)?;
        let centred = xs.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

/// Activations named in the configs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// Exact (erf) GELU, PyTorch's default.
    Gelu,
    /// CLIP's x * sigmoid(1.702 x).
    QuickGelu,
}

impl Activation {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "silu" | "swish" => Some(Self::Silu),
            "gelu" => Some(Self::Gelu),
            "quick_gelu" => Some(Self::QuickGelu),
            _ => None,
        }
    }
}

impl Module for Activation {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Silu if fused_kernels_apply(&[xs]) => fused::silu(xs),
            Self::Silu => xs.silu(),
            Self::Gelu => xs.gelu_erf(),
            Self::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    /// Largest absolute difference, relative to the reference's largest entry.
    fn relative_error(a: &Tensor, reference: &Tensor) -> Result<f32> {
        let scale = reference.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6);
        Ok((a - reference)?.abs()?.max_all()?.to_scalar::<f32>()? / scale)
    }

    /// Output and gradients of the training convolution against candle's own conv2d and its backward, with the
    /// weights trained (tracked) or fixed, as in inversion.
    fn check(
        batch: usize,
        c_in: usize,
        c_out: usize,
        (h, w): (usize, usize),
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Result<()> {
        let dev = Device::Cpu;
        let xs = Var::from_tensor(&Tensor::randn(0f32, 1., (batch, c_in, h, w), &dev)?)?;
        let weight = Var::from_tensor(&Tensor::randn(0f32, 0.2, (c_out, c_in, k, k), &dev)?)?;
        let bias = Var::from_tensor(&Tensor::randn(0f32, 0.2, c_out, &dev)?)?;
        let cfg = Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        };
        let case = format!(
            "batch {batch}, {c_in}->{c_out}, {h}x{w}, kernel {k}, stride {stride}, padding {padding}"
        );
        for trained in [true, false] {
            let (w, b) = if trained {
                (weight.as_tensor().clone(), bias.as_tensor().clone())
            } else {
                (weight.as_tensor().detach(), bias.as_tensor().detach())
            };
            let fast = Conv2d::new(w.clone(), Some(b.clone()), cfg).forward(xs.as_tensor())?;
            let reference = candle_nn::Conv2d::new(w, Some(b), cfg).forward(xs.as_tensor())?;
            assert_eq!(fast.dims(), reference.dims());
            assert!(relative_error(&fast, &reference)? < 1e-5, "output, {case}");
            // A loss whose gradient differs per output element, so that every path of the backward is exercised.
            let loss_weights = Tensor::randn(0f32, 1., reference.shape(), &dev)?;
            let grads_fast = (&fast * &loss_weights)?.sum_all()?.backward()?;
            let grads_ref = (&reference * &loss_weights)?.sum_all()?.backward()?;
            let params = [("input", &xs), ("weight", &weight), ("bias", &bias)];
            for (name, var) in params.into_iter().filter(|(n, _)| trained || *n == "input") {
                let (a, b) = (grads_fast.get(var).unwrap(), grads_ref.get(var).unwrap());
                let err = relative_error(a, b)?;
                assert!(
                    err < 1e-4,
                    "{name} gradient off by {err:e} (relative to its largest entry), {case}, trained {trained}"
                );
            }
            if !trained {
                assert!(
                    grads_fast.get(&weight).is_none(),
                    "fixed weights get no gradient"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn the_training_convolution_has_candles_values_and_gradients() -> Result<()> {
        check(3, 4, 5, (8, 8), 3, 1, 1)?; // resnet / unet conv
        check(2, 6, 3, (7, 5), 3, 1, 1)?; // odd, non-square
        check(2, 4, 4, (9, 9), 3, 2, 0)?; // vae downsampler (padded outside)
        check(2, 4, 4, (8, 8), 3, 2, 1)?; // unet downsampler
        check(2, 8, 4, (6, 6), 1, 1, 0)?; // shortcut / quant conv
        check(2, 3, 8, (16, 16), 4, 4, 0)?; // vision patch embedding
        check(1, 2, 3, (6, 6), 3, 1, 0)?; // no padding
        check(1, 2, 3, (2, 3), 3, 1, 2)?; // padding wider than the image: whole patch rows of zeros
        check(1, 2, 3, (7, 7), 3, 3, 1)?; // stride and padding that leave columns on both edges
        check(2, 3, 4, (9, 7), 5, 1, 2)?; // 5x5 kernel: its input gradient is a convolution padded by 2
        check(1, 2, 3, (5, 6), 1, 1, 1)?; // padded 1x1: the input gradient scatters back (no adjoint conv)
        check(2, 64, 8, (48, 40), 3, 1, 1)?; // several chunks of output rows per sample
        // Winograd's F(4x4, 3x3) (at least 64 output tiles and 16 channels each way), forward and as the input
        // gradient's adjoint convolution: whole tiles, and edge tiles cut on both axes across two samples.
        check(1, 16, 16, (32, 32), 3, 1, 1)?;
        check(2, 24, 20, (30, 34), 3, 1, 1)
    }
}
