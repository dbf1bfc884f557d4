use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::model::hook::{AttentionKind, HookedPass, LayerId};
use crate::model::nn::{Conv2d, GroupNorm, LayerNorm, Linear, conv2d, group_norm, linear};
use crate::model::unet::attention::Attention;

/// GEGLU feed-forward: Linear(dim, 2*inner) split into value and gate, value * gelu(gate), Linear(inner, dim).
#[derive(Clone, Debug)]
struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    fn load(dim: usize, vb: VarBuilder) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj_in: linear(dim, inner * 2, vb.pp("net.0.proj"))?,
            proj_out: linear(inner, dim, vb.pp("net.2"))?,
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.proj_out
            .forward(&crate::model::nn::geglu(&self.proj_in.forward(xs)?)?)
    }
}

/// Self-attention, cross-attention and feed-forward, each pre-normed and residual.
#[derive(Clone, Debug)]
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn load(
        dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        id: LayerId,
        vb: VarBuilder,
    ) -> Result<Self> {
        let self_id = LayerId {
            kind: AttentionKind::SelfAttention,
            ..id
        };
        let cross_id = LayerId {
            kind: AttentionKind::CrossAttention,
            ..id
        };
        Ok(Self {
            norm1: LayerNorm::load(dim, 1e-5, vb.pp("norm1"))?,
            attn1: Attention::load(dim, None, heads, head_dim, self_id, vb.pp("attn1"))?,
            norm2: LayerNorm::load(dim, 1e-5, vb.pp("norm2"))?,
            attn2: Attention::load(
                dim,
                Some(context_dim),
                heads,
                head_dim,
                cross_id,
                vb.pp("attn2"),
            )?,
            norm3: LayerNorm::load(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::load(dim, vb.pp("ff"))?,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        context: &Tensor,
        grid: (usize, usize),
        mut hook: Option<&mut HookedPass>,
    ) -> Result<Tensor> {
        let xs =
            (self
                .attn1
                .forward(&self.norm1.forward(xs)?, None, grid, hook.as_deref_mut())?
                + xs)?;
        let xs = (self
            .attn2
            .forward(&self.norm2.forward(&xs)?, Some(context), grid, hook)?
            + &xs)?;
        self.ff.forward(&self.norm3.forward(&xs)?)? + xs
    }
}

#[derive(Clone, Debug)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

/// Where a transformer sits, for naming its attention layers.
#[derive(Clone, Copy, Debug)]
pub struct TransformerSpec {
    pub channels: usize,
    pub heads: usize,
    pub context_dim: usize,
    pub depth: usize,
    pub groups: usize,
    pub linear_projection: bool,
}

/// Transformer2DModel: group norm, projection in, transformer blocks, projection out, residual.
#[derive(Clone, Debug)]
pub struct Transformer2D {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2D {
    /// `id` gives place, block and transformer index; layer and kind are filled per attention.
    pub fn load(spec: &TransformerSpec, id: LayerId, vb: VarBuilder) -> Result<Self> {
        let c = spec.channels;
        let head_dim = c / spec.heads;
        let proj = |name: &str| -> Result<Projection> {
            if spec.linear_projection {
                Ok(Projection::Linear(linear(c, c, vb.pp(name))?))
            } else {
                Ok(Projection::Conv(conv2d(c, c, 1, 1, 0, vb.pp(name))?))
            }
        };
        let blocks = (0..spec.depth)
            .map(|layer| {
                BasicTransformerBlock::load(
                    c,
                    spec.context_dim,
                    spec.heads,
                    head_dim,
                    LayerId { layer, ..id },
                    vb.pp(format!("transformer_blocks.{layer}")),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: group_norm(spec.groups, c, 1e-6, vb.pp("norm"))?,
            proj_in: proj("proj_in")?,
            blocks,
            proj_out: proj("proj_out")?,
        })
    }

    pub fn forward(
        &self,
        xs: &Tensor,
        context: &Tensor,
        mut hook: Option<&mut HookedPass>,
    ) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let normed = self.norm.forward(xs)?;
        let to_tokens = |t: Tensor| t.permute((0, 2, 3, 1))?.reshape((b, h * w, c));
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(conv.forward(&normed)?)?,
            Projection::Linear(lin) => lin.forward(&to_tokens(normed)?)?,
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, context, (h, w), hook.as_deref_mut())?;
        }
        let to_map = |t: Tensor| t.reshape((b, h, w, c))?.permute((0, 3, 1, 2));
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_map(tokens)?.contiguous()?)?,
            Projection::Linear(lin) => to_map(lin.forward(&tokens)?)?,
        };
        out + xs
    }
}
