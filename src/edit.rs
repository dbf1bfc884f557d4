//! Editing an inverted image: source and target prompts denoised together from z_T under the attention
//! controller (Prompt-to-Prompt + P2Plus + StyleDiffusion's value injection). Works with every inversion method.

use candle_core::{DType, Tensor};

use crate::control::edit::{CrossMap, EditControl, EditPlan, LocalBlend, cross_alpha};
use crate::control::record::blend_grid;
use crate::control::words::{refinement_mapper, replacement_mapper, require_word};
use crate::denoise::{Conditioning, Hook, Monitor, Phase, replay};
use crate::invert::Inversion;
use crate::limits::{MAX_REWEIGHT, finite_in, fraction};
use crate::model::StableDiffusion;
use crate::model::hook::Branch;
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum EditMode {
    /// Replace when both prompts have the same number of words, refine otherwise.
    Auto,
    Replace,
    Refine,
}

impl EditMode {
    pub const ALL: [Self; 3] = [Self::Auto, Self::Replace, Self::Refine];

    /// The mode a name (as [`EditMode::name`] spells it) stands for; the error lists them all.
    pub fn from_name(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == name)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|m| m.name()).collect();
                Error::invalid(
                    "mode",
                    format!("{name:?}: expected one of {}", names.join(", ")),
                )
            })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Replace => "replace",
            Self::Refine => "refine",
        }
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct EditSettings {
    pub target: String,
    pub mode: EditMode,
    /// Local blend words: (source words, target words).
    pub blend: Option<(Vec<String>, Vec<String>)>,
    /// Target words whose cross-attention is multiplied by a factor.
    pub reweight: Vec<(String, f64)>,
    /// Per-word cross-replace windows (word of the target prompt, end fraction).
    pub cross_words: Vec<(String, f64)>,
    pub tau_v: f64,
    pub tau_c: f64,
    pub tau_s: f64,
    pub tau_u: f64,
    pub blend_threshold: f32,
}

impl EditSettings {
    pub fn new(target: impl Into<String>) -> Self {
        Self {
            target: target.into(),
            mode: EditMode::Auto,
            blend: None,
            reweight: Vec::new(),
            cross_words: Vec::new(),
            tau_v: 0.5,
            tau_c: 0.6,
            tau_s: 0.6,
            tau_u: 0.0,
            blend_threshold: 0.3,
        }
    }
}

pub struct Edited {
    /// The source branch: the reconstruction, (1, 3, S, S) in [-1, 1].
    pub reconstruction: Tensor,
    /// The target branch: the edit.
    pub edited: Tensor,
}

impl EditSettings {
    /// The numbers and word lists alone (no model needed): finite, in range, non-empty.
    pub fn validate(&self) -> Result<()> {
        if self.target.trim().is_empty() {
            return Err(Error::invalid("target prompt", "is empty"));
        }
        for (name, v) in [
            ("tau_v", self.tau_v),
            ("tau_c", self.tau_c),
            ("tau_s", self.tau_s),
            ("tau_u", self.tau_u),
        ] {
            fraction(name, v)?;
        }
        fraction("blend threshold", self.blend_threshold as f64)?;
        for (w, f) in &self.reweight {
            finite_in("reweight factor", *f, -MAX_REWEIGHT, MAX_REWEIGHT)
                .map_err(|e| Error::invalid("reweight", format!("{w}: {e}")))?;
        }
        for (w, f) in &self.cross_words {
            fraction("cross-word fraction", *f)
                .map_err(|e| Error::invalid("cross word", format!("{w}: {e}")))?;
        }
        if let Some((src, tgt)) = &self.blend
            && (src.is_empty() || tgt.is_empty())
        {
            return Err(Error::invalid(
                "blend",
                "local blend needs at least one source word and one target word",
            ));
        }
        Ok(())
    }
}

/// Builds the controller plan for an inversion and settings, checking every word against its prompt.
pub fn edit_plan(sd: &StableDiffusion, inv: &Inversion, s: &EditSettings) -> Result<EditPlan> {
    plan_edit(
        sd,
        &inv.source_prompt,
        inv.settings.steps,
        (inv.z_t.dim(2)?, inv.z_t.dim(3)?),
        inv.learned.values().map(<[_]>::to_vec),
        s,
    )
}

/// Checks an edit before the inversion it needs exists: numbers, prompt lengths, and every word (blend,
/// reweight, cross-word) against its prompt. Cheap: no network runs.
pub fn check_edit(
    sd: &StableDiffusion,
    source_prompt: &str,
    steps: usize,
    s: &EditSettings,
) -> Result<()> {
    let side = sd.native_size() / sd.vae.config().downscale();
    plan_edit(sd, source_prompt, steps, (side, side), None, s).map(|_| ())
}

