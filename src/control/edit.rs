//! Prompt-to-Prompt editing extended to the unconditional branch (P2Plus), with StyleDiffusion's value
//! injection, as one attention hook over a batch of two: index 0 = source prompt, 1 = target prompt.

use candle_core::{D, DType, Device, Result, Tensor};

use super::record::is_regularised;
use crate::model::hook::{AttentionCall, AttentionHook, Branch};

/// How target cross-attention is derived from the source's.
#[derive(Clone, Debug)]
pub enum CrossMap {
    /// Target = source x M, M a (77 x 77) token map (same word count, swapped words).
    Replace(Tensor),
    /// Target token k copies source token `mapper[k]` where `alphas[k] = 1`; new tokens keep their own maps.
    Refine { mapper: Tensor, alphas: Tensor },
}

/// Everything the controller needs, with step windows already in steps.
pub struct EditPlan {
    pub steps: usize,
    pub cross: CrossMap,
    /// Per step (steps + 1 rows, as P2P) and token: 1 where the target's cross-attention comes from the source.
    pub cross_alpha: Vec<Vec<f32>>,
    /// Multiplies the target's (replaced) cross-attention per token (the equaliser); None = no reweighting.
    pub equalizer: Option<Vec<f32>>,
    /// Steps [start, end) with conditional self-attention injection (tau_s).
    pub self_window: (usize, usize),
    /// Steps [start, end) with unconditional self-attention injection (P2Plus, tau_u).
    pub uncond_window: (usize, usize),
    /// Self-attention is injected only in layers with at most this many queries.
    pub self_max_queries: usize,
    /// StyleDiffusion: per step, h = M_t(image tokens) as (154, dim): value = c * h[..77] + h[77..].
    pub values: Option<Vec<Tensor>>,
    /// Value injection for the target while step < this (tau_v * steps).
    pub value_steps: usize,
    pub local_blend: Option<LocalBlend>,
}

/// Prompt-to-Prompt's local blend: a mask from the blend words' cross-attention, accumulated over steps, keeps
/// the target latent equal to the source outside it.
pub struct LocalBlend {
    /// Token weights per branch (source positions, target positions): 1 for blend words.
    pub words: [Vec<f32>; 2],
    pub grid: (usize, usize),
    /// First step (0-based) at which blending applies (0.2 * steps).
    pub start: usize,
    pub threshold: f32,
    /// Sum over steps of the per-step mean over layers and heads of the word-weighted maps, per branch.
    accumulated: Option<[Vec<f32>; 2]>,
    step_maps: Vec<Tensor>,
}

impl LocalBlend {
    pub fn new(words: [Vec<f32>; 2], grid: (usize, usize), start: usize, threshold: f32) -> Self {
        Self {
            words,
            grid,
            start,
            threshold,
            accumulated: None,
            step_maps: Vec::new(),
        }
    }

    fn record(&mut self, probs: &Tensor) -> Result<()> {
        self.step_maps.push(probs.to_dtype(DType::F32)?.detach());
        Ok(())
    }

    /// Ends a step: folds this step's maps into the running sum; returns the target's mask over the latent grid
    /// (1 = take the target) when blending applies at `step`.
    fn end_step(
        &mut self,
        step: usize,
        latent: (usize, usize),
        device: &Device,
    ) -> Result<Option<Tensor>> {
        if self.step_maps.is_empty() {
            return Ok(None);
        }
        let maps = Tensor::stack(&self.step_maps, 0)?; // (layers, 2, heads, Q, K)
        self.step_maps.clear();
        let per_branch: Vec<Vec<f32>> = (0..2)
            .map(|b| -> Result<Vec<f32>> {
                let w = Tensor::new(self.words[b].as_slice(), device)?;
                let m = maps.narrow(1, b, 1)?.squeeze(1)?; // (layers, heads, Q, K)
                m.broadcast_mul(&w)?
                    .sum(D::Minus1)?
                    .mean(0)?
                    .mean(0)?
                    .to_vec1::<f32>()
            })
            .collect::<Result<_>>()?;
        let acc = self.accumulated.get_or_insert_with(|| {
            [
                vec![0.0; per_branch[0].len()],
                vec![0.0; per_branch[0].len()],
            ]
        });
        for b in 0..2 {
            for (a, v) in acc[b].iter_mut().zip(&per_branch[b]) {
                *a += v;
            }
        }
        if step < self.start {
            return Ok(None);
        }
        let acc = acc.clone();
        let masks: Vec<Vec<bool>> = (0..2).map(|b| self.mask(&acc[b], latent)).collect();
        let target: Vec<f32> = masks[0]
            .iter()
            .zip(&masks[1])
            .map(|(s, t)| (*s || *t) as u8 as f32)
            .collect();
        Ok(Some(Tensor::from_vec(
            target,
            (1, 1, latent.0, latent.1),
            device,
        )?))
    }

