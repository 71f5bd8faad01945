import torch
from torch import nn

import permgraph
from permgraph.rules import Fresh, Prod, Tie

torch.manual_seed(0)  # reproducible weights and inputs


@torch.library.custom_op("mylib::pair_mean", mutates_args=())
def pair_mean(x: torch.Tensor) -> torch.Tensor:
    """Average channels 2c and 2c+1 of x (N, C, ...) into channel c."""
    return x.unflatten(1, (x.shape[1] // 2, 2)).mean(2)


@pair_mean.register_fake
def _(x):
    return x.new_empty(x.shape[0], x.shape[1] // 2, *x.shape[2:])


@permgraph.rule("mylib.pair_mean")
def pair_mean_rule(op):
    x, out = op.tensor("x"), op.out
    # input channel 2c + i is unit (c, i) of Prod(output channels, a pair of 2)
    yield Tie(x.axis(1), Prod(out.axis(1), Fresh(2, "pair")), "pair_mean: pairs of channels")
    for d in range(x.ndim):
        if d != 1:
            yield Tie(x.axis(d), out.axis(d), "pair_mean: other dims")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        return self.conv2(pair_mean(torch.relu(self.conv1(x))))


model, x = Net(), torch.randn(2, 3, 6, 6)
spec = permgraph.infer(model, x)
print(spec)
perm = spec.random_permutation(torch.Generator().manual_seed(3))
print(perm)
print("verify:", spec.verify(model, x, perm=perm))
