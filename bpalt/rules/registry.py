"""Short names (``bp``, ``fa``, ``dfa``, ...) mapped to rule constructors.

Configs and the command line name rules by these keys. A constructor takes the network,
the loss and the rule's hyperparameters as keyword arguments and returns an ``UpdateRule``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

from bpalt import losses
from bpalt.nn import Network
from bpalt.rules.base import UpdateRule

_REGISTRY: dict[str, Callable[..., UpdateRule]] = {}
_TRAINING: dict[str, dict[str, object]] = {}
_EVALUATORS: dict[str, Callable] = {}
TRAINING_KEYS = ("epochs", "batch_size", "optimizer", "learning_rate")


def register(
    name: str,
    *,
    training: dict[str, object] | None = None,
    evaluator: Callable | None = None,
):
    """Decorator adding a rule constructor to the registry under ``name``.

    Args:
        name: the short name used by configs and the command line.
        training: the rule's recommended training settings on the default CNN and digits,
            a subset of ``epochs``, ``batch_size``, ``optimizer`` and ``learning_rate``; a
            comparison uses them unless the user sets those values.
        evaluator: optional ``(network, loss, **hyperparameters) -> evaluate or None``,
            taking the same hyperparameters as the constructor. ``evaluate(rule_state,
            params, x, y) -> {name: float}`` measures one run on held-out data, beyond test
            accuracy (e.g. Greedy InfoMax's InfoNCE loss); ``None`` means that nothing
            applies to this network. ``bpalt compare`` records the measures at
            initialisation and after every epoch.
    """
    training = dict(training or {})
    unknown = sorted(set(training) - set(TRAINING_KEYS))
    if unknown:
        raise ValueError(f"unknown training setting(s) {unknown}; accepted: {TRAINING_KEYS}")

    def decorate(constructor):
        registered = _REGISTRY.get(name)
        if registered is not None and _unchecked(registered) is not _unchecked(constructor):
            raise ValueError(f"a rule named {name!r} is already registered")
        checked = _checked(constructor, name)
        _REGISTRY[name] = checked
        _TRAINING[name] = training
        if evaluator is not None:
            _EVALUATORS[name] = evaluator
        return checked

    return decorate


def check_network(network) -> None:
    """Raise ``TypeError`` unless ``network`` is a ``bpalt.nn.Network``."""
    if not isinstance(network, Network):
        raise TypeError(
            f"network must be a bpalt.nn.Network, got {type(network).__name__} {network!r:.60}; "
            "build one with bpalt.models (e.g. models.digits_cnn()) or bpalt.nn.Network"
        )


def _keyword_hyperparameters(constructor: Callable[..., UpdateRule]) -> dict[str, object]:
    """Return the hyperparameters of ``constructor`` and their defaults.

    These are its parameters after ``network`` and ``loss`` that can be passed by keyword.
    The built-in rules make all of them keyword-only.
    """
    parameters = list(inspect.signature(constructor).parameters.values())[2:]
    return {
        parameter.name: parameter.default
        for parameter in parameters
        if parameter.kind
        in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }


def _takes_any_keyword(constructor: Callable[..., UpdateRule]) -> bool:
    """Return whether ``constructor`` has a ``**kwargs`` parameter."""
    return any(
        parameter.kind is inspect.Parameter.VAR_KEYWORD
        for parameter in inspect.signature(constructor).parameters.values()
    )


def _checked(constructor: Callable[..., UpdateRule], name: str) -> Callable[..., UpdateRule]:
    """Wrap a rule constructor so that a direct call checks its arguments as ``get`` does.

    ``rules.feedback_alignment(network, loss, **hyperparameters)`` then fails at once on a
    wrong network, an unknown loss name or an unknown hyperparameter, with a message that
    names the accepted values, instead of later with an error about a missing attribute.
    The wrapper keeps the constructor's signature, so ``hyperparameters`` reads it
    unchanged.
    """
    if getattr(constructor, "_checked_rule", False):
        return constructor
    accepted = _keyword_hyperparameters(constructor)
    any_keyword = _takes_any_keyword(constructor)

    @functools.wraps(constructor)
    def build(network, loss=None, *args, **hyperparameters):
        check_network(network)
        unknown = sorted(set(hyperparameters) - set(accepted))
        if unknown and not any_keyword:
            raise ValueError(
                f"unknown hyperparameter(s) {', '.join(unknown)} for rule {name!r}; "
                f"accepted: {', '.join(accepted) or 'none'}"
            )
        if loss is None:
            rule = constructor(network, *args, **hyperparameters)
        else:
            rule = constructor(network, losses.get(loss), *args, **hyperparameters)
        return rule._replace(update=_pair_checked(rule.update, network))

    build._checked_rule = True
    return build


def check_batch(batch) -> None:
    """Raise ``ValueError`` unless ``batch`` is a pair ``(x, y)``.

    A bare array of two examples would otherwise unpack into ``x`` and ``y`` without an
    error, and any other bare array would fail with a message about unpacking.
    """
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return
    if isinstance(batch, (tuple, list)):
        described = f"a {type(batch).__name__} of {len(batch)} items"
    elif getattr(batch, "shape", None) is not None:
        described = f"an array of shape {tuple(batch.shape)}"
    else:
        described = type(batch).__name__
    raise ValueError(
        f"batch must be a pair (x, y) of inputs (batch, *input_shape) and labels (batch,), "
        f"got {described}; pass (x, y)"
    )


def _pair_checked(update, network: Network):
    """Wrap ``update(state, params, batch, key)`` so that it checks ``batch`` first.

    Some rules read the inputs' shape before they run the network, so the network's own
    check of the inputs (``Network.check_input``) runs here too.
    """
    if getattr(update, "_checks_batch", False):
        return update

    @functools.wraps(update)
    def checked(state, params, batch, key):
        check_batch(batch)
        x, y = batch
        network.check_input(x)
        labels = getattr(y, "shape", (None,))[:1]
        if labels != x.shape[:1]:
            raise ValueError(
                f"invalid batch: {x.shape[0]} inputs but labels of shape "
                f"{tuple(getattr(y, 'shape', ()))}; pass one label per input"
            )
        return update(state, params, batch, key)

    checked._checks_batch = True
    return checked


def _unchecked(constructor: Callable[..., UpdateRule]) -> Callable[..., UpdateRule]:
    """Return the constructor that ``_checked`` wrapped, or ``constructor`` itself."""
    return constructor.__wrapped__ if getattr(constructor, "_checked_rule", False) else constructor


def training_defaults(name: str) -> dict[str, object]:
    """Return the training settings that rule ``name`` recommends (may be empty)."""
    constructor(name)
    return dict(_TRAINING[name])


def names() -> tuple[str, ...]:
    """Registered rule names, in registration order."""
    return tuple(_REGISTRY)


def constructor(name: str) -> Callable[..., UpdateRule]:
    """Return the constructor registered under ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown rule {name!r}; accepted: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def hyperparameters(name: str) -> dict[str, object]:
    """Keyword hyperparameters of rule ``name`` and their defaults."""
    return _keyword_hyperparameters(constructor(name))


def get(name: str, network: Network, loss=losses.softmax_cross_entropy, **kwargs) -> UpdateRule:
    """Build rule ``name`` for ``network`` and ``loss`` with hyperparameters ``kwargs``.

    Raises:
        ValueError: for an unknown rule name or hyperparameter, naming the accepted ones.
        TypeError: if ``network`` is not a ``bpalt.nn.Network``.
    """
    return constructor(name)(network, loss, **kwargs)


def held_out_evaluator(
    name: str, network: Network, loss=losses.softmax_cross_entropy, **kwargs
) -> Callable | None:
    """Build rule ``name``'s held-out ``evaluate(rule_state, params, x, y) -> {name: float}``
    for one run, or return ``None`` when the rule registered none or none applies to
    ``network``. ``kwargs`` are the rule's hyperparameters, checked as by ``get``."""
    get(name, network, loss, **kwargs)
    factory = _EVALUATORS.get(name)
    if factory is None:
        return None
    return factory(network, losses.get(loss or losses.softmax_cross_entropy), **kwargs)
