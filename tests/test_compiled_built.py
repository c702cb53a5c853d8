"""The compiled parts pyproject.toml declares compile: they are `optional` (the package installs
without them and runs the same code in Python), and a build that fails leaves the extension of
the last build that worked in place (pip install -e), so one C file that stops compiling would
otherwise go unnoticed, its tests running a stale .so or falling back to Python. Each module's
sources are compiled here (-fsyntax-only: no object is written), and each module imports."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sysconfig
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["ext-modules"]
CC = (sysconfig.get_config_var("CC") or "cc").split()[0]
INCLUDE = sysconfig.get_paths()["include"]


@pytest.mark.skipif(shutil.which(CC) is None or not (Path(INCLUDE) / "Python.h").exists(),
                    reason="no C compiler or no Python headers: nothing is compiled here")
@pytest.mark.parametrize("module", MODULES, ids=[m["name"] for m in MODULES])
def test_each_declared_extension_compiles_and_imports(module):
    for source in module["sources"]:
        done = subprocess.run([CC, "-fsyntax-only", *module.get("extra-compile-args", []), f"-I{INCLUDE}",
                               str(ROOT / source)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{source} does not compile:\n{done.stderr[-4000:]}"
    importlib.import_module(module["name"])
