import torch
from torch import nn

import permgraph

torch.manual_seed(0)  # reproducible weights and inputs

model = nn.Sequential(
    nn.Conv2d(3, 8, 1), nn.ReLU(),
    nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),  # depthwise
    nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),  # grouped, 2 groups of 4
    nn.Conv2d(8, 4, 1),
)
x = torch.randn(1, 3, 5, 5)
spec = permgraph.infer(model, x)
print(spec.table(max_members=8))
print("verify:", spec.verify(model, x))
