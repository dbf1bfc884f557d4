//! Training: a few steps of every stage give a diffusers-layout folder that loads and passes the audit;
//! the run is deterministic for a seed, and an interrupted run resumes to the same weights.

use std::path::Path;

use stylediff::model::{ComponentKind, LoadOptions, StableDiffusion};
use stylediff::toy::train::{TrainOptions, train};

fn tiny(out: &Path) -> TrainOptions {
    let mut o = TrainOptions::new(out.to_path_buf(), 5);
    (o.vae_steps, o.clip_steps, o.unet_steps) = (3, 3, 3);
    (o.vae_batch, o.clip_batch, o.unet_batch) = (2, 3, 2);
    o.decoder_steps = 2;
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
    let mut seen = Vec::new();
    train(&tiny(a.path()), &mut |stage, step, total, loss| {
        assert!(loss.is_finite());
        seen.push((stage.to_string(), step, total));
    })
    .unwrap();
    for stage in ["vae", "clip", "unet"] {
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
    train(&tiny(b.path()), &mut |_, _, _, _| {}).unwrap();
    assert!(
        weights(a.path()) == weights(b.path()),
        "training is deterministic for a seed"
    );

    // Interrupted in each stage after its second step, then resumed: the same weights.
    let c = tempfile::tempdir().unwrap();
    for stop_stage in ["vae", "clip", "unet", "decoder"] {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            train(&tiny(c.path()), &mut |stage, step, total, _| {
                if stage == stop_stage && step == 2.min(total - 1).max(1) {
                    panic!("simulated interruption");
                }
            })
        }));
        assert!(result.is_err(), "interrupted in {stop_stage}");
    }
    train(&tiny(c.path()), &mut |_, _, _, _| {}).unwrap();
    assert!(
        weights(a.path()) == weights(c.path()),
        "a resumed run ends where an uninterrupted one does"
    );
}
