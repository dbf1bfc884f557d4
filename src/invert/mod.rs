//! Inverting a real image into the model: DDIM inversion (the pivot trajectory and the attention targets), then
//! one of StyleDiffusion (per-step mapping networks to the value input), null-text inversion (per-step
//! unconditional embeddings), negative-prompt inversion (source prompt as the unconditional embedding), or
//! nothing (plain DDIM inversion). Replaying what an inversion learned (the reconstruction, its attention maps)
//! lives here too.

pub mod artifact;
pub mod mapping;

use candle_core::{DType, Tensor};

use crate::control::record::{MapRecorder, regularisation_grid};
use crate::denoise::{
    Conditioning, Hook, Monitor, Phase, Progress, guided_update, pass, predict_noise, replay,
};
use crate::model::StableDiffusion;
use crate::model::hook::{Branch, HookedPass, LayerId};
use crate::optim::Adam;
use crate::{Error, Result};
use mapping::{MappingNetwork, styled_value};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// StyleDiffusion: per-step mapping networks to the cross-attention value input (the paper).
    #[serde(rename = "stylediffusion")]
    #[cfg_attr(feature = "cli", value(name = "stylediffusion"))]
    StyleDiffusion,
    /// Null-text inversion: per-step unconditional embeddings.
    NullText,
    /// Negative-prompt inversion: the source prompt as the unconditional embedding.
    NegativePrompt,
    /// Plain DDIM inversion.
    Ddim,
}

impl Method {
    pub const ALL: [Self; 4] = [
        Self::StyleDiffusion,
        Self::NullText,
        Self::NegativePrompt,
        Self::Ddim,
    ];

    /// The method a name (as [`Method::name`] spells it) stands for; the error lists them all.
    pub fn from_name(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == name)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|m| m.name()).collect();
                Error::invalid(
                    "method",
                    format!("{name:?}: expected one of {}", names.join(", ")),
                )
            })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::StyleDiffusion => "stylediffusion",
            Self::NullText => "null-text",
            Self::NegativePrompt => "negative-prompt",
            Self::Ddim => "ddim",
        }
    }
}

/// Which DDIM-inversion maps an optimisation step is regularised towards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum AttentionPairing {
    /// The authors' code: step i (timestep t_i) uses the maps recorded on the same latent one step earlier
    /// (timestep t_{i-1}); step 0 repeats the last recorded entry.
    Authors,
    /// The maps recorded at the same timestep t_i.
    SameTimestep,
}

impl AttentionPairing {
    /// The DDIM-inversion step (index into [`DdimTrajectory::maps`]) whose maps regularise denoising step `i` of
    /// `n`.
    pub fn target_index(self, i: usize, n: usize) -> usize {
        match self {
            Self::Authors if i == 0 => n - 1,
            Self::Authors => n - i,
            Self::SameTimestep => n - 1 - i,
        }
    }
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct InversionSettings {
    pub method: Method,
    pub steps: usize,
    /// K: inner iterations at step 0 (StyleDiffusion: K_i = ceil(K e^{-0.1 i}); null-text: K at every step).
    pub inner_steps: usize,
    pub guidance: f64,
    /// lambda of the attention regularisation; 0 turns it off.
    pub attention_weight: f64,
    pub pairing: AttentionPairing,
    /// Early stop when loss < epsilon + 2e-5 * i.
    pub epsilon: f64,
    /// Seed of M_0's initialisation.
    pub seed: u64,
}

impl InversionSettings {
    pub fn new(method: Method) -> Self {
        Self {
            method,
            steps: 50,
            inner_steps: if method == Method::NullText { 10 } else { 100 },
            guidance: 7.5,
            attention_weight: 1.0,
            pairing: AttentionPairing::Authors,
            epsilon: 1e-5,
            seed: 0,
        }
    }

