"""Value types for ``argparse`` options, shared by the ``bpalt`` command and the studies.

Each turns the option's text into a number or raises ``argparse.ArgumentTypeError``, which
argparse reports as ``argument --name: <message>`` with exit status 2.
"""

from __future__ import annotations

import argparse
import math


def positive_int(text: str) -> int:
    """Parse a positive integer option such as ``--epochs 40``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    """Parse a finite positive number option such as ``--learning-rate 3e-3``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite positive number, got {text}")
    return value


def diagnostics_interval(text: str) -> int:
    """Parse ``--diagnostics-every``: a step count, or 0 to turn the diagnostics off."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a non-negative integer (0 turns the diagnostics off), got {text!r}"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"must be a non-negative integer (0 turns the diagnostics off), got {value}"
        )
    return value
