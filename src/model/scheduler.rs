//! The DDIM sampler with Stable Diffusion's noise schedule, and its inverse step for DDIM inversion.
//! Whatever scheduler a folder names (SD v1.5 ships PNDM's config), sampling uses DDIM with that config's
//! betas, timestep offset and prediction type; eta is 0.

use std::path::Path;

use candle_core::{Result, Tensor};

use crate::model::config::read_json;

fn default_train_steps() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.0001
}
fn default_beta_end() -> f64 {
    0.02
}
fn default_schedule() -> String {
    "linear".into()
}
fn default_prediction() -> String {
    "epsilon".into()
}
fn default_spacing() -> String {
    "leading".into()
}
fn default_true() -> bool {
    true
}

/// `scheduler/scheduler_config.json`, whatever class it names.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    #[serde(default = "default_train_steps")]
    pub num_train_timesteps: usize,
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    #[serde(default = "default_schedule")]
    pub beta_schedule: String,
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default = "default_true")]
    pub set_alpha_to_one: bool,
    #[serde(default = "default_prediction")]
    pub prediction_type: String,
    #[serde(default = "default_spacing")]
    pub timestep_spacing: String,
    /// Clamp the predicted x0. When absent: diffusers' DDIMScheduler default (true) for a DDIM config, false for
    /// the other classes (PNDM configs never carry the key; the published SD folders say false).
    #[serde(default)]
    pub clip_sample: Option<bool>,
    #[serde(default = "default_clip_range")]
    pub clip_sample_range: f64,
}

fn default_clip_range() -> f64 {
    1.0
}

impl SchedulerConfig {
    pub fn load(path: &Path) -> crate::Result<Self> {
        let cfg: Self = read_json(path)?;
        Ddim::new(&cfg).map_err(|message| crate::Error::file(path, message))?;
        Ok(cfg)
    }

