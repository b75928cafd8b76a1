"""The ``bpalt`` command: ``compare``, ``train``, ``table`` and ``bench``.

Bad input (an unknown rule, data set or optimizer, a non-positive count or learning rate,
a missing data directory or file, a data directory for the bundled digits, a shape mismatch)
prints one line naming the value and what is accepted, and exits with status 2 before
anything is compiled.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import shlex
import signal
import sys
import threading
from pathlib import Path

from bpalt.argtypes import (
    INTERRUPTED,
    USAGE_ERROR,
    OneLineParser,
    diagnostics_interval,
    exit_process,
    positive_float,
    positive_int,
)

RESULT_FILES = ("summary.md", "summary.tex", "results.jsonl", "curves.png", "alignment.png")
OPTIMIZER_CHOICES = ("adam", "adamw", "sgd", "momentum", "rmsprop")
"""``config.OPTIMIZERS``'s names, listed here so that parsing imports neither JAX nor optax."""
SEED_LOOP_CHOICES = ("auto", "vmap", "map")
"""``train.SEED_LOOPS``, listed here for the same reason."""


class InterruptFlag:
    """A SIGINT handler that raises ``KeyboardInterrupt`` and remembers that it did.

    Python discards an exception raised inside a garbage-collection callback, and JAX
    registers one, so a Ctrl-C that lands there would be lost and training would go on.
    ``compare`` checks ``received`` after each epoch's checkpoint and stops there.
    """

    def __init__(self):
        self.received = False

    def __call__(self, signum, frame):
        del signum, frame
        self.received = True
        raise KeyboardInterrupt


def _add_training_options(parser: argparse.ArgumentParser, command: str) -> None:
    # Unset options keep each rule's registered training settings (bpalt.rules).
    parser.add_argument(
        "--epochs", type=positive_int,
        help="epochs per run (default: each rule's registered setting)",
    )
    parser.add_argument(
        "--seeds", type=positive_int, help="number of seeds per rule, 0..N-1 (default 3)"
    )
    parser.add_argument(
        "--batch-size", type=positive_int,
        help="examples per step (default: each rule's registered setting)",
    )
    parser.add_argument(
        "--optimizer", choices=OPTIMIZER_CHOICES, metavar="OPTIMIZER",
        help="adam, adamw, sgd, momentum or rmsprop (default: each rule's registered setting)",
    )
    parser.add_argument(
        "--learning-rate", type=positive_float,
        help="optimizer step size (default: each rule's registered setting)",
    )
    parser.add_argument(
        "--seed-loop", choices=SEED_LOOP_CHOICES, metavar="SEED_LOOP",
        help="how the seeds run in one compiled step: vmap (batched), map (one after "
        "another) or auto (default: chosen from the step's shapes)",
    )
    parser.add_argument(
        "--dataset", help="digits (default, bundled), mnist, fashion_mnist, kmnist, "
        "their *_t10k variants, or cifar10"
    )
    parser.add_argument(
        "--data-dir", help="directory with the data set's files (not for digits, which is bundled)"
    )
    parser.add_argument("--config", help="TOML file with settings and per-rule hyperparameters")
    parser.add_argument(
        "--diagnostics-every",
        type=diagnostics_interval,
        help="log diagnostics every N steps (default 20; 0 turns them off)",
    )
    parser.add_argument(
        "--out", help=f"output folder (default runs/{command}-<UTC time>); reuse it to resume"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="bpalt",
        description="Train one CNN with many update rules side by side and compare them.",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    compare = commands.add_parser(
        "compare", help="train every rule (or --rules) with several seeds and tabulate"
    )
    compare.add_argument("--rules", help="comma-separated rule names (default: all registered)")
    _add_training_options(compare, "compare")

    train = commands.add_parser("train", help="train one rule with the same options")
    train.add_argument("--rule", required=True, help="rule name, e.g. bp, fa, dfa")
    _add_training_options(train, "train")

    table = commands.add_parser("table", help="re-render the tables and plots of a results folder")
    table.add_argument("results_dir", help="folder holding results.jsonl")

    commands.add_parser(
        "bench",
        add_help=False,
        help="time every rule against a hand-written JAX step and peer libraries "
        "(bpalt bench --help lists its options)",
    )
    parser.subcommands = {"compare": compare, "train": train, "table": table}
    return parser


def _comparison(args, rule_names):
    from bpalt import config

    if args.config is not None and not args.config.strip():
        raise ValueError(
            "--config is empty; name a TOML file, or leave out --config to use the defaults"
        )
    file_settings = config.read_toml(args.config) if args.config else {}
    overrides = {
        "rules": rule_names,
        "epochs": args.epochs,
        "seeds": args.seeds,
        "batch_size": args.batch_size,
        "optimizer": args.optimizer,
        "learning_rate": args.learning_rate,
        "seed_loop": args.seed_loop,
        "dataset": args.dataset,
        "data_dir": args.data_dir,
        "diagnostics_every": args.diagnostics_every,
    }
    return config.make_comparison(file_settings, overrides, source=args.config)


TABLE_WIDTH_OFF_TERMINAL = 160
"""Columns of the printed comparison table when standard output is not a terminal."""


def _print_table(rows) -> None:
    from rich.console import Console
    from rich.table import Table

    from bpalt import reporting

    table = Table(title="bpalt comparison")
    cells = reporting.table_rows(rows)
    for index, column in enumerate(reporting.COLUMNS):
        # Rule names are never cut: other columns wrap their headers instead.
        widest = max((len(row[index]) for row in cells), default=0) if column == "rule" else 0
        table.add_column(
            column,
            justify="left" if column in ("rule", "runs") else "right",
            min_width=widest or None,
            no_wrap=column == "rule",
        )
    for row in cells:
        table.add_row(*row)

    # Off a terminal (a pipe or a log file) rich assumes 80 columns and cuts the headers.
    console = Console()
    if not console.is_terminal:
        console = Console(width=TABLE_WIDTH_OFF_TERMINAL)
    console.print(table)


def _run(args, rule_names) -> int:
    from bpalt import experiments

    if args.out is not None and not args.out.strip():
        raise ValueError(
            f"--out is empty; name a folder, or leave out --out to write to "
            f"runs/{args.command}-<UTC time>"
        )
    comparison = _comparison(args, rule_names)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or f"runs/{args.command}-{stamp}")
    command = "bpalt " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    interrupt = InterruptFlag()
    # Python accepts signal handlers from the main thread only.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, interrupt) if in_main_thread else None
    try:
        rows = experiments.compare(
            comparison,
            out,
            command=command,
            show_progress=not args.quiet,
            should_stop=lambda: interrupt.received,
        )
    except experiments.RuleSettingsError as error:
        # The [rule.NAME] tables come from the config file, so the message names the file.
        raise ValueError(f"{args.config}: {error}" if args.config else str(error)) from None
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)
    _print_table(rows)
    written = [name for name in RESULT_FILES if (out / name).exists()]
    print(f"results in {out}/ ({', '.join(written)})")
    failed = [row["rule"] for row in rows if row["statuses"].get("failed")]
    if failed:
        print(
            f"bpalt {args.command}: error: rule(s) {', '.join(failed)} failed; see summary.md",
            file=sys.stderr,
        )
        return 1
    return 0


