"""Data-parallel activation statistics: throughput with 1, 2 (and 4) local processes.

    python benchmarks/distributed.py [--model mlp|resnet18] [--samples N] [--batch B]
                                     [--procs 1,2,4] [--threads T]

Each run starts P gloo processes on this machine (``torch.multiprocessing``, one intra-op
thread each by default). Every rank builds the same two independently initialised models,
infers the spec, and streams its share of the batches (batch ``i`` to rank ``i % P``; the
batches are seeded by their index, so the union over ranks is the same data for every P).
Per run it reports, from rank 0:

- ``stats s``: the slowest rank's time to accumulate its statistics (both models' forward
  passes and the sums), and the samples per second that gives for all the data;
- ``wait s``: how long the fastest rank waited for the slowest at the barrier;
- ``all-reduce s``: the time to sum the statistics over the ranks (the general path, two
  all-reduces: counts and means, then the centred sums; the public call needs one, since
  its ranks share rank 0's shifts), and the megabytes each rank sent into it;
- ``LAP s``: the similarity and LAPs (the same on every rank);
- ``call s``: the whole public ``activation_matching`` call on the same shard (handshakes,
  statistics, reduction, LAPs), slowest rank;
- ``same perm``: the fraction of units whose permutation equals the single-process one,
  for the timed steps (each rank centred on its own first batch, then re-centred) and for
  the public call (every rank centred on rank 0's first batch, as one process);
- ``ranks agree``: whether every rank returned the same permutation (both ways).

Processes beyond the machine's cores are skipped unless ``--procs`` names them. The LAPs
use scipy by default (``--lap``): the lapjv package (1.3.29) never returns on some of
resnet18's 128 x 128 correlation matrices.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402


def _build(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if name == "mlp":
        return nn.Sequential(
            nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
            nn.Linear(512, 10),
        ).eval()
    import torchvision

    return torchvision.models.resnet18(weights=None).eval()


def _batch(name: str, i: int, size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + i)
    shape = (size, 64) if name == "mlp" else (size, 3, 32, 32)
    return torch.randn(*shape, generator=g)


def _rank(rank: int, world: int, args: argparse.Namespace, init: str, out: str) -> None:
    import permgraph
    from permgraph.match import activation_matching
    from permgraph.match.activation import _accumulate, _reduce, _solve

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    a, b = _build(args.model, 0), _build(args.model, 1)
    spec = permgraph.infer(a, _batch(args.model, 0, 2))
    count = args.samples // args.batch
    mine = [_batch(args.model, i, args.batch) for i in range(rank, count, world)]
    dist.barrier()
    t0 = time.perf_counter()
    stats, sizes = _accumulate(spec, a, b, mine, "correlation", False, process_group=False)
    t_stats = time.perf_counter() - t0
    t1 = time.perf_counter()
    dist.barrier()
    t_wait = time.perf_counter() - t1
    sent = sum(8 * (1 + 6 * s.n + s.n * s.n) for s in stats.values()) + 8  # float64: counts, sums, cross
    t2 = time.perf_counter()
    _reduce(stats, dist.group.WORLD if world > 1 else None, len(mine), None, "benchmark")
    t_reduce = time.perf_counter() - t2
    t3 = time.perf_counter()
    perm = _solve(spec, stats, sizes, "correlation", args.lap)
    t_lap = time.perf_counter() - t3
    dist.barrier()
    t4 = time.perf_counter()
    public = activation_matching(spec, a, b, mine, lap=args.lap)
    t_call = time.perf_counter() - t4
    times = torch.tensor([t_stats, t_wait, t_call], dtype=torch.float64)
    gathered = [torch.zeros_like(times) for _ in range(world)]
    dist.all_gather(gathered, times)
    perms = [None] * world
    dist.all_gather_object(perms, {g: p.tolist() for g, p in perm.items()})
    publics = [None] * world
    dist.all_gather_object(publics, {g: p.tolist() for g, p in public.items()})
    if rank == 0:
        result = {
            "procs": world, "stats_s": max(float(t[0]) for t in gathered), "wait_s": max(float(t[1]) for t in gathered),
            "call_s": max(float(t[2]) for t in gathered), "reduce_s": t_reduce, "lap_s": t_lap, "sent_mb": sent / 2**20, "perm": perms[0], "public": publics[0],
            "ranks_agree": all(p == perms[0] for p in perms) and all(p == publics[0] for p in publics),
        }
        with open(out, "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("mlp", "resnet18"), default="mlp")
    parser.add_argument("--samples", type=int, default=None, help="default 65536 (mlp) or 2048 (resnet18)")
    parser.add_argument("--batch", type=int, default=None, help="default 1024 (mlp) or 64 (resnet18)")
    parser.add_argument("--procs", default=None, help="comma-separated process counts (default 1,2,4 up to the cores)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process (default 1)")
    parser.add_argument("--lap", default="scipy", help="LAP backend (default scipy; see the module docstring)")
    args = parser.parse_args()
    args.samples = args.samples or (65536 if args.model == "mlp" else 2048)
    args.batch = args.batch or (1024 if args.model == "mlp" else 64)
    cores = os.cpu_count() or 1
    procs = [int(p) for p in args.procs.split(",")] if args.procs else [p for p in (1, 2, 4) if p * args.threads <= cores]
    print(f"{args.model}: {args.samples} samples in batches of {args.batch}, {args.threads} thread(s) per process, "
          f"{cores} cores, torch {torch.__version__}")
    print(f"{'procs':>5} {'stats s':>8} {'samples/s':>10} {'wait s':>7} {'all-reduce s':>12} {'MB sent':>8} "
          f"{'LAP s':>6} {'call s':>7} {'same perm (timed, call)':>24} {'ranks agree':>11}")
    reference = None
    with tempfile.TemporaryDirectory() as tmp:
        for p in procs:
            out = os.path.join(tmp, f"p{p}.json")
            init = "file://" + os.path.join(tmp, f"store{p}")
            mp.spawn(_rank, args=(p, args, init, out), nprocs=p, join=True)
            with open(out) as f:
                r = json.load(f)
            if reference is None:
                reference = r["perm"]
            total = sum(len(v) for v in reference.values())

            def same(perm, reference=reference, total=total):
                return sum(sum(x == y for x, y in zip(perm[g], reference[g])) for g in reference) / total

            print(f"{p:>5} {r['stats_s']:>8.2f} {args.samples / r['stats_s']:>10.0f} {r['wait_s']:>7.2f} "
                  f"{r['reduce_s']:>12.4f} {r['sent_mb']:>8.2f} {r['lap_s']:>6.2f} {r['call_s']:>7.2f} "
                  f"{same(r['perm']):>14.1%} {same(r['public']):>9.1%} {str(r['ranks_agree']):>11}")


if __name__ == "__main__":
    main()
