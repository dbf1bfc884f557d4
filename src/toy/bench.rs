//! The editing benchmark on the toy world, where every edit has an exact ground truth: StyleDiffusion against
//! its baselines under the same Prompt-to-Prompt settings (taken from each pair's manifest).

use std::time::Instant;

use candle_core::{DType, Tensor};

use super::check::detect;
use super::edits::{EditKind, EditPair};
use super::eval::to_hwc01;
use super::pairs::{PairCase, render_pair};
use super::render::to_rgb_image;
use super::train::{TOY_SIZE, pooled_text, token_batch};
use crate::denoise::Monitor;
use crate::edit::EditSettings;
use crate::invert::{Inversion, InversionSettings, Method};
use crate::model::StableDiffusion;
use crate::model::clip::vision::clip_normalize;
use crate::{Error, Result};

/// The benchmark's methods: an inversion method with the editing it is meant for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum BenchMethod {
    /// Plain DDIM inversion, Prompt-to-Prompt editing.
    Ddim,
    /// Null-text inversion, Prompt-to-Prompt editing.
    NullText,
    /// Negative-prompt inversion, Prompt-to-Prompt editing.
    NegativePrompt,
    /// StyleDiffusion, Prompt-to-Prompt editing.
    StylediffusionP2p,
    /// StyleDiffusion, P2Plus editing (tau_u 0.5).
    StylediffusionP2plus,
    /// StyleDiffusion without attention regularisation, P2Plus editing.
    StylediffusionNoreg,
}

impl BenchMethod {
    pub const ALL: [Self; 6] = [
        Self::Ddim,
        Self::NullText,
        Self::NegativePrompt,
        Self::StylediffusionP2p,
        Self::StylediffusionP2plus,
        Self::StylediffusionNoreg,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Ddim => "ddim",
            Self::NullText => "null-text",
            Self::NegativePrompt => "negative-prompt",
            Self::StylediffusionP2p => "stylediffusion-p2p",
            Self::StylediffusionP2plus => "stylediffusion-p2plus",
            Self::StylediffusionNoreg => "stylediffusion-noreg",
        }
    }

    /// (inversion method, attention weight, tau_u).
    fn setup(self) -> (Method, f64, f64) {
        match self {
            Self::Ddim => (Method::Ddim, 1.0, 0.0),
            Self::NullText => (Method::NullText, 1.0, 0.0),
            Self::NegativePrompt => (Method::NegativePrompt, 1.0, 0.0),
            Self::StylediffusionP2p => (Method::StyleDiffusion, 1.0, 0.0),
            Self::StylediffusionP2plus => (Method::StyleDiffusion, 1.0, 0.5),
            Self::StylediffusionNoreg => (Method::StyleDiffusion, 0.0, 0.5),
        }
    }
}

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub steps: usize,
    pub inner_steps: usize,
    /// StyleDiffusion's value-injection window for the target branch (the other methods have no learned values).
    pub tau_v: f64,
    pub methods: Vec<BenchMethod>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct BenchRow {
    pub case: usize,
    pub method: String,
    pub edit_kind: String,
    pub objects: usize,
    #[serde(deserialize_with = "number_or_nan")]
    pub psnr_gt: f64,
    #[serde(deserialize_with = "number_or_nan")]
    pub ssim_gt: f64,
    #[serde(deserialize_with = "number_or_nan")]
    pub psnr_unchanged: f64,
    pub success: bool,
    #[serde(deserialize_with = "number_or_nan")]
    pub clip_score: f64,
    #[serde(deserialize_with = "number_or_nan")]
    pub structure_dist: f64,
    #[serde(deserialize_with = "number_or_nan")]
    pub recon_psnr: f64,
    #[serde(deserialize_with = "number_or_nan")]
    pub seconds: f64,
    pub unet_evals: usize,
    #[serde(deserialize_with = "number_or_nan")]
    pub peak_mb: f64,
}

/// JSON has no NaN or infinity (serde_json writes them as null); a kept row reads them back as NaN, which the
/// summary leaves out as it does for a fresh one (e.g. psnr_unchanged when the edit may change every pixel).
fn number_or_nan<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    use serde::Deserialize;
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

pub const CSV_HEADER: &str = "case,method,edit_kind,objects,psnr_gt,ssim_gt,psnr_unchanged,success,clip_score,structure_dist,recon_psnr,seconds,unet_evals,peak_mb";

