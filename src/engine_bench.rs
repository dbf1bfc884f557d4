//! The engine benchmark: times the networks of a pipeline at a given image size (UNet forward at batch 1 and 2,
//! the inversion's UNet forward+backward to the cross-attention value input, VAE encode and decode, the text and
//! image encoders, weight loading), with FLOP counts and peak memory, so that stylediff can be compared with
//! PyTorch on the same weights (`tools/time_diffusers.py`). [`write_random_pipeline`] makes such weights at the
//! real size from a pipeline's configs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::model::hook::{AttentionCall, AttentionHook, Branch, HookedPass};
use crate::model::nn::flops;
use crate::model::weights::{Audit, Catalog};
use crate::model::{ComponentKind, LoadOptions, ModelLocation, StableDiffusion};
use crate::{Error, Result};

/// One timed piece of work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EnginePart {
    /// Loading every component's weights (and checking them) from the files.
    Load,
    /// The CLIP text encoder on one 77-token prompt.
    TextEncoder,
    /// The CLIP image encoder on one image (StyleDiffusion's mapping input).
    ImageEncoder,
    /// One UNet evaluation of one latent.
    UnetBatch1,
    /// One UNet evaluation of two latents: a classifier-free guided step.
    UnetBatch2,
    /// UNet forward and backward to the value input of every cross-attention layer (weights frozen): the work of
    /// one StyleDiffusion or null-text inner iteration.
    UnetForwardBackward,
    /// VAE encoder (image to latent mean).
    VaeEncode,
    /// VAE decoder (latent to image).
    VaeDecode,
}

impl EnginePart {
    pub const ALL: [EnginePart; 8] = [
        Self::Load,
        Self::TextEncoder,
        Self::ImageEncoder,
        Self::UnetBatch1,
        Self::UnetBatch2,
        Self::UnetForwardBackward,
        Self::VaeEncode,
        Self::VaeDecode,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Load => "load",
            Self::TextEncoder => "text-encoder",
            Self::ImageEncoder => "image-encoder",
            Self::UnetBatch1 => "unet-batch1",
            Self::UnetBatch2 => "unet-batch2",
            Self::UnetForwardBackward => "unet-forward-backward",
            Self::VaeEncode => "vae-encode",
            Self::VaeDecode => "vae-decode",
        }
    }
}

#[derive(Clone, Debug)]
pub struct EngineBenchOptions {
    /// Image side in pixels (the latent side is this over the VAE's downscale).
    pub size: usize,
    /// Untimed runs before the timed ones (page faults, allocator warm-up).
    pub warmup: usize,
    /// Timed runs of each part.
    pub repeats: usize,
    pub parts: Vec<EnginePart>,
    pub dtype: DType,
    pub device: Device,
    /// A separate image encoder folder (default: the model's `image_encoder`).
    pub image_encoder: Option<PathBuf>,
}

impl Default for EngineBenchOptions {
    fn default() -> Self {
        Self {
            size: 512,
            warmup: 1,
            repeats: 3,
            parts: EnginePart::ALL.to_vec(),
            dtype: DType::F32,
            device: Device::Cpu,
            image_encoder: None,
        }
    }
}

/// The timings of one part.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EngineRow {
    pub part: EnginePart,
    /// Median of the timed runs.
    pub seconds: f64,
    pub seconds_min: f64,
    pub seconds_max: f64,
    pub runs: usize,
    /// Counted floating-point operations of one run (two per multiply-add of every matrix product and
    /// convolution; for forward+backward, the forward plus the input-gradient products of the backward).
    pub gflop: Option<f64>,
    pub gflop_per_s: Option<f64>,
    /// Peak resident memory of the process during this part (weights included), in MiB.
    pub peak_resident_mib: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EngineReport {
    pub engine: String,
    pub version: String,
    pub model: String,
    pub size: usize,
    pub dtype: String,
    pub device: String,
    pub threads: usize,
    pub cpu: Option<String>,
    pub rows: Vec<EngineRow>,
}

