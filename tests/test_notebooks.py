"""Every reproduction notebook executes headless at its quick size, under nbconvert and (one) under papermill,
in the project's kernel, and draws its figures with BokehJS inline: nothing is fetched from outside."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
KERNEL = "block-workbench"
PAPERMILL = "05_config_search"  # the cheapest one: papermill injects its parameters and runs it
# Where a figure's resources would come from if they were not inline (BokehJS, Panel's CSS, web fonts).
REMOTE = re.compile(r"(?:https?:)?//(?:cdn\.bokeh\.org|cdn\.holoviz\.org|cdn\.jsdelivr\.net|unpkg\.com|"
                    r"fonts\.googleapis\.com|fonts\.gstatic\.com)[^\s\"']*")


@pytest.fixture(scope="module")
def jupyter_env(tmp_path_factory):
    """The kernel ``make lab`` installs, installed here into a folder of the test's own (JUPYTER_PATH)."""
    prefix = tmp_path_factory.mktemp("jupyter")
    subprocess.run([sys.executable, "-m", "ipykernel", "install", "--prefix", str(prefix), "--name", KERNEL,
                    "--display-name", "Block Workbench"], check=True, capture_output=True)
    return {**os.environ, "JUPYTER_PATH": str(prefix / "share" / "jupyter")}


def test_notebooks_declare_the_project_kernel_and_a_parameters_cell():
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        assert nb.metadata.kernelspec.name == KERNEL, path.name
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1 and re.search(r"^quick = True\b", tagged[0].source, re.M), path.name
        assert not any("BLOCK_QUICK" in c.source for c in nb.cells), path.name


def figures(nb: nbformat.NotebookNode) -> tuple[int, list[str]]:
    """Outputs that hold a Bokeh figure, and the remote resources the outputs reference. The BokehJS bundle
    (the extension's load output) only has to be inline itself: its code names CDNs for features loaded on
    demand (MathJax, an icon font) that these figures do not use."""
    drawn, remote = 0, []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            text = json.dumps(data)
            if "application/vnd.holoviews_load.v0+json" in data:
                remote += re.findall(r"//cdn\.(?:bokeh|holoviz)\.org[^\s\"']*", text)
                continue
            drawn += "application/vnd.holoviews_exec.v0+json" in data
            remote += REMOTE.findall(text)
    return drawn, remote


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[n.stem for n in NOTEBOOKS])
def test_notebook_executes_with_figures_offline(notebook, tmp_path, jupyter_env):
    out = tmp_path / notebook.name
    if notebook.stem == PAPERMILL:
        cmd = [sys.executable, "-m", "papermill", "--kernel", KERNEL, "-p", "quick", "True", "--cwd", str(ROOT),
               str(notebook), str(out)]
    else:
        cmd = [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
               "--ExecutePreprocessor.timeout=600", "--output-dir", str(tmp_path), str(notebook)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=jupyter_env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    nb = nbformat.read(out, as_version=4)
    if notebook.stem == PAPERMILL:
        assert any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells)
    drawn, remote = figures(nb)
    data_less = notebook.stem.startswith("06") and "BLOCK_DATA_DIR is not set" in json.dumps(nb.cells[2].outputs)
    assert drawn >= 1 or data_less, f"{notebook.name} drew no figure"
    assert not remote, f"{notebook.name} loads {remote[:3]} from outside"
