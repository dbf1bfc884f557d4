//! Local blend against the authors' controller (tools/make_local_blend_fixture.py): the blend mask of the target
//! comes from its cross-attention AFTER replacement, per-word alphas and reweighting, because the reference's
//! attention store holds the tensor that the controller then overwrites.

mod common;

use candle_core::{DType, Device, Tensor};
use stylediff::control::edit::{CrossMap, EditControl, EditPlan, LocalBlend};
use stylediff::model::hook::{AttentionCall, AttentionHook, AttentionKind, Branch, LayerId, Place};

const WORDS: usize = 77;

#[test]
fn local_blend_masks_the_replaced_and_reweighted_target_maps_as_the_reference() {
    let dev = Device::Cpu;
    let path = common::repo_path("tests/fixtures/local_blend.safetensors");
    let f = candle_core::safetensors::load(&path, &dev).unwrap();
    let (steps, layers, heads, grid, latent) = (3usize, 2usize, 2usize, 4usize, 8usize);
    let mut mapper = vec![0f32; WORDS * WORDS];
    for i in 0..WORDS {
        mapper[i * WORDS + i] = 1.0;
    }
    for (i, j, v) in [(2, 2, 0.5), (2, 3, 0.5), (3, 3, 0.5), (3, 2, 0.5)] {
        mapper[i * WORDS + j] = v;
    }
    let mut equalizer = vec![1f32; WORDS];
    (equalizer[2], equalizer[5]) = (2.0, 0.5);
    let cross_alpha: Vec<Vec<f32>> = (0..=steps)
        .map(|r| {
            (0..WORDS)
                .map(|k| if r < 2 && k != 4 { 1.0 } else { 0.0 })
                .collect()
        })
        .collect();
    let mut words = [vec![0f32; WORDS], vec![0f32; WORDS]];
    words[0][2] = 1.0;
    (words[1][2], words[1][3]) = (1.0, 1.0);
    let plan = EditPlan {
        steps,
        cross: CrossMap::Replace(Tensor::from_vec(mapper, (WORDS, WORDS), &dev).unwrap()),
        cross_alpha,
        equalizer: Some(equalizer),
        self_window: (0, 0),
        uncond_window: (0, 0),
        self_max_queries: 0,
        values: None,
        value_steps: 0,
        local_blend: Some(LocalBlend::new(words, (grid, grid), 1, 0.3)),
    };
    let context = Tensor::zeros((2, WORDS, 8), DType::F32, &dev).unwrap();
    let mut control = EditControl::new(plan, context);
    let probs = &f["probs"];
    let latents = &f["latents"];
    for s in 0..steps {
        for l in 0..layers {
            let call = AttentionCall {
                layer: LayerId {
                    place: if l == 0 { Place::Down } else { Place::Up },
                    block: 1,
                    transformer: 0,
                    layer: 0,
                    kind: AttentionKind::CrossAttention,
                },
                query_grid: (grid, grid),
                branch: Branch::Conditional,
                step: s,
            };
            let p = probs
                .get(s)
                .unwrap()
                .get(l)
                .unwrap()
                .reshape((2, heads, grid * grid, WORDS))
                .unwrap();
            let out = control.attention_probs(&call, p).unwrap();
            let want = f[&format!("returned.{s}.{l}")]
                .reshape((2, heads, grid * grid, WORDS))
                .unwrap();
            assert!(
                common::max_diff(&out, &want) < 1e-6,
                "step {s} layer {l}: attention"
            );
        }
        let blended = control.end_step(s, &latents.get(s).unwrap()).unwrap();
        let d = common::max_diff(&blended, &f[&format!("blended.{s}")]);
        assert!(d < 1e-6, "step {s}: blended latents differ by {d}");
    }
    // The fixture exercises the difference: the mask from the maps before replacement is another mask.
    let last = f["mask.2"].sum_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(
        last > 0.0 && last < (latent * latent) as f32,
        "a partial mask"
    );
}
