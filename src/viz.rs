//! Pictures for people: labelled attention heat maps over the image, rows and grids of captioned images.

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

const BLACK: image::Rgb<u8> = image::Rgb([0, 0, 0]);
const MISS_RED: image::Rgb<u8> = image::Rgb([200, 0, 0]);
const HIT_GREEN: image::Rgb<u8> = image::Rgb([0, 160, 60]);

/// 8x8 glyphs from (x0, y0), cut where the next glyph would pass `max_w`.
fn draw_text(
    img: &mut image::RgbImage,
    text: &str,
    x0: u32,
    y0: u32,
    max_w: u32,
    color: image::Rgb<u8>,
) {
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
                    img.put_pixel(x + col, y0 + row as u32, color);
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
        draw_text(&mut sheet, label, ox, oy + tile + 2, tile, BLACK);
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
            draw_text(&mut out, label, x, tile.height() + 2, tile.width(), BLACK);
        }
        x += tile.width() + gap;
    }
    Ok(out)
}

/// Copies a square `size` picture (H*W*3 values in [0, 1]) into `grid` at (ox, oy), each pixel enlarged to a
/// `zoom` x `zoom` block without smoothing, so small pictures stay exact.
pub fn put_zoomed(
    grid: &mut image::RgbImage,
    picture: &[f32],
    size: usize,
    zoom: usize,
    ox: u32,
    oy: u32,
) {
    for y in 0..size * zoom {
        for x in 0..size * zoom {
            let i = ((y / zoom) * size + x / zoom) * 3;
            let px = [0, 1, 2].map(|c| (picture[i + c].clamp(0.0, 1.0) * 255.0).round() as u8);
            grid.put_pixel(ox + x as u32, oy + y as u32, image::Rgb(px));
        }
    }
}

/// A grid of images (H*W*3 in [0, 1]), `cols` wide, each scaled up by `zoom` with a 2-pixel gap.
pub fn image_grid(images: &[Vec<f32>], size: usize, cols: usize, zoom: usize) -> image::RgbImage {
    let rows = images.len().div_ceil(cols);
    let cell = size * zoom + 2;
    let mut grid = image::RgbImage::from_pixel(
        (cols * cell) as u32,
        (rows * cell) as u32,
        image::Rgb([255, 255, 255]),
    );
    for (k, img) in images.iter().enumerate() {
        let (ox, oy) = ((k % cols) * cell + 1, (k / cols) * cell + 1);
        put_zoomed(&mut grid, img, size, zoom, ox as u32, oy as u32);
    }
    grid
}

/// Splits `text` into lines of at most `width` characters at spaces; a word longer than a line is cut.
pub fn wrap_words(text: &str, width: usize) -> Vec<String> {
    let width = width.max(1);
    let mut lines: Vec<String> = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        let mut word: Vec<char> = word.chars().collect();
        while word.len() > width {
            if !line.is_empty() {
                lines.push(std::mem::take(&mut line));
            }
            lines.push(word.drain(..width).collect());
        }
        let word: String = word.into_iter().collect();
        if line.is_empty() {
            line = word;
        } else if line.chars().count() + 1 + word.chars().count() <= width {
            line.push(' ');
            line.push_str(&word);
        } else {
            lines.push(std::mem::replace(&mut line, word));
        }
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

/// One picture of a [`captioned_grid`]: H*W*3 values in [0, 1], its caption, and notes on what is wrong with
/// it (none when it is right).
pub struct GridCell<'a> {
    pub image: &'a [f32],
    pub caption: &'a str,
    pub misses: &'a [String],
}

/// Square `size` pictures in a grid `cols` wide, each enlarged `zoom` times without smoothing (small pictures stay
/// exact) and framed in green when right or red when it has misses, with its caption word-wrapped below and the
/// misses in red under that.
pub fn captioned_grid(
    cells: &[GridCell],
    size: usize,
    cols: usize,
    zoom: usize,
) -> Result<image::RgbImage> {
    const FRAME: u32 = 2;
    const GAP: u32 = 8;
    const LINE_H: u32 = 10;
    for (k, cell) in cells.iter().enumerate() {
        if cell.image.len() != size * size * 3 {
            return Err(crate::Error::invalid(
                "grid picture",
                format!(
                    "picture {k} has {} values, a {size}x{size} RGB picture has {}",
                    cell.image.len(),
                    size * size * 3
                ),
            ));
        }
    }
    let cols = cols.clamp(1, cells.len().max(1));
    let zoom = zoom.max(1);
    let pic = (size * zoom) as u32;
    let cell_w = pic + 2 * FRAME;
    let chars = (cell_w / 8) as usize;
    let texts: Vec<Vec<(String, image::Rgb<u8>)>> = cells
        .iter()
        .map(|c| {
            let mut lines: Vec<(String, image::Rgb<u8>)> = wrap_words(c.caption, chars)
                .into_iter()
                .map(|l| (l, BLACK))
                .collect();
            for miss in c.misses {
                lines.extend(wrap_words(miss, chars).into_iter().map(|l| (l, MISS_RED)));
            }
            lines
        })
        .collect();
    let text_h = texts.iter().map(Vec::len).max().unwrap_or(0) as u32 * LINE_H;
    let cell_h = cell_w + 3 + text_h;
    let rows = cells.len().div_ceil(cols) as u32;
    let mut grid = image::RgbImage::from_pixel(
        cols as u32 * (cell_w + GAP) + GAP,
        rows * (cell_h + GAP) + GAP,
        image::Rgb([255, 255, 255]),
    );
    for (k, (cell, lines)) in cells.iter().zip(&texts).enumerate() {
        let ox = GAP + (k % cols) as u32 * (cell_w + GAP);
        let oy = GAP + (k / cols) as u32 * (cell_h + GAP);
        let frame = if cell.misses.is_empty() {
            HIT_GREEN
        } else {
            MISS_RED
        };
        for y in 0..cell_w {
            for x in 0..cell_w {
                grid.put_pixel(ox + x, oy + y, frame);
            }
        }
        put_zoomed(&mut grid, cell.image, size, zoom, ox + FRAME, oy + FRAME);
        for (j, (line, color)) in lines.iter().enumerate() {
            draw_text(
                &mut grid,
                line,
                ox,
                oy + cell_w + 3 + j as u32 * LINE_H,
                cell_w,
                *color,
            );
        }
    }
    Ok(grid)
}