fn plan_edit(
    sd: &StableDiffusion,
    src: &str,
    n: usize,
    (lh, lw): (usize, usize),
    values: Option<Vec<Tensor>>,
    s: &EditSettings,
) -> Result<EditPlan> {
    s.validate()?;
    sd.tokenizer.check_length(src)?;
    sd.tokenizer
        .check_length(&s.target)
        .map_err(|e| Error::invalid("target prompt", e.to_string()))?;
    let (tau_v, tau_c, tau_s, tau_u) = (s.tau_v, s.tau_c, s.tau_s, s.tau_u);
    let len = sd.tokenizer.max_length();
    let tgt = s.target.as_str();
    let same_count = src.split_whitespace().count() == tgt.split_whitespace().count();
    let replace = match s.mode {
        EditMode::Replace => true,
        EditMode::Refine => false,
        EditMode::Auto => same_count,
    };
    let device = &sd.device;
    let cross = if replace {
        CrossMap::Replace(Tensor::from_vec(
            replacement_mapper(&sd.tokenizer, src, tgt, len)?,
            (len, len),
            device,
        )?)
    } else {
        let (mapper, alphas) = refinement_mapper(&sd.tokenizer, src, tgt, len)?;
        let mapper: Vec<u32> = mapper.into_iter().map(|m| m as u32).collect();
        CrossMap::Refine {
            mapper: Tensor::new(mapper.as_slice(), device)?,
            alphas: Tensor::from_vec(alphas, (1, 1, len), device)?,
        }
    };
    let words = s
        .cross_words
        .iter()
        .map(|(w, end)| Ok((require_word(&sd.tokenizer, tgt, w)?, (0.0, *end))))
        .collect::<Result<Vec<_>>>()?;
    let equalizer = if s.reweight.is_empty() {
        None
    } else {
        let mut eq = vec![1f32; len];
        for (w, f) in &s.reweight {
            for p in require_word(&sd.tokenizer, tgt, w)? {
                if p < len {
                    eq[p] = *f as f32;
                }
            }
        }
        Some(eq)
    };
    let local_blend = match &s.blend {
        None => None,
        Some((sw, tw)) => {
            let mut weights = [vec![0f32; len], vec![0f32; len]];
            for (b, (prompt, list)) in [(src, sw), (tgt, tw)].into_iter().enumerate() {
                for w in list {
                    for p in require_word(&sd.tokenizer, prompt, w)? {
                        if p < len {
                            weights[b][p] = 1.0;
                        }
                    }
                }
            }
            Some(LocalBlend::new(
                weights,
                blend_grid(sd.unet.config(), (lh, lw)),
                (0.2 * n as f64) as usize,
                s.blend_threshold,
            ))
        }
    };
    let steps_of = |tau: f64| (tau * n as f64) as usize;
    Ok(EditPlan {
        steps: n,
        cross,
        cross_alpha: cross_alpha(n, len, (0.0, tau_c), &words),
        equalizer,
        self_window: (0, steps_of(tau_s)),
        uncond_window: (0, steps_of(tau_u)),
        // As SD's "at most 32x32 queries at 64x64 latents": every layer but the full-resolution ones.
        self_max_queries: lh * lw / 4,
        values,
        value_steps: (tau_v * n as f64).ceil() as usize,
        local_blend,
    })
}

/// Both branches of an edit (source, target) under the attention controller, with the inversion's unconditional
/// context of each step.
struct EditConditioning<'a> {
    sd: &'a StableDiffusion,
    inv: &'a Inversion,
    fixed_uncond: Option<Tensor>,
    context: Tensor,
    control: EditControl,
}

impl Conditioning for EditConditioning<'_> {
    fn contexts(&mut self, step: usize) -> Result<(Option<Tensor>, Tensor)> {
        let uncond = match &self.fixed_uncond {
            Some(u) => u.clone(),
            None => self.inv.unconditional(self.sd, step, 2)?,
        };
        Ok((Some(uncond), self.context.clone()))
    }

    fn hook(&mut self, _branch: Branch, _step: usize) -> Hook<'_> {
        Some(&mut self.control)
    }

    fn end_step(&mut self, step: usize, latents: Tensor) -> Result<Tensor> {
        Ok(self.control.end_step(step, &latents)?)
    }
}

/// Edits an inverted image: the source and target prompts denoised together from z_T under the controller.
pub fn edit(
    sd: &StableDiffusion,
    inv: &Inversion,
    s: &EditSettings,
    monitor: &mut Monitor,
) -> Result<Edited> {
    inv.check_fits(sd)?;
    let plan = edit_plan(sd, inv, s)?;
    crate::limits::ensure_fits(
        "this edit",
        sd.estimate_working_memory(2, (inv.z_t.dim(2)?, inv.z_t.dim(3)?), false),
        &sd.device,
    )?;
    let context = Tensor::cat(
        &[
            &sd.encode_prompt(&inv.source_prompt)?,
            &sd.encode_prompt(&s.target)?,
        ],
        0,
    )?;
    let mut conditioning = EditConditioning {
        sd,
        inv,
        fixed_uncond: inv.fixed_unconditional(sd, 2)?,
        control: EditControl::new(plan, context.clone()),
        context,
    };
    let z = inv.z_t.to_dtype(sd.dtype)?;
    let z = Tensor::cat(&[&z, &z], 0)?;
    let (n, w) = (inv.settings.steps, inv.settings.guidance);
    let latents = replay(sd, &z, n, w, &mut conditioning, monitor, Phase::Editing)?;
    let images = sd.vae.decode(&latents)?.to_dtype(DType::F32)?;
    crate::util::ensure_finite(&images, "edited image")?;
    Ok(Edited {
        reconstruction: images.narrow(0, 0, 1)?,
        edited: images.narrow(0, 1, 1)?,
    })
}
