import torch
import torch.nn.functional as F
from torch import nn

import permgraph

torch.manual_seed(0)  # reproducible weights and inputs


class SelfAttention(nn.Module):
    def __init__(self, E=16, H=2):
        super().__init__()
        self.H = H
        self.q, self.k, self.v, self.o = (nn.Linear(E, E) for _ in range(4))

    def forward(self, x):
        B, T, E = x.shape

        def heads(t):  # E -> H x D
            return t.view(B, T, self.H, E // self.H).transpose(1, 2)

        y = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)))
        return self.o(y.transpose(1, 2).reshape(B, T, E))


model, x = SelfAttention(), torch.randn(2, 5, 16)
spec = permgraph.infer(model, x)
print(spec.table(max_members=7))
print("verify:", spec.verify(model, x))
