use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::model::nn::{Linear, linear};

/// Sinusoidal embedding of the timestep, as diffusers' `get_timestep_embedding`.
pub fn timestep_embedding(
    timesteps: &[f64],
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    device: &Device,
) -> Result<Tensor> {
    let half = dim / 2;
    // Computed in f32 like the reference so both agree to rounding.
    let ln_period = -(10000f32.ln());
    let freqs: Vec<f32> = (0..half)
        .map(|i| (ln_period * i as f32 / (half as f32 - freq_shift as f32)).exp())
        .collect();
    let mut rows = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let args: Vec<f32> = freqs.iter().map(|f| t as f32 * f).collect();
        let (sin, cos): (Vec<f32>, Vec<f32>) = args.iter().map(|a| (a.sin(), a.cos())).unzip();
        let (first, second) = if flip_sin_to_cos {
            (cos, sin)
        } else {
            (sin, cos)
        };
        rows.extend(first);
        rows.extend(second);
        if dim % 2 == 1 {
            rows.push(0.0);
        }
    }
    Tensor::from_vec(rows, (timesteps.len(), dim), device)
}

/// `time_embedding`: linear -> SiLU -> linear.
#[derive(Clone, Debug)]
pub struct TimestepMlp {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepMlp {
    pub fn load(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            linear_1: linear(in_dim, out_dim, vb.pp("linear_1"))?,
            linear_2: linear(out_dim, out_dim, vb.pp("linear_2"))?,
        })
    }
}

impl Module for TimestepMlp {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.linear_2
            .forward(&crate::model::nn::silu(&self.linear_1.forward(xs)?)?)
    }
}

pub fn to_dtype_of(xs: Tensor, dtype: DType) -> Result<Tensor> {
    if xs.dtype() == dtype {
        Ok(xs)
    } else {
        xs.to_dtype(dtype)
    }
}
