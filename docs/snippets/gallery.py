"""The gallery's drawings (docs/gallery.md) and the drawn example of how-groups-are-derived.md.

    python docs/snippets/gallery.py

Writes docs/img/gallery/*.png with permgraph.draw (needs Graphviz's dot and the Python
graphviz package) and prints one line per drawing (captured in gallery.out).
"""

import contextlib
import io
import runpy
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import permgraph
from permgraph.draw import draw, graphviz_missing
from permgraph.testing import ZOO

warnings.filterwarnings("ignore")  # torchvision / transformers deprecation notices
torch.manual_seed(0)  # reproducible weights and inputs
SNIPPETS = Path(__file__).resolve().parent
OUT = SNIPPETS.parent / "img" / "gallery"

if graphviz_missing():
    sys.exit(f"gallery.py renders PNGs: {graphviz_missing()} (apt-get install graphviz; pip install graphviz)")
OUT.mkdir(parents=True, exist_ok=True)


def snippet(name):
    """Run another docs snippet quietly and return its globals (its model, inputs, spec)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return runpy.run_path(str(SNIPPETS / name))


def zoo(name):
    e = ZOO[name]
    model, x = e.build().eval(), e.inputs()
    return model, x


def vit():
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128)
    return model.eval(), torch.randn(2, 3, 32, 32)


class GroupedConvNet(nn.Module):
    """A small ResNeXt-style net: 1x1 conv, grouped 3x3 conv (4 groups), 1x1 conv, residual."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.reduce = nn.Conv2d(16, 8, 1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.expand = nn.Conv2d(8, 16, 1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        y = torch.relu(self.grouped(torch.relu(self.reduce(h))))
        h = h + self.expand(torch.relu(self.depthwise(y)))
        return self.head(h.mean((2, 3)))


tiny = snippet("tiny_resnet.py")
drawings = [
    # (file, model, inputs, draw options)
    ("tiny_resnet", tiny["model"], tiny["x"], {"rankdir": "LR"}),
    ("mlp", *zoo("mlp"), {"rankdir": "LR"}),
    ("resnet18", *(resnet18 := zoo("resnet18")), {}),
    ("resnet18_depth2", *resnet18, {"depth": 2}),
    ("vit_block", *vit(), {"module": "encoder.layers.encoder_layer_0"}),
    ("gpt2", *zoo("gpt2"), {}),
    ("grouped_conv", GroupedConvNet().eval(), torch.randn(2, 3, 8, 8), {}),
]
print(f"{'drawing':16s} {'groups':>6s} {'nodes':>6s} {'edges':>6s} {'draw s':>7s}")
specs = {}  # one spec per model: a drawing never re-traces
for name, model, x, options in drawings:
    if id(model) not in specs:
        specs[id(model)] = permgraph.infer(model, x)
    spec = specs[id(model)]
    t0 = time.perf_counter()
    d = draw(spec, OUT / f"{name}.png", **options)
    seconds = time.perf_counter() - t0
    print(f"{name:16s} {len(spec.groups):6d} {d.num_nodes:6d} {d.num_edges:6d} {seconds:7.2f}")
