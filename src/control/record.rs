//! Recording cross-attention maps at the regularisation resolution, optionally while supplying a value input
//! (StyleDiffusion's optimisation uses both at once).

use candle_core::{Result, Tensor};

use crate::model::hook::{AttentionCall, AttentionHook, Branch, LayerId, Place};
use crate::model::unet::UNetConfig;

/// The query grids of the levels that have cross-attention, finest first (64, 32, 16 for SD at 64x64 latents).
fn cross_attention_grids(unet: &UNetConfig, latent: (usize, usize)) -> Vec<(usize, usize)> {
    let mut grid = latent;
    let mut grids = Vec::new();
    for block in &unet.down_block_types {
        if block.starts_with("CrossAttn") {
            grids.push(grid);
        }
        grid = (grid.0.div_ceil(2), grid.1.div_ceil(2));
    }
    grids
}

/// The query grid of the coarsest down/up level that has cross-attention (16x16 for SD at 64x64 latents,
/// 4x4 for the toy model at 8x8): the resolution of StyleDiffusion's attention regularisation.
pub fn regularisation_grid(unet: &UNetConfig, latent: (usize, usize)) -> (usize, usize) {
    cross_attention_grids(unet, latent)
        .last()
        .copied()
        .unwrap_or(latent)
}

/// The query grid of Prompt-to-Prompt's local blend: the finest cross-attention level at most 16 cells across
/// (16x16 for SD at 64x64 latents, as P2P; 8x8 for the toy model, whose 4x4 level would make the 3x3 max-pool
/// cover the whole image), or the coarsest level when every level is wider.
pub fn blend_grid(unet: &UNetConfig, latent: (usize, usize)) -> (usize, usize) {
    cross_attention_grids(unet, latent)
        .into_iter()
        .find(|&(h, w)| h.max(w) <= 16)
        .unwrap_or_else(|| regularisation_grid(unet, latent))
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

    fn needs_probs(&self, call: &AttentionCall) -> bool {
        call.branch == Branch::Conditional && is_regularised(call, self.grid)
    }

    fn attention_probs(&mut self, call: &AttentionCall, probs: Tensor) -> Result<Tensor> {
        if call.branch == Branch::Conditional && is_regularised(call, self.grid) {
            self.maps.push((call.layer, probs.clone()));
        }
        Ok(probs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unet(down: &[&str]) -> UNetConfig {
        serde_json::from_value(serde_json::json!({
            "block_out_channels": vec![32; down.len()],
            "down_block_types": down,
            "up_block_types": down.iter().rev().map(|t| t.replace("Down", "Up")).collect::<Vec<_>>(),
            "cross_attention_dim": 64,
            "attention_head_dim": 8,
        }))
        .unwrap()
    }

    #[test]
    fn attention_grids_match_p2p_for_sd_and_stay_local_for_the_toy_model() {
        let sd = unet(&[
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ]);
        assert_eq!(regularisation_grid(&sd, (64, 64)), (16, 16));
        assert_eq!(blend_grid(&sd, (64, 64)), (16, 16));
        // A 768-pixel SD 2 image: no level is 16 cells or fewer, so the coarsest one.
        assert_eq!(blend_grid(&sd, (96, 96)), (24, 24));
        let toy = unet(&[
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ]);
        assert_eq!(regularisation_grid(&toy, (8, 8)), (4, 4));
        assert_eq!(blend_grid(&toy, (8, 8)), (8, 8));
    }
}
