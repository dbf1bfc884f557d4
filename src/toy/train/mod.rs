//! `stylediff toy train`: the SD recipe at toy scale, in four resumable stages:
//! an AutoencoderKL (32x32 RGB <-> 8x8x4 latents); a CLIP pair (text + vision, contrastive, with single-word
//! edits as hard negatives and an attribute probe on both embeddings); a UNet2DConditionModel on the frozen VAE
//! and text encoder, with 10% empty captions; and a refinement of the VAE decoder alone.
//! The result is a diffusers-layout pipeline folder. This module runs the stages and their checkpoints; each
//! stage's model, data and loss live in a file of their own (`vae`, `clip`, `unet`), with the generated configs
//! (`configs`) and the training data (`data`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{D, DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::edits::{EditKind, single_word_edits_with_kind};
use super::optim::{Adam, Checkpoint, Ema, LOGIT_SCALE, TrainVars};
use super::render::render;
use super::tokenizer::{toy_vocab_size, write_toy_tokenizer};
use super::world::{Color, HELD_OUT_LAYOUT_SEEDS, SceneSpec, Shape, Style, vocabulary};
use crate::model::ComponentKind;
use crate::model::clip::text::{ClipTextConfig, ClipTextTransformer};
use crate::model::clip::vision::{ClipVisionConfig, ClipVisionTransformer, clip_normalize};
use crate::model::scheduler::{Ddim, SchedulerConfig};
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::{UNet2DConditionModel, UNetConfig};
use crate::model::vae::{AutoencoderKL, VaeConfig};
use crate::util::{seeded_noise, write_atomic};
use crate::{Error, Result};

mod clip;
mod configs;
mod data;
mod unet;
mod vae;

use self::clip::*;
pub use self::configs::*;
pub(crate) use self::data::normalize;
use self::data::*;
pub use self::data::{pooled_text, render_batch, token_batch, training_specs};
use self::unet::*;
use self::vae::*;

/// Native image size of the toy model, in pixels.
pub const TOY_SIZE: usize = 32;
const WIDTH: usize = 64;

#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub out: PathBuf,
    pub seed: u64,
    pub vae_steps: usize,
    pub clip_steps: usize,
    pub unet_steps: usize,
    pub vae_batch: usize,
    pub clip_batch: usize,
    /// Share of two-object scenes among the CLIP stage's images (the world, and so every other stage, draws 30%).
    pub clip_two_object_share: f64,
    pub unet_batch: usize,
    /// Decoder refinement after the VAE stage: the encoder (and so the UNet's latent space) stays fixed.
    pub decoder_steps: usize,
    /// Image encoder refinement after the CLIP stage, against the frozen text encoder (the UNet's conditioning).
    pub vision_steps: usize,
    pub checkpoint_every: usize,
}

impl TrainOptions {
    // The current recipe (why each number: docs/toy-model-notebook.md). The UNet's higher rate draws shapes in fewer steps,
    // and the decoder refinement takes the time so freed to bring the VAE to 30 dB. The CLIP stage runs beside the
    // VAE's and the decoder's, on the other core, and outlasts them: 5000 steps, half of them on two-object scenes,
    // which only more steps and more such scenes have lifted. The image encoder, the slower learner of the pair,
    // then trains on alone beside the UNet, against the text encoder the UNet reads.
    pub const VAE_STEPS: usize = 3000;
    pub const CLIP_STEPS: usize = 5000;
    pub const UNET_STEPS: usize = 3000;
    pub const UNET_BATCH: usize = 48;
    pub const CLIP_BATCH: usize = 48;
    pub const CLIP_TWO_OBJECT_SHARE: f64 = 0.5;
    pub const DECODER_STEPS: usize = 1300;
    pub const VISION_STEPS: usize = 6000;

    pub fn new(out: PathBuf, seed: u64) -> Self {
        Self {
            out,
            seed,
            vae_steps: Self::VAE_STEPS,
            clip_steps: Self::CLIP_STEPS,
            unet_steps: Self::UNET_STEPS,
            vae_batch: 16,
            clip_batch: Self::CLIP_BATCH,
            clip_two_object_share: Self::CLIP_TWO_OBJECT_SHARE,
            unet_batch: Self::UNET_BATCH,
            decoder_steps: Self::DECODER_STEPS,
            vision_steps: Self::VISION_STEPS,
            checkpoint_every: 100,
        }
    }
}

