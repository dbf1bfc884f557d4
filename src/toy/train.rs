//! `stylediff toy train`: the SD recipe at toy scale, in four resumable stages:
//! an AutoencoderKL (32x32 RGB <-> 8x8x4 latents); a CLIP pair (text + vision, contrastive, with single-word
//! edits as hard negatives and an attribute probe on both embeddings); a UNet2DConditionModel on the frozen VAE
//! and text encoder, with 10% empty captions; and a refinement of the VAE decoder alone.
//! The result is a diffusers-layout pipeline folder.

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
    // The current recipe (why each number: docs/toy-model.md). The UNet's higher rate draws shapes in fewer steps,
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

const STOPPED: &str = "training stage";

fn is_stopped(e: &Error) -> bool {
    matches!(e, Error::Invalid { what, .. } if *what == STOPPED)
}

impl Reporter<'_> {
    fn step(&self, stage: &str, step: usize, total: usize, loss: f64) -> Result<()> {
        if self.failed.load(Ordering::SeqCst) {
            return Err(Error::invalid(
                STOPPED,
                format!("{stage} stopped at step {step} because the stage beside it failed"),
            ));
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
            (Err(a), Err(b)) => Err(if is_stopped(&a) { b } else { a }),
            (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
        }
    }
}

fn json_write(path: &Path, value: &serde_json::Value) -> Result<()> {
    write_atomic(
        path,
        serde_json::to_string_pretty(value)
            .expect("json")
            .as_bytes(),
    )
}

pub fn vae_config_json(scaling: f64) -> serde_json::Value {
    serde_json::json!({
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.30.0",
        "act_fn": "silu",
        "block_out_channels": [16, 32, 64],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "sample_size": TOY_SIZE,
        "scaling_factor": scaling,
    })
}

pub fn text_config_json(vocab_size: usize) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab_size,
        "hidden_size": WIDTH,
        "intermediate_size": 4 * WIDTH,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "pad_token_id": vocab_size - 1,
        "projection_dim": WIDTH,
        "torch_dtype": "float32",
    })
}

pub fn vision_config_json() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["CLIPVisionModelWithProjection"],
        "model_type": "clip_vision_model",
        "hidden_size": WIDTH,
        "intermediate_size": 4 * WIDTH,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "image_size": TOY_SIZE,
        "patch_size": 4,
        "num_channels": 3,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": WIDTH,
        "torch_dtype": "float32",
    })
}

