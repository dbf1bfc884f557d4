#!/usr/bin/env python3
"""Writes tests/fixtures/sd1-tiny-single.safetensors: the tiny diffusers pipeline (tests/fixtures/sd1-tiny) as one
file in the original Stable Diffusion layout (`model.diffusion_model.*`, `first_stage_model.*`,
`cond_stage_model.transformer.text_model.*`), as community fine-tunes ship. The names are written by this script's
own table, then checked by diffusers itself: `from_single_file` (given the tiny configs) must load every weight back
exactly. The Rust test (tests/single_file.rs) loads the same file.

    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install torch diffusers transformers safetensors
    /tmp/ref/bin/python tools/make_single_file_fixture.py
"""
import json
import os

import torch
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "fixtures", "sd1-tiny")
OUT = os.path.join(ROOT, "tests", "fixtures", "sd1-tiny-single.safetensors")

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def unet_name(name, cfg):
    """diffusers UNet2DConditionModel name -> original `model.diffusion_model.` name."""
    per = cfg["layers_per_block"]
    up_attn = ["CrossAttn" in t for t in cfg["up_block_types"]]
    p = name.split(".")
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    head = ".".join(p[:2])
    if head in fixed:
        return fixed[head] + "." + ".".join(p[2:])
    if p[0] == "conv_in" or p[0] == "conv_out" or p[0] == "conv_norm_out":
        return fixed[p[0]] + "." + ".".join(p[1:])

    def resnet_tail(rest):
        return ".".join([RESNET[rest[0]]] + rest[1:])

    if p[0] == "down_blocks":
        i, kind = int(p[1]), p[2]
        if kind == "downsamplers":
            return f"input_blocks.{(i + 1) * (per + 1)}.0.op." + ".".join(p[5:])
        j = int(p[3])
        block = 1 + i * (per + 1) + j
        if kind == "resnets":
            return f"input_blocks.{block}.0." + resnet_tail(p[4:])
        return f"input_blocks.{block}.1." + ".".join(p[4:])
    if p[0] == "mid_block":
        kind, j = p[1], int(p[2])
        if kind == "resnets":
            return f"middle_block.{2 * j}." + resnet_tail(p[3:])
        return "middle_block.1." + ".".join(p[3:])
    if p[0] == "up_blocks":
        i, kind = int(p[1]), p[2]
        if kind == "upsamplers":
            at = 2 if up_attn[i] else 1
            return f"output_blocks.{i * (per + 1) + per}.{at}.conv." + ".".join(p[5:])
        j = int(p[3])
        block = i * (per + 1) + j
        if kind == "resnets":
            return f"output_blocks.{block}.0." + resnet_tail(p[4:])
        return f"output_blocks.{block}.1." + ".".join(p[4:])
    raise KeyError(name)


VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_name(name, cfg):
    """diffusers AutoencoderKL name -> original `first_stage_model.` name (attention weights as 1x1 convs)."""
    levels = len(cfg["block_out_channels"])
    p = name.split(".")
    if p[0] in ("quant_conv", "post_quant_conv"):
        return name
    side = p[0]
    rest = p[1:]
    if rest[0] in ("conv_in", "conv_out"):
        return name
    if rest[0] == "conv_norm_out":
        return f"{side}.norm_out." + ".".join(rest[1:])
    def resnet_tail(r):
        return ".".join(["nin_shortcut" if r[0] == "conv_shortcut" else r[0]] + r[1:])
    if rest[0] == "mid_block":
        if rest[1] == "resnets":
            return f"{side}.mid.block_{int(rest[2]) + 1}." + resnet_tail(rest[3:])
        tail = ".".join(rest[3:])
        for k, v in VAE_ATTN.items():
            if tail.startswith(k + "."):
                return f"{side}.mid.attn_1.{v}." + tail[len(k) + 1:]
        raise KeyError(name)
    if rest[0] in ("down_blocks", "up_blocks"):
        i = int(rest[1])
        level = i if side == "encoder" else levels - 1 - i
        group = "down" if side == "encoder" else "up"
        if rest[2] in ("downsamplers", "upsamplers"):
            which = "downsample" if side == "encoder" else "upsample"
            return f"{side}.{group}.{level}.{which}.conv." + ".".join(rest[5:])
        return f"{side}.{group}.{level}.block.{rest[3]}." + resnet_tail(rest[4:])
    raise KeyError(name)


def main():
    unet_cfg = json.load(open(os.path.join(TINY, "unet", "config.json")))
    vae_cfg = json.load(open(os.path.join(TINY, "vae", "config.json")))
    out = {}
    unet = load_file(os.path.join(TINY, "unet", "diffusion_pytorch_model.safetensors"))
    for k, v in unet.items():
        out["model.diffusion_model." + unet_name(k, unet_cfg)] = v
    vae = load_file(os.path.join(TINY, "vae", "diffusion_pytorch_model.safetensors"))
    for k, v in vae.items():
        new = vae_name(k, vae_cfg)
        if ".mid.attn_1." in new and new.endswith(".weight") and v.dim() == 2:
            v = v[:, :, None, None]  # the original layout keeps attention projections as 1x1 convolutions
        out["first_stage_model." + new] = v
    text = load_file(os.path.join(TINY, "text_encoder", "model.safetensors"))
    for k, v in text.items():
        k = k[len("text_model."):] if k.startswith("text_model.") else k
        out["cond_stage_model.transformer.text_model." + k] = v
    save_file({k: v.contiguous() for k, v in out.items()}, OUT)
    print(f"wrote {OUT}: {len(out)} tensors")

    # diffusers' own reading of the file must give back every weight exactly.
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPVisionModelWithProjection
    # The checkpoint holds no image encoder (as real ones): it is given separately, as stylediff's --image-encoder.
    encoder = CLIPVisionModelWithProjection.from_pretrained(os.path.join(TINY, "image_encoder"))
    pipe = StableDiffusionPipeline.from_single_file(OUT, config=TINY, local_files_only=True, image_encoder=encoder,
                                                    safety_checker=None, requires_safety_checker=False)
    for label, module, ref in [("unet", pipe.unet, unet), ("vae", pipe.vae, vae)]:
        sd = module.state_dict()
        for k, v in ref.items():
            got = sd[k].reshape(v.shape)
            assert torch.equal(got, v), f"{label}.{k} differs"
    # transformers versions differ on the `text_model.` prefix of CLIPTextModel's own names: compare without it.
    bare = lambda k: k[len("text_model."):] if k.startswith("text_model.") else k
    sd = {bare(k): v for k, v in pipe.text_encoder.state_dict().items()}
    for k, v in text.items():
        assert torch.equal(sd[bare(k)], v), f"text_encoder.{k} differs"
    print("diffusers' from_single_file reads every UNet, VAE and text-encoder weight back exactly")


if __name__ == "__main__":
    main()
