"""Imports only point down: simulator and store < block < workbench < dashboards (see ARCHITECTURE.md).

Walks every module's syntax tree, function-level imports included, so a lazy import cannot hide a cycle.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "simulator": {"block", "workbench", "dashboards", "store"},
    "store": {"block", "workbench", "dashboards", "simulator"},
    "block": {"workbench", "dashboards"},
    "workbench": {"dashboards"},
}


def imported_packages(path: Path) -> set[tuple[str, int]]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {(alias.name.split(".")[0], node.lineno) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add((node.module.split(".")[0], node.lineno))
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_points_up(package):
    bad = [f"{path.relative_to(ROOT)}:{line} imports {name}"
           for path in sorted((ROOT / package).rglob("*.py"))
           for name, line in imported_packages(path) if name in FORBIDDEN[package]]
    assert not bad, "\n".join(bad)


def test_local_cluster_is_gone_or_a_thin_facade():
    local = ROOT / "workbench" / "local.py"
    assert not local.exists() or len(local.read_text().splitlines()) < 60
