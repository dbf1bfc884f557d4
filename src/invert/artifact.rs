//! One inversion artifact per image: a safetensors file with z_T, the input image and the per-step learned
//! tensors, and JSON metadata (in the file's header, and beside it as `<file name>.json`, e.g.
//! `cat.inv.safetensors.json`, for people; a name no other output of the same command can take) naming the
//! method, its settings, the model identity, the image hash, the source prompt and the reconstruction PSNR.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::TensorView;

use super::{Inversion, InversionSettings, Learned};
use crate::util::write_atomic;
use crate::{Error, Result};

pub const FORMAT: &str = "stylediff-inversion-1";

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ArtifactMeta {
    pub format: String,
    pub method: String,
    pub settings: InversionSettings,
    pub source_prompt: String,
    pub recon_psnr: f64,
    pub model_id: String,
    pub image_sha256: String,
    pub image_size: usize,
    /// The compute dtype and device of the inversion (empty in artifacts written before they were recorded).
    #[serde(default)]
    pub dtype: String,
    #[serde(default)]
    pub device: String,
    #[serde(default)]
    pub stylediff_version: String,
}

/// The metadata file written beside an artifact: its whole file name plus `.json`.
pub fn sidecar(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".json");
    path.with_file_name(name)
}

fn f32_bytes(t: &Tensor) -> Result<(Vec<usize>, Vec<u8>)> {
    let t = t.to_dtype(DType::F32)?.contiguous()?;
    let data = t.flatten_all()?.to_vec1::<f32>()?;
    Ok((
        t.dims().to_vec(),
        data.iter().flat_map(|v| v.to_le_bytes()).collect(),
    ))
}

pub fn save(inv: &Inversion, path: &Path) -> Result<()> {
    inv.validate()
        .map_err(|e| Error::file(path, format!("not written: {e}")))?;
    let mut named: Vec<(String, Tensor)> = vec![
        ("z_t".into(), inv.z_t.clone()),
        ("image".into(), inv.image.clone()),
    ];
    if let Some((prefix, ts, _)) = inv.learned.per_step() {
        named.extend(
            ts.iter()
                .enumerate()
                .map(|(i, t)| (format!("{prefix}.{i:04}"), t.clone())),
        );
    }
    let encoded: Vec<(String, Vec<usize>, Vec<u8>)> = named
        .iter()
        .map(|(n, t)| f32_bytes(t).map(|(s, b)| (n.clone(), s, b)))
        .collect::<Result<_>>()?;
    let views: Vec<(String, TensorView)> = encoded
        .iter()
        .map(|(n, s, b)| {
            TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::file(path, e.to_string()))
        })
        .collect::<Result<_>>()?;
    let meta = ArtifactMeta {
        format: FORMAT.into(),
        method: inv.settings.method.name().into(),
        settings: inv.settings.clone(),
        source_prompt: inv.source_prompt.clone(),
        recon_psnr: inv.recon_psnr,
        model_id: inv.model_id.clone(),
        image_sha256: inv.image_sha256.clone(),
        image_size: inv.image.dim(3)?,
        dtype: inv.dtype.clone(),
        device: inv.device.clone(),
        stylediff_version: env!("CARGO_PKG_VERSION").into(),
    };
    let json = serde_json::to_string_pretty(&meta).expect("serialisable");
    let header: HashMap<String, String> = [("stylediff".to_string(), json.clone())].into();
    let bytes = safetensors::serialize(views, Some(header))
        .map_err(|e| Error::file(path, e.to_string()))?;
    write_atomic(path, &bytes)?;
    write_atomic(&sidecar(path), json.as_bytes())
}

pub fn load(path: &Path, device: &Device) -> Result<Inversion> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::file(path, format!("not a safetensors file: {e}")))?;
    let json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("stylediff"))
        .ok_or_else(|| Error::file(path, "not a stylediff inversion (no `stylediff` metadata); make one with `stylediff invert`"))?;
    let meta: ArtifactMeta = serde_json::from_str(json)
        .map_err(|e| Error::file(path, format!("unreadable inversion metadata: {e}")))?;
    if meta.format != FORMAT {
        return Err(Error::file(
            path,
            format!(
                "inversion format {:?}, this stylediff reads {FORMAT:?}",
                meta.format
            ),
        ));
    }
    let bad = |m: String| Error::file(path, m);
    let views = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let steps = meta.settings.steps;
    for (name, view) in views.tensors() {
        let known = name == "z_t"
            || name == "image"
            || ["values.", "null_text."].iter().any(|prefix| {
                name.strip_prefix(prefix)
                    .and_then(|i| i.parse::<usize>().ok())
                    .is_some_and(|i| i < steps && name.len() == prefix.len() + 4)
            });
        if !known {
            return Err(bad(format!(
                "unexpected tensor `{name}` (an inversion of {steps} steps holds z_t, image, and values.NNNN or null_text.NNNN for steps 0000..{:04})",
                steps.saturating_sub(1)
            )));
        }
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(bad(format!(
                "tensor `{name}` is {:?}; inversions store F32",
                view.dtype()
            )));
        }
    }
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| Error::file(path, e.to_string()))?;
    let get = |name: &str| {
        tensors
            .get(name)
            .cloned()
            .ok_or_else(|| Error::file(path, format!("tensor `{name}` is missing")))
    };
    let series = |prefix: &str| -> Result<Option<Vec<Tensor>>> {
        let count = tensors.keys().filter(|k| k.starts_with(prefix)).count();
        if count == 0 {
            return Ok(None);
        }
        (0..steps)
            .map(|i| {
                let name = format!("{prefix}{i:04}");
                tensors.get(&name).cloned().ok_or_else(|| {
                    bad(format!(
                        "tensor `{name}` is missing ({count} `{prefix}*` tensors for {steps} steps)"
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    };
    let values = series("values.")?;
    let null_embeddings = series("null_text.")?;
    let per_step = match (values, null_embeddings) {
        (Some(_), Some(_)) => {
            return Err(bad(
                "holds both `values.*` and `null_text.*` tensors; an inversion has one kind".into(),
            ));
        }
        (Some(v), None) => Some(("values", v)),
        (None, Some(e)) => Some(("null_text", e)),
        (None, None) => None,
    };
    let method = meta.settings.method;
    if let Some((prefix, _)) = &per_step
        && Learned::prefix_of(method) != Some(*prefix)
    {
        return Err(bad(format!(
            "holds `{prefix}.*` tensors, which a {} inversion does not make",
            method.name()
        )));
    }
    let learned =
        Learned::from_parts(method, per_step.map(|(_, ts)| ts)).map_err(|e| bad(e.to_string()))?;
    let image = get("image")?;
    if image.rank() == 4 && image.dim(3)? != meta.image_size {
        return Err(bad(format!(
            "tensor `image` is {:?} but the metadata says image_size {}",
            image.dims(),
            meta.image_size
        )));
    }
    let inv = Inversion {
        settings: meta.settings,
        source_prompt: meta.source_prompt,
        z_t: get("z_t")?,
        learned,
        image,
        recon_psnr: meta.recon_psnr,
        model_id: meta.model_id,
        image_sha256: meta.image_sha256,
        dtype: meta.dtype,
        device: meta.device,
    };
    inv.validate().map_err(|e| bad(e.to_string()))?;
    if inv.settings.method.name() != meta.method {
        return Err(bad(format!(
            "metadata names method {:?} but its settings say {:?}",
            meta.method,
            inv.settings.method.name()
        )));
    }
    Ok(inv)
}
