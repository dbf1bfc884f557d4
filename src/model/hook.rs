//! The one attention hook. Every attention layer of the UNet (self and cross, down, mid and up) hands its
//! probabilities to a single `AttentionHook`, and cross-attention layers ask it for their value input. Storing
//! maps, Prompt-to-Prompt replacement and StyleDiffusion's value override are implementations of this trait,
//! as diffusers' attention processors are; the UNet knows nothing about them.

use candle_core::{Result, Tensor};

/// Which part of the UNet an attention layer sits in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Place {
    Down,
    Mid,
    Up,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AttentionKind {
    SelfAttention,
    CrossAttention,
}

/// The identity of one attention layer, fixed when the UNet is built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LayerId {
    pub place: Place,
    /// Index of the block within its place (always 0 for the mid block).
    pub block: usize,
    /// Index of the transformer within the block.
    pub transformer: usize,
    /// Index of the transformer block within that transformer.
    pub layer: usize,
    pub kind: AttentionKind,
}

/// Classifier-free guidance branch a UNet evaluation belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Branch {
    Unconditional,
    Conditional,
}

/// Everything a hook knows about one attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionCall {
    pub layer: LayerId,
    /// Query grid (height, width) in latent positions.
    pub query_grid: (usize, usize),
    pub branch: Branch,
    /// Denoising step index (0 = noisiest), as set by the caller of the UNet.
    pub step: usize,
}

impl AttentionCall {
    pub fn is_cross(&self) -> bool {
        self.layer.kind == AttentionKind::CrossAttention
    }

    pub fn queries(&self) -> usize {
        self.query_grid.0 * self.query_grid.1
    }
}

/// Observes and steers attention. Both methods default to doing nothing.
pub trait AttentionHook {
    /// For cross-attention: the input of the VALUE projection, `(batch, tokens, dim)`, or `None` to use the key
    /// input (the text embedding) as usual. Gradients flow through whatever is returned.
    fn value_input(&mut self, call: &AttentionCall, key_input: &Tensor) -> Result<Option<Tensor>> {
        let _ = (call, key_input);
        Ok(None)
    }

    /// Whether [`Self::attention_probs`] must see this call's probabilities. Layers that answer no run a fused
    /// kernel that never materialises them (much faster and smaller for the 64x64 self-attention of a 512-pixel
    /// image), so a hook that looks only at some layers should say which.
    fn needs_probs(&self, call: &AttentionCall) -> bool {
        let _ = call;
        true
    }

    /// Sees the attention probabilities `(batch, heads, queries, keys)` and returns the ones to use.
    fn attention_probs(&mut self, call: &AttentionCall, probs: Tensor) -> Result<Tensor> {
        let _ = call;
        Ok(probs)
    }
}

/// A hook together with the branch and step of the UNet evaluation it serves.
pub struct HookedPass<'a> {
    pub hook: &'a mut dyn AttentionHook,
    pub branch: Branch,
    pub step: usize,
}

impl<'a> HookedPass<'a> {
    pub fn new(hook: &'a mut dyn AttentionHook, branch: Branch, step: usize) -> Self {
        Self { hook, branch, step }
    }

    pub fn reborrow(&mut self) -> HookedPass<'_> {
        HookedPass {
            hook: &mut *self.hook,
            branch: self.branch,
            step: self.step,
        }
    }
}