    /// Every number finite and in its documented range (`crate::limits`), checked before any work.
    pub fn validate(&self) -> Result<()> {
        use crate::limits::*;
        count_in("steps", self.steps, 1, 1000)?;
        count_in("inner steps", self.inner_steps, 0, MAX_INNER_STEPS)?;
        finite_in("guidance", self.guidance, 0.0, MAX_GUIDANCE)?;
        finite_in(
            "attention weight",
            self.attention_weight,
            0.0,
            MAX_ATTENTION_WEIGHT,
        )?;
        finite_in("epsilon", self.epsilon, 0.0, 1.0)?;
        Ok(())
    }

    /// Inner iterations at step i.
    pub fn inner_at(&self, i: usize) -> usize {
        match self.method {
            Method::StyleDiffusion => {
                (self.inner_steps as f64 * (-0.1 * i as f64).exp()).ceil() as usize
            }
            _ => self.inner_steps,
        }
    }

    /// The authors' learning rate 0.01 (1 - i/100), kept positive for runs longer than 100 steps.
    pub fn lr_at(&self, i: usize) -> f64 {
        0.01 * (1.0 - i as f64 / 100.0).max(0.01)
    }
}

/// What an inversion learned per step, by method: exactly what editing replays.
#[derive(Clone, Debug)]
pub enum Learned {
    /// Plain DDIM inversion learns nothing; the empty prompt is the unconditional embedding.
    Nothing,
    /// Negative-prompt inversion learns nothing either; the source prompt is the unconditional embedding.
    NegativePrompt,
    /// Null-text inversion: the optimised unconditional embedding of each step, (1, L, D).
    NullText(Vec<Tensor>),
    /// StyleDiffusion: h_i = M_i(image tokens) of each step, (2L, D); the value input is c * h[..L] + h[L..].
    Values(Vec<Tensor>),
}

impl Learned {
    /// The method that learns this.
    pub fn method(&self) -> Method {
        match self {
            Self::Nothing => Method::Ddim,
            Self::NegativePrompt => Method::NegativePrompt,
            Self::NullText(_) => Method::NullText,
            Self::Values(_) => Method::StyleDiffusion,
        }
    }

    /// StyleDiffusion's per-step value inputs, if this is a StyleDiffusion inversion.
    pub fn values(&self) -> Option<&[Tensor]> {
        match self {
            Self::Values(v) => Some(v),
            _ => None,
        }
    }

    /// The per-step tensors with the artifact's name prefix and their rank, if the method stores any.
    pub fn per_step(&self) -> Option<(&'static str, &[Tensor], usize)> {
        match self {
            Self::NullText(e) => Some(("null_text", e, 3)),
            Self::Values(v) => Some(("values", v, 2)),
            Self::Nothing | Self::NegativePrompt => None,
        }
    }

    /// The tensor name prefix a method stores per step, if any.
    pub fn prefix_of(method: Method) -> Option<&'static str> {
        match method {
            Method::NullText => Some("null_text"),
            Method::StyleDiffusion => Some("values"),
            Method::Ddim | Method::NegativePrompt => None,
        }
    }

    /// What `method` learns, from the tensors an artifact holds for it (none for methods that store nothing).
    pub fn from_parts(method: Method, per_step: Option<Vec<Tensor>>) -> Result<Self> {
        Ok(match (method, per_step) {
            (Method::Ddim, None) => Self::Nothing,
            (Method::NegativePrompt, None) => Self::NegativePrompt,
            (Method::NullText, Some(e)) => Self::NullText(e),
            (Method::StyleDiffusion, Some(v)) => Self::Values(v),
            (m, Some(_)) => {
                return Err(Error::invalid(
                    "inversion",
                    format!(
                        "holds per-step tensors, which a {} inversion does not make",
                        m.name()
                    ),
                ));
            }
            (m, None) => {
                return Err(Error::invalid(
                    "inversion",
                    format!(
                        "a {} inversion stores `{}.*` tensors, one per step, and they are missing",
                        m.name(),
                        Self::prefix_of(m).unwrap_or_default()
                    ),
                ));
            }
        })
    }
}

