//! UNet2DConditionModel for the SD 1.x and SD 2.x-base topologies, built from its config.json.

pub mod attention;
pub mod blocks;
pub mod config;
pub mod embeddings;
pub mod resnet;
pub mod transformer;

use std::path::Path;

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::model::hook::HookedPass;
use crate::model::nn::{Conv2d, GroupNorm, conv2d, group_norm};
use blocks::{BlockCommon, DownBlock, LevelAttention, MidBlock, UpBlock, UpChannels};
pub use config::UNetConfig;
use embeddings::{TimestepMlp, timestep_embedding};

#[derive(Clone, Debug)]
pub struct UNet2DConditionModel {
    conv_in: Conv2d,
    time_embedding: TimestepMlp,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    config: UNetConfig,
    /// UNet evaluations so far (one per forward call), for cost reports.
    evaluations: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl UNet2DConditionModel {
    pub fn load(config: &UNetConfig, vb: VarBuilder) -> crate::Result<Self> {
        let plan = config.plan(Path::new("unet/config.json"))?;
        Ok(Self::build(config, &plan, vb)?)
    }

    fn build(config: &UNetConfig, plan: &config::LevelPlan, vb: VarBuilder) -> Result<Self> {
        let widths = &config.block_out_channels;
        let levels = widths.len();
        let temb_channels = widths[0] * 4;
        let common = BlockCommon {
            temb_channels,
            groups: config.norm_num_groups,
            eps: config.norm_eps,
            context_dim: config.cross_attention_dim,
            linear_projection: config.use_linear_projection,
        };
        let mut down_blocks = Vec::with_capacity(levels);
        for i in 0..levels {
            let cin = if i == 0 { widths[0] } else { widths[i - 1] };
            let attention = LevelAttention {
                heads: plan.has_cross_attention_down[i].then_some(plan.heads[i]),
                depth: plan.transformer_layers[i],
            };
            let downsample = (i + 1 < levels).then_some(config.downsample_padding);
            down_blocks.push(DownBlock::load(
                &common,
                i,
                cin,
                widths[i],
                config.layers_per_block,
                attention,
                downsample,
                vb.pp(format!("down_blocks.{i}")),
            )?);
        }
        let mid_block = MidBlock::load(
            &common,
            widths[levels - 1],
            plan.heads[levels - 1],
            plan.transformer_layers[levels - 1],
            config.mid_block_scale_factor,
            vb.pp("mid_block"),
        )?;
        let mut up_blocks = Vec::with_capacity(levels);
        for i in 0..levels {
            let level = levels - 1 - i;
            let ch = UpChannels {
                prev_out: widths[if i == 0 { level } else { level + 1 }],
                out: widths[level],
                skip_in: widths[level.saturating_sub(1)],
            };
            let attention = LevelAttention {
                heads: plan.has_cross_attention_up[i].then_some(plan.heads[level]),
                depth: plan.transformer_layers[level],
            };
            up_blocks.push(UpBlock::load(
                &common,
                i,
                ch,
                config.layers_per_block,
                attention,
                i + 1 < levels,
                vb.pp(format!("up_blocks.{i}")),
            )?);
        }
        Ok(Self {
            conv_in: conv2d(config.in_channels, widths[0], 3, 1, 1, vb.pp("conv_in"))?,
            time_embedding: TimestepMlp::load(widths[0], temb_channels, vb.pp("time_embedding"))?,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(
                config.norm_num_groups,
                widths[0],
                config.norm_eps,
                vb.pp("conv_norm_out"),
            )?,
            conv_out: conv2d(widths[0], config.out_channels, 3, 1, 1, vb.pp("conv_out"))?,
            config: config.clone(),
            evaluations: Default::default(),
        })
    }

    /// How many times the UNet has been evaluated.
    pub fn evaluations(&self) -> usize {
        self.evaluations.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Predicts the model output (noise, for epsilon models) for `latents` (batch, C, h, w) at `timestep`,
    /// conditioned on `context` (batch, tokens, dim). The hook, when given, sees every attention layer.
    pub fn forward(
        &self,
        latents: &Tensor,
        timestep: f64,
        context: &Tensor,
        hook: Option<&mut HookedPass>,
    ) -> Result<Tensor> {
        let timesteps = vec![timestep; latents.dim(0)?];
        self.forward_timesteps(latents, &timesteps, context, hook)
    }

    /// As [`Self::forward`], with one timestep per batch element (training draws them independently).
    pub fn forward_timesteps(
        &self,
        latents: &Tensor,
        timesteps: &[f64],
        context: &Tensor,
        mut hook: Option<&mut HookedPass>,
    ) -> Result<Tensor> {
        let batch = latents.dim(0)?;
        self.evaluations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if timesteps.len() != batch {
            candle_core::bail!("UNet: {} timesteps for a batch of {batch}", timesteps.len());
        }
        if context.dim(0)? != batch {
            candle_core::bail!(
                "UNet: latents have batch {batch} but the text context has batch {}",
                context.dim(0)?
            );
        }
        let dtype = latents.dtype();
        let latents = if self.config.center_input_sample {
            ((latents * 2.0)? - 1.0)?
        } else {
            latents.clone()
        };
        let t_emb = timestep_embedding(
            timesteps,
            self.config.block_out_channels[0],
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
            latents.device(),
        )?
        .to_dtype(dtype)?;
        let temb = self.time_embedding.forward(&t_emb)?;

        let mut xs = self.conv_in.forward(&latents)?;
        let mut skips = vec![xs.clone()];
        for block in &self.down_blocks {
            let (out, block_skips) = block.forward(&xs, &temb, context, hook.as_deref_mut())?;
            xs = out;
            skips.extend(block_skips);
        }
        xs = self
            .mid_block
            .forward(&xs, &temb, context, hook.as_deref_mut())?;
        for block in &self.up_blocks {
            let block_skips = skips.split_off(skips.len() - block.skips_needed());
            let upsample_to = match skips.last() {
                Some(next) => {
                    let (_, _, h, w) = next.dims4()?;
                    Some((h, w))
                }
                None => None,
            };
            xs = block.forward(
                &xs,
                block_skips,
                &temb,
                context,
                upsample_to,
                hook.as_deref_mut(),
            )?;
        }
        let xs = crate::model::nn::silu(&self.conv_norm_out.forward(&xs)?)?;
        self.conv_out.forward(&xs)
    }
}
