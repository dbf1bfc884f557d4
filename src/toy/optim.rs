//! Training plumbing: parameters created on demand with a seeded initialisation (so a run is deterministic for
//! a seed), Adam with global-norm clipping, and resumable checkpoints written atomically.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;

pub use crate::optim::Adam;
use crate::util::{save_tensors, seeded_noise};
use crate::{Error, Result};

/// Trainable parameters by diffusers/transformers name.
#[derive(Clone)]
pub struct TrainVars {
    inner: Arc<Inner>,
}

struct Inner {
    seed: u64,
    vars: Mutex<BTreeMap<String, Var>>,
    preset: BTreeMap<String, Tensor>,
}

/// A parameter's own seed: SipHash-1-3 (zero keys) of its name mixed into the run's seed. That is what the standard
/// library's `DefaultHasher` computes today, which trained the bundled model; the `siphasher` crate pins it, since
/// the standard library may change its algorithm in any release.
fn name_seed(seed: u64, name: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = siphasher::sip::SipHasher13::new();
    name.hash(&mut h);
    seed ^ h.finish()
}

/// The CLIP temperature parameter; starts at ln(1/0.07) as in CLIP.
pub const LOGIT_SCALE: &str = "logit_scale";

/// Norm scales start at 1, biases at 0, position embeddings small, weights with 1/sqrt(fan_in).
fn initial_value(seed: u64, name: &str, shape: &Shape) -> Result<Tensor> {
    let dims = shape.dims();
    if name == LOGIT_SCALE {
        return Ok(Tensor::new(&[(1.0f32 / 0.07).ln()], &Device::Cpu)?.reshape(shape)?);
    }
    let leaf = name.rsplit('.').next().unwrap_or(name);
    let parent_is_norm = name
        .rsplit('.')
        .nth(1)
        .is_some_and(|p| p.contains("norm") || p.contains("layrnorm"));
    if leaf == "bias" {
        return Ok(Tensor::zeros(shape, DType::F32, &Device::Cpu)?);
    }
    if parent_is_norm && leaf == "weight" {
        return Ok(Tensor::ones(shape, DType::F32, &Device::Cpu)?);
    }
    if name.contains("vision_model.embeddings.position_embedding") {
        return grid_position_embedding(dims);
    }
    let noise = seeded_noise(dims, name_seed(seed, name), &Device::Cpu)?;
    let std = if name.contains("token_embedding") {
        // Large enough that words stay apart in the text encoder's output: at 0.02 (CLIP's) the attention and MLP
        // outputs swamp them and shape words start at 0.98 cosine similarity, which the toy vision encoder,
        // slow to learn shapes, never pulls apart -- and the UNet reads its conditioning from those outputs.
        0.5
    } else if name.contains("class_embedding") || name.contains("position_embedding") {
        0.02
    } else {
        let fan_in: usize = dims.iter().skip(1).product::<usize>().max(1);
        1.0 / (fan_in as f64).sqrt()
    };
    Ok((noise * std)?)
}

/// The vision encoder's position embeddings start as 2-D sine-cosine codes of each patch's row and column (the
/// class token's at zero), as in MAE: from the first step, attention can relate patches by where they are. At
/// CLIP's random 0.02 the patches' contents swamp their positions, the encoder starts as a bag of patches and
/// learns colours long before shapes.
fn grid_position_embedding(dims: &[usize]) -> Result<Tensor> {
    let (tokens, width) = (dims[0], dims[1]);
    let side = ((tokens - 1) as f64).sqrt().round() as usize;
    let quarter = width / 4;
    if side * side + 1 != tokens || quarter == 0 {
        return Err(crate::Error::invalid(
            "position_embedding",
            format!("{tokens} positions of width {width} are not a class token and a square grid"),
        ));
    }
    let mut values = vec![0f32; tokens * width];
    for row in 0..side {
        for col in 0..side {
            let at = (1 + row * side + col) * width;
            for (axis, coord) in [(0, row), (1, col)] {
                for k in 0..quarter {
                    let freq = 1.0 / 100f64.powf(k as f64 / quarter as f64);
                    let angle = coord as f64 * freq;
                    values[at + axis * 2 * quarter + k] = angle.sin() as f32;
                    values[at + axis * 2 * quarter + quarter + k] = angle.cos() as f32;
                }
            }
        }
    }
    Ok(Tensor::from_vec(values, (tokens, width), &Device::Cpu)?)
}

