//! Parity with diffusers/transformers on small random-weight pipelines written by tools/make_parity_fixtures.py.
//! Tolerance: max |ours - reference| / max |reference| <= 1e-4 in f32.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use stylediff::model::{LoadOptions, StableDiffusion};
use stylediff::pipeline::GenerateOptions;

const TOL: f64 = 1e-4;

struct Fixture {
    sd: StableDiffusion,
    refs: HashMap<String, Tensor>,
    prompts: Vec<String>,
}

fn fixture(kind: &str, dtype: DType) -> Fixture {
    let dir = common::repo_path("tests/fixtures");
    let device = common::test_device();
    let opts = LoadOptions {
        dtype,
        device: device.clone(),
        image_encoder: true,
        ..Default::default()
    };
    let sd = StableDiffusion::load(&dir.join(format!("{kind}-tiny")), &opts).unwrap();
    let refs =
        candle_core::safetensors::load(dir.join(format!("{kind}-tiny-refs.safetensors")), &device)
            .unwrap();
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(format!("{kind}-tiny-refs.json"))).unwrap(),
    )
    .unwrap();
    let prompts = meta["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    Fixture { sd, refs, prompts }
}

impl Fixture {
    fn r(&self, name: &str) -> Tensor {
        self.refs
            .get(name)
            .unwrap_or_else(|| panic!("reference {name} missing"))
            .to_dtype(DType::F32)
            .unwrap()
    }
}

/// max |a - b| / max |b|
fn rel_err(ours: &Tensor, reference: &Tensor) -> f64 {
    assert_eq!(ours.dims(), reference.dims(), "shape");
    let cpu = |t: &Tensor| {
        t.to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
    };
    let (ours, reference) = (cpu(ours), cpu(reference));
    let diff = (ours - &reference)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let scale = reference
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    diff / scale.max(1e-12)
}

fn assert_close(what: &str, ours: &Tensor, reference: &Tensor, tol: f64) {
    let e = rel_err(ours, reference);
    eprintln!("{what}: relative error {e:.2e}");
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.0e}");
}

fn text_embeddings(f: &Fixture) -> Tensor {
    let embs: Vec<Tensor> = f
        .prompts
        .iter()
        .map(|p| f.sd.encode_prompt(p).unwrap())
        .collect();
    Tensor::cat(&embs, 0).unwrap()
}

fn check_text(kind: &str) {
    let f = fixture(kind, DType::F32);
    let ids: Vec<Vec<i64>> = f.refs["text.ids"].to_vec2().unwrap();
    for (prompt, expected) in f.prompts.iter().zip(ids) {
        let ours: Vec<i64> =
            f.sd.tokenizer
                .encode_padded(prompt)
                .unwrap()
                .into_iter()
                .map(i64::from)
                .collect();
        assert_eq!(ours, expected, "token ids of {prompt:?}");
    }
    assert_close(
        &format!("{kind} text embeddings"),
        &text_embeddings(&f),
        &f.r("text.embeddings"),
        TOL,
    );
}

fn check_vision(kind: &str) {
    let f = fixture(kind, DType::F32);
    let enc = f.sd.image_encoder.as_ref().unwrap();
    let out = enc.forward(&f.r("vision.pixel_values")).unwrap();
    assert_close(
        "vision tokens (post-LN, all tokens)",
        &out.tokens,
        &f.r("vision.tokens"),
        TOL,
    );
    assert_close("vision pooled", &out.pooled, &f.r("vision.pooled"), TOL);
    assert_close(
        "vision image_embeds",
        out.image_embeds.as_ref().unwrap(),
        &f.r("vision.image_embeds"),
        TOL,
    );
}

fn check_unet(kind: &str) {
    let f = fixture(kind, DType::F32);
    let context = f.r("text.embeddings");
    for case in ["square", "rect"] {
        let t = f
            .r(&format!("unet.{case}.timestep"))
            .to_vec1::<f32>()
            .unwrap()[0] as f64;
        let noise =
            f.sd.unet
                .forward(&f.r(&format!("unet.{case}.latents")), t, &context, None)
                .unwrap();
        assert_close(
            &format!("{kind} unet {case}"),
            &noise,
            &f.r(&format!("unet.{case}.noise")),
            TOL,
        );
    }
}

