//! The VAE stage, and the refinement of its decoder alone.

use super::*;

pub(super) fn train_vae(opts: &TrainOptions, progress: &Reporter) -> Result<()> {
    let dir = opts.out.join("vae");
    if stage_done(&dir) {
        return Ok(());
    }
    let ckpt = opts.out.join(".train/vae.safetensors");
    let mut restored = Checkpoint::load(&ckpt, &["vae"])?;
    let vars = TrainVars::new(opts.seed ^ 0x0AE, restored.take("vae"));
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
        adam_state: &restored.adam,
        start: restored.step,
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

/// Stage 4, as SD's fine-tuned VAE decoders: more training for the decoder alone, on latents of the frozen
/// encoder, so everything trained on those latents stays valid.
pub(super) fn refine_decoder(opts: &TrainOptions, progress: &Reporter) -> Result<()> {
    let dir = opts.out.join("vae");
    let done = dir.join(".decoder-refined");
    if done.is_file() || opts.decoder_steps == 0 {
        return Ok(());
    }
    let weights = dir.join("diffusion_pytorch_model.safetensors");
    let stored = candle_core::safetensors::load(&weights, &Device::Cpu)
        .map_err(|e| Error::file(&weights, e.to_string()))?;
    let ckpt = opts.out.join(".train/decoder.safetensors");
    let mut restored = Checkpoint::load(&ckpt, &["decoder"])?;
    let mut preset: std::collections::BTreeMap<String, Tensor> = stored.into_iter().collect();
    preset.extend(restored.take("decoder"));
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
        adam_state: &restored.adam,
        start: restored.step,
        steps: opts.decoder_steps,
        peak_lr: 1e-3,
        average: None,
    };
    run_stage(stage, opts, progress, &mut loss_at)?;
    vars.save(&weights)?;
    write_atomic(&done, b"")
}
