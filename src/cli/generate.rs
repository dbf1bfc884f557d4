use std::path::PathBuf;

use anyhow::Context;
use stylediff::model::StableDiffusion;
use stylediff::pipeline::GenerateOptions;
use stylediff::util::{load_single_tensor, save_png, save_tensors, tensor_to_image};

use super::{ModelArgs, progress_bar};

#[derive(clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// What the image should show.
    #[arg(long)]
    prompt: String,
    /// What it should not show (the unconditional branch of classifier-free guidance).
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// DDIM sampling steps.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Classifier-free guidance scale (1 or less disables guidance).
    #[arg(long, default_value_t = 7.5)]
    guidance: f64,
    /// Seed of the initial noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Image width in pixels (default: the UNet's sample_size times the VAE's downscale).
    #[arg(long)]
    width: Option<usize>,
    /// Image height in pixels (default as for --width).
    #[arg(long)]
    height: Option<usize>,
    /// Initial noise from a safetensors file holding one tensor [1, 4, H/8, W/8] (overrides --seed and size).
    #[arg(long, value_name = "FILE.safetensors")]
    latents: Option<PathBuf>,
    /// Also write the final latent (before decoding) as a safetensors file.
    #[arg(long, value_name = "FILE.safetensors")]
    save_latents: Option<PathBuf>,
    /// Output PNG.
    #[arg(long, value_name = "IMG.png")]
    out: PathBuf,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let opts = args.model.load_options()?;
    let sd = StableDiffusion::load(&args.model.folder()?, &opts)?;
    let latents = match &args.latents {
        Some(p) => Some(load_single_tensor(p, &opts.device)?),
        None => None,
    };
    let gen_opts = GenerateOptions {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        steps: args.steps,
        guidance: args.guidance,
        seed: args.seed,
        width: args.width,
        height: args.height,
        latents,
    };
    let bar = progress_bar(args.steps as u64, "denoising");
    let result = sd.generate(&gen_opts, &mut |i, _| bar.set_position(i as u64))?;
    bar.finish();
    if let Some(p) = &args.save_latents {
        save_tensors(p, &[("latents", &result.latents)])
            .with_context(|| format!("writing {}", p.display()))?;
    }
    save_png(&args.out, &tensor_to_image(&result.image)?)?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
