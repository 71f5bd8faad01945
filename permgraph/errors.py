"""The exception hierarchy. Every message names what is wrong, where, and what to do next."""

from __future__ import annotations

__all__ = [
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
]


class PermGraphError(Exception):
    """Base class of every error permgraph raises on purpose."""


class TraceError(PermGraphError):
    """The model could not be traced by ``torch.export`` (or its example inputs do not fit it)."""


class UnsupportedOpError(PermGraphError):
    """An op was met that no rule understands, where the caller asked for a strict analysis."""


class SpecMismatchError(PermGraphError, ValueError):
    """A state_dict, a file or a permutation does not match the `PermSpec`."""


class PermutationError(PermGraphError, ValueError):
    """A permutation has the wrong size, dtype, or is not a bijection."""


class VerificationError(PermGraphError):
    """Permuting the named groups changed the model's outputs: the groups are not a symmetry."""

    def __init__(self, message: str, culprits: tuple[str, ...] = (), error: float = float("nan")):
        super().__init__(message)
        self.culprits = culprits
        self.error = error


class LapError(PermGraphError, ValueError):
    """A linear assignment problem was given an invalid matrix."""


class OracleArgumentError(PermGraphError, ValueError):
    """`PermSpec.verify` was given a tolerance or a number of draws out of range."""


class InferArgumentError(PermGraphError, ValueError):
    """`permgraph.infer` was given an option value it does not know."""


class RoundingWarning(UserWarning):
    """`PermSpec.verify`: float32 outputs changed under a permutation but float64 outputs
    agree, so the change is rounding amplified by the model, not a wrong group."""


class MatchError(PermGraphError, ValueError):
    """A matcher was called with arguments it cannot use (no batches, a bad option, ...)."""


class SinkhornError(MatchError):
    """Sinkhorn got a bad temperature or iteration count, or produced a non-finite soft
    permutation (the learned matrix or the objective diverged)."""


class MergeError(PermGraphError, ValueError):
    """A merge step was given arguments it cannot use (no data, no BatchNorm, a bad alpha)."""


class UntraceableModelError(MatchError, MergeError, TraceError):
    """Activation matching or REPAIR need the model's whole graph, and ``torch.export``
    cannot trace the model whole (weight matching reads the weights alone and still works)."""


class MetricsError(PermGraphError, ValueError):
    """A metric was given values it cannot use (alphas without endpoints, NaN, mismatched lengths)."""


class FileFormatError(PermGraphError, ValueError):
    """A file is not a valid permgraph safetensors file: truncated, corrupted, of another
    format or version, or (on writing) a value that safetensors cannot store."""


class FileError(PermGraphError, OSError):
    """A path cannot be read or written (missing folder, no permission, a directory)."""


class DemoError(PermGraphError, RuntimeError):
    """The demo cannot run (an optional dependency is missing, a bad option)."""


class DataError(PermGraphError, ValueError):
    """A data source or an ``inputs`` choice that cannot be turned into model inputs."""


class DistributedError(PermGraphError, RuntimeError):
    """The ranks of a process group could not reduce their statistics together."""


class RankMismatchError(DistributedError, ValueError):
    """Ranks passed different models, specs, options or statistics shapes to the same call.

    Attributes:
        ranks: the ranks that differ from rank 0 (the group's ranks, in its numbering).
        item: what differs (``"spec"``, ``"model_a"``, ``"method"``, ...).
    """

    def __init__(self, message: str, ranks: tuple[int, ...] = (), item: str = "") -> None:
        super().__init__(message)
        self.ranks = ranks
        self.item = item


class RankFailedError(DistributedError):
    """Another rank failed during the same call; its error message is quoted.

    Attributes:
        ranks: the ranks that failed.
    """

    def __init__(self, message: str, ranks: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.ranks = ranks


class RankTimeoutError(DistributedError, TimeoutError):
    """Some rank did not reach a collective step within the timeout."""


class RankDriftWarning(UserWarning):
    """The ranks' models agree to a tolerance but not bit for bit (float rounding: the
    statistics are summed anyway)."""


class DrawError(PermGraphError, ValueError):
    """A drawing cannot be made as asked: a spec without a graph, a ``module`` prefix that
    matches nothing, an unknown output format, or a renderer that is missing or failed."""


class GraphvizMissingWarning(UserWarning):
    """`Drawing.save` wrote a ``.dot`` file because Graphviz is not installed."""


class IslandsWarning(UserWarning):
    """`infer` could not trace the model whole and analysed the largest submodules that
    export as islands (see ``spec.unsupported`` for what was left out)."""
