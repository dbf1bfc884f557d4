//! The library API: an [`Editor`] holds one loaded model and runs every job on it (invert a photo, edit an
//! inversion many times, show its attention maps, generate), each with a [`Monitor`] for progress and cancellation.
//! The CLI and the web studio are thin layers over it.
//!
//! ```no_run
//! use stylediff::{Editor, EditSettings, InversionSettings, Method, Monitor};
//!
//! # fn main() -> stylediff::Result<()> {
//! let editor = Editor::load("path/to/stable-diffusion-v1-5", &Default::default())?;
//! let photo = stylediff::image_io::load_rgb("cat.jpg".as_ref())?;
//! let settings = InversionSettings::new(Method::StyleDiffusion);
//! let inversion = editor.invert(&photo, "a cat sitting next to a mirror", &settings, &mut Monitor::silent())?;
//! let edit = EditSettings::new("a tiger sitting next to a mirror");
//! let result = editor.edit(&inversion, &edit, &mut Monitor::silent())?;
//! result.edited_image()?.save("tiger.png").unwrap();
//! # Ok(())
//! # }
//! ```

use std::path::Path;

use candle_core::Tensor;

use crate::denoise::Monitor;
use crate::edit::{EditSettings, Edited};
use crate::invert::{Inversion, InversionSettings, Method};
use crate::model::{LoadOptions, ModelLocation, StableDiffusion};
use crate::pipeline::{GenerateOptions, Generated};
use crate::runtime::on_worker_thread;
use crate::util::{image_to_tensor, tensor_to_image};
use crate::{Error, Result};

/// One loaded model and the jobs it runs.
pub struct Editor {
    model: StableDiffusion,
}

/// An inversion's cross-attention, one map per token of a prompt.
pub struct AttentionMaps {
    /// The source branch's image with that prompt, (1, 3, S, S) in [-1, 1].
    pub image: Tensor,
    /// (queries, tokens) averaged over steps, the regularised layers and heads; only the prompt's own tokens
    /// (start, words, end).
    pub maps: Tensor,
    /// The query grid (rows, columns) of `maps`.
    pub grid: (usize, usize),
    /// One label per token: `<start>`, each word piece, `<end>`.
    pub labels: Vec<String>,
}

impl AttentionMaps {
    /// The maps of one token, (rows, columns), each in [0, 1] after dividing by the largest.
    pub fn token_map(&self, token: usize) -> Result<Tensor> {
        let m = self.maps.narrow(1, token, 1)?.squeeze(1)?;
        let max = m.max_all()?.to_scalar::<f32>()?.max(1e-12);
        Ok((m / max as f64)?.reshape(self.grid)?)
    }

    /// A sheet of labelled heat maps over the image, `tile` pixels each.
    pub fn sheet(&self, tile: u32) -> Result<image::RgbImage> {
        crate::viz::attention_sheet(&self.image, &self.maps, self.grid, &self.labels, tile)
    }
}

impl Edited {
    /// The edit as 8-bit RGB.
    pub fn edited_image(&self) -> Result<image::RgbImage> {
        tensor_to_image(&self.edited)
    }

    /// The reconstruction (the source branch) as 8-bit RGB.
    pub fn reconstruction_image(&self) -> Result<image::RgbImage> {
        tensor_to_image(&self.reconstruction)
    }
}

impl Editor {
    /// Loads a model folder in the diffusers layout (see [`StableDiffusion::load_from`] for single files).
    pub fn load(folder: impl AsRef<Path>, opts: &LoadOptions) -> Result<Self> {
        Self::load_from(&ModelLocation::Folder(folder.as_ref().to_path_buf()), opts)
    }

    /// Loads a model from a folder or a single-file checkpoint.
    pub fn load_from(location: &ModelLocation, opts: &LoadOptions) -> Result<Self> {
        Ok(Self::new(on_worker_thread(|| {
            StableDiffusion::load_from(location, opts)
        })?))
    }

    /// The bundled toy model (32x32 toy scenes), with its image encoder, on the CPU in f32.
    #[cfg(feature = "toy-model")]
    pub fn toy() -> Result<Self> {
        let opts = LoadOptions {
            image_encoder: true,
            ..Default::default()
        };
        Self::load(crate::toy::bundled::toy_model_dir()?, &opts)
    }

    pub fn new(model: StableDiffusion) -> Self {
        Self { model }
    }

    /// The loaded networks, for what the editor does not wrap.
    pub fn model(&self) -> &StableDiffusion {
        &self.model
    }

    /// The model's identity; inversions record it.
    pub fn model_id(&self) -> &str {
        &self.model.model_id
    }

