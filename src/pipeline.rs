//! Text-to-image with classifier-free guidance and the DDIM sampler.

use candle_core::{DType, Tensor};

use crate::denoise::{Conditioning, Monitor, Phase, replay};
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

/// The initial noise for a run: from `opts.latents` (checked) or from the seed.
pub fn initial_latents(sd: &StableDiffusion, opts: &GenerateOptions) -> Result<Tensor> {
    let f = sd.vae.config().downscale();
    let c = sd.latent_channels();
    if let Some(l) = &opts.latents {
        let dims = l.dims();
        if dims.len() != 4 || dims[0] != 1 || dims[1] != c {
            return Err(Error::invalid(
                "initial latent",
                format!("shape {dims:?}; expected [1, {c}, H/{f}, W/{f}]"),
            ));
        }
        for (name, v) in [("latent height", dims[2]), ("latent width", dims[3])] {
            crate::limits::count_in(name, v, 1, MAX_SIDE / f)?;
        }
        crate::util::ensure_finite(l, "initial latent")?;
        return Ok(l.to_device(&sd.device)?.to_dtype(DType::F32)?);
    }
    let native = sd.native_size();
    let (w, h) = (opts.width.unwrap_or(native), opts.height.unwrap_or(native));
    for (name, v) in [("width", w), ("height", h)] {
        if v == 0 || v % f != 0 || v > MAX_SIDE {
            return Err(Error::invalid(
                name,
                format!("{v}: must be a positive multiple of {f}, at most {MAX_SIDE}"),
            ));
        }
    }
    seeded_noise(&[1, c, h / f, w / f], opts.seed, &sd.device)
}

/// The prompt, and the negative prompt as the unconditional branch when guided.
struct Prompts {
    uncond: Option<Tensor>,
    cond: Tensor,
}

impl Conditioning for Prompts {
    fn contexts(&mut self, _step: usize) -> Result<(Option<Tensor>, Tensor)> {
        Ok((self.uncond.clone(), self.cond.clone()))
    }
}

/// Text-to-image: the guided DDIM sampler from the seed's (or the given) noise, then the VAE decoder.
pub fn generate(
    sd: &StableDiffusion,
    opts: &GenerateOptions,
    monitor: &mut Monitor,
) -> Result<Generated> {
    opts.validate()?;
    sd.scheduler.timesteps(opts.steps)?;
    sd.tokenizer.check_length(&opts.prompt)?;
    sd.tokenizer
        .check_length(&opts.negative_prompt)
        .map_err(|e| Error::invalid("negative prompt", e.to_string()))?;
    let init = initial_latents(sd, opts)?;
    let guided = opts.guidance > 1.0;
    crate::limits::ensure_fits(
        "this image",
        sd.estimate_working_memory(
            if guided { 2 } else { 1 },
            (init.dim(2)?, init.dim(3)?),
            false,
        ),
        &sd.device,
    )?;
    let mut prompts = Prompts {
        cond: sd.encode_prompt(&opts.prompt)?,
        uncond: match guided {
            true => Some(sd.encode_prompt(&opts.negative_prompt)?),
            false => None,
        },
    };
    let latents = init.to_dtype(sd.dtype)?;
    let latents = replay(
        sd,
        &latents,
        opts.steps,
        opts.guidance,
        &mut prompts,
        monitor,
        Phase::Generating,
    )?;
    crate::util::ensure_finite(&latents, "final latent")?;
    let image = sd.vae.decode(&latents)?.to_dtype(DType::F32)?;
    crate::util::ensure_finite(&image, "generated image")?;
    Ok(Generated {
        latents: latents.to_dtype(DType::F32)?,
        image,
    })
}
