"""Every Python block of the README runs as written, each in a fresh interpreter.

The blocks are the examples users copy: the xfer kernel on four local ranks, a Refitter with
an in-process vLLM engine, with a `vllm serve` over HTTP, with the user's own Ray actors, with
vLLM's own trainer API, and with Megatron-core ranks. Nothing is filled in by hand.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_the_readme_has_its_examples():
    assert len(BLOCKS) >= 6


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(tmp_path, index):
    script = tmp_path / f"block{index}.py"
    script.write_text(BLOCKS[index])
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=540
    )
    assert proc.returncode == 0, f"block {index}:\n{BLOCKS[index][:400]}\n{proc.stderr[-4000:]}"