impl EngineReport {
    /// The table printed by `stylediff engine bench`.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{} {} · {} at {}x{} · {} on {} · {} threads\n",
            self.engine,
            self.version,
            self.model,
            self.size,
            self.size,
            self.dtype,
            self.device,
            self.threads
        );
        out.push_str(&format!(
            "{:<24} {:>10} {:>10} {:>10} {:>10} {:>12}\n",
            "part", "median s", "min s", "GFLOP", "GFLOP/s", "peak MiB"
        ));
        let opt =
            |v: Option<f64>, prec: usize| v.map_or("-".to_string(), |v| format!("{v:.prec$}"));
        for r in &self.rows {
            out.push_str(&format!(
                "{:<24} {:>10.3} {:>10.3} {:>10} {:>10} {:>12}\n",
                r.part.name(),
                r.seconds,
                r.seconds_min,
                opt(r.gflop, 1),
                opt(r.gflop_per_s, 1),
                opt(r.peak_resident_mib, 0)
            ));
        }
        out
    }
}

/// Resets the peak-resident-memory counter of this process (Linux; elsewhere nothing is measured) to the current
/// resident size, which includes memory the allocator keeps for reuse (`runtime` never trims the heap): hand that
/// back with [`crate::runtime::release_free_memory`] before a part's warm-up so that its peak is its own.
pub fn reset_peak_memory() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident memory since the last reset, in MiB (Linux).
pub fn peak_memory_mib() -> Option<f64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
}

fn cpu_name() -> Option<String> {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()?
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
}

/// A hook that feeds one tensor to the value projection of every cross-attention layer, as StyleDiffusion's
/// mapping network does.
struct ValueOverride<'a>(&'a Tensor);

impl AttentionHook for ValueOverride<'_> {
    fn value_input(
        &mut self,
        _call: &AttentionCall,
        _key_input: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.0.clone()))
    }

    fn needs_probs(&self, _call: &AttentionCall) -> bool {
        false
    }
}

/// Loads the pipeline once (timing it when asked) and times each part, on the engine's worker threads.
pub fn run(
    location: &ModelLocation,
    opts: &EngineBenchOptions,
    progress: impl FnMut(&EngineRow) + Send,
) -> Result<EngineReport> {
    crate::runtime::on_worker_thread(|| run_here(location, opts, progress))
}

fn run_here(
    location: &ModelLocation,
    opts: &EngineBenchOptions,
    mut progress: impl FnMut(&EngineRow),
) -> Result<EngineReport> {
    crate::limits::count_in("size", opts.size, 8, crate::limits::MAX_SIDE)?;
    crate::limits::count_in("repeats", opts.repeats, 1, 1000)?;
    crate::limits::count_in("warmup", opts.warmup, 0, 1000)?;
    let needs_image_encoder = opts.parts.contains(&EnginePart::ImageEncoder)
        || opts.parts.contains(&EnginePart::Load)
            && has_image_encoder(location, opts.image_encoder.as_deref());
    let load_opts = LoadOptions {
        dtype: opts.dtype,
        device: opts.device.clone(),
        image_encoder: needs_image_encoder,
        image_encoder_path: opts.image_encoder.clone(),
    };
    let mut rows = Vec::new();
    let mut load_times = Vec::new();
    let mut model = None;
    let load_runs = if opts.parts.contains(&EnginePart::Load) {
        opts.warmup + opts.repeats
    } else {
        1
    };
    let mut load_peak = None;
    for i in 0..load_runs {
        drop(model.take());
        crate::runtime::release_free_memory();
        reset_peak_memory();
        let start = Instant::now();
        model = Some(StableDiffusion::load_from(location, &load_opts)?);
        if i >= opts.warmup || !opts.parts.contains(&EnginePart::Load) {
            load_times.push(start.elapsed().as_secs_f64());
            load_peak = peak_memory_mib();
        }
    }
    let model = model.expect("loaded at least once");
    if opts.parts.contains(&EnginePart::Load) {
        let row = row(EnginePart::Load, &load_times, None, load_peak);
        progress(&row);
        rows.push(row);
    }
    for &part in &opts.parts {
        if part == EnginePart::Load {
            continue;
        }
        let row = time_part(&model, part, opts)?;
        progress(&row);
        rows.push(row);
    }
    Ok(EngineReport {
        engine: "stylediff".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        model: location.config_root().display().to_string(),
        size: opts.size,
        dtype: format!("{:?}", opts.dtype).to_lowercase(),
        device: if opts.device.is_cpu() {
            "cpu".into()
        } else {
            format!("{:?}", opts.device.location())
        },
        threads: candle_core::utils::get_num_threads(),
        cpu: cpu_name(),
        rows,
    })
}

