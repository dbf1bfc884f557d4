//! The real checkpoints without their weights: each architecture built from the real config.json must ask for
//! exactly the tensors of the published manifest (names and shapes), in the modern and the 2022 spelling.

mod common;

use std::path::Path;

use stylediff::model::ComponentKind;
use stylediff::model::weights::{Catalog, Mismatch};

fn audit(kind: ComponentKind, config: &Path, manifest: &Path) -> Vec<Mismatch> {
    kind.audit(config, Catalog::from_manifest(manifest).unwrap())
        .unwrap()
}

fn assert_exact(kind: ComponentKind, dir: &Path, manifest: &str) {
    let manifest_path = dir.join(manifest);
    let problems = audit(kind, &dir.join("config.json"), &manifest_path);
    assert!(
        problems.is_empty(),
        "{} vs {}: {} problems, first: {:?}",
        kind.folder_name(),
        manifest_path.display(),
        problems.len(),
        problems
            .iter()
            .take(5)
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
    );
    let n = Catalog::from_manifest(&manifest_path)
        .unwrap()
        .tensors
        .len();
    eprintln!("{} {manifest}: all {n} tensors match", dir.display());
}

#[test]
fn sd_v1_5_components_match_their_manifests() {
    let Some(f) = common::shared_fixtures() else {
        return;
    };
    let root = f.join("real-models/sd-v1-5");
    assert_exact(ComponentKind::Unet, &root.join("unet"), "manifest.json");
    assert_exact(ComponentKind::Vae, &root.join("vae"), "manifest.json");
    assert_exact(
        ComponentKind::TextEncoder,
        &root.join("text_encoder"),
        "manifest.json",
    );
}

#[test]
fn sd_v1_5_legacy_2022_spelling_is_accepted() {
    let Some(f) = common::shared_fixtures() else {
        return;
    };
    let root = f.join("real-models/sd-v1-5");
    assert_exact(
        ComponentKind::Vae,
        &root.join("vae"),
        "manifest_legacy_2022.json",
    );
    assert_exact(
        ComponentKind::TextEncoder,
        &root.join("text_encoder"),
        "manifest_legacy_2022.json",
    );
}

#[test]
fn sd_2_1_base_components_match_their_manifests() {
    let Some(f) = common::shared_fixtures() else {
        return;
    };
    let root = f.join("real-models/sd-2-1-base");
    assert_exact(ComponentKind::Unet, &root.join("unet"), "manifest.json");
    assert_exact(ComponentKind::Vae, &root.join("vae"), "manifest.json");
    assert_exact(
        ComponentKind::TextEncoder,
        &root.join("text_encoder"),
        "manifest.json",
    );
}

#[test]
fn clip_vit_b16_image_encoder_matches_both_checkpoint_layouts() {
    let Some(f) = common::shared_fixtures() else {
        return;
    };
    let dir = f.join("real-models/clip-vit-base-patch16/image_encoder");
    assert_exact(ComponentKind::ImageEncoder, &dir, "manifest.json");
    // The full CLIPModel checkpoint: vision tower used, text tower ignored.
    let full = audit(
        ComponentKind::ImageEncoder,
        &dir.join("config.json"),
        &dir.join("../full_clip_model_manifest.json"),
    );
    assert!(
        full.is_empty(),
        "{:?}",
        full.iter()
            .take(5)
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
    );
    let cfg =
        stylediff::model::clip::vision::ClipVisionConfig::load(&dir.join("config.json")).unwrap();
    assert_eq!(
        (cfg.tokens(), cfg.hidden_size),
        (197, 768),
        "ViT-B/16 gives 197 tokens x 768"
    );
}

/// The audit is not vacuous: a wrong config or a damaged manifest is reported tensor by tensor.
#[test]
fn audit_reports_missing_wrong_shape_and_unexpected_tensors() {
    let Some(f) = common::shared_fixtures() else {
        return;
    };
    let unet = f.join("real-models/sd-v1-5/unet");
    // SD 2.1's UNet config against SD 1.5's manifest: cross-attention width 1024 vs 768, linear vs conv projections.
    let wrong = audit(
        ComponentKind::Unet,
        &f.join("real-models/sd-2-1-base/unet/config.json"),
        &unet.join("manifest.json"),
    );
    assert!(
        wrong.iter().any(
            |m| matches!(m, Mismatch::Shape { name, .. } if name.ends_with("attn2.to_k.weight"))
        )
    );

    let mut catalog = Catalog::from_manifest(&unet.join("manifest.json")).unwrap();
    catalog.tensors.remove("conv_in.weight");
    catalog.tensors.get_mut("conv_out.bias").unwrap().shape = vec![5];
    let extra = catalog.tensors["conv_out.weight"].clone();
    catalog.tensors.insert("made_up.weight".into(), extra);
    let problems = ComponentKind::Unet
        .audit(&unet.join("config.json"), catalog)
        .unwrap();
    assert_eq!(problems.len(), 3, "{problems:?}");
    assert!(problems.contains(&Mismatch::Missing {
        name: "conv_in.weight".into(),
        expected: vec![320, 4, 3, 3]
    }));
    assert!(problems.contains(&Mismatch::Shape {
        name: "conv_out.bias".into(),
        expected: vec![4],
        found: vec![5]
    }));
    assert!(
        problems
            .iter()
            .any(|m| matches!(m, Mismatch::Unexpected { name, .. } if name == "made_up.weight"))
    );
}