impl BenchRow {
    /// The row's fields as results.csv writes them (rounded to what the measurements resolve).
    pub fn csv_record(&self) -> [String; 14] {
        [
            self.case.to_string(),
            self.method.clone(),
            self.edit_kind.clone(),
            self.objects.to_string(),
            format!("{:.4}", self.psnr_gt),
            format!("{:.5}", self.ssim_gt),
            format!("{:.4}", self.psnr_unchanged),
            (self.success as u8).to_string(),
            format!("{:.5}", self.clip_score),
            format!("{:.6}", self.structure_dist),
            format!("{:.4}", self.recon_psnr),
            format!("{:.3}", self.seconds),
            self.unet_evals.to_string(),
            format!("{:.1}", self.peak_mb),
        ]
    }
}

/// results.csv of the benchmark: the header, then every row.
pub fn results_csv(rows: &[BenchRow]) -> Result<Vec<u8>> {
    let mut w = csv::Writer::from_writer(Vec::new());
    let bad = |e: csv::Error| Error::invalid("benchmark table", e.to_string());
    w.write_record(CSV_HEADER.split(',')).map_err(bad)?;
    for r in rows {
        w.write_record(r.csv_record()).map_err(bad)?;
    }
    w.into_inner()
        .map_err(|e| Error::invalid("benchmark table", e.to_string()))
}

fn psnr_masked(a: &[f32], b: &[f32], keep: impl Fn(usize) -> bool) -> f64 {
    let (mut se, mut n) = (0f64, 0usize);
    for i in 0..a.len() / 3 {
        if keep(i) {
            for c in 0..3 {
                se += ((a[i * 3 + c] - b[i * 3 + c]) as f64).powi(2);
                n += 1;
            }
        }
    }
    if n == 0 {
        f64::NAN
    } else {
        10.0 * (1.0 / (se / n as f64).max(1e-12)).log10()
    }
}

/// SSIM on luminance with 7x7 uniform windows (valid positions), constants for a data range of 1.
pub fn ssim(a: &[f32], b: &[f32], size: usize) -> f64 {
    let lum = |p: &[f32]| -> Vec<f64> {
        p.chunks(3)
            .map(|c| (0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]) as f64)
            .collect()
    };
    let (x, y) = (lum(a), lum(b));
    let (c1, c2) = (0.01f64.powi(2), 0.03f64.powi(2));
    let w = 7usize.min(size);
    let (mut total, mut count) = (0.0, 0usize);
    for oy in 0..=size - w {
        for ox in 0..=size - w {
            let idx: Vec<usize> = (0..w * w)
                .map(|k| (oy + k / w) * size + ox + k % w)
                .collect();
            let n = idx.len() as f64;
            let mx = idx.iter().map(|&i| x[i]).sum::<f64>() / n;
            let my = idx.iter().map(|&i| y[i]).sum::<f64>() / n;
            let vx = idx.iter().map(|&i| (x[i] - mx).powi(2)).sum::<f64>() / (n - 1.0);
            let vy = idx.iter().map(|&i| (y[i] - my).powi(2)).sum::<f64>() / (n - 1.0);
            let cov = idx.iter().map(|&i| (x[i] - mx) * (y[i] - my)).sum::<f64>() / (n - 1.0);
            total += ((2.0 * mx * my + c1) * (2.0 * cov + c2))
                / ((mx * mx + my * my + c1) * (vx + vy + c2));
            count += 1;
        }
    }
    total / count as f64
}

struct Encoders<'a> {
    sd: &'a StableDiffusion,
}

impl Encoders<'_> {
    /// (normalised image embedding, patch tokens (P, D)) of an image (1, 3, 32, 32) in [-1, 1].
    fn image(&self, image: &Tensor) -> Result<(Tensor, Tensor)> {
        let enc = self.sd.image_encoder.as_ref().ok_or_else(|| {
            Error::invalid(
                "image encoder",
                "the benchmark needs the toy CLIP image encoder",
            )
        })?;
        let out = enc.forward(&clip_normalize(image)?)?;
        let emb = out
            .image_embeds
            .ok_or_else(|| Error::invalid("image encoder", "has no visual projection"))?;
        let emb = emb.broadcast_div(&emb.sqr()?.sum_keepdim(1)?.sqrt()?)?;
        let tokens = out.tokens.get(0)?;
        let n = tokens.dim(0)?;
        Ok((emb, tokens.narrow(0, 1, n - 1)?))
    }

    fn text(&self, caption: &str) -> Result<Tensor> {
        let (ids_t, ids) = token_batch(&self.sd.tokenizer, &[caption.to_string()])?;
        let t = pooled_text(
            &self.sd.text_encoder.forward(&ids_t)?,
            &ids,
            self.sd.tokenizer.eos(),
        )?;
        Ok(t.broadcast_div(&t.sqr()?.sum_keepdim(1)?.sqrt()?)?)
    }
}

