#!/usr/bin/env python3
"""Reference of Prompt-to-Prompt's local blend under cross-attention replacement and reweighting, as the authors'
code (sen-mao/StyleDiffusion stylediffusion.py, after google/prompt-to-prompt) runs it: the attention store keeps
the conditional branch's cross-attention tensor, and the edit controller then overwrites the target's half of that
same tensor in place (replacement, equaliser, per-word alpha), so the blend mask is built from the target's maps
AFTER replacement and reweighting. Small random maps on a 4x4 grid, two layers, three steps.

    /tmp/ref/bin/python tools/make_local_blend_fixture.py   # writes tests/fixtures/local_blend.safetensors
"""
import json
import os

import torch
import torch.nn.functional as nnf
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = 77
STEPS, LAYERS, HEADS, GRID, LATENT = 3, 2, 2, 4, 8
START_BLEND, THRESHOLD = 1, 0.3


class Store:
    """The attention store: keeps the very tensor it is given (no copy), summed over steps."""

    def __init__(self):
        self.step, self.total = [], None

    def keep(self, attn):
        self.step.append(attn)

    def end_step(self):
        if self.total is None:
            self.total = self.step
        else:
            for a, b in zip(self.total, self.step):
                a += b
        self.step = []


class Controller(Store):
    """Replacement with an equaliser and per-step, per-token alphas; overwrites the target half in place."""

    def __init__(self, mapper, equalizer, alpha):
        super().__init__()
        self.mapper, self.equalizer, self.alpha = mapper, equalizer, alpha

    def cross(self, attn, step):
        self.keep(attn)
        view = attn.reshape(2, HEADS, *attn.shape[1:])
        base, target = view[0], view[1:]
        replaced = torch.einsum("hpw,bwn->bhpn", base, self.mapper) * self.equalizer
        a = self.alpha[step]
        view[1:] = replaced * a + (1 - a) * target
        return attn


def blend(x_t, store_total, words, step):
    if step < START_BLEND:
        return x_t, None
    maps = [m.reshape(2, -1, 1, GRID, GRID, WORDS) for m in store_total]
    maps = torch.cat(maps, dim=1)
    maps = (maps * words).sum(-1).mean(1)
    maps = nnf.max_pool2d(maps, (3, 3), (1, 1), padding=(1, 1))
    mask = nnf.interpolate(maps, size=(LATENT, LATENT))
    mask = mask / mask.max(2, keepdim=True)[0].max(3, keepdim=True)[0]
    mask = mask.gt(THRESHOLD)
    mask = (mask[:1] + mask).float()
    return x_t[:1] + mask * (x_t - x_t[:1]), mask[1, 0]


def main():
    g = torch.Generator().manual_seed(7)
    probs = torch.softmax(torch.randn(STEPS, LAYERS, 2 * HEADS, GRID * GRID, WORDS, generator=g) * 3, dim=-1)
    latents = torch.randn(STEPS, 2, 4, LATENT, LATENT, generator=g)
    mapper = torch.eye(WORDS)
    mapper[2, 2], mapper[2, 3], mapper[3, 3], mapper[3, 2] = 0.5, 0.5, 0.5, 0.5
    mapper = mapper.unsqueeze(0)
    equalizer = torch.ones(1, WORDS)
    equalizer[0, 2], equalizer[0, 5] = 2.0, 0.5
    # P2P's alpha: (steps + 1, 1, 1, 1, 1, words); replacement in steps 0..1, token 4 never.
    alpha = torch.zeros(STEPS + 1, 1, 1, 1, WORDS)
    alpha[:2] = 1.0
    alpha[:, ..., 4] = 0.0
    words = torch.zeros(2, 1, 1, 1, 1, WORDS)
    words[0, ..., 2] = 1.0
    words[1, ..., 2] = 1.0
    words[1, ..., 3] = 1.0

    ctl = Controller(mapper, equalizer, alpha)
    out = {"probs": probs.clone(), "latents": latents.clone()}
    for s in range(STEPS):
        for layer in range(LAYERS):
            attn = probs[s, layer].clone()
            out[f"returned.{s}.{layer}"] = ctl.cross(attn, s).clone()
        ctl.end_step()
        blended, mask = blend(latents[s], ctl.total, words, s)
        out[f"blended.{s}"] = blended.contiguous()
        if mask is not None:
            out[f"mask.{s}"] = mask.contiguous()
    meta = {
        "what": "P2P local blend after replacement and reweighting (tools/make_local_blend_fixture.py)",
        "steps": str(STEPS), "layers": str(LAYERS), "heads": str(HEADS), "grid": str(GRID),
        "latent": str(LATENT), "start_blend": str(START_BLEND), "threshold": str(THRESHOLD),
        "mapper_pairs": json.dumps([[2, 2, 0.5], [2, 3, 0.5], [3, 3, 0.5], [3, 2, 0.5]]),
        "equalizer": json.dumps({"2": 2.0, "5": 0.5}), "alpha_steps": "2", "alpha_off_token": "4",
        "blend_source": "[2]", "blend_target": "[2, 3]",
    }
    path = os.path.join(ROOT, "tests", "fixtures", "local_blend.safetensors")
    save_file({k: v.float().contiguous() for k, v in out.items()}, path, metadata=meta)
    print("wrote", path)


if __name__ == "__main__":
    main()
