"""Command-line parsing shared by the ``bpalt`` command, the benchmark and the studies.

``OneLineParser`` reports a usage error as one line with exit status ``USAGE_ERROR``. The
value types turn an option's text into a number or raise ``argparse.ArgumentTypeError``,
which argparse reports as ``argument --name: <message>``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys

USAGE_ERROR = 2
"""Exit status for a bad command-line value."""
INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT), as shells report it."""


def exit_process(status: int) -> None:
    """Exit a command with ``status``, skipping the interpreter's teardown after an interrupt.

    That teardown, while XLA was still compiling on another thread, ended in a segmentation
    fault in about half of the interrupted runs. Everything a command keeps is written to
    disk before it returns ``INTERRUPTED``, so ``os._exit`` loses nothing.
    """
    if status == INTERRUPTED:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(status)
    sys.exit(status)


def usage_line(prog: str, message: str) -> str:
    """Format a usage error as ``prog: error: message (see prog --help)``."""
    return f"{prog}: error: {message} (see {prog} --help)"


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr, status ``USAGE_ERROR``."""

    def error(self, message):
        self.exit(USAGE_ERROR, usage_line(self.prog, message) + "\n")


def _integer(text: str, minimum: int, kind: str) -> int:
    """Parse an integer of at least ``minimum``. ``kind`` describes it in the messages."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {kind}, got {value}")
    return value


def positive_int(text: str) -> int:
    """Parse a positive integer option such as ``--epochs 40``."""
    return _integer(text, 1, "a positive integer")


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
    return _integer(text, 0, "a non-negative integer (0 turns the diagnostics off)")
