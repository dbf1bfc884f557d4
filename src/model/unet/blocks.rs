use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::model::hook::{AttentionKind, HookedPass, LayerId, Place};
use crate::model::nn::{Conv2d, conv2d};
use crate::model::unet::resnet::{ResnetBlock2D, ResnetSpec};
use crate::model::unet::transformer::{Transformer2D, TransformerSpec};

/// What every block of one UNet shares.
#[derive(Clone, Copy, Debug)]
pub struct BlockCommon {
    pub temb_channels: usize,
    pub groups: usize,
    pub eps: f64,
    pub context_dim: usize,
    pub linear_projection: bool,
}

impl BlockCommon {
    fn resnet(
        &self,
        in_channels: usize,
        out_channels: usize,
        output_scale_factor: f64,
        vb: VarBuilder,
    ) -> Result<ResnetBlock2D> {
        let spec = ResnetSpec {
            in_channels,
            out_channels,
            temb_channels: Some(self.temb_channels),
            groups: self.groups,
            eps: self.eps,
            output_scale_factor,
        };
        ResnetBlock2D::load(&spec, vb)
    }

    /// `at`: place, block index and transformer index within the block.
    fn transformer(
        &self,
        channels: usize,
        attention: (usize, usize),
        at: (Place, usize, usize),
        vb: VarBuilder,
    ) -> Result<Transformer2D> {
        let ((heads, depth), (place, block, index)) = (attention, at);
        let spec = TransformerSpec {
            channels,
            heads,
            context_dim: self.context_dim,
            depth,
            groups: self.groups,
            linear_projection: self.linear_projection,
        };
        let id = LayerId {
            place,
            block,
            transformer: index,
            layer: 0,
            kind: AttentionKind::SelfAttention,
        };
        Transformer2D::load(&spec, id, vb)
    }
}

/// Attention settings of one level; `heads == None` means a block without attention.
#[derive(Clone, Copy, Debug)]
pub struct LevelAttention {
    pub heads: Option<usize>,
    pub depth: usize,
}

/// CrossAttnDownBlock2D / DownBlock2D.
#[derive(Clone, Debug)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    downsampler: Option<Conv2d>,
}

impl DownBlock {
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        common: &BlockCommon,
        index: usize,
        in_channels: usize,
        out_channels: usize,
        layers: usize,
        attention: LevelAttention,
        downsample: Option<usize>,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mut resnets = Vec::with_capacity(layers);
        let mut attentions = Vec::new();
        for j in 0..layers {
            let cin = if j == 0 { in_channels } else { out_channels };
            resnets.push(common.resnet(cin, out_channels, 1.0, vb.pp(format!("resnets.{j}")))?);
            if let Some(heads) = attention.heads {
                attentions.push(common.transformer(
                    out_channels,
                    (heads, attention.depth),
                    (Place::Down, index, j),
                    vb.pp(format!("attentions.{j}")),
                )?);
            }
        }
        let downsampler = match downsample {
            Some(padding) => Some(conv2d(
                out_channels,
                out_channels,
                3,
                2,
                padding,
                vb.pp("downsamplers.0.conv"),
            )?),
            None => None,
        };
        Ok(Self {
            resnets,
            attentions,
            downsampler,
        })
    }

    /// Returns the output and the skip connections it adds.
    pub fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        mut hook: Option<&mut HookedPass>,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut xs = xs.clone();
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        for (j, resnet) in self.resnets.iter().enumerate() {
            xs = resnet.forward(&xs, Some(temb))?;
            if let Some(attn) = self.attentions.get(j) {
                xs = attn.forward(&xs, context, hook.as_deref_mut())?;
            }
            skips.push(xs.clone());
        }
        if let Some(down) = &self.downsampler {
            xs = down.forward(&xs)?;
            skips.push(xs.clone());
        }
        Ok((xs, skips))
    }
}

/// UNetMidBlock2DCrossAttn: resnet, transformer, resnet.
#[derive(Clone, Debug)]
pub struct MidBlock {
    first: ResnetBlock2D,
    attention: Transformer2D,
    second: ResnetBlock2D,
}

impl MidBlock {
    pub fn load(
        common: &BlockCommon,
        channels: usize,
        heads: usize,
        depth: usize,
        scale: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            first: common.resnet(channels, channels, scale, vb.pp("resnets.0"))?,
            attention: common.transformer(
                channels,
                (heads, depth),
                (Place::Mid, 0, 0),
                vb.pp("attentions.0"),
            )?,
            second: common.resnet(channels, channels, scale, vb.pp("resnets.1"))?,
        })
    }

    pub fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        hook: Option<&mut HookedPass>,
    ) -> Result<Tensor> {
        let xs = self.first.forward(xs, Some(temb))?;
        let xs = self.attention.forward(&xs, context, hook)?;
        self.second.forward(&xs, Some(temb))
    }
}

/// CrossAttnUpBlock2D / UpBlock2D.
#[derive(Clone, Debug)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    upsampler: Option<Conv2d>,
}

/// Channel bookkeeping of an up block, as diffusers derives it.
#[derive(Clone, Copy, Debug)]
pub struct UpChannels {
    pub prev_out: usize,
    pub out: usize,
    /// Width of the deepest skip this block consumes (the next-shallower level's width).
    pub skip_in: usize,
}

impl UpBlock {
    pub fn load(
        common: &BlockCommon,
        index: usize,
        ch: UpChannels,
        layers: usize,
        attention: LevelAttention,
        upsample: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mut resnets = Vec::with_capacity(layers + 1);
        let mut attentions = Vec::new();
        for j in 0..=layers {
            let skip = if j == layers { ch.skip_in } else { ch.out };
            let cin = if j == 0 { ch.prev_out } else { ch.out };
            resnets.push(common.resnet(cin + skip, ch.out, 1.0, vb.pp(format!("resnets.{j}")))?);
            if let Some(heads) = attention.heads {
                attentions.push(common.transformer(
                    ch.out,
                    (heads, attention.depth),
                    (Place::Up, index, j),
                    vb.pp(format!("attentions.{j}")),
                )?);
            }
        }
        let upsampler = if upsample {
            Some(conv2d(ch.out, ch.out, 3, 1, 1, vb.pp("upsamplers.0.conv"))?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsampler,
        })
    }

    pub fn skips_needed(&self) -> usize {
        self.resnets.len()
    }

    /// `skips` hold this block's skip connections, shallowest first; `upsample_to` is the grid after upsampling.
    pub fn forward(
        &self,
        xs: &Tensor,
        skips: Vec<Tensor>,
        temb: &Tensor,
        context: &Tensor,
        upsample_to: Option<(usize, usize)>,
        mut hook: Option<&mut HookedPass>,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (j, (resnet, skip)) in self.resnets.iter().zip(skips.into_iter().rev()).enumerate() {
            xs = Tensor::cat(&[&xs, &skip], 1)?;
            xs = resnet.forward(&xs, Some(temb))?;
            if let Some(attn) = self.attentions.get(j) {
                xs = attn.forward(&xs, context, hook.as_deref_mut())?;
            }
        }
        if let Some(conv) = &self.upsampler {
            let (_, _, h, w) = xs.dims4()?;
            let (th, tw) = upsample_to.unwrap_or((2 * h, 2 * w));
            xs = conv.forward(&xs.upsample_nearest2d(th, tw)?)?;
        }
        Ok(xs)
    }
}
