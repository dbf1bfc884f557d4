//! Inversion and editing mechanics on the tiny random-weight pipeline (fast; quality is tested on the toy model).

mod common;

use std::process::Command;

use candle_core::{DType, Device, Tensor};
use stylediff::edit::{EditMode, EditSettings};
use stylediff::invert::{InversionSettings, Method, artifact};
use stylediff::model::{LoadOptions, StableDiffusion};

const PROMPT: &str = "a red circle on a blue background";

fn tiny() -> StableDiffusion {
    let opts = LoadOptions {
        image_encoder: true,
        ..Default::default()
    };
    StableDiffusion::load(&common::repo_path("tests/fixtures/sd1-tiny"), &opts).unwrap()
}

fn image() -> Tensor {
    let refs = candle_core::safetensors::load(
        common::repo_path("tests/fixtures/sd1-tiny-refs.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    refs["vae.image"].clone()
}

fn settings(method: Method) -> InversionSettings {
    let mut s = InversionSettings::new(method);
    s.steps = 4;
    s.inner_steps = 3;
    s
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn every_method_round_trips_through_the_artifact() {
    let sd = tiny();
    let dir = tempfile::tempdir().unwrap();
    for method in [
        Method::StyleDiffusion,
        Method::NullText,
        Method::NegativePrompt,
        Method::Ddim,
    ] {
        let mut inv = sd
            .invert(&image(), PROMPT, &settings(method), &mut |_, _, _, _, _| {})
            .unwrap();
        inv.model_id = "m".into();
        assert!(inv.recon_psnr.is_finite());
        assert_eq!(
            inv.values.as_ref().map(Vec::len),
            (method == Method::StyleDiffusion).then_some(4)
        );
        assert_eq!(
            inv.null_embeddings.as_ref().map(Vec::len),
            (method == Method::NullText).then_some(4)
        );
        if let Some(v) = &inv.values {
            assert_eq!(v[0].dims(), &[154, 32], "2 x 77 rows of the text width");
        }
        let path = dir.path().join(format!("{}.safetensors", method.name()));
        artifact::save(&inv, &path).unwrap();
        assert!(
            artifact::sidecar(&path).is_file(),
            "metadata beside the artifact"
        );
        assert!(artifact::sidecar(&path).ends_with(format!("{}.safetensors.json", method.name())));
        let back = artifact::load(&path, &Device::Cpu).unwrap();
        assert_eq!(back.settings.method, method);
        assert_eq!(back.source_prompt, PROMPT);
        assert_eq!(max_diff(&back.z_t, &inv.z_t), 0.0);
        // Editing from the loaded artifact reproduces the same reconstruction.
        let a = sd.reconstruct(&inv).unwrap();
        let b = sd.reconstruct(&back).unwrap();
        assert!(max_diff(&a, &b) < 1e-5);
    }
}

#[test]
fn stylediffusion_optimisation_lowers_its_loss() {
    let sd = tiny();
    let mut s = settings(Method::StyleDiffusion);
    s.inner_steps = 25;
    s.epsilon = 0.0;
    let mut first_step = Vec::new();
    sd.invert(&image(), PROMPT, &s, &mut |phase, step, _, _, loss| {
        if phase == "stylediffusion" && step == 1 {
            first_step.push(loss);
        }
    })
    .unwrap();
    assert_eq!(first_step.len(), 25);
    let (first, last) = (first_step[0], *first_step.last().unwrap());
    assert!(last < 0.5 * first, "loss {first} -> {last}");
}

/// The source branch of an edit is the reconstruction; with target = source, tau_v = 1 and no injection the
/// target branch is the same image.
#[test]
fn source_branch_is_the_reconstruction() {
    let sd = tiny();
    let inv = sd
        .invert(
            &image(),
            PROMPT,
            &settings(Method::StyleDiffusion),
            &mut |_, _, _, _, _| {},
        )
        .unwrap();
    let mut e = EditSettings::new(PROMPT);
    (e.tau_v, e.tau_c, e.tau_s, e.tau_u) = (1.0, 0.0, 0.0, 0.0);
    let out = sd.edit(&inv, &e, &mut |_, _| {}).unwrap();
    let recon = sd.reconstruct(&inv).unwrap();
    assert!(max_diff(&out.reconstruction, &recon) < 1e-4);
    assert!(max_diff(&out.edited, &recon) < 1e-4);
    // A real edit changes the target branch only.
    let mut e = EditSettings::new("a green circle on a blue background");
    e.blend = Some((vec!["circle".into()], vec!["circle".into()]));
    let out = sd.edit(&inv, &e, &mut |_, _| {}).unwrap();
    assert!(max_diff(&out.reconstruction, &recon) < 1e-4);
    assert!(max_diff(&out.edited, &recon) > 1e-3);
}

#[test]
fn edit_settings_are_checked_with_the_words_named() {
    let sd = tiny();
    let inv = sd
        .invert(
            &image(),
            PROMPT,
            &settings(Method::Ddim),
            &mut |_, _, _, _, _| {},
        )
        .unwrap();
    let err = |e: EditSettings| {
        sd.edit(&inv, &e, &mut |_, _| {})
            .err()
            .expect("must fail")
            .to_string()
    };
    let mut e = EditSettings::new("a striped red circle on a blue background");
    e.mode = EditMode::Replace;
    let m = err(e);
    assert!(
        m.contains("same number of words") && m.contains("7") && m.contains("8"),
        "{m}"
    );
    let mut e = EditSettings::new("a green circle on a blue background");
    e.blend = Some((vec!["square".into()], vec!["circle".into()]));
    let m = err(e);
    assert!(m.contains("\"square\"") && m.contains(PROMPT), "{m}");
    let mut e = EditSettings::new("a green circle on a blue background");
    e.reweight = vec![("striped".into(), 2.0)];
    assert!(err(e).contains("\"striped\""));
    let mut e = EditSettings::new("a green circle on a blue background");
    e.tau_c = 1.5;
    assert!(err(e).contains("tau_c"));
    // Refine works with an added word.
    let mut e = EditSettings::new("a striped red circle on a blue background");
    e.reweight = vec![("striped".into(), 2.0)];
    sd.edit(&inv, &e, &mut |_, _| {}).unwrap();
}

#[test]
fn editing_refuses_an_artifact_of_another_model() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("in.png");
    stylediff::util::save_png(&img, &stylediff::util::tensor_to_image(&image()).unwrap()).unwrap();
    let inv = dir.path().join("inv.safetensors");
    let bin = env!("CARGO_BIN_EXE_stylediff");
    let sd1 = common::repo_path("tests/fixtures/sd1-tiny");
    let sd2 = common::repo_path("tests/fixtures/sd2-tiny");
    let o = Command::new(bin)
        .args([
            "invert",
            "--model",
            sd1.to_str().unwrap(),
            "--image",
            img.to_str().unwrap(),
            "--prompt",
            PROMPT,
            "--method",
            "null-text",
            "--steps",
            "3",
            "--out",
            inv.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = dir.path().join("edit.png");
    let o = Command::new(bin)
        .args([
            "edit",
            "--model",
            sd2.to_str().unwrap(),
            "--inversion",
            inv.to_str().unwrap(),
            "--target",
            "a green circle on a blue background",
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("another model"));
    let grid = dir.path().join("grid.png");
    let o = Command::new(bin)
        .args([
            "edit",
            "--model",
            sd1.to_str().unwrap(),
            "--inversion",
            inv.to_str().unwrap(),
            "--target",
            "a green circle on a blue background",
            "--out",
            out.to_str().unwrap(),
            "--grid",
            grid.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let g = image::open(&grid).unwrap();
    // Three 32x32 tiles enlarged 4x (to at least 128 px) with 4 px gaps, and a 12 px caption line below.
    assert_eq!(
        (g.width(), g.height()),
        (3 * 128 + 2 * 4, 128 + 12),
        "input | reconstruction | edit"
    );
}

#[test]
fn images_of_any_mode_and_aspect_load_as_square_rgb() {
    let dir = tempfile::tempdir().unwrap();
    let grey = image::GrayImage::from_fn(40, 24, |x, _| image::Luma([(x * 6) as u8]));
    let rgba16 = image::ImageBuffer::<image::Rgba<u16>, Vec<u16>>::from_fn(20, 50, |x, y| {
        image::Rgba([x as u16 * 3000, y as u16 * 1000, 0, 65535])
    });
    grey.save(dir.path().join("g.png")).unwrap();
    rgba16.save(dir.path().join("c.png")).unwrap();
    for f in ["g.png", "c.png"] {
        let img = stylediff::image_io::load_square_rgb(&dir.path().join(f), 32).unwrap();
        assert_eq!(img.dimensions(), (32, 32));
    }
    let err = stylediff::image_io::load_square_rgb(&dir.path().join("missing.png"), 32)
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing.png"));
    if let Some(shared) = common::shared_fixtures() {
        // Really an RGBA PNG despite its .jpg name.
        let cow = shared.join("stylediffusion-official/example_images/a black and white cow is eating the grass in a field.jpg");
        assert_eq!(
            stylediff::image_io::load_square_rgb(&cow, 64)
                .unwrap()
                .dimensions(),
            (64, 64)
        );
    }
    let _ = DType::F32;
}
