"""Initialisation study on the digits: ``python experiments/init_study.py [--out DIR]``.

The same as ``python -m bpalt.studies init``; the logic is ``bpalt.studies.init_study``.
The result file records the equivalent ``python -m bpalt.studies`` command.
"""

import sys

from bpalt import studies

if __name__ == "__main__":
    sys.exit(studies.main(["init", *sys.argv[1:]]))
