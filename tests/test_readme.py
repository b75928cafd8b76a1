"""The README's own-training-loop example runs as written and learns."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_example_learns(capsys):
    blocks = [b for b in _python_blocks() if "rule.update" in b]
    assert len(blocks) == 1
    namespace: dict = {}

    exec(compile(blocks[0], str(README), "exec"), namespace)

    accuracy = float(np.mean(np.argmax(namespace["logits"], -1) == namespace["digits"].y_test))
    assert accuracy > 0.9
    assert "test accuracy" in capsys.readouterr().out
