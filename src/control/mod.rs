//! Attention control: implementations of the model's one attention hook (recording maps, Prompt-to-Prompt and
//! P2Plus editing, StyleDiffusion's value input) and the token bookkeeping they need.

pub mod edit;
pub mod record;
pub mod words;
