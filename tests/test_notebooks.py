"""Every reproduction notebook executes headless under nbconvert at its QUICK size."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[n.stem for n in NOTEBOOKS])
def test_notebook_executes(notebook, tmp_path):
    env = {**os.environ, "BLOCK_QUICK": "1"}
    proc = subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
                           "--ExecutePreprocessor.timeout=600", "--output-dir", str(tmp_path), str(notebook)],
                          capture_output=True, text=True, env=env, cwd=notebook.parent.parent, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / notebook.name).exists()
