//! `invert`, `edit` and `run`: inversion to an artifact, editing from one, or both in one go.

use std::path::{Path, PathBuf};

use anyhow::Context;
use stylediff::edit::{EditMode, EditSettings};
use stylediff::invert::artifact;
use stylediff::invert::{AttentionPairing, Inversion, InversionSettings, Method};
use stylediff::model::{ModelLocation, StableDiffusion};
use stylediff::outputs::OutputPlan;
use stylediff::outputs::edit_record;
use stylediff::util::{image_to_tensor, save_image, save_image_with_settings, tensor_to_image};

use super::{ModelArgs, progress_bar};

#[derive(clap::Args, Clone)]
pub struct InvertOptions {
    /// The photo to edit (any size, aspect and mode; centre-cropped and resized to the model's native size).
    #[arg(long, value_name = "IMG")]
    pub image: PathBuf,
    /// A prompt that describes the photo, e.g. "a cat sitting next to a mirror".
    #[arg(long)]
    pub prompt: String,
    /// Inversion method.
    #[arg(long, value_enum, default_value_t = Method::StyleDiffusion)]
    pub method: Method,
    /// DDIM steps (the authors' script uses 30, SD's default is 50).
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Inner optimisation iterations K at step 0 (StyleDiffusion: K_i = ceil(K e^-0.1i), default 100;
    /// null-text: K every step, default 10).
    #[arg(long)]
    pub inner_steps: Option<usize>,
    /// Classifier-free guidance scale used for inversion and editing.
    #[arg(long, default_value_t = 7.5, allow_negative_numbers = true)]
    pub guidance: f64,
    /// Weight of StyleDiffusion's attention regularisation (0 turns it off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub attention_weight: f64,
    /// Which DDIM-inversion maps regularise step i: authors (recorded one step earlier on the same latent, as
    /// the authors' code) or same-timestep.
    #[arg(long, value_enum, default_value_t = AttentionPairing::Authors)]
    pub attention_pairing: AttentionPairing,
    /// CLIP image encoder (folder or hub id, e.g. openai/clip-vit-base-patch16) when the model has no
    /// image_encoder/ (StyleDiffusion only).
    #[arg(long, value_name = "DIR|ORG/NAME")]
    pub image_encoder: Option<PathBuf>,
}

#[derive(clap::Args, Clone)]
pub struct EditOptions {
    /// The target prompt, e.g. "a tiger sitting next to a mirror".
    #[arg(long)]
    pub target: String,
    /// Prompt-to-Prompt mode: auto replaces when both prompts have as many words, else refines.
    #[arg(long, value_enum, default_value_t = EditMode::Auto)]
    pub mode: EditMode,
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
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true)]
    pub tau_v: f64,
    /// Fraction of steps with cross-attention replacement.
    #[arg(long, default_value_t = 0.6, allow_negative_numbers = true)]
    pub tau_c: f64,
    /// Fraction of steps with self-attention injection (conditional branch).
    #[arg(long, default_value_t = 0.6, allow_negative_numbers = true)]
    pub tau_s: f64,
    /// Fraction of steps with self-attention injection in the unconditional branch (P2Plus; .5 for large
    /// structural changes).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub tau_u: f64,
    /// Output image; its extension picks the format: .png, .jpg/.jpeg or .webp.
    #[arg(long, value_name = "IMG.png")]
    pub out: PathBuf,
    /// Also write input | reconstruction | edit side by side (format by extension, as --out).
    #[arg(long, value_name = "GRID.png")]
    pub grid: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct InvertArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    invert: InvertOptions,
    /// The inversion artifact to write (*.safetensors; its metadata also goes to <name>.safetensors.json).
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
    /// Keep the inversion artifact here too (*.safetensors; without it, a failed edit still keeps the
    /// inversion, beside --out, and says where).
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
                .trim()
                .parse()
                .with_context(|| format!("{flag} {s:?}: {v:?} is not a number"))?;
            Ok((w.trim().to_string(), v))
        })
        .collect()
}

