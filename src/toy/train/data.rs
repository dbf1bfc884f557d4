//! Training data: random scenes per step and stage, their renders and their token ids.

use super::*;

/// A batch of random training scenes (layout seeds below the held-out range) for one step of one stage.
pub fn training_specs(seed: u64, stage: u64, step: usize, batch: usize) -> Vec<(SceneSpec, u64)> {
    specs_for_step(seed, stage, step, batch, None)
}

/// Like `training_specs`, with a chosen share of two-object scenes (the world draws 30%).
pub(super) fn specs_for_step(
    seed: u64,
    stage: u64,
    step: usize,
    batch: usize,
    two_object_share: Option<f64>,
) -> Vec<(SceneSpec, u64)> {
    let mut rng = StdRng::seed_from_u64(
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (stage << 48) ^ step as u64,
    );
    (0..batch)
        .map(|_| {
            let objects = two_object_share.map(|share| if rng.random_bool(share) { 2 } else { 1 });
            let mut spec = SceneSpec::random(&mut rng);
            while objects.is_some_and(|n| spec.objects.len() != n) {
                spec = SceneSpec::random(&mut rng);
            }
            (spec, rng.random_range(0..HELD_OUT_LAYOUT_SEEDS))
        })
        .collect()
}

/// Renders specs at their layouts: (batch, 3, 32, 32) in [-1, 1].
pub fn render_batch(specs: &[(SceneSpec, u64)]) -> Result<Tensor> {
    let mut data = Vec::with_capacity(specs.len() * 3 * TOY_SIZE * TOY_SIZE);
    for (spec, layout) in specs {
        let px = render(&spec.layout(*layout, TOY_SIZE), TOY_SIZE);
        for c in 0..3 {
            data.extend((0..TOY_SIZE * TOY_SIZE).map(|i| px[i * 3 + c] * 2.0 - 1.0));
        }
    }
    Ok(Tensor::from_vec(
        data,
        (specs.len(), 3, TOY_SIZE, TOY_SIZE),
        &Device::Cpu,
    )?)
}

/// The CLIP text embedding pooled at the end token of each prompt (the first end token).
pub fn pooled_text(hidden: &Tensor, ids: &[Vec<u32>], eos: u32) -> Result<Tensor> {
    let (batch, len, width) = hidden.dims3()?;
    // One gather: per-row slices would each differentiate into a zero-filled copy of the whole batch, which made
    // a CLIP step's cost grow with the square of its batch.
    let flat = ids
        .iter()
        .enumerate()
        .map(|(b, row)| {
            let pos = row.iter().position(|&t| t == eos).unwrap_or(row.len() - 1);
            if b >= batch || pos >= len {
                return Err(Error::invalid(
                    "text encoder states",
                    format!("({batch}, {len}) states have no row {b}, position {pos} to pool"),
                ));
            }
            Ok((b * len + pos) as u32)
        })
        .collect::<Result<Vec<u32>>>()?;
    let index = Tensor::from_vec(flat, ids.len(), hidden.device())?;
    Ok(hidden
        .reshape((batch * len, width))?
        .index_select(&index, 0)?)
}

/// Rows scaled to unit length (the last axis), for cosine similarities.
pub(crate) fn normalize(x: &Tensor) -> Result<Tensor> {
    Ok(x.broadcast_div(&(x.sqr()?.sum_keepdim(D::Minus1)? + 1e-8)?.sqrt()?)?)
}

pub fn token_batch(
    tokenizer: &ClipTokenizer,
    captions: &[String],
) -> Result<(Tensor, Vec<Vec<u32>>)> {
    let ids: Vec<Vec<u32>> = captions
        .iter()
        .map(|c| tokenizer.encode_padded(c))
        .collect::<Result<_>>()?;
    let n = ids[0].len();
    let flat: Vec<u32> = ids.iter().flatten().copied().collect();
    Ok((Tensor::from_vec(flat, (ids.len(), n), &Device::Cpu)?, ids))
}