/// Progress of one stage: (stage, step reached, total steps, last loss). The VAE and CLIP stages report from
/// two threads at once.
pub type Progress<'a> = &'a (dyn Fn(&str, usize, usize, f64) + Sync);

/// Hands each stage's steps to the caller's progress, and stops a stage at its next step once a stage running
/// beside it has failed (its checkpoints stay, so a rerun resumes both).
struct Reporter<'a> {
    progress: Progress<'a>,
    failed: AtomicBool,
}

impl Reporter<'_> {
    fn step(&self, stage: &str, step: usize, total: usize, loss: f64) -> Result<()> {
        if self.failed.load(Ordering::SeqCst) {
            return Err(Error::Stopped {
                stage: stage.to_string(),
                step,
            });
        }
        (self.progress)(stage, step, total, loss);
        Ok(())
    }

    /// Runs one of the side-by-side stages on a thread pool of its own with one thread, and tells the others to
    /// stop when it fails (an error or a panic).
    fn run_beside<R: Send>(&self, stage: impl FnOnce() -> Result<R> + Send) -> Result<R> {
        struct OnUnwind<'a>(&'a AtomicBool);
        impl Drop for OnUnwind<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    self.0.store(true, Ordering::SeqCst);
                }
            }
        }
        let _guard = OnUnwind(&self.failed);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .map_err(|e| Error::invalid("training thread pool", e.to_string()))?;
        let result = pool.install(stage);
        if result.is_err() {
            self.failed.store(true, Ordering::SeqCst);
        }
        result
    }

    /// Runs two stages at once, each on a core of its own; where one fails the other stops, and the error
    /// reported is the cause, not the stop.
    fn side_by_side(
        &self,
        first: impl FnOnce() -> Result<()> + Send,
        second: impl FnOnce() -> Result<()> + Send,
    ) -> Result<()> {
        let (first, second) = std::thread::scope(|scope| {
            let second = scope.spawn(|| self.run_beside(second));
            let first = self.run_beside(first);
            let second = second
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            (first, second)
        });
        match (first, second) {
            (Ok(()), Ok(())) => Ok(()),
            (Err(Error::Stopped { .. }), Err(b)) => Err(b),
            (Err(a), Err(_)) => Err(a),
            (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
        }
    }
}

fn lr_at(step: usize, total: usize, peak: f64) -> f64 {
    let warm = 100.min(total / 10).max(1);
    if step < warm {
        return peak * (step + 1) as f64 / warm as f64;
    }
    let p = (step - warm) as f64 / (total - warm).max(1) as f64;
    peak * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()))
}

fn stage_done(dir: &Path) -> bool {
    dir.join(".complete").is_file()
}

fn mark_done(dir: &Path) -> Result<()> {
    write_atomic(&dir.join(".complete"), b"")
}

/// Trains (or resumes) every stage into `opts.out`. The VAE and CLIP stages run side by side on a core each; they
/// do so fastest with candle's element-wise thread pool off (`CANDLE_NUM_THREADS=1`, which `stylediff toy train`
/// sets), since that pool serves one caller at a time. The weights do not depend on it.
pub fn train(opts: &TrainOptions, progress: Progress) -> Result<()> {
    let share = opts.clip_two_object_share;
    if !(0.0..=1.0).contains(&share) {
        return Err(Error::invalid(
            "CLIP stage's share of two-object scenes",
            format!("{share} is not between 0 and 1"),
        ));
    }
    let out = &opts.out;
    std::fs::create_dir_all(out.join(".train")).map_err(|e| Error::Io {
        path: out.clone(),
        source: e,
    })?;
    let words = vocabulary();
    write_toy_tokenizer(&out.join("tokenizer"), &words)?;
    json_write(
        &out.join("scheduler/scheduler_config.json"),
        &scheduler_config_json(),
    )?;
    let reporter = Reporter {
        progress,
        failed: AtomicBool::new(false),
    };
    // Stages that do not learn from each other train side by side, one core each: a step is a long chain of
    // operations too small to use two cores well (a second core speeds a stage up by about 8%), so two stages on
    // one core each end far sooner than one after the other on two (docs/toy-model-notebook.md). Each stage's weights are
    // the same either way. First the VAE (then its decoder's refinement) beside the CLIP pair, which learn from
    // renders; then the UNet, which reads the VAE's latents and the text encoder's states, beside the image
    // encoder's refinement, which leaves the text encoder as it is.
    reporter.side_by_side(
        || {
            train_vae(opts, &reporter)?;
            refine_decoder(opts, &reporter)
        },
        || train_clip(opts, toy_vocab_size(&words), &reporter),
    )?;
    let image_encoder_refined =
        opts.vision_steps == 0 || out.join("image_encoder").join(REFINED).is_file();
    reporter.side_by_side(
        || train_unet(opts, &reporter, image_encoder_refined),
        || refine_image_encoder(opts, &reporter),
    )?;
    json_write(&out.join("model_index.json"), &model_index_json())?;
    Ok(())
}

