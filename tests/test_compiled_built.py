"""The compiled parts pyproject.toml declares were built: they are `optional` (the package
installs without them and runs the same code in Python), so a C file that stops compiling
would otherwise go unnoticed, its tests falling back to Python or failing far from the cause."""

from __future__ import annotations

import importlib
import shutil
import sysconfig
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = [m["name"] for m in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["ext-modules"]]


@pytest.mark.skipif(shutil.which((sysconfig.get_config_var("CC") or "cc").split()[0]) is None, reason="no C compiler")
@pytest.mark.parametrize("name", MODULES)
def test_each_declared_extension_is_built_and_imports(name):
    module = importlib.import_module(name)
    assert Path(module.__file__).suffix == ".so"
