//! Pictures for people: labelled attention heat maps over the image.

use candle_core::Tensor;

use crate::Result;

/// A blue-cyan-yellow-red colour ramp for v in [0, 1].
fn heat(v: f32) -> [f32; 3] {
    let v = v.clamp(0.0, 1.0);
    let stops = [
        [0.0, 0.0, 0.5],
        [0.0, 0.4, 1.0],
        [0.0, 0.9, 0.9],
        [1.0, 1.0, 0.0],
        [1.0, 0.3, 0.0],
        [0.8, 0.0, 0.0],
    ];
    let x = v * (stops.len() - 1) as f32;
    let (i, f) = (x.floor() as usize, x.fract());
    let (a, b) = (
        stops[i.min(stops.len() - 1)],
        stops[(i + 1).min(stops.len() - 1)],
    );
    [0, 1, 2].map(|c| a[c] + (b[c] - a[c]) * f)
}

fn draw_text(img: &mut image::RgbImage, text: &str, x0: u32, y0: u32, max_w: u32) {
    use font8x8::UnicodeFonts;
    for (k, ch) in text.chars().enumerate() {
        let x = x0 + 8 * k as u32;
        if x + 8 > x0 + max_w {
            break;
        }
        let glyph = font8x8::BASIC_FONTS
            .get(ch)
            .or_else(|| font8x8::BASIC_FONTS.get('?'))
            .unwrap_or([0; 8]);
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                if bits & (1 << col) != 0 {
                    img.put_pixel(x + col, y0 + row as u32, image::Rgb([0, 0, 0]));
                }
            }
        }
    }
}

/// One tile per token: the image (1, 3, S, S) in [-1, 1] under the token's map (queries on a `grid`),
/// normalised per token, with the token's text below.
pub fn attention_sheet(
    image: &Tensor,
    maps: &Tensor,
    grid: (usize, usize),
    labels: &[String],
    tile: u32,
) -> Result<image::RgbImage> {
    let base = image::imageops::resize(
        &crate::util::tensor_to_image(image)?,
        tile,
        tile,
        image::imageops::FilterType::Triangle,
    );
    let maps: Vec<Vec<f32>> = maps.t()?.contiguous()?.to_vec2::<f32>()?; // (tokens, queries)
    let label_h = 12;
    let cols = labels.len().min(8) as u32;
    let rows = (labels.len() as u32).div_ceil(cols.max(1));
    let (cw, ch) = (tile + 4, tile + label_h + 4);
    let mut sheet = image::RgbImage::from_pixel(cols * cw, rows * ch, image::Rgb([255, 255, 255]));
    for (k, label) in labels.iter().enumerate() {
        let m = &maps[k];
        let max = m.iter().copied().fold(1e-12f32, f32::max);
        let (ox, oy) = ((k as u32 % cols) * cw + 2, (k as u32 / cols) * ch + 2);
        for y in 0..tile {
            for x in 0..tile {
                let q = (y as usize * grid.0 / tile as usize) * grid.1
                    + x as usize * grid.1 / tile as usize;
                let h = heat(m[q] / max);
                let p = base.get_pixel(x, y);
                let mix = [0, 1, 2]
                    .map(|c| ((0.45 * p[c] as f32 / 255.0 + 0.55 * h[c]) * 255.0).round() as u8);
                sheet.put_pixel(ox + x, oy + y, image::Rgb(mix));
            }
        }
        draw_text(&mut sheet, label, ox, oy + tile + 2, tile);
    }
    Ok(sheet)
}

/// Images side by side, each (1, 3, H, W) in [-1, 1], with a caption under each. Images narrower than `min_tile`
/// are enlarged by an integer factor without smoothing, so a 32x32 toy picture stays readable and exact.
pub fn labelled_row(images: &[&Tensor], labels: &[&str], min_tile: u32) -> Result<image::RgbImage> {
    let tiles: Vec<image::RgbImage> = images
        .iter()
        .map(|t| -> Result<image::RgbImage> {
            let img = crate::util::tensor_to_image(t)?;
            let zoom = min_tile.div_ceil(img.width()).max(1);
            Ok(if zoom > 1 {
                image::imageops::resize(
                    &img,
                    img.width() * zoom,
                    img.height() * zoom,
                    image::imageops::FilterType::Nearest,
                )
            } else {
                img
            })
        })
        .collect::<Result<_>>()?;
    let (gap, text_h) = (4u32, 12u32);
    let height = tiles.iter().map(|t| t.height()).max().unwrap_or(0) + text_h;
    let width = tiles
        .iter()
        .map(|t| t.width() + gap)
        .sum::<u32>()
        .saturating_sub(gap);
    let mut out = image::RgbImage::from_pixel(width, height, image::Rgb([255, 255, 255]));
    let mut x = 0;
    for (k, tile) in tiles.iter().enumerate() {
        image::imageops::replace(&mut out, tile, x as i64, 0);
        if let Some(label) = labels.get(k) {
            draw_text(&mut out, label, x, tile.height() + 2, tile.width());
        }
        x += tile.width() + gap;
    }
    Ok(out)
}