/// What an inversion produces: everything editing needs, and where it came from.
#[derive(Clone, Debug)]
pub struct Inversion {
    pub settings: InversionSettings,
    pub source_prompt: String,
    /// The starting noise z_T (1, C, h, w).
    pub z_t: Tensor,
    /// What the method learned per step; its method is `settings.method` ([`Inversion::validate`]).
    pub learned: Learned,
    /// The inverted photo (1, 3, S, S) f32 in [-1, 1], at the model's native size.
    pub image: Tensor,
    /// PSNR (dB) of the reconstruction against the VAE's own reconstruction of the photo.
    pub recon_psnr: f64,
    /// The model's identity ([`StableDiffusion::model_id`]).
    pub model_id: String,
    /// SHA-256 of the inverted pixels ([`crate::image_io::pixels_sha256`]).
    pub image_sha256: String,
    /// The compute dtype and device the inversion ran with ("f32", "cpu", "cuda:0", ...).
    pub dtype: String,
    pub device: String,
}

fn shape_error(name: &str, found: &[usize], expected: String) -> Error {
    Error::invalid(
        "inversion",
        format!("tensor `{name}` has shape {found:?}, expected {expected}"),
    )
}

impl Inversion {
    /// Consistency that needs no model: valid settings, what was learned matches the method (one tensor per
    /// step, consistent shapes), and no NaN or infinite value anywhere.
    pub fn validate(&self) -> Result<()> {
        self.settings.validate()?;
        let n = self.settings.steps;
        if self.learned.method() != self.settings.method {
            return Err(Error::invalid(
                "inversion",
                format!(
                    "settings say {} but it holds what {} learns",
                    self.settings.method.name(),
                    self.learned.method().name()
                ),
            ));
        }
        let z = self.z_t.dims();
        if z.len() != 4 || z[0] != 1 {
            return Err(shape_error("z_t", z, "[1, channels, h, w]".into()));
        }
        let img = self.image.dims();
        if img.len() != 4 || img[0] != 1 || img[1] != 3 || img[2] != img[3] {
            return Err(shape_error("image", img, "[1, 3, S, S]".into()));
        }
        let check = |name: String, t: &Tensor| {
            crate::util::ensure_finite(t, &format!("inversion tensor `{name}`"))
        };
        check("z_t".into(), &self.z_t)?;
        check("image".into(), &self.image)?;
        if let Some((name, ts, rank)) = self.learned.per_step() {
            if ts.len() != n {
                return Err(Error::invalid(
                    "inversion",
                    format!("{} `{name}.*` tensors for {n} steps", ts.len()),
                ));
            }
            let first = ts[0].dims();
            for (i, t) in ts.iter().enumerate() {
                if t.dims().len() != rank || t.dims() != first {
                    return Err(shape_error(
                        &format!("{name}.{i:04}"),
                        t.dims(),
                        format!("{first:?} (rank {rank}, as `{name}.0000`)"),
                    ));
                }
                check(format!("{name}.{i:04}"), t)?;
            }
        }
        if !self.recon_psnr.is_finite() {
            return Err(Error::invalid(
                "inversion",
                format!("reconstruction PSNR {} is not a number", self.recon_psnr),
            ));
        }
        Ok(())
    }