/// Whether the edited attribute reads back as the target's, with the renderer-based checker. It reads one object's
/// colour and shape and the background, so it decides colour, shape and background edits of one-object scenes;
/// None for the others (styles, two-object scenes).
fn attribute_check(pair: &EditPair, edited: &[f32]) -> Option<bool> {
    if pair.source.objects.len() != 1 {
        return None;
    }
    let want = &pair.target;
    let got = detect(edited, TOY_SIZE);
    match pair.kind {
        EditKind::Color => Some(got.is_some_and(|d| d.color == want.objects[0].color)),
        EditKind::Shape => Some(got.is_some_and(|d| d.shape == want.objects[0].shape)),
        EditKind::Background => Some(got.is_some_and(|d| d.background == want.background)),
        EditKind::Style | EditKind::AddStyle => None,
    }
}

/// The cosine self-similarity matrix of patch tokens (the structure the paper measures with DINO).
fn self_similarity(tokens: &Tensor) -> Result<Tensor> {
    let n = tokens.broadcast_div(&(tokens.sqr()?.sum_keepdim(1)? + 1e-12)?.sqrt()?)?;
    Ok(n.matmul(&n.t()?)?)
}

/// Runs every method on one case; returns the rows and the edited images (H*W*3 in [0, 1]) in method order.
pub fn run_case(
    sd: &StableDiffusion,
    case: &PairCase,
    opts: &BenchOptions,
) -> Result<(Vec<BenchRow>, Vec<Vec<f32>>)> {
    crate::runtime::on_worker_thread(|| run_case_here(sd, case, opts))
}

fn run_case_here(
    sd: &StableDiffusion,
    case: &PairCase,
    opts: &BenchOptions,
) -> Result<(Vec<BenchRow>, Vec<Vec<f32>>)> {
    let pair = &case.pair;
    let r = render_pair(pair, case.layout_seed);
    let dev = &sd.device;
    let input = crate::util::image_to_tensor(&to_rgb_image(&r.source, TOY_SIZE), dev)?;
    let input01 = to_hwc01(&input)?;
    let p2p = pair.p2p();
    let enc = Encoders { sd };
    let target_text = enc.text(&pair.target.caption())?;
    let (_, input_tokens) = enc.image(&input)?;
    let input_structure = self_similarity(&input_tokens)?;
    let mut rows = Vec::new();
    let mut images = Vec::new();
    // StyleDiffusion with regularisation serves both the P2P and the P2Plus rows; its cost counts for each.
    let mut cached: Option<(Inversion, f64, usize)> = None;
    for bench_method in &opts.methods {
        let (method, weight, tau_u) = bench_method.setup();
        crate::engine_bench::reset_peak_memory();
        let evals0 = sd.unet.evaluations();
        let start = Instant::now();
        let reuse = method == Method::StyleDiffusion && weight > 0.0 && cached.is_some();
        let (inv, inv_seconds, inv_evals) = if reuse {
            cached.clone().expect("checked")
        } else {
            let mut s = InversionSettings::new(method);
            s.steps = opts.steps;
            if method == Method::StyleDiffusion {
                s.inner_steps = opts.inner_steps;
            }
            s.attention_weight = weight;
            let inv = crate::invert::invert(
                sd,
                &input,
                &pair.source.caption(),
                &s,
                &mut Monitor::silent(),
            )?;
            let out = (
                inv,
                start.elapsed().as_secs_f64(),
                sd.unet.evaluations() - evals0,
            );
            if method == Method::StyleDiffusion && weight > 0.0 {
                cached = Some(out.clone());
            }
            out
        };
        let edit_start = Instant::now();
        let evals1 = sd.unet.evaluations();
        let mut e = EditSettings::new(pair.target.caption());
        e.mode = p2p.mode;
        e.blend = Some((
            vec![p2p.blend_source.clone()],
            vec![p2p.blend_target.clone()],
        ));
        e.tau_u = tau_u;
        e.tau_v = opts.tau_v;
        let out = crate::edit::edit(sd, &inv, &e, &mut Monitor::silent())?;
        let edit_seconds = edit_start.elapsed().as_secs_f64();
        let edit_evals = sd.unet.evaluations() - evals1;
        let edited = to_hwc01(&out.edited)?;
        let in_mask = |i: usize| r.mask[i];
        let mse_in = |a: &[f32], b: &[f32]| -> f64 {
            let p = psnr_masked(a, b, in_mask);
            if p.is_nan() {
                0.0
            } else {
                10f64.powf(-p / 10.0)
            }
        };
        let (img_emb, tokens) = enc.image(&out.edited.to_dtype(DType::F32)?)?;
        let clip_score = img_emb
            .matmul(&target_text.t()?)?
            .flatten_all()?
            .to_vec1::<f32>()?[0] as f64;
        let structure_dist = (self_similarity(&tokens)? - &input_structure)?
            .sqr()?
            .mean_all()?
            .to_scalar::<f32>()? as f64;
        rows.push(BenchRow {
            case: case.case,
            method: bench_method.name().to_string(),
            edit_kind: pair.kind.name().to_string(),
            objects: pair.source.objects.len(),
            psnr_gt: psnr_masked(&edited, &r.target, |_| true),
            ssim_gt: ssim(&edited, &r.target, TOY_SIZE),
            psnr_unchanged: psnr_masked(&edited, &input01, |i| !r.mask[i]),
            success: match attribute_check(pair, &edited) {
                Some(ok) => ok,
                // Inside the changed region the edit is closer to the ground truth than to the input.
                None => mse_in(&edited, &r.target) < mse_in(&edited, &r.source),
            },
            clip_score,
            structure_dist,
            recon_psnr: inv.recon_psnr,
            seconds: inv_seconds + edit_seconds,
            unet_evals: inv_evals + edit_evals,
            peak_mb: crate::engine_bench::peak_memory_mib().unwrap_or(0.0),
        });
        images.push(edited);
    }
    Ok((rows, images))
}

