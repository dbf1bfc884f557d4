use std::path::PathBuf;

use stylediff::model::weights::WeightFiles;
use stylediff::model::{ComponentKind, ModelLocation, single_file};

#[derive(clap::Args)]
pub struct InspectArgs {
    /// Stable Diffusion folder in the diffusers layout, or a hub id in the local Hugging Face cache (default: the
    /// bundled toy model).
    #[arg(long, value_name = "DIR|ORG/NAME")]
    model: Option<PathBuf>,
    /// A separate CLIP image encoder (folder or hub id) to check as well (default: <model>/image_encoder when
    /// present).
    #[arg(long, value_name = "DIR|ORG/NAME")]
    image_encoder: Option<PathBuf>,
    /// For a single-file --model: the diffusers folder or hub id whose configs describe it (default:
    /// stable-diffusion-v1-5/stable-diffusion-v1-5).
    #[arg(long, value_name = "DIR|ORG/NAME")]
    config: Option<PathBuf>,
    /// Fetch what a hub id needs into the Hugging Face cache when it is missing there.
    #[arg(long)]
    download: bool,
}

fn human(n: usize) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2} G", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2} M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1} k", n as f64 / 1e3),
        n => n.to_string(),
    }
}

pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    let location =
        super::resolve_location(args.model.as_ref(), args.config.as_ref(), args.download)?;
    let root = location.config_root();
    let single = match &location {
        ModelLocation::SingleFile { file, .. } => Some(file.clone()),
        ModelLocation::Folder(_) => None,
    };
    let image_encoder = args
        .image_encoder
        .as_ref()
        .map(|p| {
            stylediff::model::source::resolve(
                &p.to_string_lossy(),
                stylediff::model::source::RepoKind::ImageEncoder,
                args.download,
            )
            .map(|(dir, _)| dir)
        })
        .transpose()?;
    let mut problems: Vec<String> = Vec::new();
    match &single {
        Some(file) => println!(
            "single-file checkpoint: {} (configs from {})",
            file.display(),
            root.display()
        ),
        None => println!("model folder: {}", root.display()),
    }
    match std::fs::read_to_string(root.join("model_index.json")) {
        Err(_) if single.is_some() => {}
        Ok(text) => {
            let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            println!(
                "  pipeline: {}",
                v.get("_class_name").and_then(|c| c.as_str()).unwrap_or("?")
            );
        }
        Err(e) => problems.push(format!("{}: {e}", root.join("model_index.json").display())),
    }

    let tok = root.join("tokenizer");
    match stylediff::model::tokenizer::ClipTokenizer::from_folder(&tok) {
        Ok(t) => println!(
            "  tokenizer: {} tokens, max length {}",
            t.vocab_size(),
            t.max_length()
        ),
        Err(e) => problems.push(e.to_string()),
    }
    let sched = root.join("scheduler").join("scheduler_config.json");
    match stylediff::model::scheduler::SchedulerConfig::load(&sched) {
        Ok(c) => println!(
            "  scheduler: {} -> sampled with DDIM ({} betas {}..{}, offset {}, {} prediction, {} spacing)",
            c.class_name.as_deref().unwrap_or("?"),
            c.beta_schedule,
            c.beta_start,
            c.beta_end,
            c.steps_offset,
            c.prediction_type,
            c.timestep_spacing
        ),
        Err(e) => problems.push(e.to_string()),
    }

    for kind in ComponentKind::ALL {
        let dir = match (kind, &image_encoder) {
            (ComponentKind::ImageEncoder, Some(p)) => p.clone(),
            _ => root.join(kind.folder_name()),
        };
        if kind == ComponentKind::ImageEncoder && !dir.is_dir() {
            println!(
                "  image_encoder: absent (StyleDiffusion needs one: pass --image-encoder DIR to invert)"
            );
            continue;
        }
        let config = dir.join("config.json");
        let in_file = single
            .as_ref()
            .filter(|_| kind != ComponentKind::ImageEncoder);
        let checked = (|| -> stylediff::Result<_> {
            let files = match in_file {
                Some(file) => WeightFiles::single(file)?,
                None => WeightFiles::find(&dir)?,
            };
            let full = files.catalog()?;
            // A single file holds every component: count and scan only this one's tensors.
            let prefix = in_file
                .and_then(|_| single_file::prefix(kind))
                .unwrap_or("");
            let mut catalog = full.clone();
            catalog.tensors.retain(|name, _| name.starts_with(prefix));
            let summary = (
                files.files.clone(),
                catalog.dtypes(),
                catalog.parameter_count(),
            );
            let audit = match in_file {
                Some(_) => kind.audit_single_file(&config, full)?,
                None => kind.audit(&config, catalog)?,
            };
            let mut mismatches: Vec<String> = audit.iter().map(ToString::to_string).collect();
            mismatches.extend(
                files
                    .non_finite()?
                    .into_iter()
                    .filter(|(name, _)| name.starts_with(prefix))
                    .map(|(name, bad)| {
                        format!("tensor `{name}` holds {bad} NaN or infinite values")
                    }),
            );
            Ok((summary, mismatches))
        })();
        match checked {
            Ok(((files, dtypes, params), mismatches)) => {
                let names: Vec<String> = files
                    .iter()
                    .map(|f| {
                        f.file_name()
                            .unwrap_or_default()
                            .to_string_lossy()
                            .to_string()
                    })
                    .collect();
                let dtypes: Vec<String> = dtypes.into_iter().collect();
                println!(
                    "  {}: {} parameters, dtype {}, {} [{}]",
                    kind.folder_name(),
                    human(params),
                    dtypes.join("+"),
                    names.join(", "),
                    if mismatches.is_empty() {
                        "ok".to_string()
                    } else {
                        format!("{} problems", mismatches.len())
                    }
                );
                let place = in_file.unwrap_or(&dir).display().to_string();
                problems.extend(mismatches.iter().map(|m| format!("{place}: {m}")));
            }
            Err(e) => problems.push(e.to_string()),
        }
    }
    if problems.is_empty() {
        println!("all tensors match the architecture and hold finite values");
        Ok(())
    } else {
        eprintln!("{} problem(s):", problems.len());
        for p in &problems {
            eprintln!("  - {p}");
        }
        anyhow::bail!("the model folder does not match its configs or holds broken weights")
    }
}
