//! Adam, shared by model training and the per-image optimisations of the inversion methods.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::Result;

/// Adam (Kingma & Ba) with bias correction and global gradient-norm clipping.
pub struct Adam {
    params: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    pub step: usize,
    clip: f64,
}

impl Adam {
    const B1: f64 = 0.9;
    const B2: f64 = 0.999;
    const EPS: f64 = 1e-8;

    pub fn new(
        params: Vec<(String, Var)>,
        clip: f64,
        state: &BTreeMap<String, Tensor>,
    ) -> Result<Self> {
        let mut m = Vec::with_capacity(params.len());
        let mut v = Vec::with_capacity(params.len());
        for (name, p) in &params {
            m.push(
                state
                    .get(&format!("adam.m.{name}"))
                    .cloned()
                    .unwrap_or(p.zeros_like()?),
            );
            v.push(
                state
                    .get(&format!("adam.v.{name}"))
                    .cloned()
                    .unwrap_or(p.zeros_like()?),
            );
        }
        Ok(Self {
            params,
            m,
            v,
            step: 0,
            clip,
        })
    }

    /// One update; returns the gradient norm before clipping.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<f64> {
        // Gradients carry the graph of the forward pass; detach so the optimiser state never holds it.
        let gs: Vec<Option<Tensor>> = self
            .params
            .iter()
            .map(|(_, p)| grads.get(p.as_tensor()).map(Tensor::detach))
            .collect();
        let mut sq = 0.0;
        for g in gs.iter().flatten() {
            sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
        let norm = sq.sqrt();
        let scale = if norm > self.clip {
            self.clip / norm
        } else {
            1.0
        };
        self.step += 1;
        let (c1, c2) = (
            1.0 - Self::B1.powi(self.step as i32),
            1.0 - Self::B2.powi(self.step as i32),
        );
        for (i, g) in gs.into_iter().enumerate() {
            let Some(g) = g else { continue };
            let g = (g * scale)?;
            self.m[i] = ((&self.m[i] * Self::B1)? + (&g * (1.0 - Self::B1))?)?;
            self.v[i] = ((&self.v[i] * Self::B2)? + (g.sqr()? * (1.0 - Self::B2))?)?;
            let update = ((&self.m[i] / c1)? / ((&self.v[i] / c2)?.sqrt()? + Self::EPS)?)?;
            let p = &self.params[i].1;
            p.set(&(p.as_tensor().detach() - (update * lr)?)?)?;
        }
        Ok(norm)
    }

    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.push((format!("adam.m.{name}"), self.m[i].clone()));
            out.push((format!("adam.v.{name}"), self.v[i].clone()));
        }
        out
    }
}