    /// 3x3 max-pool, nearest upsampling to the latent grid, normalisation by the maximum, threshold.
    fn mask(&self, map: &[f32], latent: (usize, usize)) -> Vec<bool> {
        let (gh, gw) = self.grid;
        let pooled: Vec<f32> = (0..gh * gw)
            .map(|i| {
                let (y, x) = ((i / gw) as isize, (i % gw) as isize);
                let mut m = f32::MIN;
                for dy in -1..=1 {
                    for dx in -1..=1 {
                        let (yy, xx) = (y + dy, x + dx);
                        if yy >= 0 && xx >= 0 && (yy as usize) < gh && (xx as usize) < gw {
                            m = m.max(map[yy as usize * gw + xx as usize]);
                        }
                    }
                }
                m
            })
            .collect();
        let (h, w) = latent;
        let up: Vec<f32> = (0..h * w)
            .map(|i| pooled[((i / w) * gh / h) * gw + (i % w) * gw / w])
            .collect();
        let max = up.iter().copied().fold(f32::MIN, f32::max).max(1e-12);
        up.iter().map(|v| v / max > self.threshold).collect()
    }
}

/// The attention hook of an editing run.
pub struct EditControl {
    plan: EditPlan,
    /// Text embeddings (2, 77, dim): source and target.
    context: Tensor,
    step: usize,
    value_cache: Option<(usize, Tensor)>,
}

impl EditControl {
    pub fn new(plan: EditPlan, context: Tensor) -> Self {
        Self {
            plan,
            context,
            step: 0,
            value_cache: None,
        }
    }

    pub fn plan(&self) -> &EditPlan {
        &self.plan
    }

    /// After the step's guided update: applies the local blend to `latents` (2, C, h, w).
    pub fn end_step(&mut self, step: usize, latents: &Tensor) -> Result<Tensor> {
        self.step = step + 1;
        let Some(blend) = &mut self.plan.local_blend else {
            return Ok(latents.clone());
        };
        let (_, _, h, w) = latents.dims4()?;
        match blend.end_step(step, (h, w), latents.device())? {
            None => Ok(latents.clone()),
            Some(mask) => {
                let src = latents.narrow(0, 0, 1)?;
                let tgt = latents.narrow(0, 1, 1)?;
                let mask = mask.to_dtype(latents.dtype())?;
                let blended = (&src + (tgt - &src)?.broadcast_mul(&mask)?)?;
                Tensor::cat(&[&src, &blended], 0)
            }
        }
    }

    fn replace_cross(&self, base: &Tensor, target: &Tensor, step: usize) -> Result<Tensor> {
        let (h, q, k) = base.dims3()?;
        let mapped = match &self.plan.cross {
            CrossMap::Replace(m) => base
                .reshape((h * q, k))?
                .matmul(&m.to_dtype(base.dtype())?)?
                .reshape((h, q, k))?,
            CrossMap::Refine { mapper, alphas } => {
                let a = alphas.to_dtype(base.dtype())?;
                let gathered = base.index_select(mapper, 2)?;
                (gathered.broadcast_mul(&a)? + target.broadcast_mul(&(1.0 - &a)?)?)?
            }
        };
        let mapped = match &self.plan.equalizer {
            Some(eq) => mapped.broadcast_mul(
                &Tensor::new(eq.as_slice(), base.device())?.to_dtype(base.dtype())?,
            )?,
            None => mapped,
        };
        let row = &self.plan.cross_alpha[step.min(self.plan.cross_alpha.len() - 1)];
        let alpha = Tensor::new(row.as_slice(), base.device())?.to_dtype(base.dtype())?;
        mapped.broadcast_mul(&alpha)? + target.broadcast_mul(&(1.0 - &alpha)?)?
    }

