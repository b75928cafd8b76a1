"""Run the step-time benchmark and write experiments/results/benchmarks.{md,json}.

Usage, after ``bash scripts/setup.sh``::

    .venv/bin/pip install -e ".[bench]" && .venv/bin/pip install --no-deps biotorch==0.0.16
    .venv/bin/python scripts/bench.py --data-dir ~/data/mnist

Without the ``bench`` extra the peers are skipped with the reason; without ``--data-dir``
the LeNet workload runs on random data. Options: ``.venv/bin/python scripts/bench.py
--help``; ``--out`` defaults here to experiments/results/benchmarks.
"""

import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bpalt import bench  # noqa: E402
from bpalt.argtypes import exit_process  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    command = "python scripts/bench.py " + " ".join(shlex.quote(a) for a in argv)
    default_out = str(ROOT / "experiments" / "results" / "benchmarks")
    exit_process(bench.main(argv, command=command.strip(), default_out=default_out))