/// Whether the pipeline has a CLIP image encoder: a separate folder, or the model folder's `image_encoder/`.
pub fn has_image_encoder(location: &ModelLocation, separate: Option<&Path>) -> bool {
    separate.is_some()
        || matches!(location, ModelLocation::Folder(root) if root.join("image_encoder").join("config.json").is_file())
}

/// Every part this pipeline can time: all of them, the image encoder only when there is one.
pub fn default_parts(
    location: &ModelLocation,
    separate_image_encoder: Option<&Path>,
) -> Vec<EnginePart> {
    let with_encoder = has_image_encoder(location, separate_image_encoder);
    EnginePart::ALL
        .into_iter()
        .filter(|&p| p != EnginePart::ImageEncoder || with_encoder)
        .collect()
}

fn row(part: EnginePart, times: &[f64], flop: Option<u64>, peak: Option<f64>) -> EngineRow {
    let mut sorted = times.to_vec();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let gflop = flop.map(|f| f as f64 / 1e9);
    EngineRow {
        part,
        seconds: median,
        seconds_min: sorted[0],
        seconds_max: sorted[sorted.len() - 1],
        runs: times.len(),
        gflop,
        gflop_per_s: gflop.map(|g| g / median),
        peak_resident_mib: peak,
    }
}

/// Deterministic standard-normal-ish inputs (uniform with unit variance: the values do not matter for timing).
fn input(shape: &[usize], seed: u64, model: &StableDiffusion) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let data: Vec<f32> = (0..n)
        .map(|_| unit_uniform(&mut rng) * 3f32.sqrt())
        .collect();
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?
        .to_device(&model.device)?
        .to_dtype(model.dtype)?)
}

/// A value in [-1, 1) from 24 random bits: the same on every platform and release.
fn unit_uniform(rng: &mut impl RngCore) -> f32 {
    (rng.next_u32() >> 8) as f32 * (2.0 / (1u32 << 24) as f32) - 1.0
}

fn time_part(
    model: &StableDiffusion,
    part: EnginePart,
    opts: &EngineBenchOptions,
) -> Result<EngineRow> {
    let unet = model.unet.config();
    let latent_side = opts.size / model.vae.config().downscale();
    let channels = model.latent_channels();
    let context_dim = unet.cross_attention_dim;
    let tokens = model.tokenizer.max_length();
    let work: Box<dyn Fn() -> Result<()>> = match part {
        EnginePart::Load => unreachable!("timed while loading"),
        EnginePart::TextEncoder => {
            let ids = model
                .tokenizer
                .encode_padded("a cat sitting next to a mirror")?;
            let n = ids.len();
            let ids = Tensor::from_vec(ids, (1, n), &model.device)?;
            Box::new(move || {
                model.text_encoder.forward(&ids)?;
                Ok(())
            })
        }
        EnginePart::ImageEncoder => {
            let encoder = model.image_encoder.as_ref().ok_or_else(|| {
                Error::invalid(
                    "parts",
                    "image-encoder needs an image encoder: the model folder has none",
                )
            })?;
            let side = encoder.image_size();
            let pixels = input(&[1, 3, side, side], 1, model)?;
            Box::new(move || {
                encoder.forward(&pixels)?;
                Ok(())
            })
        }
        EnginePart::UnetBatch1 | EnginePart::UnetBatch2 => {
            let batch = if part == EnginePart::UnetBatch1 { 1 } else { 2 };
            let latents = input(&[batch, channels, latent_side, latent_side], 2, model)?;
            let context = input(&[batch, tokens, context_dim], 3, model)?;
            Box::new(move || {
                model.unet.forward(&latents, 500.0, &context, None)?;
                Ok(())
            })
        }
        EnginePart::UnetForwardBackward => {
            let latents = input(&[1, channels, latent_side, latent_side], 2, model)?;
            let context = input(&[1, tokens, context_dim], 3, model)?;
            let target = input(&[1, channels, latent_side, latent_side], 4, model)?;
            let value = Var::from_tensor(&input(&[1, tokens, context_dim], 5, model)?)?;
            Box::new(move || {
                let mut hook = ValueOverride(value.as_tensor());
                let mut pass = HookedPass::new(&mut hook, Branch::Conditional, 0);
                let eps = model
                    .unet
                    .forward(&latents, 500.0, &context, Some(&mut pass))?;
                let loss = (eps - &target)?.sqr()?.mean_all()?;
                let grads = loss.backward()?;
                grads
                    .get(value.as_tensor())
                    .ok_or_else(|| Error::invalid("value input", "received no gradient"))?;
                Ok(())
            })
        }
        EnginePart::VaeEncode => {
            let image = input(&[1, 3, opts.size, opts.size], 6, model)?;
            Box::new(move || {
                model.vae.encode_mean(&image)?;
                Ok(())
            })
        }
        EnginePart::VaeDecode => {
            let latents = input(&[1, channels, latent_side, latent_side], 7, model)?;
            Box::new(move || {
                model.vae.decode(&latents)?;
                Ok(())
            })
        }
    };
    // An earlier, larger part's freed memory would otherwise count in this part's peak; released before the
    // warm-up so that the timed runs reuse this part's own memory as a long run does.
    crate::runtime::release_free_memory();
    for _ in 0..opts.warmup {
        work()?;
    }
    let mut times = Vec::new();
    let mut counted = flops::Tally::default();
    reset_peak_memory();
    for _ in 0..opts.repeats {
        flops::take();
        let start = Instant::now();
        work()?;
        model.device.synchronize()?;
        times.push(start.elapsed().as_secs_f64());
        counted = flops::take();
    }
    let flop = match part {
        // Frozen weights: each dense product has one input-gradient product; each attention product has two
        // (both of its operands depend on the input).
        EnginePart::UnetForwardBackward => 2 * counted.dense + 3 * counted.attention,
        _ => counted.total(),
    };
    Ok(row(part, &times, Some(flop), peak_memory_mib()))
}

