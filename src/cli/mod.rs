//! The command line: a thin layer over the library.

mod batch;
mod bench;
mod engine;
mod generate;
mod inspect;
mod invert;
#[cfg(feature = "studio")]
mod serve;
mod toy;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "stylediff",
    version,
    about = "Text-based real-image editing with StyleDiffusion on Stable Diffusion v1.x, in Rust"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Text-to-image with classifier-free guidance (DDIM sampler).
    Generate(generate::GenerateArgs),
    /// Summarise a model folder and check every tensor's name and shape against the architecture.
    Inspect(inspect::InspectArgs),
    /// Invert a photo into the model (StyleDiffusion or a baseline) and write an inversion artifact.
    Invert(invert::InvertArgs),
    /// Edit an inverted photo with a target prompt (Prompt-to-Prompt + P2Plus).
    Edit(invert::EditArgs),
    /// Invert then edit in one command.
    Run(invert::RunArgs),
    /// Cross-attention heat maps of an inversion, one labelled tile per token.
    Attention(invert::AttentionArgs),
    /// Run the authors' CSV cases (inversion, and edits with every tau combination); skips finished cases.
    /// Shards across machines (--shard, Slurm arrays, Kubernetes Indexed Jobs); `batch plan`, `batch merge`.
    Batch(batch::BatchArgs),
    /// The studio: a local web page to invert a photo once and edit it many times (prints its URL).
    #[cfg(feature = "studio")]
    Serve(serve::ServeArgs),
    /// Benchmark StyleDiffusion against its baselines on toy-world edits with exact ground truth.
    Bench(bench::BenchArgs),
    /// Engine speed at full size: time the networks (compare with PyTorch on the same weights) and make
    /// random-weight pipelines to time.
    #[command(subcommand)]
    Engine(engine::EngineCommand),
    /// The toy world: render scenes, make edit pairs, train the bundled toy model.
    #[command(subcommand)]
    Toy(toy::ToyCommand),
}

