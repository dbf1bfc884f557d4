#!/usr/bin/env python3
"""Reference token maps of Prompt-to-Prompt (word positions, replacement mapper, refinement alignment) computed by
the reference `seq_aligner.py` (google/prompt-to-prompt, identical in sen-mao/StyleDiffusion) with transformers'
CLIPTokenizer on the real CLIP vocabulary. Writes tests/fixtures/p2p_alignment.json.

    /tmp/ref/bin/python tools/make_p2p_fixtures.py --seq-aligner DIR_WITH_seq_aligner.py [--shared ../shared/fixtures]

The reference file is read from a local copy of the public repository; it is not part of this project.
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = [
    # replaced words (one token each)
    ("a cat sitting next to a mirror", "a tiger sitting next to a mirror", ["cat", "tiger", "mirror"]),
    # multi-token words on either side
    ("a photo of a squirrel eating a burger", "a photo of a lion eating a burger", ["squirrel", "burger"]),
    ("a photo of a cat on the grass", "a photo of a hippopotamus on the grass", ["cat", "hippopotamus"]),
    ("black and white dog playing red ball on black carpet", "black and white tiger playing red ball on black carpet", ["dog", "black"]),
    # two replacements
    ("a red circle on a blue background", "a green circle on a yellow background", ["red", "background"]),
    # inserted words (refine)
    ("a cat sitting next to a mirror", "a watercolor painting of a cat sitting next to a mirror", ["cat", "watercolor"]),
    ("a tent in forest", "a tent in forest at winter", ["tent", "winter"]),
    ("a red circle on a blue background", "a striped red circle on a blue background", ["striped", "circle"]),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-aligner", required=True)
    ap.add_argument("--shared", default=os.path.join(ROOT, "..", "shared", "fixtures"))
    args = ap.parse_args()
    sys.path.insert(0, args.seq_aligner)
    import seq_aligner
    from transformers import CLIPTokenizer
    tok_dir = os.path.join(args.shared, "clip-tokenizer")
    tok = CLIPTokenizer(os.path.join(tok_dir, "vocab.json"), os.path.join(tok_dir, "merges.txt"))
    out = []
    for src, tgt, words in CASES:
        case = {"source": src, "target": tgt, "word_positions": {}}
        for w in words:
            case["word_positions"][w] = {
                "source": [int(i) for i in seq_aligner.get_word_inds(src, w, tok)],
                "target": [int(i) for i in seq_aligner.get_word_inds(tgt, w, tok)],
            }
        if len(src.split(" ")) == len(tgt.split(" ")):
            m = seq_aligner.get_replacement_mapper([src, tgt], tok)[0].numpy()
            case["replace_nonzero"] = [[int(i), int(j), float(m[i, j])] for i, j in zip(*m.nonzero())]
        mapper, alphas = seq_aligner.get_refinement_mapper([src, tgt], tok)
        case["refine_mapper"] = [int(v) for v in mapper[0]]
        case["refine_alphas"] = [float(v) for v in alphas[0]]
        out.append(case)
    path = os.path.join(ROOT, "tests", "fixtures", "p2p_alignment.json")
    with open(path, "w") as f:
        json.dump({"source": "seq_aligner.py of google/prompt-to-prompt with transformers CLIPTokenizer", "cases": out}, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
