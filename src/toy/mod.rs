//! The toy world and the small SD-architecture model that stylediff trains on it.

pub mod bench;
pub mod bundled;
pub mod check;
pub mod edits;
pub mod eval;
pub mod optim;
pub mod pairs;
pub mod render;
pub mod tokenizer;
pub mod train;
pub mod world;