/// Options shared by every command that loads a model.
#[derive(clap::Args, Clone, Debug)]
pub struct ModelArgs {
    /// The model: a folder in the diffusers layout (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
    /// scheduler/, optional image_encoder/), or a Hugging Face hub id such as
    /// stable-diffusion-v1-5/stable-diffusion-v1-5 (optionally @revision) read from the local Hugging Face cache.
    /// A single-file checkpoint in the original Stable Diffusion layout (FILE.safetensors, as community
    /// fine-tunes ship) also works, read with --config. Default: the bundled toy model (32x32 toy scenes only).
    #[arg(long, value_name = "DIR|ORG/NAME|FILE")]
    pub model: Option<PathBuf>,
    /// For a single-file --model: the diffusers folder or hub id whose configs, tokenizer and scheduler describe
    /// it (default: stable-diffusion-v1-5/stable-diffusion-v1-5, for SD v1.x checkpoints).
    #[arg(long, value_name = "DIR|ORG/NAME")]
    pub config: Option<PathBuf>,
    /// Fetch what a hub id needs (configs, tokenizer, safetensors weights) into the Hugging Face cache when it is
    /// missing there. Without it stylediff never touches the network.
    #[arg(long)]
    pub download: bool,
    /// Compute dtype (weights are converted on load, whatever their stored dtype; f16 is for GPUs: on a CPU it
    /// is much slower than f32).
    #[arg(long, value_enum, default_value_t = ComputeDtype::F32)]
    pub dtype: ComputeDtype,
    /// Compute device (cuda and metal need the cargo feature of that name).
    #[arg(long, value_enum, default_value_t = ComputeDevice::Cpu)]
    pub device: ComputeDevice,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ComputeDtype {
    F32,
    F16,
    Bf16,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ComputeDevice {
    Cpu,
    Cuda,
    Metal,
}

impl ModelArgs {
    pub fn device(&self) -> anyhow::Result<candle_core::Device> {
        Ok(match self.device {
            ComputeDevice::Cpu => candle_core::Device::Cpu,
            ComputeDevice::Cuda if !cfg!(feature = "cuda") => anyhow::bail!(
                "--device cuda: this stylediff was built without CUDA; rebuild with `cargo build --release --features cuda`"
            ),
            ComputeDevice::Metal if !cfg!(feature = "metal") => anyhow::bail!(
                "--device metal: this stylediff was built without Metal; rebuild with `cargo build --release --features metal`"
            ),
            ComputeDevice::Cuda => candle_core::Device::new_cuda(0)?,
            ComputeDevice::Metal => candle_core::Device::new_metal(0)?,
        })
    }

    /// These options as command-line arguments, to print or record a command that repeats a run.
    pub fn to_args(&self) -> Vec<String> {
        use clap::ValueEnum;
        let name = |v: Option<clap::builder::PossibleValue>| v.map(|v| v.get_name().to_string());
        let mut args = Vec::new();
        for (flag, value) in [("--model", &self.model), ("--config", &self.config)] {
            if let Some(v) = value {
                args.extend([flag.to_string(), v.display().to_string()]);
            }
        }
        if self.download {
            args.push("--download".into());
        }
        if self.dtype != ComputeDtype::F32 {
            args.extend(
                ["--dtype".into()]
                    .into_iter()
                    .chain(name(self.dtype.to_possible_value())),
            );
        }
        if self.device != ComputeDevice::Cpu {
            args.extend(
                ["--device".into()]
                    .into_iter()
                    .chain(name(self.device.to_possible_value())),
            );
        }
        args
    }

    /// The model folder (`--model`: a folder or a hub id; or the bundled toy model), announced on stderr.
    pub fn folder(&self) -> anyhow::Result<PathBuf> {
        resolve_model(self.model.as_ref(), self.download)
    }

    /// Where the model is (`--model` as a folder, hub id or single file; or the bundled toy model), announced on
    /// stderr with its short id.
    pub fn location(&self) -> anyhow::Result<stylediff::model::ModelLocation> {
        resolve_location(self.model.as_ref(), self.config.as_ref(), self.download)
    }

    /// Whether this is the bundled toy model.
    pub fn is_toy(&self) -> bool {
        self.model.is_none()
    }

    /// A CLIP image encoder given as a folder or a hub id.
    pub fn image_encoder(&self, given: Option<&PathBuf>) -> anyhow::Result<Option<PathBuf>> {
        given
            .map(|p| {
                let (dir, label) = stylediff::model::source::resolve(
                    &p.to_string_lossy(),
                    stylediff::model::source::RepoKind::ImageEncoder,
                    self.download,
                )?;
                eprintln!("image encoder: {label}");
                Ok(dir)
            })
            .transpose()
    }

    pub fn load_options(&self) -> anyhow::Result<stylediff::model::LoadOptions> {
        Ok(stylediff::model::LoadOptions {
            dtype: match self.dtype {
                ComputeDtype::F32 => candle_core::DType::F32,
                ComputeDtype::F16 => candle_core::DType::F16,
                ComputeDtype::Bf16 => candle_core::DType::BF16,
            },
            device: self.device()?,
            ..Default::default()
        })
    }
}

/// The model's files as inputs of `plan`: nothing may be written onto the checkpoint or into the model folder.
pub fn plan_model_inputs(
    plan: &mut stylediff::outputs::OutputPlan,
    location: &stylediff::model::ModelLocation,
) -> anyhow::Result<()> {
    match location {
        stylediff::model::ModelLocation::Folder(root) => {
            plan.input_folder("model folder", root)?;
        }
        stylediff::model::ModelLocation::SingleFile { file, configs } => {
            plan.input("checkpoint (--model)", file)?;
            plan.input_folder("model folder", configs)?;
        }
    }
    Ok(())
}

/// `--model` as a folder or hub id, or the bundled toy model; prints which model is used and its short id.
pub fn resolve_model(model: Option<&PathBuf>, download: bool) -> anyhow::Result<PathBuf> {
    match resolve_location(model, None, download)? {
        stylediff::model::ModelLocation::Folder(dir) => Ok(dir),
        stylediff::model::ModelLocation::SingleFile { file, .. } => anyhow::bail!(
            "{}: this command reads a model folder or hub id, not a single-file checkpoint",
            file.display()
        ),
    }
}

/// `--model` (a folder, hub id or single file, with `--config` for the last; or the bundled toy model), announced
/// on stderr with its short id.
pub fn resolve_location(
    model: Option<&PathBuf>,
    config: Option<&PathBuf>,
    download: bool,
) -> anyhow::Result<stylediff::model::ModelLocation> {
    let (location, label) = match model {
        Some(spec) => stylediff::model::source::resolve_pipeline(
            &spec.to_string_lossy(),
            config.map(|c| c.to_string_lossy().to_string()).as_deref(),
            download,
        )?,
        None if config.is_some() => anyhow::bail!(
            "--config is for single-file checkpoints given with --model FILE.safetensors"
        ),
        None => (
            stylediff::model::ModelLocation::Folder(stylediff::toy::bundled::toy_model_dir()?),
            "the bundled toy model (32x32 toy scenes; pass --model for Stable Diffusion)"
                .to_string(),
        ),
    };
    let id = location.identity().unwrap_or_default();
    eprintln!("model: {label} [id {}]", id.get(..12).unwrap_or(&id));
    Ok(location)
}

/// Warns when a photo given to the bundled toy model is not a toy scene: the result would be 32-pixel noise.
pub fn warn_if_not_toy(model: &ModelArgs, photo: &std::path::Path, rgb: &image::RgbImage) {
    let size = stylediff::toy::train::TOY_SIZE;
    if model.is_toy() && !stylediff::toy::world::looks_like_toy_scene(rgb, size) {
        eprintln!(
            "warning: {} ({}x{}) is not a toy scene, and the bundled toy model knows only {size}x{size} toy scenes: \
             the result will not resemble the photo. Pass --model with a Stable Diffusion folder or hub id \
             (README: \"Editing a real photo\").",
            photo.display(),
            rgb.width(),
            rgb.height()
        );
    }
}

/// Ctrl-C, or SIGTERM from a scheduler (Slurm preempting or requeueing a task, Kubernetes deleting a pod), cancels
/// `token`: the job stops at its next UNet evaluation, releasing its locks and keeping finished work. A second
/// signal quits at once.
pub fn cancel_on_signal(token: &stylediff::CancelToken) {
    let token = token.clone();
    let _ = ctrlc::set_handler(move || {
        if token.is_cancelled() {
            std::process::exit(130);
        }
        eprintln!("stopping at the next step (a second signal quits at once)");
        token.cancel();
    });
}

/// A progress bar on a terminal; where stderr is a log file or pipe (a batch job, `nohup`), a plain progress
/// line at the start and then at most every 30 seconds, so long runs are never silent.
pub fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    let target = if std::io::stderr().is_terminal() {
        indicatif::ProgressDrawTarget::stderr()
    } else {
        indicatif::ProgressDrawTarget::term_like(Box::new(LogLines::default()))
    };
    let bar = indicatif::ProgressBar::with_draw_target(Some(len), target);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>10} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// A progress bar that follows a job's phases: one bar per phase (DDIM inversion, optimisation, reconstruction,
/// editing, ...), counted in steps, or for the optimisation in inner iterations (`inner_budget`: the budget of
/// each step, so early-stopped steps jump ahead and the ETA stays honest), with the loss in its message.
pub struct PhaseBar {
    bar: indicatif::ProgressBar,
    phase: Option<stylediff::Phase>,
    inner_budget: Vec<usize>,
}

impl PhaseBar {
    pub fn new(inner_budget: Vec<usize>) -> Self {
        Self {
            bar: progress_bar(1, ""),
            phase: None,
            inner_budget,
        }
    }