/// Writes a pipeline folder in the diffusers layout with random weights at the size its configs describe: the
/// configs, scheduler and `model_index.json` of `configs`, the tokenizer of `tokenizer`, and, when
/// `image_encoder_config` names a CLIP vision config folder, an image encoder. The same `seed` gives the same
/// files. Weights follow PyTorch's default initialisation scales (uniform within 1/sqrt(fan-in); norms 1 and 0;
/// embeddings 0.02 standard deviation) so that activations stay finite through the networks.
pub fn write_random_pipeline(
    configs: &Path,
    tokenizer: &Path,
    image_encoder_config: Option<&Path>,
    out: &Path,
    seed: u64,
    mut progress: impl FnMut(&str),
) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    if out.exists() {
        return Err(Error::file(
            out,
            "already exists; random weights go to a new folder",
        ));
    }
    let index = configs.join("model_index.json");
    if !index.is_file() {
        return Err(Error::file(
            configs,
            "not a pipeline config folder: model_index.json is missing",
        ));
    }
    for file in ["vocab.json", "merges.txt"] {
        if !tokenizer.join(file).is_file() {
            return Err(Error::file(
                tokenizer,
                format!("not a CLIP tokenizer folder: {file} is missing"),
            ));
        }
    }
    let mut components = vec![
        (ComponentKind::TextEncoder, configs.join("text_encoder")),
        (ComponentKind::Unet, configs.join("unet")),
        (ComponentKind::Vae, configs.join("vae")),
    ];
    if let Some(dir) = image_encoder_config {
        components.push((ComponentKind::ImageEncoder, dir.to_path_buf()));
    }
    // Every config parses and builds before anything is written.
    let mut plans = Vec::new();
    for (kind, dir) in &components {
        let config = dir.join("config.json");
        let audit = Audit::new(
            Catalog::default(),
            std::sync::Arc::new(crate::model::weights::no_aliases),
        );
        kind.build_for_audit(&config, &audit)?;
        let mut requested = audit.requested();
        if *kind == ComponentKind::ImageEncoder {
            // The projection is optional on load (absent from plain CLIPVisionModel checkpoints), so the build
            // does not ask for it; CLIPVisionModelWithProjection has it.
            let cfg = crate::model::clip::vision::ClipVisionConfig::load(&config)?;
            if let Some(dim) = cfg.projection_dim {
                requested.insert(
                    "visual_projection.weight".into(),
                    vec![dim, cfg.hidden_size],
                );
            }
        }
        plans.push((*kind, dir.clone(), requested));
    }
    let staging = out.with_extension("partial");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(io(&staging))?;
    std::fs::copy(&index, staging.join("model_index.json")).map_err(io(&index))?;
    copy_folder(&configs.join("scheduler"), &staging.join("scheduler"))?;
    copy_folder(tokenizer, &staging.join("tokenizer"))?;
    for (kind, dir, requested) in plans {
        let folder = staging.join(kind.folder_name());
        std::fs::create_dir_all(&folder).map_err(io(&folder))?;
        std::fs::copy(dir.join("config.json"), folder.join("config.json")).map_err(io(&dir))?;
        let count: usize = requested
            .values()
            .map(|s| s.iter().product::<usize>())
            .sum();
        progress(&format!(
            "{}: {} tensors, {:.1} M parameters",
            kind.folder_name(),
            requested.len(),
            count as f64 / 1e6
        ));
        let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = requested
            .into_par_iter()
            .map(|(name, shape)| {
                let data = random_parameter(&name, &shape, seed);
                let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
                (name, shape, bytes)
            })
            .collect();
        let views = tensors
            .iter()
            .map(|(name, shape, bytes)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| Error::invalid("tensor", format!("{name}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let file = folder.join(weights_file_name(kind));
        safetensors::serialize_to_file(views, None, &file)
            .map_err(|e| Error::file(&file, e.to_string()))?;
    }
    std::fs::rename(&staging, out).map_err(io(out))?;
    Ok(())
}

fn weights_file_name(kind: ComponentKind) -> &'static str {
    match kind {
        ComponentKind::Unet | ComponentKind::Vae => "diffusion_pytorch_model.safetensors",
        ComponentKind::TextEncoder | ComponentKind::ImageEncoder => "model.safetensors",
    }
}

fn copy_folder(from: &Path, to: &Path) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    std::fs::create_dir_all(to).map_err(io(to))?;
    for entry in std::fs::read_dir(from).map_err(io(from))? {
        let entry = entry.map_err(io(from))?;
        if entry.file_type().map_err(io(from))?.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).map_err(io(&entry.path()))?;
        }
    }
    Ok(())
}

