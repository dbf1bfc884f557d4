#!/usr/bin/env python3
"""Times diffusers/PyTorch on the CPU on the same pipeline folder and the same parts as `stylediff engine bench`,
and prints the ratio to stylediff's report. The PyTorch side gets its best path: scaled_dot_product_attention,
no autograd where none is needed, the value input of every cross-attention layer as the only tensor with a
gradient in the forward+backward part (as StyleDiffusion's inner iteration).

    stylediff engine random-model --config ../shared/fixtures/real-models/sd-v1-5 \
        --tokenizer ../shared/fixtures/clip-tokenizer \
        --image-encoder-config ../shared/fixtures/real-models/clip-vit-base-patch16/image_encoder --out /tmp/sd15
    stylediff engine bench --model /tmp/sd15 --out-dir /tmp/bench
    /tmp/ref/bin/python tools/time_diffusers.py --model /tmp/sd15 --report /tmp/bench/report.json

Needs torch, diffusers, transformers, safetensors. Threads: stylediff's report's thread count (else torch's).
Run it alone: another heavy process on the machine ruins both timings.
"""
import argparse
import json
import os
import statistics
import time

import torch


def peak_reset():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_mib():
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None


class ValueOverride:
    """diffusers attention processor: SDPA, with the cross-attention VALUE projection reading `value_input`."""

    def __init__(self, value_input):
        self.value_input = value_input

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        b, n, _ = hidden_states.shape
        cross = encoder_hidden_states is not None
        ctx = encoder_hidden_states if cross else hidden_states
        q = attn.to_q(hidden_states)
        k = attn.to_k(ctx)
        v = attn.to_v(self.value_input if cross else ctx)
        h = attn.heads
        split = lambda t: t.view(b, -1, h, t.shape[-1] // h).transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
        out = out.transpose(1, 2).reshape(b, n, -1)
        return attn.to_out[1](attn.to_out[0](out))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--report", help="stylediff's report.json: its size, parts, repeats and threads are used")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, help="timed runs (default: as in the report, else 3)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--parts")
    ap.add_argument("--out", help="write the PyTorch timings here (JSON)")
    a = ap.parse_args()
    ours = json.load(open(a.report)) if a.report else None
    size = ours["size"] if ours else a.size
    threads = a.threads or (ours["threads"] if ours else torch.get_num_threads())
    torch.set_num_threads(threads)
    repeats = a.repeats or (ours["rows"][0]["runs"] if ours and ours["rows"] else 3)
    parts = a.parts.split(",") if a.parts else ([r["part"] for r in ours["rows"]] if ours else None)

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPVisionModelWithProjection
    from torch.utils.flop_counter import FlopCounterMode

    root = a.model
    has_image_encoder = os.path.isfile(os.path.join(root, "image_encoder", "config.json"))

    def load():
        m = {
            "text": CLIPTextModel.from_pretrained(os.path.join(root, "text_encoder")),
            "unet": UNet2DConditionModel.from_pretrained(os.path.join(root, "unet")),
            "vae": AutoencoderKL.from_pretrained(os.path.join(root, "vae")),
        }
        if has_image_encoder:
            m["image"] = CLIPVisionModelWithProjection.from_pretrained(os.path.join(root, "image_encoder"))
        for net in m.values():
            net.eval().requires_grad_(False)
        return m

    parts = parts or ["load", "text-encoder"] + (["image-encoder"] if has_image_encoder else []) + [
        "unet-batch1", "unet-batch2", "unet-forward-backward", "vae-encode", "vae-decode"]
    rows = []

    def timed(name, fn, count_flops=True):
        for _ in range(a.warmup):
            fn()
        peak_reset()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        peak = peak_mib()
        flop = None
        if count_flops:
            with FlopCounterMode(display=False) as fc:
                fn()
            flop = fc.get_total_flops()
        rows.append({"part": name, "seconds": statistics.median(times), "seconds_min": min(times), "runs": len(times),
                     "gflop": flop / 1e9 if flop is not None else None, "peak_resident_mib": peak})
        print(f"{name:<24} {rows[-1]['seconds']:9.3f} s", flush=True)

    if "load" in parts:
        timed("load", load, count_flops=False)
    m = load()
    unet, vae = m["unet"], m["vae"]
    gen = torch.Generator().manual_seed(0)
    lat = size // (2 ** (len(vae.config.block_out_channels) - 1))
    ch = unet.config.in_channels
    dim = unet.config.cross_attention_dim
    rand = lambda *s: torch.randn(*s, generator=gen)
    for part in parts:
        if part == "load":
            continue
        if part == "text-encoder":
            ids = torch.randint(0, 49408, (1, 77), generator=gen)
            timed(part, lambda: m["text"](ids))
        elif part == "image-encoder":
            side = m["image"].config.image_size
            pix = rand(1, 3, side, side)
            timed(part, lambda: m["image"](pixel_values=pix))
        elif part in ("unet-batch1", "unet-batch2"):
            b = 1 if part == "unet-batch1" else 2
            x, ctx = rand(b, ch, lat, lat), rand(b, 77, dim)

            def fwd():
                with torch.no_grad():
                    unet(x, 500, encoder_hidden_states=ctx)
            timed(part, fwd)
        elif part == "unet-forward-backward":
            x, ctx, target = rand(1, ch, lat, lat), rand(1, 77, dim), rand(1, ch, lat, lat)
            value = rand(1, 77, dim).requires_grad_(True)
            default_processors = unet.attn_processors
            unet.set_attn_processor(ValueOverride(value))

            def fwd_bwd():
                value.grad = None
                eps = unet(x, 500, encoder_hidden_states=ctx).sample
                ((eps - target) ** 2).mean().backward()
                assert value.grad is not None
            timed(part, fwd_bwd)
            unet.set_attn_processor(default_processors)
        elif part == "vae-encode":
            img = rand(1, 3, size, size)

            def enc():
                with torch.no_grad():
                    vae.encode(img).latent_dist.mean
            timed(part, enc)
        elif part == "vae-decode":
            z = rand(1, vae.config.latent_channels, lat, lat)

            def dec():
                with torch.no_grad():
                    vae.decode(z)
            timed(part, dec)
        else:
            raise SystemExit(f"unknown part {part!r}")

    report = {"engine": "pytorch", "version": torch.__version__, "model": root, "size": size, "threads": threads,
              "rows": rows}
    if a.out:
        json.dump(report, open(a.out, "w"), indent=1)
    print(f"\nPyTorch {torch.__version__}, {threads} threads, {size}x{size}")
    head = f"{'part':<24} {'pytorch s':>10} {'GFLOP':>8} {'peak MiB':>9}"
    if ours:
        head += f" {'stylediff s':>12} {'GFLOP':>8} {'peak MiB':>9} {'ratio':>7}"
    print(head)
    theirs = {r["part"]: r for r in (ours["rows"] if ours else [])}
    fmt = lambda v, p: "-" if v is None else f"{v:.{p}f}"
    for r in rows:
        line = f"{r['part']:<24} {r['seconds']:10.3f} {fmt(r['gflop'], 1):>8} {fmt(r['peak_resident_mib'], 0):>9}"
        s = theirs.get(r["part"])
        if s:
            line += (f" {s['seconds']:12.3f} {fmt(s.get('gflop'), 1):>8} {fmt(s.get('peak_resident_mib'), 0):>9}"
                     f" {s['seconds'] / r['seconds']:6.2f}x")
        print(line)
    if ours:
        print("ratio: stylediff time / PyTorch time (below 1: stylediff faster)")


if __name__ == "__main__":
    main()
