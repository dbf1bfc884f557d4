use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use stylediff::toy::edits::EditPair;
use stylediff::toy::eval::evaluate;
use stylediff::toy::pairs::{random_pairs, write_pair, write_pairs};
use stylediff::toy::render::{render, to_rgb_image};
use stylediff::toy::train::{TOY_SIZE, TrainOptions, train};
use stylediff::toy::world::SceneSpec;
use stylediff::util::save_png;
use stylediff::util::write_atomic;
use stylediff::viz::{GridCell, captioned_grid};

use super::progress_bar;

#[derive(clap::Subcommand)]
pub enum ToyCommand {
    /// Render a scene: from a caption (random layout from --layout-seed) or a random scene from --seed.
    Render(RenderArgs),
    /// Write source.png, target_gt.png (same layout, edit applied) and mask.png (pixels that must change).
    EditPair(EditPairArgs),
    /// Write N random edit pairs (held-out layouts) with manifest.csv, including the Prompt-to-Prompt settings.
    Pairs(PairsArgs),
    /// Measure a toy model: generation accuracy, VAE PSNR, CLIP caption ranking; writes report.json,
    /// report.md and grid.png (the first 48 samples under their captions, misread ones framed red).
    Eval(EvalArgs),
    /// Train the toy model (VAE, CLIP pair, UNet) into a diffusers-layout folder; resumes after interruption.
    Train(TrainArgs),
}

#[derive(clap::Args)]
pub struct RenderArgs {
    /// e.g. "a striped red circle on a blue background"
    #[arg(long, conflicts_with = "seed")]
    caption: Option<String>,
    /// Draw a random scene from this seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Seed of the layout (size and position of the objects).
    #[arg(long, default_value_t = 0)]
    layout_seed: u64,
    /// PNG to write (32x32); an existing file is replaced atomically.
    #[arg(long, value_name = "IMG.png")]
    out: PathBuf,
}

#[derive(clap::Args)]
pub struct EditPairArgs {
    /// Source caption, e.g. "a red circle on a blue background".
    #[arg(long)]
    caption: String,
    /// Target caption: one word changed (colour, shape, style, background) or a style word added.
    #[arg(long)]
    target: String,
    /// Seed of the layout (size and position of the objects), shared by source and target.
    #[arg(long, default_value_t = 0)]
    layout_seed: u64,
    /// Folder for source.png, target_gt.png and mask.png (created if missing).
    #[arg(long, value_name = "DIR")]
    out_dir: PathBuf,
}

#[derive(clap::Args)]
pub struct PairsArgs {
    /// Number of edit pairs.
    #[arg(long, default_value_t = 20)]
    n: usize,
    /// Seed of the scenes, edits and (held-out) layouts: the same seed gives the same pairs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Folder for the pairs' images and manifest.csv (created if missing).
    #[arg(long, value_name = "DIR")]
    out_dir: PathBuf,
}

#[derive(clap::Args)]
pub struct EvalArgs {
    /// The toy model folder (default: the bundled one).
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// Held-out captions to generate (and held-out renders for the VAE and CLIP measures).
    #[arg(long, default_value_t = 200)]
    n: usize,
    /// DDIM steps per generated image.
    #[arg(long, default_value_t = 30)]
    steps: usize,
    /// Classifier-free guidance scale (SD's 7.5; the bundled toy model draws shapes a little more often at 3).
    #[arg(long, default_value_t = 7.5)]
    guidance: f64,
    /// Seed of the held-out captions, renders and sampling noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Folder for report.json, report.md and grid.png (created if missing).
    #[arg(long, value_name = "DIR")]
    out_dir: PathBuf,
}

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Output folder (diffusers layout); checkpoints go to OUT/.train and a rerun resumes from them.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Seeds every initialisation, batch and noise draw: the same seed gives the same weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// VAE steps (batch 16).
    #[arg(long, default_value_t = TrainOptions::VAE_STEPS)]
    vae_steps: usize,
    /// Contrastive CLIP steps (each image is also contrasted with its caption's shape swaps and three
    /// other single-word edits; both embeddings also name every object's attributes to a linear probe).
    #[arg(long, default_value_t = TrainOptions::CLIP_STEPS)]
    clip_steps: usize,
    /// Images per contrastive CLIP step.
    #[arg(long, default_value_t = TrainOptions::CLIP_BATCH)]
    clip_batch: usize,
    /// Share of two-object scenes among the CLIP stage's images, 0 to 1 (other stages draw the world's 30%).
    #[arg(long, default_value_t = TrainOptions::CLIP_TWO_OBJECT_SHARE)]
    clip_two_objects: f64,
    /// UNet steps.
    #[arg(long, default_value_t = TrainOptions::UNET_STEPS)]
    unet_steps: usize,
    /// UNet batch size.
    #[arg(long, default_value_t = TrainOptions::UNET_BATCH)]
    unet_batch: usize,
    /// Steps of the VAE-decoder refinement (after the VAE stage, beside the CLIP stage).
    #[arg(long, default_value_t = TrainOptions::DECODER_STEPS)]
    decoder_steps: usize,
    /// Steps of the image encoder's refinement against the frozen text encoder (beside the UNet stage; 0 skips
    /// it).
    #[arg(long, default_value_t = TrainOptions::VISION_STEPS)]
    vision_steps: usize,
}

