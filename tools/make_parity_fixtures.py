#!/usr/bin/env python3
"""Writes small random-weight Stable Diffusion pipelines in the diffusers layout, plus reference outputs computed
by diffusers/transformers, under tests/fixtures/. The Rust parity tests (tests/parity.rs) load the same folders and
must reproduce the references.

    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install torch diffusers transformers safetensors numpy
    /tmp/ref/bin/python tools/make_parity_fixtures.py [--shared ../shared/fixtures]

The tokenizer is CLIP's own BPE cut down to its first 1000 merges (a valid CLIP vocabulary in the same format),
so the tiny text encoders stay small.
"""
import argparse
import json
import os
import shutil

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPTokenizerFast, CLIPVisionConfig,
                          CLIPVisionModelWithProjection)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures")
MERGES = 1000
PROMPTS = ["a red circle on a blue background", "A Photo OF a CAT, sitting on a mat!!"]


def write_tokenizer(shared, folder):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(shared, "clip-tokenizer", "merges.txt"), encoding="utf-8") as f:
        lines = f.read().split("\n")
    header, merges = lines[0], [m for m in lines[1:] if m][:MERGES]
    with open(os.path.join(shared, "clip-tokenizer", "vocab.json"), encoding="utf-8") as f:
        full = json.load(f)
    # CLIP's vocabulary is: 256 byte symbols, the same with </w>, one entry per merge, then the two specials.
    by_id = sorted(full.items(), key=lambda kv: kv[1])
    vocab = {tok: i for tok, i in by_id[: 512 + MERGES]}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join([header] + merges) + "\n")
    for name in ["special_tokens_map.json"]:
        shutil.copy(os.path.join(shared, "clip-tokenizer", name), folder)
    cfg = json.load(open(os.path.join(shared, "clip-tokenizer", "tokenizer_config.json")))
    json.dump(cfg, open(os.path.join(folder, "tokenizer_config.json"), "w"), indent=2)
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), model_max_length=77), len(vocab)


