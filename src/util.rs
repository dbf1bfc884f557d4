//! Small shared chores: atomic file writes, images <-> tensors, seeded noise, single-tensor safetensors files.

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::Distribution;

use crate::{Error, Result};

fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A sibling temp path for atomic writes.
/// A temporary name beside `path`, unique across processes and machines sharing a folder (containers often all
/// run as pid 1, so the pid alone is not enough).
fn temp_sibling(path: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    path.with_file_name(format!(
        ".{name}.{}.{}.{}-{nanos}.tmp",
        host_name(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

/// This machine's host name (a pod's name under Kubernetes), with anything but letters, digits, '-' and '.'
/// replaced, for file names and lock records.
pub fn host_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .unwrap_or_else(|| "host".into());
    let clean: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '.') {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if clean.is_empty() {
        "host".into()
    } else {
        clean
    }
}

/// Writes `bytes` to `path` through a temp file and a rename, so a reader never sees half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| io_err(parent, e))?;
    }
    let tmp = temp_sibling(path);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(path, e));
    }
    Ok(())
}

/// Refuses to write over one of the inputs.
pub fn ensure_not_input(out: &Path, inputs: &[&Path]) -> Result<()> {
    let canon = |p: &Path| std::fs::canonicalize(p).ok();
    if let Some(o) = canon(out)
        && inputs.iter().any(|i| canon(i).as_ref() == Some(&o))
    {
        return Err(Error::file(
            out,
            "refusing to overwrite an input file; choose another output path",
        ));
    }
    Ok(())
}

/// Encodes an image as PNG and writes it atomically.
pub fn save_png(path: &Path, image: &image::RgbImage) -> Result<()> {
    encode_and_write(path, image, image::ImageFormat::Png)
}

/// Encodes an image in the format its extension names (PNG, JPEG, WebP; anything else is refused) and writes it
/// atomically.
pub fn save_image(path: &Path, image: &image::RgbImage) -> Result<()> {
    encode_and_write(path, image, crate::outputs::image_format(path)?)
}

/// The PNG text keyword under which stylediff records the settings that made an image.
pub const SETTINGS_KEY: &str = "stylediff";

/// As [`save_image`], recording `settings` (JSON) in the image: a PNG carries them as an iTXt chunk
/// [`SETTINGS_KEY`], as the popular web UIs record theirs; JPEG and WebP outputs carry none.
pub fn save_image_with_settings(
    path: &Path,
    image: &image::RgbImage,
    settings: &serde_json::Value,
) -> Result<()> {
    let format = crate::outputs::image_format(path)?;
    if format != image::ImageFormat::Png {
        return encode_and_write(path, image, format);
    }
    let bad = |e: png::EncodingError| Error::file(path, format!("cannot encode PNG: {e}"));
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, image.width(), image.height());
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.add_itxt_chunk(SETTINGS_KEY.into(), settings.to_string())
            .map_err(bad)?;
        let mut w = enc.write_header().map_err(bad)?;
        w.write_image_data(image.as_raw()).map_err(bad)?;
        w.finish().map_err(bad)?;
    }
    write_atomic(path, &bytes)
}

/// The settings a PNG written by stylediff records; `None` for an image without them.
pub fn read_image_settings(path: &Path) -> Result<Option<serde_json::Value>> {
    let file = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    let reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .map_err(|e| Error::file(path, format!("not a readable PNG: {e}")))?;
    for chunk in &reader.info().utf8_text {
        if chunk.keyword == SETTINGS_KEY {
            let text = chunk
                .get_text()
                .map_err(|e| Error::file(path, format!("unreadable settings: {e}")))?;
            return serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| Error::file(path, format!("unreadable settings: {e}")));
        }
    }
    Ok(None)
}

