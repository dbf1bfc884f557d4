//! The bundled toy model: quality claims that the rest of the project relies on, and StyleDiffusion's behaviour
//! on it (reconstruction, attention regularisation, a colour edit that lands where the word says).

mod common;

use candle_core::{DType, Tensor};
use stylediff::edit::EditSettings;
use stylediff::invert::{InversionSettings, Method, psnr};
use stylediff::model::{LoadOptions, StableDiffusion};
use stylediff::toy::check::detect;
use stylediff::toy::edits::EditPair;
use stylediff::toy::eval::to_hwc01;
use stylediff::toy::pairs::render_pair;
use stylediff::toy::train::TOY_SIZE;
use stylediff::toy::world::{Color, SceneSpec};

fn toy() -> StableDiffusion {
    let dir = common::repo_path("models/toy");
    assert!(
        dir.join("model_index.json").is_file(),
        "models/toy is committed"
    );
    let opts = LoadOptions {
        image_encoder: true,
        ..Default::default()
    };
    StableDiffusion::load(&dir, &opts).unwrap()
}

fn to_tensor(px: &[f32]) -> Tensor {
    let rgb = stylediff::toy::render::to_rgb_image(px, TOY_SIZE);
    stylediff::util::image_to_tensor(&rgb, &candle_core::Device::Cpu).unwrap()
}

fn settings(method: Method, steps: usize, inner: usize) -> InversionSettings {
    let mut s = InversionSettings::new(method);
    s.steps = steps;
    s.inner_steps = inner;
    s
}

const SRC: &str = "a red circle on a blue background";

fn invert(
    sd: &StableDiffusion,
    image: &Tensor,
    caption: &str,
    s: &InversionSettings,
) -> stylediff::Inversion {
    stylediff::invert::invert(sd, image, caption, s, &mut stylediff::Monitor::silent()).unwrap()
}

/// StyleDiffusion's reconstruction of the test's render, against the VAE's own: the inversion must add less error
/// than the VAE itself (30 dB on held-out renders), and the claim is the lead over DDIM inversion. The figure moves
/// with float rounding: the same code gave 34.3 dB with gemm's AVX2 kernels and 32.0 dB with its AVX-512 ones
/// (60 inner iterations amplify the last bits), so the bar sits above the VAE's level, not at one machine's result.
const RECON_FLOOR_DB: f64 = 31.0;

#[test]
fn stylediffusion_reconstructs_far_better_than_ddim_inversion() {
    let sd = toy();
    let pair = EditPair::new(
        &SceneSpec::parse(SRC).unwrap(),
        &SceneSpec::parse("a green circle on a blue background").unwrap(),
    )
    .unwrap();
    let image = to_tensor(&render_pair(&pair, 1 << 41).source);
    let sdi = invert(&sd, &image, SRC, &settings(Method::StyleDiffusion, 20, 60));
    let ddim = invert(&sd, &image, SRC, &settings(Method::Ddim, 20, 0));
    eprintln!(
        "reconstruction PSNR vs the VAE reconstruction: stylediffusion {:.2} dB, ddim {:.2} dB",
        sdi.recon_psnr, ddim.recon_psnr
    );
    assert!(
        sdi.recon_psnr >= RECON_FLOOR_DB,
        "stylediffusion {:.2} dB",
        sdi.recon_psnr
    );
    assert!(
        sdi.recon_psnr >= ddim.recon_psnr + 5.0,
        "{:.2} vs {:.2}",
        sdi.recon_psnr,
        ddim.recon_psnr
    );

    // The same through the editing path: target = source, learned values at every step, no injection.
    let mut e = EditSettings::new(SRC);
    (e.tau_v, e.tau_c, e.tau_s, e.tau_u) = (1.0, 0.0, 0.0, 0.0);
    let out = stylediff::edit::edit(&sd, &sdi, &e, &mut stylediff::Monitor::silent()).unwrap();
    let vae_recon = sd.vae.decode(&sd.vae.encode(&image).unwrap()).unwrap();
    let p = psnr(&out.edited, &vae_recon).unwrap();
    assert!(
        p >= RECON_FLOOR_DB,
        "edit branch with target = source: {p:.2} dB"
    );
}

/// The regulariser can act only through the values' effect on later layers' queries (keys keep the text), so on
/// one image its effect is within the noise of the optimisation: summed over scenes of every shape, the maps of a
/// regularised inversion are the closer ones.
#[test]
fn attention_regularisation_keeps_maps_closer_to_ddim_inversion() {
    let sd = toy();
    let with = settings(Method::StyleDiffusion, 10, 40);
    let mut without = with.clone();
    without.attention_weight = 0.0;
    let (mut total_with, mut total_without) = (0.0, 0.0);
    for (k, caption) in [
        SRC,
        "a green square on a white background",
        "a striped yellow triangle on a black background",
        "a blue star on a gray background",
        "a dotted purple cross on a green background",
        "a white circle on a red background",
    ]
    .into_iter()
    .enumerate()
    {
        let layout = SceneSpec::parse(caption)
            .unwrap()
            .layout(1 << 42 | k as u64, TOY_SIZE);
        let image = to_tensor(&stylediff::toy::render::render(&layout, TOY_SIZE));
        let distance = |s: &InversionSettings| {
            let inv = invert(&sd, &image, caption, s);
            stylediff::invert::attention_distance(&sd, &inv, &mut stylediff::Monitor::silent())
                .unwrap()
        };
        let (da, db) = (distance(&with), distance(&without));
        eprintln!(
            "{caption}: attention distance to DDIM-inversion maps {da:.3e} regularised, {db:.3e} not"
        );
        total_with += da;
        total_without += db;
    }
    eprintln!("summed: {total_with:.3e} regularised, {total_without:.3e} not");
    assert!(
        total_with < total_without,
        "{total_with} vs {total_without}"
    );
}

