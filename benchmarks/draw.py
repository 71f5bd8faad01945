"""Time `permgraph.draw`: building the DOT text and rendering it with Graphviz's ``dot``.

    python benchmarks/draw.py [--out DIR]

Models: torchvision's ResNet-50 and a 24-layer GPT-2 (width 64, 4 heads), at leaf-module
level, and the GPT-2 again with its repeated blocks folded. The goal is under 5 s per drawing
(text + SVG); ``infer`` (tracing) is timed apart. Needs torchvision, transformers and Graphviz.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

from permgraph import infer
from permgraph.draw import draw, graphviz_missing


def _resnet50() -> tuple[torch.nn.Module, torch.Tensor]:
    from torchvision.models import resnet50

    torch.manual_seed(0)
    return resnet50().eval(), torch.randn(2, 3, 64, 64)


def _gpt2_24() -> tuple[torch.nn.Module, dict]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=24, n_embd=64, n_head=4, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval(), {"input_ids": torch.randint(0, 100, (2, 8)), "use_cache": False}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="also write the SVGs here")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    missing = graphviz_missing()
    if missing:
        print(f"note: {missing}; only the DOT text is timed")
    header = f"{'model':22s} {'infer s':>8s} {'nodes':>6s} {'edges':>6s} {'groups':>6s} {'text s':>7s} {'svg s':>7s} {'total s':>8s}"
    print(header)
    print("-" * len(header))
    for name, build, kw in [("resnet50", _resnet50, {}), ("gpt2 24 layers", _gpt2_24, {}),
                            ("gpt2 24 layers, fold", _gpt2_24, {"fold": True})]:
        model, inputs = build()
        t0 = time.perf_counter()
        spec = infer(model, inputs)
        t1 = time.perf_counter()
        d = draw(spec, **kw)
        t2 = time.perf_counter()
        svg = d.svg() if not missing else ""
        t3 = time.perf_counter()
        if args.out is not None and svg:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / (name.replace(" ", "_").replace(",", "") + ".svg")).write_text(svg)
        render = f"{t3 - t2:7.2f}" if svg else f"{'n/a':>7s}"
        print(f"{name:22s} {t1 - t0:8.2f} {d.num_nodes:6d} {d.num_edges:6d} {len(d.groups):6d} {t2 - t1:7.2f} {render} {t3 - t1:8.2f}")


if __name__ == "__main__":
    main()
