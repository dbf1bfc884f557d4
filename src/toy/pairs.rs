//! Edit pairs with exact ground truth: source.png, target_gt.png (same layout, edit applied) and mask.png
//! (pixels that must change), and batches of random pairs with a manifest for the benchmark.

use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::edits::{EditPair, single_word_edits_with_kind};
use super::render::{render, to_rgb_image};
use super::train::TOY_SIZE;
use super::world::{HELD_OUT_LAYOUT_SEEDS, SceneSpec};
use crate::Result;
use crate::util::{save_png, write_atomic};

/// Rendered source, ground truth and change mask of an edit at one layout.
pub struct RenderedPair {
    pub source: Vec<f32>,
    pub target: Vec<f32>,
    /// 1 where the edit changes the pixel.
    pub mask: Vec<bool>,
}

pub fn render_pair(pair: &EditPair, layout_seed: u64) -> RenderedPair {
    let source = render(&pair.source.layout(layout_seed, TOY_SIZE), TOY_SIZE);
    // Same layout seed and object count: the target keeps every size and position.
    let target = render(&pair.target.layout(layout_seed, TOY_SIZE), TOY_SIZE);
    let mask = source
        .chunks(3)
        .zip(target.chunks(3))
        .map(|(a, b)| a.iter().zip(b).any(|(x, y)| (x - y).abs() > 0.5 / 255.0))
        .collect();
    RenderedPair {
        source,
        target,
        mask,
    }
}

pub fn write_pair(pair: &EditPair, layout_seed: u64, dir: &Path) -> Result<RenderedPair> {
    let r = render_pair(pair, layout_seed);
    save_png(&dir.join("source.png"), &to_rgb_image(&r.source, TOY_SIZE))?;
    save_png(
        &dir.join("target_gt.png"),
        &to_rgb_image(&r.target, TOY_SIZE),
    )?;
    let mask: Vec<f32> = r.mask.iter().flat_map(|&m| [m as u8 as f32; 3]).collect();
    save_png(&dir.join("mask.png"), &to_rgb_image(&mask, TOY_SIZE))?;
    Ok(r)
}

/// One row of a pairs manifest.
#[derive(Clone, Debug)]
pub struct PairCase {
    pub case: usize,
    pub pair: EditPair,
    pub layout_seed: u64,
}

/// `n` random edit pairs (all edit kinds, one- and two-object scenes) on held-out layout seeds.
pub fn random_pairs(n: usize, seed: u64) -> Vec<PairCase> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x9A1E5);
    (0..n)
        .map(|case| {
            let source = SceneSpec::random(&mut rng);
            let edits = single_word_edits_with_kind(&source);
            let (target, ..) = edits[rng.random_range(0..edits.len())].clone();
            let pair = EditPair::new(&source, &target).expect("a generated single-word edit");
            PairCase {
                case,
                pair,
                layout_seed: HELD_OUT_LAYOUT_SEEDS + rng.random_range(0..1u64 << 32),
            }
        })
        .collect()
}

pub const MANIFEST_HEADER: &str = "case,source,target,edit_kind,object,layout_seed,mode,blend_source,blend_target,source_png,target_png,mask_png";

/// Writes each pair under `dir/case_NNNN/` and `dir/manifest.csv`.
pub fn write_pairs(cases: &[PairCase], dir: &Path) -> Result<()> {
    let mut csv = csv::Writer::from_writer(Vec::new());
    let csv_error = |e: csv::Error| crate::Error::file(dir.join("manifest.csv"), e.to_string());
    csv.write_record(MANIFEST_HEADER.split(','))
        .map_err(csv_error)?;
    for c in cases {
        let sub = format!("case_{:04}", c.case);
        write_pair(&c.pair, c.layout_seed, &dir.join(&sub))?;
        let p2p = c.pair.p2p();
        csv.write_record([
            c.case.to_string(),
            c.pair.source.caption(),
            c.pair.target.caption(),
            c.pair.kind.name().to_string(),
            c.pair.object.map_or("-1".into(), |k| k.to_string()),
            c.layout_seed.to_string(),
            p2p.mode.name().to_string(),
            p2p.blend_source,
            p2p.blend_target,
            format!("{sub}/source.png"),
            format!("{sub}/target_gt.png"),
            format!("{sub}/mask.png"),
        ])
        .map_err(csv_error)?;
    }
    let bytes = csv
        .into_inner()
        .map_err(|e| crate::Error::file(dir.join("manifest.csv"), e.to_string()))?;
    write_atomic(&dir.join("manifest.csv"), &bytes)
}
