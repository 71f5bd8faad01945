import torch
from torch import nn

import permgraph

torch.manual_seed(0)  # reproducible weights and inputs


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        h = torch.relu(self.bn(self.stem(x)))
        h = h + self.conv2(torch.relu(self.conv1(h)))  # residual add
        return self.head(torch.flatten(h, 1))          # flatten after a conv


model, x = TinyResNet(), torch.randn(2, 3, 4, 4)
spec = permgraph.infer(model, x)
print(spec.table(max_members=10))
print("verify:", spec.verify(model, x))
for why in spec["stem"].why:
    print(why)
