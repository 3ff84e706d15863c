"""Every benchmark's ``--quick`` runs in the suite and ends with its RESULT line, so none can rot unseen."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py"))
NEEDS_DATA = {"length_quality.py"}  # AlpacaEval prompts and lengths: nothing embedded to fall back on
RUN_ELSEWHERE = {"vllm_fidelity.py": "tests/test_vllm_fidelity.py"}  # its --quick (a real vLLM, ~2 min) runs there
NEEDS_CHROMIUM = {"dashboard_load.py"}  # the live dashboard in headless Chromium


@pytest.mark.parametrize("script", SCRIPTS)
def test_quick_run_prints_its_result_line(script):
    if script in NEEDS_DATA and not os.environ.get("BLOCK_DATA_DIR"):
        pytest.skip(f"{script} needs BLOCK_DATA_DIR")
    if script in RUN_ELSEWHERE:
        pytest.skip(f"{script} --quick runs in {RUN_ELSEWHERE[script]}, which checks its RESULT line and more")
    if script in NEEDS_CHROMIUM and not Path("/usr/bin/chromium").exists():
        pytest.skip(f"{script} needs /usr/bin/chromium")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick"], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    tail = (run.stdout + run.stderr)[-3000:]
    assert run.returncode == 0, tail
    results = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(results) == 1, tail
    assert re.fullmatch(r"RESULT( [a-z0-9_]+=\S+)+", results[0]), results[0]
