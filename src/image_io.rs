//! Reading input photos as the authors' `load_512` does: any format, size, aspect and mode (grey, RGBA, 16-bit)
//! becomes RGB (alpha dropped), centre-cropped to a square and resized to the model's native size.

use std::path::Path;

use image::imageops::FilterType;

use crate::{Error, Result};

pub fn load_square_rgb(path: &Path, size: usize) -> Result<image::RgbImage> {
    square(path, load_rgb(path)?, size)
}

/// Decodes a photo to RGB within stylediff's limits (`crate::limits`), refusing truncated JPEGs.
pub fn load_rgb(path: &Path) -> Result<image::RgbImage> {
    let bytes =
        std::fs::read(path).map_err(|e| Error::file(path, format!("cannot open image: {e}")))?;
    decode_rgb(&bytes, path)
}

/// [`load_rgb`] for bytes already read (an upload); `path` names them in errors.
pub fn decode_rgb(bytes: &[u8], path: &Path) -> Result<image::RgbImage> {
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::file(path, format!("cannot read image: {e}")))?;
    if reader.format() == Some(image::ImageFormat::Jpeg) && jpeg_is_truncated(bytes) {
        return Err(Error::file(
            path,
            "the JPEG ends before its end-of-image marker (a truncated or partly copied file); decoding it would fill the missing part with grey",
        ));
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(crate::limits::MAX_INPUT_SIDE);
    limits.max_image_height = Some(crate::limits::MAX_INPUT_SIDE);
    limits.max_alloc = Some(crate::limits::MAX_INPUT_BYTES);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| {
        let hint = match e {
            image::ImageError::Limits(_) => format!(
                " (stylediff reads photos up to {} pixels a side and {} MiB decoded)",
                crate::limits::MAX_INPUT_SIDE,
                crate::limits::MAX_INPUT_BYTES >> 20
            ),
            _ => String::new(),
        };
        Error::file(path, format!("cannot decode image: {e}{hint}"))
    })?;
    Ok(img.to_rgb8())
}

/// Centre-crops to a square and resizes to `size` (the authors' `load_512`); `path` names the photo in errors.
pub fn square(path: &Path, rgb: image::RgbImage, size: usize) -> Result<image::RgbImage> {
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

/// A JPEG whose last end-of-image marker (FF D9) does not follow its last start-of-scan marker (FF DA) was cut
/// short: decoders fill the rest with grey. (Markers inside the scan data are byte-stuffed, and an EXIF
/// thumbnail's own end marker comes before the main scan.)
fn jpeg_is_truncated(bytes: &[u8]) -> bool {
    let last = |marker: u8| bytes.windows(2).rposition(|w| w == [0xFF, marker]);
    match (last(0xDA), last(0xD9)) {
        (Some(sos), Some(eoi)) => eoi < sos,
        (_, None) => true,
        (None, Some(_)) => false,
    }
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

/// SHA-256 of an image's pixels: width and height (little-endian u32), then the RGB bytes row by row. Inversions
/// record it for the photo as inverted (cropped and resized), so the same pixels match whatever file held them.
pub fn pixels_sha256(rgb: &image::RgbImage) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(rgb.width().to_le_bytes());
    h.update(rgb.height().to_le_bytes());
    h.update(rgb.as_raw());
    hex(&h.finalize())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