/// The edit as the library takes it, every number and word list checked (words against prompts come later,
/// once the tokenizer is loaded, still before any network runs).
pub fn edit_settings(o: &EditOptions) -> anyhow::Result<EditSettings> {
    let mut s = EditSettings::new(o.target.clone());
    s.mode = o.mode;
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
    s.validate()?;
    Ok(s)
}

/// The inversion settings, every number checked.
pub fn inversion_settings(o: &InvertOptions) -> anyhow::Result<InversionSettings> {
    let mut settings = InversionSettings::new(o.method);
    settings.steps = o.steps;
    if let Some(k) = o.inner_steps {
        settings.inner_steps = k;
    }
    settings.guidance = o.guidance;
    settings.attention_weight = o.attention_weight;
    settings.pairing = o.attention_pairing;
    settings.validate()?;
    Ok(settings)
}

/// The model folder (and a separate image encoder) as inputs: nothing may be written inside them. Hub ids are
/// resolved here, before any work.
fn model_inputs(
    plan: &mut OutputPlan,
    model: &ModelArgs,
    image_encoder: Option<&PathBuf>,
) -> anyhow::Result<(ModelLocation, Option<PathBuf>)> {
    let folder = model.location()?;
    super::plan_model_inputs(plan, &folder)?;
    let encoder = model.image_encoder(image_encoder)?;
    if let Some(enc) = &encoder {
        plan.input_folder("image encoder folder", enc)?;
    }
    Ok((folder, encoder))
}

fn load_model(
    location: &ModelLocation,
    model: &ModelArgs,
    needs_image_encoder: bool,
    image_encoder: Option<PathBuf>,
) -> anyhow::Result<(StableDiffusion, String)> {
    let mut opts = model.load_options()?;
    opts.image_encoder = needs_image_encoder;
    opts.image_encoder_path = image_encoder;
    let sd = StableDiffusion::load_from(location, &opts)?;
    Ok((sd, location.identity()?))
}

/// Inverts an already decoded photo (`rgb`, read from `o.image`).
pub fn do_invert(
    sd: &StableDiffusion,
    model_id: &str,
    o: &InvertOptions,
    settings: &InversionSettings,
    rgb: image::RgbImage,
) -> anyhow::Result<Inversion> {
    let rgb = stylediff::image_io::square(&o.image, rgb, sd.native_size())?;
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
        settings,
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
        settings.method.name(),
        inv.recon_psnr
    );
    Ok(inv)
}

fn ensure_same_model(inv: &Inversion, model_id: &str) -> anyhow::Result<()> {
    if inv.model_id != model_id {
        anyhow::bail!(
            "this inversion was made with another model (model id {}…, this model {}…); invert the image again with this model",
            &inv.model_id.get(..12).unwrap_or(&inv.model_id),
            &model_id.get(..12).unwrap_or(model_id)
        );
    }
    Ok(())
}

/// Runs an edit and writes its image (and grid); the paths were checked by the caller's plan.
pub fn do_edit(
    sd: &StableDiffusion,
    inv: &Inversion,
    settings: &EditSettings,
    o: &EditOptions,
) -> anyhow::Result<()> {
    let bar = progress_bar(inv.settings.steps as u64, "editing");
    let out = sd.edit(inv, settings, &mut |i, _| bar.set_position(i as u64))?;
    bar.finish_and_clear();
    let edited = tensor_to_image(&out.edited)?;
    let grid = match &o.grid {
        Some(_) => Some(comparison_row(
            &inv.image,
            &out.reconstruction,
            &out.edited,
        )?),
        None => None,
    };
    let record = edit_record(inv, settings);
    save_image_with_settings(&o.out, &edited, &record)?;
    if let (Some(path), Some(grid)) = (&o.grid, grid) {
        save_image_with_settings(path, &grid, &record)?;
    }
    eprintln!("wrote {}", o.out.display());
    Ok(())
}

fn edit_outputs(plan: &mut OutputPlan, o: &EditOptions) -> anyhow::Result<()> {
    plan.image_output("output image (--out)", &o.out)?;
    if let Some(g) = &o.grid {
        plan.image_output("grid (--grid)", g)?;
    }
    Ok(())
}