/// The single-file name table on SD v1.5's real configs: every parameter of the real manifests has an original
/// name, no two share one, and well-known names of the published v1.5 checkpoint come out as they are there.
#[test]
fn sd_v1_5_names_map_to_the_original_checkpoint_layout() {
    let Some(f) = common::shared_fixtures() else {
        return;
    };
    use stylediff::model::single_file::{unet_name, vae_name};
    let dir = f.join("real-models/sd-v1-5");
    let unet_cfg = stylediff::model::unet::UNetConfig::load(&dir.join("unet/config.json")).unwrap();
    let vae_cfg = stylediff::model::vae::VaeConfig::load(&dir.join("vae/config.json")).unwrap();
    for (component, map) in [
        (
            "unet",
            &(|n: &str| unet_name(n, &unet_cfg)) as &dyn Fn(&str) -> Option<String>,
        ),
        ("vae", &|n: &str| vae_name(n, &vae_cfg)),
    ] {
        let names = Catalog::from_manifest(&dir.join(component).join("manifest.json")).unwrap();
        let mut seen = std::collections::BTreeMap::new();
        for name in names.tensors.keys() {
            let original =
                map(name).unwrap_or_else(|| panic!("{component}: {name} has no original name"));
            if let Some(other) = seen.insert(original.clone(), name.clone()) {
                panic!("{component}: {name} and {other} both map to {original}");
            }
        }
        eprintln!("{component}: {} names, all distinct", seen.len());
    }
    for (diffusers, original) in [
        (
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
            "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        ),
        (
            "down_blocks.0.downsamplers.0.conv.weight",
            "input_blocks.3.0.op.weight",
        ),
        (
            "down_blocks.1.resnets.0.conv_shortcut.weight",
            "input_blocks.4.0.skip_connection.weight",
        ),
        (
            "up_blocks.0.upsamplers.0.conv.weight",
            "output_blocks.2.1.conv.weight",
        ),
        (
            "up_blocks.1.upsamplers.0.conv.weight",
            "output_blocks.5.2.conv.weight",
        ),
        (
            "up_blocks.3.attentions.2.proj_out.weight",
            "output_blocks.11.1.proj_out.weight",
        ),
        (
            "mid_block.resnets.1.conv2.weight",
            "middle_block.2.out_layers.3.weight",
        ),
        ("time_embedding.linear_2.bias", "time_embed.2.bias"),
        ("conv_norm_out.weight", "out.0.weight"),
    ] {
        assert_eq!(
            unet_name(diffusers, &unet_cfg).as_deref(),
            Some(original),
            "{diffusers}"
        );
    }
    for (diffusers, original) in [
        (
            "decoder.up_blocks.0.resnets.0.conv1.weight",
            "decoder.up.3.block.0.conv1.weight",
        ),
        (
            "decoder.up_blocks.2.upsamplers.0.conv.weight",
            "decoder.up.1.upsample.conv.weight",
        ),
        (
            "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
            "encoder.down.1.block.0.nin_shortcut.weight",
        ),
        (
            "encoder.down_blocks.0.downsamplers.0.conv.weight",
            "encoder.down.0.downsample.conv.weight",
        ),
        (
            "decoder.mid_block.attentions.0.to_q.weight",
            "decoder.mid.attn_1.q.weight",
        ),
        (
            "encoder.mid_block.resnets.1.norm2.bias",
            "encoder.mid.block_2.norm2.bias",
        ),
        ("decoder.conv_norm_out.weight", "decoder.norm_out.weight"),
    ] {
        assert_eq!(
            vae_name(diffusers, &vae_cfg).as_deref(),
            Some(original),
            "{diffusers}"
        );
    }
}
