//! stylediff: StyleDiffusion (prompt-embedding inversion + Prompt-to-Prompt editing) on Stable Diffusion v1.x,
//! in Rust on candle.
//!
//! Load a model once into an [`Editor`], invert a photo with a prompt that describes it, then edit the inversion
//! as often as you like with target prompts. Every job takes a [`Monitor`]: a progress callback and a
//! [`CancelToken`] checked before every UNet evaluation. On the bundled toy model (feature `toy-model`, on by
//! default), in about ten lines:
//!
//! ```
//! # #[cfg(feature = "toy-model")]
//! # fn main() -> stylediff::Result<()> {
//! use stylediff::{EditSettings, Editor, InversionSettings, Method, Monitor};
//!
//! let editor = Editor::toy()?;
//! let photo = stylediff::toy::render_caption("a red circle on a blue background", 0)?;
//! let mut settings = InversionSettings::new(Method::StyleDiffusion);
//! (settings.steps, settings.inner_steps) = (4, 2); // a quick run; the defaults are 50 and 100
//! let inversion = editor.invert(&photo, "a red circle on a blue background", &settings, &mut Monitor::silent())?;
//! let edit = EditSettings::new("a green circle on a blue background");
//! let result = editor.edit(&inversion, &edit, &mut Monitor::new(|p| eprintln!("{} {}/{}", p.phase.label(), p.step, p.steps)))?;
//! assert_eq!(result.edited_image()?.dimensions(), (32, 32));
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "toy-model"))]
//! # fn main() {}
//! ```
//!
//! Layers point one way: [`model`] (the pretrained networks, their scheduler and the single attention hook) <-
//! [`control`] (what the hook does: record maps, Prompt-to-Prompt, value injection) <- [`denoise`] (the one guided
//! denoising loop) <- [`invert`], [`edit`], [`pipeline`] <- [`editor`] and [`batch`] (the API) <- the command line
//! (`src/cli`) and any other front end.

pub mod batch;
pub mod control;
pub mod denoise;
pub mod edit;
pub mod editor;
pub mod engine_bench;
pub mod error;
pub mod image_io;
pub mod invert;
pub mod limits;
pub mod lock;
pub mod model;
pub mod optim;
pub mod outputs;
pub mod pipeline;
pub mod runtime;
pub mod shard;
#[cfg(feature = "studio")]
pub mod studio;
pub mod toy;
pub mod util;
pub mod viz;

pub use denoise::{CancelToken, Monitor, Phase, Progress};
pub use edit::{EditMode, EditSettings, Edited};
pub use editor::{AttentionMaps, Editor};
pub use error::{Error, Result};
pub use invert::{AttentionPairing, Inversion, InversionSettings, Learned, Method};
pub use model::{LoadOptions, ModelLocation, StableDiffusion};
pub use pipeline::{GenerateOptions, Generated};
