"""permgraph: find, apply and use the permutation symmetries of any PyTorch model."""

from permgraph.analysis import infer
from permgraph.errors import (
    LapError,
    PermGraphError,
    PermutationError,
    SpecMismatchError,
    TraceError,
    UnsupportedOpError,
    VerificationError,
)
from permgraph.rules import rule
from permgraph.spec import Group, Layout, Member, PermSpec, Permutation, Unsupported
from permgraph.trace import trace

__version__ = "0.1.0"

__all__ = [
    "infer",
    "trace",
    "rule",
    "PermSpec",
    "Group",
    "Member",
    "Layout",
    "Unsupported",
    "Permutation",
    "PermGraphError",
    "TraceError",
    "UnsupportedOpError",
    "SpecMismatchError",
    "PermutationError",
    "VerificationError",
    "LapError",
    "__version__",
]