pub fn run(cmd: ToyCommand) -> anyhow::Result<()> {
    match cmd {
        ToyCommand::Render(a) => {
            let spec = match (&a.caption, a.seed) {
                (Some(c), _) => SceneSpec::parse(c)?,
                (None, Some(s)) => {
                    use rand::SeedableRng;
                    SceneSpec::random(&mut rand::rngs::StdRng::seed_from_u64(s))
                }
                (None, None) => anyhow::bail!("give --caption TEXT or --seed N"),
            };
            let scene = spec.layout(a.layout_seed, TOY_SIZE);
            stylediff::util::save_image(
                &a.out,
                &to_rgb_image(&render(&scene, TOY_SIZE), TOY_SIZE),
            )?;
            println!("{}", spec.caption());
            Ok(())
        }
        ToyCommand::EditPair(a) => {
            let pair = EditPair::new(
                &SceneSpec::parse(&a.caption)?,
                &SceneSpec::parse(&a.target)?,
            )?;
            let r = write_pair(&pair, a.layout_seed, &a.out_dir)?;
            let p2p = pair.p2p();
            println!(
                "{} edit: {} pixels change; P2P mode {}, blend {},{} -> {}",
                pair.kind.name(),
                r.mask.iter().filter(|m| **m).count(),
                p2p.mode.name(),
                p2p.blend_source,
                p2p.blend_target,
                a.out_dir.display()
            );
            Ok(())
        }
        ToyCommand::Pairs(a) => {
            stylediff::limits::count_in("n", a.n, 1, 100_000)?;
            let cases = random_pairs(a.n, a.seed);
            write_pairs(&cases, &a.out_dir)?;
            println!(
                "{} pairs and manifest.csv written to {}",
                cases.len(),
                a.out_dir.display()
            );
            Ok(())
        }
        ToyCommand::Eval(a) => {
            stylediff::limits::count_in("n", a.n, 1, 100_000)?;
            stylediff::limits::count_in("steps", a.steps, 1, 1000)?;
            stylediff::limits::finite_in(
                "guidance",
                a.guidance,
                0.0,
                stylediff::limits::MAX_GUIDANCE,
            )?;
            let opts = stylediff::model::LoadOptions {
                image_encoder: true,
                ..Default::default()
            };
            let sd = stylediff::model::StableDiffusion::load(
                &super::resolve_model(a.model.as_ref(), false)?,
                &opts,
            )?;
            let bar = progress_bar(a.n as u64, "generating");
            let (report, images) = evaluate(&sd, a.n, a.steps, a.guidance, a.seed, &mut |i, _| {
                bar.set_position(i as u64)
            })?;
            bar.finish();
            let json = serde_json::to_string_pretty(&report)?;
            write_atomic(&a.out_dir.join("report.json"), json.as_bytes())?;
            let shown: Vec<GridCell> = images
                .iter()
                .take(48)
                .map(|s| GridCell {
                    image: &s.image,
                    caption: &s.caption,
                    misses: &s.misses,
                })
                .collect();
            save_png(
                &a.out_dir.join("grid.png"),
                &captioned_grid(&shown, TOY_SIZE, 8, 4)?,
            )?;
            let mut md = report.markdown();
            md.push_str(
                "\nGrid (row-major, 8 per row; framed red with the checker's reading where it differs):\n\n",
            );
            for (k, s) in images.iter().take(48).enumerate() {
                let misses = if s.misses.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", s.misses.join(", "))
                };
                md.push_str(&format!("{}. {}{misses}\n", k + 1, s.caption));
            }
            write_atomic(&a.out_dir.join("report.md"), md.as_bytes())?;
            println!("{json}");
            Ok(())
        }
        ToyCommand::Train(a) => {
            // candle's pool for element-wise operations serves one caller at a time, and the stages run two at a
            // time, a core each (VAE and CLIP, then UNet and image encoder refinement): queued on that pool, 200
            // steps of VAE and CLIP took 147 s, one after the other 123 s, and without the pool 90 s. (The UNet
            // stage alone is as fast either way.)
            if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
                // SAFETY: no tensor has been made and no thread started yet in this process, so nothing reads the
                // environment concurrently, and candle reads this variable when it first builds that pool.
                unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
            }
            let mut opts = TrainOptions::new(a.out.clone(), a.seed);
            opts.vae_steps = a.vae_steps;
            opts.clip_steps = a.clip_steps;
            opts.unet_steps = a.unet_steps;
            opts.unet_batch = a.unet_batch;
            opts.clip_batch = a.clip_batch;
            opts.clip_two_object_share = a.clip_two_objects;
            opts.decoder_steps = a.decoder_steps;
            opts.vision_steps = a.vision_steps;
            // Two stages run at a time: one bar each, drawn together.
            let shown = indicatif::MultiProgress::new();
            let bars: Mutex<HashMap<String, indicatif::ProgressBar>> = Mutex::new(HashMap::new());
            let started = std::time::Instant::now();
            train(&opts, &|stage, step, total, loss| {
                let mut bars = bars.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                let bar = bars.entry(stage.to_string()).or_insert_with(|| {
                    let b = shown.add(progress_bar(total as u64, stage));
                    b.set_position(step.saturating_sub(1) as u64);
                    b
                });
                bar.set_position(step as u64);
                bar.set_message(format!("{stage} loss {loss:.4}"));
                if !console_is_tty() && (step % 50 == 0 || step == total) {
                    eprintln!(
                        "[{:>6.0}s] {stage} {step}/{total} loss {loss:.5}",
                        started.elapsed().as_secs_f64()
                    );
                }
            })?;
            for b in bars
                .into_inner()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .values()
            {
                b.finish();
            }
            eprintln!(
                "toy model written to {} in {:.0} s",
                a.out.display(),
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
    }
}

fn console_is_tty() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}
