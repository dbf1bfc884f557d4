//! Inversion and editing mechanics on the tiny random-weight pipeline (fast; quality is tested on the toy model).

mod common;

use std::process::Command;

use candle_core::{DType, Device, Tensor};
use stylediff::edit::{EditMode, EditSettings};
use stylediff::invert::{InversionSettings, Learned, Method, artifact};
use stylediff::model::{LoadOptions, StableDiffusion};
use stylediff::{CancelToken, Error, Inversion, Monitor, Phase, Progress};

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

fn invert(sd: &StableDiffusion, s: &InversionSettings) -> Inversion {
    stylediff::invert::invert(sd, &image(), PROMPT, s, &mut Monitor::silent()).unwrap()
}

fn edit(
    sd: &StableDiffusion,
    inv: &Inversion,
    e: &EditSettings,
) -> stylediff::Result<stylediff::Edited> {
    stylediff::edit::edit(sd, inv, e, &mut Monitor::silent())
}

fn reconstruct(sd: &StableDiffusion, inv: &Inversion) -> Tensor {
    stylediff::invert::reconstruct(sd, inv, &mut Monitor::silent()).unwrap()
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
        let inv = invert(&sd, &settings(method));
        assert!(inv.recon_psnr.is_finite());
        assert_eq!(inv.learned.method(), method);
        match &inv.learned {
            Learned::Values(v) => {
                assert_eq!(v.len(), 4);
                assert_eq!(v[0].dims(), &[154, 32], "2 x 77 rows of the text width");
            }
            Learned::NullText(e) => assert_eq!((e.len(), e[0].dims()), (4, &[1, 77, 32][..])),
            Learned::Nothing | Learned::NegativePrompt => {}
        }
        // Complete as the library returns it: where it came from and how it ran.
        assert_eq!(inv.model_id, sd.model_id);
        assert_eq!(
            inv.image_sha256,
            stylediff::image_io::pixels_sha256(
                &stylediff::util::tensor_to_image(&image()).unwrap()
            )
        );
        assert_eq!((inv.dtype.as_str(), inv.device.as_str()), ("f32", "cpu"));
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
        assert_eq!(common::max_diff(&back.z_t, &inv.z_t), 0.0);
        assert_eq!(
            (
                &back.model_id,
                &back.image_sha256,
                &back.dtype,
                &back.device
            ),
            (&inv.model_id, &inv.image_sha256, &inv.dtype, &inv.device)
        );
        // Editing from the loaded artifact reproduces the same reconstruction.
        let a = reconstruct(&sd, &inv);
        let b = reconstruct(&sd, &back);
        assert!(common::max_diff(&a, &b) < 1e-5);
    }
}

#[test]
fn stylediffusion_optimisation_lowers_its_loss() {
    let sd = tiny();
    let mut s = settings(Method::StyleDiffusion);
    s.inner_steps = 25;
    s.epsilon = 0.0;
    let mut first_step = Vec::new();
    let mut monitor = Monitor::new(|p| {
        if p.phase == Phase::Optimising && p.step == 1 {
            first_step.push(p.loss.unwrap());
        }
    });
    stylediff::invert::invert(&sd, &image(), PROMPT, &s, &mut monitor).unwrap();
    drop(monitor);
    assert_eq!(first_step.len(), 25);
    let (first, last) = (first_step[0], *first_step.last().unwrap());
    assert!(last < 0.5 * first, "loss {first} -> {last}");
}

/// The source branch of an edit is the reconstruction; with target = source, tau_v = 1 and no injection the
/// target branch is the same image.
#[test]
fn source_branch_is_the_reconstruction() {
    let sd = tiny();
    let inv = invert(&sd, &settings(Method::StyleDiffusion));
    let mut e = EditSettings::new(PROMPT);
    (e.tau_v, e.tau_c, e.tau_s, e.tau_u) = (1.0, 0.0, 0.0, 0.0);
    let out = edit(&sd, &inv, &e).unwrap();
    let recon = reconstruct(&sd, &inv);
    assert!(common::max_diff(&out.reconstruction, &recon) < 1e-4);
    assert!(common::max_diff(&out.edited, &recon) < 1e-4);
    // A real edit changes the target branch only.
    let mut e = EditSettings::new("a green circle on a blue background");
    e.blend = Some((vec!["circle".into()], vec!["circle".into()]));
    let out = edit(&sd, &inv, &e).unwrap();
    assert!(common::max_diff(&out.reconstruction, &recon) < 1e-4);
    assert!(common::max_diff(&out.edited, &recon) > 1e-3);
}