    /// The inversion fits `sd`: [`Inversion::validate`], it was made with this model, and every tensor's shape is
    /// the one this model reads (the error names the tensor and both shapes).
    pub fn check_fits(&self, sd: &StableDiffusion) -> Result<()> {
        self.validate()?;
        if self.model_id != sd.model_id {
            return Err(Error::invalid(
                "inversion",
                format!(
                    "made with another model (model id {}…, this model {}…); invert the image again with this model",
                    self.model_id.get(..12).unwrap_or(&self.model_id),
                    sd.model_id.get(..12).unwrap_or(&sd.model_id)
                ),
            ));
        }
        let s = sd.native_size();
        let f = sd.vae.config().downscale();
        let want_z = [1, sd.latent_channels(), s / f, s / f];
        if self.z_t.dims() != want_z {
            return Err(shape_error(
                "z_t",
                self.z_t.dims(),
                format!("{want_z:?} for this model"),
            ));
        }
        let want_img = [1, 3, s, s];
        if self.image.dims() != want_img {
            return Err(shape_error(
                "image",
                self.image.dims(),
                format!("{want_img:?} for this model"),
            ));
        }
        let (l, d) = (
            sd.tokenizer.max_length(),
            sd.unet.config().cross_attention_dim,
        );
        if let Some((name, ts, _)) = self.learned.per_step() {
            let want = match self.learned {
                Learned::Values(_) => vec![2 * l, d],
                _ => vec![1, l, d],
            };
            if ts[0].dims() != want.as_slice() {
                return Err(shape_error(
                    &format!("{name}.0000"),
                    ts[0].dims(),
                    format!("{want:?} for this model"),
                ));
            }
        }
        Ok(())
    }

    /// The unconditional context of step `i` for a batch of `batch` (source [, target]), in the compute dtype.
    pub fn unconditional(&self, sd: &StableDiffusion, i: usize, batch: usize) -> Result<Tensor> {
        let one = match &self.learned {
            Learned::NullText(embs) => embs[i.min(embs.len() - 1)].to_dtype(sd.dtype)?,
            Learned::NegativePrompt => sd.encode_prompt(&self.source_prompt)?,
            Learned::Nothing | Learned::Values(_) => sd.encode_prompt("")?,
        };
        Ok(Tensor::cat(&vec![&one; batch], 0)?)
    }

    /// The unconditional context of every step when it does not change from step to step.
    pub fn fixed_unconditional(
        &self,
        sd: &StableDiffusion,
        batch: usize,
    ) -> Result<Option<Tensor>> {
        match self.learned {
            Learned::NullText(_) => Ok(None),
            _ => self.unconditional(sd, 0, batch).map(Some),
        }
    }
}

/// Latents and attention targets of DDIM inversion with the source embedding only (guidance 1).
pub struct DdimTrajectory {
    /// z*_0 .. z*_N.
    pub latents: Vec<Tensor>,
    /// Per inversion step k (k = 0..N-1, timestep t_{N-1-k}): the regularised cross-attention maps.
    pub maps: Vec<Vec<(LayerId, Tensor)>>,
}

fn mse(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok((a - b)?.sqr()?.mean_all()?)
}

/// DDIM inversion from `z0` under `cond`: the trajectory, and (when `record`) the regularised maps of each step.
pub fn ddim_inversion(
    sd: &StableDiffusion,
    z0: &Tensor,
    cond: &Tensor,
    steps: usize,
    record: bool,
    monitor: &mut Monitor,
) -> Result<DdimTrajectory> {
    let ts = sd.scheduler.timesteps(steps)?;
    let (_, _, h, w) = z0.dims4()?;
    let grid = regularisation_grid(sd.unet.config(), (h, w));
    let mut latents = vec![z0.clone()];
    let mut maps = Vec::with_capacity(steps);
    let mut z = z0.clone();
    for k in 0..steps {
        let t = ts[steps - 1 - k];
        let mut rec = MapRecorder::new(grid, None);
        let hook: Hook = if record { Some(&mut rec) } else { None };
        let eps = predict_noise(sd, monitor, &z, t, cond, pass(hook, Branch::Conditional, k))?;
        z = sd.scheduler.inverse_step(&eps, t, &z, steps)?;
        latents.push(z.clone());
        maps.push(
            rec.take()
                .into_iter()
                .map(|(id, m)| (id, m.detach()))
                .collect(),
        );
        monitor.report(Progress::step(Phase::DdimInversion, k + 1, steps));
    }
    Ok(DdimTrajectory { latents, maps })
}

