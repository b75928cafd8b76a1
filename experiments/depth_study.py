"""Gradient norm against depth: ``python experiments/depth_study.py [--out DIR]``.

The same as ``python -m bpalt.studies depth``; the logic is ``bpalt.studies.depth_study``.
The result file records the equivalent ``python -m bpalt.studies`` command.
"""

import sys

from bpalt import studies

if __name__ == "__main__":
    sys.exit(studies.main(["depth", *sys.argv[1:]]))