/// input | reconstruction | edit, labelled; small (toy) images enlarged to be seen.
pub fn comparison_row(
    input: &Tensor,
    reconstruction: &Tensor,
    edited: &Tensor,
) -> Result<image::RgbImage> {
    labelled_row(
        &[input, reconstruction, edited],
        &["input", "reconstruction", "edit"],
        128,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapping_keeps_words_whole_and_lines_short() {
        let lines = wrap_words("a striped orange triangle on a yellow background", 16);
        assert_eq!(
            lines,
            ["a striped orange", "triangle on a", "yellow", "background"]
        );
        for width in 1..30 {
            let text = "an outlined purple cross and a dotted green star on a gray background";
            let lines = wrap_words(text, width);
            assert!(
                lines.iter().all(|l| l.chars().count() <= width),
                "{width}: {lines:?}"
            );
            assert_eq!(
                lines.concat().replace(' ', ""),
                text.replace(' ', ""),
                "{width}"
            );
        }
        assert_eq!(wrap_words("", 10), Vec::<String>::new());
    }

    #[test]
    fn the_grid_shows_each_picture_exactly_framed_by_its_verdict() {
        let size = 3;
        // Blue channel only, one level per picture, so each zoomed pixel can be checked exactly.
        let picture = |v: f32| -> Vec<f32> {
            (0..size * size * 3)
                .map(|i| if i % 3 == 2 { v } else { 0.0 })
                .collect()
        };
        let (a, b, c) = (picture(1.0), picture(0.5), picture(0.2));
        let miss = vec!["read: square".to_string()];
        let cells = [
            GridCell {
                image: &a,
                caption: "a blue circle",
                misses: &[],
            },
            GridCell {
                image: &b,
                caption: "a blue star on a red background",
                misses: &miss,
            },
            GridCell {
                image: &c,
                caption: "x",
                misses: &[],
            },
        ];
        let grid = captioned_grid(&cells, size, 2, 40).unwrap();
        // Cells 124 px wide (120 + 2 frames), 15 characters a line; the tallest text is the second cell's: three
        // caption lines ("a blue star on", "a red", "background") and the miss.
        let (cell_w, cell_h) = (124, 124 + 3 + 4 * 10);
        assert_eq!(
            grid.dimensions(),
            (8 + 2 * (cell_w + 8), 8 + 2 * (cell_h + 8))
        );
        let origin = |k: u32| (8 + (k % 2) * (cell_w + 8), 8 + (k / 2) * (cell_h + 8));
        for (k, want) in [(0u32, 255u8), (1, 128), (2, 51)] {
            let (ox, oy) = origin(k);
            for (x, y) in [(2, 2), (2 + 119, 2 + 119), (2 + 60, 2 + 85)] {
                assert_eq!(
                    grid.get_pixel(ox + x, oy + y).0,
                    [0, 0, want],
                    "picture {k} at {x},{y}"
                );
            }
            let framed = grid.get_pixel(ox, oy + 10).0;
            assert_eq!(
                framed,
                if k == 1 { MISS_RED.0 } else { HIT_GREEN.0 },
                "frame {k}"
            );
        }
        // The miss is written in red under its caption, and only there.
        let red_text = |k: u32| {
            let (ox, oy) = origin(k);
            (oy + cell_w..oy + cell_h)
                .flat_map(|y| (ox..ox + cell_w).map(move |x| (x, y)))
                .filter(|&(x, y)| grid.get_pixel(x, y).0 == MISS_RED.0)
                .count()
        };
        assert!(red_text(1) > 0);
        assert_eq!(red_text(0), 0);
        let wrong = vec![0.0f32; 5];
        let err = captioned_grid(
            &[GridCell {
                image: &wrong,
                caption: "",
                misses: &[],
            }],
            size,
            1,
            1,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("picture 0 has 5 values"), "{err}");
    }
}