    /// The image side the model works at, in pixels.
    pub fn native_size(&self) -> usize {
        self.model.native_size()
    }

    /// A photo as the model inverts it: centre-cropped to a square, resized to the native size, as a tensor.
    pub fn photo_tensor(&self, photo: &image::RgbImage) -> Result<Tensor> {
        let square =
            crate::image_io::square(Path::new("photo"), photo.clone(), self.native_size())?;
        image_to_tensor(&square, &self.model.device)
    }

    /// Checks an inversion's inputs without running anything: settings, prompt length, the image encoder
    /// StyleDiffusion needs.
    pub fn check_inversion(&self, prompt: &str, settings: &InversionSettings) -> Result<()> {
        settings.validate()?;
        self.model.tokenizer.check_length(prompt)?;
        if settings.method == Method::StyleDiffusion && self.model.image_encoder.is_none() {
            return Err(Error::invalid(
                "image encoder",
                "StyleDiffusion needs a CLIP image encoder: load the model with LoadOptions::image_encoder",
            ));
        }
        Ok(())
    }

    /// Inverts a photo (any size; centre-cropped and resized) described by `prompt`.
    pub fn invert(
        &self,
        photo: &image::RgbImage,
        prompt: &str,
        settings: &InversionSettings,
        monitor: &mut Monitor,
    ) -> Result<Inversion> {
        self.check_inversion(prompt, settings)?;
        let image = self.photo_tensor(photo)?;
        on_worker_thread(|| crate::invert::invert(&self.model, &image, prompt, settings, monitor))
    }

    /// [`Editor::invert`], also returning the reconstruction it measured, (1, 3, S, S) in [-1, 1].
    pub fn invert_with_reconstruction(
        &self,
        photo: &image::RgbImage,
        prompt: &str,
        settings: &InversionSettings,
        monitor: &mut Monitor,
    ) -> Result<(Inversion, Tensor)> {
        self.check_inversion(prompt, settings)?;
        let image = self.photo_tensor(photo)?;
        on_worker_thread(|| {
            crate::invert::invert_and_reconstruct(&self.model, &image, prompt, settings, monitor)
        })
    }

    /// Checks an edit of an inversion with `source_prompt` and `steps` before running anything: numbers,
    /// prompt lengths, every word against its prompt.
    pub fn check_edit(&self, source_prompt: &str, steps: usize, edit: &EditSettings) -> Result<()> {
        crate::edit::check_edit(&self.model, source_prompt, steps, edit)
    }

    /// Edits an inversion made with this model.
    pub fn edit(
        &self,
        inversion: &Inversion,
        edit: &EditSettings,
        monitor: &mut Monitor,
    ) -> Result<Edited> {
        on_worker_thread(|| crate::edit::edit(&self.model, inversion, edit, monitor))
    }

    /// The reconstruction: what the inversion reproduces, (1, 3, S, S) in [-1, 1].
    pub fn reconstruct(&self, inversion: &Inversion, monitor: &mut Monitor) -> Result<Tensor> {
        on_worker_thread(|| crate::invert::reconstruct(&self.model, inversion, monitor))
    }

    /// The cross-attention of each token of `prompt` (default: the inversion's source prompt) while the source
    /// branch is replayed with what the inversion learned.
    pub fn attention_maps(
        &self,
        inversion: &Inversion,
        prompt: Option<&str>,
        monitor: &mut Monitor,
    ) -> Result<AttentionMaps> {
        let prompt = prompt.unwrap_or(&inversion.source_prompt);
        let (image, maps) = on_worker_thread(|| {
            crate::invert::attention_maps(&self.model, inversion, prompt, monitor)
        })?;
        let tokenizer = &self.model.tokenizer;
        let ids = tokenizer.encode_untruncated(prompt)?;
        let shown = ids.len().min(maps.dim(1)?);
        let labels = ids[..shown]
            .iter()
            .enumerate()
            .map(|(k, &t)| match k {
                0 => "<start>".to_string(),
                k if k + 1 == ids.len() => "<end>".to_string(),
                _ => tokenizer.decode_token(t),
            })
            .collect();
        let q = maps.dim(0)?;
        let side = (q as f64).sqrt().round() as usize;
        let grid = if side * side == q {
            (side, side)
        } else {
            (1, q)
        };
        Ok(AttentionMaps {
            image,
            maps: maps.narrow(1, 0, shown)?,
            grid,
            labels,
        })
    }

    /// Text-to-image.
    pub fn generate(&self, opts: &GenerateOptions, monitor: &mut Monitor) -> Result<Generated> {
        on_worker_thread(|| crate::pipeline::generate(&self.model, opts, monitor))
    }
}