fn check_vae(kind: &str) {
    let f = fixture(kind, DType::F32);
    assert_close(
        "vae encode mean",
        &f.sd.vae.encode_mean(&f.r("vae.image")).unwrap(),
        &f.r("vae.mean"),
        TOL,
    );
    assert_close(
        "vae decode",
        &f.sd.vae.decode(&f.r("vae.latents")).unwrap(),
        &f.r("vae.decoded"),
        TOL,
    );
}

fn check_generate(kind: &str) {
    let f = fixture(kind, DType::F32);
    let mut opts = GenerateOptions::new(f.prompts[0].clone());
    opts.steps = 5;
    opts.latents = Some(f.r("generate.init_latents"));
    let mut seen = 0;
    let mut monitor = stylediff::Monitor::new(|p| seen = p.step);
    let out = stylediff::pipeline::generate(&f.sd, &opts, &mut monitor).unwrap();
    drop(monitor);
    assert_eq!(seen, 5);
    assert_close(
        &format!("{kind} 5-step guided latents"),
        &out.latents,
        &f.r("generate.final_latents"),
        TOL,
    );
    // diffusers' output_type="np" maps [-1, 1] to [0, 1] and clamps.
    let image = ((out.image / 2.0).unwrap() + 0.5)
        .unwrap()
        .clamp(0.0, 1.0)
        .unwrap();
    assert_close(
        &format!("{kind} 5-step guided image"),
        &image,
        &f.r("generate.image"),
        TOL,
    );
}

#[test]
fn sd1_text_encoder() {
    check_text("sd1");
}
#[test]
fn sd2_text_encoder_gelu() {
    check_text("sd2");
}
#[test]
fn sd1_vision_encoder() {
    check_vision("sd1");
}
#[test]
fn sd1_unet() {
    check_unet("sd1");
}
#[test]
fn sd2_unet_linear_projection_per_level_heads() {
    check_unet("sd2");
}
#[test]
fn sd1_vae() {
    check_vae("sd1");
}
#[test]
fn sd2_vae() {
    check_vae("sd2");
}
#[test]
fn sd1_guided_generation() {
    check_generate("sd1");
}
#[test]
fn sd2_guided_generation() {
    check_generate("sd2");
}

#[test]
fn ddim_matches_diffusers() {
    let f = fixture("sd1", DType::F32);
    let ddim = &f.sd.scheduler;
    let ac = f.refs["ddim.alphas_cumprod"].to_vec1::<f64>().unwrap();
    for (a, b) in ddim.alphas_cumprod().iter().zip(&ac) {
        // f32 cumulative products accumulate rounding differently from torch; 1e-5 relative is far below what matters.
        assert!((a - b).abs() <= 1e-5 * b.abs(), "alphas_cumprod {a} vs {b}");
    }
    for steps in [5usize, 10, 50] {
        let expected: Vec<i64> = f.refs[&format!("ddim.timesteps.{steps}")]
            .to_vec1()
            .unwrap();
        let ours: Vec<i64> = ddim
            .timesteps(steps)
            .unwrap()
            .into_iter()
            .map(|t| t as i64)
            .collect();
        assert_eq!(ours, expected, "{steps} timesteps");
    }
    let t = f.refs["ddim.step_timestep"].to_vec1::<i64>().unwrap()[0] as usize;
    let (out, sample) = (f.r("ddim.model_output"), f.r("ddim.sample"));
    assert_close(
        "ddim step",
        &ddim.step(&out, t, &sample, 10).unwrap(),
        &f.r("ddim.prev_sample"),
        TOL,
    );
    assert_close(
        "ddim inverse step",
        &ddim.inverse_step(&out, t, &sample, 10).unwrap(),
        &f.r("ddim.next_sample"),
        TOL,
    );

    let mut cfg = f.sd.scheduler_config.clone();
    cfg.clip_sample = Some(true);
    let clipped = stylediff::model::scheduler::Ddim::new(&cfg).unwrap();
    assert_close(
        "ddim step (clip_sample)",
        &clipped.step(&out, t, &sample, 10).unwrap(),
        &f.r("ddim.clipped.prev_sample"),
        TOL,
    );

    for (spacing, prediction) in [("trailing", "v_prediction"), ("linspace", "sample")] {
        let mut cfg = f.sd.scheduler_config.clone();
        cfg.timestep_spacing = spacing.into();
        cfg.prediction_type = prediction.into();
        let other = stylediff::model::scheduler::Ddim::new(&cfg).unwrap();
        let expected: Vec<i64> = f.refs[&format!("ddim.{spacing}.timesteps")]
            .to_vec1()
            .unwrap();
        let ours: Vec<i64> = other
            .timesteps(10)
            .unwrap()
            .into_iter()
            .map(|t| t as i64)
            .collect();
        assert_eq!(ours, expected, "{spacing} timesteps");
        let t = f.refs[&format!("ddim.{spacing}.step_timestep")]
            .to_vec1::<i64>()
            .unwrap()[0] as usize;
        assert_close(
            &format!("ddim step ({prediction})"),
            &other.step(&out, t, &sample, 10).unwrap(),
            &f.r(&format!("ddim.{spacing}.prev_sample")),
            TOL,
        );
    }
}

