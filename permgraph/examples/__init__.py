"""Worked examples built on permgraph's public API, outside the core: ``import permgraph``
imports none of them (nor their optional dependencies, such as scikit-learn).

- `permgraph.examples.digits`: scikit-learn's digits, an MLP builder, a trainer, an evaluator.
- `permgraph.examples.demo`: the ``permgraph demo`` (two MLPs trained, aligned, their barriers).
"""
