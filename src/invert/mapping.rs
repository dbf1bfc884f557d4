//! StyleDiffusion's per-timestep mapping network M_t: CLIP image tokens (T x D) -> h (2*77 x D), read as a
//! scale (rows 0..77) and a shift (rows 77..154) of the text embedding that feeds the VALUE projections.
//! As the authors' code: 1x1 Conv1d over the token axis T -> 154, then BLOCK_NUM blocks of [Conv1d 154 -> 154,
//! BatchNorm1d in training mode on a batch of one (each row normalised over its D features, learned per-row
//! scale and bias), LeakyReLU(0.01)], then Conv1d 154 -> 154.

use candle_core::{D, DType, Device, Result, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub const BLOCKS: usize = 1;
const BN_EPS: f64 = 1e-5;

#[derive(Clone)]
pub struct MappingNetwork {
    /// (name, parameter) in a fixed order.
    pub params: Vec<(String, Var)>,
    rows: usize,
}

/// PyTorch's default Conv1d initialisation: weight and bias uniform in +-1/sqrt(fan_in).
fn conv_init(
    rng: &mut StdRng,
    out: usize,
    fan_in: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let bound = 1.0 / (fan_in as f32).sqrt();
    let w: Vec<f32> = (0..out * fan_in)
        .map(|_| rng.random_range(-bound..bound))
        .collect();
    let b: Vec<f32> = (0..out).map(|_| rng.random_range(-bound..bound)).collect();
    Ok((
        Tensor::from_vec(w, (out, fan_in), device)?,
        Tensor::from_vec(b, out, device)?,
    ))
}

impl MappingNetwork {
    /// A fresh network for `tokens` image tokens and `rows` = 2 x text length, from a fixed seed.
    pub fn new(tokens: usize, rows: usize, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut params = Vec::new();
        let (w, b) = conv_init(&mut rng, rows, tokens, device)?;
        params.push(("conv_start.weight".to_string(), Var::from_tensor(&w)?));
        params.push(("conv_start.bias".to_string(), Var::from_tensor(&b)?));
        for k in 0..BLOCKS {
            let (w, b) = conv_init(&mut rng, rows, rows, device)?;
            params.push((format!("block.{k}.conv.weight"), Var::from_tensor(&w)?));
            params.push((format!("block.{k}.conv.bias"), Var::from_tensor(&b)?));
            params.push((
                format!("block.{k}.norm.weight"),
                Var::from_tensor(&Tensor::ones(rows, DType::F32, device)?)?,
            ));
            params.push((
                format!("block.{k}.norm.bias"),
                Var::from_tensor(&Tensor::zeros(rows, DType::F32, device)?)?,
            ));
        }
        let (w, b) = conv_init(&mut rng, rows, rows, device)?;
        params.push(("conv_end.weight".to_string(), Var::from_tensor(&w)?));
        params.push(("conv_end.bias".to_string(), Var::from_tensor(&b)?));
        Ok(Self { params, rows })
    }

    /// A copy with its own parameters (M_i starts as the trained M_{i-1}).
    pub fn duplicate(&self) -> Result<Self> {
        let params = self
            .params
            .iter()
            .map(|(n, v)| {
                Ok((
                    n.clone(),
                    Var::from_tensor(&v.as_tensor().detach().copy()?)?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            params,
            rows: self.rows,
        })
    }

    fn p(&self, i: usize) -> &Tensor {
        self.params[i].1.as_tensor()
    }

    /// `tokens`: (T, D) image tokens -> h: (rows, D).
    pub fn forward(&self, tokens: &Tensor) -> Result<Tensor> {
        let conv = |x: &Tensor, w: &Tensor, b: &Tensor| -> Result<Tensor> {
            w.matmul(x)?.broadcast_add(&b.unsqueeze(1)?)
        };
        let mut x = conv(tokens, self.p(0), self.p(1))?;
        for k in 0..BLOCKS {
            let base = 2 + 4 * k;
            x = conv(&x, self.p(base), self.p(base + 1))?;
            let mean = x.mean_keepdim(D::Minus1)?;
            let centred = x.broadcast_sub(&mean)?;
            let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
            x = centred.broadcast_div(&(var + BN_EPS)?.sqrt()?)?;
            x = x
                .broadcast_mul(&self.p(base + 2).unsqueeze(1)?)?
                .broadcast_add(&self.p(base + 3).unsqueeze(1)?)?;
            x = x.maximum(&(&x * 0.01)?)?;
        }
        let end = 2 + 4 * BLOCKS;
        conv(&x, self.p(end), self.p(end + 1))
    }
}

/// The value input c~ = c * h[..rows/2] + h[rows/2..] for a text embedding `c` (1, L, D).
pub fn styled_value(c: &Tensor, h: &Tensor) -> Result<Tensor> {
    let l = c.dim(1)?;
    c.broadcast_mul(&h.narrow(0, 0, l)?)?
        .broadcast_add(&h.narrow(0, l, l)?)
}