fn encode_and_write(
    path: &Path,
    image: &image::RgbImage,
    format: image::ImageFormat,
) -> Result<()> {
    let mut bytes = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut bytes), format)
        .map_err(|e| Error::file(path, format!("cannot encode {format:?}: {e}")))?;
    write_atomic(path, &bytes)
}

/// Number of NaN or infinite values in a tensor.
pub fn count_non_finite(t: &Tensor) -> Result<usize> {
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(v.iter().filter(|x| !x.is_finite()).count())
}

/// Refuses a tensor holding NaN or infinite values: a broken result is an error, never an image.
pub fn ensure_finite(t: &Tensor, what: &str) -> Result<()> {
    let bad = count_non_finite(t)?;
    if bad > 0 {
        return Err(Error::NonFinite {
            what: what.to_string(),
            count: bad,
            total: t.elem_count(),
        });
    }
    Ok(())
}

/// (1, 3, H, W) in [-1, 1] (any float dtype) -> 8-bit RGB; a tensor with NaN or infinite values is refused.
pub fn tensor_to_image(images: &Tensor) -> Result<image::RgbImage> {
    let (_, c, h, w) = images.dims4()?;
    if c != 3 {
        return Err(Error::invalid(
            "image tensor",
            format!("expected 3 channels, got {c}"),
        ));
    }
    let data = images
        .get(0)?
        .to_dtype(DType::F32)?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let bad = data.iter().filter(|v| !v.is_finite()).count();
    if bad > 0 {
        return Err(Error::NonFinite {
            what: "image".into(),
            count: bad,
            total: data.len(),
        });
    }
    let bytes = data
        .iter()
        .map(|v| ((v + 1.0) * 127.5).clamp(0.0, 255.0).round() as u8)
        .collect();
    image::RgbImage::from_raw(w as u32, h as u32, bytes)
        .ok_or_else(|| Error::invalid("image tensor", "size mismatch"))
}

/// 8-bit RGB -> (1, 3, H, W) f32 in [-1, 1].
pub fn image_to_tensor(image: &image::RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = image.dimensions();
    let data: Vec<f32> = image
        .as_raw()
        .iter()
        .map(|&v| v as f32 / 127.5 - 1.0)
        .collect();
    Ok(Tensor::from_vec(data, (h as usize, w as usize, 3), device)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?
        .contiguous()?)
}

/// Standard-normal noise from a seed: the same seed gives the same tensor on every machine.
pub fn seeded_noise(shape: &[usize], seed: u64, device: &Device) -> Result<Tensor> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|_| rand_distr::StandardNormal.sample(&mut rng))
        .collect();
    Ok(Tensor::from_vec(data, shape, device)?)
}

/// Reads the single tensor of a safetensors file (any name), as f32.
pub fn load_single_tensor(path: &Path, device: &Device) -> Result<Tensor> {
    let tensors = candle_core::safetensors::load(path, device)
        .map_err(|e| Error::file(path, format!("cannot read safetensors: {e}")))?;
    let mut iter = tensors.into_iter();
    match (iter.next(), iter.next()) {
        (Some((_, t)), None) => Ok(t.to_dtype(DType::F32)?),
        (None, _) => Err(Error::file(path, "holds no tensor; expected exactly one")),
        (Some(_), Some(_)) => Err(Error::file(
            path,
            "holds several tensors; expected exactly one",
        )),
    }
}

/// Writes named tensors as a safetensors file, atomically.
pub fn save_tensors(path: &Path, tensors: &[(&str, &Tensor)]) -> Result<()> {
    let map: std::collections::HashMap<String, Tensor> = tensors
        .iter()
        .map(|(n, t)| Ok(((*n).to_string(), t.to_dtype(DType::F32)?.contiguous()?)))
        .collect::<Result<_>>()?;
    let tmp = temp_sibling(path);
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| io_err(parent, e))?;
    }
    candle_core::safetensors::save(&map, &tmp)
        .map_err(|e| Error::file(path, format!("cannot write safetensors: {e}")))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))
}
