//! Where a model comes from: a folder in the diffusers layout, or a Hugging Face hub id (`org/name`, optionally
//! `@revision`) found in the standard local cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`). Offline by default: a missing file is an error that lists every missing file and
//! the command that fetches them; `download` (opt-in) fetches them with the `hf-hub` crate.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// A hub id as users write it: `org/name` or `org/name@revision` (branch, tag or commit; default `main`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubId {
    pub repo: String,
    pub revision: String,
}

impl HubId {
    /// `Some` when `text` has the shape of a hub id (two non-empty parts of letters, digits, `-`, `_`, `.`).
    pub fn parse(text: &str) -> Option<HubId> {
        let (repo, revision) = match text.split_once('@') {
            Some((r, rev)) if !rev.is_empty() => (r, rev),
            Some(_) => return None,
            None => (text, "main"),
        };
        let (org, name) = repo.split_once('/')?;
        let ok = |s: &str| {
            !s.is_empty()
                && !s.starts_with('.')
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        (ok(org) && ok(name)).then(|| HubId {
            repo: repo.to_string(),
            revision: revision.to_string(),
        })
    }

    fn display(&self) -> String {
        if self.revision == "main" {
            self.repo.clone()
        } else {
            format!("{}@{}", self.repo, self.revision)
        }
    }
}

/// The hub cache folder, as huggingface_hub finds it.
pub fn hub_cache_dir() -> PathBuf {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => hf_hub::Cache::from_env().path().clone(),
    }
}

/// What a repository must hold for stylediff to load it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepoKind {
    /// A Stable Diffusion pipeline in the diffusers layout.
    Pipeline,
    /// A CLIP image encoder (CLIPVisionModelWithProjection or a full CLIPModel).
    ImageEncoder,
    /// A pipeline's configs, tokenizer and scheduler only: what a single-file checkpoint is read with.
    Configs,
}

/// The files of a pipeline in the diffusers layout besides its weights; all but the first (model_index.json) are
/// also what a single-file checkpoint is read with.
const PIPELINE_FILES: [&str; 7] = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "text_encoder/config.json",
    "unet/config.json",
    "vae/config.json",
];

impl RepoKind {
    /// Files that must exist, and folders that must hold a safetensors weight file.
    fn requirements(
        self,
    ) -> (
        &'static [&'static str],
        &'static [(&'static str, &'static str)],
    ) {
        match self {
            RepoKind::Pipeline => (
                &PIPELINE_FILES,
                &[
                    ("text_encoder", "model.safetensors"),
                    ("unet", "diffusion_pytorch_model.safetensors"),
                    ("vae", "diffusion_pytorch_model.safetensors"),
                ],
            ),
            RepoKind::ImageEncoder => (&["config.json"], &[("", "model.safetensors")]),
            RepoKind::Configs => (&PIPELINE_FILES[1..], &[]),
        }
    }

    /// The files of a listing this kind needs: configs, tokenizer files, one safetensors weight file per
    /// component (the full-precision one, else a variant), and nothing else (no .bin, .ckpt, onnx or flax).
    pub fn select(self, listing: &[String]) -> Vec<String> {
        let (files, weights) = self.requirements();
        let mut chosen: Vec<String> = files
            .iter()
            .filter(|f| listing.iter().any(|l| l == *f))
            .map(|f| f.to_string())
            .collect();
        let listed = |f: &str| listing.iter().any(|l| l == f);
        let mut folders: Vec<(&str, &str)> = weights.to_vec();
        if self != RepoKind::ImageEncoder {
            // Tokenizer settings are read when present.
            for extra in [
                "tokenizer/tokenizer_config.json",
                "tokenizer/special_tokens_map.json",
            ] {
                if listed(extra) {
                    chosen.push(extra.to_string());
                }
            }
        }
        // A pipeline that ships its own image encoder: StyleDiffusion reads it.
        if self == RepoKind::Pipeline && listed("image_encoder/config.json") {
            chosen.push("image_encoder/config.json".to_string());
            folders.push(("image_encoder", "model.safetensors"));
        }
        for (folder, plain) in folders {
            let prefix = if folder.is_empty() {
                String::new()
            } else {
                format!("{folder}/")
            };
            let in_folder = |l: &&String| {
                l.strip_prefix(&prefix)
                    .is_some_and(|rest| !rest.contains('/') && rest.ends_with(".safetensors"))
            };
            let exact = format!("{prefix}{plain}");
            let pick = if listing.contains(&exact) {
                Some(exact)
            } else {
                listing.iter().filter(in_folder).min().cloned()
            };
            chosen.extend(pick);
        }
        chosen
    }
}

