use std::path::PathBuf;

use anyhow::Context;
use stylediff::outputs::OutputPlan;
use stylediff::pipeline::GenerateOptions;
use stylediff::util::{
    load_single_tensor, save_image_with_settings, save_tensors, tensor_to_image,
};

use super::ModelArgs;

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
    /// Classifier-free guidance scale, 0 to 100 (1 or less disables guidance).
    #[arg(long, default_value_t = 7.5, allow_negative_numbers = true)]
    guidance: f64,
    /// Seed of the initial noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Image width in pixels, at most 2048 (default: the UNet's sample_size times the VAE's downscale).
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
    /// Output image; its extension picks the format: .png, .jpg/.jpeg or .webp.
    #[arg(long, value_name = "IMG.png")]
    out: PathBuf,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let mut gen_opts = GenerateOptions {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        steps: args.steps,
        guidance: args.guidance,
        seed: args.seed,
        width: args.width,
        height: args.height,
        latents: None,
    };
    gen_opts.validate()?;
    let mut plan = OutputPlan::new();
    let location = args.model.location()?;
    super::plan_model_inputs(&mut plan, &location)?;
    if let Some(p) = &args.latents {
        plan.input("initial latent (--latents)", p)?;
    }
    plan.image_output("output image (--out)", &args.out)?;
    if let Some(p) = &args.save_latents {
        if p.extension().is_none_or(|e| e != "safetensors") {
            anyhow::bail!(
                "{}: --save-latents writes a safetensors file; name it *.safetensors",
                p.display()
            );
        }
        plan.output("final latent (--save-latents)", p)?;
    }
    plan.check_writable()?;
    let opts = args.model.load_options()?;
    if let Some(p) = &args.latents {
        gen_opts.latents = Some(load_single_tensor(p, &opts.device)?);
    }
    let editor = stylediff::Editor::load_from(&location, &opts)?;
    if let Some(p) = &args.latents {
        stylediff::pipeline::initial_latents(editor.model(), &gen_opts)
            .with_context(|| format!("--latents {}", p.display()))?;
    }
    let mut view = super::PhaseBar::new(Vec::new());
    let result = editor.generate(&gen_opts, &mut stylediff::Monitor::new(|p| view.update(p)));
    view.finish();
    let result = result?;
    let image = tensor_to_image(&result.image)?;
    if let Some(p) = &args.save_latents {
        save_tensors(p, &[("latents", &result.latents)])
            .with_context(|| format!("writing {}", p.display()))?;
    }
    save_image_with_settings(
        &args.out,
        &image,
        &stylediff::outputs::generate_record(&gen_opts, editor.model_id()),
    )?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