    fn in_window(step: usize, window: (usize, usize)) -> bool {
        window.0 <= step && step < window.1
    }
}

impl AttentionHook for EditControl {
    fn value_input(&mut self, call: &AttentionCall, _key: &Tensor) -> Result<Option<Tensor>> {
        let Some(values) = &self.plan.values else {
            return Ok(None);
        };
        if call.branch != Branch::Conditional {
            return Ok(None);
        }
        if let Some((s, v)) = &self.value_cache
            && *s == call.step
        {
            return Ok(Some(v.clone()));
        }
        let h = &values[call.step.min(values.len() - 1)];
        let rows = self.context.dim(1)?;
        let (scale, shift) = (h.narrow(0, 0, rows)?, h.narrow(0, rows, rows)?);
        let styled =
            |c: &Tensor| -> Result<Tensor> { c.broadcast_mul(&scale)?.broadcast_add(&shift) };
        let src = styled(&self.context.narrow(0, 0, 1)?)?;
        let tgt_plain = self.context.narrow(0, 1, 1)?;
        let tgt = if call.step < self.plan.value_steps {
            styled(&tgt_plain)?
        } else {
            tgt_plain
        };
        let v = Tensor::cat(&[&src, &tgt], 0)?;
        self.value_cache = Some((call.step, v.clone()));
        Ok(Some(v))
    }

    /// Conditional cross-attention (replacement, reweighting, local blend) and the small self-attention layers
    /// inside their window; the unconditional branch's cross-attention and large self-attention pass unchanged.
    fn needs_probs(&self, call: &AttentionCall) -> bool {
        let window = match call.branch {
            Branch::Unconditional => self.plan.uncond_window,
            Branch::Conditional => self.plan.self_window,
        };
        match call.is_cross() {
            true => call.branch == Branch::Conditional,
            false => {
                call.queries() <= self.plan.self_max_queries && Self::in_window(call.step, window)
            }
        }
    }

    fn attention_probs(&mut self, call: &AttentionCall, probs: Tensor) -> Result<Tensor> {
        let step = call.step;
        let small = call.queries() <= self.plan.self_max_queries;
        let base = probs.get(0)?;
        let target = probs.get(1)?;
        let new_target = match (call.branch, call.is_cross()) {
            (Branch::Unconditional, false)
                if small && Self::in_window(step, self.plan.uncond_window) =>
            {
                base.clone()
            }
            (Branch::Unconditional, _) => return Ok(probs),
            (Branch::Conditional, true) => {
                let replaced =
                    Tensor::stack(&[&base, &self.replace_cross(&base, &target, step)?], 0)?;
                // The blend reads the target's maps after replacement and reweighting, as the reference does:
                // its attention store holds the very tensor the controller then overwrites.
                if let Some(blend) = &mut self.plan.local_blend
                    && is_regularised(call, blend.grid)
                {
                    blend.record(&replaced)?;
                }
                return Ok(replaced);
            }
            (Branch::Conditional, false)
                if small && Self::in_window(step, self.plan.self_window) =>
            {
                base.clone()
            }
            (Branch::Conditional, false) => return Ok(probs),
        };
        Tensor::stack(&[&base, &new_target], 0)
    }
}

/// P2P's per-step, per-token cross-replacement weights: `default` window for every token, then per-word windows
/// for those words' target token positions. Windows are fractions of the run; rows = steps + 1, as the reference.
pub fn cross_alpha(
    steps: usize,
    len: usize,
    default: (f64, f64),
    words: &[(Vec<usize>, (f64, f64))],
) -> Vec<Vec<f32>> {
    let rows = steps + 1;
    let bounds = |w: (f64, f64)| ((w.0 * rows as f64) as usize, (w.1 * rows as f64) as usize);
    let (s, e) = bounds(default);
    let mut alpha: Vec<Vec<f32>> = (0..rows)
        .map(|r| vec![if s <= r && r < e { 1.0 } else { 0.0 }; len])
        .collect();
    for (positions, window) in words {
        let (s, e) = bounds(*window);
        for (r, row) in alpha.iter_mut().enumerate() {
            for &p in positions {
                if p < len {
                    row[p] = if s <= r && r < e { 1.0 } else { 0.0 };
                }
            }
        }
    }
    alpha
}
