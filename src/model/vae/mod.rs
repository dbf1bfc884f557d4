//! AutoencoderKL: encode an image to the mean of its latent distribution, decode latents to an image.

use std::path::Path;

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::model::config::read_json;
use crate::model::nn::{
    Conv2d, GroupNorm, Linear, conv2d, group_norm, linear, scaled_dot_product_attention,
};
use crate::model::unet::resnet::{ResnetBlock2D, ResnetSpec};

fn default_groups() -> usize {
    32
}
fn default_true() -> bool {
    true
}
fn default_one() -> usize {
    1
}
fn default_three() -> usize {
    3
}
fn default_four() -> usize {
    4
}
fn default_sample_size() -> usize {
    512
}

/// `vae/config.json`.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
pub struct VaeConfig {
    #[serde(default = "default_three")]
    pub in_channels: usize,
    #[serde(default = "default_three")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_one")]
    pub layers_per_block: usize,
    #[serde(default = "default_four")]
    pub latent_channels: usize,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_sample_size")]
    pub sample_size: usize,
    /// 0.18215 for SD 1.x/2.x when absent.
    #[serde(default)]
    pub scaling_factor: Option<f64>,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
    #[serde(default)]
    pub down_block_types: Vec<String>,
    #[serde(default)]
    pub up_block_types: Vec<String>,
}

impl VaeConfig {
    pub fn load(path: &Path) -> crate::Result<Self> {
        let cfg: Self = read_json(path)?;
        let bad =
            |what: &'static str, value: String, hint: &'static str| crate::Error::Unsupported {
                path: path.to_path_buf(),
                what,
                value,
                hint,
            };
        if cfg.block_out_channels.is_empty() {
            return Err(bad("block_out_channels", "[]".into(), "at least one level"));
        }
        if let Some(t) = cfg
            .down_block_types
            .iter()
            .find(|t| *t != "DownEncoderBlock2D")
        {
            return Err(bad("down block type", t.clone(), "only DownEncoderBlock2D"));
        }
        if let Some(t) = cfg.up_block_types.iter().find(|t| *t != "UpDecoderBlock2D") {
            return Err(bad("up block type", t.clone(), "only UpDecoderBlock2D"));
        }
        Ok(cfg)
    }

    pub fn scaling(&self) -> f64 {
        self.scaling_factor.unwrap_or(0.18215)
    }

    /// How many pixels one latent position covers along each axis.
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// Single-head spatial self-attention of the VAE's mid block.
#[derive(Clone, Debug)]
struct SpatialAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl SpatialAttention {
    fn load(channels: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            group_norm: group_norm(groups, channels, 1e-6, vb.pp("group_norm"))?,
            to_q: linear(channels, channels, vb.pp("to_q"))?,
            to_k: linear(channels, channels, vb.pp("to_k"))?,
            to_v: linear(channels, channels, vb.pp("to_v"))?,
            to_out: linear(channels, channels, vb.pp("to_out.0"))?,
        })
    }
}

impl Module for SpatialAttention {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let tokens = self
            .group_norm
            .forward(xs)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = self.to_q.forward(&tokens)?;
        let k = self.to_k.forward(&tokens)?;
        let v = self.to_v.forward(&tokens)?;
        let out = scaled_dot_product_attention(&q, &k, &v, (c as f64).powf(-0.5))?;
        let out = self
            .to_out
            .forward(&out)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        out + xs
    }
}

#[derive(Clone, Debug)]
struct MidBlock {
    first: ResnetBlock2D,
    attention: Option<SpatialAttention>,
    second: ResnetBlock2D,
}

impl MidBlock {
    fn load(channels: usize, groups: usize, with_attention: bool, vb: VarBuilder) -> Result<Self> {
        let spec = vae_resnet(channels, channels, groups);
        Ok(Self {
            first: ResnetBlock2D::load(&spec, vb.pp("resnets.0"))?,
            attention: if with_attention {
                Some(SpatialAttention::load(
                    channels,
                    groups,
                    vb.pp("attentions.0"),
                )?)
            } else {
                None
            },
            second: ResnetBlock2D::load(&spec, vb.pp("resnets.1"))?,
        })
    }
}

impl Module for MidBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = self.first.forward(xs, None)?;
        if let Some(attn) = &self.attention {
            xs = attn.forward(&xs)?;
        }
        self.second.forward(&xs, None)
    }
}

fn vae_resnet(in_channels: usize, out_channels: usize, groups: usize) -> ResnetSpec {
    ResnetSpec {
        in_channels,
        out_channels,
        temb_channels: None,
        groups,
        eps: 1e-6,
        output_scale_factor: 1.0,
    }
}

#[derive(Clone, Debug)]
struct EncoderLevel {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Conv2d>,
}