/// Inverts `image` (1, 3, S, S) in [-1, 1] at the model's native size, described by `prompt`. The result is
/// complete: model id, pixel hash, dtype and device are filled in, and it is checked finite.
pub fn invert(
    sd: &StableDiffusion,
    image: &Tensor,
    prompt: &str,
    settings: &InversionSettings,
    monitor: &mut Monitor,
) -> Result<Inversion> {
    Ok(invert_and_reconstruct(sd, image, prompt, settings, monitor)?.0)
}

/// [`invert`], also returning the reconstruction it measured (1, 3, S, S) f32 in [-1, 1], which would otherwise
/// cost another replay of every step.
pub fn invert_and_reconstruct(
    sd: &StableDiffusion,
    image: &Tensor,
    prompt: &str,
    settings: &InversionSettings,
    monitor: &mut Monitor,
) -> Result<(Inversion, Tensor)> {
    settings.validate()?;
    let n = settings.steps;
    let ts = sd.scheduler.timesteps(n)?;
    let size = sd.native_size();
    if image.dims() != [1, 3, size, size] {
        return Err(Error::invalid(
            "image",
            format!(
                "shape {:?}; this model inverts [1, 3, {size}, {size}]",
                image.dims()
            ),
        ));
    }
    crate::util::ensure_finite(image, "input image")?;
    sd.tokenizer.check_length(prompt)?;
    if settings.method == Method::StyleDiffusion && sd.image_encoder.is_none() {
        return Err(Error::invalid(
            "image encoder",
            "StyleDiffusion needs a CLIP image encoder: load the model with one (LoadOptions::image_encoder)",
        ));
    }
    let side = size / sd.vae.config().downscale();
    crate::limits::ensure_fits(
        "this inversion",
        sd.estimate_working_memory(1, (side, side), settings.method != Method::Ddim),
        &sd.device,
    )?;
    let image_sha256 = crate::image_io::pixels_sha256(&crate::util::tensor_to_image(image)?);
    let image = image.to_dtype(sd.dtype)?;
    let z0 = sd.vae.encode(&image)?;
    let cond = sd.encode_prompt(prompt)?;
    let null = sd.encode_prompt("")?;
    let record = settings.method == Method::StyleDiffusion && settings.attention_weight > 0.0;
    let traj = ddim_inversion(sd, &z0, &cond, n, record, monitor)?;
    let z_t = traj.latents[n].clone();
    let w = settings.guidance;
    // One Adam step on `loss` at inner iteration j of step i, reported; true when the loss is low enough to stop
    // early (below epsilon + 2e-5 i, as the authors).
    let optimise = |adam: &mut Adam, loss: &Tensor, monitor: &mut Monitor, i: usize, j: usize| {
        let grads = loss.backward()?;
        adam.step(&grads, settings.lr_at(i))?;
        let l = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        monitor.report(Progress {
            phase: Phase::Optimising,
            step: i + 1,
            steps: n,
            inner: j + 1,
            inner_budget: settings.inner_at(i),
            loss: Some(l),
        });
        Ok::<_, Error>(l < settings.epsilon + 2e-5 * i as f64)
    };

    let learned = match settings.method {
        Method::Ddim => Learned::Nothing,
        Method::NegativePrompt => Learned::NegativePrompt,
        Method::StyleDiffusion => {
            let tokens = sd.image_tokens(&image)?;
            let (_, l, _) = cond.dims3()?;
            let cond_f32 = cond.to_dtype(DType::F32)?;
            let mut net = MappingNetwork::new(tokens.dim(0)?, 2 * l, settings.seed, &sd.device)?;
            let mut hs = Vec::with_capacity(n);
            let mut z = z_t.clone();
            let (_, _, lh, lw) = z0.dims4()?;
            let grid = regularisation_grid(sd.unet.config(), (lh, lw));
            // The conditional prediction with the value input styled by `h`, and the maps it attended with.
            let styled_eps = |monitor: &Monitor, z: &Tensor, t: usize, i: usize, h: &Tensor| {
                let value = styled_value(&cond_f32, h)?.to_dtype(sd.dtype)?;
                let mut rec = MapRecorder::new(grid, Some(value));
                let pass = HookedPass::new(&mut rec, Branch::Conditional, i);
                let eps_c = predict_noise(sd, monitor, z, t, &cond, Some(pass))?;
                Ok::<_, Error>((eps_c, rec.take()))
            };
            for (i, &t) in ts.iter().enumerate() {
                if i > 0 {
                    net = net.duplicate()?;
                }
                let eps_u = predict_noise(sd, monitor, &z, t, &null, None)?.detach();
                let target = traj.latents[n - i - 1].to_dtype(DType::F32)?;
                let targets = record.then(|| &traj.maps[settings.pairing.target_index(i, n)]);
                let mut adam = Adam::new(net.params.clone(), f64::INFINITY, &Default::default())?;
                for j in 0..settings.inner_at(i) {
                    let h = net.forward(&tokens)?;
                    let (eps_c, maps) = styled_eps(monitor, &z, t, i, &h)?;
                    let z_prev = guided_update(sd, &eps_u, &eps_c, w, t, &z, n)?;
                    let mut loss = mse(&z_prev.to_dtype(DType::F32)?, &target)?;
                    if let Some(targets) = targets {
                        if maps.len() != targets.len() {
                            return Err(Error::invalid(
                                "attention maps",
                                format!(
                                    "{} regularised layers now, {} during inversion",
                                    maps.len(),
                                    targets.len()
                                ),
                            ));
                        }
                        for ((_, a), (_, a_star)) in maps.iter().zip(targets) {
                            let term =
                                mse(&a.to_dtype(DType::F32)?, &a_star.to_dtype(DType::F32)?)?;
                            loss = (loss + (term * settings.attention_weight)?)?;
                        }
                    }
                    if optimise(&mut adam, &loss, monitor, i, j)? {
                        break;
                    }
                }
                let h = net.forward(&tokens)?.detach();
                let (eps_c, _) = styled_eps(monitor, &z, t, i, &h)?;
                z = guided_update(sd, &eps_u, &eps_c, w, t, &z, n)?.detach();
                hs.push(h);
            }
            Learned::Values(hs)
        }
        Method::NullText => {
            let mut uncond = null.to_dtype(DType::F32)?.detach();
            let mut embs = Vec::with_capacity(n);
            let mut z = z_t.clone();
            for (i, &t) in ts.iter().enumerate() {
                let eps_c = predict_noise(sd, monitor, &z, t, &cond, None)?.detach();
                let target = traj.latents[n - i - 1].to_dtype(DType::F32)?;
                let var = candle_core::Var::from_tensor(&uncond)?;
                let mut adam = Adam::new(
                    vec![("uncond".into(), var.clone())],
                    f64::INFINITY,
                    &Default::default(),
                )?;
                for j in 0..settings.inner_at(i) {
                    let u = var.as_tensor().to_dtype(sd.dtype)?;
                    let eps_u = predict_noise(sd, monitor, &z, t, &u, None)?;
                    let z_prev = guided_update(sd, &eps_u, &eps_c, w, t, &z, n)?;
                    let loss = mse(&z_prev.to_dtype(DType::F32)?, &target)?;
                    if optimise(&mut adam, &loss, monitor, i, j)? {
                        break;
                    }
                }
                uncond = var.as_tensor().detach();
                let eps_u = predict_noise(sd, monitor, &z, t, &uncond.to_dtype(sd.dtype)?, None)?;
                z = guided_update(sd, &eps_u, &eps_c, w, t, &z, n)?.detach();
                embs.push(uncond.clone());
            }
            Learned::NullText(embs)
        }
    };
    let mut inv = Inversion {
        settings: settings.clone(),
        source_prompt: prompt.to_string(),
        z_t,
        learned,
        image: image.to_dtype(DType::F32)?,
        recon_psnr: 0.0,
        model_id: sd.model_id.clone(),
        image_sha256,
        dtype: crate::model::dtype_name(sd.dtype).to_string(),
        device: crate::model::device_name(&sd.device),
    };
    let recon = reconstruct(sd, &inv, monitor)?;
    crate::util::ensure_finite(&recon, "reconstruction")?;
    let vae_recon = sd.vae.decode(&z0)?.to_dtype(DType::F32)?;
    inv.recon_psnr = psnr(&recon, &vae_recon)?;
    inv.validate()?;
    Ok((inv, recon))
}

