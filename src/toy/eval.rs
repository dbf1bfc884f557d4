//! Quality of a toy model, measured: generation (colour, shape, background read back by the renderer-based
//! checker), VAE reconstruction PSNR on held-out renders, and how often the toy CLIP ranks the true caption
//! first among the caption and all its single-word edits.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;

use super::check::detect;
use super::edits::single_word_edits_with_kind;
use super::render::render;
use super::train::{TOY_SIZE, normalize, pooled_text, render_batch, token_batch};
use super::world::{HELD_OUT_LAYOUT_SEEDS, SceneSpec, Shape};
use crate::model::StableDiffusion;
use crate::model::clip::vision::clip_normalize;
use crate::pipeline::GenerateOptions;
use crate::{Error, Result};

#[derive(Clone, Debug, serde::Serialize)]
pub struct QualityReport {
    pub generated: usize,
    pub steps: usize,
    pub guidance: f64,
    pub background_right: f64,
    pub color_right: f64,
    pub shape_right: f64,
    pub no_object_found: usize,
    pub vae_images: usize,
    pub vae_psnr_mean: f64,
    pub vae_psnr_min: f64,
    pub clip_images: usize,
    pub clip_top1: f64,
    pub clip_mean_candidates: f64,
    /// Where the toy CLIP ranked an edit first: how often, by the kind of word the edit changed.
    pub clip_wrong_by_kind: BTreeMap<String, usize>,
    /// The generated shapes as the checker read them: caption shape -> shape read -> count.
    pub shape_read_as: BTreeMap<String, BTreeMap<String, usize>>,
    /// The VAE and CLIP measures split by the number of objects in the held-out scene (1 and 2).
    pub by_object_count: Vec<ObjectCountSplit>,
}

/// The VAE and CLIP measures over the held-out scenes with one number of objects.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ObjectCountSplit {
    pub objects: usize,
    pub images: usize,
    pub vae_psnr_mean: f64,
    pub clip_top1: f64,
    /// Median cosine between a render's image embedding and its caption's text embedding.
    pub clip_caption_cosine: f64,
    /// Median over captions of the cosine between the caption's text embedding and its nearest single-word
    /// edit's: near 1, the text encoder barely tells the caption from an edit, and no image embedding can.
    pub clip_nearest_edit_cosine: f64,
}

impl QualityReport {
    /// The report as a Markdown table, with the shape confusion and the split by object count.
    pub fn markdown(&self) -> String {
        let mut md = format!(
            "| measure | value |\n|---|---|\n\
             | object colour right | {:.1}% |\n\
             | shape right | {:.1}% |\n\
             | background right | {:.1}% |\n\
             | no object found | {} of {} |\n\
             | VAE PSNR (mean / min, {} held-out renders) | {:.2} / {:.2} dB |\n\
             | CLIP true caption ranked first (among {:.1} candidates) | {:.1}% |\n",
            100.0 * self.color_right,
            100.0 * self.shape_right,
            100.0 * self.background_right,
            self.no_object_found,
            self.generated,
            self.vae_images,
            self.vae_psnr_mean,
            self.vae_psnr_min,
            self.clip_mean_candidates,
            100.0 * self.clip_top1
        );
        if !self.clip_wrong_by_kind.is_empty() {
            let wrong: Vec<String> = self
                .clip_wrong_by_kind
                .iter()
                .map(|(kind, n)| format!("{kind} {n}"))
                .collect();
            md.push_str(&format!(
                "\nWhere CLIP ranked an edit first, the word it changed: {}.\n",
                wrong.join(", ")
            ));
        }
        md.push_str(
            "\nBy number of objects in the held-out render (cosines: medians of the toy CLIP's image-caption \
             and caption-nearest-edit cosines):\n\n\
             | objects | renders | VAE PSNR (mean) | CLIP top-1 | image-caption cosine | caption-nearest-edit cosine |\n\
             |---|---|---|---|---|---|\n",
        );
        for split in &self.by_object_count {
            md.push_str(&format!(
                "| {} | {} | {:.2} dB | {:.1}% | {:.3} | {:.3} |\n",
                split.objects,
                split.images,
                split.vae_psnr_mean,
                100.0 * split.clip_top1,
                split.clip_caption_cosine,
                split.clip_nearest_edit_cosine
            ));
        }
        md.push_str("\nGenerated shapes as the checker read them (rows: the caption's shape):\n\n| caption \\ read |");
        for shape in Shape::ALL {
            md.push_str(&format!(" {} |", shape.word()));
        }
        md.push_str(&format!("\n|---|{}\n", "---|".repeat(Shape::ALL.len())));
        for truth in Shape::ALL {
            md.push_str(&format!("| {} |", truth.word()));
            for read in Shape::ALL {
                let n = self
                    .shape_read_as
                    .get(truth.word())
                    .and_then(|row| row.get(read.word()))
                    .copied()
                    .unwrap_or(0);
                md.push_str(&format!(" {n} |"));
            }
            md.push('\n');
        }
        md
    }
}

