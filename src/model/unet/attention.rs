use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::model::hook::{AttentionCall, AttentionKind, HookedPass, LayerId};
use crate::model::nn::{
    Linear, attention_matmul, compute_dtype, linear, linear_no_bias, multi_head_attention,
    softmax_last_dim,
};

/// Multi-head attention of the UNet's transformer blocks (diffusers' `Attention`), with the attention hook.
#[derive(Clone, Debug)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
    id: LayerId,
}

impl Attention {
    /// `context_dim` is `None` for self-attention.
    pub fn load(
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        head_dim: usize,
        id: LayerId,
        vb: VarBuilder,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let context_dim = context_dim.unwrap_or(query_dim);
        Ok(Self {
            to_q: linear_no_bias(query_dim, inner, vb.pp("to_q"))?,
            to_k: linear_no_bias(context_dim, inner, vb.pp("to_k"))?,
            to_v: linear_no_bias(context_dim, inner, vb.pp("to_v"))?,
            to_out: linear(inner, query_dim, vb.pp("to_out.0"))?,
            heads,
            head_dim,
            id,
        })
    }

    pub fn id(&self) -> LayerId {
        self.id
    }

    /// (batch, tokens, heads*head_dim) -> (batch, heads, tokens, head_dim)
    fn split_heads(&self, xs: Tensor) -> Result<Tensor> {
        let (b, n, _) = xs.dims3()?;
        xs.reshape((b, n, self.heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// `xs`: (batch, queries, dim) on a `grid` of latent positions; `context`: the key input for cross-attention.
    pub fn forward(
        &self,
        xs: &Tensor,
        context: Option<&Tensor>,
        grid: (usize, usize),
        hook: Option<&mut HookedPass>,
    ) -> Result<Tensor> {
        let key_input = context.unwrap_or(xs);
        let mut hook = hook;
        let call = hook.as_ref().map(|h| AttentionCall {
            layer: self.id,
            query_grid: grid,
            branch: h.branch,
            step: h.step,
        });
        let value_input = match (&mut hook, &call) {
            (Some(h), Some(call)) if self.id.kind == AttentionKind::CrossAttention => {
                h.hook.value_input(call, key_input)?
            }
            _ => None,
        };
        if let Some(v) = &value_input
            && v.dims() != key_input.dims()
        {
            candle_core::bail!(
                "attention hook gave a value input of shape {:?} for layer {:?}; the key input has shape {:?}",
                v.dims(),
                self.id,
                key_input.dims()
            );
        }
        let dtype = xs.dtype();
        let q = self.to_q.forward(xs)?;
        let k = self.to_k.forward(key_input)?;
        let v = self
            .to_v
            .forward(value_input.as_ref().unwrap_or(key_input))?;
        let scale = (self.head_dim as f64).powf(-0.5);
        let out = match (&mut hook, &call) {
            (Some(h), Some(call)) if h.hook.needs_probs(call) => {
                let (q, k, v) = (
                    self.split_heads(q)?,
                    self.split_heads(k)?,
                    self.split_heads(v)?,
                );
                // Scores in f32 even for half-precision weights, as diffusers' upcast paths do.
                let upcast = compute_dtype(dtype);
                let (qf, kf) = (q.to_dtype(upcast)?, k.to_dtype(upcast)?);
                let scores = (attention_matmul(&qf, &kf.t()?)? * scale)?;
                let probs = h.hook.attention_probs(call, softmax_last_dim(&scores)?)?;
                let out = attention_matmul(&probs.to_dtype(dtype)?, &v)?;
                let (b, _, n, _) = out.dims4()?;
                out.transpose(1, 2)?
                    .reshape((b, n, self.heads * self.head_dim))?
            }
            _ => multi_head_attention(&q, &k, &v, self.heads, scale)?,
        };
        self.to_out.forward(&out)
    }
}