/// The source branch replayed with what the inversion learned: its text is `prompt`, its values are styled by the
/// inversion when it has them, and the regularised layers' maps of each step go to `on_maps`.
struct SourceReplay<'a> {
    sd: &'a StableDiffusion,
    inv: &'a Inversion,
    fixed_uncond: Option<Tensor>,
    cond: Tensor,
    cond_f32: Tensor,
    grid: (usize, usize),
    recorder: MapRecorder,
    on_maps: &'a mut dyn FnMut(usize, Vec<(LayerId, Tensor)>) -> Result<()>,
}

impl<'a> SourceReplay<'a> {
    fn new(
        sd: &'a StableDiffusion,
        inv: &'a Inversion,
        prompt: &str,
        on_maps: &'a mut dyn FnMut(usize, Vec<(LayerId, Tensor)>) -> Result<()>,
    ) -> Result<Self> {
        let cond = sd.encode_prompt(prompt)?;
        let grid = regularisation_grid(sd.unet.config(), (inv.z_t.dim(2)?, inv.z_t.dim(3)?));
        Ok(Self {
            sd,
            inv,
            fixed_uncond: inv.fixed_unconditional(sd, 1)?,
            cond_f32: cond.to_dtype(DType::F32)?,
            cond,
            grid,
            recorder: MapRecorder::new(grid, None),
            on_maps,
        })
    }
}

