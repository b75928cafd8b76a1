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
    studies,
    train,
)
from bpalt.nn import Layer, Network
from bpalt.rules import UpdateRule
from bpalt.train import make_train_step

__version__ = "0.1.0"

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
