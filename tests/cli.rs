//! The command line, end to end, on the tiny parity pipeline.

mod common;

use common::{stylediff, text};

use candle_core::Device;

#[test]
fn generate_writes_png_and_latents_deterministically() {
    let model = common::repo_path("tests/fixtures/sd1-tiny");
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str| {
        let out = tmp.path().join(format!("{name}.png"));
        let lat = tmp.path().join(format!("{name}.safetensors"));
        let o = stylediff(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a red circle",
            "--steps",
            "4",
            "--seed",
            "9",
            "--out",
            out.to_str().unwrap(),
            "--save-latents",
            lat.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", text(&o));
        (std::fs::read(&out).unwrap(), std::fs::read(&lat).unwrap())
    };
    let (png_a, lat_a) = run("a");
    let (png_b, lat_b) = run("b");
    assert_eq!(png_a, png_b, "same seed, same image");
    assert_eq!(lat_a, lat_b);
    let img = image::load_from_memory(&png_a).unwrap();
    assert_eq!(
        (img.width(), img.height()),
        (32, 32),
        "default size = sample_size x VAE downscale"
    );
    let lat = stylediff::util::load_single_tensor(&tmp.path().join("a.safetensors"), &Device::Cpu)
        .unwrap();
    assert_eq!(lat.dims(), &[1, 4, 8, 8]);
}

/// `--latents` takes the initial noise from a file, so a run can be compared with diffusers from identical noise.
#[test]
fn generate_from_given_latents_matches_diffusers() {
    let model = common::repo_path("tests/fixtures/sd1-tiny");
    let refs = candle_core::safetensors::load(
        common::repo_path("tests/fixtures/sd1-tiny-refs.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let init = tmp.path().join("init.safetensors");
    stylediff::util::save_tensors(&init, &[("latents", &refs["generate.init_latents"])]).unwrap();
    let fin = tmp.path().join("final.safetensors");
    let o = stylediff(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a red circle on a blue background",
        "--steps",
        "5",
        "--latents",
        init.to_str().unwrap(),
        "--save-latents",
        fin.to_str().unwrap(),
        "--out",
        tmp.path().join("x.png").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let ours = stylediff::util::load_single_tensor(&fin, &Device::Cpu).unwrap();
    let reference = &refs["generate.final_latents"];
    let err = (ours - reference)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = reference
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(err / scale < 1e-4, "relative error {}", err / scale);
}

#[test]
fn generate_rejects_bad_input_clearly() {
    let model = common::repo_path("tests/fixtures/sd1-tiny");
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.safetensors");
    stylediff::util::save_tensors(
        &bad,
        &[(
            "x",
            &candle_core::Tensor::zeros((1, 3, 8, 8), candle_core::DType::F32, &Device::Cpu)
                .unwrap(),
        )],
    )
    .unwrap();
    let out = tmp.path().join("x.png");
    let o = stylediff(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "p",
        "--latents",
        bad.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("--latents") && text(&o).contains("[1, 3, 8, 8]"),
        "{}",
        text(&o)
    );
    assert!(!out.exists(), "no output on failure");

    let o = stylediff(&[
        "generate",
        "--model",
        "/nonexistent/model",
        "--prompt",
        "p",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("/nonexistent/model"), "{}", text(&o));

    let o = stylediff(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "p",
        "--steps",
        "0",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("steps"), "{}", text(&o));

    let o = stylediff(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "p",
        "--dtype",
        "f8",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("f8"), "{}", text(&o));
}

#[test]
fn inspect_summarises_a_good_folder_and_lists_every_problem_of_a_bad_one() {
    let model = common::repo_path("tests/fixtures/sd1-tiny");
    let o = stylediff(&["inspect", "--model", model.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    for needle in [
        "unet",
        "vae",
        "text_encoder",
        "image_encoder",
        "tokenizer",
        "PNDMScheduler",
        "all tensors match",
    ] {
        assert!(t.contains(needle), "missing {needle:?} in:\n{t}");
    }

    let tmp = tempfile::tempdir().unwrap();
    common::copy_dir(&model, tmp.path());
    common::edit_weights(&tmp.path().join("unet"), |w| {
        w.remove("conv_in.weight");
        w.remove("conv_out.bias");
        w.insert(
            "extra.weight".into(),
            candle_core::Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let o = stylediff(&["inspect", "--model", tmp.path().to_str().unwrap()]);
    assert!(!o.status.success());
    let t = text(&o);
    for needle in [
        "conv_in.weight",
        "conv_out.bias",
        "extra.weight",
        "3 problem",
    ] {
        assert!(t.contains(needle), "missing {needle:?} in:\n{t}");
    }
}

#[test]
fn help_explains_the_commands() {
    let o = stylediff(&["generate", "--help"]);
    let t = text(&o);
    for needle in [
        "--negative-prompt",
        "--guidance",
        "--latents",
        "--save-latents",
        "--dtype",
    ] {
        assert!(t.contains(needle), "{needle}");
    }
}

/// Every image `generate`, `edit` and `run` write records the settings that made it (a PNG iTXt chunk), and
/// the record reads back.
#[test]
fn written_pngs_record_their_settings() {
    let model = common::repo_path("tests/fixtures/sd1-tiny");
    let m = model.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let p = |n: &str| tmp.path().join(n).to_str().unwrap().to_string();
    let settings = |n: &str| {
        stylediff::util::read_image_settings(&tmp.path().join(n))
            .unwrap()
            .unwrap()
    };

    let o = stylediff(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "a red circle",
        "--negative-prompt",
        "blue",
        "--steps",
        "3",
        "--guidance",
        "5",
        "--seed",
        "11",
        "--out",
        &p("gen.png"),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let g = settings("gen.png");
    assert_eq!(g["prompt"], "a red circle");
    assert_eq!(g["negative_prompt"], "blue");
    assert_eq!(
        (
            g["steps"].as_u64(),
            g["guidance"].as_f64(),
            g["seed"].as_u64()
        ),
        (Some(3), Some(5.0), Some(11))
    );
    assert_eq!(g["model_id"].as_str().unwrap().len(), 64);
    assert_eq!(g["stylediff_version"], env!("CARGO_PKG_VERSION"));

    image::RgbImage::from_fn(32, 32, |x, y| image::Rgb([x as u8 * 8, y as u8 * 8, 60]))
        .save(tmp.path().join("photo.png"))
        .unwrap();
    let o = stylediff(&[
        "run",
        "--model",
        m,
        "--image",
        &p("photo.png"),
        "--prompt",
        "a red circle",
        "--target",
        "a green circle",
        "--steps",
        "3",
        "--inner-steps",
        "2",
        "--tau-v",
        "0.4",
        "--reweight",
        "green=2",
        "--out",
        &p("run.png"),
        "--grid",
        &p("grid.png"),
        "--save-inversion",
        &p("inv.safetensors"),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let o = stylediff(&[
        "edit",
        "--model",
        m,
        "--inversion",
        &p("inv.safetensors"),
        "--target",
        "a blue circle",
        "--mode",
        "replace",
        "--blend",
        "red,blue",
        "--out",
        &p("edit.png"),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    for (file, target) in [
        ("run.png", "a green circle"),
        ("grid.png", "a green circle"),
        ("edit.png", "a blue circle"),
    ] {
        let s = settings(file);
        assert_eq!(s["kind"], "edit", "{file}");
        assert_eq!(s["source_prompt"], "a red circle", "{file}");
        assert_eq!(s["target_prompt"], target, "{file}");
        assert_eq!(s["inversion"]["method"], "stylediffusion", "{file}");
        assert_eq!(s["inversion"]["steps"], 3, "{file}");
        assert_eq!(s["inversion"]["guidance"], 7.5, "{file}");
        assert_eq!(s["model_id"], g["model_id"], "{file}");
        assert_eq!(s["image_sha256"].as_str().unwrap().len(), 64, "{file}");
    }
    assert_eq!(settings("run.png")["edit"]["tau_v"], 0.4);
    assert_eq!(settings("run.png")["edit"]["reweight"][0][0], "green");
    assert_eq!(settings("edit.png")["edit"]["mode"], "replace");
    assert_eq!(settings("edit.png")["edit"]["blend"][1][0], "blue");

    // The attention sheet too; and the inversion's metadata says how it ran.
    let o = stylediff(&[
        "attention",
        "--model",
        m,
        "--inversion",
        &p("inv.safetensors"),
        "--prompt",
        "a blue circle",
        "--out",
        &p("maps.png"),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let a = settings("maps.png");
    assert_eq!(
        (a["kind"].as_str(), a["prompt"].as_str()),
        (Some("attention"), Some("a blue circle"))
    );
    assert_eq!(a["model_id"], g["model_id"]);
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("inv.safetensors.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (meta["dtype"].as_str(), meta["device"].as_str()),
        (Some("f32"), Some("cpu"))
    );
    assert_eq!(meta["stylediff_version"], env!("CARGO_PKG_VERSION"));
}
