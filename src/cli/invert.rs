//! `invert`, `edit` and `run`: inversion to an artifact, editing from one, or both in one go.

use std::path::{Path, PathBuf};

use anyhow::Context;
use stylediff::edit::{EditMode, EditSettings};
use stylediff::invert::artifact;
use stylediff::invert::{AttentionPairing, Inversion, InversionSettings, Method};
use stylediff::model::ModelLocation;
use stylediff::outputs::OutputPlan;
use stylediff::outputs::edit_record;
use stylediff::util::save_image_with_settings;
use stylediff::{Editor, Monitor};

use super::{ModelArgs, PhaseBar};

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
pub(super) fn model_inputs(
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

pub(super) fn load_editor(
    location: &ModelLocation,
    model: &ModelArgs,
    method: Option<Method>,
    image_encoder: Option<PathBuf>,
) -> anyhow::Result<Editor> {
    let mut opts = model.load_options()?;
    opts.image_encoder = method == Some(Method::StyleDiffusion);
    opts.image_encoder_path = image_encoder;
    Ok(Editor::load_from(location, &opts)?)
}

/// Inverts an already decoded photo with a progress bar.
fn do_invert(
    editor: &Editor,
    prompt: &str,
    settings: &InversionSettings,
    rgb: &image::RgbImage,
) -> anyhow::Result<Inversion> {
    let mut view = PhaseBar::new((0..settings.steps).map(|i| settings.inner_at(i)).collect());
    let inv = editor.invert(rgb, prompt, settings, &mut Monitor::new(|p| view.update(p)));
    view.finish();
    let inv = inv?;
    eprintln!(
        "{} inversion: reconstruction PSNR {:.2} dB (against the VAE reconstruction)",
        settings.method.name(),
        inv.recon_psnr
    );
    Ok(inv)
}

/// Runs an edit and writes its image (and grid) with the settings embedded; the paths were checked by the
/// caller's plan.
fn do_edit(
    editor: &Editor,
    inv: &Inversion,
    settings: &EditSettings,
    o: &EditOptions,
) -> anyhow::Result<()> {
    let mut view = PhaseBar::new(Vec::new());
    let out = editor.edit(inv, settings, &mut Monitor::new(|p| view.update(p)));
    view.finish();
    let out = out?;
    let record = edit_record(inv, settings);
    save_image_with_settings(&o.out, &out.edited_image()?, &record)?;
    if let Some(path) = &o.grid {
        let grid = stylediff::viz::comparison_row(&inv.image, &out.reconstruction, &out.edited)?;
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

/// What an inversion needs once its paths are planned, cheapest first: the decoded photo, the model, the prompt
/// and settings checked.
fn prepare_inversion(
    model: &ModelArgs,
    o: &InvertOptions,
    settings: &InversionSettings,
    location: &ModelLocation,
    encoder: Option<PathBuf>,
) -> anyhow::Result<(Editor, image::RgbImage)> {
    let rgb = stylediff::image_io::load_rgb(&o.image)?;
    super::warn_if_not_toy(model, &o.image, &rgb);
    let editor = load_editor(location, model, Some(settings.method), encoder)?;
    editor.check_inversion(&o.prompt, settings)?;
    Ok((editor, rgb))
}

pub fn run_invert(a: InvertArgs) -> anyhow::Result<()> {
    let settings = inversion_settings(&a.invert)?;
    let mut plan = OutputPlan::new();
    plan.input("input image (--image)", &a.invert.image)?;
    let (folder, encoder) = model_inputs(&mut plan, &a.model, a.invert.image_encoder.as_ref())?;
    artifact_outputs(&mut plan, "artifact (--out)", &a.out)?;
    plan.check_writable()?;
    let (editor, rgb) = prepare_inversion(&a.model, &a.invert, &settings, &folder, encoder)?;
    let inv = do_invert(&editor, &a.invert.prompt, &settings, &rgb)?;
    artifact::save(&inv, &a.out)?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

/// An artifact read for this model, checked against it (the error names the file).
fn load_inversion(editor: &Editor, path: &Path) -> anyhow::Result<Inversion> {
    let inv = artifact::load(path, &editor.model().device)?;
    inv.check_fits(editor.model())
        .with_context(|| format!("{}", path.display()))?;
    Ok(inv)
}

pub fn run_edit(a: EditArgs) -> anyhow::Result<()> {
    let settings = edit_settings(&a.edit)?;
    let mut plan = OutputPlan::new();
    plan.input("inversion (--inversion)", &a.inversion)?;
    plan.input("inversion metadata", &artifact::sidecar(&a.inversion))?;
    let (folder, _) = model_inputs(&mut plan, &a.model, None)?;
    edit_outputs(&mut plan, &a.edit)?;
    plan.check_writable()?;
    let editor = load_editor(&folder, &a.model, None, None)?;
    let inv = load_inversion(&editor, &a.inversion)?;
    editor.check_edit(&inv.source_prompt, inv.settings.steps, &settings)?;
    do_edit(&editor, &inv, &settings, &a.edit)
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
    let (editor, rgb) = prepare_inversion(&a.model, &a.invert, &settings, &folder, encoder)?;
    // Every word of the edit against both prompts, before the (long) inversion.
    editor.check_edit(&a.invert.prompt, settings.steps, &edit)?;
    let inv = do_invert(&editor, &a.invert.prompt, &settings, &rgb)?;
    if let Some(p) = &a.save_inversion {
        artifact::save(&inv, p)?;
        eprintln!("wrote {}", p.display());
    }
    if let Err(e) = do_edit(&editor, &inv, &edit, &a.edit) {
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
    let editor = load_editor(&folder, &a.model, None, None)?;
    let inv = load_inversion(&editor, &a.inversion)?;
    if let Some(p) = &a.prompt {
        editor.model().tokenizer.check_length(p)?;
    }
    let mut view = PhaseBar::new(Vec::new());
    let maps = editor.attention_maps(
        &inv,
        a.prompt.as_deref(),
        &mut Monitor::new(|p| view.update(p)),
    );
    view.finish();
    let maps = maps?;
    let record = serde_json::json!({
        "kind": "attention",
        "prompt": a.prompt.as_deref().unwrap_or(&inv.source_prompt),
        "inversion": inv.settings,
        "model_id": inv.model_id,
        "image_sha256": inv.image_sha256,
        "stylediff_version": env!("CARGO_PKG_VERSION"),
    });
    save_image_with_settings(&a.out, &maps.sheet(96)?, &record)?;
    eprintln!(
        "wrote {} ({} tokens, {}x{} maps)",
        a.out.display(),
        maps.labels.len(),
        maps.grid.0,
        maps.grid.1
    );
    Ok(())
}