/// Mean and 95% interval half-width (normal approximation) of finite values.
pub fn mean_ci(values: &[f64]) -> (f64, f64, usize) {
    let v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    let n = v.len();
    if n == 0 {
        return (f64::NAN, f64::NAN, 0);
    }
    let mean = v.iter().sum::<f64>() / n as f64;
    let var = if n > 1 {
        v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64
    } else {
        0.0
    };
    (mean, 1.96 * (var / n as f64).sqrt(), n)
}

/// summary.md: one row per method, mean +- 95% interval (1.96 standard errors) of every measure; then, when
/// null-text ran, each other method's per-case difference from it.
pub fn summary_markdown(rows: &[BenchRow], methods: &[String]) -> String {
    type Get = fn(&BenchRow) -> f64;
    let measures: [(&str, Get); 10] = [
        ("psnr_gt", |r| r.psnr_gt),
        ("ssim_gt", |r| r.ssim_gt),
        ("psnr_unchanged", |r| r.psnr_unchanged),
        ("success", |r| r.success as u8 as f64),
        ("clip_score", |r| r.clip_score),
        ("structure_dist", |r| r.structure_dist),
        ("recon_psnr", |r| r.recon_psnr),
        ("seconds", |r| r.seconds),
        ("unet_evals", |r| r.unet_evals as f64),
        ("peak_mb", |r| r.peak_mb),
    ];
    let mut md = format!(
        "| method | n | {} |\n|---|---|{}\n",
        measures.iter().map(|m| m.0).collect::<Vec<_>>().join(" | "),
        "---|".repeat(measures.len())
    );
    for m in methods {
        let mine: Vec<&BenchRow> = rows.iter().filter(|r| &r.method == m).collect();
        let cells: Vec<String> = measures
            .iter()
            .map(|(_, get)| {
                let (mean, ci, _) = mean_ci(&mine.iter().map(|r| get(r)).collect::<Vec<_>>());
                format!("{mean:.4} ± {ci:.4}")
            })
            .collect();
        md.push_str(&format!(
            "| {m} | {} | {} |\n",
            mine.len(),
            cells.join(" | ")
        ));
    }
    // The paper's claim is relative to null-text inversion: per-case differences remove the cases' own spread.
    let reference = "null-text";
    if methods.iter().any(|m| m == reference) && methods.len() > 1 {
        let quality = &measures[..6];
        md.push_str(&format!(
            "\nPaired with {reference} on the same cases (method minus {reference}, mean ± 95% interval):\n\n| method | n | {} |\n|---|---|{}\n",
            quality.iter().map(|m| m.0).collect::<Vec<_>>().join(" | "),
            "---|".repeat(quality.len())
        ));
        let of = |m: &str| -> std::collections::BTreeMap<usize, &BenchRow> {
            rows.iter()
                .filter(|r| r.method == m)
                .map(|r| (r.case, r))
                .collect()
        };
        let base = of(reference);
        for m in methods.iter().filter(|m| *m != reference) {
            let pairs: Vec<(&BenchRow, &BenchRow)> = of(m)
                .into_iter()
                .filter_map(|(case, r)| base.get(&case).map(|b| (r, *b)))
                .collect();
            let cells: Vec<String> = quality
                .iter()
                .map(|(_, get)| {
                    let d: Vec<f64> = pairs.iter().map(|(r, b)| get(r) - get(b)).collect();
                    let (mean, ci, _) = mean_ci(&d);
                    format!("{mean:+.4} ± {ci:.4}")
                })
                .collect();
            md.push_str(&format!(
                "| {m} | {} | {} |\n",
                pairs.len(),
                cells.join(" | ")
            ));
        }
    }
    md
}