fn artifact_outputs(plan: &mut OutputPlan, what: &str, path: &Path) -> anyhow::Result<()> {
    if path.extension().is_none_or(|e| e != "safetensors") {
        anyhow::bail!(
            "{}: the inversion artifact ({what}) is a safetensors file; name it *.safetensors",
            path.display()
        );
    }
    plan.output(what, path)?;
    plan.output(&format!("metadata of {what}"), &artifact::sidecar(path))?;
    Ok(())
}

/// What an inversion needs once its paths are planned, cheapest first: the decoded photo, the model, the prompt's
/// length checked.
fn prepare_inversion(
    model: &ModelArgs,
    o: &InvertOptions,
    settings: &InversionSettings,
    location: &ModelLocation,
    encoder: Option<PathBuf>,
) -> anyhow::Result<(StableDiffusion, String, image::RgbImage)> {
    let rgb = stylediff::image_io::load_rgb(&o.image)?;
    super::warn_if_not_toy(model, &o.image, &rgb);
    let needs = settings.method == Method::StyleDiffusion;
    let (sd, id) = load_model(location, model, needs, encoder)?;
    sd.tokenizer.check_length(&o.prompt)?;
    Ok((sd, id, rgb))
}

pub fn run_invert(a: InvertArgs) -> anyhow::Result<()> {
    let settings = inversion_settings(&a.invert)?;
    let mut plan = OutputPlan::new();
    plan.input("input image (--image)", &a.invert.image)?;
    let (folder, encoder) = model_inputs(&mut plan, &a.model, a.invert.image_encoder.as_ref())?;
    artifact_outputs(&mut plan, "artifact (--out)", &a.out)?;
    plan.check_writable()?;
    let (sd, id, rgb) = prepare_inversion(&a.model, &a.invert, &settings, &folder, encoder)?;
    let inv = do_invert(&sd, &id, &a.invert, &settings, rgb)?;
    artifact::save(&inv, &a.out)?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

pub fn run_edit(a: EditArgs) -> anyhow::Result<()> {
    let settings = edit_settings(&a.edit)?;
    let mut plan = OutputPlan::new();
    plan.input("inversion (--inversion)", &a.inversion)?;
    plan.input("inversion metadata", &artifact::sidecar(&a.inversion))?;
    let (folder, _) = model_inputs(&mut plan, &a.model, None)?;
    edit_outputs(&mut plan, &a.edit)?;
    plan.check_writable()?;
    let (sd, id) = load_model(&folder, &a.model, false, None)?;
    let inv = artifact::load(&a.inversion, &sd.device)?;
    ensure_same_model(&inv, &id)?;
    sd.check_inversion(&inv)
        .with_context(|| format!("{}", a.inversion.display()))?;
    sd.check_edit(&inv.source_prompt, inv.settings.steps, &settings)?;
    do_edit(&sd, &inv, &settings, &a.edit)
}

/// A path beside `near` that does not exist yet, for keeping work a failed step would otherwise lose.
fn fresh_path(near: &Path, suffix: &str) -> PathBuf {
    let base = near
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .to_string();
    (0..)
        .map(|k| {
            let name = if k == 0 {
                format!("{base}{suffix}")
            } else {
                format!("{base}.{k}{suffix}")
            };
            near.with_file_name(name)
        })
        .find(|p| !p.exists() && !artifact::sidecar(p).exists())
        .expect("some name is free")
}

pub fn run_run(a: RunArgs) -> anyhow::Result<()> {
    let settings = inversion_settings(&a.invert)?;
    let edit = edit_settings(&a.edit)?;
    let mut plan = OutputPlan::new();
    plan.input("input image (--image)", &a.invert.image)?;
    let (folder, encoder) = model_inputs(&mut plan, &a.model, a.invert.image_encoder.as_ref())?;
    edit_outputs(&mut plan, &a.edit)?;
    if let Some(p) = &a.save_inversion {
        artifact_outputs(&mut plan, "artifact (--save-inversion)", p)?;
    }
    plan.check_writable()?;
    let (sd, id, rgb) = prepare_inversion(&a.model, &a.invert, &settings, &folder, encoder)?;
    // Every word of the edit against both prompts, before the (long) inversion.
    sd.check_edit(&a.invert.prompt, settings.steps, &edit)?;
    let inv = do_invert(&sd, &id, &a.invert, &settings, rgb)?;
    if let Some(p) = &a.save_inversion {
        artifact::save(&inv, p)?;
        eprintln!("wrote {}", p.display());
    }
    if let Err(e) = do_edit(&sd, &inv, &edit, &a.edit) {
        let kept = match &a.save_inversion {
            Some(p) => p.clone(),
            None => {
                let p = fresh_path(&a.edit.out, ".inversion.safetensors");
                artifact::save(&inv, &p)?;
                p
            }
        };
        return Err(e.context(format!(
            "the edit failed; the inversion is kept in {} (retry with `stylediff edit --inversion {}`)",
            kept.display(),
            kept.display()
        )));
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct BatchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// An authors' CSV (stylediffusion_editing*.csv to invert and edit, stylediffusion_prompts*.csv to invert).
    #[arg(long, value_name = "FILE.csv")]
    csv: PathBuf,
    /// Where each case's artifact and edits go, with results.csv (rewritten after every case).
    #[arg(long, value_name = "DIR", default_value = "stylediff-batch")]
    out_dir: PathBuf,
    /// Inversion method.
    #[arg(long, value_enum, default_value_t = Method::StyleDiffusion)]
    method: Method,
    /// DDIM steps.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Inner optimisation iterations K (as for `invert`).
    #[arg(long)]
    inner_steps: Option<usize>,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = 7.5, allow_negative_numbers = true)]
    guidance: f64,
    /// CLIP image encoder (folder or hub id) when the model has no image_encoder/ (StyleDiffusion only).
    #[arg(long, value_name = "DIR|ORG/NAME")]
    image_encoder: Option<PathBuf>,
}