pub fn psnr(a: &[f32], b: &[f32]) -> f64 {
    let mse = a
        .iter()
        .zip(b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    10.0 * (1.0 / mse.max(1e-12)).log10()
}

/// (1, 3, H, W) in [-1, 1] -> H*W*3 in [0, 1].
pub fn to_hwc01(image: &Tensor) -> Result<Vec<f32>> {
    Ok(
        ((image.get(0)?.to_dtype(DType::F32)?.permute((1, 2, 0))? + 1.0)? / 2.0)?
            .clamp(0.0, 1.0)?
            .flatten_all()?
            .to_vec1::<f32>()?,
    )
}

/// Held-out one-object captions for generation (a seed stream separate from training).
pub fn held_out_captions(n: usize, seed: u64) -> Vec<SceneSpec> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xE7A1_0000);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let s = SceneSpec::random(&mut rng);
        if s.objects.len() == 1 {
            out.push(s);
        }
    }
    out
}

/// One generated image with its caption and what the checker read wrongly in it.
pub struct GeneratedSample {
    pub caption: String,
    /// H*W*3 values in [0, 1].
    pub image: Vec<f32>,
    /// The attributes the checker read differently from the caption ("read: square", "read: gray bg"), or
    /// "no object found"; empty when the image is right.
    pub misses: Vec<String>,
}