#[test]
fn replacing_a_colour_word_recolours_the_object_and_keeps_the_rest() {
    let sd = toy();
    let target = "a green circle on a blue background";
    let pair = EditPair::new(
        &SceneSpec::parse(SRC).unwrap(),
        &SceneSpec::parse(target).unwrap(),
    )
    .unwrap();
    let r = render_pair(&pair, 1 << 43);
    let image = to_tensor(&r.source);
    let inv = invert(&sd, &image, SRC, &settings(Method::StyleDiffusion, 20, 60));
    // tau_v = 0: the toy model's learned mapping drifts far from the identity (scales of either sign up to ~3),
    // and on this case M_t applied to the TARGET embedding undoes the edit and greys the background (tau_v .5 ->
    // 13.9 dB outside the object, no green; over 100 benchmark edits .5 does as well as 0, docs/benchmark.md).
    // No local blend either: the claim is that the word swap alone keeps the rest (on earlier toy models the word
    // maps were nearly uniform and the blend mask covered every cell; see docs/toy-model.md).
    let mut e = EditSettings::new(target);
    e.tau_v = 0.0;
    let out = stylediff::edit::edit(&sd, &inv, &e, &mut stylediff::Monitor::silent()).unwrap();
    let edited = to_hwc01(&out.edited).unwrap();
    let d = detect(&edited, TOY_SIZE).expect("an object");
    assert_eq!(d.color, Color::Green, "the edit lands: {d:?}");
    // Outside the edited object the image stays as it was.
    let input = to_hwc01(&image.to_dtype(DType::F32).unwrap()).unwrap();
    let (mut se, mut n) = (0f64, 0usize);
    for (i, m) in r.mask.iter().enumerate() {
        if !m {
            for c in 0..3 {
                se += ((edited[i * 3 + c] - input[i * 3 + c]) as f64).powi(2);
                n += 1;
            }
        }
    }
    let psnr_unchanged = 10.0 * (1.0 / (se / n as f64)).log10();
    eprintln!("unchanged region PSNR against the input: {psnr_unchanged:.2} dB");
    assert!(psnr_unchanged >= 20.0, "{psnr_unchanged:.2} dB");
}

#[test]
fn the_quality_report_splits_by_object_count_and_confuses_shapes_consistently() {
    let sd = toy();
    let (report, images) =
        stylediff::toy::eval::evaluate(&sd, 12, 5, 7.5, 3, &mut |_, _| {}).unwrap();
    assert_eq!(images.len(), 12);
    let read: usize = report
        .shape_read_as
        .values()
        .flat_map(|row| row.values())
        .sum();
    assert_eq!(read, report.generated - report.no_object_found);
    let diagonal: usize = report
        .shape_read_as
        .iter()
        .filter_map(|(truth, row)| row.get(truth))
        .sum();
    assert_eq!(
        diagonal,
        (report.shape_right * report.generated as f64).round() as usize
    );
    // The grid's notes say the same as the report: one "read: SHAPE" per misread shape.
    let shape_notes: Vec<String> = stylediff::toy::world::Shape::ALL
        .iter()
        .map(|s| format!("read: {}", s.word()))
        .collect();
    let misread_shapes = images
        .iter()
        .filter(|s| s.misses.iter().any(|m| shape_notes.contains(m)))
        .count();
    assert_eq!(
        misread_shapes,
        report.generated - report.no_object_found - diagonal
    );
    let not_found = images
        .iter()
        .filter(|s| s.misses == ["no object found"])
        .count();
    assert_eq!(not_found, report.no_object_found);

    let objects: Vec<usize> = report.by_object_count.iter().map(|s| s.objects).collect();
    assert_eq!(
        objects,
        [1, 2],
        "held-out renders hold one- and two-object scenes"
    );
    let images: usize = report.by_object_count.iter().map(|s| s.images).sum();
    assert_eq!(images, report.vae_images);
    let weighted = |f: fn(&stylediff::toy::eval::ObjectCountSplit) -> f64| {
        report
            .by_object_count
            .iter()
            .map(|s| f(s) * s.images as f64)
            .sum::<f64>()
            / images as f64
    };
    assert!((weighted(|s| s.vae_psnr_mean) - report.vae_psnr_mean).abs() < 1e-9);
    assert!((weighted(|s| s.clip_top1) - report.clip_top1).abs() < 1e-9);
    for split in &report.by_object_count {
        for cos in [split.clip_caption_cosine, split.clip_nearest_edit_cosine] {
            assert!((-1.0..=1.0 + 1e-6).contains(&cos), "{split:?}");
        }
        // Captions differ from their edits by a word, and the text encoder tells every such pair apart.
        assert!(split.clip_nearest_edit_cosine < 0.9999, "{split:?}");
    }

    let md = report.markdown();
    assert!(md.contains("By number of objects"), "{md}");
    assert!(md.contains("caption-nearest-edit cosine"), "{md}");
    for shape in stylediff::toy::world::Shape::ALL {
        assert!(md.contains(&format!("| {} |", shape.word())), "{md}");
    }
}