#[test]
fn edit_settings_are_checked_with_the_words_named() {
    let sd = tiny();
    let inv = invert(&sd, &settings(Method::Ddim));
    let err = |e: EditSettings| edit(&sd, &inv, &e).err().expect("must fail").to_string();
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
    edit(&sd, &inv, &e).unwrap();
}

/// An inversion made and saved by library code is complete: `stylediff edit` accepts it as it is.
#[test]
fn an_artifact_written_by_the_library_is_accepted_by_the_cli() {
    let sd = tiny();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lib.safetensors");
    artifact::save(&invert(&sd, &settings(Method::NullText)), &path).unwrap();
    let out = dir.path().join("edit.png");
    let o = Command::new(env!("CARGO_BIN_EXE_stylediff"))
        .args(["edit", "--model"])
        .arg(common::repo_path("tests/fixtures/sd1-tiny"))
        .arg("--inversion")
        .arg(&path)
        .args(["--target", "a green circle on a blue background", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let record = stylediff::util::read_image_settings(&out).unwrap().unwrap();
    assert_eq!(record["model_id"].as_str(), Some(sd.model_id.as_str()));
}

/// The progress of an inversion comes in order: every DDIM-inversion step, then each optimisation step's inner
/// iterations, then the reconstruction's steps.
#[test]
fn inversion_progress_arrives_in_order() {
    let sd = tiny();
    let mut seen: Vec<Progress> = Vec::new();
    let s = settings(Method::StyleDiffusion);
    let mut monitor = Monitor::new(|p| seen.push(*p));
    stylediff::invert::invert(&sd, &image(), PROMPT, &s, &mut monitor).unwrap();
    drop(monitor);
    let phases: Vec<Phase> = seen.iter().map(|p| p.phase).collect();
    let first = |ph| phases.iter().position(|&p| p == ph).unwrap();
    let last = |ph| phases.iter().rposition(|&p| p == ph).unwrap();
    assert!(last(Phase::DdimInversion) < first(Phase::Optimising));
    assert!(last(Phase::Optimising) < first(Phase::Reconstructing));
    let steps = |ph| {
        seen.iter()
            .filter(|p| p.phase == ph)
            .map(|p| p.step)
            .collect::<Vec<_>>()
    };
    assert_eq!(steps(Phase::DdimInversion), vec![1, 2, 3, 4]);
    assert_eq!(steps(Phase::Reconstructing), vec![1, 2, 3, 4]);
    let opt: Vec<(usize, usize)> = seen
        .iter()
        .filter(|p| p.phase == Phase::Optimising)
        .map(|p| (p.step, p.inner))
        .collect();
    assert!(opt.windows(2).all(|w| w[0] < w[1]), "{opt:?}");
    assert!(
        seen.iter()
            .filter(|p| p.phase == Phase::Optimising)
            .all(|p| {
                p.loss.is_some_and(f64::is_finite) && p.inner <= p.inner_budget && p.steps == 4
            })
    );
}

/// A cancelled job stops before its next UNet evaluation and says so.
#[test]
fn cancelling_stops_within_one_unet_evaluation() {
    let sd = tiny();
    for (cancel_at, method) in [
        (Phase::DdimInversion, Method::StyleDiffusion),
        (Phase::Optimising, Method::StyleDiffusion),
        (Phase::Optimising, Method::NullText),
        (Phase::Reconstructing, Method::Ddim),
    ] {
        let token = CancelToken::new();
        let mut evaluations_at_cancel = None;
        let mut monitor = Monitor::new(|p| {
            if p.phase == cancel_at && evaluations_at_cancel.is_none() {
                token.cancel();
                evaluations_at_cancel = Some(sd.unet.evaluations());
            }
        })
        .with_cancel(token.clone());
        let r = stylediff::invert::invert(&sd, &image(), PROMPT, &settings(method), &mut monitor);
        drop(monitor);
        assert!(
            matches!(r, Err(Error::Cancelled)),
            "{cancel_at:?}: {:?}",
            r.err()
        );
        assert_eq!(
            Some(sd.unet.evaluations()),
            evaluations_at_cancel,
            "{cancel_at:?}: no UNet evaluation after the cancel"
        );
    }
    // And an edit.
    let inv = invert(&sd, &settings(Method::Ddim));
    let token = CancelToken::new();
    let before = sd.unet.evaluations();
    let mut monitor = Monitor::new(|_| token.cancel()).with_cancel(token.clone());
    let e = EditSettings::new("a green circle on a blue background");
    let r = stylediff::edit::edit(&sd, &inv, &e, &mut monitor);
    assert!(matches!(r, Err(Error::Cancelled)));
    assert_eq!(
        sd.unet.evaluations() - before,
        2,
        "one guided step, then stop"
    );
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
