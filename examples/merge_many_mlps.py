"""Merge four independently trained MLPs into one (Git Re-Basin's MergeMany).

Four 64-512-512-10 MLPs are trained on scikit-learn's digits from four seeds. Averaging
their weights as they are gives a model near chance; `merge_many` first permutes each into
one shared frame (weight matching against the average of the others, round after round),
then averages. The permutations it finds are cycle consistent: going from model i to j and
from j to k is the same as going from i to k, which pairwise weight matching does not give.

    python examples/merge_many_mlps.py            # about 15 s on 2 CPU cores

Measured here: each model scores a test loss of 0.04-0.05 (accuracy 0.98-0.99); their plain
average 1.603 (0.822); the average after MergeMany 0.073 (0.987). Cycle error: 0.000 for
MergeMany's maps, 0.972 for pairwise weight matching.
"""

from __future__ import annotations

import torch

import permgraph
from permgraph.examples.digits import evaluator, load_digits, make_mlp, train
from permgraph.match.many import cycle_consistent_maps, cycle_error, pairwise_maps


def main(n_models: int = 4) -> None:
    torch.set_num_threads(2)
    data = load_digits()
    states = []
    for seed in range(n_models):
        torch.manual_seed(seed)
        states.append(train(make_mlp(), data.x_train, data.y_train, epochs=10, seed=seed).state_dict())
    spec = permgraph.infer(make_mlp(), data.x_train[:2])
    evaluate = evaluator(make_mlp(), data.x_test, data.y_test)

    naive = {k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]}
    result = permgraph.merge_many(spec, states)
    print(f"merge_many: {result.rounds} rounds, converged: {result.converged}, {result.seconds:.2f} s\n")
    print(f"{'model':24s} {'test loss':>9s} {'accuracy':>8s}")
    rows = [(f"model {i}", state) for i, state in enumerate(states)]
    for name, state in rows + [("average, unaligned", naive), ("average after MergeMany", result.merged)]:
        loss, acc = evaluate(state)
        print(f"{name:24s} {loss:9.3f} {acc:8.3f}")

    consistent = cycle_error(spec, cycle_consistent_maps(spec, result.perms))
    pairwise = cycle_error(spec, pairwise_maps(spec, states))
    print(f"\ncycle error (share of units where i->j->k differs from i->k): "
          f"MergeMany {consistent:.3f}, pairwise weight matching {pairwise:.3f}")


if __name__ == "__main__":
    main()
