//! `stylediff engine`: the engine benchmark and the random-weight pipelines it runs on.

use std::path::PathBuf;

use stylediff::engine_bench::{self, EngineBenchOptions, EnginePart};

use super::ModelArgs;

#[derive(clap::Subcommand)]
pub enum EngineCommand {
    /// Time the networks at full size (UNet forward at batch 1 and 2, UNet forward+backward to the value input,
    /// VAE encode/decode, text and image encoders, loading); prints a table and writes report.json.
    /// Compare with PyTorch on the same weights: tools/time_diffusers.py --model DIR --report DIR/report.json.
    Bench(BenchArgs),
    /// Write a pipeline folder with random weights at the size its configs describe (for example
    /// ../shared/fixtures/real-models/sd-v1-5: Stable Diffusion v1.5, 4 GB), to time without the real weights.
    RandomModel(RandomModelArgs),
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// Loading every component's weights.
    Load,
    /// CLIP text encoder, one prompt.
    TextEncoder,
    /// CLIP image encoder, one image.
    ImageEncoder,
    /// One UNet evaluation, one latent.
    UnetBatch1,
    /// One UNet evaluation, two latents (a guided step).
    UnetBatch2,
    /// UNet forward+backward to the cross-attention value input (one inversion inner iteration).
    UnetForwardBackward,
    /// VAE encoder.
    VaeEncode,
    /// VAE decoder.
    VaeDecode,
}

impl From<Part> for EnginePart {
    fn from(p: Part) -> Self {
        match p {
            Part::Load => Self::Load,
            Part::TextEncoder => Self::TextEncoder,
            Part::ImageEncoder => Self::ImageEncoder,
            Part::UnetBatch1 => Self::UnetBatch1,
            Part::UnetBatch2 => Self::UnetBatch2,
            Part::UnetForwardBackward => Self::UnetForwardBackward,
            Part::VaeEncode => Self::VaeEncode,
            Part::VaeDecode => Self::VaeDecode,
        }
    }
}

#[derive(clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A CLIP image encoder folder or hub id (default: the model folder's image_encoder/, when it has one).
    #[arg(long, value_name = "DIR|ORG/NAME")]
    image_encoder: Option<PathBuf>,
    /// Image side in pixels.
    #[arg(long, default_value_t = 512)]
    size: usize,
    /// Timed runs of each part (the table shows their median).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Untimed runs before the timed ones.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Comma-separated parts to time (default: all; image-encoder only when there is one).
    #[arg(long, value_enum, value_delimiter = ',')]
    parts: Option<Vec<Part>>,
    /// report.json goes here.
    #[arg(long, value_name = "DIR")]
    out_dir: PathBuf,
}

#[derive(clap::Args)]
pub struct RandomModelArgs {
    /// A pipeline folder whose configs describe the model (model_index.json, unet/, vae/, text_encoder/,
    /// scheduler/ with their config files; weights are not read).
    #[arg(long, value_name = "DIR")]
    config: PathBuf,
    /// The CLIP tokenizer folder (vocab.json, merges.txt, ...). Default: CONFIG/tokenizer.
    #[arg(long, value_name = "DIR")]
    tokenizer: Option<PathBuf>,
    /// A CLIP vision config folder for an image_encoder/ (StyleDiffusion needs one), e.g.
    /// ../shared/fixtures/real-models/clip-vit-base-patch16/image_encoder. Default: CONFIG/image_encoder if present.
    #[arg(long, value_name = "DIR")]
    image_encoder_config: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The new folder (must not exist).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

pub fn run(command: EngineCommand) -> anyhow::Result<()> {
    match command {
        EngineCommand::Bench(a) => bench(a),
        EngineCommand::RandomModel(a) => random_model(a),
    }
}

fn bench(a: BenchArgs) -> anyhow::Result<()> {
    let report_path = a.out_dir.join("report.json");
    let location = a.model.location()?;
    let mut plan = stylediff::outputs::OutputPlan::new();
    super::plan_model_inputs(&mut plan, &location)?;
    plan.output("report", &report_path)?;
    plan.check_writable()?;
    let image_encoder = a.model.image_encoder(a.image_encoder.as_ref())?;
    let load = a.model.load_options()?;
    let parts: Vec<EnginePart> = match &a.parts {
        Some(parts) => parts.iter().map(|&p| p.into()).collect(),
        None => engine_bench::default_parts(&location, image_encoder.as_deref()),
    };
    let opts = EngineBenchOptions {
        size: a.size,
        warmup: a.warmup,
        repeats: a.repeats,
        parts,
        dtype: load.dtype,
        device: load.device,
        image_encoder,
    };
    eprintln!(
        "timing {} part(s) at {}x{}, {} warm-up and {} timed run(s) each; nothing else should run meanwhile",
        opts.parts.len(),
        opts.size,
        opts.size,
        opts.warmup,
        opts.repeats
    );
    let report = engine_bench::run(&location, &opts, |row| {
        eprintln!("{:<24} {:>9.3} s", row.part.name(), row.seconds);
    })?;
    print!("{}", report.table());
    std::fs::create_dir_all(&a.out_dir)?;
    stylediff::util::write_atomic(
        &report_path,
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    eprintln!("wrote {}", report_path.display());
    Ok(())
}

fn random_model(a: RandomModelArgs) -> anyhow::Result<()> {
    let tokenizer = a
        .tokenizer
        .clone()
        .unwrap_or_else(|| a.config.join("tokenizer"));
    let image_encoder = a.image_encoder_config.clone().or_else(|| {
        let dir = a.config.join("image_encoder");
        dir.join("config.json").is_file().then_some(dir)
    });
    if image_encoder.is_none() {
        eprintln!(
            "no image encoder config: the folder will have no image_encoder/ (pass --image-encoder-config)"
        );
    }
    let mut plan = stylediff::outputs::OutputPlan::new();
    plan.input_folder("config folder", &a.config)?;
    plan.input_folder("tokenizer folder", &tokenizer)?;
    plan.output("random model folder", &a.out)?;
    plan.check_writable()?;
    stylediff::engine_bench::write_random_pipeline(
        &a.config,
        &tokenizer,
        image_encoder.as_deref(),
        &a.out,
        a.seed,
        |line| eprintln!("{line}"),
    )?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}
