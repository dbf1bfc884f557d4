//! Reading attributes back from an image with the renderer's own geometry: background colour from the border,
//! object pixels by distance from it, object colour by a vote over the palette (stripe and dot shades count for
//! their base colour), shape by template matching rendered silhouettes at the object's place and size.

use super::render::inside_shape;
use super::world::{Color, Shape, dist2};

/// What was found in an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Detected {
    pub background: Color,
    pub color: Color,
    pub shape: Shape,
}

fn pixel(img: &[f32], size: usize, x: usize, y: usize) -> [f32; 3] {
    let i = (y * size + x) * 3;
    [img[i], img[i + 1], img[i + 2]]
}

/// Background colour: the palette colour most border pixels are nearest to.
pub fn background_colour(img: &[f32], size: usize) -> Color {
    let mut votes = vec![0usize; Color::ALL.len()];
    for k in 0..size {
        for (x, y) in [(k, 0), (k, size - 1), (0, k), (size - 1, k)] {
            let c = Color::nearest(pixel(img, size, x, y), Color::ALL);
            votes[Color::ALL.iter().position(|v| *v == c).expect("in palette")] += 1;
        }
    }
    let best = (0..votes.len())
        .max_by_key(|&i| votes[i])
        .expect("non-empty");
    Color::ALL[best]
}

/// Pixels far from the background colour, with enclosed holes filled (outlined shapes become solid).
pub fn object_mask(img: &[f32], size: usize, background: Color) -> Vec<bool> {
    let bg = background.rgb();
    let raw: Vec<bool> = (0..size * size)
        .map(|i| dist2(pixel(img, size, i % size, i / size), bg) > 0.03)
        .collect();
    // Flood the background from the border; what it cannot reach belongs to the object.
    let mut outside = vec![false; size * size];
    let mut stack: Vec<usize> = (0..size)
        .flat_map(|k| [k, (size - 1) * size + k, k * size, k * size + size - 1])
        .filter(|&i| !raw[i])
        .collect();
    while let Some(i) = stack.pop() {
        if outside[i] || raw[i] {
            continue;
        }
        outside[i] = true;
        let (x, y) = (i % size, i / size);
        if x > 0 {
            stack.push(i - 1);
        }
        if x + 1 < size {
            stack.push(i + 1);
        }
        if y > 0 {
            stack.push(i - size);
        }
        if y + 1 < size {
            stack.push(i + size);
        }
    }
    largest_component(&outside.iter().map(|o| !o).collect::<Vec<_>>(), size)
}

/// The largest 4-connected region of `mask`: specks a decoder leaves elsewhere (often in a corner) are not part
/// of the object, and counting them would stretch its bounding box and spoil the shape match.
fn largest_component(mask: &[bool], size: usize) -> Vec<bool> {
    let mut label = vec![usize::MAX; mask.len()];
    let (mut best, mut best_len) = (usize::MAX, 0);
    for start in 0..mask.len() {
        if !mask[start] || label[start] != usize::MAX {
            continue;
        }
        let (mut stack, mut len) = (vec![start], 0);
        label[start] = start;
        while let Some(i) = stack.pop() {
            len += 1;
            let (x, y) = (i % size, i / size);
            let neighbours = [
                (x > 0).then(|| i - 1),
                (x + 1 < size).then(|| i + 1),
                (y > 0).then(|| i - size),
                (y + 1 < size).then(|| i + size),
            ];
            for j in neighbours.into_iter().flatten() {
                if mask[j] && label[j] == usize::MAX {
                    label[j] = start;
                    stack.push(j);
                }
            }
        }
        if len > best_len {
            (best, best_len) = (start, len);
        }
    }
    label.iter().map(|&l| best_len > 0 && l == best).collect()
}

