"""Activation matching with two processes, each reading half of the batches.

Run as is (it starts its own two gloo processes); under torchrun the body of `rank` is
the whole script, without the spawn and the init_method.
"""

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import permgraph
from permgraph.data import batches
from permgraph.examples.digits import load_digits, make_mlp
from permgraph.match import activation_matching


def models():
    torch.manual_seed(0)
    return make_mlp((64, 256, 256, 10)).eval(), make_mlp((64, 256, 256, 10)).eval()


def rank(r: int, world: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=r, world_size=world)
    a, b = models()
    x = load_digits().x_train
    spec = permgraph.infer(a, x[:2])
    mine = batches(x, batch_size=64)  # this rank's batches: 0, 2, 4, ... on rank 0
    perm = activation_matching(spec, a, b, mine)  # statistics summed over both ranks
    local = activation_matching(spec, a, b, mine, process_group=False)  # this rank's half alone
    every = [None] * world
    dist.all_gather_object(every, perm)
    if r == 0:
        # one process on all the batches (process_group=False: no other rank takes part)
        single = activation_matching(spec, a, b, batches(x, batch_size=64, shard=None), process_group=False)
        units = sum(p.numel() for p in single.values())

        def agree(p):
            return sum(int((p[g] == single[g]).sum()) for g in single) / units

        print(f"{len(mine)} of {len(batches(x, batch_size=64, shard=None))} batches on rank 0")
        same = all(torch.equal(p[g], every[0][g]) for p in every for g in single)
        print(f"every rank returns the same permutation: {same}")
        print(f"summed statistics vs one process on all batches: {agree(perm):.1%} of units alike")
        print(f"rank 0's half alone vs one process:              {agree(local):.1%} of units alike")
    dist.destroy_process_group()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(rank, args=(2, os.path.join(tmp, "store")), nprocs=2, join=True)
