//! Recording cross-attention maps at the regularisation resolution, optionally while supplying a value input
//! (StyleDiffusion's optimisation uses both at once).

use candle_core::{Result, Tensor};

use crate::model::hook::{AttentionCall, AttentionHook, Branch, LayerId, Place};
use crate::model::unet::UNetConfig;

/// The query grid of the coarsest down/up level that has cross-attention (16x16 for SD at 64x64 latents,
/// 4x4 for the toy model at 8x8): the resolution of StyleDiffusion's attention regularisation and of
/// Prompt-to-Prompt's local blend.
pub fn regularisation_grid(unet: &UNetConfig, latent: (usize, usize)) -> (usize, usize) {
    let deepest = unet
        .down_block_types
        .iter()
        .rposition(|t| t.starts_with("CrossAttn"))
        .unwrap_or(0);
    let (mut h, mut w) = latent;
    for _ in 0..deepest {
        (h, w) = (h.div_ceil(2), w.div_ceil(2));
    }
    (h, w)
}

/// Whether a call is one of the regularised layers: cross-attention, down or up blocks, at `grid`.
pub fn is_regularised(call: &AttentionCall, grid: (usize, usize)) -> bool {
    call.is_cross() && call.layer.place != Place::Mid && call.query_grid == grid
}

/// Keeps the conditional branch's cross-attention probabilities of the regularised layers, in call order, and
/// optionally gives every conditional cross-attention layer a value input.
pub struct MapRecorder {
    pub grid: (usize, usize),
    pub value: Option<Tensor>,
    pub maps: Vec<(LayerId, Tensor)>,
}

impl MapRecorder {
    pub fn new(grid: (usize, usize), value: Option<Tensor>) -> Self {
        Self {
            grid,
            value,
            maps: Vec::new(),
        }
    }

    pub fn take(&mut self) -> Vec<(LayerId, Tensor)> {
        std::mem::take(&mut self.maps)
    }
}

impl AttentionHook for MapRecorder {
    fn value_input(&mut self, call: &AttentionCall, _key: &Tensor) -> Result<Option<Tensor>> {
        Ok(if call.branch == Branch::Conditional {
            self.value.clone()
        } else {
            None
        })
    }

    fn attention_probs(&mut self, call: &AttentionCall, probs: Tensor) -> Result<Tensor> {
        if call.branch == Branch::Conditional && is_regularised(call, self.grid) {
            self.maps.push((call.layer, probs.clone()));
        }
        Ok(probs)
    }
}