fn missing_files(folder: &Path, kind: RepoKind) -> Vec<String> {
    let (files, weights) = kind.requirements();
    let mut missing: Vec<String> = files
        .iter()
        .filter(|f| !folder.join(f).is_file())
        .map(|f| f.to_string())
        .collect();
    for (dir, plain) in weights {
        let d = folder.join(dir);
        let has_weights = std::fs::read_dir(&d).is_ok_and(|entries| {
            entries.filter_map(|e| e.ok()).any(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                name.ends_with(".safetensors") || name.ends_with(".safetensors.index.json")
            })
        });
        if !has_weights {
            missing.push(if dir.is_empty() {
                plain.to_string()
            } else {
                format!("{dir}/{plain}")
            });
        }
    }
    missing
}

/// The snapshot folder of `id` in `cache`, when its revision is known there (a ref, or a commit hash).
fn snapshot(cache: &Path, id: &HubId) -> Option<PathBuf> {
    let repo = cache.join(format!("models--{}", id.repo.replace('/', "--")));
    let commit = match std::fs::read_to_string(repo.join("refs").join(&id.revision)) {
        Ok(c) => c.trim().to_string(),
        Err(_) => id.revision.clone(),
    };
    let dir = repo.join("snapshots").join(commit);
    dir.is_dir().then_some(dir)
}

/// The local folder of a hub model, downloading what is missing when `download` is set.
pub fn resolve_hub(id: &HubId, kind: RepoKind, download: bool) -> Result<PathBuf> {
    let cache = hub_cache_dir();
    if let Some(dir) = snapshot(&cache, id)
        && missing_files(&dir, kind).is_empty()
    {
        return Ok(dir);
    }
    if download {
        return fetch(id, kind, &cache);
    }
    let missing = match snapshot(&cache, id) {
        Some(dir) => missing_files(&dir, kind),
        None => {
            let (files, weights) = kind.requirements();
            files
                .iter()
                .map(|f| f.to_string())
                .chain(weights.iter().map(|(d, f)| {
                    if d.is_empty() {
                        f.to_string()
                    } else {
                        format!("{d}/{f}")
                    }
                }))
                .collect()
        }
    };
    let revision = if id.revision == "main" {
        String::new()
    } else {
        format!(" --revision {}", id.revision)
    };
    Err(Error::invalid(
        "model",
        format!(
            "{} is not in the Hugging Face cache ({}); missing: {}.\nFetch them with\n  hf download {}{revision} {}\nor allow downloads (the command line's --download; stylediff never touches the network without it)",
            id.display(),
            cache.display(),
            missing.join(", "),
            id.repo,
            missing.join(" ")
        ),
    ))
}

fn fetch(id: &HubId, kind: RepoKind, cache: &Path) -> Result<PathBuf> {
    use hf_hub::api::sync::ApiBuilder;
    let net = |e: hf_hub::api::sync::ApiError| {
        Error::invalid(
            "model",
            format!(
                "downloading {} from the Hugging Face hub: {e}",
                id.display()
            ),
        )
    };
    let mut builder = ApiBuilder::from_env().with_cache_dir(cache.to_path_buf());
    if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
        builder = builder.with_endpoint(endpoint);
    }
    let api = builder.with_progress(true).build().map_err(net)?;
    let repo = api.repo(hf_hub::Repo::with_revision(
        id.repo.clone(),
        hf_hub::RepoType::Model,
        id.revision.clone(),
    ));
    let listing: Vec<String> = repo
        .info()
        .map_err(net)?
        .siblings
        .into_iter()
        .map(|s| s.rfilename)
        .collect();
    let wanted = kind.select(&listing);
    let mut folder = None;
    for f in &wanted {
        let path = repo.get(f).map_err(net)?;
        // The snapshot folder: the file's path less the file's own name within the repository.
        let mut dir = path.clone();
        for _ in f.split('/') {
            dir.pop();
        }
        folder = Some(dir);
    }
    let folder = folder.ok_or_else(|| {
        Error::invalid(
            "model",
            format!("{} holds none of the files stylediff reads", id.display()),
        )
    })?;
    let missing = missing_files(&folder, kind);
    if !missing.is_empty() {
        return Err(Error::invalid(
            "model",
            format!(
                "{} has no {} (stylediff reads safetensors weights in the diffusers layout)",
                id.display(),
                missing.join(", ")
            ),
        ));
    }
    Ok(folder)
}

