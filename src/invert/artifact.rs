//! One inversion artifact per image: a safetensors file with z_T, the input image and the per-step learned
//! tensors, and JSON metadata (in the file's header, and beside it as `<name>.json` for people) naming the
//! method, its settings, the model identity, the image hash, the source prompt and the reconstruction PSNR.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::TensorView;

use super::{Inversion, InversionSettings};
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
}

fn sidecar(path: &Path) -> PathBuf {
    path.with_extension("json")
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
    let mut named: Vec<(String, Tensor)> = vec![
        ("z_t".into(), inv.z_t.clone()),
        ("image".into(), inv.image.clone()),
    ];
    if let Some(vs) = &inv.values {
        named.extend(
            vs.iter()
                .enumerate()
                .map(|(i, v)| (format!("values.{i:04}"), v.clone())),
        );
    }
    if let Some(es) = &inv.null_embeddings {
        named.extend(
            es.iter()
                .enumerate()
                .map(|(i, e)| (format!("null_text.{i:04}"), e.clone())),
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
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| Error::file(path, e.to_string()))?;
    let get = |name: &str| {
        tensors
            .get(name)
            .cloned()
            .ok_or_else(|| Error::file(path, format!("tensor `{name}` is missing")))
    };
    let series = |prefix: &str| -> Option<Vec<Tensor>> {
        let mut keys: Vec<&String> = tensors.keys().filter(|k| k.starts_with(prefix)).collect();
        keys.sort();
        (!keys.is_empty()).then(|| keys.iter().map(|k| tensors[*k].clone()).collect())
    };
    let values = series("values.");
    let null_embeddings = series("null_text.");
    let steps = meta.settings.steps;
    for (what, s) in [("values", &values), ("null_text", &null_embeddings)] {
        if let Some(s) = s
            && s.len() != steps
        {
            return Err(Error::file(
                path,
                format!("{} `{what}` tensors for {steps} steps", s.len()),
            ));
        }
    }
    Ok(Inversion {
        settings: meta.settings,
        source_prompt: meta.source_prompt,
        z_t: get("z_t")?,
        values,
        null_embeddings,
        image: get("image")?,
        recon_psnr: meta.recon_psnr,
        model_id: meta.model_id,
        image_sha256: meta.image_sha256,
    })
}