/// The random values of one parameter, seeded by the run's seed and the parameter's name.
fn random_parameter(name: &str, shape: &[usize], seed: u64) -> Vec<f32> {
    use sha2::Digest;
    let n: usize = shape.iter().product();
    let leaf = name.rsplit('.').next().unwrap_or(name);
    let is_norm = name.contains("norm") && shape.len() == 1;
    if is_norm {
        return vec![if leaf == "weight" { 1.0 } else { 0.0 }; n];
    }
    let mut h = sha2::Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(name.as_bytes());
    let mut rng = ChaCha8Rng::from_seed(h.finalize().into());
    let table = ["token_embedding", "position_embedding", "class_embedding"];
    let bound = if table.iter().any(|t| name.contains(t)) {
        0.02 * 3f32.sqrt()
    } else if shape.len() >= 2 {
        1.0 / (shape[1..].iter().product::<usize>() as f32).sqrt()
    } else {
        // A bias: PyTorch bounds it by its layer's fan-in, which is not known here; a small fixed bound.
        0.02
    };
    (0..n).map(|_| unit_uniform(&mut rng) * bound).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_parameters_depend_on_seed_and_name_only() {
        let a = random_parameter("unet.conv_in.weight", &[4, 3, 3, 3], 7);
        assert_eq!(a, random_parameter("unet.conv_in.weight", &[4, 3, 3, 3], 7));
        assert_ne!(a, random_parameter("unet.conv_in.weight", &[4, 3, 3, 3], 8));
        assert_ne!(
            a,
            random_parameter("unet.conv_out.weight", &[4, 3, 3, 3], 7)
        );
        let bound = 1.0 / 27f32.sqrt();
        assert!(a.iter().all(|v| v.abs() <= bound));
        assert!(a.iter().any(|v| v.abs() > bound / 2.0));
        assert_eq!(random_parameter("x.norm1.weight", &[5], 0), vec![1.0; 5]);
        assert_eq!(random_parameter("x.norm1.bias", &[5], 0), vec![0.0; 5]);
    }
}
