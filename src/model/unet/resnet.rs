use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::model::nn::{Conv2d, GroupNorm, Linear, add_bias, conv2d, group_norm, linear, silu};

/// ResnetBlock2D, shared by the UNet (with a time embedding) and the VAE (without).
#[derive(Clone, Debug)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

pub struct ResnetSpec {
    pub in_channels: usize,
    pub out_channels: usize,
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn load(spec: &ResnetSpec, vb: VarBuilder) -> Result<Self> {
        let (cin, cout) = (spec.in_channels, spec.out_channels);
        let time_emb_proj = match spec.temb_channels {
            Some(t) => Some(linear(t, cout, vb.pp("time_emb_proj"))?),
            None => None,
        };
        let conv_shortcut = if cin != cout {
            Some(conv2d(cin, cout, 1, 1, 0, vb.pp("conv_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: group_norm(spec.groups, cin, spec.eps, vb.pp("norm1"))?,
            conv1: conv2d(cin, cout, 3, 1, 1, vb.pp("conv1"))?,
            time_emb_proj,
            norm2: group_norm(spec.groups, cout, spec.eps, vb.pp("norm2"))?,
            conv2: conv2d(cout, cout, 3, 1, 1, vb.pp("conv2"))?,
            conv_shortcut,
            output_scale_factor: spec.output_scale_factor,
        })
    }

    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.conv1.forward(&silu(&self.norm1.forward(xs)?)?)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            // One value per sample and channel, over every position.
            let t = proj.forward(&silu(temb)?)?;
            h = add_bias(&h, &t, h.dims()[2..].iter().product())?;
        }
        let h = self.conv2.forward(&silu(&self.norm2.forward(&h)?)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        let out = (shortcut + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}