/// One training stage: its parameter groups (checkpoint prefix, vars), restored optimiser
/// state and the step to resume from.
struct Stage<'a> {
    name: &'a str,
    groups: &'a [(&'a str, &'a TrainVars)],
    adam_state: &'a std::collections::BTreeMap<String, Tensor>,
    start: usize,
    steps: usize,
    peak_lr: f64,
    /// A moving average of the parameters, updated after every step and checkpointed as group `ema`.
    average: Option<&'a Ema>,
}

/// Runs a stage's optimisation steps with checkpoints; `loss_at(step)` builds the loss.
fn run_stage(
    stage: Stage,
    opts: &TrainOptions,
    progress: &Reporter,
    loss_at: &mut dyn FnMut(usize) -> Result<Tensor>,
) -> Result<()> {
    let Stage {
        name,
        groups,
        adam_state,
        start,
        steps,
        peak_lr,
        average,
    } = stage;
    let ckpt = opts.out.join(".train").join(format!("{name}.safetensors"));
    let mut params: Vec<(String, Var)> = Vec::new();
    for (prefix, vars) in groups {
        params.extend(
            vars.named()
                .into_iter()
                .map(|(n, v)| (format!("{prefix}.{n}"), v)),
        );
    }
    let mut adam = Adam::new(params, 1.0, adam_state)?;
    adam.step = start;
    let mut ema = None;
    for step in start..steps {
        let loss = loss_at(step)?;
        let grads = loss.backward()?;
        adam.step(&grads, lr_at(step, steps, peak_lr))?;
        if let Some(avg) = average {
            avg.update(step)?;
        }
        let l = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let smoothed = ema.map_or(l, |e: f64| 0.95 * e + 0.05 * l);
        ema = Some(smoothed);
        if (step + 1) % opts.checkpoint_every == 0 && step + 1 < steps {
            let mut saved = groups.to_vec();
            if let Some(avg) = average {
                saved.push(("ema", avg.vars()));
            }
            Checkpoint::save(&ckpt, step + 1, &saved, &adam)?;
        }
        progress.step(name, step + 1, steps, smoothed)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::toy::world::Shape;
    use candle_core::IndexOp;

    #[test]
    fn a_fresh_text_encoder_already_tells_shape_words_apart() {
        // The UNet reads the shape from the text encoder's states. The toy vision encoder learns shapes slowly, so
        // contrastive training does little to separate shape words: the separation has to be there from the start.
        let dir = tempfile::tempdir().unwrap();
        let words = vocabulary();
        write_toy_tokenizer(dir.path(), &words).unwrap();
        let tokenizer = ClipTokenizer::from_folder(dir.path()).unwrap();
        let cfg: ClipTextConfig =
            serde_json::from_value(text_config_json(toy_vocab_size(&words))).unwrap();
        let vars = TrainVars::new(0x7E47, Default::default());
        let text = ClipTextTransformer::load(&cfg, vars.var_builder()).unwrap();
        let shape_state = |shape: Shape| {
            let caption = format!("a red {} on a blue background", shape.word());
            let (ids, _) = token_batch(&tokenizer, &[caption]).unwrap();
            // <start> a red SHAPE: the shape word is one token, at position 3.
            text.forward(&ids).unwrap().i((0, 3)).unwrap()
        };
        let states: Vec<Tensor> = Shape::ALL.iter().map(|&s| shape_state(s)).collect();
        let unit = normalize(&Tensor::stack(&states, 0).unwrap()).unwrap();
        let cosines: Vec<Vec<f32>> = unit.matmul(&unit.t().unwrap()).unwrap().to_vec2().unwrap();
        // With CLIP's 0.02 token-embedding scale every pair starts at about 0.98.
        const COS_LIMIT: f32 = 0.9;
        for (i, row) in cosines.iter().enumerate() {
            for (j, &cos) in row.iter().enumerate().skip(i + 1) {
                assert!(
                    cos < COS_LIMIT,
                    "{:?} and {:?}: cosine {cos:.3}",
                    Shape::ALL[i],
                    Shape::ALL[j]
                );
            }
        }
    }

    #[test]
    fn pooled_text_takes_each_rows_first_end_token() {
        let eos = 9;
        let ids = vec![
            vec![1, 2, eos, eos],
            vec![1, eos, eos, eos],
            vec![1, 2, 3, 4],
        ];
        let hidden = Tensor::arange(0f32, 24.0, &Device::Cpu)
            .unwrap()
            .reshape((3, 4, 2))
            .unwrap();
        let pooled: Vec<Vec<f32>> = pooled_text(&hidden, &ids, eos).unwrap().to_vec2().unwrap();
        // Row 0 at position 2, row 1 at 1, row 2 (no end token) at its last position.
        assert_eq!(
            pooled,
            vec![vec![4.0, 5.0], vec![10.0, 11.0], vec![22.0, 23.0]]
        );
        // States cut shorter than an end token's position cannot be pooled.
        assert!(pooled_text(&hidden.narrow(1, 0, 2).unwrap(), &ids, eos).is_err());
        // Its gradient reaches exactly the pooled positions.
        let var = Var::from_tensor(&hidden).unwrap();
        let grads = pooled_text(var.as_tensor(), &ids, eos)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g: Vec<Vec<Vec<f32>>> = grads.get(var.as_tensor()).unwrap().to_vec3().unwrap();
        for (b, pos) in [(0, 2), (1, 1), (2, 3)] {
            for (p, row) in g[b].iter().enumerate() {
                let want = if p == pos { 1.0 } else { 0.0 };
                assert_eq!(row, &vec![want, want], "row {b}, position {p}");
            }
        }
    }

    #[test]
    fn the_clip_stage_draws_its_own_share_of_two_object_scenes() {
        let two_objects = |share: Option<f64>| -> usize {
            (0..20)
                .flat_map(|step| specs_for_step(7, 2, step, 48, share))
                .filter(|(spec, _)| spec.objects.len() == 2)
                .count()
        };
        assert_eq!(two_objects(Some(0.0)), 0);
        assert_eq!(two_objects(Some(1.0)), 960);
        let half = two_objects(Some(0.5));
        assert!((430..=530).contains(&half), "{half} of 960 at share 0.5");
        let world = two_objects(None);
        assert!(
            (240..=340).contains(&world),
            "{world} of 960 at the world's 30%"
        );
        assert_eq!(
            specs_for_step(7, 2, 3, 48, None),
            training_specs(7, 2, 3, 48)
        );
        assert_eq!(
            specs_for_step(7, 2, 3, 48, Some(0.5)),
            specs_for_step(7, 2, 3, 48, Some(0.5))
        );
    }

    #[test]
    fn hard_negatives_hold_every_shape_swap_and_some_other_edits() {
        let mut rng = StdRng::seed_from_u64(3);
        for caption in [
            "a striped red circle on a blue background",
            "a red circle and a green square on a white background",
        ] {
            let spec = SceneSpec::parse(caption).unwrap();
            let negatives = hard_negatives(&spec, 3, &mut rng);
            let edits = single_word_edits_with_kind(&spec);
            let shape_swaps: Vec<&SceneSpec> = edits
                .iter()
                .filter(|(_, kind, _)| *kind == EditKind::Shape)
                .map(|(s, ..)| s)
                .collect();
            assert_eq!(shape_swaps.len(), 4 * spec.objects.len());
            for swap in &shape_swaps {
                assert!(negatives.contains(swap), "{caption}: {swap:?} missing");
            }
            assert_eq!(negatives.len(), shape_swaps.len() + 3, "{caption}");
            for n in &negatives {
                assert!(
                    edits.iter().any(|(s, ..)| s == n),
                    "{caption}: {n:?} is not a single-word edit"
                );
            }
            let distinct: std::collections::HashSet<&SceneSpec> = negatives.iter().collect();
            assert_eq!(
                distinct.len(),
                negatives.len(),
                "{caption}: a negative repeats"
            );
        }
    }

    #[test]
    fn attribute_probe_names_each_object_by_its_place() {
        let one = SceneSpec::parse("a striped red circle on a blue background").unwrap();
        assert_eq!(
            AttributeProbe::targets(&one),
            vec![
                (
                    0,
                    9,
                    Color::ALL.iter().position(|&c| c == Color::Blue).unwrap()
                ),
                (
                    9,
                    8,
                    Color::OBJECT.iter().position(|&c| c == Color::Red).unwrap()
                ),
                (17, 5, 0),
                (22, 4, 1),
            ]
        );
        let two =
            SceneSpec::parse("a red circle and a dotted green star on a white background").unwrap();
        let targets = AttributeProbe::targets(&two);
        // The single-object slot stays unused; the left object (said first) fills the second slot.
        assert_eq!(targets.len(), 7);
        assert_eq!(targets[1], (26, 8, 0));
        assert_eq!(targets[2], (34, 5, 0));
        assert_eq!(targets[4], (43, 8, 3));
        assert_eq!(targets[5], (51, 5, 3));
        assert_eq!(targets[6], (56, 4, 2));
        let last = targets.iter().map(|&(o, n, _)| o + n).max().unwrap();
        assert_eq!(last, BACKGROUND_LOGITS + PROBE_SLOTS * SLOT_LOGITS);
    }

    #[test]
    fn attribute_probe_loss_averages_cross_entropy_over_every_named_attribute() {
        let specs = [
            SceneSpec::parse("a red circle on a blue background").unwrap(),
            SceneSpec::parse("a red circle and a green square on a white background").unwrap(),
        ];
        let outputs = BACKGROUND_LOGITS + PROBE_SLOTS * SLOT_LOGITS;
        let embeddings = Tensor::randn(0f32, 1.0, (2, WIDTH), &Device::Cpu).unwrap();
        let probe_with = |bias: Vec<f32>| {
            let preset = std::collections::BTreeMap::from([
                (
                    "weight".to_string(),
                    Tensor::zeros((outputs, WIDTH), DType::F32, &Device::Cpu).unwrap(),
                ),
                (
                    "bias".to_string(),
                    Tensor::from_vec(bias, outputs, &Device::Cpu).unwrap(),
                ),
            ]);
            let vars = TrainVars::new(0, preset);
            AttributeProbe::load(vars.var_builder())
                .unwrap()
                .loss(&embeddings, &specs)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        // Uniform logits: each attribute costs ln(its number of classes); 4 + 7 attributes in all.
        let ln = |n: f32| n.ln();
        let one = ln(9.0) + ln(8.0) + ln(5.0) + ln(4.0);
        let two = ln(9.0) + 2.0 * (ln(8.0) + ln(5.0) + ln(4.0));
        let uniform = probe_with(vec![0.0; outputs]);
        assert!((uniform - (one + two) / 11.0).abs() < 1e-5, "{uniform}");
        // A bias that names both scenes' attributes makes the loss small; one naming others makes it large.
        let mut right = vec![0.0; outputs];
        let mut wrong = vec![0.0; outputs];
        for spec in &specs {
            for (offset, size, class) in AttributeProbe::targets(spec) {
                right[offset + class] = 20.0;
                wrong[offset + (class + 1) % size] = 20.0;
            }
        }
        // One bias serves both rows, so each background is split between two named colours (ln 2 each).
        let (r, w) = (probe_with(right), probe_with(wrong));
        assert!((r - 2.0 * ln(2.0) / 11.0).abs() < 1e-3, "right {r}");
        assert!(w > 5.0 * uniform, "wrong {w}");
    }

    #[test]
    fn min_snr_weight_caps_the_signal_to_noise_ratio_at_five() {
        // alpha_bar 0.5: SNR 1, full weight; alpha_bar 0.99: SNR 99, weight 5/99.
        assert!((min_snr_weight(0.5) - 1.0).abs() < 1e-6);
        assert!((min_snr_weight(5.0 / 6.0) - 1.0).abs() < 1e-5);
        assert!((min_snr_weight(0.99) - 5.0 / 99.0).abs() < 1e-6);
        let ddim = Ddim::new(&SchedulerConfig::stable_diffusion()).unwrap();
        for &a in ddim.alphas_cumprod() {
            let w = min_snr_weight(a);
            assert!(w > 0.0 && w <= 1.0, "alpha_bar {a}: weight {w}");
        }
    }
}
