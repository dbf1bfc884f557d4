//! Building blocks shared by all networks. candle's fused softmax and layer norm have no backward pass, so
//! these pick the fused kernel for plain inference and a differentiable composition when gradients are tracked.
//! candle's convolution backward computes the input gradient with a direct transposed convolution that costs
//! 1.5-3x the forward on the toy shapes; training convolutions use a gradient that is itself a fast convolution.

use candle_core::{CpuStorage, CustomOp2, D, DType, Device, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;

pub use candle_nn::{Conv2dConfig, GroupNorm, Linear};

pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    candle_nn::linear(in_dim, out_dim, vb)
}

pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    candle_nn::linear_no_bias(in_dim, out_dim, vb)
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

/// A 2-D convolution (PyTorch's Conv2d, groups 1) whose backward pass is fast on the CPU.
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
        let tracked = xs.track_op() || self.weight.track_op();
        let fast_grad = tracked
            && matches!(xs.device(), Device::Cpu)
            && xs.dtype() == DType::F32
            && self.weight.dtype() == DType::F32
            && groups == 1
            && dilation == 1;
        let out = if fast_grad {
            xs.contiguous()?.apply_op2(
                &self.weight.contiguous()?,
                ConvWithFastGrad { padding, stride },
            )?
        } else {
            xs.conv2d(&self.weight, padding, stride, dilation, groups)?
        };
        match &self.bias {
            Some(b) => out.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
            None => Ok(out),
        }
    }
}

/// conv2d (dilation 1, groups 1) whose input gradient, at stride 1, is the convolution of the output gradient
/// with the kernel rotated by 180 degrees and its in/out channels swapped, which runs on candle's im2col path.
struct ConvWithFastGrad {
    padding: usize,
    stride: usize,
}

fn cpu_tensor(storage: &CpuStorage, layout: &Layout) -> Result<Tensor> {
    let data = storage.as_slice::<f32>()?;
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("conv2d: a non-contiguous operand".into()))?;
    Tensor::from_slice(&data[start..end], layout.shape(), &Device::Cpu)
}

impl CustomOp2 for ConvWithFastGrad {
    fn name(&self) -> &'static str {
        "conv2d-fast-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        kernel: &CpuStorage,
        kernel_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = cpu_tensor(xs, xs_layout)?.conv2d(
            &cpu_tensor(kernel, kernel_layout)?,
            self.padding,
            self.stride,
            1,
            1,
        )?;
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
        let (padding, stride) = (self.padding, self.stride);
        let (_, _, k_h, k_w) = kernel.dims4()?;
        let grad_xs = if stride == 1 && k_h == k_w && padding < k_h {
            let rotated = kernel.flip(&[2, 3])?.transpose(0, 1)?.contiguous()?;
            grad.conv2d(&rotated, k_h - 1 - padding, 1, 1, 1)?
        } else {
            let out_size = (grad.dim(2)? - 1) * stride + k_h - 2 * padding;
            grad.conv_transpose2d(kernel, padding, xs.dim(2)? - out_size, stride, 1)?
        };
        // Inversion tracks the latent and the mapping networks, not the UNet's weights: no kernel gradient then.
        if !kernel.track_op() {
            return Ok((Some(grad_xs), None));
        }
        // The kernel gradient correlates inputs with output gradients over the batch: a convolution with the
        // batch as channels, whose "dilation" is the forward stride (as candle's own backward does).
        let grad_kernel = xs
            .transpose(0, 1)?
            .conv2d(&grad.transpose(0, 1)?, padding, 1, stride, 1)?
            .transpose(0, 1)?;
        let grad_kernel = if grad_kernel.dims4()? != kernel.dims4()? {
            grad_kernel.narrow(2, 0, k_h)?.narrow(3, 0, k_w)?
        } else {
            grad_kernel
        };
        Ok((Some(grad_xs), Some(grad_kernel)))
    }
}

pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    candle_nn::group_norm(groups, channels, eps, vb)
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
        check(1, 2, 3, (6, 6), 3, 1, 0) // no padding
    }
}
