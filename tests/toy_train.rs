//! Training: a few steps of every stage give a diffusers-layout folder that loads and passes the audit;
//! the run is deterministic for a seed, and an interrupted run resumes to the same weights.

use std::path::Path;
use std::sync::Mutex;

use stylediff::model::{ComponentKind, LoadOptions, StableDiffusion};
use stylediff::toy::train::{TrainOptions, train};

fn tiny(out: &Path) -> TrainOptions {
    let mut o = TrainOptions::new(out.to_path_buf(), 5);
    (o.vae_steps, o.clip_steps, o.unet_steps) = (3, 3, 3);
    (o.vae_batch, o.clip_batch, o.unet_batch) = (2, 3, 2);
    o.decoder_steps = 2;
    o.vision_steps = 3;
    o.checkpoint_every = 1;
    o
}

fn weights(dir: &Path) -> Vec<Vec<u8>> {
    [
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "image_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
    ]
    .iter()
    .map(|f| std::fs::read(dir.join(f)).unwrap())
    .collect()
}

#[test]
fn training_writes_a_loadable_folder_deterministically_and_resumes() {
    let a = tempfile::tempdir().unwrap();
    let seen = Mutex::new(Vec::new());
    train(&tiny(a.path()), &|stage, step, total, loss| {
        assert!(loss.is_finite());
        seen.lock().unwrap().push((stage.to_string(), step, total));
    })
    .unwrap();
    let seen = seen.into_inner().unwrap();
    for stage in ["vae", "clip", "unet", "vision"] {
        assert!(
            seen.contains(&(stage.to_string(), 3, 3)),
            "{stage} reported its steps"
        );
    }
    let opts = LoadOptions {
        image_encoder: true,
        ..Default::default()
    };
    let sd = StableDiffusion::load(a.path(), &opts).unwrap();
    assert_eq!(sd.native_size(), 32);
    for kind in ComponentKind::ALL {
        let dir = a.path().join(kind.folder_name());
        let catalog = stylediff::model::weights::WeightFiles::find(&dir)
            .unwrap()
            .catalog()
            .unwrap();
        assert!(
            kind.audit(&dir.join("config.json"), catalog)
                .unwrap()
                .is_empty(),
            "{kind:?}"
        );
    }

    // Same seed, same weights.
    let b = tempfile::tempdir().unwrap();
    train(&tiny(b.path()), &|_, _, _, _| {}).unwrap();
    assert!(
        weights(a.path()) == weights(b.path()),
        "training is deterministic for a seed"
    );

    // The image encoder's refinement trains the image encoder alone: without it, every other component (the
    // UNet's conditioning above all) is the same, and the image encoder is the CLIP stage's.
    let unrefined = tempfile::tempdir().unwrap();
    let mut opts = tiny(unrefined.path());
    opts.vision_steps = 0;
    train(&opts, &|_, _, _, _| {}).unwrap();
    let (refined, unrefined) = (weights(a.path()), weights(unrefined.path()));
    for (k, file) in ["vae", "text encoder", "image encoder", "unet"]
        .iter()
        .enumerate()
    {
        assert_eq!(
            refined[k] == unrefined[k],
            *file != "image encoder",
            "{file}: only the image encoder is refined"
        );
    }

    // Interrupted in each stage after its second step, then resumed: the same weights. The VAE and CLIP stages
    // run side by side, so an interruption in one stops the other wherever it is; each case starts afresh.
    for stop_stage in ["vae", "clip", "unet", "decoder", "vision"] {
        let c = tempfile::tempdir().unwrap();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            train(&tiny(c.path()), &|stage, step, total, _| {
                if stage == stop_stage && step == 2.min(total - 1).max(1) {
                    panic!("simulated interruption");
                }
            })
        }));
        assert!(result.is_err(), "interrupted in {stop_stage}");
        train(&tiny(c.path()), &|_, _, _, _| {}).unwrap();
        assert!(
            weights(a.path()) == weights(c.path()),
            "a run interrupted in {stop_stage} and resumed ends where an uninterrupted one does"
        );
    }
}

#[test]
fn a_failing_stage_stops_the_stage_beside_it_and_is_the_error_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = tiny(dir.path());
    opts.vae_steps = 400;
    // The CLIP stage fails as it starts: its checkpoint is not a safetensors file.
    std::fs::create_dir_all(dir.path().join(".train")).unwrap();
    std::fs::write(
        dir.path().join(".train/clip.safetensors"),
        b"not a checkpoint",
    )
    .unwrap();
    let vae_reached = Mutex::new(0usize);
    let err = train(&opts, &|stage, step, _, _| {
        if stage == "vae" {
            *vae_reached.lock().unwrap() = step;
            // Slow enough that the failure beside it lands long before the VAE's last step.
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    })
    .expect_err("a broken CLIP checkpoint fails the run");
    let message = err.to_string();
    assert!(
        message.contains("clip.safetensors"),
        "the error names the broken file, not the stage it stopped: {message}"
    );
    let reached = *vae_reached.lock().unwrap();
    assert!(reached < 400, "the VAE stage stopped at step {reached}");
    assert!(!dir.path().join("vae/.complete").exists());
}

#[test]
fn a_two_object_share_outside_zero_to_one_is_refused_before_any_training() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = tiny(dir.path());
    opts.clip_two_object_share = 1.5;
    let err = train(&opts, &|_, _, _, _| {}).unwrap_err().to_string();
    assert!(err.contains("two-object") && err.contains("1.5"), "{err}");
    assert!(!dir.path().join(".train").exists());
}
