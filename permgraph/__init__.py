"""permgraph: find, apply and use the permutation symmetries of any PyTorch model."""

from permgraph.aligning import align
from permgraph.analysis import Analysis, analyze, infer
from permgraph.errors import (
    DataError,
    DemoError,
    DistributedError,
    DrawError,
    FileError,
    FileFormatError,
    GraphvizMissingWarning,
    InferArgumentError,
    IslandsWarning,
    LapError,
    MatchError,
    MergeError,
    MetricsError,
    OracleArgumentError,
    PermGraphError,
    PermutationError,
    RankDriftWarning,
    RankFailedError,
    RankMismatchError,
    RankTimeoutError,
    RoundingWarning,
    SinkhornError,
    SpecMismatchError,
    TraceError,
    UnsupportedOpError,
    UntraceableModelError,
    VerificationError,
)
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
    # errors (every one permgraph raises, and its warnings)
    "PermGraphError",
    "TraceError",
    "UnsupportedOpError",
    "SpecMismatchError",
    "PermutationError",
    "VerificationError",
    "LapError",
    "OracleArgumentError",
    "InferArgumentError",
    "RoundingWarning",
    "MatchError",
    "SinkhornError",
    "MergeError",
    "UntraceableModelError",
    "MetricsError",
    "FileFormatError",
    "FileError",
    "DemoError",
    "DataError",
    "DistributedError",
    "RankMismatchError",
    "RankFailedError",
    "RankTimeoutError",
    "RankDriftWarning",
    "DrawError",
    "GraphvizMissingWarning",
    "IslandsWarning",
    "__version__",
]