#[derive(Clone, Debug)]
struct Encoder {
    conv_in: Conv2d,
    levels: Vec<EncoderLevel>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn load(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let widths = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let mut levels = Vec::new();
        for (i, &out) in widths.iter().enumerate() {
            let vbl = vb.pp(format!("down_blocks.{i}"));
            let input = if i == 0 { widths[0] } else { widths[i - 1] };
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    ResnetBlock2D::load(
                        &vae_resnet(if j == 0 { input } else { out }, out, g),
                        vbl.pp(format!("resnets.{j}")),
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let downsampler = if i + 1 < widths.len() {
                Some(conv2d(out, out, 3, 2, 0, vbl.pp("downsamplers.0.conv"))?)
            } else {
                None
            };
            levels.push(EncoderLevel {
                resnets,
                downsampler,
            });
        }
        let top = *widths.last().expect("checked non-empty");
        Ok(Self {
            conv_in: conv2d(cfg.in_channels, widths[0], 3, 1, 1, vb.pp("conv_in"))?,
            levels,
            mid: MidBlock::load(top, g, cfg.mid_block_add_attention, vb.pp("mid_block"))?,
            norm_out: group_norm(g, top, 1e-6, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(top, 2 * cfg.latent_channels, 3, 1, 1, vb.pp("conv_out"))?,
        })
    }
}

impl Module for Encoder {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = self.conv_in.forward(xs)?;
        for level in &self.levels {
            for resnet in &level.resnets {
                xs = resnet.forward(&xs, None)?;
            }
            if let Some(down) = &level.downsampler {
                // Asymmetric padding (right and bottom only) before the stride-2 convolution.
                xs = down.forward(&xs.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?)?;
            }
        }
        let xs = self.mid.forward(&xs)?;
        self.conv_out
            .forward(&crate::model::nn::silu(&self.norm_out.forward(&xs)?)?)
    }
}

#[derive(Clone, Debug)]
struct DecoderLevel {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Conv2d>,
}

#[derive(Clone, Debug)]
struct Decoder {
    conv_in: Conv2d,
    mid: MidBlock,
    levels: Vec<DecoderLevel>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn load(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let reversed: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let g = cfg.norm_num_groups;
        let top = reversed[0];
        let mut levels = Vec::new();
        for (i, &out) in reversed.iter().enumerate() {
            let vbl = vb.pp(format!("up_blocks.{i}"));
            let input = if i == 0 { top } else { reversed[i - 1] };
            let resnets = (0..=cfg.layers_per_block)
                .map(|j| {
                    ResnetBlock2D::load(
                        &vae_resnet(if j == 0 { input } else { out }, out, g),
                        vbl.pp(format!("resnets.{j}")),
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let upsampler = if i + 1 < reversed.len() {
                Some(conv2d(out, out, 3, 1, 1, vbl.pp("upsamplers.0.conv"))?)
            } else {
                None
            };
            levels.push(DecoderLevel { resnets, upsampler });
        }
        let bottom = cfg.block_out_channels[0];
        Ok(Self {
            conv_in: conv2d(cfg.latent_channels, top, 3, 1, 1, vb.pp("conv_in"))?,
            mid: MidBlock::load(top, g, cfg.mid_block_add_attention, vb.pp("mid_block"))?,
            levels,
            norm_out: group_norm(g, bottom, 1e-6, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(bottom, cfg.out_channels, 3, 1, 1, vb.pp("conv_out"))?,
        })
    }
}

impl Module for Decoder {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = self.mid.forward(&self.conv_in.forward(xs)?)?;
        for level in &self.levels {
            for resnet in &level.resnets {
                xs = resnet.forward(&xs, None)?;
            }
            if let Some(up) = &level.upsampler {
                let (_, _, h, w) = xs.dims4()?;
                xs = up.forward(&xs.upsample_nearest2d(2 * h, 2 * w)?)?;
            }
        }
        self.conv_out
            .forward(&crate::model::nn::silu(&self.norm_out.forward(&xs)?)?)
    }
}

#[derive(Clone, Debug)]
pub struct AutoencoderKL {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    config: VaeConfig,
}

impl AutoencoderKL {
    pub fn load(config: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let l = config.latent_channels;
        Ok(Self {
            encoder: Encoder::load(config, vb.pp("encoder"))?,
            decoder: Decoder::load(config, vb.pp("decoder"))?,
            quant_conv: if config.use_quant_conv {
                Some(conv2d(2 * l, 2 * l, 1, 1, 0, vb.pp("quant_conv"))?)
            } else {
                None
            },
            post_quant_conv: if config.use_post_quant_conv {
                Some(conv2d(l, l, 1, 1, 0, vb.pp("post_quant_conv"))?)
            } else {
                None
            },
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Mean of the posterior for images in [-1, 1], (batch, 3, H, W); NOT yet multiplied by the scaling factor.
    pub fn encode_mean(&self, images: &Tensor) -> Result<Tensor> {
        let mut moments = self.encoder.forward(images)?;
        if let Some(q) = &self.quant_conv {
            moments = q.forward(&moments)?;
        }
        moments.narrow(1, 0, self.config.latent_channels)
    }

    /// Diffusion latents: `scaling_factor * mean`.
    pub fn encode(&self, images: &Tensor) -> Result<Tensor> {
        self.encode_mean(images)? * self.config.scaling()
    }

    /// Images in about [-1, 1] from diffusion latents (divides by the scaling factor first).
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let mut z = (latents / self.config.scaling())?;
        if let Some(q) = &self.post_quant_conv {
            z = q.forward(&z)?;
        }
        self.decoder.forward(&z)
    }
}
