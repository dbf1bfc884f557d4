use std::path::{Path, PathBuf};

use crate::model::config::{PerLevel, read_json};
use crate::{Error, Result};

fn default_true() -> bool {
    true
}
fn default_one() -> usize {
    1
}
fn default_groups() -> usize {
    32
}
fn default_eps() -> f64 {
    1e-5
}
fn default_scale() -> f64 {
    1.0
}
fn default_act() -> String {
    "silu".into()
}
fn default_transformer_layers() -> PerLevel<usize> {
    PerLevel::One(1)
}
fn default_sample_size() -> usize {
    64
}
fn default_channels() -> usize {
    4
}

/// `unet/config.json` of a UNet2DConditionModel (the fields SD 1.x / 2.x use; others are checked for support).
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
pub struct UNetConfig {
    #[serde(default = "default_channels")]
    pub in_channels: usize,
    #[serde(default = "default_channels")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "default_one")]
    pub layers_per_block: usize,
    /// Despite its name, diffusers reads this as the NUMBER of heads when `num_attention_heads` is absent.
    #[serde(default)]
    pub attention_head_dim: Option<PerLevel<usize>>,
    #[serde(default)]
    pub num_attention_heads: Option<PerLevel<usize>>,
    pub cross_attention_dim: usize,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default = "default_one")]
    pub downsample_padding: usize,
    #[serde(default = "default_scale")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "default_sample_size")]
    pub sample_size: usize,
    #[serde(default = "default_act")]
    pub act_fn: String,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "default_transformer_layers")]
    pub transformer_layers_per_block: PerLevel<usize>,
    #[serde(default)]
    pub only_cross_attention: PerLevel<bool>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub mid_block_type: Option<String>,
    #[serde(default)]
    pub time_embedding_type: Option<String>,
    #[serde(default)]
    pub resnet_time_scale_shift: Option<String>,
}

impl Default for PerLevel<bool> {
    fn default() -> Self {
        PerLevel::One(false)
    }
}

/// The per-level numbers the UNet is built from, after defaults and checks.
#[derive(Clone, Debug)]
pub struct LevelPlan {
    pub heads: Vec<usize>,
    pub transformer_layers: Vec<usize>,
    pub has_cross_attention_down: Vec<bool>,
    pub has_cross_attention_up: Vec<bool>,
}

impl UNetConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let cfg: Self = read_json(path)?;
        cfg.plan(path)?;
        Ok(cfg)
    }

    fn unsupported(
        path: &Path,
        what: &'static str,
        value: impl std::fmt::Debug,
        hint: &'static str,
    ) -> Error {
        Error::Unsupported {
            path: PathBuf::from(path),
            what,
            value: format!("{value:?}"),
            hint,
        }
    }

    /// Validates the config and resolves per-level values. `path` is only used in error messages.
    pub fn plan(&self, path: &Path) -> Result<LevelPlan> {
        let levels = self.block_out_channels.len();
        if levels == 0
            || self.down_block_types.len() != levels
            || self.up_block_types.len() != levels
        {
            return Err(Self::unsupported(
                path,
                "block layout",
                (
                    &self.block_out_channels,
                    &self.down_block_types,
                    &self.up_block_types,
                ),
                "block_out_channels, down_block_types and up_block_types need the same non-zero length",
            ));
        }
        for c in &self.block_out_channels {
            if c % self.norm_num_groups != 0 {
                return Err(Self::unsupported(
                    path,
                    "norm_num_groups",
                    (self.norm_num_groups, c),
                    "every block width must be divisible by norm_num_groups",
                ));
            }
        }
        let heads_src = self
            .num_attention_heads
            .as_ref()
            .or(self.attention_head_dim.as_ref())
            .cloned()
            .unwrap_or(PerLevel::One(8));
        let heads = heads_src.expand(levels).ok_or_else(|| {
            Self::unsupported(
                path,
                "attention_head_dim",
                &heads_src,
                "a number or one entry per level",
            )
        })?;
        let transformer_layers = self
            .transformer_layers_per_block
            .expand(levels)
            .ok_or_else(|| {
                Self::unsupported(
                    path,
                    "transformer_layers_per_block",
                    &self.transformer_layers_per_block,
                    "a number or one entry per level",
                )
            })?;
        if self.only_cross_attention != PerLevel::One(false)
            && self
                .only_cross_attention
                .expand(levels)
                .map(|v| v.iter().any(|b| *b))
                != Some(false)
        {
            return Err(Self::unsupported(
                path,
                "only_cross_attention",
                &self.only_cross_attention,
                "SD 1.x/2.x use false",
            ));
        }
        if self.dual_cross_attention {
            return Err(Self::unsupported(
                path,
                "dual_cross_attention",
                true,
                "SD 1.x/2.x use false",
            ));
        }
        if let Some(c) = &self.class_embed_type {
            return Err(Self::unsupported(
                path,
                "class_embed_type",
                c,
                "SD 1.x/2.x use null",
            ));
        }
        if let Some(c) = &self.addition_embed_type {
            return Err(Self::unsupported(
                path,
                "addition_embed_type",
                c,
                "SD 1.x/2.x use null (SDXL is not supported)",
            ));
        }
        if let Some(m) = &self.mid_block_type
            && m != "UNetMidBlock2DCrossAttn"
        {
            return Err(Self::unsupported(
                path,
                "mid_block_type",
                m,
                "only UNetMidBlock2DCrossAttn",
            ));
        }
        if let Some(t) = &self.time_embedding_type
            && t != "positional"
        {
            return Err(Self::unsupported(
                path,
                "time_embedding_type",
                t,
                "only positional",
            ));
        }
        if let Some(s) = &self.resnet_time_scale_shift
            && s != "default"
        {
            return Err(Self::unsupported(
                path,
                "resnet_time_scale_shift",
                s,
                "only default",
            ));
        }
        if self.act_fn != "silu" {
            return Err(Self::unsupported(path, "act_fn", &self.act_fn, "only silu"));
        }
        let cross = |t: &String, down: bool| -> Result<bool> {
            match (t.as_str(), down) {
                ("CrossAttnDownBlock2D", true) | ("CrossAttnUpBlock2D", false) => Ok(true),
                ("DownBlock2D", true) | ("UpBlock2D", false) => Ok(false),
                _ => Err(Self::unsupported(
                    path,
                    "block type",
                    t,
                    "down: CrossAttnDownBlock2D/DownBlock2D, up: CrossAttnUpBlock2D/UpBlock2D",
                )),
            }
        };
        let has_cross_attention_down = self
            .down_block_types
            .iter()
            .map(|t| cross(t, true))
            .collect::<Result<Vec<_>>>()?;
        let has_cross_attention_up = self
            .up_block_types
            .iter()
            .map(|t| cross(t, false))
            .collect::<Result<Vec<_>>>()?;
        for (level, (&c, &h)) in self.block_out_channels.iter().zip(&heads).enumerate() {
            if h == 0 || c % h != 0 {
                return Err(Self::unsupported(
                    path,
                    "attention heads",
                    (level, c, h),
                    "each level's width must be divisible by its head count",
                ));
            }
        }
        Ok(LevelPlan {
            heads,
            transformer_layers,
            has_cross_attention_down,
            has_cross_attention_up,
        })
    }
}
