use std::path::Path;

use candle_core::{Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use image::imageops::FilterType;

use super::{ClipEncoder, TowerSpec, parse_activation, tower_config};
use crate::model::nn::{Conv2d, Conv2dConfig, LayerNorm, Linear, linear_no_bias};

fn default_eps() -> f64 {
    1e-5
}
fn default_act() -> String {
    "quick_gelu".into()
}
fn default_channels() -> usize {
    3
}

/// CLIP's image normalisation.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// `image_encoder/config.json` of a CLIPVisionModel(WithProjection), or the `vision_config` of a CLIPModel.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub projection_dim: Option<usize>,
}

impl ClipVisionConfig {
    pub fn load(path: &Path) -> crate::Result<Self> {
        let cfg: Self = tower_config(path, "vision_config")?;
        parse_activation(path, &cfg.hidden_act)?;
        if cfg.patch_size == 0 || !cfg.image_size.is_multiple_of(cfg.patch_size) {
            return Err(crate::Error::Unsupported {
                path: path.to_path_buf(),
                what: "image_size/patch_size",
                value: format!("{}/{}", cfg.image_size, cfg.patch_size),
                hint: "image_size must be a multiple of patch_size",
            });
        }
        Ok(cfg)
    }

    pub fn tokens(&self) -> usize {
        (self.image_size / self.patch_size).pow(2) + 1
    }
}

/// What the vision tower returns.
#[derive(Clone, Debug)]
pub struct VisionOutput {
    /// Post-layer-norm applied to EVERY token of the last hidden state: (batch, 1 + patches, hidden).
    /// This is what StyleDiffusion's mapping network reads.
    pub tokens: Tensor,
    /// Post-layer-normed class token: (batch, hidden).
    pub pooled: Tensor,
    /// `visual_projection(pooled)` when the checkpoint has a projection: (batch, projection_dim).
    pub image_embeds: Option<Tensor>,
}

#[derive(Clone, Debug)]
pub struct ClipVisionTransformer {
    class_embedding: Tensor,
    patch_embedding: Conv2d,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    encoder: ClipEncoder,
    post_layernorm: LayerNorm,
    visual_projection: Option<Linear>,
    image_size: usize,
}

impl ClipVisionTransformer {
    /// `vb` points at the checkpoint root (names `vision_model.*`, optional `visual_projection.weight`).
    pub fn load(cfg: &ClipVisionConfig, vb: VarBuilder) -> crate::Result<Self> {
        let activation = parse_activation(Path::new("image_encoder/config.json"), &cfg.hidden_act)?;
        let spec = TowerSpec {
            hidden: cfg.hidden_size,
            intermediate: cfg.intermediate_size,
            layers: cfg.num_hidden_layers,
            heads: cfg.num_attention_heads,
            eps: cfg.layer_norm_eps,
            activation,
        };
        let visual_projection = match cfg.projection_dim {
            Some(p) if vb.contains_tensor("visual_projection.weight") => Some(linear_no_bias(
                cfg.hidden_size,
                p,
                vb.pp("visual_projection"),
            )?),
            _ => None,
        };
        let vm = vb.pp("vision_model");
        let emb = vm.pp("embeddings");
        let d = cfg.hidden_size;
        let patch_weight = emb.get(
            (d, cfg.num_channels, cfg.patch_size, cfg.patch_size),
            "patch_embedding.weight",
        )?;
        let patch_cfg = Conv2dConfig {
            stride: cfg.patch_size,
            ..Default::default()
        };
        Ok(Self {
            class_embedding: emb.get(d, "class_embedding")?,
            patch_embedding: Conv2d::new(patch_weight, None, patch_cfg),
            position_embedding: emb.get((cfg.tokens(), d), "position_embedding.weight")?,
            pre_layrnorm: LayerNorm::load(d, cfg.layer_norm_eps, vm.pp("pre_layrnorm"))?,
            encoder: ClipEncoder::load(&spec, vm.pp("encoder"))?,
            post_layernorm: LayerNorm::load(d, cfg.layer_norm_eps, vm.pp("post_layernorm"))?,
            visual_projection,
            image_size: cfg.image_size,
        })
    }

    pub fn image_size(&self) -> usize {
        self.image_size
    }

    /// `pixel_values`: (batch, 3, size, size), already normalised (see [`preprocess`]).
    pub fn forward(&self, pixel_values: &Tensor) -> Result<VisionOutput> {
        let b = pixel_values.dim(0)?;
        let patches = self
            .patch_embedding
            .forward(pixel_values)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let d = self.class_embedding.dim(0)?;
        let class = self
            .class_embedding
            .reshape((1, 1, d))?
            .broadcast_as((b, 1, d))?
            .to_dtype(patches.dtype())?;
        let xs = Tensor::cat(&[&class, &patches], 1)?.broadcast_add(&self.position_embedding)?;
        let xs = self
            .encoder
            .forward(&self.pre_layrnorm.forward(&xs)?, None)?;
        let tokens = self.post_layernorm.forward(&xs)?;
        let pooled = tokens.narrow(1, 0, 1)?.squeeze(1)?;
        let image_embeds = match &self.visual_projection {
            Some(p) => Some(p.forward(&pooled)?),
            None => None,
        };
        Ok(VisionOutput {
            tokens,
            pooled,
            image_embeds,
        })
    }
}

/// CLIP preprocessing: resize the shorter side to `size` (bicubic), centre-crop `size` x `size`, scale to [0, 1],
/// normalise with CLIP's mean and std. Returns (1, 3, size, size) f32.
pub fn preprocess(image: &image::DynamicImage, size: usize, device: &Device) -> Result<Tensor> {
    let rgb = image.to_rgb8();
    let (w, h) = rgb.dimensions();
    // As transformers: the shorter side becomes `size`, the longer one size * long / short, truncated.
    let (short, long) = (w.min(h) as usize, w.max(h) as usize);
    let long_target = (size * long / short).max(size) as u32;
    let (nw, nh) = if w <= h {
        (size as u32, long_target)
    } else {
        (long_target, size as u32)
    };
    let resized = image::imageops::resize(&rgb, nw, nh, FilterType::CatmullRom);
    let (left, top) = ((nw - size as u32) / 2, (nh - size as u32) / 2);
    let cropped =
        image::imageops::crop_imm(&resized, left, top, size as u32, size as u32).to_image();
    let mut data = vec![0f32; 3 * size * size];
    for (x, y, p) in cropped.enumerate_pixels() {
        for c in 0..3 {
            data[c * size * size + y as usize * size + x as usize] =
                (p[c] as f32 / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c];
        }
    }
    Tensor::from_vec(data, (1, 3, size, size), device)
}

/// Images in [-1, 1] already at the encoder's size -> CLIP-normalised pixel values (differentiable).
pub fn clip_normalize(images: &Tensor) -> Result<Tensor> {
    let dev = images.device();
    let mean = Tensor::new(&CLIP_MEAN, dev)?
        .reshape((1, 3, 1, 1))?
        .to_dtype(images.dtype())?;
    let std = Tensor::new(&CLIP_STD, dev)?
        .reshape((1, 3, 1, 1))?
        .to_dtype(images.dtype())?;
    ((images + 1.0)? / 2.0)?
        .broadcast_sub(&mean)?
        .broadcast_div(&std)
}
