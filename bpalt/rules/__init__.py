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
from bpalt.rules.greedy_infomax import GreedyInfoMaxState as GreedyInfoMaxState
from bpalt.rules.greedy_infomax import greedy_infomax as greedy_infomax
from bpalt.rules.hsic_bottleneck import HSICBottleneckState as HSICBottleneckState
from bpalt.rules.hsic_bottleneck import hsic_bottleneck as hsic_bottleneck
from bpalt.rules.ntk_linearized import NTKLinearizedState as NTKLinearizedState
from bpalt.rules.ntk_linearized import ntk_linearized as ntk_linearized
from bpalt.rules.random_features import RandomFeaturesState as RandomFeaturesState
from bpalt.rules.random_features import random_features as random_features
from bpalt.rules.registry import (
    constructor,
    get,
    held_out_evaluator,
    hyperparameters,
    names,
    register,
    training_defaults,
)

__all__ = [
    "BackpropState",
    "DirectFeedbackAlignmentState",
    "EvolutionStrategiesState",
    "FeedbackAlignmentState",
    "GreedyInfoMaxState",
    "HSICBottleneckState",
    "NTKLinearizedState",
    "RandomFeaturesState",
    "UpdateRule",
    "backprop",
    "constructor",
    "direct_feedback_alignment",
    "evolution_strategies",
    "feedback_alignment",
    "get",
    "greedy_infomax",
    "held_out_evaluator",
    "hsic_bottleneck",
    "hyperparameters",
    "names",
    "ntk_linearized",
    "random_features",
    "register",
    "training_defaults",
]