/// Runs every measure. `on_progress(done, total)` follows the generation loop. Returns the report and the
/// generated images, for a picture grid.
pub fn evaluate(
    sd: &StableDiffusion,
    n: usize,
    steps: usize,
    guidance: f64,
    seed: u64,
    on_progress: &mut dyn FnMut(usize, usize),
) -> Result<(QualityReport, Vec<GeneratedSample>)> {
    let size = sd.native_size();
    if size != TOY_SIZE {
        return Err(Error::invalid(
            "model",
            format!(
                "toy evaluation needs a {TOY_SIZE}x{TOY_SIZE} model, this one makes {size}x{size}"
            ),
        ));
    }
    let captions = held_out_captions(n, seed);
    let (mut bg, mut color, mut shape, mut missing) = (0, 0, 0, 0);
    let mut shape_read_as: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    let mut images = Vec::with_capacity(n);
    for (i, spec) in captions.iter().enumerate() {
        let mut opts = GenerateOptions::new(spec.caption());
        opts.steps = steps;
        opts.guidance = guidance;
        opts.seed = seed.wrapping_add(i as u64);
        let out = crate::pipeline::generate(sd, &opts, &mut crate::denoise::Monitor::silent())?;
        let img = to_hwc01(&out.image)?;
        let mut misses = Vec::new();
        match detect(&img, size) {
            Some(d) => {
                let want = &spec.objects[0];
                for (right, count, note) in [
                    (
                        d.background == spec.background,
                        &mut bg,
                        format!("read: {} bg", d.background.word()),
                    ),
                    (
                        d.color == want.color,
                        &mut color,
                        format!("read: {}", d.color.word()),
                    ),
                    (
                        d.shape == want.shape,
                        &mut shape,
                        format!("read: {}", d.shape.word()),
                    ),
                ] {
                    if right {
                        *count += 1;
                    } else {
                        misses.push(note);
                    }
                }
                *shape_read_as
                    .entry(want.shape.word().into())
                    .or_default()
                    .entry(d.shape.word().into())
                    .or_default() += 1;
            }
            None => {
                missing += 1;
                misses.push("no object found".into());
            }
        }
        images.push(GeneratedSample {
            caption: spec.caption(),
            image: img,
            misses,
        });
        on_progress(i + 1, n);
    }

    // VAE: held-out renders (one- and two-object scenes, layout seeds never used in training).
    let mut rng = StdRng::seed_from_u64(seed ^ 0x0AE0_E7A1);
    let scenes: Vec<(SceneSpec, u64)> = (0..n)
        .map(|i| {
            (
                SceneSpec::random(&mut rng),
                HELD_OUT_LAYOUT_SEEDS + seed * 100_000 + i as u64,
            )
        })
        .collect();
    let mut psnrs = Vec::with_capacity(n);
    for chunk in scenes.chunks(32) {
        let x = render_batch(chunk)?.to_dtype(sd.dtype)?;
        let rec = sd.vae.decode(&sd.vae.encode(&x)?)?;
        for b in 0..chunk.len() {
            let a = to_hwc01(&x.narrow(0, b, 1)?)?;
            let r = to_hwc01(&rec.narrow(0, b, 1)?)?;
            psnrs.push(psnr(&a, &r));
        }
    }

    // CLIP ranking: needs the image encoder.
    let (mut top1, mut candidates) = (0usize, 0usize);
    let mut wrong_by_kind = BTreeMap::<String, usize>::new();
    let mut clip_right = vec![false; scenes.len()];
    let mut caption_cosine = vec![f64::NAN; scenes.len()];
    let mut nearest_edit_cosine = vec![f64::NAN; scenes.len()];
    let clip_images = if let Some(vision) = &sd.image_encoder {
        for (i, (spec, layout)) in scenes.iter().enumerate() {
            let img = render_batch(&[(spec.clone(), *layout)])?;
            let emb = vision
                .forward(&clip_normalize(&img)?)?
                .image_embeds
                .ok_or_else(|| Error::invalid("image encoder", "has no visual projection"))?;
            let edits = single_word_edits_with_kind(spec);
            let mut texts = vec![spec.caption()];
            texts.extend(edits.iter().map(|(s, ..)| s.caption()));
            candidates += texts.len();
            let (ids_t, ids) = token_batch(&sd.tokenizer, &texts)?;
            let txt = pooled_text(
                &sd.text_encoder.forward(&ids_t.to_device(&sd.device)?)?,
                &ids,
                sd.tokenizer.eos(),
            )?;
            let txt = normalize(&txt)?;
            let scores: Vec<f32> = txt
                .matmul(&normalize(&emb)?.t()?)?
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1()?;
            let to_caption: Vec<f32> = txt
                .matmul(&txt.narrow(0, 0, 1)?.t()?)?
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1()?;
            caption_cosine[i] = scores[0] as f64;
            nearest_edit_cosine[i] = to_caption[1..]
                .iter()
                .fold(f64::NEG_INFINITY, |m, &c| m.max(c as f64));
            let best = (0..scores.len())
                .max_by(|&a, &b| scores[a].total_cmp(&scores[b]))
                .unwrap_or(0);
            clip_right[i] = best == 0;
            match best {
                0 => top1 += 1,
                k => {
                    *wrong_by_kind
                        .entry(edits[k - 1].1.name().into())
                        .or_default() += 1
                }
            }
        }
        scenes.len()
    } else {
        0
    };
    let frac = |k: usize, of: usize| if of == 0 { 0.0 } else { k as f64 / of as f64 };
    let by_object_count = (1..=2)
        .filter_map(|objects| {
            let picked: Vec<usize> = (0..scenes.len())
                .filter(|&i| scenes[i].0.objects.len() == objects)
                .collect();
            (!picked.is_empty()).then(|| ObjectCountSplit {
                objects,
                images: picked.len(),
                vae_psnr_mean: picked.iter().map(|&i| psnrs[i]).sum::<f64>() / picked.len() as f64,
                clip_top1: if clip_images == 0 {
                    0.0
                } else {
                    frac(
                        picked.iter().filter(|&&i| clip_right[i]).count(),
                        picked.len(),
                    )
                },
                clip_caption_cosine: median(picked.iter().map(|&i| caption_cosine[i])),
                clip_nearest_edit_cosine: median(picked.iter().map(|&i| nearest_edit_cosine[i])),
            })
        })
        .collect();
    let report = QualityReport {
        generated: n,
        steps,
        guidance,
        background_right: frac(bg, n),
        color_right: frac(color, n),
        shape_right: frac(shape, n),
        no_object_found: missing,
        vae_images: psnrs.len(),
        vae_psnr_mean: psnrs.iter().sum::<f64>() / psnrs.len().max(1) as f64,
        vae_psnr_min: psnrs.iter().copied().fold(f64::INFINITY, f64::min),
        clip_images,
        clip_top1: frac(top1, clip_images),
        clip_mean_candidates: frac(candidates, clip_images),
        clip_wrong_by_kind: wrong_by_kind,
        shape_read_as,
        by_object_count,
    };
    Ok((report, images))
}

/// The median of the finite values (the lower middle one for an even count); NaN when there are none.
fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[(v.len() - 1) / 2]
}

/// A render of `spec` at a held-out layout, H*W*3 in [0, 1] (for side-by-side grids).
pub fn reference_render(spec: &SceneSpec, layout_seed: u64) -> Vec<f32> {
    render(
        &spec.layout(HELD_OUT_LAYOUT_SEEDS + layout_seed, TOY_SIZE),
        TOY_SIZE,
    )
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_takes_the_lower_middle_of_the_finite_values() {
        assert_eq!(median([3.0, 1.0, 2.0].into_iter()), 2.0);
        assert_eq!(median([4.0, 1.0, 3.0, 2.0].into_iter()), 2.0);
        assert_eq!(median([f64::NAN, 5.0, 1.0, f64::NAN, 3.0].into_iter()), 3.0);
        assert!(median([f64::NAN].into_iter()).is_nan());
        assert!(median(std::iter::empty()).is_nan());
    }
}