/// One line of results.csv.
#[derive(serde::Serialize)]
struct ResultRow {
    case: String,
    variant: String,
    prompt: String,
    target: String,
    method: String,
    recon_psnr: String,
    status: String,
    output: String,
}

/// What a finished edit records beside its image, so a rerun can prove the image matches its inputs.
#[derive(serde::Serialize, serde::Deserialize, PartialEq)]
struct EditRecord {
    fingerprint: String,
    image_sha256: String,
    settings: serde_json::Value,
}

fn write_results(path: &Path, rows: &[ResultRow]) -> anyhow::Result<()> {
    let mut w = csv::Writer::from_writer(Vec::new());
    for r in rows {
        w.serialize(r)?;
    }
    stylediff::util::write_atomic(path, &w.into_inner()?)?;
    Ok(())
}

fn bytes_sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    stylediff::image_io::hex(&sha2::Sha256::digest(bytes))
}

/// The finished edit at `out`, when its record proves it was made from this inversion with these settings.
fn edit_is_current(out: &Path, fingerprint: &str) -> bool {
    let record = artifact::sidecar(out);
    let (Ok(text), Ok(png)) = (std::fs::read_to_string(&record), std::fs::read(out)) else {
        return false;
    };
    serde_json::from_str::<EditRecord>(&text)
        .is_ok_and(|r| r.fingerprint == fingerprint && r.image_sha256 == bytes_sha256(&png))
}

