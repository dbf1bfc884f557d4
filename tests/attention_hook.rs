//! The one attention hook: what every layer reports, that observing changes nothing, that replacing
//! probabilities or the value input changes the output, and that gradients reach a value input.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use stylediff::model::ComponentKind;
use stylediff::model::hook::{
    AttentionCall, AttentionHook, AttentionKind, Branch, HookedPass, Place,
};
use stylediff::model::unet::{UNet2DConditionModel, UNetConfig};

fn tiny_unet(dtype: DType) -> UNet2DConditionModel {
    let dir = common::repo_path("tests/fixtures/sd1-tiny/unet");
    let cfg = UNetConfig::load(&dir.join("config.json")).unwrap();
    UNet2DConditionModel::load(
        &cfg,
        ComponentKind::Unet
            .var_builder(&dir, dtype, &Device::Cpu)
            .unwrap(),
    )
    .unwrap()
}

fn inputs(dtype: DType) -> (Tensor, Tensor) {
    let refs = candle_core::safetensors::load(
        common::repo_path("tests/fixtures/sd1-tiny-refs.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let latents = refs["unet.square.latents"]
        .narrow(0, 0, 1)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let context = refs["text.embeddings"]
        .narrow(0, 0, 1)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    (latents, context)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[derive(Default)]
struct Recorder {
    calls: Vec<(AttentionCall, Vec<usize>, f64)>,
    value_requests: usize,
}

impl AttentionHook for Recorder {
    fn value_input(
        &mut self,
        call: &AttentionCall,
        _key: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        assert!(
            call.is_cross(),
            "value input is asked only of cross-attention"
        );
        self.value_requests += 1;
        Ok(None)
    }
    fn attention_probs(
        &mut self,
        call: &AttentionCall,
        probs: Tensor,
    ) -> candle_core::Result<Tensor> {
        // Largest deviation of a row sum from 1.
        let sums = probs.sum_keepdim(3)?.to_dtype(DType::F64)?;
        let dev = (sums - 1.0)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f64>()?;
        self.calls.push((*call, probs.dims().to_vec(), dev));
        Ok(probs)
    }
}

#[test]
fn every_attention_layer_reports_to_the_hook_and_observing_changes_nothing() {
    let unet = tiny_unet(DType::F32);
    let (latents, context) = inputs(DType::F32);
    let plain = unet.forward(&latents, 500.0, &context, None).unwrap();
    let mut rec = Recorder::default();
    let hooked = unet
        .forward(
            &latents,
            500.0,
            &context,
            Some(&mut HookedPass::new(&mut rec, Branch::Conditional, 7)),
        )
        .unwrap();
    // Without a hook the attention runs the fused kernel; a hook that sees the probabilities gets the exact
    // path. Both compute the same function: equal to float rounding.
    let scale = max_abs_diff(&plain, &(&plain * 0.0).unwrap());
    assert!(
        max_abs_diff(&plain, &hooked) <= 1e-5 * scale,
        "an observing hook must not change the output"
    );
    // Observing twice gives the same bits.
    let again = unet
        .forward(
            &latents,
            500.0,
            &context,
            Some(&mut HookedPass::new(
                &mut Recorder::default(),
                Branch::Conditional,
                7,
            )),
        )
        .unwrap();
    assert_eq!(max_abs_diff(&hooked, &again), 0.0);

    // sd1-tiny: 2 cross-attention levels x 2 layers down, 1 mid, 2 levels x 3 layers up = 11 transformers,
    // each with one self- and one cross-attention.
    assert_eq!(rec.calls.len(), 22);
    assert_eq!(rec.value_requests, 11);
    let count = |p: Place| {
        rec.calls
            .iter()
            .filter(|(c, ..)| c.layer.place == p)
            .count()
    };
    assert_eq!(
        (count(Place::Down), count(Place::Mid), count(Place::Up)),
        (8, 2, 12)
    );
    for (call, dims, dev) in &rec.calls {
        assert_eq!((call.branch, call.step), (Branch::Conditional, 7));
        let keys = if call.layer.kind == AttentionKind::CrossAttention {
            77
        } else {
            call.queries()
        };
        assert_eq!(dims, &vec![1, 2, call.queries(), keys], "{call:?}");
        assert!(*dev < 1e-5, "probabilities must sum to 1 over keys ({dev})");
        // 8x8 latent: level 0 at 8x8, level 1 at 4x4, mid at 2x2.
        let expected_grid = match (call.layer.place, call.layer.block) {
            (Place::Mid, _) => (2, 2),
            (Place::Down, 0) | (Place::Up, 2) => (8, 8),
            _ => (4, 4),
        };
        assert_eq!(call.query_grid, expected_grid, "{call:?}");
    }
    // Layer identities are distinct.
    let mut ids: Vec<_> = rec.calls.iter().map(|(c, ..)| c.layer).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 22);
}

/// Replaces every cross-attention map with a uniform one.
struct Uniform;
impl AttentionHook for Uniform {
    fn attention_probs(
        &mut self,
        call: &AttentionCall,
        probs: Tensor,
    ) -> candle_core::Result<Tensor> {
        if call.is_cross() {
            probs.ones_like()? / probs.dim(3)? as f64
        } else {
            Ok(probs)
        }
    }
}

struct ValueOverride(Tensor);
impl AttentionHook for ValueOverride {
    fn value_input(
        &mut self,
        _call: &AttentionCall,
        _key: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.0.clone()))
    }
}