impl TrainVars {
    /// `preset` values (from a checkpoint) take precedence over fresh initialisation.
    pub fn new(seed: u64, preset: BTreeMap<String, Tensor>) -> Self {
        Self {
            inner: Arc::new(Inner {
                seed,
                vars: Mutex::new(BTreeMap::new()),
                preset,
            }),
        }
    }

    pub fn var_builder(&self) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), DType::F32, Device::Cpu)
    }

    /// A group holding copies of `tensors` (for values that are kept rather than optimised).
    pub fn from_tensors(tensors: &BTreeMap<String, Tensor>) -> Result<Self> {
        let vars = tensors
            .iter()
            .map(|(k, t)| Ok((k.clone(), Var::from_tensor(&t.copy()?)?)))
            .collect::<Result<BTreeMap<_, _>>>()?;
        Ok(Self {
            inner: Arc::new(Inner {
                seed: 0,
                vars: Mutex::new(vars),
                preset: BTreeMap::new(),
            }),
        })
    }

    pub fn named(&self) -> Vec<(String, Var)> {
        self.inner
            .vars
            .lock()
            .expect("vars lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The parameters whose names pass `keep`, as their own group (sharing the same variables).
    pub fn subset(&self, keep: impl Fn(&str) -> bool) -> TrainVars {
        let vars: BTreeMap<String, Var> =
            self.named().into_iter().filter(|(n, _)| keep(n)).collect();
        Self {
            inner: Arc::new(Inner {
                seed: self.inner.seed,
                vars: Mutex::new(vars),
                preset: BTreeMap::new(),
            }),
        }
    }

    pub fn parameter_count(&self) -> usize {
        self.named().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Writes the parameters as a diffusers/transformers weight file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let named = self.named();
        let list: Vec<(&str, &Tensor)> = named
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_tensor()))
            .collect();
        save_tensors(path, &list)
    }
}

impl SimpleBackend for TrainVars {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        _: DType,
        _: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut vars = self.inner.vars.lock().expect("vars lock");
        if let Some(v) = vars.get(name) {
            if v.shape() != &shape {
                candle_core::bail!(
                    "parameter {name} requested with shapes {:?} and {:?}",
                    v.dims(),
                    shape.dims()
                );
            }
            return Ok(v.as_tensor().clone());
        }
        let value = match self.inner.preset.get(name) {
            Some(t) if t.shape() == &shape => t.clone(),
            Some(t) => candle_core::bail!(
                "checkpoint holds {name} with shape {:?}, the model wants {:?}",
                t.dims(),
                shape.dims()
            ),
            None => initial_value(self.inner.seed, name, &shape)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?,
        };
        let var = Var::from_tensor(&value)?;
        let t = var.as_tensor().clone();
        vars.insert(name.to_string(), var);
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        let vars = self.inner.vars.lock().expect("vars lock");
        vars.get(name)
            .map(|v| v.as_tensor().clone())
            .ok_or_else(|| candle_core::Error::Msg(format!("no parameter {name}")))
    }

    fn contains_tensor(&self, _: &str) -> bool {
        // Optional parameters (e.g. a projection) are created when training.
        true
    }
}

/// An exponential moving average of a group's parameters: the weights a diffusion model is sampled with, as
/// in DDPM and SD, because the last iterate of a short run is noisier than its recent average.
pub struct Ema {
    /// (parameter, its average), paired once: the update runs after every optimisation step.
    pairs: Vec<(Var, Var)>,
    average: TrainVars,
    decay: f64,
}

