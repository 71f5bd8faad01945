"""permgraph: find, apply and use the permutation symmetries of any PyTorch model."""

from permgraph import errors as _errors
from permgraph.aligning import align
from permgraph.analysis import Analysis, analyze, infer
from permgraph.errors import *  # noqa: F403 (every error and warning class; listed in errors.__all__)
from permgraph.io import load_aligned, load_permutation, save_aligned, save_permutation
from permgraph.match import activation_matching, merge_many, sinkhorn_matching, ste_matching, weight_matching
from permgraph.merge import interpolate, reset_batchnorm
from permgraph.metrics import (
    accuracy_barrier,
    fixed_points,
    interpolation_curve,
    loss_barrier,
    strong_connectivity,
    weak_connectivity,
)
from permgraph.oracle import verify
from permgraph.repairing import repair
from permgraph.rules import rule
from permgraph.spec import Group, Layout, Member, PermSpec, Permutation, Unsupported
from permgraph.tracing import trace

__version__ = "0.1.0"

__all__ = [
    # groups
    "infer",
    "analyze",
    "Analysis",
    "verify",
    "trace",
    "rule",
    "PermSpec",
    "Group",
    "Member",
    "Layout",
    "Unsupported",
    "Permutation",
    # matching
    "align",
    "weight_matching",
    "activation_matching",
    "sinkhorn_matching",
    "ste_matching",
    "merge_many",
    # merging and metrics
    "interpolate",
    "reset_batchnorm",
    "repair",
    "interpolation_curve",
    "loss_barrier",
    "accuracy_barrier",
    "weak_connectivity",
    "strong_connectivity",
    "fixed_points",
    # files
    "save_permutation",
    "load_permutation",
    "save_aligned",
    "load_aligned",
    "__version__",
    # errors: every one permgraph raises, and its warnings
    *_errors.__all__,
]
