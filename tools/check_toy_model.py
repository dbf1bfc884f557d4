"""Checks that the bundled toy model loads in the reference libraries as it is.

    python tools/check_toy_model.py [models/toy]

Loads the folder with diffusers' StableDiffusionPipeline.from_pretrained (then samples 4 DDIM steps from it) and its
image_encoder/ with transformers' CLIPVisionModelWithProjection, and prints what it loaded. Needs torch, diffusers
and transformers from PyPI; the product never runs Python.
"""

import sys

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from transformers import CLIPVisionModelWithProjection


def main() -> None:
    folder = sys.argv[1] if len(sys.argv) > 1 else "models/toy"
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    for name in ["unet", "vae", "text_encoder"]:
        n = sum(p.numel() for p in getattr(pipe, name).parameters())
        print(f"{name}: {type(getattr(pipe, name)).__name__}, {n} parameters")
    ids = pipe.tokenizer("a striped red circle on a blue background").input_ids
    print("tokens:", pipe.tokenizer.convert_ids_to_tokens(ids))
    image = pipe(
        "a red circle on a blue background",
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
    print("sampled image:", image.shape, f"range {image.min():.3f}..{image.max():.3f}")
    vision = CLIPVisionModelWithProjection.from_pretrained(f"{folder}/image_encoder")
    pixels = torch.zeros(1, 3, vision.config.image_size, vision.config.image_size)
    out = vision(pixel_values=pixels)
    print(
        "image_encoder:",
        type(vision).__name__,
        "tokens",
        tuple(out.last_hidden_state.shape),
        "projection",
        tuple(out.image_embeds.shape),
    )
    print("ok")


if __name__ == "__main__":
    main()
