#!/usr/bin/env python3
"""Writes a Stable Diffusion folder with RANDOM weights at the real size, from real configs (default: SD v1.5's in
../shared/fixtures/real-models/sd-v1-5, with the real CLIP tokenizer and CLIP ViT-B/16's image-encoder config), so
that time and memory can be measured at full size without the real weights. Also counts the FLOPs of one UNet
forward and forward+backward at the given size (torch's FlopCounterMode) and writes them to flops.json.

    /tmp/ref/bin/python tools/make_random_sd.py --out /tmp/sd15-random [--size 512]
"""
import argparse
import json
import os
import shutil

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shared", default=os.path.join(ROOT, "..", "shared", "fixtures"))
    ap.add_argument("--model", default="sd-v1-5")
    ap.add_argument("--size", type=int, default=512)
    a = ap.parse_args()
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    src = os.path.join(a.shared, "real-models", a.model)
    os.makedirs(a.out, exist_ok=True)
    shutil.copy(os.path.join(src, "model_index.json"), a.out)
    shutil.copytree(os.path.join(src, "scheduler"), os.path.join(a.out, "scheduler"), dirs_exist_ok=True)
    shutil.copytree(os.path.join(a.shared, "clip-tokenizer"), os.path.join(a.out, "tokenizer"), dirs_exist_ok=True)
    unet = UNet2DConditionModel.from_config(json.load(open(os.path.join(src, "unet", "config.json"))))
    unet.save_pretrained(os.path.join(a.out, "unet"), safe_serialization=True)
    vae = AutoencoderKL.from_config(json.load(open(os.path.join(src, "vae", "config.json"))))
    vae.save_pretrained(os.path.join(a.out, "vae"), safe_serialization=True)
    CLIPTextModel(CLIPTextConfig.from_json_file(os.path.join(src, "text_encoder", "config.json"))).save_pretrained(
        os.path.join(a.out, "text_encoder"), safe_serialization=True)
    enc_cfg = os.path.join(a.shared, "real-models", "clip-vit-base-patch16", "image_encoder", "config.json")
    CLIPVisionModelWithProjection(CLIPVisionConfig.from_json_file(enc_cfg)).save_pretrained(
        os.path.join(a.out, "image_encoder"), safe_serialization=True)

    lat = a.size // 8
    x = torch.randn(1, unet.config.in_channels, lat, lat)
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim, requires_grad=True)
    t = torch.tensor([500])
    flops = {}
    with FlopCounterMode(display=False) as fc:
        with torch.no_grad():
            unet(x, t, encoder_hidden_states=ctx.detach())
    flops["unet_forward_batch1"] = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        unet(x, t, encoder_hidden_states=ctx).sample.square().mean().backward()
    flops["unet_forward_backward_batch1"] = fc.get_total_flops()
    img = torch.randn(1, 3, a.size, a.size)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        z = vae.encode(img).latent_dist.mean
    flops["vae_encode"] = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        vae.decode(z)
    flops["vae_decode"] = fc.get_total_flops()
    flops["size"] = a.size
    json.dump(flops, open(os.path.join(a.out, "flops.json"), "w"), indent=1)
    print(json.dumps(flops, indent=1))


if __name__ == "__main__":
    main()