impl Conditioning for SourceReplay<'_> {
    fn contexts(&mut self, step: usize) -> Result<(Option<Tensor>, Tensor)> {
        let value = match self.inv.learned.values() {
            Some(hs) => Some(styled_value(&self.cond_f32, &hs[step])?.to_dtype(self.sd.dtype)?),
            None => None,
        };
        self.recorder = MapRecorder::new(self.grid, value);
        let uncond = match &self.fixed_uncond {
            Some(u) => u.clone(),
            None => self.inv.unconditional(self.sd, step, 1)?,
        };
        Ok((Some(uncond), self.cond.clone()))
    }

    fn hook(&mut self, branch: Branch, _step: usize) -> Hook<'_> {
        match branch {
            Branch::Conditional => Some(&mut self.recorder),
            Branch::Unconditional => None,
        }
    }

    fn end_step(&mut self, step: usize, latents: Tensor) -> Result<Tensor> {
        (self.on_maps)(step, self.recorder.take())?;
        Ok(latents)
    }
}

/// Replays the source branch with `prompt`; returns the final latents.
fn replay_source(
    sd: &StableDiffusion,
    inv: &Inversion,
    prompt: &str,
    on_maps: &mut dyn FnMut(usize, Vec<(LayerId, Tensor)>) -> Result<()>,
    monitor: &mut Monitor,
    phase: Phase,
) -> Result<Tensor> {
    inv.check_fits(sd)?;
    let mut source = SourceReplay::new(sd, inv, prompt, on_maps)?;
    let z = inv.z_t.to_dtype(sd.dtype)?;
    let (n, w) = (inv.settings.steps, inv.settings.guidance);
    replay(sd, &z, n, w, &mut source, monitor, phase)
}

