"""Update rules and their registry.

Each rule is a constructor ``rule(network, loss, **hyperparameters) -> UpdateRule``;
``get(name, network, loss, **hyperparameters)`` builds one by its short name.
"""

from bpalt.rules.backprop import BackpropState, backprop
from bpalt.rules.base import UpdateRule
from bpalt.rules.direct_feedback_alignment import (
    DirectFeedbackAlignmentState,
    direct_feedback_alignment,
)
from bpalt.rules.evolution_strategies import (
    EvolutionStrategiesState as EvolutionStrategiesState,
)
from bpalt.rules.evolution_strategies import evolution_strategies as evolution_strategies
from bpalt.rules.feedback_alignment import FeedbackAlignmentState, feedback_alignment
from bpalt.rules.ntk_linearized import NTKLinearizedState as NTKLinearizedState
from bpalt.rules.ntk_linearized import ntk_linearized as ntk_linearized
from bpalt.rules.registry import (
    constructor,
    get,
    hyperparameters,
    names,
    register,
    training_defaults,
)

__all__ = [
    "BackpropState",
    "DirectFeedbackAlignmentState",
    "FeedbackAlignmentState",
    "UpdateRule",
    "backprop",
    "constructor",
    "direct_feedback_alignment",
    "feedback_alignment",
    "get",
    "hyperparameters",
    "names",
    "register",
    "training_defaults",
]