    /// Stable Diffusion v1.x's settings, as in ALGORITHM.md.
    pub fn stable_diffusion() -> Self {
        Self {
            class_name: Some("DDIMScheduler".into()),
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".into(),
            trained_betas: None,
            steps_offset: 1,
            set_alpha_to_one: false,
            prediction_type: "epsilon".into(),
            timestep_spacing: "leading".into(),
            clip_sample: Some(false),
            clip_sample_range: 1.0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    VPrediction,
    Sample,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Spacing {
    Leading,
    Trailing,
    Linspace,
}

#[derive(Clone, Debug)]
pub struct Ddim {
    alphas_cumprod: Vec<f64>,
    final_alpha_cumprod: f64,
    train_steps: usize,
    steps_offset: usize,
    prediction: Prediction,
    spacing: Spacing,
    clip_range: Option<f64>,
}

impl Ddim {
    pub fn new(cfg: &SchedulerConfig) -> std::result::Result<Self, String> {
        let n = cfg.num_train_timesteps;
        if n < 2 {
            return Err(format!("num_train_timesteps must be at least 2, got {n}"));
        }
        // Betas are made in f32 like the reference implementation, so the schedules agree to rounding.
        let linspace = |a: f64, b: f64| -> Vec<f64> {
            (0..n)
                .map(|i| (a + (b - a) * i as f64 / (n - 1) as f64) as f32 as f64)
                .collect()
        };
        let betas: Vec<f64> = match (&cfg.trained_betas, cfg.beta_schedule.as_str()) {
            (Some(b), _) if b.len() == n => b.clone(),
            (Some(b), _) => {
                return Err(format!(
                    "trained_betas has {} entries, num_train_timesteps is {n}",
                    b.len()
                ));
            }
            (None, "linear") => linspace(cfg.beta_start, cfg.beta_end),
            (None, "scaled_linear") => linspace(cfg.beta_start.sqrt(), cfg.beta_end.sqrt())
                .iter()
                .map(|b| ((b * b) as f32) as f64)
                .collect(),
            (None, "squaredcos_cap_v2") => (0..n)
                .map(|i| {
                    let f = |t: f64| {
                        ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                            .cos()
                            .powi(2)
                    };
                    (1.0 - f((i + 1) as f64 / n as f64) / f(i as f64 / n as f64)).min(0.999)
                })
                .collect(),
            (None, other) => {
                return Err(format!(
                    "unsupported beta_schedule {other:?} (linear, scaled_linear, squaredcos_cap_v2)"
                ));
            }
        };
        let mut alphas_cumprod = Vec::with_capacity(n);
        let mut acc = 1.0f32;
        for b in &betas {
            acc *= 1.0 - *b as f32;
            alphas_cumprod.push(acc as f64);
        }
        let prediction = match cfg.prediction_type.as_str() {
            "epsilon" => Prediction::Epsilon,
            "v_prediction" => Prediction::VPrediction,
            "sample" => Prediction::Sample,
            other => {
                return Err(format!(
                    "unsupported prediction_type {other:?} (epsilon, v_prediction, sample)"
                ));
            }
        };
        let spacing = match cfg.timestep_spacing.as_str() {
            "leading" => Spacing::Leading,
            "trailing" => Spacing::Trailing,
            "linspace" => Spacing::Linspace,
            other => {
                return Err(format!(
                    "unsupported timestep_spacing {other:?} (leading, trailing, linspace)"
                ));
            }
        };
        Ok(Self {
            final_alpha_cumprod: if cfg.set_alpha_to_one {
                1.0
            } else {
                alphas_cumprod[0]
            },
            alphas_cumprod,
            train_steps: n,
            steps_offset: cfg.steps_offset,
            prediction,
            spacing,
            clip_range: cfg
                .clip_sample
                .unwrap_or(cfg.class_name.as_deref() == Some("DDIMScheduler"))
                .then_some(cfg.clip_sample_range),
        })
    }

    pub fn prediction(&self) -> Prediction {
        self.prediction
    }

    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    /// The timesteps of an `steps`-step sampling run, noisiest first, exactly as diffusers' DDIMScheduler.
    pub fn timesteps(&self, steps: usize) -> crate::Result<Vec<usize>> {
        let max = self.max_steps();
        if steps == 0 || steps > max {
            return Err(crate::Error::invalid(
                "steps",
                format!("{steps}: must be between 1 and {max} for this scheduler"),
            ));
        }
        Ok(self.raw_timesteps(steps))
    }

    /// The most sampling steps whose timesteps all lie inside the training schedule (999 for SD's leading
    /// spacing with offset 1: 1000 steps would reach timestep 1000).
    pub fn max_steps(&self) -> usize {
        let n = self.train_steps;
        (1..=n)
            .rev()
            .find(|&s| self.raw_timesteps(s).iter().all(|&t| t < n))
            .unwrap_or(0)
    }

    fn raw_timesteps(&self, steps: usize) -> Vec<usize> {
        let n = self.train_steps;
        match self.spacing {
            Spacing::Leading => {
                let ratio = n / steps;
                (0..steps)
                    .rev()
                    .map(|i| i * ratio + self.steps_offset)
                    .collect()
            }
            Spacing::Trailing => {
                let ratio = n as f64 / steps as f64;
                (0..steps)
                    .map(|i| {
                        ((n as f64 - i as f64 * ratio).round_ties_even() as usize).saturating_sub(1)
                    })
                    .collect()
            }
            Spacing::Linspace => (0..steps)
                .rev()
                .map(|i| {
                    let v = i as f64 * (n - 1) as f64 / (steps - 1).max(1) as f64;
                    v.round_ties_even() as usize
                })
                .collect(),
        }
    }

    fn step_size(&self, steps: usize) -> usize {
        self.train_steps / steps
    }

    fn alpha(&self, t: isize) -> f64 {
        if t >= 0 {
            self.alphas_cumprod[t as usize]
        } else {
            self.final_alpha_cumprod
        }
    }

    /// (predicted x0, predicted noise) from a model output at alpha-bar `a`.
    fn split_prediction(
        &self,
        output: &Tensor,
        sample: &Tensor,
        a: f64,
    ) -> Result<(Tensor, Tensor)> {
        let (sa, sb) = (a.sqrt(), (1.0 - a).sqrt());
        match self.prediction {
            Prediction::Epsilon => Ok((((sample - (output * sb)?)? / sa)?, output.clone())),
            Prediction::VPrediction => Ok((
                ((sample * sa)? - (output * sb)?)?,
                ((output * sa)? + (sample * sb)?)?,
            )),
            Prediction::Sample => Ok((output.clone(), ((sample - (output * sa)?)? / sb)?)),
        }
    }

    /// One deterministic DDIM step from timestep `t` to `t - train_steps/steps`.
    pub fn step(&self, output: &Tensor, t: usize, sample: &Tensor, steps: usize) -> Result<Tensor> {
        let prev = t as isize - self.step_size(steps) as isize;
        let a_t = self.alpha(t as isize);
        let (mut x0, eps) = self.split_prediction(output, sample, a_t)?;
        if let Some(r) = self.clip_range {
            // As diffusers: x0 is clamped, the noise direction is kept.
            x0 = x0.clamp(-r, r)?;
        }
        let a_prev = self.alpha(prev);
        (x0 * a_prev.sqrt())? + (eps * (1.0 - a_prev).sqrt())?
    }

    /// The inverse ("next") step of DDIM inversion: from the latent at timestep `t - train_steps/steps` to the
    /// latent at `t`, using the model output evaluated at the lower timestep (as the null-text sources do).
    pub fn inverse_step(
        &self,
        output: &Tensor,
        t: usize,
        sample: &Tensor,
        steps: usize,
    ) -> Result<Tensor> {
        let current =
            (t as isize - self.step_size(steps) as isize).min(self.train_steps as isize - 1);
        let (x0, eps) = self.split_prediction(output, sample, self.alpha(current))?;
        let a_next = self.alpha(t as isize);
        (x0 * a_next.sqrt())? + (eps * (1.0 - a_next).sqrt())?
    }
}