/// The image the inversion reproduces: the source branch alone, (1, 3, S, S) f32 in [-1, 1].
pub fn reconstruct(sd: &StableDiffusion, inv: &Inversion, monitor: &mut Monitor) -> Result<Tensor> {
    let z = replay_source(
        sd,
        inv,
        &inv.source_prompt,
        &mut |_, _| Ok(()),
        monitor,
        Phase::Reconstructing,
    )?;
    Ok(sd.vae.decode(&z)?.to_dtype(DType::F32)?)
}

/// The source branch with `prompt` as its text (values styled by the inversion when it has them): the image, and
/// the cross-attention maps of the regularised layers averaged over steps, layers and heads: (queries, tokens).
pub fn attention_maps(
    sd: &StableDiffusion,
    inv: &Inversion,
    prompt: &str,
    monitor: &mut Monitor,
) -> Result<(Tensor, Tensor)> {
    let mut sum: Option<Tensor> = None;
    let mut count = 0usize;
    let mut on_maps = |_: usize, maps: Vec<(LayerId, Tensor)>| -> Result<()> {
        for (_, m) in maps {
            // (1, heads, Q, K) -> (Q, K), summed over heads.
            let m = m.to_dtype(DType::F32)?.get(0)?;
            count += m.dim(0)?;
            let m = m.sum(0)?;
            sum = Some(match sum.take() {
                Some(s) => (s + m)?,
                None => m,
            });
        }
        Ok(())
    };
    let z = replay_source(sd, inv, prompt, &mut on_maps, monitor, Phase::AttentionMaps)?;
    let maps = match sum {
        Some(s) => (s / count.max(1) as f64)?,
        None => {
            return Err(Error::invalid(
                "attention maps",
                "no cross-attention layer at the regularisation resolution",
            ));
        }
    };
    Ok((sd.vae.decode(&z)?.to_dtype(DType::F32)?, maps))
}

/// Mean squared distance between the cross-attention maps of the reconstruction (the inversion's learned
/// conditions) and the DDIM-inversion maps it is regularised towards, over steps and regularised layers.
pub fn attention_distance(
    sd: &StableDiffusion,
    inv: &Inversion,
    monitor: &mut Monitor,
) -> Result<f64> {
    inv.check_fits(sd)?;
    let n = inv.settings.steps;
    let image = inv.image.to_dtype(sd.dtype)?;
    let z0 = sd.vae.encode(&image)?;
    let cond = sd.encode_prompt(&inv.source_prompt)?;
    let traj = ddim_inversion(sd, &z0, &cond, n, true, monitor)?;
    let (mut total, mut count) = (0.0, 0usize);
    let mut on_maps = |i: usize, maps: Vec<(LayerId, Tensor)>| -> Result<()> {
        let targets = &traj.maps[inv.settings.pairing.target_index(i, n)];
        for ((_, a), (_, b)) in maps.iter().zip(targets) {
            total += mse(&a.to_dtype(DType::F32)?, &b.to_dtype(DType::F32)?)?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            count += 1;
        }
        Ok(())
    };
    replay_source(
        sd,
        inv,
        &inv.source_prompt,
        &mut on_maps,
        monitor,
        Phase::Reconstructing,
    )?;
    Ok(total / count.max(1) as f64)
}

/// PSNR (dB) of two images in [-1, 1], measured in [0, 1] units after clamping.
pub fn psnr(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = ((a.to_dtype(DType::F32)?.clamp(-1.0, 1.0)? + 1.0)? / 2.0)?;
    let b = ((b.to_dtype(DType::F32)?.clamp(-1.0, 1.0)? + 1.0)? / 2.0)?;
    let mse = (a - b)?
        .sqr()?
        .mean_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    Ok(10.0 * (1.0 / mse.max(1e-12)).log10())
}
