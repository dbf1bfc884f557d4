//! Reading input photos as the authors' `load_512` does: any format, size, aspect and mode (grey, RGBA, 16-bit)
//! becomes RGB (alpha dropped), centre-cropped to a square and resized to the model's native size.

use std::path::Path;

use image::imageops::FilterType;

use crate::{Error, Result};

pub fn load_square_rgb(path: &Path, size: usize) -> Result<image::RgbImage> {
    let img = image::ImageReader::open(path)
        .map_err(|e| Error::file(path, format!("cannot open image: {e}")))?
        .with_guessed_format()
        .map_err(|e| Error::file(path, format!("cannot read image: {e}")))?
        .decode()
        .map_err(|e| Error::file(path, format!("cannot decode image: {e}")))?;
    let rgb = img.to_rgb8();
    let (w, h) = rgb.dimensions();
    if w == 0 || h == 0 {
        return Err(Error::file(path, "image has no pixels"));
    }
    let side = w.min(h);
    let cropped =
        image::imageops::crop_imm(&rgb, (w - side) / 2, (h - side) / 2, side, side).to_image();
    Ok(if side as usize == size {
        cropped
    } else {
        image::imageops::resize(&cropped, size as u32, size as u32, FilterType::CatmullRom)
    })
}

/// SHA-256 of a file's bytes, hex.
pub fn file_sha256(path: &Path) -> Result<String> {
    use sha2::Digest;
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(hex(&sha2::Sha256::digest(&bytes)))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
