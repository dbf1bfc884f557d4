//! Loading real-world folder variants, and errors that name the folder, file, tensor and shapes.

mod common;

use candle_core::{DType, Device, Tensor};
use stylediff::model::{LoadOptions, StableDiffusion};

fn tiny_copy() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    common::copy_dir(&common::repo_path("tests/fixtures/sd1-tiny"), tmp.path());
    tmp
}

fn refs() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(
        common::repo_path("tests/fixtures/sd1-tiny-refs.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    d / b
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn load_err(dir: &std::path::Path) -> String {
    StableDiffusion::load(dir, &LoadOptions::default())
        .err()
        .expect("loading must fail")
        .to_string()
}

#[test]
fn legacy_2022_tensor_names_load_and_compute_the_same() {
    let tmp = tiny_copy();
    common::edit_weights(&tmp.path().join("vae"), |t| {
        let renamed: Vec<(String, String)> = t
            .keys()
            .filter_map(|k| {
                [
                    (".to_q.", ".query."),
                    (".to_k.", ".key."),
                    (".to_v.", ".value."),
                    (".to_out.0.", ".proj_attn."),
                ]
                .iter()
                .find(|(m, _)| k.contains(m))
                .map(|(m, l)| (k.clone(), k.replace(m, l)))
            })
            .collect();
        assert_eq!(renamed.len(), 16);
        for (old, new) in renamed {
            let v = t.remove(&old).unwrap();
            t.insert(new, v);
        }
    });
    common::edit_weights(&tmp.path().join("text_encoder"), |t| {
        let all: Vec<(String, Tensor)> = t.drain().collect();
        for (k, v) in all {
            t.insert(format!("text_model.{k}"), v);
        }
        t.insert(
            "text_model.embeddings.position_ids".into(),
            Tensor::arange(0i64, 77, &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
        );
    });
    let sd = StableDiffusion::load(tmp.path(), &LoadOptions::default()).unwrap();
    let r = refs();
    assert!(
        max_rel(
            &sd.vae.decode(&r["vae.latents"]).unwrap(),
            &r["vae.decoded"]
        ) < 1e-4
    );
    let emb = sd
        .encode_prompt("a red circle on a blue background")
        .unwrap();
    assert!(max_rel(&emb, &r["text.embeddings"].narrow(0, 0, 1).unwrap()) < 1e-4);
}

#[test]
fn image_encoder_from_a_separate_folder() {
    let tmp = tiny_copy();
    let elsewhere = tempfile::tempdir().unwrap();
    std::fs::rename(
        tmp.path().join("image_encoder"),
        elsewhere.path().join("enc"),
    )
    .unwrap();
    let mut opts = LoadOptions {
        image_encoder: true,
        ..Default::default()
    };
    let err = StableDiffusion::load(tmp.path(), &opts)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("image_encoder") && err.contains("missing"),
        "{err}"
    );
    opts.image_encoder_path = Some(elsewhere.path().join("enc"));
    let sd = StableDiffusion::load(tmp.path(), &opts).unwrap();
    let r = refs();
    let out = sd
        .image_encoder
        .unwrap()
        .forward(&r["vision.pixel_values"])
        .unwrap();
    assert!(max_rel(&out.tokens, &r["vision.tokens"]) < 1e-4);
}

#[test]
fn missing_tensor_error_names_file_tensor_and_shape() {
    let tmp = tiny_copy();
    common::edit_weights(&tmp.path().join("unet"), |t| {
        t.remove("mid_block.attentions.0.transformer_blocks.0.attn2.to_v.weight")
            .unwrap();
    });
    let err = load_err(tmp.path());
    assert!(err.contains("diffusion_pytorch_model.safetensors"), "{err}");
    assert!(
        err.contains("mid_block.attentions.0.transformer_blocks.0.attn2.to_v.weight"),
        "{err}"
    );
    assert!(err.contains("missing") && err.contains("[16, 32]"), "{err}");
}

#[test]
fn wrong_shape_error_names_both_shapes() {
    let tmp = tiny_copy();
    common::edit_weights(&tmp.path().join("vae"), |t| {
        t.insert(
            "decoder.conv_in.weight".into(),
            Tensor::zeros((16, 4, 1, 3), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let err = load_err(tmp.path());
    assert!(
        err.contains("decoder.conv_in.weight")
            && err.contains("[16, 4, 1, 3]")
            && err.contains("[16, 4, 3, 3]"),
        "{err}"
    );
}

#[test]
fn unsupported_config_and_missing_parts_are_named() {
    let tmp = tiny_copy();
    let cfg_path = tmp.path().join("unet/config.json");
    let cfg = std::fs::read_to_string(&cfg_path)
        .unwrap()
        .replace("\"DownBlock2D\"", "\"KDownBlock2D\"");
    std::fs::write(&cfg_path, cfg).unwrap();
    let err = load_err(tmp.path());
    assert!(
        err.contains("unet/config.json") && err.contains("KDownBlock2D"),
        "{err}"
    );

    let tmp = tiny_copy();
    std::fs::remove_dir_all(tmp.path().join("vae")).unwrap();
    let err = load_err(tmp.path());
    assert!(err.contains("vae") && err.contains("missing"), "{err}");

    let tmp = tiny_copy();
    std::fs::remove_file(tmp.path().join("model_index.json")).unwrap();
    assert!(load_err(tmp.path()).contains("model_index.json"));

    let tmp = tiny_copy();
    std::fs::write(tmp.path().join("text_encoder/config.json"), "{ not json").unwrap();
    let err = load_err(tmp.path());
    assert!(
        err.contains("text_encoder/config.json") && err.contains("parse"),
        "{err}"
    );
}
