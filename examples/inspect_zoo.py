"""Infer and verify the permutation groups of real architectures, as a table.

For each model of permgraph's test zoo (torchvision, timm and Hugging Face models, built
without downloads): the groups, the permutable units, the blocked ops, the relative output
error after a random permutation of every group (norm statistics randomised first, so a
forgotten buffer would show), and the seconds that took (infer, lint and verify).

    python examples/inspect_zoo.py                 # the 14 models of the named zoo
    python examples/inspect_zoo.py resnet18 gpt2   # some of them
    python examples/inspect_zoo.py --all           # all 86 (a few minutes)
"""

from __future__ import annotations

import sys
import time

from permgraph.testing import EXTRA_ZOO, WIDE_ZOO, ZOO, check_sound


def main(argv: list[str]) -> None:
    every = ZOO | EXTRA_ZOO | WIDE_ZOO
    names = list(every) if argv == ["--all"] else (argv or list(ZOO))
    unknown = [n for n in names if n not in every]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from: {', '.join(every)}")
    print(f"{'model':28s} {'groups':>6s} {'floor':>5s} {'units':>6s} {'blocked':>7s} {'rel. error':>10s} {'seconds':>7s}")
    for name in names:
        entry = every[name]
        model, inputs = entry.build(), entry.inputs()
        t0 = time.perf_counter()
        spec, err = check_sound(model, inputs)
        seconds = time.perf_counter() - t0  # infer + lint + verify
        print(f"{name:28s} {len(spec.groups):6d} {entry.floor:5d} {spec.num_units:6d} {len(spec.unsupported):7d} "
              f"{err:10.1e} {seconds:7.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
