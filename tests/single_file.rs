//! Single-file checkpoints in the original Stable Diffusion layout: `tests/fixtures/sd1-tiny-single.safetensors`
//! is the tiny pipeline written by `tools/make_single_file_fixture.py` (whose names diffusers' `from_single_file`
//! reads back exactly); loaded with the tiny configs it must give the folder's latents.

mod common;

use std::path::Path;
use std::process::Command;

fn stylediff(args: &[&str], env: &[(&str, &Path)]) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stylediff"));
    cmd.env_remove("HF_HOME")
        .env("HF_ENDPOINT", "http://127.0.0.1:9");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let o = cmd.args(args).output().unwrap();
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

fn latents(
    model: &str,
    config: Option<&str>,
    env: &[(&str, &Path)],
    dir: &Path,
) -> (bool, String, Vec<u8>) {
    let lat = dir.join("lat.safetensors");
    let _ = std::fs::remove_file(&lat);
    let out = dir.join("out.png");
    let mut args = vec![
        "generate",
        "--model",
        model,
        "--prompt",
        "a red circle",
        "--steps",
        "3",
        "--seed",
        "2",
    ];
    if let Some(c) = config {
        args.extend(["--config", c]);
    }
    let (lat_s, out_s) = (
        lat.to_str().unwrap().to_string(),
        out.to_str().unwrap().to_string(),
    );
    args.extend(["--save-latents", &lat_s, "--out", &out_s]);
    let (ok, text) = stylediff(&args, env);
    (ok, text, std::fs::read(&lat).unwrap_or_default())
}

fn rewrite(
    src: &Path,
    dst: &Path,
    edit: impl FnOnce(&mut std::collections::HashMap<String, candle_core::Tensor>),
) {
    let mut t = candle_core::safetensors::load(src, &candle_core::Device::Cpu).unwrap();
    edit(&mut t);
    candle_core::safetensors::save(&t, dst).unwrap();
}

#[test]
fn a_single_file_gives_the_folders_latents_with_given_or_cached_configs() {
    let tmp = tempfile::tempdir().unwrap();
    let tiny = common::repo_path("tests/fixtures/sd1-tiny");
    let single = common::repo_path("tests/fixtures/sd1-tiny-single.safetensors");
    let empty_cache = tmp.path().join("empty-cache");
    let env = [("HF_HUB_CACHE", empty_cache.as_path())];
    let (ok, err, from_folder) = latents(tiny.to_str().unwrap(), None, &env, tmp.path());
    assert!(ok, "{err}");
    let (ok, err, from_file) = latents(
        single.to_str().unwrap(),
        Some(tiny.to_str().unwrap()),
        &env,
        tmp.path(),
    );
    assert!(ok, "{err}");
    assert_eq!(
        from_file, from_folder,
        "the single file is the folder's pipeline"
    );
    assert!(
        err.contains("single file"),
        "the model used is announced: {err}"
    );

    // Without --config: SD v1.5's configs from the hub cache; missing there, the error says what to fetch.
    let (ok, err, _) = latents(single.to_str().unwrap(), None, &env, tmp.path());
    assert!(!ok, "{err}");
    assert!(
        err.contains("stable-diffusion-v1-5/stable-diffusion-v1-5")
            && err.contains("unet/config.json")
            && err.contains("hf download"),
        "{err}"
    );
    let cache = tmp.path().join("cache");
    let snap = cache.join("models--stable-diffusion-v1-5--stable-diffusion-v1-5/snapshots/c0ffee");
    for f in [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/tokenizer_config.json",
        "tokenizer/special_tokens_map.json",
        "text_encoder/config.json",
        "unet/config.json",
        "vae/config.json",
    ] {
        std::fs::create_dir_all(snap.join(f).parent().unwrap()).unwrap();
        std::fs::copy(tiny.join(f), snap.join(f)).unwrap();
    }
    std::fs::write(
        cache.join("models--stable-diffusion-v1-5--stable-diffusion-v1-5/refs/main"),
        "c0ffee",
    )
    .or_else(|_| {
        std::fs::create_dir_all(
            cache.join("models--stable-diffusion-v1-5--stable-diffusion-v1-5/refs"),
        )?;
        std::fs::write(
            cache.join("models--stable-diffusion-v1-5--stable-diffusion-v1-5/refs/main"),
            "c0ffee",
        )
    })
    .unwrap();
    let (ok, err, cached) = latents(
        single.to_str().unwrap(),
        None,
        &[("HF_HUB_CACHE", cache.as_path())],
        tmp.path(),
    );
    assert!(ok, "{err}");
    assert_eq!(cached, from_folder);

    // inspect checks the file's names and shapes against the architecture.
    let (ok, text) = stylediff(
        &[
            "inspect",
            "--model",
            single.to_str().unwrap(),
            "--config",
            tiny.to_str().unwrap(),
        ],
        &env,
    );
    assert!(ok && text.contains("single-file checkpoint"), "{text}");
}

