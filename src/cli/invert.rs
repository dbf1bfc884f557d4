//! `invert`, `edit` and `run`: inversion to an artifact, editing from one, or both in one go.

use std::path::{Path, PathBuf};

use anyhow::Context;
use stylediff::edit::{EditMode, EditSettings};
use stylediff::invert::artifact;
use stylediff::invert::{AttentionPairing, Inversion, InversionSettings, Method};
use stylediff::model::{StableDiffusion, model_identity};
use stylediff::util::{ensure_not_input, image_to_tensor, save_png, tensor_to_image};

use super::{ModelArgs, progress_bar};

#[derive(clap::Args, Clone)]
pub struct InvertOptions {
    /// The photo to edit (any size, aspect and mode; centre-cropped and resized to the model's native size).
    #[arg(long, value_name = "IMG")]
    pub image: PathBuf,
    /// A prompt that describes the photo, e.g. "a cat sitting next to a mirror".
    #[arg(long)]
    pub prompt: String,
    /// stylediffusion | null-text | negative-prompt | ddim
    #[arg(long, default_value = "stylediffusion")]
    pub method: String,
    /// DDIM steps (the authors' script uses 30, SD's default is 50).
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Inner optimisation iterations K at step 0 (StyleDiffusion: K_i = ceil(K e^-0.1i), default 100;
    /// null-text: K every step, default 10).
    #[arg(long)]
    pub inner_steps: Option<usize>,
    /// Classifier-free guidance scale used for inversion and editing.
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,
    /// Weight of StyleDiffusion's attention regularisation (0 turns it off).
    #[arg(long, default_value_t = 1.0)]
    pub attention_weight: f64,
    /// Which DDIM-inversion maps regularise step i: authors (recorded one step earlier on the same latent, as
    /// the authors' code) or same-timestep.
    #[arg(long, default_value = "authors")]
    pub attention_pairing: String,
    /// CLIP image encoder folder when the model has no image_encoder/ (StyleDiffusion only).
    #[arg(long, value_name = "DIR")]
    pub image_encoder: Option<PathBuf>,
}

#[derive(clap::Args, Clone)]
pub struct EditOptions {
    /// The target prompt, e.g. "a tiger sitting next to a mirror".
    #[arg(long)]
    pub target: String,
    /// auto (replace if the word counts match, else refine) | replace | refine
    #[arg(long, default_value = "auto")]
    pub mode: String,
    /// Local blend: SRCWORD,TGTWORD (several words: "cat dog,tiger"): edit only where these words attend.
    #[arg(long, value_name = "SRCWORDS,TGTWORDS")]
    pub blend: Option<String>,
    /// Reweight a target word's attention, e.g. --reweight watercolor=2 (repeatable).
    #[arg(long, value_name = "WORD=FACTOR")]
    pub reweight: Vec<String>,
    /// A per-word cross-attention replacement window, e.g. --cross-word tiger=0.4 (repeatable).
    #[arg(long, value_name = "WORD=FRACTION")]
    pub cross_word: Vec<String>,
    /// Fraction of steps in which the target uses the learned value embedding (StyleDiffusion).
    #[arg(long, default_value_t = 0.5)]
    pub tau_v: f64,
    /// Fraction of steps with cross-attention replacement.
    #[arg(long, default_value_t = 0.6)]
    pub tau_c: f64,
    /// Fraction of steps with self-attention injection (conditional branch).
    #[arg(long, default_value_t = 0.6)]
    pub tau_s: f64,
    /// Fraction of steps with self-attention injection in the unconditional branch (P2Plus; .5 for large
    /// structural changes).
    #[arg(long, default_value_t = 0.0)]
    pub tau_u: f64,
    /// Output image.
    #[arg(long, value_name = "IMG.png")]
    pub out: PathBuf,
    /// Also write input | reconstruction | edit side by side.
    #[arg(long, value_name = "GRID.png")]
    pub grid: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct InvertArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    invert: InvertOptions,
    /// The inversion artifact to write (safetensors; metadata also in <name>.json).
    #[arg(long, value_name = "INV.safetensors")]
    out: PathBuf,
}

#[derive(clap::Args)]
pub struct EditArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// An artifact written by `stylediff invert` with the same model.
    #[arg(long, value_name = "INV.safetensors")]
    inversion: PathBuf,
    #[command(flatten)]
    edit: EditOptions,
}

#[derive(clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    invert: InvertOptions,
    #[command(flatten)]
    edit: EditOptions,
    /// Keep the inversion artifact here too.
    #[arg(long, value_name = "INV.safetensors")]
    save_inversion: Option<PathBuf>,
}

