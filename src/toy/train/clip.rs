//! The CLIP stage (text and vision towers, contrastive with hard negatives, an attribute probe) and the image encoder's refinement against the frozen text encoder.

use super::*;

/// Single-word edits of its own caption that each image is contrasted with, besides the batch's captions and its
/// shape swaps.
pub(super) const CLIP_HARD_NEGATIVES: usize = 3;

/// The captions an image of `spec` is contrasted with besides the batch's: every shape swap of each object, then
/// `others` more single-word edits drawn at random. Shape is the one attribute that a from-scratch vision encoder
/// does not pick up from colour statistics, so a random draw of edits (one shape swap in six on average) leaves
/// it, and the text encoder's shape words, with almost no gradient.
pub(super) fn hard_negatives(spec: &SceneSpec, others: usize, rng: &mut StdRng) -> Vec<SceneSpec> {
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
pub(super) const MAX_LOGIT_SCALE: f64 = 4.6;

/// The batch's captions, then each image's hard negatives: single-word edits of its caption (every shape swap,
/// and a colour, style or background swapped), the distinctions the UNet's conditioning and the editing prompts
/// rely on.
pub(super) fn contrastive_captions(specs: &[(SceneSpec, u64)], seed: u64) -> Vec<SceneSpec> {
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
/// shapes (docs/toy-model-notebook.md).
pub(super) struct AttributeProbe {
    head: candle_nn::Linear,
}

pub(super) const OBJECT_COLORS: usize = Color::OBJECT.len();
pub(super) const SHAPES: usize = Shape::ALL.len();
pub(super) const STYLES: usize = Style::ALL.len();
/// Attribute groups of one object slot: colour, shape, style.
pub(super) const SLOT_LOGITS: usize = OBJECT_COLORS + SHAPES + STYLES;
/// Slots: the single object of a one-object scene; the left and the right object of a two-object scene.
pub(super) const PROBE_SLOTS: usize = 3;
pub(super) const BACKGROUND_LOGITS: usize = Color::ALL.len();

pub(super) fn index_of<T: PartialEq>(all: &[T], value: T) -> usize {
    all.iter()
        .position(|x| *x == value)
        .expect("a word of the world")
}

impl AttributeProbe {
    pub(super) fn load(vb: candle_nn::VarBuilder) -> Result<Self> {
        Ok(Self {
            head: candle_nn::linear(WIDTH, BACKGROUND_LOGITS + PROBE_SLOTS * SLOT_LOGITS, vb)?,
        })
    }

    /// (offset, size, class) of every attribute the probe must name for `spec`.
    pub(super) fn targets(spec: &SceneSpec) -> Vec<(usize, usize, usize)> {
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
    pub(super) fn loss(&self, embeddings: &Tensor, specs: &[SceneSpec]) -> Result<Tensor> {
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
/// 3e-3 ranks better at the same length and 6e-3 worse, and more steps at 3e-3 better still (docs/toy-model-notebook.md).
pub(super) const CLIP_PEAK_LR: f64 = 3e-3;

/// Weight of the attribute probe's loss (for each tower) beside the contrastive loss.
pub(super) const PROBE_WEIGHT: f64 = 0.5;

/// Unit-length pooled text embeddings of `captions`.
pub(super) fn pooled_caption_embeddings(
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
pub(super) fn image_embeddings(vision: &ClipVisionTransformer, images: &Tensor) -> Result<Tensor> {
    let out = vision.forward(&clip_normalize(images)?)?;
    normalize(
        out.image_embeds
            .as_ref()
            .ok_or_else(|| Error::invalid("image encoder", "has no visual projection"))?,
    )
}

/// CLIP's symmetric loss: image `i` against every caption (the first `b` are the images' own, the rest hard
/// negatives), and each own caption against the images.
pub(super) fn contrastive_loss(img: &Tensor, txt: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let b = img.dim(0)?;
    let logits = img.matmul(&txt.t()?)?.broadcast_mul(scale)?; // (b, all captions)
    let targets = Tensor::arange(0u32, b as u32, img.device())?;
    let l_img = candle_nn::loss::cross_entropy(&logits, &targets)?;
    let l_txt = candle_nn::loss::cross_entropy(&logits.narrow(1, 0, b)?.t()?, &targets)?;
    Ok(((l_img + l_txt)? * 0.5)?)
}

/// The two towers and what their loss needs.
pub(super) struct Towers<'a> {
    text: &'a ClipTextTransformer,
    tokenizer: &'a ClipTokenizer,
    vision: &'a ClipVisionTransformer,
    logit_scale: &'a Tensor,
    probe: &'a AttributeProbe,
    eos: u32,
}

impl Towers<'_> {
    /// One step's loss, shared by the CLIP stage and the image encoder's refinement: the step's renders against
    /// their captions and hard negatives (`(stage, salt)` draws both), plus the attribute probe on the image
    /// embeddings, and on the text embeddings too when `probe_text` (the text encoder is trained).
    pub(super) fn loss(
        &self,
        opts: &TrainOptions,
        (stage, salt): (u64, u64),
        step: usize,
        probe_text: bool,
    ) -> Result<Tensor> {
        let specs = specs_for_step(
            opts.seed,
            stage,
            step,
            opts.clip_batch,
            Some(opts.clip_two_object_share),
        );
        let caption_specs = contrastive_captions(&specs, opts.seed ^ salt ^ step as u64);
        let captions: Vec<String> = caption_specs.iter().map(SceneSpec::caption).collect();
        let txt = pooled_caption_embeddings(self.text, self.tokenizer, &captions, self.eos)?;
        let img = image_embeddings(self.vision, &render_batch(&specs)?)?;
        let scale = self.logit_scale.clamp(0.0, MAX_LOGIT_SCALE)?.exp()?;
        let image_probe = self.probe.loss(&img, &caption_specs[..specs.len()])?;
        let probed = if probe_text {
            (image_probe + self.probe.loss(&txt, &caption_specs)?)?
        } else {
            image_probe
        };
        Ok((contrastive_loss(&img, &txt, &scale)? + (probed * PROBE_WEIGHT)?)?)
    }
}

pub(super) fn train_clip(
    opts: &TrainOptions,
    vocab_size: usize,
    progress: &Reporter,
) -> Result<()> {
    let (text_dir, vision_dir) = (
        opts.out.join("text_encoder"),
        opts.out.join("image_encoder"),
    );
    if stage_done(&text_dir) && stage_done(&vision_dir) {
        return Ok(());
    }
    let tokenizer = ClipTokenizer::from_folder(&opts.out.join("tokenizer"))?;
    let ckpt = opts.out.join(".train/clip.safetensors");
    let mut restored = Checkpoint::load(&ckpt, &["text", "vision", "scale", "probe"])?;
    let probe_preset = restored.take("probe");
    let scale_preset = restored.take("scale");
    let vision_preset = restored.take("vision");
    let text_preset = restored.take("text");
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
    let towers = Towers {
        text: &text,
        tokenizer: &tokenizer,
        vision: &vision,
        logit_scale: &logit_scale,
        probe: &probe,
        eos: tokenizer.eos(),
    };
    let mut loss_at = |step: usize| towers.loss(opts, (2, 0xC11F), step, true);
    let stage = Stage {
        name: "clip",
        groups: &[
            ("text", &text_vars),
            ("vision", &vision_vars),
            ("scale", &scale_vars),
            ("probe", &probe_vars),
        ],
        adam_state: &restored.adam,
        start: restored.step,
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
pub(super) const REFINED: &str = ".refined";

/// The image encoder refinement's peak learning rate, the CLIP stage's: 1e-3 ranked worse (docs/toy-model-notebook.md).
pub(super) const VISION_PEAK_LR: f64 = 3e-3;

/// More training for the image encoder alone, against the frozen text encoder, whose states the UNet reads, so
/// that it can run beside the UNet stage. The CLIP stage's loss and negatives, with a fresh attribute probe on the
/// image side only (the CLIP stage's is not kept: its last checkpoint is a hundred steps short of its end).
pub(super) fn refine_image_encoder(opts: &TrainOptions, progress: &Reporter) -> Result<()> {
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
    let mut restored = Checkpoint::load(&ckpt, &["vision", "scale", "probe"])?;
    let probe_preset = restored.take("probe");
    let scale_preset = restored.take("scale");
    let mut vision_preset: std::collections::BTreeMap<String, Tensor> =
        stored.into_iter().collect();
    vision_preset.extend(restored.take("vision"));
    let vision_vars = TrainVars::new(opts.seed ^ 0x0151, vision_preset);
    let vision_cfg = ClipVisionConfig::load(&dir.join("config.json"))?;
    let vision = ClipVisionTransformer::load(&vision_cfg, vision_vars.var_builder())?;
    let scale_vars = TrainVars::new(0, scale_preset);
    let logit_scale = scale_vars.var_builder().get(1, LOGIT_SCALE)?;
    let probe_vars = TrainVars::new(opts.seed ^ 0x9B0F, probe_preset);
    let probe = AttributeProbe::load(probe_vars.var_builder())?;
    let towers = Towers {
        text: &text,
        tokenizer: &tokenizer,
        vision: &vision,
        logit_scale: &logit_scale,
        probe: &probe,
        eos: tokenizer.eos(),
    };
    let mut loss_at = |step: usize| towers.loss(opts, (5, 0x5EE5), step, false);
    let stage = Stage {
        name: "vision",
        groups: &[
            ("vision", &vision_vars),
            ("scale", &scale_vars),
            ("probe", &probe_vars),
        ],
        adam_state: &restored.adam,
        start: restored.step,
        steps: opts.vision_steps,
        peak_lr: VISION_PEAK_LR,
        average: None,
    };
    run_stage(stage, opts, progress, &mut loss_at)?;
    vision_vars.save(&weights)?;
    write_atomic(&done, b"")
}