#[test]
fn replacing_probabilities_or_values_changes_the_output() {
    let unet = tiny_unet(DType::F32);
    let (latents, context) = inputs(DType::F32);
    let plain = unet.forward(&latents, 500.0, &context, None).unwrap();
    let uniform = unet
        .forward(
            &latents,
            500.0,
            &context,
            Some(&mut HookedPass::new(&mut Uniform, Branch::Conditional, 0)),
        )
        .unwrap();
    assert!(max_abs_diff(&plain, &uniform) > 1e-3);

    // The key input as value input reproduces the plain (exact-path) output exactly; another value input does
    // not. The reference observes every layer, so that both take the exact attention path.
    let plain = unet
        .forward(
            &latents,
            500.0,
            &context,
            Some(&mut HookedPass::new(
                &mut Recorder::default(),
                Branch::Conditional,
                0,
            )),
        )
        .unwrap();
    let same = unet
        .forward(
            &latents,
            500.0,
            &context,
            Some(&mut HookedPass::new(
                &mut ValueOverride(context.clone()),
                Branch::Conditional,
                0,
            )),
        )
        .unwrap();
    assert_eq!(max_abs_diff(&plain, &same), 0.0);
    let scaled = (&context * 1.5).unwrap();
    let other = unet
        .forward(
            &latents,
            500.0,
            &context,
            Some(&mut HookedPass::new(
                &mut ValueOverride(scaled),
                Branch::Conditional,
                0,
            )),
        )
        .unwrap();
    assert!(max_abs_diff(&plain, &other) > 1e-3);

    // A value input of the wrong shape is refused with both shapes named.
    let bad = context.narrow(1, 0, 10).unwrap();
    let err = unet
        .forward(
            &latents,
            500.0,
            &context,
            Some(&mut HookedPass::new(
                &mut ValueOverride(bad),
                Branch::Conditional,
                0,
            )),
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("[1, 10, 32]") && err.contains("[1, 77, 32]"),
        "{err}"
    );
}

/// Supplies a trainable value input to every cross-attention layer.
struct TrainableValue(Tensor);
impl AttentionHook for TrainableValue {
    fn value_input(
        &mut self,
        _call: &AttentionCall,
        _key: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.0.clone()))
    }
}

fn loss(unet: &UNet2DConditionModel, latents: &Tensor, context: &Tensor, value: &Tensor) -> Tensor {
    let mut hook = TrainableValue(value.clone());
    let out = unet
        .forward(
            latents,
            500.0,
            context,
            Some(&mut HookedPass::new(&mut hook, Branch::Conditional, 0)),
        )
        .unwrap();
    // A target-free quadratic: the latent-reconstruction loss of StyleDiffusion has this shape.
    (out - latents).unwrap().sqr().unwrap().mean_all().unwrap()
}

#[test]
fn gradient_reaches_the_value_input_and_matches_finite_differences() {
    // f64 so that central differences are accurate.
    let unet = tiny_unet(DType::F64);
    let (latents, context) = inputs(DType::F64);
    let value = Var::from_tensor(&context).unwrap();
    let l = loss(&unet, &latents, &context, value.as_tensor());
    let grads = l.backward().unwrap();
    let g = grads
        .get(value.as_tensor())
        .expect("the value input must receive a gradient");
    let g_norm = g
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(
        g_norm.is_finite() && g_norm > 1e-8,
        "gradient norm {g_norm}"
    );
    // Keys keep the text: only the value input is a variable here, so the gradient flows through values alone.

    let direction = stylediff::util::seeded_noise(context.dims(), 3, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let analytic = (g * &direction)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let eps = 1e-4;
    let plus = loss(
        &unet,
        &latents,
        &context,
        &(&context + (&direction * eps).unwrap()).unwrap(),
    )
    .to_scalar::<f64>()
    .unwrap();
    let minus = loss(
        &unet,
        &latents,
        &context,
        &(&context - (&direction * eps).unwrap()).unwrap(),
    )
    .to_scalar::<f64>()
    .unwrap();
    let numeric = (plus - minus) / (2.0 * eps);
    let rel = (analytic - numeric).abs() / numeric.abs().max(1e-12);
    eprintln!(
        "directional derivative: analytic {analytic:.9e}, finite difference {numeric:.9e}, relative error {rel:.2e}"
    );
    assert!(rel < 1e-5, "analytic {analytic} vs numeric {numeric}");
}
