//! Single-file checkpoints in the original Stable Diffusion layout (`model.diffusion_model.*`,
//! `first_stage_model.*`, `cond_stage_model.transformer.*`), as community fine-tunes ship them. Nothing is
//! converted on disk: each diffusers parameter name the networks ask for is translated to the original name on
//! load, using the component's config (blocks per level, which levels have attention). The table is checked
//! against diffusers' own `from_single_file` by `tools/make_single_file_fixture.py`.

use std::sync::Arc;

use super::ComponentKind;
use super::unet::UNetConfig;
use super::vae::VaeConfig;
use super::weights::NameAliases;

pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const VAE_PREFIX: &str = "first_stage_model.";
pub const TEXT_PREFIX: &str = "cond_stage_model.transformer.";

/// The prefix of a component's tensors in a single file (`None`: the image encoder is never in one).
pub fn prefix(kind: ComponentKind) -> Option<&'static str> {
    match kind {
        ComponentKind::Unet => Some(UNET_PREFIX),
        ComponentKind::Vae => Some(VAE_PREFIX),
        ComponentKind::TextEncoder => Some(TEXT_PREFIX),
        ComponentKind::ImageEncoder => None,
    }
}

/// Whether a file's tensor names are those of an original-layout checkpoint.
pub fn is_single_file<'a>(mut names: impl Iterator<Item = &'a String>) -> bool {
    names.any(|n| n.starts_with(UNET_PREFIX))
}

fn resnet_part(part: &str) -> &str {
    match part {
        "norm1" => "in_layers.0",
        "conv1" => "in_layers.2",
        "time_emb_proj" => "emb_layers.1",
        "norm2" => "out_layers.0",
        "conv2" => "out_layers.3",
        "conv_shortcut" => "skip_connection",
        other => other,
    }
}

/// diffusers UNet2DConditionModel name -> original name (without the prefix); `None` for a name outside the table.
pub fn unet_name(name: &str, cfg: &UNetConfig) -> Option<String> {
    let per = cfg.layers_per_block;
    let p: Vec<&str> = name.split('.').collect();
    let tail = |from: usize| p[from.min(p.len())..].join(".");
    let resnet = |from: usize| {
        let rest = &p[from..];
        let first = resnet_part(rest.first()?);
        Some(
            std::iter::once(first)
                .chain(rest[1..].iter().copied())
                .collect::<Vec<_>>()
                .join("."),
        )
    };
    let index = |k: usize| p.get(k)?.parse::<usize>().ok();
    Some(match (p.first()?, p.get(1).copied()) {
        (&"time_embedding", Some("linear_1")) => format!("time_embed.0.{}", tail(2)),
        (&"time_embedding", Some("linear_2")) => format!("time_embed.2.{}", tail(2)),
        (&"conv_in", _) => format!("input_blocks.0.0.{}", tail(1)),
        (&"conv_norm_out", _) => format!("out.0.{}", tail(1)),
        (&"conv_out", _) => format!("out.2.{}", tail(1)),
        (&"down_blocks", _) => {
            let i = index(1)?;
            match *p.get(2)? {
                "downsamplers" => format!("input_blocks.{}.0.op.{}", (i + 1) * (per + 1), tail(5)),
                "resnets" => format!(
                    "input_blocks.{}.0.{}",
                    1 + i * (per + 1) + index(3)?,
                    resnet(4)?
                ),
                "attentions" => format!(
                    "input_blocks.{}.1.{}",
                    1 + i * (per + 1) + index(3)?,
                    tail(4)
                ),
                _ => return None,
            }
        }
        (&"mid_block", _) => match *p.get(1)? {
            "resnets" => format!("middle_block.{}.{}", 2 * index(2)?, resnet(3)?),
            "attentions" => format!("middle_block.1.{}", tail(3)),
            _ => return None,
        },
        (&"up_blocks", _) => {
            let i = index(1)?;
            match *p.get(2)? {
                "upsamplers" => {
                    let with_attention = cfg.up_block_types.get(i)?.contains("CrossAttn");
                    let at = if with_attention { 2 } else { 1 };
                    format!(
                        "output_blocks.{}.{at}.conv.{}",
                        i * (per + 1) + per,
                        tail(5)
                    )
                }
                "resnets" => format!(
                    "output_blocks.{}.0.{}",
                    i * (per + 1) + index(3)?,
                    resnet(4)?
                ),
                "attentions" => {
                    format!("output_blocks.{}.1.{}", i * (per + 1) + index(3)?, tail(4))
                }
                _ => return None,
            }
        }
        _ => return None,
    })
}

