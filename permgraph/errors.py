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
    "RoundingWarning",
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


class RoundingWarning(UserWarning):
    """`PermSpec.verify`: float32 outputs changed under a permutation but float64 outputs
    agree, so the change is rounding amplified by the model, not a wrong group."""