fn parse_pairs(items: &[String], flag: &str) -> anyhow::Result<Vec<(String, f64)>> {
    items
        .iter()
        .map(|s| {
            let (w, v) = s
                .split_once('=')
                .with_context(|| format!("{flag} {s:?}: expected WORD=NUMBER"))?;
            let v: f64 = v
                .parse()
                .with_context(|| format!("{flag} {s:?}: {v:?} is not a number"))?;
            Ok((w.to_string(), v))
        })
        .collect()
}

pub fn edit_settings(o: &EditOptions) -> anyhow::Result<EditSettings> {
    let mut s = EditSettings::new(o.target.clone());
    s.mode = EditMode::parse(&o.mode)?;
    s.blend = match &o.blend {
        None => None,
        Some(b) => {
            let (src, tgt) = b
                .split_once(',')
                .with_context(|| format!("--blend {b:?}: expected SRCWORDS,TGTWORDS"))?;
            let words = |t: &str| t.split_whitespace().map(str::to_string).collect::<Vec<_>>();
            Some((words(src), words(tgt)))
        }
    };
    s.reweight = parse_pairs(&o.reweight, "--reweight")?;
    s.cross_words = parse_pairs(&o.cross_word, "--cross-word")?;
    (s.tau_v, s.tau_c, s.tau_s, s.tau_u) = (o.tau_v, o.tau_c, o.tau_s, o.tau_u);
    Ok(s)
}

fn load_model(
    model: &ModelArgs,
    needs_image_encoder: bool,
    image_encoder: Option<PathBuf>,
) -> anyhow::Result<(StableDiffusion, String)> {
    let folder = model.folder()?;
    let mut opts = model.load_options()?;
    opts.image_encoder = needs_image_encoder;
    opts.image_encoder_path = image_encoder;
    let sd = StableDiffusion::load(&folder, &opts)?;
    Ok((sd, model_identity(&folder)?))
}

pub fn do_invert(
    sd: &StableDiffusion,
    model_id: &str,
    o: &InvertOptions,
) -> anyhow::Result<Inversion> {
    let method = Method::parse(&o.method)?;
    let mut settings = InversionSettings::new(method);
    settings.steps = o.steps;
    if let Some(k) = o.inner_steps {
        settings.inner_steps = k;
    }
    settings.guidance = o.guidance;
    settings.attention_weight = o.attention_weight;
    settings.pairing = match o.attention_pairing.as_str() {
        "authors" => AttentionPairing::Authors,
        "same-timestep" => AttentionPairing::SameTimestep,
        other => anyhow::bail!("--attention-pairing {other:?}: expected authors or same-timestep"),
    };
    let size = sd.native_size();
    let rgb = stylediff::image_io::load_square_rgb(&o.image, size)?;
    let image = image_to_tensor(&rgb, &sd.device)?;
    let total: u64 = (0..settings.steps)
        .map(|i| settings.inner_at(i) as u64)
        .sum::<u64>()
        + settings.steps as u64;
    let bar = progress_bar(total, "inverting");
    let mut done = 0u64;
    let mut last = (String::new(), 0usize);
    let mut inv = sd.invert(
        &image,
        &o.prompt,
        &settings,
        &mut |phase, step, steps, inner, loss| {
            if phase == "ddim inversion" {
                done += 1;
            } else if (phase.to_string(), step) != last {
                // A new optimisation step: count its whole budget of inner iterations, early stop or not.
                last = (phase.to_string(), step);
                done += settings.inner_at(step - 1) as u64;
            }
            bar.set_position(done.min(total));
            if inner > 0 {
                bar.set_message(format!("{phase} t{step}/{steps} it{inner} loss {loss:.2e}"));
            }
        },
    )?;
    bar.finish_and_clear();
    inv.model_id = model_id.to_string();
    inv.image_sha256 = stylediff::image_io::file_sha256(&o.image)?;
    eprintln!(
        "{} inversion: reconstruction PSNR {:.2} dB (against the VAE reconstruction)",
        method.name(),
        inv.recon_psnr
    );
    Ok(inv)
}

