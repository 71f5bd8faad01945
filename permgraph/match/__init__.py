"""Matchers: find the permutation that aligns model B to model A.

Generic over a :class:`~permgraph.PermSpec`, never over an architecture: they read groups,
members and layouts, so every model :func:`permgraph.infer` understands can be aligned.

- :func:`weight_matching`: coordinate descent on ``Σ <W_a, P(W_b)>`` (Git Re-Basin, Alg. 1).
- :func:`activation_matching`: one LAP per group on the correlation of the units'
  activations over data (Git Re-Basin; Benzing et al. 2022).
- :func:`gradient_matching`: at initialisation, from descent directions (Benzing et al. 2022,
  App. B).
"""

from permgraph.match._common import MatchError
from permgraph.match.activation import ActivationStats, activation_matching, activation_similarity
from permgraph.match.gradient import GradientMatchingHistory, gradient_matching, gradient_objective, loss_directions
from permgraph.match.many import MergeManyResult, cycle_consistent_maps, cycle_error, merge_many, pairwise_maps
from permgraph.match.sinkhorn import SinkhornError, SinkhornHistory, sinkhorn_matching, soft_apply
from permgraph.match.ste import STEHistory, ste_matching
from permgraph.match.weight import WeightMatchingHistory, similarity_matrices, weight_matching

__all__ = [
    "weight_matching",
    "WeightMatchingHistory",
    "similarity_matrices",
    "activation_matching",
    "activation_similarity",
    "ActivationStats",
    "gradient_matching",
    "gradient_objective",
    "loss_directions",
    "GradientMatchingHistory",
    "MatchError",
    "sinkhorn_matching",
    "soft_apply",
    "SinkhornHistory",
    "SinkhornError",
    "ste_matching",
    "STEHistory",
    "merge_many",
    "MergeManyResult",
    "cycle_consistent_maps",
    "pairwise_maps",
    "cycle_error",
]
