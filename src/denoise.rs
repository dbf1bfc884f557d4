//! The one denoising loop. Every run that walks the DDIM schedule with classifier-free guidance (generation,
//! reconstruction, editing, attention maps, the inversions' per-step updates) goes through here: a UNet evaluation
//! that checks for cancellation first, the guided noise `eps_u + w (eps_c - eps_u)`, the DDIM update, and a replay
//! of a whole schedule driven by a [`Conditioning`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Tensor;

use crate::model::StableDiffusion;
use crate::model::hook::{AttentionHook, Branch, HookedPass};
use crate::{Error, Result};

/// Cancels a running job from another thread (a web page's Cancel button, Ctrl-C): every UNet evaluation checks
/// it first, and the job returns [`Error::Cancelled`] having written nothing. Clones share one flag.
#[derive(Clone, Debug, Default)]
pub struct CancelToken {
    own: Arc<AtomicBool>,
    /// The flags of the tokens this one was made from with [`CancelToken::child`].
    parents: Vec<Arc<AtomicBool>>,
}

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }

    /// A token cancelled by its own `cancel` or by this one's: it stops one piece of a larger job (one case of a
    /// batch) without stopping the rest.
    pub fn child(&self) -> Self {
        let mut parents = self.parents.clone();
        parents.push(self.own.clone());
        Self {
            own: Arc::default(),
            parents,
        }
    }

    pub fn cancel(&self) {
        self.own.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.own.load(Ordering::SeqCst) || self.parents.iter().any(|p| p.load(Ordering::SeqCst))
    }

    /// `Err(Error::Cancelled)` once cancelled.
    pub fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    }
}

/// What a long job is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Encoding the photo and walking the schedule backwards (the pivot trajectory).
    DdimInversion,
    /// Optimising what the inversion method learns per step (StyleDiffusion's mapping networks, null-text).
    Optimising,
    /// Replaying the learned conditions to measure the reconstruction.
    Reconstructing,
    Editing,
    Generating,
    AttentionMaps,
}

impl Phase {
    pub fn label(self) -> &'static str {
        match self {
            Self::DdimInversion => "ddim inversion",
            Self::Optimising => "optimising",
            Self::Reconstructing => "reconstructing",
            Self::Editing => "editing",
            Self::Generating => "generating",
            Self::AttentionMaps => "attention maps",
        }
    }
}

/// One progress report: sent after each denoising step and after each inner optimisation iteration.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Progress {
    pub phase: Phase,
    /// Steps done in this phase (1-based once reported), of `steps`.
    pub step: usize,
    pub steps: usize,
    /// The inner iteration within the step (1-based), and its budget; 0 and 0 outside optimisation.
    pub inner: usize,
    pub inner_budget: usize,
    /// The optimisation loss of that iteration.
    pub loss: Option<f64>,
}

impl Progress {
    pub fn step(phase: Phase, step: usize, steps: usize) -> Self {
        Self {
            phase,
            step,
            steps,
            inner: 0,
            inner_budget: 0,
            loss: None,
        }
    }
}

/// How a caller watches and stops a job: a progress callback and a cancellation token.
pub struct Monitor<'a> {
    /// `Send`: jobs run on the engine's worker threads (`runtime::on_worker_thread`).
    on_progress: Box<dyn FnMut(&Progress) + Send + 'a>,
    cancel: CancelToken,
}

impl Default for Monitor<'_> {
    fn default() -> Self {
        Self::silent()
    }
}

impl<'a> Monitor<'a> {
    /// No reports, never cancelled.
    pub fn silent() -> Self {
        Self {
            on_progress: Box::new(|_| {}),
            cancel: CancelToken::new(),
        }
    }

    /// Reports every [`Progress`] to `f`.
    pub fn new(f: impl FnMut(&Progress) + Send + 'a) -> Self {
        Self {
            on_progress: Box::new(f),
            cancel: CancelToken::new(),
        }
    }

    /// Stops the job when `token` is cancelled.
    pub fn with_cancel(mut self, token: CancelToken) -> Self {
        self.cancel = token;
        self
    }

    pub fn cancel_token(&self) -> &CancelToken {
        &self.cancel
    }

    pub fn check(&self) -> Result<()> {
        self.cancel.check()
    }

    pub fn report(&mut self, p: Progress) {
        (self.on_progress)(&p)
    }
}

/// Classifier-free guidance: `eps_u + w (eps_c - eps_u)`.
pub fn guide(eps_u: &Tensor, eps_c: &Tensor, guidance: f64) -> Result<Tensor> {
    Ok((eps_u + ((eps_c - eps_u)? * guidance)?)?)
}