    pub fn update(&mut self, p: &stylediff::Progress) {
        use stylediff::Phase;
        let optimising = p.phase == Phase::Optimising && !self.inner_budget.is_empty();
        if self.phase != Some(p.phase) {
            self.phase = Some(p.phase);
            let len = if optimising {
                self.inner_budget.iter().sum::<usize>()
            } else {
                p.steps
            };
            self.bar.set_length(len as u64);
            self.bar.reset();
            self.bar.set_message(p.phase.label());
        }
        if optimising {
            let before: usize = self.inner_budget.iter().take(p.step - 1).sum();
            self.bar.set_position((before + p.inner) as u64);
            if let Some(loss) = p.loss {
                self.bar.set_message(format!(
                    "optimising t{}/{} it{}/{} loss {loss:.2e}",
                    p.step, p.steps, p.inner, p.inner_budget
                ));
            }
        } else {
            self.bar.set_position(p.step as u64);
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// indicatif's drawing turned into occasional log lines: what a redraw would show is kept, and printed when the
/// last printed line is old enough.
#[derive(Debug, Default)]
struct LogLines {
    pending: std::sync::Mutex<(String, Option<std::time::Instant>)>,
}

const LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

impl indicatif::TermLike for LogLines {
    fn width(&self) -> u16 {
        120
    }
    fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.write_str(s)
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        let mut p = self.pending.lock().expect("progress log lock");
        if !s.trim().is_empty() {
            p.0 = s.trim().to_string();
        }
        Ok(())
    }
    fn clear_line(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        let mut p = self.pending.lock().expect("progress log lock");
        let due = p.1.is_none_or(|t| t.elapsed() >= LOG_EVERY);
        if due && !p.0.is_empty() {
            eprintln!("{}", p.0);
            p.0.clear();
            p.1 = Some(std::time::Instant::now());
        }
        Ok(())
    }
}

pub fn run() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Generate(args) => generate::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Toy(cmd) => toy::run(cmd),
        Command::Invert(a) => invert::run_invert(a),
        Command::Edit(a) => invert::run_edit(a),
        Command::Run(a) => invert::run_run(a),
        Command::Batch(a) => batch::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Engine(c) => engine::run(c),
        Command::Attention(a) => invert::run_attention(a),
        #[cfg(feature = "studio")]
        Command::Serve(a) => serve::run(a),
    }
}
