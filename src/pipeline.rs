//! Text-to-image with classifier-free guidance and the DDIM sampler.

use candle_core::{DType, Tensor};

use crate::limits::MAX_SIDE;
use crate::model::StableDiffusion;
use crate::util::seeded_noise;
use crate::{Error, Result};

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub guidance: f64,
    pub seed: u64,
    /// Pixel size; `None` = the model's native size.
    pub width: Option<usize>,
    pub height: Option<usize>,
    /// Initial noise (1, C, H/f, W/f); when given, `seed`, `width` and `height` are not used for it.
    pub latents: Option<Tensor>,
}

impl GenerateOptions {
    pub fn new(prompt: impl Into<String>) -> Self {
        Self {
            prompt: prompt.into(),
            negative_prompt: String::new(),
            steps: 50,
            guidance: 7.5,
            seed: 0,
            width: None,
            height: None,
            latents: None,
        }
    }
}

impl GenerateOptions {
    /// The numbers alone (no model needed): guidance finite and in range, sizes within `limits::MAX_SIDE`.
    pub fn validate(&self) -> Result<()> {
        crate::limits::finite_in("guidance", self.guidance, 0.0, crate::limits::MAX_GUIDANCE)?;
        crate::limits::count_in("steps", self.steps, 1, 1000)?;
        for (name, v) in [("width", self.width), ("height", self.height)] {
            if let Some(v) = v {
                crate::limits::count_in(name, v, 1, MAX_SIDE)?;
            }
        }
        Ok(())
    }
}

pub struct Generated {
    /// Final latent before decoding, (1, C, h, w) f32.
    pub latents: Tensor,
    /// Decoded image in [-1, 1], (1, 3, H, W) f32.
    pub image: Tensor,
}

impl StableDiffusion {
    /// The initial noise for a run: from `opts.latents` (checked) or from the seed.
    pub fn initial_latents(&self, opts: &GenerateOptions) -> Result<Tensor> {
        let f = self.vae.config().downscale();
        let c = self.latent_channels();
        if let Some(l) = &opts.latents {
            let dims = l.dims();
            if dims.len() != 4 || dims[0] != 1 || dims[1] != c {
                return Err(Error::invalid(
                    "--latents",
                    format!("shape {dims:?}; expected [1, {c}, H/{f}, W/{f}]"),
                ));
            }
            for (name, v) in [("latent height", dims[2]), ("latent width", dims[3])] {
                crate::limits::count_in(name, v, 1, MAX_SIDE / f)?;
            }
            crate::util::ensure_finite(l, "initial latent")?;
            return Ok(l.to_device(&self.device)?.to_dtype(DType::F32)?);
        }
        let native = self.native_size();
        let (w, h) = (opts.width.unwrap_or(native), opts.height.unwrap_or(native));
        for (name, v) in [("width", w), ("height", h)] {
            if v == 0 || v % f != 0 || v > MAX_SIDE {
                return Err(Error::invalid(
                    name,
                    format!("{v}: must be a positive multiple of {f}, at most {MAX_SIDE}"),
                ));
            }
        }
        seeded_noise(&[1, c, h / f, w / f], opts.seed, &self.device)
    }

    /// Runs the guided DDIM sampler; `on_step(i, n)` is called after each step.
    pub fn generate(
        &self,
        opts: &GenerateOptions,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Generated> {
        opts.validate()?;
        let timesteps = self.scheduler.timesteps(opts.steps)?;
        self.tokenizer.check_length(&opts.prompt)?;
        self.tokenizer
            .check_length(&opts.negative_prompt)
            .map_err(|e| Error::invalid("negative prompt", e.to_string()))?;
        let init = self.initial_latents(opts)?;
        let guided = opts.guidance > 1.0;
        crate::limits::ensure_fits(
            "this image",
            self.estimate_working_memory(
                if guided { 2 } else { 1 },
                (init.dim(2)?, init.dim(3)?),
                false,
            ),
            &self.device,
        )?;
        let cond = self.encode_prompt(&opts.prompt)?;
        let context = if guided {
            Tensor::cat(&[&self.encode_prompt(&opts.negative_prompt)?, &cond], 0)?
        } else {
            cond
        };
        let mut latents = init.to_dtype(self.dtype)?;
        for (i, &t) in timesteps.iter().enumerate() {
            let input = if guided {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let out = self.unet.forward(&input, t as f64, &context, None)?;
            let noise = if guided {
                let uncond = out.get(0)?.unsqueeze(0)?;
                let text = out.get(1)?.unsqueeze(0)?;
                (&uncond + ((text - &uncond)? * opts.guidance)?)?
            } else {
                out
            };
            latents = self.scheduler.step(&noise, t, &latents, opts.steps)?;
            on_step(i + 1, timesteps.len());
        }
        crate::util::ensure_finite(&latents, "final latent")?;
        let image = self.vae.decode(&latents)?.to_dtype(DType::F32)?;
        crate::util::ensure_finite(&image, "generated image")?;
        Ok(Generated {
            latents: latents.to_dtype(DType::F32)?,
            image,
        })
    }
}
