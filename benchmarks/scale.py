"""Aligning and merging checkpoints on disk: peak memory and time at 0.1B, 0.65B (and 3B) parameters.

    python benchmarks/scale.py [--sizes 0.1B,0.65B] [--big] [--dir DIR] [--in-memory] [--device cuda]

For each size it writes three Llama-architecture folders as ``save_pretrained`` does (bf16, sharded
safetensors): A, B = A under a hidden random permutation of every group (the residual stream,
every MLP, the attention heads), and C, an independent initialisation. Then, each in a fresh
process whose peak *anonymous* memory (RssAnon of the process and its children, sampled every
20 ms: memory-mapped file pages are the page cache's, not the process's) is measured:

* ``permgraph align A B --out O``: O must equal A bit for bit;
* ``permgraph align A C --out O`` and ``permgraph merge A C --out M``;
* with ``--in-memory``, beside them, the in-memory route a user takes today: ``from_pretrained`` x 2,
  ``permgraph.infer``, ``weight_matching``, ``spec.apply``.

It prints peak memory, seconds, sweeps and the *floor* of the sweeps weight matching ran: their
similarity GEMMs at the GEMM rate measured here (a 2048 x 8192 x 2048 float32 matmul) plus the
time of their LAPs; ``x floor`` is the matching time over that floor. ``--big`` adds 3B
(5.4 GB per model in bf16: on a 24 GB machine the in-memory route cannot hold two).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import torch  # noqa: E402

SIZES = {  # hidden, intermediate, layers, heads (head dim 128, no GQA), vocab
    "0.1B": (768, 2048, 8, 6, 32000),
    "0.65B": (1536, 4096, 20, 12, 32000),
    "3B": (2560, 6912, 32, 20, 32000),
}


def _config(size: str):
    from transformers import LlamaConfig

    hidden, inter, layers, heads, vocab = SIZES[size]
    return LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=heads, vocab_size=vocab, tie_word_embeddings=False, dtype="bfloat16")


def make_folders(size: str, root: Path) -> dict[str, Path]:
    """A, B (A permuted) and C (another init) as sharded bf16 folders; made once per root."""
    from transformers import LlamaForCausalLM

    import permgraph
    from permgraph.checkpoint import example_inputs

    paths = {k: root / f"{size}-{k}" for k in "ABC"}
    if all((p / "config.json").exists() for p in paths.values()):
        return paths
    cfg = _config(size)
    for name, seed in (("A", 0), ("C", 1)):
        torch.manual_seed(seed)
        torch.set_default_dtype(torch.bfloat16)  # made in bf16 directly: a 3B model is 5.4 GB, not 11
        try:
            model = LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(torch.float32)
        if name == "A":
            with torch.device("meta"):
                meta = LlamaForCausalLM(cfg)
            spec = permgraph.infer(meta, example_inputs(meta))
            perm = spec.random_permutation(torch.Generator().manual_seed(7))
            model.save_pretrained(paths["A"], max_shard_size="500MB")
            model.load_state_dict(spec.apply(perm, model.state_dict()))
            model.save_pretrained(paths["B"], max_shard_size="500MB")
        else:
            model.save_pretrained(paths["C"], max_shard_size="500MB")
        del model
    return paths


def measure(cmd: list[str]) -> tuple[float, float, str]:
    """Run ``cmd``; its peak anonymous memory (MB, process and children), seconds, and stdout."""

    def anon_kb(pid: int) -> int:
        total = 0
        try:
            with open(f"/proc/{pid}/status") as f:
                total = next((int(line.split()[1]) for line in f if line.startswith("RssAnon:")), 0)
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except OSError:
            return total
        return total + sum(anon_kb(k) for k in kids)

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], anon_kb(proc.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed with exit {proc.returncode}")
    return peak[0] / 1024, time.perf_counter() - t0, out


def gemm_rate(device: str) -> float:
    """float32 GEMM flop/s here (best of 3)."""
    a, b = torch.randn(2048, 8192, device=device), torch.randn(8192, 2048, device=device)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        (a @ b).sum().item()
        best = min(best, time.perf_counter() - t0)
    return 2 * 2048 * 8192 * 2048 / best


IN_MEMORY = """
import sys, json, time, torch, permgraph
from transformers import LlamaForCausalLM
from permgraph.checkpoint import example_inputs
t0 = time.perf_counter()
a = LlamaForCausalLM.from_pretrained(sys.argv[1]); b = LlamaForCausalLM.from_pretrained(sys.argv[2])
spec = permgraph.infer(a, example_inputs(a, device="cpu"))
perm, hist = permgraph.weight_matching(spec, a.state_dict(), b.state_dict(), max_memory=None, return_history=True)
aligned = spec.apply(perm, b.state_dict())
print(json.dumps({"sweeps": hist.sweeps, "gemm_flops": hist.gemm_flops, "lap_seconds": hist.lap_seconds,
                  "matching_seconds": hist.seconds}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="0.1B,0.65B", help="comma-separated among " + ", ".join(SIZES))
    p.add_argument("--big", action="store_true", help="add 3B")
    p.add_argument("--dir", default=None, help="where the folders are made and kept (default: a temporary folder)")
    p.add_argument("--in-memory", action="store_true", help="also run the in-memory route (needs ~13x the model size)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-memory", default=None, help="--max-memory for permgraph (default: its own)")
    p.add_argument("--runs", default="hidden,align,merge",
                   help="which of hidden (align A to A permuted), align and merge (A and C) to run")
    args = p.parse_args()
    sizes = args.sizes.split(",") + (["3B"] if args.big and "3B" not in args.sizes else [])
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="permgraph-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    rate = gemm_rate(args.device)
    print(f"GEMM rate here: {rate / 1e9:.0f} GFLOP/s (float32, {args.device}); threads {torch.get_num_threads()}")
    cli = [sys.executable, "-m", "permgraph"]
    opts = ["--quiet", "--json", "--device", args.device] + (["--max-memory", args.max_memory] if args.max_memory else [])
    rows = []
    for size in sizes:
        t0 = time.perf_counter()
        paths = make_folders(size, root)
        n = sum(f.stat().st_size for f in paths["A"].glob("*.safetensors"))
        print(f"{size}: folders of {n / 1e9:.2f} GB each ready in {time.perf_counter() - t0:.0f} s", flush=True)
        runs = {"hidden": ("align (hidden perm)", ["align", paths["A"], paths["B"]]),
                "align": ("align (independent)", ["align", paths["A"], paths["C"]]),
                "merge": ("merge (independent)", ["merge", paths["A"], paths["C"]])}
        for what, argv in (runs[r] for r in args.runs.split(",")):
            out = root / f"{size}-out"
            shutil.rmtree(out, ignore_errors=True)
            peak, secs, text = measure([*cli, *map(str, argv), "--out", str(out), *opts])
            rep = json.loads(text)
            exact = ""
            if what.endswith("(hidden perm)"):
                from permgraph.checkpoint import open_checkpoint

                ca, co = open_checkpoint(paths["A"]), open_checkpoint(out)
                exact = "bit-exact" if sorted(ca) == sorted(co) and all(torch.equal(ca[k], co[k]) for k in ca) else "DIFFERS"
            floor = rep["gemm_flops"] / rate + rep["lap_seconds"]
            rows.append((size, f"permgraph {what}", peak, secs, rep["sweeps"], floor, rep["matching_seconds"] / floor, exact))
            print(f"  {rows[-1][1]:<34} peak {peak:7.0f} MB  {secs:6.1f} s  sweeps {rep['sweeps']:2d}  "
                  f"floor {floor:6.1f} s  matching {rep['matching_seconds']:6.1f} s = {rows[-1][6]:.2f}x floor  {exact}",
                  flush=True)
            shutil.rmtree(out, ignore_errors=True)
        if args.in_memory:
            peak, secs, text = measure([sys.executable, "-c", IN_MEMORY, str(paths["A"]), str(paths["C"])])
            rep = json.loads(text.strip().splitlines()[-1])
            floor = rep["gemm_flops"] / rate + rep["lap_seconds"]
            rows.append((size, "in memory (from_pretrained x2)", peak, secs, rep["sweeps"], floor,
                         rep["matching_seconds"] / floor, ""))
            print(f"  {rows[-1][1]:<34} peak {peak:7.0f} MB  {secs:6.1f} s  sweeps {rep['sweeps']:2d}  "
                  f"floor {floor:6.1f} s  matching {rep['matching_seconds']:6.1f} s = {rows[-1][6]:.2f}x floor", flush=True)
    print("\n| size | run | peak anon MB | seconds | sweeps | floor s | matching / floor | output |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.0f} | {r[3]:.1f} | {r[4]} | {r[5]:.1f} | {r[6]:.2f}x | {r[7]} |")
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