/// A hook for one UNet evaluation.
pub type Hook<'h> = Option<&'h mut dyn AttentionHook>;

/// One UNet evaluation at timestep `t`, after checking for cancellation; `pass` is the hook with the branch and
/// step it serves.
pub fn predict_noise(
    sd: &StableDiffusion,
    monitor: &Monitor,
    latents: &Tensor,
    t: usize,
    context: &Tensor,
    pass: Option<HookedPass>,
) -> Result<Tensor> {
    monitor.check()?;
    Ok(match pass {
        Some(mut p) => sd.unet.forward(latents, t as f64, context, Some(&mut p))?,
        None => sd.unet.forward(latents, t as f64, context, None)?,
    })
}

/// A hook as a pass of `branch` at `step`.
pub fn pass(hook: Hook<'_>, branch: Branch, step: usize) -> Option<HookedPass<'_>> {
    hook.map(|h| HookedPass::new(h, branch, step))
}

/// The DDIM update of a guided step: `z_{t-1}` from `z_t` and both noise predictions.
pub fn guided_update(
    sd: &StableDiffusion,
    eps_u: &Tensor,
    eps_c: &Tensor,
    guidance: f64,
    t: usize,
    z: &Tensor,
    steps: usize,
) -> Result<Tensor> {
    Ok(sd
        .scheduler
        .step(&guide(eps_u, eps_c, guidance)?, t, z, steps)?)
}

/// What a replayed schedule conditions on at each step, and what happens around each step.
pub trait Conditioning {
    /// The unconditional context (`None`: no guidance, the conditional prediction alone) and the conditional
    /// context at step `step`, each with the latents' batch size.
    fn contexts(&mut self, step: usize) -> Result<(Option<Tensor>, Tensor)>;

    /// The hook of `branch` at `step`; `None` runs the plain UNet. When neither branch has a hook, both run as one
    /// batch.
    fn hook(&mut self, branch: Branch, step: usize) -> Hook<'_> {
        let _ = (branch, step);
        None
    }

    /// After the update of step `step`: may change the latents (local blend) or read what the hooks saw.
    fn end_step(&mut self, step: usize, latents: Tensor) -> Result<Tensor> {
        let _ = step;
        Ok(latents)
    }
}

/// Denoises `z_t` over the model's `steps`-step DDIM schedule with guidance `guidance`, reporting each step as
/// `phase`. Returns the final latents.
pub fn replay(
    sd: &StableDiffusion,
    z_t: &Tensor,
    steps: usize,
    guidance: f64,
    conditioning: &mut dyn Conditioning,
    monitor: &mut Monitor,
    phase: Phase,
) -> Result<Tensor> {
    let timesteps = sd.scheduler.timesteps(steps)?;
    let mut z = z_t.clone();
    for (i, &t) in timesteps.iter().enumerate() {
        let (uncond, cond) = conditioning.contexts(i)?;
        let plain = conditioning.hook(Branch::Unconditional, i).is_none()
            && conditioning.hook(Branch::Conditional, i).is_none();
        z = match uncond {
            None => {
                let c = pass(
                    conditioning.hook(Branch::Conditional, i),
                    Branch::Conditional,
                    i,
                );
                let eps = predict_noise(sd, monitor, &z, t, &cond, c)?;
                sd.scheduler.step(&eps, t, &z, steps)?
            }
            Some(uncond) if plain => {
                // One batch for both branches, as diffusers runs guidance.
                let b = z.dim(0)?;
                let both = Tensor::cat(&[&z, &z], 0)?;
                let context = Tensor::cat(&[&uncond, &cond], 0)?;
                let eps = predict_noise(sd, monitor, &both, t, &context, None)?;
                guided_update(
                    sd,
                    &eps.narrow(0, 0, b)?,
                    &eps.narrow(0, b, b)?,
                    guidance,
                    t,
                    &z,
                    steps,
                )?
            }
            Some(uncond) => {
                let u = pass(
                    conditioning.hook(Branch::Unconditional, i),
                    Branch::Unconditional,
                    i,
                );
                let eps_u = predict_noise(sd, monitor, &z, t, &uncond, u)?;
                let c = pass(
                    conditioning.hook(Branch::Conditional, i),
                    Branch::Conditional,
                    i,
                );
                let eps_c = predict_noise(sd, monitor, &z, t, &cond, c)?;
                guided_update(sd, &eps_u, &eps_c, guidance, t, &z, steps)?
            }
        };
        z = conditioning.end_step(i, z)?;
        monitor.report(Progress::step(phase, i + 1, steps));
    }
    Ok(z)
}
