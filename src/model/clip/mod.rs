//! CLIP: the text transformer that conditions the UNet and the vision transformer whose tokens StyleDiffusion
//! maps to value embeddings. Both share one encoder.

pub mod text;
pub mod vision;

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::model::nn::{Activation, LayerNorm, Linear, attention_matmul, linear, softmax_last_dim};

#[derive(Clone, Debug)]
struct SelfAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
}

impl SelfAttention {
    fn load(dim: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            q_proj: linear(dim, dim, vb.pp("q_proj"))?,
            k_proj: linear(dim, dim, vb.pp("k_proj"))?,
            v_proj: linear(dim, dim, vb.pp("v_proj"))?,
            out_proj: linear(dim, dim, vb.pp("out_proj"))?,
            heads,
        })
    }

    fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, n, d) = xs.dims3()?;
        let head_dim = d / self.heads;
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, n, self.heads, head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split((self.q_proj.forward(xs)? * (head_dim as f64).powf(-0.5))?)?;
        let k = split(self.k_proj.forward(xs)?)?;
        let v = split(self.v_proj.forward(xs)?)?;
        let mut scores = attention_matmul(&q, &k.t()?)?;
        if let Some(mask) = mask {
            scores = scores.broadcast_add(mask)?;
        }
        let out = attention_matmul(&softmax_last_dim(&scores)?, &v)?;
        self.out_proj
            .forward(&out.transpose(1, 2)?.reshape((b, n, d))?)
    }
}

#[derive(Clone, Debug)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: SelfAttention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    activation: Activation,
}

/// The transformer stack shared by text and vision towers.
#[derive(Clone, Debug)]
pub struct ClipEncoder {
    layers: Vec<EncoderLayer>,
}

/// Size of a CLIP tower.
#[derive(Clone, Copy, Debug)]
pub struct TowerSpec {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub eps: f64,
    pub activation: Activation,
}

impl ClipEncoder {
    pub fn load(spec: &TowerSpec, vb: VarBuilder) -> Result<Self> {
        let layers = (0..spec.layers)
            .map(|i| {
                let vb = vb.pp(format!("layers.{i}"));
                Ok(EncoderLayer {
                    layer_norm1: LayerNorm::load(spec.hidden, spec.eps, vb.pp("layer_norm1"))?,
                    self_attn: SelfAttention::load(spec.hidden, spec.heads, vb.pp("self_attn"))?,
                    layer_norm2: LayerNorm::load(spec.hidden, spec.eps, vb.pp("layer_norm2"))?,
                    fc1: linear(spec.hidden, spec.intermediate, vb.pp("mlp.fc1"))?,
                    fc2: linear(spec.intermediate, spec.hidden, vb.pp("mlp.fc2"))?,
                    activation: spec.activation,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }

    pub fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let mut xs = xs.clone();
        for layer in &self.layers {
            let attn = layer
                .self_attn
                .forward(&layer.layer_norm1.forward(&xs)?, mask)?;
            xs = (xs + attn)?;
            let h = layer.fc1.forward(&layer.layer_norm2.forward(&xs)?)?;
            let h = layer.fc2.forward(&layer.activation.forward(&h)?)?;
            xs = (xs + h)?;
        }
        Ok(xs)
    }
}

/// Reads a transformers config whose tower may be nested (`text_config` / `vision_config` of a CLIPModel).
pub(crate) fn tower_config<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
    nested_key: &str,
) -> crate::Result<T> {
    let value: serde_json::Value = crate::model::config::read_json(path)?;
    let tower = value.get(nested_key).cloned().unwrap_or(value);
    serde_json::from_value(tower).map_err(|source| crate::Error::Config {
        path: path.to_path_buf(),
        source,
    })
}

pub(crate) fn parse_activation(path: &std::path::Path, name: &str) -> crate::Result<Activation> {
    Activation::parse(name).ok_or_else(|| crate::Error::Unsupported {
        path: path.to_path_buf(),
        what: "hidden_act",
        value: name.to_string(),
        hint: "quick_gelu or gelu",
    })
}
