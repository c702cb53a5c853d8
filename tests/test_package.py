"""`import memfabric` as a library user meets it: its names loaded when first used (PEP 562),
so the `memfabric` command can catch a Ctrl-C before the client's imports."""

from __future__ import annotations

import subprocess
import sys

import memfabric


def test_import_memfabric_loads_no_client_until_a_name_is_used():
    code = ("import sys, memfabric; print('memfabric.client.session' in sys.modules, 'numpy' in sys.modules); "
            "memfabric.init; print('memfabric.client.session' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.split() == ["False", "False", "True"], out.stdout + out.stderr


def test_names_and_submodules_resolve_and_others_are_attribute_errors():
    from memfabric.errors import Sealed
    assert memfabric.Sealed is Sealed and memfabric.errors.Sealed is Sealed
    assert memfabric.compat.__name__ == "memfabric.compat"
    for name in ("nonexistent", "a.b", "errors.Sealed", "", "__wrapped__"):
        assert not hasattr(memfabric, name), name


def test_dir_lists_the_public_names_not_the_modules_helpers():
    names = dir(memfabric)
    assert set(memfabric.__all__) <= set(names)
    assert not {"importlib", "TYPE_CHECKING", "Any", "annotations"} & set(names)
