//! The UNet stage: epsilon prediction on the frozen VAE's latents and the frozen text encoder's states.

use super::*;

/// The UNet stage's peak learning rate, above the other stages': at 1e-3 the UNet was still far from converged
/// when its budget ran out (shape rising about 8 points per thousand steps); 2e-3 and 3e-3 each bought shape
/// accuracy at the same cost, and 4e-3 in 3000 steps draws shapes better than 3e-3 in 3300 (docs/toy-model-notebook.md).
pub(super) const UNET_PEAK_LR: f64 = 4e-3;

/// Decay of the UNet's weight average (about the last thousand steps).
pub(super) const UNET_EMA_DECAY: f64 = 0.999;

/// Min-SNR-gamma loss weight for epsilon prediction (Hang et al. 2023): min(SNR, 5) / SNR. Nearly noise-free
/// steps, which only polish detail, stop dominating the gradient, so the global layout (which object, which
/// colour) is learnt in fewer steps.
pub(super) fn min_snr_weight(alpha_bar: f64) -> f32 {
    let snr = alpha_bar / (1.0 - alpha_bar);
    (snr.min(5.0) / snr) as f32
}

/// One UNet step's inputs from the frozen text encoder and VAE.
pub(super) struct UnetBatch {
    noisy: Tensor,
    noise: Tensor,
    context: Tensor,
    timesteps: Vec<f64>,
    /// Min-SNR weight per sample, (b, 1, 1, 1).
    weights: Tensor,
}

pub(super) fn train_unet(opts: &TrainOptions, progress: &Reporter, prefetch: bool) -> Result<()> {
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
    let mut restored = Checkpoint::load(&ckpt, &["unet", "ema"])?;
    let ema_preset = restored.take("ema");
    let vars = TrainVars::new(opts.seed ^ 0x0E7, restored.take("unet"));
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
            adam_state: &restored.adam,
            start: restored.step,
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