pub fn run_batch(a: BatchArgs) -> anyhow::Result<()> {
    // The options of every case's inversion; each case fills in its photo and prompt.
    let template = InvertOptions {
        image: PathBuf::new(),
        prompt: String::new(),
        method: a.method,
        steps: a.steps,
        inner_steps: a.inner_steps,
        guidance: a.guidance,
        attention_weight: 1.0,
        attention_pairing: AttentionPairing::Authors,
        image_encoder: None,
    };
    let settings = inversion_settings(&template)?;
    let cases = stylediff::batch::read_csv(&a.csv)?;
    // Every path of every case is planned and checked before any work.
    let mut plan = OutputPlan::new();
    plan.input("CSV (--csv)", &a.csv)?;
    let (folder, encoder) = model_inputs(&mut plan, &a.model, a.image_encoder.as_ref())?;
    for case in &cases {
        plan.input(&format!("image of case {}", case.case), &case.image)?;
    }
    let results_path = a.out_dir.join("results.csv");
    plan.output("results table", &results_path)?;
    for case in &cases {
        let dir = a.out_dir.join(format!("case_{}", case.case));
        artifact_outputs(
            &mut plan,
            &format!("inversion of case {}", case.case),
            &dir.join("inversion.safetensors"),
        )?;
        for (variant, _) in &case.edits {
            for kind in ["edit", "grid"] {
                let p = dir.join(format!("{kind}_{variant}.png"));
                plan.image_output(&format!("{kind} {variant} of case {}", case.case), &p)?;
            }
            plan.output(
                &format!("record of edit {variant} of case {}", case.case),
                &artifact::sidecar(&dir.join(format!("edit_{variant}.png"))),
            )?;
        }
    }
    plan.check_writable()?;
    let mut problems = Vec::new();
    let mut photos = Vec::new();
    for case in &cases {
        match stylediff::image_io::load_rgb(&case.image) {
            Ok(rgb) => {
                super::warn_if_not_toy(&a.model, &case.image, &rgb);
                photos.push(Some(rgb))
            }
            Err(e) => {
                problems.push(format!("case {}: {e}", case.case));
                photos.push(None);
            }
        }
    }
    let needs = settings.method == Method::StyleDiffusion;
    let (sd, id) = load_model(&folder, &a.model, needs, encoder)?;
    for case in &cases {
        if let Err(e) = sd.tokenizer.check_length(&case.prompt) {
            problems.push(format!("case {}: {e}", case.case));
        }
        for (variant, edit) in &case.edits {
            if let Err(e) = sd.check_edit(&case.prompt, settings.steps, edit) {
                problems.push(format!("case {} edit {variant}: {e}", case.case));
            }
        }
    }
    if !problems.is_empty() {
        anyhow::bail!(
            "{}: {} problem(s), nothing was run:\n  - {}",
            a.csv.display(),
            problems.len(),
            problems.join("\n  - ")
        );
    }

    let mut rows: Vec<ResultRow> = Vec::new();
    let (mut done, mut skipped, mut failed) = (0usize, 0usize, 0usize);
    let jobs: usize = cases.iter().map(|c| 1 + c.edits.len()).sum();
    let bar = progress_bar(jobs as u64, "batch");
    let report = |bar: &indicatif::ProgressBar, line: String| bar.suspend(|| eprintln!("{line}"));
    for (case, rgb) in cases.iter().zip(photos) {
        let rgb = rgb.expect("decoded above");
        let dir = a.out_dir.join(format!("case_{}", case.case));
        let inv_path = dir.join("inversion.safetensors");
        let row =
            |variant: &str, target: &str, psnr: String, status: String, output: String| ResultRow {
                case: case.case.clone(),
                variant: variant.into(),
                prompt: case.prompt.clone(),
                target: target.into(),
                method: a.method.name().to_string(),
                recon_psnr: psnr,
                status,
                output,
            };
        let image_sha = stylediff::image_io::file_sha256(&case.image)?;
        let previous = artifact::load(&inv_path, &sd.device).ok().filter(|inv| {
            inv.model_id == id
                && inv.image_sha256 == image_sha
                && inv.source_prompt == case.prompt
                && inv.settings == settings
                && sd.check_inversion(inv).is_ok()
        });
        let inv = match previous {
            Some(inv) => {
                skipped += 1;
                rows.push(row(
                    "inversion",
                    "",
                    format!("{:.2}", inv.recon_psnr),
                    "skipped (done before with the same inputs)".into(),
                    inv_path.display().to_string(),
                ));
                inv
            }
            None => {
                let o = InvertOptions {
                    image: case.image.clone(),
                    prompt: case.prompt.clone(),
                    ..template.clone()
                };
                let result = bar.suspend(|| do_invert(&sd, &id, &o, &settings, rgb));
                match result.and_then(|inv| {
                    artifact::save(&inv, &inv_path)
                        .map(|_| inv)
                        .map_err(Into::into)
                }) {
                    Ok(inv) => {
                        done += 1;
                        rows.push(row(
                            "inversion",
                            "",
                            format!("{:.2}", inv.recon_psnr),
                            "done".into(),
                            inv_path.display().to_string(),
                        ));
                        inv
                    }
                    Err(e) => {
                        failed += 1 + case.edits.len();
                        report(&bar, format!("case {}: inversion failed: {e:#}", case.case));
                        rows.push(row(
                            "inversion",
                            "",
                            String::new(),
                            format!("failed: {e:#}"),
                            String::new(),
                        ));
                        write_results(&results_path, &rows)?;
                        bar.inc(1 + case.edits.len() as u64);
                        continue;
                    }
                }
            }
        };
        bar.inc(1);
        let inversion_sha = stylediff::image_io::file_sha256(&inv_path)?;
        for (variant, edit) in &case.edits {
            let out = dir.join(format!("edit_{variant}.png"));
            let fingerprint =
                stylediff::batch::fingerprint(&(&inversion_sha, edit, env!("CARGO_PKG_VERSION")));
            let psnr = format!("{:.2}", inv.recon_psnr);
            if edit_is_current(&out, &fingerprint) {
                skipped += 1;
                rows.push(row(
                    variant,
                    &edit.target,
                    psnr,
                    "skipped (done before with the same inputs)".into(),
                    out.display().to_string(),
                ));
                bar.inc(1);
                continue;
            }
            let result = sd
                .edit(&inv, edit, &mut |_, _| {})
                .map_err(anyhow::Error::from)
                .and_then(|e| {
                    let edited = tensor_to_image(&e.edited)?;
                    let grid = comparison_row(&inv.image, &e.reconstruction, &e.edited)?;
                    let settings = edit_record(&inv, edit);
                    save_image_with_settings(
                        &dir.join(format!("grid_{variant}.png")),
                        &grid,
                        &settings,
                    )?;
                    save_image_with_settings(&out, &edited, &settings)?;
                    let png = std::fs::read(&out)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;
                    let record = EditRecord {
                        fingerprint: fingerprint.clone(),
                        image_sha256: bytes_sha256(&png),
                        settings,
                    };
                    stylediff::util::write_atomic(
                        &artifact::sidecar(&out),
                        serde_json::to_string_pretty(&record)?.as_bytes(),
                    )?;
                    Ok(())
                });
            let status = match result {
                Ok(()) => {
                    done += 1;
                    "done".to_string()
                }
                Err(e) => {
                    failed += 1;
                    report(
                        &bar,
                        format!("case {} edit {variant}: failed: {e:#}", case.case),
                    );
                    format!("failed: {e:#}")
                }
            };
            rows.push(row(
                variant,
                &edit.target,
                psnr,
                status,
                out.display().to_string(),
            ));
            bar.inc(1);
        }
        write_results(&results_path, &rows)?;
    }
    bar.finish_and_clear();
    write_results(&results_path, &rows)?;
    eprintln!(
        "batch: {done} done, {skipped} skipped, {failed} failed (skipped: done before with the same inputs); table in {}",
        results_path.display()
    );
    if failed > 0 {
        anyhow::bail!(
            "{failed} of {jobs} jobs failed (see {})",
            results_path.display()
        );
    }
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
    let mut plan = OutputPlan::new();
    plan.input("inversion (--inversion)", &a.inversion)?;
    plan.input("inversion metadata", &artifact::sidecar(&a.inversion))?;
    let (folder, _) = model_inputs(&mut plan, &a.model, None)?;
    plan.image_output("heat-map sheet (--out)", &a.out)?;
    plan.check_writable()?;
    let (sd, id) = load_model(&folder, &a.model, false, None)?;
    let inv = artifact::load(&a.inversion, &sd.device)?;
    if inv.model_id != id {
        anyhow::bail!(
            "this inversion was made with another model; invert the image again with this model"
        );
    }
    sd.check_inversion(&inv)
        .with_context(|| format!("{}", a.inversion.display()))?;
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
    save_image(&a.out, &sheet)?;
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