impl Ema {
    /// Starts from `preset` (a checkpoint's average) where it has a parameter, else from its current value.
    pub fn new(of: &TrainVars, preset: &BTreeMap<String, Tensor>, decay: f64) -> Result<Self> {
        let params = of.named();
        let start: BTreeMap<String, Tensor> = params
            .iter()
            .map(|(k, v)| {
                let t = preset.get(k).unwrap_or_else(|| v.as_tensor());
                (k.clone(), t.clone())
            })
            .collect();
        let average = TrainVars::from_tensors(&start)?;
        // Both lists are sorted by name and hold the same names.
        let pairs = params
            .into_iter()
            .zip(average.named())
            .map(|((_, p), (_, a))| (p, a))
            .collect();
        Ok(Self {
            pairs,
            average,
            decay,
        })
    }

    /// Folds in the parameters after optimisation step `step` (0-based); the decay ramps up over the first
    /// steps so the average does not remember the random initialisation.
    pub fn update(&self, step: usize) -> Result<()> {
        let d = self.decay.min((1 + step) as f64 / (10 + step) as f64);
        for (param, avg) in &self.pairs {
            avg.set(&((avg.as_tensor() * d)? + (param.as_tensor().detach() * (1.0 - d))?)?)?;
        }
        Ok(())
    }

    pub fn vars(&self) -> &TrainVars {
        &self.average
    }
}

/// A resumable training checkpoint: parameters (`param.<name>`), optimiser state, and the step reached.
pub struct Checkpoint;

impl Checkpoint {
    pub fn save(
        path: &Path,
        step: usize,
        groups: &[(&str, &TrainVars)],
        adam: &Adam,
    ) -> Result<()> {
        let mut owned: Vec<(String, Tensor)> = Vec::new();
        for (prefix, vars) in groups {
            for (name, v) in vars.named() {
                owned.push((format!("param.{prefix}.{name}"), v.as_tensor().clone()));
            }
        }
        owned.extend(adam.state());
        owned.push(("step".into(), Tensor::new(&[step as u32], &Device::Cpu)?));
        let list: Vec<(&str, &Tensor)> = owned.iter().map(|(k, v)| (k.as_str(), v)).collect();
        save_tensors(path, &list)
    }

    /// What a checkpoint holds for `groups` (parameter group prefixes); empty when there is no checkpoint.
    pub fn load(path: &Path, groups: &[&str]) -> Result<Restored> {
        let mut restored = Restored {
            step: 0,
            groups: groups
                .iter()
                .map(|g| (g.to_string(), BTreeMap::new()))
                .collect(),
            adam: BTreeMap::new(),
        };
        if !path.is_file() {
            return Ok(restored);
        }
        let all = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| Error::file(path, format!("cannot read checkpoint: {e}")))?;
        restored.step = all
            .get("step")
            .map(|t| t.to_dtype(DType::F32).and_then(|t| t.to_vec1::<f32>()))
            .transpose()?
            .map(|v| v[0] as usize)
            .unwrap_or(0);
        for (k, t) in all {
            if let Some(rest) = k.strip_prefix("param.") {
                for (prefix, group) in restored.groups.iter_mut() {
                    if let Some(name) = rest.strip_prefix(&format!("{prefix}.")) {
                        group.insert(name.to_string(), t.clone());
                    }
                }
            } else if k.starts_with("adam.") {
                restored.adam.insert(k, t);
            }
        }
        Ok(restored)
    }
}

/// A stage's state read back from its checkpoint.
pub struct Restored {
    /// The step to resume from (0 without a checkpoint).
    pub step: usize,
    groups: BTreeMap<String, BTreeMap<String, Tensor>>,
    /// The optimiser's moments.
    pub adam: BTreeMap<String, Tensor>,
}

