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