/// Weights stored in f16 or bf16 (under a dtype-variant file name, as diffusers writes them) load into an f32 or
/// f16 compute dtype; results stay close to the f32 reference (tolerances reflect the storage precision).
#[test]
fn half_precision_weights_and_compute() {
    let refs = candle_core::safetensors::load(
        common::repo_path("tests/fixtures/sd1-tiny-refs.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let context = &refs["text.embeddings"];
    let latents = &refs["unet.square.latents"];
    for (stored, compute, tol) in [
        (DType::F16, DType::F32, 5e-3),
        (DType::F16, DType::F16, 2e-2),
        (DType::BF16, DType::F32, 5e-2),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        common::copy_dir(&common::repo_path("tests/fixtures/sd1-tiny"), tmp.path());
        for comp in ["unet", "vae", "text_encoder"] {
            let dir = tmp.path().join(comp);
            let file = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .unwrap();
            let tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
            let half: HashMap<String, Tensor> = tensors
                .into_iter()
                .map(|(k, v)| (k, v.to_dtype(stored).unwrap()))
                .collect();
            std::fs::remove_file(&file).unwrap();
            let name = file
                .file_name()
                .unwrap()
                .to_string_lossy()
                .replace(".safetensors", ".fp16.safetensors");
            candle_core::safetensors::save(&half, dir.join(name)).unwrap();
        }
        let opts = LoadOptions {
            dtype: compute,
            ..Default::default()
        };
        let sd = StableDiffusion::load(tmp.path(), &opts).unwrap();
        let noise = sd
            .unet
            .forward(
                &latents.to_dtype(compute).unwrap(),
                500.0,
                &context.to_dtype(compute).unwrap(),
                None,
            )
            .unwrap();
        assert_eq!(noise.dtype(), compute);
        assert_close(
            &format!("unet from {stored:?} weights, {compute:?} compute"),
            &noise,
            &refs["unet.square.noise"],
            tol,
        );
    }
}

#[test]
fn bf16_compute_on_cpu_is_refused_clearly() {
    let opts = LoadOptions {
        dtype: DType::BF16,
        ..Default::default()
    };
    let err = StableDiffusion::load(&common::repo_path("tests/fixtures/sd1-tiny"), &opts)
        .err()
        .expect("must fail")
        .to_string();
    assert!(err.contains("bf16"), "{err}");
}

/// CLIP preprocessing against transformers' CLIPImageProcessor (PIL bicubic). Resampling filters differ slightly
/// between PIL and the image crate, so the tolerance is in normalised units: mean |diff| < 0.005, max < 0.05 (measured: 0.0007 and 0.014).
#[test]
fn clip_preprocessing_matches_transformers() {
    let img = image::open(common::repo_path("tests/fixtures/preprocess-input.png")).unwrap();
    let ours = stylediff::model::clip::vision::preprocess(&img, 32, &Device::Cpu).unwrap();
    let refs = candle_core::safetensors::load(
        common::repo_path("tests/fixtures/sd1-tiny-refs.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let reference = &refs["preprocess.pixel_values"];
    assert_eq!(ours.dims(), reference.dims());
    let diff = (ours - reference).unwrap().abs().unwrap();
    let mean = diff.mean_all().unwrap().to_scalar::<f32>().unwrap();
    let max = diff
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    eprintln!("preprocess: mean |diff| {mean:.4}, max {max:.4}");
    assert!(mean < 0.005 && max < 0.05, "mean {mean}, max {max}");
}
