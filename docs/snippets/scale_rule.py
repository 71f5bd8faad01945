import torch
from mylib import Net

import permgraph
from permgraph.rules import Tie

torch.manual_seed(0)  # reproducible weights and inputs

model, x = Net(), torch.randn(2, 3, 6, 6)

# Without a rule, mylib.scale blocks every axis it touches and is reported.
print(permgraph.infer(model, x))


@permgraph.rule("mylib.scale")
def scale_rule(op):
    x, s, out = op.tensor("x"), op.tensor("s"), op.out
    for d in range(x.ndim):  # element-wise: each dim of x is the same dim of out
        yield Tie(x.axis(d), out.axis(d), "scale: element-wise")
    yield Tie(s.axis(0), x.axis(1), "scale: one factor per channel")


spec = permgraph.infer(model, x)
print(spec)
print("verify:", spec.verify(model, x))