/// diffusers AutoencoderKL name -> original name (without the prefix).
pub fn vae_name(name: &str, cfg: &VaeConfig) -> Option<String> {
    let levels = cfg.block_out_channels.len();
    let p: Vec<&str> = name.split('.').collect();
    let (side, rest) = (*p.first()?, &p[1..]);
    if matches!(side, "quant_conv" | "post_quant_conv") {
        return Some(name.to_string());
    }
    let join = |parts: &[&str]| parts.join(".");
    let resnet = |r: &[&str]| -> Option<String> {
        let first = if *r.first()? == "conv_shortcut" {
            "nin_shortcut"
        } else {
            r[0]
        };
        Some(
            std::iter::once(first)
                .chain(r[1..].iter().copied())
                .collect::<Vec<_>>()
                .join("."),
        )
    };
    Some(match *rest.first()? {
        "conv_in" | "conv_out" => name.to_string(),
        "conv_norm_out" => format!("{side}.norm_out.{}", join(&rest[1..])),
        "mid_block" => match *rest.get(1)? {
            "resnets" => format!(
                "{side}.mid.block_{}.{}",
                rest.get(2)?.parse::<usize>().ok()? + 1,
                resnet(&rest[3..])?
            ),
            "attentions" => {
                let tail = join(&rest[3..]);
                let (from, to) = [
                    ("group_norm.", "norm."),
                    ("to_q.", "q."),
                    ("to_k.", "k."),
                    ("to_v.", "v."),
                    ("to_out.0.", "proj_out."),
                ]
                .into_iter()
                .find(|(from, _)| tail.starts_with(from))?;
                format!("{side}.mid.attn_1.{to}{}", &tail[from.len()..])
            }
            _ => return None,
        },
        group @ ("down_blocks" | "up_blocks") => {
            let i: usize = rest.get(1)?.parse().ok()?;
            let (level, short) = match group {
                "down_blocks" => (i, "down"),
                _ => (levels.checked_sub(1 + i)?, "up"),
            };
            match *rest.get(2)? {
                "downsamplers" => format!(
                    "{side}.{short}.{level}.downsample.conv.{}",
                    join(&rest[5..])
                ),
                "upsamplers" => {
                    format!("{side}.{short}.{level}.upsample.conv.{}", join(&rest[5..]))
                }
                "resnets" => format!(
                    "{side}.{short}.{level}.block.{}.{}",
                    rest.get(3)?,
                    resnet(&rest[4..])?
                ),
                _ => return None,
            }
        }
        _ => return None,
    })
}

/// The names a component's parameters have in a single file, tried in order.
pub fn aliases(
    kind: ComponentKind,
    unet: Option<UNetConfig>,
    vae: Option<VaeConfig>,
) -> NameAliases {
    match kind {
        ComponentKind::Unet => Arc::new(move |name: &str| {
            unet.as_ref()
                .and_then(|cfg| unet_name(name, cfg))
                .map(|n| vec![format!("{UNET_PREFIX}{n}")])
                .unwrap_or_default()
        }),
        ComponentKind::Vae => Arc::new(move |name: &str| {
            vae.as_ref()
                .and_then(|cfg| vae_name(name, cfg))
                .map(|n| vec![format!("{VAE_PREFIX}{n}")])
                .unwrap_or_default()
        }),
        // Newer checkpoints keep transformers' `text_model.` level, the oldest do not.
        ComponentKind::TextEncoder => Arc::new(|name: &str| {
            let bare = name.strip_prefix("text_model.").unwrap_or(name);
            vec![
                format!("{TEXT_PREFIX}text_model.{bare}"),
                format!("{TEXT_PREFIX}{bare}"),
            ]
        }),
        ComponentKind::ImageEncoder => Arc::new(|_: &str| Vec::new()),
    }
}