def limit_blas_threads():
    """Limit the BLAS libraries already loaded (NumPy's and SciPy's OpenBLAS) to one thread.

    jaxlib's LAPACK calls (HSIC's matrix inverses) wake OpenBLAS's threads, which keep
    spinning after each call and take CPU time from XLA's threads. On 2 cores, backprop at
    batch 256 took 2.7 ms beside two BLAS threads and 1.9 ms beside one. Setting
    ``OPENBLAS_NUM_THREADS`` here would come too late: importing ``bpalt`` already loaded
    OpenBLAS. Returns the ``threadpoolctl`` limiter, whose ``restore_original_limits()``
    undoes it.
    """
    import threadpoolctl

    return threadpoolctl.threadpool_limits(limits=1, user_api="blas")


def main(argv=None) -> int:
    """Entry point of the ``bpalt`` console script."""
    limit_blas_threads()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    arguments = sys.argv[1:] if argv is None else list(argv)
    if arguments[:1] == ["bench"]:
        from bpalt import bench

        command = "bpalt " + " ".join(shlex.quote(a) for a in arguments)
        return bench.main(arguments[1:], command=command)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.subcommands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "train" and not args.rule.strip():
        parser.subcommands["train"].error("--rule is empty; name one rule, such as fa")
    if args.command == "train" and "," in args.rule:
        parser.subcommands["train"].error(
            f"--rule takes one rule name, got {args.rule!r}; use bpalt compare --rules "
            "to train several"
        )
    if argv is not None:
        sys.argv = ["bpalt", *argv]
    try:
        if args.command == "compare":
            return _run(args, args.rules)
        if args.command == "train":
            return _run(args, args.rule)
        if args.command == "table":
            from bpalt import checkpoint, reporting

            if not args.results_dir.strip():
                raise ValueError("the results folder is empty; name the folder of a run")
            if Path(args.results_dir).is_dir():
                checkpoint.check_writable(args.results_dir, option="results folder")

            rows = reporting.render(args.results_dir)
            _print_table(rows)
            return 0
    except (ValueError, FileNotFoundError, NotADirectoryError) as error:
        print(f"bpalt {args.command}: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except OSError as error:
        # A folder or file that became unwritable after the checks; results.jsonl and
        # the checkpoints written so far stay, so a rerun resumes.
        print(f"bpalt {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"bpalt {args.command}: interrupted; rerun with the same --out to resume",
            file=sys.stderr,
        )
        return INTERRUPTED
    return USAGE_ERROR


def entry() -> None:
    """Run ``main`` as the ``bpalt`` console script and exit with its status.

    After an interrupt the process ends through ``argtypes.exit_process``, which skips the
    interpreter's teardown. ``results.jsonl`` and the checkpoints are synced to disk before.
    """
    exit_process(main())


if __name__ == "__main__":
    entry()
