"""Compiles the simulator's hot modules with mypyc when it can; the same sources run as plain Python.

The engine is the predictor's inner loop, so it is compiled for speed, never forked: there is one source
of truth (``simulator/engine.py``, ``simulator/timing.py``). Set BLOCK_PURE_PYTHON=1 to skip compiling.
"""

import os

from setuptools import setup

COMPILED = ["simulator/engine.py", "simulator/timing.py"]

ext_modules = []
if not os.environ.get("BLOCK_PURE_PYTHON"):
    try:
        from mypyc.build import mypycify

        # numpy is not installed in the isolated build environment; only its types are missing
        ext_modules = mypycify(["--ignore-missing-imports", *COMPILED], opt_level="3")
    except (Exception, SystemExit) as exc:  # no compiler or no mypyc: run the same code interpreted
        print(f"block-workbench: not compiling the simulator core ({exc}); running it as Python")

setup(ext_modules=ext_modules)