/// Votes over object pixels. Each pixel is explained as a blend between the background and a candidate colour
/// (edges and thin outlines are anti-aliased); the candidate with the smallest residual gets the vote, with
/// stripe and dot shades voting for their base colour at half weight.
fn object_colour(img: &[f32], size: usize, mask: &[bool], background: Color) -> Color {
    let candidates: Vec<Color> = Color::OBJECT
        .iter()
        .copied()
        .filter(|c| *c != background)
        .collect();
    let bg = background.rgb();
    let mut votes = vec![0f32; candidates.len()];
    for (i, &m) in mask.iter().enumerate() {
        let p = pixel(img, size, i % size, i / size);
        if !m || dist2(p, bg) <= 0.03 {
            continue;
        }
        let (mut best, mut best_d, mut weight) = (0, f32::MAX, 1.0);
        for (k, c) in candidates.iter().enumerate() {
            for (rgb, w) in [(c.rgb(), 1.0), (c.pattern_rgb(), 0.5)] {
                let dir = [rgb[0] - bg[0], rgb[1] - bg[1], rgb[2] - bg[2]];
                let len2 = dir.iter().map(|d| d * d).sum::<f32>().max(1e-6);
                let alpha =
                    (((p[0] - bg[0]) * dir[0] + (p[1] - bg[1]) * dir[1] + (p[2] - bg[2]) * dir[2])
                        / len2)
                        .clamp(0.3, 1.0);
                let d = dist2(
                    [
                        bg[0] + alpha * dir[0],
                        bg[1] + alpha * dir[1],
                        bg[2] + alpha * dir[2],
                    ],
                    p,
                );
                if d < best_d {
                    (best, best_d, weight) = (k, d, w * alpha);
                }
            }
        }
        votes[best] += weight;
    }
    let k = (0..votes.len())
        .max_by(|&a, &b| votes[a].total_cmp(&votes[b]))
        .expect("non-empty");
    candidates[k]
}

fn iou(mask: &[bool], size: usize, shape: Shape, cx: f32, cy: f32, r: f32) -> f32 {
    let (mut inter, mut union) = (0u32, 0u32);
    for (i, &m) in mask.iter().enumerate() {
        let (x, y) = ((i % size) as f32 + 0.5, (i / size) as f32 + 0.5);
        let s = inside_shape(shape, (x - cx) / r, (y - cy) / r);
        inter += (m && s) as u32;
        union += (m || s) as u32;
    }
    if union == 0 {
        0.0
    } else {
        inter as f32 / union as f32
    }
}

/// The best-matching shape and its IoU, searching centre and size around the mask's bounding box.
pub fn match_shape(mask: &[bool], size: usize) -> Option<(Shape, f32)> {
    let (mut x0, mut y0, mut x1, mut y1, mut n) = (size, size, 0, 0, 0);
    for (i, &m) in mask.iter().enumerate() {
        if m {
            let (x, y) = (i % size, i / size);
            (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
            n += 1;
        }
    }
    if n < 6 {
        return None;
    }
    let (bx, by) = ((x0 + x1 + 1) as f32 / 2.0, (y0 + y1 + 1) as f32 / 2.0);
    let half = ((x1 + 1 - x0).max(y1 + 1 - y0)) as f32 / 2.0;
    let mut best = (Shape::Circle, -1.0f32);
    for &shape in Shape::ALL {
        for ri in 0..8 {
            let r = half * (0.9 + 0.06 * ri as f32);
            for dy in [-1.0f32, 0.0, 1.0] {
                for dx in [-1.0f32, 0.0, 1.0] {
                    let score = iou(mask, size, shape, bx + dx * 0.5, by + dy * 0.5, r);
                    if score > best.1 {
                        best = (shape, score);
                    }
                }
            }
        }
    }
    Some(best)
}

/// Reads background, object colour and shape from a one-object image (size x size x 3 in [0, 1]).
pub fn detect(img: &[f32], size: usize) -> Option<Detected> {
    let background = background_colour(img, size);
    let mask = object_mask(img, size, background);
    let (shape, _) = match_shape(&mask, size)?;
    Some(Detected {
        background,
        color: object_colour(img, size, &mask, background),
        shape,
    })
}
