use std::path::Path;

use candle_core::{Device, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};

use super::{ClipEncoder, TowerSpec, parse_activation, tower_config};
use crate::model::nn::LayerNorm;

fn default_eps() -> f64 {
    1e-5
}
fn default_act() -> String {
    "quick_gelu".into()
}
fn default_positions() -> usize {
    77
}

/// `text_encoder/config.json` of a CLIPTextModel (or the `text_config` of a CLIPModel).
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

impl ClipTextConfig {
    pub fn load(path: &Path) -> crate::Result<Self> {
        let cfg: Self = tower_config(path, "text_config")?;
        parse_activation(path, &cfg.hidden_act)?;
        Ok(cfg)
    }
}

/// CLIP text transformer; its output (last hidden state after the final layer norm) conditions the UNet.
#[derive(Clone, Debug)]
pub struct ClipTextTransformer {
    token_embedding: Embedding,
    position_embedding: Tensor,
    encoder: ClipEncoder,
    final_layer_norm: LayerNorm,
    max_positions: usize,
}

impl ClipTextTransformer {
    /// `vb` points at the model root (names start with `text_model.`).
    pub fn load(cfg: &ClipTextConfig, vb: VarBuilder) -> crate::Result<Self> {
        let activation = parse_activation(Path::new("text_encoder/config.json"), &cfg.hidden_act)?;
        let vb = vb.pp("text_model");
        let spec = TowerSpec {
            hidden: cfg.hidden_size,
            intermediate: cfg.intermediate_size,
            layers: cfg.num_hidden_layers,
            heads: cfg.num_attention_heads,
            eps: cfg.layer_norm_eps,
            activation,
        };
        let emb = vb.pp("embeddings");
        Ok(Self {
            token_embedding: candle_nn::embedding(
                cfg.vocab_size,
                cfg.hidden_size,
                emb.pp("token_embedding"),
            )?,
            position_embedding: emb.get(
                (cfg.max_position_embeddings, cfg.hidden_size),
                "position_embedding.weight",
            )?,
            encoder: ClipEncoder::load(&spec, vb.pp("encoder"))?,
            final_layer_norm: LayerNorm::load(
                cfg.hidden_size,
                cfg.layer_norm_eps,
                vb.pp("final_layer_norm"),
            )?,
            max_positions: cfg.max_position_embeddings,
        })
    }

    fn causal_mask(n: usize, device: &Device) -> Result<Tensor> {
        let mask: Vec<f32> = (0..n)
            .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        Tensor::from_vec(mask, (n, n), device)
    }

    /// `input_ids`: (batch, tokens) u32 -> (batch, tokens, hidden).
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (_, n) = input_ids.dims2()?;
        if n > self.max_positions {
            candle_core::bail!(
                "text encoder: {n} tokens, at most {} positions",
                self.max_positions
            );
        }
        let tokens = self.token_embedding.forward(input_ids)?;
        let xs = tokens.broadcast_add(&self.position_embedding.narrow(0, 0, n)?)?;
        let mask = Self::causal_mask(n, xs.device())?.to_dtype(xs.dtype())?;
        let xs = self.encoder.forward(&xs, Some(&mask))?;
        self.final_layer_norm.forward(&xs)
    }
}