#[test]
fn broken_or_foreign_checkpoints_are_refused_with_the_tensor_named() {
    let tmp = tempfile::tempdir().unwrap();
    let tiny = common::repo_path("tests/fixtures/sd1-tiny");
    let single = common::repo_path("tests/fixtures/sd1-tiny-single.safetensors");
    let t = tiny.to_str().unwrap();
    let env: [(&str, &Path); 0] = [];

    let missing = tmp.path().join("missing.safetensors");
    rewrite(&single, &missing, |m| {
        m.remove("model.diffusion_model.input_blocks.1.0.in_layers.0.weight")
            .unwrap();
    });
    let (ok, err, _) = latents(missing.to_str().unwrap(), Some(t), &env, tmp.path());
    assert!(
        !ok && err.contains("model.diffusion_model.input_blocks.1.0.in_layers.0.weight"),
        "{err}"
    );
    let (ok, text) = stylediff(
        &[
            "inspect",
            "--model",
            missing.to_str().unwrap(),
            "--config",
            t,
        ],
        &env,
    );
    assert!(
        !ok && text.contains("input_blocks.1.0.in_layers.0.weight"),
        "{text}"
    );

    let misshaped = tmp.path().join("misshaped.safetensors");
    rewrite(&single, &misshaped, |m| {
        m.insert(
            "first_stage_model.decoder.conv_in.weight".into(),
            candle_core::Tensor::zeros(
                (3, 3, 3, 3),
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            )
            .unwrap(),
        );
    });
    let (ok, err, _) = latents(misshaped.to_str().unwrap(), Some(t), &env, tmp.path());
    assert!(
        !ok && err.contains("first_stage_model.decoder.conv_in.weight")
            && err.contains("[3, 3, 3, 3]"),
        "{err}"
    );

    // A safetensors file that is not a Stable Diffusion checkpoint, and a .ckpt.
    let (ok, err, _) = latents(
        tiny.join("vae/diffusion_pytorch_model.safetensors")
            .to_str()
            .unwrap(),
        None,
        &env,
        tmp.path(),
    );
    assert!(!ok && err.contains("model.diffusion_model"), "{err}");
    let ckpt = tmp.path().join("model.ckpt");
    std::fs::copy(&single, &ckpt).unwrap();
    let (ok, err, _) = latents(ckpt.to_str().unwrap(), None, &env, tmp.path());
    assert!(!ok && err.contains(".safetensors"), "{err}");

    // StyleDiffusion needs an image encoder, which a single file never holds.
    let photo = tmp.path().join("p.png");
    image::RgbImage::from_fn(32, 32, |x, y| image::Rgb([x as u8 * 8, y as u8 * 8, 0]))
        .save(&photo)
        .unwrap();
    let inv = tmp.path().join("i.safetensors");
    let invert = |extra: &[&str]| {
        let mut a = vec!["invert", "--model", single.to_str().unwrap(), "--config", t];
        a.extend([
            "--image",
            photo.to_str().unwrap(),
            "--prompt",
            "a red circle",
            "--steps",
            "2",
        ]);
        a.extend(["--inner-steps", "1", "--out", inv.to_str().unwrap()]);
        a.extend(extra);
        stylediff(&a, &env)
    };
    let (ok, err) = invert(&[]);
    assert!(
        !ok && err.contains("--image-encoder") && err.contains("single-file"),
        "{err}"
    );
    let enc = tiny.join("image_encoder");
    let (ok, err) = invert(&["--image-encoder", enc.to_str().unwrap()]);
    assert!(ok, "{err}");
}
