//! Inverting a real image into the model: DDIM inversion (the pivot trajectory and the attention targets), then
//! one of StyleDiffusion (per-step mapping networks to the value input), null-text inversion (per-step
//! unconditional embeddings), negative-prompt inversion (source prompt as the unconditional embedding), or
//! nothing (plain DDIM inversion).

pub mod artifact;
pub mod mapping;

use candle_core::{DType, Tensor};

use crate::control::record::{MapRecorder, regularisation_grid};
use crate::model::StableDiffusion;
use crate::model::hook::{Branch, HookedPass, LayerId};
use crate::optim::Adam;
use crate::{Error, Result};
use mapping::{MappingNetwork, styled_value};

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// StyleDiffusion: per-step mapping networks to the cross-attention value input (the paper).
    #[serde(rename = "stylediffusion")]
    #[value(name = "stylediffusion")]
    StyleDiffusion,
    /// Null-text inversion: per-step unconditional embeddings.
    NullText,
    /// Negative-prompt inversion: the source prompt as the unconditional embedding.
    NegativePrompt,
    /// Plain DDIM inversion.
    Ddim,
}

impl Method {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "stylediffusion" => Ok(Self::StyleDiffusion),
            "null-text" => Ok(Self::NullText),
            "negative-prompt" => Ok(Self::NegativePrompt),
            "ddim" => Ok(Self::Ddim),
            other => Err(Error::invalid(
                "--method",
                format!("{other:?}: expected stylediffusion, null-text, negative-prompt or ddim"),
            )),
        }
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
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum AttentionPairing {
    /// The authors' code: step i (timestep t_i) uses the maps recorded on the same latent one step earlier
    /// (timestep t_{i-1}); step 0 repeats the last recorded entry.
    Authors,
    /// The maps recorded at the same timestep t_i.
    SameTimestep,
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

/// What an inversion produces; everything editing needs.
#[derive(Clone, Debug)]
pub struct Inversion {
    pub settings: InversionSettings,
    pub source_prompt: String,
    /// The starting noise z_T (1, C, h, w).
    pub z_t: Tensor,
    /// StyleDiffusion: h_i = M_i(image tokens) per step, (2L, D).
    pub values: Option<Vec<Tensor>>,
    /// Null-text: the optimised unconditional embedding per step, (1, L, D).
    pub null_embeddings: Option<Vec<Tensor>>,
    /// The input image as the model saw it, (1, 3, S, S) in [-1, 1].
    pub image: Tensor,
    /// PSNR of the reconstruction against the VAE reconstruction of the input (dB).
    pub recon_psnr: f64,
    pub model_id: String,
    pub image_sha256: String,
}

fn shape_error(name: &str, found: &[usize], expected: String) -> Error {
    Error::invalid(
        "inversion",
        format!("tensor `{name}` has shape {found:?}, expected {expected}"),
    )
}

impl Inversion {
    /// Consistency that needs no model: valid settings, exactly the tensors the method stores (one per step),
    /// consistent shapes, and no NaN or infinite value anywhere.
    pub fn validate(&self) -> Result<()> {
        self.settings.validate()?;
        let n = self.settings.steps;
        let method = self.settings.method.name();
        let z = self.z_t.dims();
        if z.len() != 4 || z[0] != 1 {
            return Err(shape_error("z_t", z, "[1, channels, h, w]".into()));
        }
        let img = self.image.dims();
        if img.len() != 4 || img[0] != 1 || img[1] != 3 || img[2] != img[3] {
            return Err(shape_error("image", img, "[1, 3, S, S]".into()));
        }
        let series = |name: &str, tensors: &Option<Vec<Tensor>>, needed: bool, rank: usize| match (
            tensors, needed,
        ) {
            (None, false) => Ok(()),
            (None, true) => Err(Error::invalid(
                "inversion",
                format!(
                    "a {method} inversion stores `{name}.*` tensors, one per step, and they are missing"
                ),
            )),
            (Some(_), false) => Err(Error::invalid(
                "inversion",
                format!("holds `{name}.*` tensors, which a {method} inversion does not make"),
            )),
            (Some(ts), true) => {
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
                }
                Ok(())
            }
        };
        series(
            "values",
            &self.values,
            self.settings.method == Method::StyleDiffusion,
            2,
        )?;
        series(
            "null_text",
            &self.null_embeddings,
            self.settings.method == Method::NullText,
            3,
        )?;
        let check = |name: String, t: &Tensor| {
            crate::util::ensure_finite(t, &format!("inversion tensor `{name}`"))
        };
        check("z_t".into(), &self.z_t)?;
        check("image".into(), &self.image)?;
        for (name, ts) in [
            ("values", &self.values),
            ("null_text", &self.null_embeddings),
        ] {
            for (i, t) in ts.iter().flatten().enumerate() {
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
}

impl StableDiffusion {
    /// An inversion fits this model: [`Inversion::validate`], and every tensor's shape is the one this model
    /// reads (the error names the tensor and both shapes).
    pub fn check_inversion(&self, inv: &Inversion) -> Result<()> {
        inv.validate()?;
        let s = self.native_size();
        let f = self.vae.config().downscale();
        let want_z = [1, self.latent_channels(), s / f, s / f];
        if inv.z_t.dims() != want_z {
            return Err(shape_error(
                "z_t",
                inv.z_t.dims(),
                format!("{want_z:?} for this model"),
            ));
        }
        let want_img = [1, 3, s, s];
        if inv.image.dims() != want_img {
            return Err(shape_error(
                "image",
                inv.image.dims(),
                format!("{want_img:?} for this model"),
            ));
        }
        let (l, d) = (
            self.tokenizer.max_length(),
            self.unet.config().cross_attention_dim,
        );
        if let Some(v) = inv.values.as_ref().and_then(|v| v.first())
            && v.dims() != [2 * l, d]
        {
            return Err(shape_error(
                "values.0000",
                v.dims(),
                format!("{:?} for this model", [2 * l, d]),
            ));
        }
        if let Some(e) = inv.null_embeddings.as_ref().and_then(|e| e.first())
            && e.dims() != [1, l, d]
        {
            return Err(shape_error(
                "null_text.0000",
                e.dims(),
                format!("{:?} for this model", [1, l, d]),
            ));
        }
        Ok(())
    }
}

/// Progress of an inversion: (phase, step, steps, inner iteration, loss).
pub type InvertProgress<'a> = &'a mut dyn FnMut(&str, usize, usize, usize, f64);

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

impl StableDiffusion {
    pub fn ddim_inversion(
        &self,
        z0: &Tensor,
        cond: &Tensor,
        steps: usize,
        record: bool,
        progress: InvertProgress,
    ) -> Result<DdimTrajectory> {
        let ts = self.scheduler.timesteps(steps)?;
        let (_, _, h, w) = z0.dims4()?;
        let grid = regularisation_grid(self.unet.config(), (h, w));
        let mut latents = vec![z0.clone()];
        let mut maps = Vec::with_capacity(steps);
        let mut z = z0.clone();
        for k in 0..steps {
            let t = ts[steps - 1 - k];
            let mut rec = MapRecorder::new(grid, None);
            let eps = if record {
                self.unet.forward(
                    &z,
                    t as f64,
                    cond,
                    Some(&mut HookedPass::new(&mut rec, Branch::Conditional, k)),
                )?
            } else {
                self.unet.forward(&z, t as f64, cond, None)?
            };
            z = self.scheduler.inverse_step(&eps, t, &z, steps)?;
            latents.push(z.clone());
            maps.push(
                rec.take()
                    .into_iter()
                    .map(|(id, m)| (id, m.detach()))
                    .collect(),
            );
            progress("ddim inversion", k + 1, steps, 0, 0.0);
        }
        Ok(DdimTrajectory { latents, maps })
    }

    /// The CLIP image tokens StyleDiffusion maps from: post-layernormed, all tokens, (T, D).
    pub fn image_tokens(&self, image: &Tensor) -> Result<Tensor> {
        let enc = self.image_encoder.as_ref().ok_or_else(|| {
            Error::invalid("image encoder", "StyleDiffusion needs a CLIP image encoder: put one in <model>/image_encoder or pass --image-encoder DIR")
        })?;
        let size = enc.image_size();
        let (_, _, h, _) = image.dims4()?;
        let pixels = if h == size {
            crate::model::clip::vision::clip_normalize(&image.to_dtype(DType::F32)?)?
        } else {
            let rgb = crate::util::tensor_to_image(image)?;
            crate::model::clip::vision::preprocess(
                &image::DynamicImage::ImageRgb8(rgb),
                size,
                &self.device,
            )?
        };
        let out = enc.forward(&pixels.to_dtype(self.dtype)?)?;
        Ok(out.tokens.get(0)?.to_dtype(DType::F32)?)
    }

    /// Inverts `image` (1, 3, S, S) in [-1, 1] described by `prompt`.
    pub fn invert(
        &self,
        image: &Tensor,
        prompt: &str,
        settings: &InversionSettings,
        progress: InvertProgress,
    ) -> Result<Inversion> {
        settings.validate()?;
        let n = settings.steps;
        let ts = self.scheduler.timesteps(n)?;
        let size = self.native_size();
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
        self.tokenizer.check_length(prompt)?;
        let side = size / self.vae.config().downscale();
        crate::limits::ensure_fits(
            "this inversion",
            self.estimate_working_memory(1, (side, side), settings.method != Method::Ddim),
            &self.device,
        )?;
        let image = image.to_dtype(self.dtype)?;
        let z0 = self.vae.encode(&image)?;
        let cond = self.encode_prompt(prompt)?;
        let null = self.encode_prompt("")?;
        let record = settings.method == Method::StyleDiffusion && settings.attention_weight > 0.0;
        let traj = self.ddim_inversion(&z0, &cond, n, record, progress)?;
        let z_t = traj.latents[n].clone();
        let w = settings.guidance;

        let mut values = None;
        let mut null_embeddings = None;
        match settings.method {
            Method::Ddim | Method::NegativePrompt => {}
            Method::StyleDiffusion => {
                let tokens = self.image_tokens(&image)?;
                let (_, l, _) = cond.dims3()?;
                let mut net =
                    MappingNetwork::new(tokens.dim(0)?, 2 * l, settings.seed, &self.device)?;
                let mut hs = Vec::with_capacity(n);
                let mut z = z_t.clone();
                let (_, _, lh, lw) = z0.dims4()?;
                let grid = regularisation_grid(self.unet.config(), (lh, lw));
                for (i, &t) in ts.iter().enumerate() {
                    if i > 0 {
                        net = net.duplicate()?;
                    }
                    let eps_u = self.unet.forward(&z, t as f64, &null, None)?.detach();
                    let target = &traj.latents[n - i - 1];
                    let targets: Option<&Vec<(LayerId, Tensor)>> = if record {
                        Some(match settings.pairing {
                            AttentionPairing::Authors => {
                                &traj.maps[if i == 0 { n - 1 } else { n - i }]
                            }
                            AttentionPairing::SameTimestep => &traj.maps[n - 1 - i],
                        })
                    } else {
                        None
                    };
                    let mut adam =
                        Adam::new(net.params.clone(), f64::INFINITY, &Default::default())?;
                    let iterations = settings.inner_at(i);
                    for j in 0..iterations {
                        let h = net.forward(&tokens)?;
                        let value =
                            styled_value(&cond.to_dtype(DType::F32)?, &h)?.to_dtype(self.dtype)?;
                        let mut rec = MapRecorder::new(grid, Some(value));
                        let eps_c = self.unet.forward(
                            &z,
                            t as f64,
                            &cond,
                            Some(&mut HookedPass::new(&mut rec, Branch::Conditional, i)),
                        )?;
                        let eps = (&eps_u + ((eps_c - &eps_u)? * w)?)?;
                        let z_prev = self.scheduler.step(&eps, t, &z, n)?;
                        let mut loss =
                            mse(&z_prev.to_dtype(DType::F32)?, &target.to_dtype(DType::F32)?)?;
                        if let Some(targets) = targets {
                            let maps = rec.take();
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
                                loss = (loss
                                    + (mse(
                                        &a.to_dtype(DType::F32)?,
                                        &a_star.to_dtype(DType::F32)?,
                                    )? * settings.attention_weight)?)?;
                            }
                        }
                        let grads = loss.backward()?;
                        adam.step(&grads, settings.lr_at(i))?;
                        let l = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                        progress("stylediffusion", i + 1, n, j + 1, l);
                        if l < settings.epsilon + 2e-5 * i as f64 {
                            break;
                        }
                    }
                    let h = net.forward(&tokens)?.detach();
                    let value =
                        styled_value(&cond.to_dtype(DType::F32)?, &h)?.to_dtype(self.dtype)?;
                    let mut rec = MapRecorder::new(grid, Some(value));
                    let eps_c = self.unet.forward(
                        &z,
                        t as f64,
                        &cond,
                        Some(&mut HookedPass::new(&mut rec, Branch::Conditional, i)),
                    )?;
                    z = self
                        .scheduler
                        .step(&(&eps_u + ((eps_c - &eps_u)? * w)?)?, t, &z, n)?
                        .detach();
                    hs.push(h);
                }
                values = Some(hs);
            }
            Method::NullText => {
                let mut uncond = null.to_dtype(DType::F32)?.detach();
                let mut embs = Vec::with_capacity(n);
                let mut z = z_t.clone();
                for (i, &t) in ts.iter().enumerate() {
                    let eps_c = self.unet.forward(&z, t as f64, &cond, None)?.detach();
                    let target = &traj.latents[n - i - 1];
                    let var = candle_core::Var::from_tensor(&uncond)?;
                    let mut adam = Adam::new(
                        vec![("uncond".into(), var.clone())],
                        f64::INFINITY,
                        &Default::default(),
                    )?;
                    for j in 0..settings.inner_at(i) {
                        let eps_u = self.unet.forward(
                            &z,
                            t as f64,
                            &var.as_tensor().to_dtype(self.dtype)?,
                            None,
                        )?;
                        let eps = (&eps_u + ((&eps_c - &eps_u)? * w)?)?;
                        let z_prev = self.scheduler.step(&eps, t, &z, n)?;
                        let loss =
                            mse(&z_prev.to_dtype(DType::F32)?, &target.to_dtype(DType::F32)?)?;
                        let grads = loss.backward()?;
                        adam.step(&grads, settings.lr_at(i))?;
                        let l = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                        progress("null-text", i + 1, n, j + 1, l);
                        if l < settings.epsilon + 2e-5 * i as f64 {
                            break;
                        }
                    }
                    uncond = var.as_tensor().detach();
                    let u = uncond.to_dtype(self.dtype)?;
                    let eps_u = self.unet.forward(&z, t as f64, &u, None)?;
                    z = self
                        .scheduler
                        .step(&(&eps_u + ((eps_c - &eps_u)? * w)?)?, t, &z, n)?
                        .detach();
                    embs.push(uncond.clone());
                }
                null_embeddings = Some(embs);
            }
        }
        let mut inv = Inversion {
            settings: settings.clone(),
            source_prompt: prompt.to_string(),
            z_t,
            values,
            null_embeddings,
            image: image.to_dtype(DType::F32)?,
            recon_psnr: 0.0,
            model_id: String::new(),
            image_sha256: String::new(),
        };
        let recon = self.reconstruct(&inv)?;
        crate::util::ensure_finite(&recon, "reconstruction")?;
        let vae_recon = self.vae.decode(&z0)?.to_dtype(DType::F32)?;
        inv.recon_psnr = psnr(&recon, &vae_recon)?;
        Ok(inv)
    }

    /// The unconditional context at step i for a batch of `batch` (source [, target]).
    pub fn uncond_context(&self, inv: &Inversion, i: usize, batch: usize) -> Result<Tensor> {
        let one = match (inv.settings.method, &inv.null_embeddings) {
            (Method::NullText, Some(embs)) => embs[i.min(embs.len() - 1)].to_dtype(self.dtype)?,
            (Method::NegativePrompt, _) => self.encode_prompt(&inv.source_prompt)?,
            _ => self.encode_prompt("")?,
        };
        Ok(Tensor::cat(&vec![&one; batch], 0)?)
    }

    /// Re-runs the source branch alone: the image the inversion reproduces, (1, 3, S, S) f32 in [-1, 1].
    pub fn reconstruct(&self, inv: &Inversion) -> Result<Tensor> {
        Ok(self.reconstruct_with_maps(inv, &inv.source_prompt)?.0)
    }

    /// The source branch with `prompt` as its text (values styled by the inversion when it has them), and the
    /// cross-attention maps of the regularised layers averaged over steps, layers and heads: (queries, tokens).
    pub fn reconstruct_with_maps(&self, inv: &Inversion, prompt: &str) -> Result<(Tensor, Tensor)> {
        self.check_inversion(inv)?;
        let n = inv.settings.steps;
        let ts = self.scheduler.timesteps(n)?;
        let cond = self.encode_prompt(prompt)?;
        let mut z = inv.z_t.to_dtype(self.dtype)?;
        let grid = regularisation_grid(self.unet.config(), (z.dim(2)?, z.dim(3)?));
        let mut sum: Option<Tensor> = None;
        let mut count = 0usize;
        for (i, &t) in ts.iter().enumerate() {
            let uncond = self.uncond_context(inv, i, 1)?;
            let eps_u = self.unet.forward(&z, t as f64, &uncond, None)?;
            let value = match &inv.values {
                Some(hs) => {
                    Some(styled_value(&cond.to_dtype(DType::F32)?, &hs[i])?.to_dtype(self.dtype)?)
                }
                None => None,
            };
            let mut rec = MapRecorder::new(grid, value);
            let eps_c = self.unet.forward(
                &z,
                t as f64,
                &cond,
                Some(&mut HookedPass::new(&mut rec, Branch::Conditional, i)),
            )?;
            for (_, m) in rec.take() {
                // (1, heads, Q, K) -> (Q, K), summed over heads.
                let m = m.to_dtype(DType::F32)?.get(0)?;
                count += m.dim(0)?;
                let m = m.sum(0)?;
                sum = Some(match sum {
                    Some(s) => (s + m)?,
                    None => m,
                });
            }
            z = self.scheduler.step(
                &(&eps_u + ((eps_c - &eps_u)? * inv.settings.guidance)?)?,
                t,
                &z,
                n,
            )?;
        }
        let maps = match sum {
            Some(s) => (s / count.max(1) as f64)?,
            None => {
                return Err(Error::invalid(
                    "attention maps",
                    "no cross-attention layer at the regularisation resolution",
                ));
            }
        };
        Ok((self.vae.decode(&z)?.to_dtype(DType::F32)?, maps))
    }
}

impl StableDiffusion {
    /// Mean squared distance between the cross-attention maps of the reconstruction (the inversion's learned
    /// conditions) and the DDIM-inversion maps it is regularised towards, over steps and regularised layers.
    pub fn attention_distance(&self, inv: &Inversion) -> Result<f64> {
        self.check_inversion(inv)?;
        let n = inv.settings.steps;
        let ts = self.scheduler.timesteps(n)?;
        let image = inv.image.to_dtype(self.dtype)?;
        let z0 = self.vae.encode(&image)?;
        let cond = self.encode_prompt(&inv.source_prompt)?;
        let traj = self.ddim_inversion(&z0, &cond, n, true, &mut |_, _, _, _, _| {})?;
        let mut z = inv.z_t.to_dtype(self.dtype)?;
        let grid = regularisation_grid(self.unet.config(), (z.dim(2)?, z.dim(3)?));
        let (mut total, mut count) = (0.0, 0usize);
        for (i, &t) in ts.iter().enumerate() {
            let uncond = self.uncond_context(inv, i, 1)?;
            let eps_u = self.unet.forward(&z, t as f64, &uncond, None)?;
            let value = match &inv.values {
                Some(hs) => {
                    Some(styled_value(&cond.to_dtype(DType::F32)?, &hs[i])?.to_dtype(self.dtype)?)
                }
                None => None,
            };
            let mut rec = MapRecorder::new(grid, value);
            let eps_c = self.unet.forward(
                &z,
                t as f64,
                &cond,
                Some(&mut HookedPass::new(&mut rec, Branch::Conditional, i)),
            )?;
            let targets = match inv.settings.pairing {
                AttentionPairing::Authors => &traj.maps[if i == 0 { n - 1 } else { n - i }],
                AttentionPairing::SameTimestep => &traj.maps[n - 1 - i],
            };
            for ((_, a), (_, b)) in rec.take().iter().zip(targets) {
                total += mse(&a.to_dtype(DType::F32)?, &b.to_dtype(DType::F32)?)?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?;
                count += 1;
            }
            z = self.scheduler.step(
                &(&eps_u + ((eps_c - &eps_u)? * inv.settings.guidance)?)?,
                t,
                &z,
                n,
            )?;
        }
        Ok(total / count.max(1) as f64)
    }
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