impl Restored {
    /// The parameters of group `name` (empty when the checkpoint had none), handed over once.
    pub fn take(&mut self, name: &str) -> BTreeMap<String, Tensor> {
        self.groups.remove(name).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn parameter_seeds_are_the_ones_the_bundled_model_was_trained_with() {
        // Fixed values (computed with the standard library's DefaultHasher that trained it).
        use std::hash::{Hash, Hasher};
        for name in [
            "unet.conv_in.weight",
            "text_model.embeddings.token_embedding.weight",
            "",
        ] {
            let mut std_hasher = std::collections::hash_map::DefaultHasher::new();
            name.hash(&mut std_hasher);
            assert_eq!(super::name_seed(0, name), std_hasher.finish(), "{name}");
        }
    }

    use super::*;

    #[test]
    fn vision_positions_start_as_a_grid_code() {
        let vars = TrainVars::new(0, BTreeMap::new());
        let emb = vars
            .var_builder()
            .get(
                (65, 64),
                "vision_model.embeddings.position_embedding.weight",
            )
            .unwrap();
        let rows: Vec<Vec<f32>> = emb.to_vec2().unwrap();
        assert!(rows[0].iter().all(|&v| v == 0.0), "class token at zero");
        let dot =
            |a: usize, b: usize| -> f32 { rows[a].iter().zip(&rows[b]).map(|(x, y)| x * y).sum() };
        // Token 1 + 8 * row + col. Every patch has the same norm; neighbours are more alike than far patches.
        let (corner, right, below, far) = (1, 2, 9, 1 + 8 * 7 + 7);
        assert!((dot(corner, corner) - dot(far, far)).abs() < 1e-4);
        assert!(dot(corner, right) > dot(corner, far));
        assert!(dot(corner, below) > dot(corner, far));
        for a in 1..65 {
            for b in (a + 1)..65 {
                assert!(
                    dot(a, b) < dot(a, a) - 1e-3,
                    "patches {a} and {b} share a code"
                );
            }
        }
        // A text encoder's positions keep CLIP's small random start.
        let text = vars
            .var_builder()
            .get((77, 64), "text_model.embeddings.position_embedding.weight")
            .unwrap();
        let std = text
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt();
        assert!(std > 0.01 && std < 0.04, "text position std {std}");
        assert!(grid_position_embedding(&[66, 64]).is_err());
    }

    fn one_parameter(values: [f32; 2]) -> BTreeMap<String, Tensor> {
        BTreeMap::from([("w".to_string(), Tensor::new(&values, &Device::Cpu).unwrap())])
    }

    fn only_value(vars: &TrainVars) -> Vec<f32> {
        vars.named()[0].1.as_tensor().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn the_average_follows_the_parameters_with_a_ramped_decay() {
        let vars = TrainVars::new(0, one_parameter([1.0, 2.0]));
        let w = vars.var_builder().get(2, "w").unwrap();
        assert_eq!(w.to_vec1::<f32>().unwrap(), [1.0, 2.0]);
        let ema = Ema::new(&vars, &BTreeMap::new(), 0.999).unwrap();
        let (_, var) = vars.named().remove(0);
        var.set(&Tensor::new(&[11.0f32, 2.0], &Device::Cpu).unwrap())
            .unwrap();
        // Step 0: decay min(0.999, 1/10) = 0.1.
        ema.update(0).unwrap();
        let avg = only_value(ema.vars());
        assert!((avg[0] - (0.1 * 1.0 + 0.9 * 11.0)).abs() < 1e-5, "{avg:?}");
        assert!((avg[1] - 2.0).abs() < 1e-6);
        // The source keeps its own values.
        assert_eq!(only_value(&vars), [11.0, 2.0]);
        // Late steps use the full decay; a checkpoint's average takes precedence over the current values.
        let resumed = Ema::new(&vars, &one_parameter([0.0, 0.0]), 0.999).unwrap();
        resumed.update(100_000).unwrap();
        let avg = only_value(resumed.vars());
        assert!((avg[0] - 0.001 * 11.0).abs() < 1e-6, "{avg:?}");
    }
}
