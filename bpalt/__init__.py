"""bpalt: alternatives to backpropagation in JAX.

One network, one parameter pytree, many interchangeable update rules, each an optax-style
pair of pure functions. See ``bpalt.rules`` for the rules and ``bpalt.nn`` for the layers.
"""

from bpalt import (
    data,
    diagnostics,
    initializers,
    losses,
    manual,
    models,
    nn,
    ntk,
    rules,
    train,
)
from bpalt.nn import Layer, Network
from bpalt.rules import UpdateRule
from bpalt.train import make_train_step

__version__ = "0.1.0"


def __getattr__(name: str):
    """Import ``bpalt.studies`` on first access to ``bpalt.studies``.

    An eager import would put ``bpalt.studies`` in ``sys.modules`` before
    ``python -m bpalt.studies`` runs it as ``__main__``, and runpy warns about that.
    """
    if name == "studies":
        import importlib

        return importlib.import_module("bpalt.studies")
    raise AttributeError(f"module 'bpalt' has no attribute {name!r}")


__all__ = [
    "Layer",
    "Network",
    "UpdateRule",
    "data",
    "diagnostics",
    "initializers",
    "losses",
    "make_train_step",
    "manual",
    "models",
    "nn",
    "ntk",
    "rules",
    "studies",
    "train",
]
