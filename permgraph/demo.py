"""Deprecated: the demo moved out of the core package.

Its data, models and trainer are in `permgraph.examples.digits`, the demo itself in
`permgraph.examples.demo`. Importing a name from here still works, with a
`DeprecationWarning` naming its new home; this module will be removed.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

_MOVED = {
    **dict.fromkeys(["Digits", "load_digits", "make_mlp", "train", "evaluator", "batches"], "permgraph.examples.digits"),
    **dict.fromkeys(["DemoResult", "run_demo", "plot_curves", "METHODS", "LABELS"], "permgraph.examples.demo"),
    "DemoError": "permgraph.errors",
}

__all__ = sorted(_MOVED)


def __getattr__(name: str) -> Any:
    home = _MOVED.get(name)
    if home is None:
        raise AttributeError(f"module 'permgraph.demo' has no attribute {name!r}")
    warnings.warn(f"permgraph.demo is deprecated: import {name} from {home} instead", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(home), name)


def __dir__() -> list[str]:
    return __all__
