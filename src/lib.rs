//! stylediff: StyleDiffusion (prompt-embedding inversion + Prompt-to-Prompt editing) on Stable Diffusion v1.x,
//! in Rust on candle.
//!
//! Layers point one way: `model` (the pretrained networks and their single attention hook) <- `scheduler`
//! <- `pipeline` (text-to-image) <- the CLI in `main.rs`.

pub mod batch;
pub mod control;
pub mod edit;
pub mod engine_bench;
pub mod error;
pub mod image_io;
pub mod invert;
pub mod limits;
pub mod model;
pub mod optim;
pub mod outputs;
pub mod pipeline;
pub mod scheduler;
pub mod toy;
pub mod util;
pub mod viz;

pub use error::{Error, Result};
