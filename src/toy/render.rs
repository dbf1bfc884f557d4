//! Deterministic anti-aliased rendering of toy scenes (4x4 supersampling per pixel).

use super::world::{Color, Placement, Scene, Shape, Style};

const SUB: usize = 4;

fn inside_polygon(x: f32, y: f32, poly: &[(f32, f32)]) -> bool {
    let mut inside = false;
    let mut j = poly.len() - 1;
    for i in 0..poly.len() {
        let (xi, yi) = poly[i];
        let (xj, yj) = poly[j];
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

fn star_polygon() -> Vec<(f32, f32)> {
    (0..10)
        .map(|k| {
            let r = if k % 2 == 0 { 1.0 } else { 0.45 };
            let a = -std::f32::consts::FRAC_PI_2 + k as f32 * std::f32::consts::PI / 5.0;
            (r * a.cos(), r * a.sin() + 0.08)
        })
        .collect()
}

/// Whether the unit-scale point (u, v) (object centre at 0, radius 1) lies in the shape.
pub fn inside_shape(shape: Shape, u: f32, v: f32) -> bool {
    match shape {
        Shape::Circle => u * u + v * v <= 1.0,
        Shape::Square => u.abs() <= 0.82 && v.abs() <= 0.82,
        Shape::Triangle => inside_polygon(u, v, &[(0.0, -0.95), (0.98, 0.75), (-0.98, 0.75)]),
        Shape::Star => inside_polygon(u, v, &star_polygon()),
        Shape::Cross => {
            (u.abs() <= 0.32 && v.abs() <= 0.95) || (v.abs() <= 0.32 && u.abs() <= 0.95)
        }
    }
}

/// Coverage of the object at sub-sample (x, y) in pixels: None outside, else the colour there.
fn object_colour(
    shape: Shape,
    style: Style,
    color: Color,
    p: &Placement,
    x: f32,
    y: f32,
) -> Option<[f32; 3]> {
    let (u, v) = ((x - p.cx) / p.radius, (y - p.cy) / p.radius);
    if !inside_shape(shape, u, v) {
        return None;
    }
    let main = color.rgb();
    match style {
        Style::Plain => Some(main),
        Style::Outlined => {
            // A ring about 1.6 px wide: inside the shape but outside its shrunken copy.
            let k = p.radius / (p.radius - 1.6).max(0.5);
            if inside_shape(shape, u * k, v * k) {
                None
            } else {
                Some(main)
            }
        }
        Style::Striped => {
            let band = ((x + y) / 2.5).floor() as i64;
            Some(if band.rem_euclid(2) == 0 {
                main
            } else {
                color.pattern_rgb()
            })
        }
        Style::Dotted => {
            let (gx, gy) = ((x / 4.0).round() * 4.0, (y / 4.0).round() * 4.0);
            let on_dot = (x - gx).powi(2) + (y - gy).powi(2) <= 1.2 * 1.2;
            Some(if on_dot { color.pattern_rgb() } else { main })
        }
    }
}

/// Renders a scene to `size` x `size` RGB in [0, 1], row-major, 3 floats per pixel.
pub fn render(scene: &Scene, size: usize) -> Vec<f32> {
    let bg = scene.spec.background.rgb();
    let mut out = vec![0f32; size * size * 3];
    for py in 0..size {
        for px in 0..size {
            let mut acc = [0f32; 3];
            for sy in 0..SUB {
                for sx in 0..SUB {
                    let x = px as f32 + (sx as f32 + 0.5) / SUB as f32;
                    let y = py as f32 + (sy as f32 + 0.5) / SUB as f32;
                    let colour = scene
                        .spec
                        .objects
                        .iter()
                        .zip(&scene.placements)
                        .find_map(|(o, p)| object_colour(o.shape, o.style, o.color, p, x, y))
                        .unwrap_or(bg);
                    for c in 0..3 {
                        acc[c] += colour[c];
                    }
                }
            }
            let i = (py * size + px) * 3;
            for c in 0..3 {
                out[i + c] = acc[c] / (SUB * SUB) as f32;
            }
        }
    }
    out
}

/// Fraction of each pixel covered by object `index` (its full silhouette, whatever its style).
pub fn silhouette(scene: &Scene, index: usize, size: usize) -> Vec<f32> {
    let (o, p) = (&scene.spec.objects[index], &scene.placements[index]);
    let mut out = vec![0f32; size * size];
    for py in 0..size {
        for px in 0..size {
            let mut hits = 0;
            for sy in 0..SUB {
                for sx in 0..SUB {
                    let x = px as f32 + (sx as f32 + 0.5) / SUB as f32;
                    let y = py as f32 + (sy as f32 + 0.5) / SUB as f32;
                    if inside_shape(o.shape, (x - p.cx) / p.radius, (y - p.cy) / p.radius) {
                        hits += 1;
                    }
                }
            }
            out[py * size + px] = hits as f32 / (SUB * SUB) as f32;
        }
    }
    out
}

pub fn to_rgb_image(pixels: &[f32], size: usize) -> image::RgbImage {
    let bytes = pixels
        .iter()
        .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect();
    image::RgbImage::from_raw(size as u32, size as u32, bytes).expect("size matches")
}
