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

/// A toy scene drawn from its caption (e.g. "a red circle on a blue background"), at the toy model's size;
/// `layout_seed` places the objects.
pub fn render_caption(caption: &str, layout_seed: u64) -> crate::Result<image::RgbImage> {
    let size = train::TOY_SIZE;
    let scene = world::SceneSpec::parse(caption)?.layout(layout_seed, size);
    Ok(render::to_rgb_image(&render::render(&scene, size), size))
}