pub fn do_edit(
    sd: &StableDiffusion,
    model_id: &str,
    inv: &Inversion,
    o: &EditOptions,
    inputs: &[&Path],
) -> anyhow::Result<()> {
    if inv.model_id != model_id {
        anyhow::bail!(
            "this inversion was made with another model (model id {}…, this model {}…); invert the image again with this model",
            &inv.model_id.get(..12).unwrap_or(&inv.model_id),
            &model_id[..12]
        );
    }
    ensure_not_input(&o.out, inputs)?;
    let settings = edit_settings(o)?;
    let bar = progress_bar(inv.settings.steps as u64, "editing");
    let out = sd.edit(inv, &settings, &mut |i, _| bar.set_position(i as u64))?;
    bar.finish_and_clear();
    save_png(&o.out, &tensor_to_image(&out.edited)?)?;
    if let Some(grid) = &o.grid {
        ensure_not_input(grid, inputs)?;
        save_png(
            grid,
            &comparison_row(&inv.image, &out.reconstruction, &out.edited)?,
        )?;
    }
    eprintln!("wrote {}", o.out.display());
    Ok(())
}

pub fn run_invert(a: InvertArgs) -> anyhow::Result<()> {
    let needs = Method::parse(&a.invert.method)? == Method::StyleDiffusion;
    let (sd, id) = load_model(&a.model, needs, a.invert.image_encoder.clone())?;
    ensure_not_input(&a.out, &[&a.invert.image])?;
    let inv = do_invert(&sd, &id, &a.invert)?;
    artifact::save(&inv, &a.out)?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

pub fn run_edit(a: EditArgs) -> anyhow::Result<()> {
    let (sd, id) = load_model(&a.model, false, None)?;
    let inv = artifact::load(&a.inversion, &sd.device)?;
    do_edit(&sd, &id, &inv, &a.edit, &[&a.inversion])
}

pub fn run_run(a: RunArgs) -> anyhow::Result<()> {
    let needs = Method::parse(&a.invert.method)? == Method::StyleDiffusion;
    let (sd, id) = load_model(&a.model, needs, a.invert.image_encoder.clone())?;
    // Validate the edit before the (long) inversion.
    edit_settings(&a.edit)?;
    let inv = do_invert(&sd, &id, &a.invert)?;
    if let Some(p) = &a.save_inversion {
        artifact::save(&inv, p)?;
    }
    do_edit(&sd, &id, &inv, &a.edit, &[&a.invert.image])
}

#[derive(clap::Args)]
pub struct BatchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// An authors' CSV (stylediffusion_editing*.csv to invert and edit, stylediffusion_prompts*.csv to invert).
    #[arg(long, value_name = "FILE.csv")]
    csv: PathBuf,
    /// Where each case's artifact and edits go, with results.csv.
    #[arg(long, value_name = "DIR", default_value = "stylediff-batch")]
    out_dir: PathBuf,
    #[arg(long, default_value = "stylediffusion")]
    method: String,
    #[arg(long, default_value_t = 50)]
    steps: usize,
    #[arg(long)]
    inner_steps: Option<usize>,
    #[arg(long, default_value_t = 7.5)]
    guidance: f64,
    #[arg(long, value_name = "DIR")]
    image_encoder: Option<PathBuf>,
}

