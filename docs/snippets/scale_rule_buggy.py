import torch
from mylib import Net

import permgraph
from permgraph.rules import Tie

torch.manual_seed(0)  # reproducible weights and inputs

model, x = Net(), torch.randn(2, 3, 6, 6)


@permgraph.rule("mylib.scale")
def scale_rule(op):  # BUG: forgets that s[c] goes with channel c
    x, out = op.tensor("x"), op.out
    for d in range(x.ndim):
        yield Tie(x.axis(d), out.axis(d), "scale: element-wise")


spec = permgraph.infer(model, x)
print(spec)
try:
    spec.verify(model, x)
except permgraph.VerificationError as exc:
    print("VerificationError:", exc)
    print("culprits:", exc.culprits)