def randomise(module, seed):
    """Random norms and biases too, so that a swapped weight/bias or a skipped norm cannot pass unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias") or "embedding" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = max(1, p[0].numel()) if p.dim() > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
    return module


def build(kind, shared):
    folder = os.path.join(OUT, f"{kind}-tiny")
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    tok_dir = os.path.join(folder, "tokenizer")
    tokenizer, vocab_size = write_tokenizer(shared, tok_dir)
    sd2 = kind == "sd2"
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="gelu" if sd2 else "quick_gelu", layer_norm_eps=1e-5,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, projection_dim=16))
    randomise(text, 1)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1 if sd2 else 2,
        block_out_channels=(8, 16, 16),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=4,
        attention_head_dim=[1, 2, 2] if sd2 else 2,
        use_linear_projection=sd2)
    randomise(unet, 2)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
        block_out_channels=(8, 16, 16), sample_size=32,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
    randomise(vae, 3)
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, projection_dim=16, hidden_act="quick_gelu", layer_norm_eps=1e-5))
    randomise(vision, 4)
    for m in (text, unet, vae, vision):
        m.eval()
    # SD v1.5 and v2.1-base ship a PNDM config; sampling must still be DDIM with its numbers.
    sched = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                          set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, image_encoder=vision,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    # save_pretrained rewrites the tokenizer folder; put back the published SD layout (vocab.json + merges.txt)
    # and keep a tokenizer.json-only copy for the other layout.
    json_dir = os.path.join(folder, "tokenizer-json")
    if sd2 is False:
        CLIPTokenizerFast.from_pretrained(tok_dir).save_pretrained(json_dir)
        for name in ["vocab.json", "merges.txt"]:
            p = os.path.join(json_dir, name)
            if os.path.exists(p):
                os.remove(p)
    shutil.rmtree(tok_dir)
    write_tokenizer(shared, tok_dir)
    # The published SD scheduler configs say clip_sample = false (PNDMScheduler itself does not take the key).
    sched_path = os.path.join(folder, "scheduler", "scheduler_config.json")
    sched_cfg = json.load(open(sched_path))
    sched_cfg["clip_sample"] = False
    json.dump(sched_cfg, open(sched_path, "w"), indent=2)

    refs = {}
    g = torch.Generator().manual_seed(10)
    with torch.no_grad():
        ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        refs["text.ids"] = ids.to(torch.int64)
        refs["text.embeddings"] = text(ids)[0]

        pixels = torch.randn(1, 3, 32, 32, generator=g)
        out = vision(pixel_values=pixels, output_hidden_states=True)
        refs["vision.pixel_values"] = pixels
        refs["vision.tokens"] = vision.vision_model.post_layernorm(out.last_hidden_state)
        refs["vision.pooled"] = vision.vision_model.post_layernorm(out.last_hidden_state[:, 0])
        refs["vision.image_embeds"] = out.image_embeds

        # CLIP preprocessing of a non-square photo-like image (resize shorter side, centre crop, normalise).
        from PIL import Image
        from transformers import CLIPImageProcessor
        yy, xx = np.mgrid[0:45, 0:70]
        rgb = np.stack([xx * 3.6, yy * 5.6, (xx + yy) * 2.2], -1) % 256
        photo = Image.fromarray(rgb.astype(np.uint8))
        photo.save(os.path.join(OUT, "preprocess-input.png"))
        proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        refs["preprocess.pixel_values"] = proc(images=photo, return_tensors="pt").pixel_values

        context = refs["text.embeddings"]
        for name, shape, t in [("square", (2, 4, 8, 8), 500), ("rect", (2, 4, 6, 10), 21)]:
            lat = torch.randn(*shape, generator=g)
            refs[f"unet.{name}.latents"] = lat
            refs[f"unet.{name}.timestep"] = torch.tensor([float(t)])
            refs[f"unet.{name}.noise"] = unet(lat, t, encoder_hidden_states=context).sample

        image = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
        refs["vae.image"] = image
        refs["vae.mean"] = vae.encode(image).latent_dist.mean
        lat = torch.randn(1, 4, 8, 8, generator=g)
        refs["vae.latents"] = lat
        refs["vae.decoded"] = vae.decode(lat / vae.config.scaling_factor).sample

        ddim = DDIMScheduler.from_config(sched_cfg)
        for steps in (5, 10, 50):
            ddim.set_timesteps(steps)
            refs[f"ddim.timesteps.{steps}"] = ddim.timesteps.to(torch.int64)
        ddim.set_timesteps(10)
        t = int(ddim.timesteps[3])
        model_out, sample = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
        refs["ddim.model_output"], refs["ddim.sample"] = model_out, sample
        refs["ddim.step_timestep"] = torch.tensor([t], dtype=torch.int64)
        refs["ddim.prev_sample"] = ddim.step(model_out, t, sample, eta=0.0).prev_sample
        # The inverse step of the null-text sources: from t - 100 up to t with the output evaluated at t - 100.
        ac = ddim.alphas_cumprod
        cur = min(t - 1000 // 10, 999)
        a_cur = ac[cur] if cur >= 0 else ddim.final_alpha_cumprod
        a_next = ac[t]
        x0 = (sample - (1 - a_cur) ** 0.5 * model_out) / a_cur ** 0.5
        refs["ddim.next_sample"] = a_next ** 0.5 * x0 + (1 - a_next) ** 0.5 * model_out
        refs["ddim.alphas_cumprod"] = ac.to(torch.float64)
        clipped = DDIMScheduler.from_config(sched_cfg, clip_sample=True)
        clipped.set_timesteps(10)
        refs["ddim.clipped.prev_sample"] = clipped.step(model_out, t, sample, eta=0.0).prev_sample
        for spacing, pred in [("trailing", "v_prediction"), ("linspace", "sample")]:
            other = DDIMScheduler.from_config(sched_cfg, timestep_spacing=spacing, prediction_type=pred)
            other.set_timesteps(10)
            refs[f"ddim.{spacing}.timesteps"] = other.timesteps.to(torch.int64)
            tt = int(other.timesteps[3])
            refs[f"ddim.{spacing}.step_timestep"] = torch.tensor([tt], dtype=torch.int64)
            refs[f"ddim.{spacing}.prev_sample"] = other.step(model_out, tt, sample, eta=0.0).prev_sample

        gen_pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                           scheduler=DDIMScheduler.from_config(sched_cfg), safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
        gen_pipe.set_progress_bar_config(disable=True)
        init = torch.randn(1, 4, 8, 8, generator=g)
        refs["generate.init_latents"] = init
        kwargs = dict(prompt=PROMPTS[0], negative_prompt="", num_inference_steps=5, guidance_scale=7.5,
                      latents=init, height=32, width=32)
        refs["generate.final_latents"] = gen_pipe(output_type="latent", **kwargs).images
        refs["generate.image"] = torch.from_numpy(gen_pipe(output_type="np", **kwargs).images).permute(0, 3, 1, 2)
    refs = {k: v.detach().contiguous() for k, v in refs.items()}
    save_file(refs, os.path.join(OUT, f"{kind}-tiny-refs.safetensors"))
    meta = {"prompts": PROMPTS, "torch": torch.__version__,
            "diffusers": __import__("diffusers").__version__, "transformers": __import__("transformers").__version__}
    json.dump(meta, open(os.path.join(OUT, f"{kind}-tiny-refs.json"), "w"), indent=2)
    print(kind, "written to", folder)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=os.path.join(ROOT, "..", "shared", "fixtures"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    for kind in ("sd1", "sd2"):
        build(kind, args.shared)


if __name__ == "__main__":
    main()