fn csv_cell(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

pub fn run_batch(a: BatchArgs) -> anyhow::Result<()> {
    let cases = stylediff::batch::read_csv(&a.csv)?;
    let needs = Method::parse(&a.method)? == Method::StyleDiffusion;
    let (sd, id) = load_model(&a.model, needs, a.image_encoder.clone())?;
    let mut rows = vec!["case,variant,prompt,target,method,recon_psnr,status,output".to_string()];
    let jobs: usize = cases.iter().map(|c| 1 + c.edits.len()).sum();
    let bar = progress_bar(jobs as u64, "batch");
    for case in &cases {
        let dir = a.out_dir.join(format!("case_{}", case.case));
        let inv_path = dir.join("inversion.safetensors");
        let mut row = |variant: &str, target: &str, psnr: String, status: String, output: &str| {
            rows.push(
                [
                    &case.case,
                    variant,
                    &case.prompt,
                    target,
                    &a.method,
                    &psnr,
                    &status,
                    output,
                ]
                .iter()
                .map(|c| csv_cell(c))
                .collect::<Vec<_>>()
                .join(","),
            );
        };
        let inv = match artifact::load(&inv_path, &sd.device) {
            Ok(inv)
                if inv.model_id == id
                    && inv.settings.method.name() == a.method
                    && inv.settings.steps == a.steps =>
            {
                row(
                    "inversion",
                    "",
                    format!("{:.2}", inv.recon_psnr),
                    "skipped (done before)".into(),
                    &inv_path.display().to_string(),
                );
                inv
            }
            _ => {
                let o = InvertOptions {
                    image: case.image.clone(),
                    prompt: case.prompt.clone(),
                    method: a.method.clone(),
                    steps: a.steps,
                    inner_steps: a.inner_steps,
                    guidance: a.guidance,
                    attention_weight: 1.0,
                    attention_pairing: "authors".into(),
                    image_encoder: None,
                };
                match do_invert(&sd, &id, &o).and_then(|inv| {
                    artifact::save(&inv, &inv_path)
                        .map(|_| inv)
                        .map_err(Into::into)
                }) {
                    Ok(inv) => {
                        row(
                            "inversion",
                            "",
                            format!("{:.2}", inv.recon_psnr),
                            "done".into(),
                            &inv_path.display().to_string(),
                        );
                        inv
                    }
                    Err(e) => {
                        bar.println(format!("case {}: {e:#}", case.case));
                        row("inversion", "", String::new(), format!("failed: {e:#}"), "");
                        bar.inc(1 + case.edits.len() as u64);
                        continue;
                    }
                }
            }
        };
        bar.inc(1);
        for (variant, settings) in &case.edits {
            let out = dir.join(format!("edit_{variant}.png"));
            if out.is_file() {
                row(
                    variant,
                    &settings.target,
                    format!("{:.2}", inv.recon_psnr),
                    "skipped (done before)".into(),
                    &out.display().to_string(),
                );
            } else {
                let result = sd
                    .edit(&inv, settings, &mut |_, _| {})
                    .map_err(anyhow::Error::from)
                    .and_then(|e| {
                        save_png(
                            &dir.join(format!("grid_{variant}.png")),
                            &comparison_row(&inv.image, &e.reconstruction, &e.edited)?,
                        )?;
                        save_png(&out, &tensor_to_image(&e.edited)?)?;
                        Ok(())
                    });
                let status = match result {
                    Ok(()) => "done".to_string(),
                    Err(e) => format!("failed: {e:#}"),
                };
                row(
                    variant,
                    &settings.target,
                    format!("{:.2}", inv.recon_psnr),
                    status,
                    &out.display().to_string(),
                );
            }
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let table = rows.join("\n") + "\n";
    stylediff::util::write_atomic(&a.out_dir.join("results.csv"), table.as_bytes())?;
    println!("{table}");
    Ok(())
}

#[derive(clap::Args)]
pub struct AttentionArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, value_name = "INV.safetensors")]
    inversion: PathBuf,
    /// The prompt whose token maps to show (default: the inversion's source prompt).
    #[arg(long)]
    prompt: Option<String>,
    /// Heat maps, one labelled tile per token.
    #[arg(long, value_name = "MAPS.png")]
    out: PathBuf,
}

pub fn run_attention(a: AttentionArgs) -> anyhow::Result<()> {
    let (sd, id) = load_model(&a.model, false, None)?;
    let inv = artifact::load(&a.inversion, &sd.device)?;
    if inv.model_id != id {
        anyhow::bail!(
            "this inversion was made with another model; invert the image again with this model"
        );
    }
    ensure_not_input(&a.out, &[&a.inversion])?;
    let prompt = a
        .prompt
        .clone()
        .unwrap_or_else(|| inv.source_prompt.clone());
    let (image, maps) = sd.reconstruct_with_maps(&inv, &prompt)?;
    let ids = sd.tokenizer.encode_untruncated(&prompt)?;
    let shown = ids.len().min(maps.dim(1)?);
    let labels: Vec<String> = ids[..shown]
        .iter()
        .enumerate()
        .map(|(k, &t)| match k {
            0 => "<start>".to_string(),
            k if k + 1 == ids.len() => "<end>".to_string(),
            _ => sd.tokenizer.decode_token(t),
        })
        .collect();
    let q = maps.dim(0)?;
    let side = (q as f64).sqrt().round() as usize;
    let grid = if side * side == q {
        (side, side)
    } else {
        (1, q)
    };
    let sheet =
        stylediff::viz::attention_sheet(&image, &maps.narrow(1, 0, shown)?, grid, &labels, 96)?;
    save_png(&a.out, &sheet)?;
    eprintln!(
        "wrote {} ({} tokens, {}x{} maps)",
        a.out.display(),
        shown,
        grid.0,
        grid.1
    );
    Ok(())
}

/// input | reconstruction | edit, labelled; small (toy) images enlarged to be seen.
fn comparison_row(
    input: &candle_core::Tensor,
    reconstruction: &candle_core::Tensor,
    edited: &candle_core::Tensor,
) -> anyhow::Result<image::RgbImage> {
    Ok(stylediff::viz::labelled_row(
        &[input, reconstruction, edited],
        &["input", "reconstruction", "edit"],
        128,
    )?)
}