pub fn unet_config_json() -> serde_json::Value {
    serde_json::json!({
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.30.0",
        "act_fn": "silu",
        "attention_head_dim": 4,
        "block_out_channels": [32, 64, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "center_input_sample": false,
        "cross_attention_dim": WIDTH,
        "downsample_padding": 1,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 1,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-5,
        "norm_num_groups": 8,
        "sample_size": TOY_SIZE / 4,
        "use_linear_projection": false,
    })
}

pub fn scheduler_config_json() -> serde_json::Value {
    serde_json::json!({
        "_class_name": "DDIMScheduler",
        "_diffusers_version": "0.30.0",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "set_alpha_to_one": false,
        "steps_offset": 1,
        "clip_sample": false,
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
        "trained_betas": null,
    })
}

pub fn model_index_json() -> serde_json::Value {
    serde_json::json!({
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.30.0",
        "feature_extractor": [null, null],
        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "requires_safety_checker": false,
        "safety_checker": [null, null],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
}

/// A batch of random training scenes (layout seeds below the held-out range) for one step of one stage.
pub fn training_specs(seed: u64, stage: u64, step: usize, batch: usize) -> Vec<(SceneSpec, u64)> {
    specs_for_step(seed, stage, step, batch, None)
}

/// Like `training_specs`, with a chosen share of two-object scenes (the world draws 30%).
fn specs_for_step(
    seed: u64,
    stage: u64,
    step: usize,
    batch: usize,
    two_object_share: Option<f64>,
) -> Vec<(SceneSpec, u64)> {
    let mut rng = StdRng::seed_from_u64(
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (stage << 48) ^ step as u64,
    );
    (0..batch)
        .map(|_| {
            let objects = two_object_share.map(|share| if rng.random_bool(share) { 2 } else { 1 });
            let mut spec = SceneSpec::random(&mut rng);
            while objects.is_some_and(|n| spec.objects.len() != n) {
                spec = SceneSpec::random(&mut rng);
            }
            (spec, rng.random_range(0..HELD_OUT_LAYOUT_SEEDS))
        })
        .collect()
}

/// Renders specs at their layouts: (batch, 3, 32, 32) in [-1, 1].
pub fn render_batch(specs: &[(SceneSpec, u64)]) -> Result<Tensor> {
    let mut data = Vec::with_capacity(specs.len() * 3 * TOY_SIZE * TOY_SIZE);
    for (spec, layout) in specs {
        let px = render(&spec.layout(*layout, TOY_SIZE), TOY_SIZE);
        for c in 0..3 {
            data.extend((0..TOY_SIZE * TOY_SIZE).map(|i| px[i * 3 + c] * 2.0 - 1.0));
        }
    }
    Ok(Tensor::from_vec(
        data,
        (specs.len(), 3, TOY_SIZE, TOY_SIZE),
        &Device::Cpu,
    )?)
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
    // one core each end far sooner than one after the other on two (docs/toy-model.md). Each stage's weights are
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

fn train_vae(opts: &TrainOptions, progress: &Reporter) -> Result<()> {
    let dir = opts.out.join("vae");
    if stage_done(&dir) {
        return Ok(());
    }
    let ckpt = opts.out.join(".train/vae.safetensors");
    let (start, mut presets, adam_state) = Checkpoint::load(&ckpt, &["vae"])?;
    let vars = TrainVars::new(opts.seed ^ 0x0AE, presets.remove(0));
    let cfg_json = vae_config_json(1.0);
    let cfg: VaeConfig = serde_json::from_value(cfg_json).expect("valid config");
    let vae = AutoencoderKL::load(&cfg, vars.var_builder())?;
    let mut loss_at = |step: usize| -> Result<Tensor> {
        let x = render_batch(&training_specs(opts.seed, 1, step, opts.vae_batch))?;
        let mean = vae.encode_mean(&x)?;
        let rec = vae.decode(&mean)?;
        let diff = (rec - &x)?;
        // MSE for PSNR, L1 for crisp edges, a light pull of the latents towards the origin.
        Ok(
            ((diff.sqr()?.mean_all()? + (diff.abs()?.mean_all()? * 0.2)?)?
                + (mean.sqr()?.mean_all()? * 1e-4)?)?,
        )
    };
    let stage = Stage {
        name: "vae",
        groups: &[("vae", &vars)],
        adam_state: &adam_state,
        start,
        steps: opts.vae_steps,
        peak_lr: 2e-3,
        average: None,
    };
    run_stage(stage, opts, progress, &mut loss_at)?;
    // SD's recipe: scale latents to unit variance.
    let x = render_batch(&training_specs(opts.seed, 11, 0, 256))?;
    let std = vae.encode_mean(&x)?.flatten_all()?.to_dtype(DType::F64)?;
    let mean = std.mean_all()?.to_scalar::<f64>()?;
    let var = (std - mean)?.sqr()?.mean_all()?.to_scalar::<f64>()?;
    let scaling = 1.0 / var.sqrt();
    json_write(
        &dir.join("config.json"),
        &vae_config_json((scaling * 1e5).round() / 1e5),
    )?;
    vars.save(&dir.join("diffusion_pytorch_model.safetensors"))?;
    mark_done(&dir)
}

/// The CLIP text embedding pooled at the end token of each prompt (the first end token).
pub fn pooled_text(hidden: &Tensor, ids: &[Vec<u32>], eos: u32) -> Result<Tensor> {
    let (batch, len, width) = hidden.dims3()?;
    // One gather: per-row slices would each differentiate into a zero-filled copy of the whole batch, which made
    // a CLIP step's cost grow with the square of its batch.
    let flat = ids
        .iter()
        .enumerate()
        .map(|(b, row)| {
            let pos = row.iter().position(|&t| t == eos).unwrap_or(row.len() - 1);
            if b >= batch || pos >= len {
                return Err(Error::invalid(
                    "text encoder states",
                    format!("({batch}, {len}) states have no row {b}, position {pos} to pool"),
                ));
            }
            Ok((b * len + pos) as u32)
        })
        .collect::<Result<Vec<u32>>>()?;
    let index = Tensor::from_vec(flat, ids.len(), hidden.device())?;
    Ok(hidden
        .reshape((batch * len, width))?
        .index_select(&index, 0)?)
}

/// Rows scaled to unit length (the last axis), for cosine similarities.
pub(crate) fn normalize(x: &Tensor) -> Result<Tensor> {
    Ok(x.broadcast_div(&(x.sqr()?.sum_keepdim(D::Minus1)? + 1e-8)?.sqrt()?)?)
}

pub fn token_batch(
    tokenizer: &ClipTokenizer,
    captions: &[String],
) -> Result<(Tensor, Vec<Vec<u32>>)> {
    let ids: Vec<Vec<u32>> = captions
        .iter()
        .map(|c| tokenizer.encode_padded(c))
        .collect::<Result<_>>()?;
    let n = ids[0].len();
    let flat: Vec<u32> = ids.iter().flatten().copied().collect();
    Ok((Tensor::from_vec(flat, (ids.len(), n), &Device::Cpu)?, ids))
}

/// Single-word edits of its own caption that each image is contrasted with, besides the batch's captions and its
/// shape swaps.
const CLIP_HARD_NEGATIVES: usize = 3;

/// The captions an image of `spec` is contrasted with besides the batch's: every shape swap of each object, then
/// `others` more single-word edits drawn at random. Shape is the one attribute that a from-scratch vision encoder
/// does not pick up from colour statistics, so a random draw of edits (one shape swap in six on average) leaves
/// it, and the text encoder's shape words, with almost no gradient.
fn hard_negatives(spec: &SceneSpec, others: usize, rng: &mut StdRng) -> Vec<SceneSpec> {
    let (shape_swaps, mut rest): (Vec<_>, Vec<_>) = single_word_edits_with_kind(spec)
        .into_iter()
        .partition(|(_, kind, _)| *kind == EditKind::Shape);
    let mut out: Vec<SceneSpec> = shape_swaps.into_iter().map(|(s, ..)| s).collect();
    for _ in 0..others.min(rest.len()) {
        let k = rng.random_range(0..rest.len());
        out.push(rest.swap_remove(k).0);
    }
    out
}

/// CLIP's cap on the learnt log temperature (a scale of 100).
const MAX_LOGIT_SCALE: f64 = 4.6;

/// The batch's captions, then each image's hard negatives: single-word edits of its caption (every shape swap,
/// and a colour, style or background swapped), the distinctions the UNet's conditioning and the editing prompts
/// rely on.
fn contrastive_captions(specs: &[(SceneSpec, u64)], seed: u64) -> Vec<SceneSpec> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut captions: Vec<SceneSpec> = specs.iter().map(|(s, _)| s.clone()).collect();
    for (s, _) in specs {
        captions.extend(hard_negatives(s, CLIP_HARD_NEGATIVES, &mut rng));
    }
    captions
}

/// A linear read-out of the scene's attributes from the joint embedding space, used during training only (it is
/// not part of the saved model). Where the image encoder cannot tell two shapes apart (small objects in
/// two-object scenes), contrastive loss is lowest with the two captions' embeddings made equal, and the text
/// encoder had kept a two-object caption and its shape swaps at cosine 0.99. Asked to name every object's
/// attributes by position, the text encoder separates them (0.93); the image encoder still does not see those
/// shapes (docs/toy-model.md).
struct AttributeProbe {
    head: candle_nn::Linear,
}

const OBJECT_COLORS: usize = Color::OBJECT.len();
const SHAPES: usize = Shape::ALL.len();
const STYLES: usize = Style::ALL.len();
/// Attribute groups of one object slot: colour, shape, style.
const SLOT_LOGITS: usize = OBJECT_COLORS + SHAPES + STYLES;
/// Slots: the single object of a one-object scene; the left and the right object of a two-object scene.
const PROBE_SLOTS: usize = 3;
const BACKGROUND_LOGITS: usize = Color::ALL.len();

fn index_of<T: PartialEq>(all: &[T], value: T) -> usize {
    all.iter()
        .position(|x| *x == value)
        .expect("a word of the world")
}

impl AttributeProbe {
    fn load(vb: candle_nn::VarBuilder) -> Result<Self> {
        Ok(Self {
            head: candle_nn::linear(WIDTH, BACKGROUND_LOGITS + PROBE_SLOTS * SLOT_LOGITS, vb)?,
        })
    }

    /// (offset, size, class) of every attribute the probe must name for `spec`.
    fn targets(spec: &SceneSpec) -> Vec<(usize, usize, usize)> {
        let mut out = vec![(0, BACKGROUND_LOGITS, index_of(Color::ALL, spec.background))];
        let first_slot = if spec.objects.len() == 1 { 0 } else { 1 };
        for (k, object) in spec.objects.iter().enumerate() {
            let at = BACKGROUND_LOGITS + (first_slot + k) * SLOT_LOGITS;
            out.push((at, OBJECT_COLORS, index_of(Color::OBJECT, object.color)));
            out.push((
                at + OBJECT_COLORS,
                SHAPES,
                index_of(Shape::ALL, object.shape),
            ));
            out.push((
                at + OBJECT_COLORS + SHAPES,
                STYLES,
                index_of(Style::ALL, object.style),
            ));
        }
        out
    }

    /// Mean cross-entropy of the attributes of `specs` read from their unit-length embeddings (one row each).
    fn loss(&self, embeddings: &Tensor, specs: &[SceneSpec]) -> Result<Tensor> {
        use candle_core::Module;
        // Unit rows scaled to unit-size components, so the head starts in its working range.
        let logits = self.head.forward(&(embeddings * (WIDTH as f64).sqrt())?)?;
        // The rows and classes of each attribute group, keyed by its logits' (offset, size).
        let mut groups: std::collections::BTreeMap<(usize, usize), (Vec<u32>, Vec<u32>)> =
            Default::default();
        for (row, spec) in specs.iter().enumerate() {
            for (offset, size, class) in Self::targets(spec) {
                let (rows, classes) = groups.entry((offset, size)).or_default();
                rows.push(row as u32);
                classes.push(class as u32);
            }
        }
        let mut total: Option<Tensor> = None;
        let mut count = 0usize;
        for ((offset, size), (rows, classes)) in groups {
            let n = rows.len();
            let rows = Tensor::from_vec(rows, n, embeddings.device())?;
            let classes = Tensor::from_vec(classes, n, embeddings.device())?;
            let group_logits = logits.index_select(&rows, 0)?.narrow(1, offset, size)?;
            let ce = (candle_nn::loss::cross_entropy(&group_logits, &classes)? * n as f64)?;
            count += n;
            total = Some(match total {
                Some(t) => (t + ce)?,
                None => ce,
            });
        }
        let total = total.ok_or_else(|| Error::invalid("attribute probe", "no scenes"))?;
        Ok((total / count as f64)?)
    }
}

/// The CLIP stage's peak learning rate. At 1e-3 the image encoder was still learning shapes when its steps ran out;
/// 3e-3 ranks better at the same length and 6e-3 worse, and more steps at 3e-3 better still (docs/toy-model.md).
const CLIP_PEAK_LR: f64 = 3e-3;

/// Weight of the attribute probe's loss (for each tower) beside the contrastive loss.
const PROBE_WEIGHT: f64 = 0.5;

/// Unit-length pooled text embeddings of `captions`.
fn pooled_caption_embeddings(
    text: &ClipTextTransformer,
    tokenizer: &ClipTokenizer,
    captions: &[String],
    eos: u32,
) -> Result<Tensor> {
    let (ids_t, ids) = token_batch(tokenizer, captions)?;
    // The text transformer is causal: the end token's state depends on the tokens before it only, so the
    // padding after the longest caption can be cut without changing the pooled embedding.
    let used = ids
        .iter()
        .map(|row| row.iter().position(|&t| t == eos).unwrap_or(row.len() - 1) + 1)
        .max()
        .unwrap_or(1);
    normalize(&pooled_text(
        &text.forward(&ids_t.narrow(1, 0, used)?)?,
        &ids,
        eos,
    )?)
}

/// Unit-length projected image embeddings of renders in [-1, 1].
fn image_embeddings(vision: &ClipVisionTransformer, images: &Tensor) -> Result<Tensor> {
    let out = vision.forward(&clip_normalize(images)?)?;
    normalize(
        out.image_embeds
            .as_ref()
            .ok_or_else(|| Error::invalid("image encoder", "has no visual projection"))?,
    )
}

/// CLIP's symmetric loss: image `i` against every caption (the first `b` are the images' own, the rest hard
/// negatives), and each own caption against the images.
fn contrastive_loss(img: &Tensor, txt: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let b = img.dim(0)?;
    let logits = img.matmul(&txt.t()?)?.broadcast_mul(scale)?; // (b, all captions)
    let targets = Tensor::arange(0u32, b as u32, img.device())?;
    let l_img = candle_nn::loss::cross_entropy(&logits, &targets)?;
    let l_txt = candle_nn::loss::cross_entropy(&logits.narrow(1, 0, b)?.t()?, &targets)?;
    Ok(((l_img + l_txt)? * 0.5)?)
}

fn train_clip(opts: &TrainOptions, vocab_size: usize, progress: &Reporter) -> Result<()> {
    let (text_dir, vision_dir) = (
        opts.out.join("text_encoder"),
        opts.out.join("image_encoder"),
    );
    if stage_done(&text_dir) && stage_done(&vision_dir) {
        return Ok(());
    }
    let tokenizer = ClipTokenizer::from_folder(&opts.out.join("tokenizer"))?;
    let ckpt = opts.out.join(".train/clip.safetensors");
    let (start, mut presets, adam_state) =
        Checkpoint::load(&ckpt, &["text", "vision", "scale", "probe"])?;
    let probe_preset = presets.pop().expect("four groups");
    let scale_preset = presets.pop().expect("four groups");
    let vision_preset = presets.pop().expect("four groups");
    let text_preset = presets.pop().expect("four groups");
    let (text_vars, vision_vars) = (
        TrainVars::new(opts.seed ^ 0x7E47, text_preset),
        TrainVars::new(opts.seed ^ 0x0151, vision_preset),
    );
    let text_cfg: ClipTextConfig =
        serde_json::from_value(text_config_json(vocab_size)).expect("valid config");
    let vision_cfg: ClipVisionConfig =
        serde_json::from_value(vision_config_json()).expect("valid config");
    let text = ClipTextTransformer::load(&text_cfg, text_vars.var_builder())?;
    let vision = ClipVisionTransformer::load(&vision_cfg, vision_vars.var_builder())?;
    let scale_vars = TrainVars::new(0, scale_preset);
    let logit_scale = scale_vars.var_builder().get(1, LOGIT_SCALE)?;
    let probe_vars = TrainVars::new(opts.seed ^ 0x9B0E, probe_preset);
    let probe = AttributeProbe::load(probe_vars.var_builder())?;
    let eos = tokenizer.eos();
    let mut loss_at = |step: usize| -> Result<Tensor> {
        let specs = specs_for_step(
            opts.seed,
            2,
            step,
            opts.clip_batch,
            Some(opts.clip_two_object_share),
        );
        let caption_specs = contrastive_captions(&specs, opts.seed ^ 0xC11F ^ step as u64);
        let captions: Vec<String> = caption_specs.iter().map(SceneSpec::caption).collect();
        let txt = pooled_caption_embeddings(&text, &tokenizer, &captions, eos)?;
        let img = image_embeddings(&vision, &render_batch(&specs)?)?;
        let scale = logit_scale.clamp(0.0, MAX_LOGIT_SCALE)?.exp()?;
        let image_specs = &caption_specs[..specs.len()];
        let probed = (probe.loss(&img, image_specs)? + probe.loss(&txt, &caption_specs)?)?;
        Ok((contrastive_loss(&img, &txt, &scale)? + (probed * PROBE_WEIGHT)?)?)
    };
    let stage = Stage {
        name: "clip",
        groups: &[
            ("text", &text_vars),
            ("vision", &vision_vars),
            ("scale", &scale_vars),
            ("probe", &probe_vars),
        ],
        adam_state: &adam_state,
        start,
        steps: opts.clip_steps,
        peak_lr: CLIP_PEAK_LR,
        average: None,
    };
    run_stage(stage, opts, progress, &mut loss_at)?;
    json_write(&text_dir.join("config.json"), &text_config_json(vocab_size))?;
    text_vars.save(&text_dir.join("model.safetensors"))?;
    json_write(&vision_dir.join("config.json"), &vision_config_json())?;
    vision_vars.save(&vision_dir.join("model.safetensors"))?;
    mark_done(&text_dir)?;
    mark_done(&vision_dir)
}

/// Marks an image encoder whose refinement is done.
const REFINED: &str = ".refined";

/// The image encoder refinement's peak learning rate, the CLIP stage's: 1e-3 ranked worse (docs/toy-model.md).
const VISION_PEAK_LR: f64 = 3e-3;

/// More training for the image encoder alone, against the frozen text encoder, whose states the UNet reads, so
/// that it can run beside the UNet stage. The CLIP stage's loss and negatives, with a fresh attribute probe on the
/// image side only (the CLIP stage's is not kept: its last checkpoint is a hundred steps short of its end).
fn refine_image_encoder(opts: &TrainOptions, progress: &Reporter) -> Result<()> {
    let dir = opts.out.join("image_encoder");
    let done = dir.join(REFINED);
    if done.is_file() || opts.vision_steps == 0 {
        return Ok(());
    }
    let out = &opts.out;
    let dev = Device::Cpu;
    let tokenizer = ClipTokenizer::from_folder(&out.join("tokenizer"))?;
    let text_cfg = ClipTextConfig::load(&out.join("text_encoder/config.json"))?;
    let text = ClipTextTransformer::load(
        &text_cfg,
        ComponentKind::TextEncoder.var_builder(&out.join("text_encoder"), DType::F32, &dev)?,
    )?;
    let weights = dir.join("model.safetensors");
    let stored = candle_core::safetensors::load(&weights, &dev)
        .map_err(|e| Error::file(&weights, e.to_string()))?;
    let ckpt = out.join(".train/vision.safetensors");
    let (start, mut presets, adam_state) = Checkpoint::load(&ckpt, &["vision", "scale", "probe"])?;
    let probe_preset = presets.pop().expect("three groups");
    let scale_preset = presets.pop().expect("three groups");
    let mut vision_preset: std::collections::BTreeMap<String, Tensor> =
        stored.into_iter().collect();
    vision_preset.extend(presets.pop().expect("three groups"));
    let vision_vars = TrainVars::new(opts.seed ^ 0x0151, vision_preset);
    let vision_cfg = ClipVisionConfig::load(&dir.join("config.json"))?;
    let vision = ClipVisionTransformer::load(&vision_cfg, vision_vars.var_builder())?;
    let scale_vars = TrainVars::new(0, scale_preset);
    let logit_scale = scale_vars.var_builder().get(1, LOGIT_SCALE)?;
    let probe_vars = TrainVars::new(opts.seed ^ 0x9B0F, probe_preset);
    let probe = AttributeProbe::load(probe_vars.var_builder())?;
    let eos = tokenizer.eos();
    let mut loss_at = |step: usize| -> Result<Tensor> {
        let specs = specs_for_step(
            opts.seed,
            5,
            step,
            opts.clip_batch,
            Some(opts.clip_two_object_share),
        );
        let caption_specs = contrastive_captions(&specs, opts.seed ^ 0x5EE5 ^ step as u64);
        let captions: Vec<String> = caption_specs.iter().map(SceneSpec::caption).collect();
        let txt = pooled_caption_embeddings(&text, &tokenizer, &captions, eos)?;
        let img = image_embeddings(&vision, &render_batch(&specs)?)?;
        let scale = logit_scale.clamp(0.0, MAX_LOGIT_SCALE)?.exp()?;
        let probed = probe.loss(&img, &caption_specs[..specs.len()])?;
        Ok((contrastive_loss(&img, &txt, &scale)? + (probed * PROBE_WEIGHT)?)?)
    };
    let stage = Stage {
        name: "vision",
        groups: &[
            ("vision", &vision_vars),
            ("scale", &scale_vars),
            ("probe", &probe_vars),
        ],
        adam_state: &adam_state,
        start,
        steps: opts.vision_steps,
        peak_lr: VISION_PEAK_LR,
        average: None,
    };
    run_stage(stage, opts, progress, &mut loss_at)?;
    vision_vars.save(&weights)?;
    write_atomic(&done, b"")
}

/// The UNet stage's peak learning rate, above the other stages': at 1e-3 the UNet was still far from converged
/// when its budget ran out (shape rising about 8 points per thousand steps); 2e-3 and 3e-3 each bought shape
/// accuracy at the same cost, and 4e-3 in 3000 steps draws shapes better than 3e-3 in 3300 (docs/toy-model.md).
const UNET_PEAK_LR: f64 = 4e-3;

/// Decay of the UNet's weight average (about the last thousand steps).
const UNET_EMA_DECAY: f64 = 0.999;

/// Min-SNR-gamma loss weight for epsilon prediction (Hang et al. 2023): min(SNR, 5) / SNR. Nearly noise-free
/// steps, which only polish detail, stop dominating the gradient, so the global layout (which object, which
/// colour) is learnt in fewer steps.
fn min_snr_weight(alpha_bar: f64) -> f32 {
    let snr = alpha_bar / (1.0 - alpha_bar);
    (snr.min(5.0) / snr) as f32
}

/// One UNet step's inputs from the frozen text encoder and VAE.
struct UnetBatch {
    noisy: Tensor,
    noise: Tensor,
    context: Tensor,
    timesteps: Vec<f64>,
    /// Min-SNR weight per sample, (b, 1, 1, 1).
    weights: Tensor,
}

fn train_unet(opts: &TrainOptions, progress: &Reporter, prefetch: bool) -> Result<()> {
    let dir = opts.out.join("unet");
    if stage_done(&dir) {
        return Ok(());
    }
    let out = &opts.out;
    let tokenizer = ClipTokenizer::from_folder(&out.join("tokenizer"))?;
    let dev = Device::Cpu;
    let vae_cfg = VaeConfig::load(&out.join("vae/config.json"))?;
    let vae = AutoencoderKL::load(
        &vae_cfg,
        ComponentKind::Vae.var_builder(&out.join("vae"), DType::F32, &dev)?,
    )?;
    let text_cfg = ClipTextConfig::load(&out.join("text_encoder/config.json"))?;
    let text = ClipTextTransformer::load(
        &text_cfg,
        ComponentKind::TextEncoder.var_builder(&out.join("text_encoder"), DType::F32, &dev)?,
    )?;
    let ddim = Ddim::new(&SchedulerConfig::stable_diffusion())
        .map_err(|m| Error::invalid("scheduler", m))?;
    let alphas = ddim.alphas_cumprod().to_vec();

    let ckpt = out.join(".train/unet.safetensors");
    let (start, mut presets, adam_state) = Checkpoint::load(&ckpt, &["unet", "ema"])?;
    let ema_preset = presets.pop().expect("two groups");
    let vars = TrainVars::new(opts.seed ^ 0x0E7, presets.pop().expect("two groups"));
    let cfg: UNetConfig = serde_json::from_value(unet_config_json()).expect("valid config");
    let unet = UNet2DConditionModel::load(&cfg, vars.var_builder())?;
    let average = Ema::new(&vars, &ema_preset, UNET_EMA_DECAY)?;
    // With `prefetch`, the inputs a step takes from the frozen text encoder and VAE are computed for the next step
    // on a second thread while this one runs: a UNet step alone leaves about a quarter of the two cores idle
    // (candle's element-wise ops run on one thread), and 100 steps take 56 s instead of 62. Beside another stage
    // there is no idle core, and that thread slows the other stage by half for no gain to this one. The inputs
    // depend on the step index only, so the weights are the same either way.
    let prepare = |step: usize| -> Result<UnetBatch> {
        let specs = training_specs(opts.seed, 3, step, opts.unet_batch);
        let b = specs.len();
        let mut rng = StdRng::seed_from_u64(opts.seed ^ 0x0E7_5EED ^ (step as u64).rotate_left(20));
        let captions: Vec<String> = specs
            .iter()
            .map(|(s, _)| {
                if rng.random_bool(0.1) {
                    String::new()
                } else {
                    s.caption()
                }
            })
            .collect();
        let (ids, _) = token_batch(&tokenizer, &captions)?;
        let context = text.forward(&ids)?;
        let z0 = vae.encode(&render_batch(&specs)?)?;
        let ts: Vec<usize> = (0..b).map(|_| rng.random_range(0..1000)).collect();
        let (sa, sb): (Vec<f32>, Vec<f32>) = ts
            .iter()
            .map(|&t| (alphas[t].sqrt() as f32, (1.0 - alphas[t]).sqrt() as f32))
            .unzip();
        let sa = Tensor::from_vec(sa, (b, 1, 1, 1), &dev)?;
        let sb = Tensor::from_vec(sb, (b, 1, 1, 1), &dev)?;
        let weights: Vec<f32> = ts.iter().map(|&t| min_snr_weight(alphas[t])).collect();
        let noise = seeded_noise(
            z0.dims(),
            opts.seed ^ 0x0004_015E ^ ((step as u64) << 8),
            &dev,
        )?;
        Ok(UnetBatch {
            noisy: (z0.broadcast_mul(&sa)? + noise.broadcast_mul(&sb)?)?,
            noise,
            context,
            timesteps: ts.iter().map(|&t| t as f64).collect(),
            weights: Tensor::from_vec(weights, (b, 1, 1, 1), &dev)?,
        })
    };
    std::thread::scope(|scope| -> Result<()> {
        let prepare = &prepare;
        let mut next: Option<(usize, std::thread::ScopedJoinHandle<'_, Result<UnetBatch>>)> = None;
        let mut loss_at = |step: usize| -> Result<Tensor> {
            let batch = match next.take() {
                Some((prepared, handle)) if prepared == step => handle.join().map_err(|_| {
                    Error::invalid("unet training", "the thread preparing a batch panicked")
                })??,
                _ => prepare(step)?,
            };
            if prefetch && step + 1 < opts.unet_steps {
                next = Some((step + 1, scope.spawn(move || prepare(step + 1))));
            }
            let pred =
                unet.forward_timesteps(&batch.noisy, &batch.timesteps, &batch.context, None)?;
            Ok((pred - &batch.noise)?
                .sqr()?
                .broadcast_mul(&batch.weights)?
                .mean_all()?)
        };
        let stage = Stage {
            name: "unet",
            groups: &[("unet", &vars)],
            adam_state: &adam_state,
            start,
            steps: opts.unet_steps,
            peak_lr: UNET_PEAK_LR,
            average: Some(&average),
        };
        run_stage(stage, opts, progress, &mut loss_at)
    })?;
    json_write(&dir.join("config.json"), &unet_config_json())?;
    average
        .vars()
        .save(&dir.join("diffusion_pytorch_model.safetensors"))?;
    mark_done(&dir)
}

/// Stage 4, as SD's fine-tuned VAE decoders: more training for the decoder alone, on latents of the frozen
/// encoder, so everything trained on those latents stays valid.
fn refine_decoder(opts: &TrainOptions, progress: &Reporter) -> Result<()> {
    let dir = opts.out.join("vae");
    let done = dir.join(".decoder-refined");
    if done.is_file() || opts.decoder_steps == 0 {
        return Ok(());
    }
    let weights = dir.join("diffusion_pytorch_model.safetensors");
    let stored = candle_core::safetensors::load(&weights, &Device::Cpu)
        .map_err(|e| Error::file(&weights, e.to_string()))?;
    let ckpt = opts.out.join(".train/decoder.safetensors");
    let (start, mut presets, adam_state) = Checkpoint::load(&ckpt, &["decoder"])?;
    let mut preset: std::collections::BTreeMap<String, Tensor> = stored.into_iter().collect();
    preset.extend(presets.remove(0));
    let vars = TrainVars::new(opts.seed ^ 0xDEC, preset);
    let cfg = VaeConfig::load(&dir.join("config.json"))?;
    let vae = AutoencoderKL::load(&cfg, vars.var_builder())?;
    let decoder_vars =
        vars.subset(|name| name.starts_with("decoder.") || name.starts_with("post_quant_conv."));
    let mut loss_at = |step: usize| -> Result<Tensor> {
        let x = render_batch(&training_specs(opts.seed, 4, step, opts.vae_batch))?;
        let z = vae.encode(&x)?.detach();
        let diff = (vae.decode(&z)? - &x)?;
        Ok((diff.sqr()?.mean_all()? + (diff.abs()?.mean_all()? * 0.2)?)?)
    };
    let stage = Stage {
        name: "decoder",
        groups: &[("decoder", &decoder_vars)],
        adam_state: &adam_state,
        start,
        steps: opts.decoder_steps,
        peak_lr: 1e-3,
        average: None,
    };
    run_stage(stage, opts, progress, &mut loss_at)?;
    vars.save(&weights)?;
    write_atomic(&done, b"")
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