/// The configs a single-file checkpoint is read with when none are given: Stable Diffusion v1.5's, as diffusers'
/// `from_single_file` does.
pub const DEFAULT_SINGLE_FILE_CONFIGS: &str = "stable-diffusion-v1-5/stable-diffusion-v1-5";

/// A pipeline as the user named it: a single-file checkpoint (`*.safetensors`, read with `configs`, a folder or
/// hub id, default [`DEFAULT_SINGLE_FILE_CONFIGS`]), a folder, or a hub id. The label says which.
pub fn resolve_pipeline(
    spec: &str,
    configs: Option<&str>,
    download: bool,
) -> Result<(crate::model::ModelLocation, String)> {
    let path = PathBuf::from(spec);
    if path.is_file() {
        if !spec.ends_with(".safetensors") {
            return Err(Error::file(
                &path,
                "a single-file checkpoint is read only as .safetensors (convert .ckpt first); a model folder or hub id also works",
            ));
        }
        let names = crate::model::weights::WeightFiles::single(&path)?.catalog()?;
        if !crate::model::single_file::is_single_file(names.tensors.keys()) {
            return Err(Error::file(
                &path,
                "not a single-file Stable Diffusion checkpoint (no `model.diffusion_model.*` tensors)",
            ));
        }
        let spec_configs = configs.unwrap_or(DEFAULT_SINGLE_FILE_CONFIGS);
        let (dir, label) = resolve(spec_configs, RepoKind::Configs, download)?;
        return Ok((
            crate::model::ModelLocation::SingleFile {
                file: path,
                configs: dir,
            },
            format!("{spec} (single file, configs of {label})"),
        ));
    }
    if configs.is_some() {
        return Err(Error::invalid(
            "config",
            "configs are given only for a single-file checkpoint; a model folder or hub id has its own",
        ));
    }
    let (dir, label) = resolve(spec, RepoKind::Pipeline, download)?;
    Ok((crate::model::ModelLocation::Folder(dir), label))
}

/// A model as the user named it: a path that exists is used as it is; otherwise a hub id is looked up in the
/// cache. The label says which, for the "using model ..." line every command prints.
pub fn resolve(spec: &str, kind: RepoKind, download: bool) -> Result<(PathBuf, String)> {
    let path = PathBuf::from(spec);
    if path.exists() {
        return Ok((path, spec.to_string()));
    }
    match HubId::parse(spec) {
        Some(id) => {
            let dir = resolve_hub(&id, kind, download)?;
            Ok((dir, format!("{} (hub)", id.display())))
        }
        None => Err(Error::file(
            &path,
            "no such model folder or file (a Hugging Face hub id looks like org/name or org/name@revision)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_told_from_paths() {
        assert_eq!(
            HubId::parse("stable-diffusion-v1-5/stable-diffusion-v1-5@fp16"),
            Some(HubId {
                repo: "stable-diffusion-v1-5/stable-diffusion-v1-5".into(),
                revision: "fp16".into()
            })
        );
        assert_eq!(
            HubId::parse("openai/clip-vit-base-patch16")
                .unwrap()
                .revision,
            "main"
        );
        for not_an_id in [
            "model",
            "a/b/c",
            "/abs/path",
            "./x/y",
            "a/",
            "org/name@",
            "../a",
        ] {
            assert_eq!(HubId::parse(not_an_id), None, "{not_an_id}");
        }
    }

    #[test]
    fn downloads_pick_safetensors_configs_and_tokenizer_only() {
        let listing: Vec<String> = [
            "model_index.json",
            "scheduler/scheduler_config.json",
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
            "tokenizer/tokenizer_config.json",
            "text_encoder/config.json",
            "text_encoder/model.safetensors",
            "text_encoder/model.fp16.safetensors",
            "text_encoder/pytorch_model.bin",
            "unet/config.json",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "unet/diffusion_pytorch_model.bin",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
            "v1-5-pruned.ckpt",
        ]
        .map(String::from)
        .to_vec();
        let chosen = RepoKind::Pipeline.select(&listing);
        assert!(chosen.contains(&"text_encoder/model.safetensors".to_string()));
        assert!(!chosen.contains(&"text_encoder/model.fp16.safetensors".to_string()));
        assert!(chosen.contains(&"unet/diffusion_pytorch_model.fp16.safetensors".to_string()));
        assert!(
            !chosen
                .iter()
                .any(|f| f.ends_with(".bin") || f.ends_with(".ckpt"))
        );
        assert!(chosen.contains(&"tokenizer/tokenizer_config.json".to_string()));
    }
}
