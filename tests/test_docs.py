"""The documentation holds: every server TOML key is in the README's reference (and nothing
else), its embedded pmem example starts a server as written, every public call has a
docstring naming its arguments, internals are private, and the wheel ships py.typed
(issue 8, item 13)."""

from __future__ import annotations

import enum
import inspect
import os
import re
import signal
import subprocess
import sys
import zipfile


import memfabric
from memfabric import compat, config
from memfabric.launcher import wait_for_line

from .conftest import short_tmp_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def _keys_config_reads(monkeypatch, directory: str) -> set[str]:
    """Every key the configuration loaders ask for, as `table.key`, from configurations that
    take each branch (embedded and etcd servers, a client's fabric file)."""
    asked: set[str] = set()
    get = config._Table.get

    def recording(self, key, kind, default=...):
        table = re.sub(r"\[\d+\]$", "", self.where)
        if table != "(top)":
            asked.add(f"{table}.{key}")
        return get(self, key, kind, default)
    monkeypatch.setattr(config._Table, "get", recording)
    pool = '[[pool]]\nname = "default"\ncapacity = "8MiB"\n'
    files = {
        "embedded.toml": f'[server]\ndata_dir = "d"\n[cluster]\npath = "c.db"\n{pool}',
        "etcd.toml": f'[server]\ndata_dir = "d"\n[cluster]\nbackend = "etcd"\nendpoints = ["h:1"]\n{pool}',
        "fabric.toml": '[cluster]\n[[servers]]\nipc_socket = "s"\n',
    }
    for name, text in files.items():
        path = os.path.join(directory, name)
        with open(path, "w") as f:
            f.write(text)
        config.load_fabric_config(path)
    return asked


def test_the_readme_names_every_configuration_key_and_no_other(monkeypatch, tmp_path):
    readme = _readme()
    table = readme[readme.index("<!-- toml-reference -->"):readme.index("<!-- /toml-reference -->")]
    documented = re.findall(r"^\| `([a-z_]+\.[a-z_]+)` \|", table, re.MULTILINE)
    assert len(documented) == len(set(documented)), "a key documented twice"
    read = _keys_config_reads(monkeypatch, str(tmp_path))
    assert set(documented) - read == set(), "documented, but no configuration reads it"
    assert read - set(documented) == set(), "read from configurations, but not in the README's reference"


def test_every_key_of_the_readmes_toml_examples_is_a_real_one(monkeypatch, tmp_path):
    readme = _readme()
    read = _keys_config_reads(monkeypatch, str(tmp_path))
    for block in re.findall(r"```toml\n(.*?)```", readme, re.DOTALL):
        table = None
        for line in block.splitlines():
            line = line.split("#")[0].strip()
            if m := re.fullmatch(r"\[\[?([a-z_]+)\]?\]", line):
                table = m.group(1)
            elif m := re.match(r"([a-z_]+)\s*=", line):
                assert f"{table}.{m.group(1)}" in read, f"the README's TOML names an unknown key {table}.{m.group(1)}"


def test_the_readmes_embedded_pmem_example_starts_a_server_as_written():
    readme = _readme()
    start = readme.index("<!-- example: embedded-pmem -->\n```toml\n")
    example = readme[start:].split("```toml\n", 1)[1].split("```", 1)[0]
    directory = short_tmp_dir("mf-doc-")
    text = (example.replace("/var/lib/memfabric", f"{directory}/data")
            .replace("/mnt/pmem0/memfabric", f"{directory}/pmem"))
    assert text != example
    path = os.path.join(directory, "server.toml")
    with open(path, "w") as f:
        f.write(text)
    for run in range(2):            # objects of a pmem pool survive a restart
        proc = subprocess.Popen([sys.executable, "-m", "memfabric", "server", "--config", path],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            wait_for_line(proc, " ready ", 60, [])
            with memfabric.init(path) as session:
                ns = session.create_namespace("docs", sec_id="k", exist_ok=True)
                if run == 0:
                    ns.alloc(1 << 20).write(b"kept")
                [kept] = ns.objects()
                assert ns.open(kept.bm_id).read(0, 4) == b"kept"
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0


def test_a_cluster_database_that_cannot_be_made_is_one_line_not_a_traceback():
    directory = short_tmp_dir("mf-doc-")
    path = os.path.join(directory, "server.toml")
    with open(path, "w") as f:
        f.write(f'[server]\ndata_dir = "{directory}/data"\n[cluster]\npath = "/proc/self/no/cluster.db"\n'
                '[[pool]]\nname = "default"\ncapacity = "4MiB"\n')
    proc = subprocess.run([sys.executable, "-m", "memfabric", "server", "--config", path], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1 and "cluster database" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


# ---- docstrings and privacy -----------------------------------------------------------------


def _public_callables():
    """(name, callable) of every public class, function and method of the Pythonic API and of
    compat (the errors have their own test)."""
    for name in memfabric.__all__:
        obj = getattr(memfabric, name)
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            continue
        yield name, obj
        if inspect.isclass(obj):
            for base in obj.__mro__:
                if not base.__module__.startswith("memfabric"):
                    continue
                for attr, member in vars(base).items():
                    if attr.startswith("_"):
                        continue
                    if isinstance(member, (staticmethod, classmethod)):
                        member = member.__func__
                    if callable(member) or isinstance(member, property):
                        yield f"{name}.{attr}", member
    for name in compat.__all__:
        obj = getattr(compat, name)
        if callable(obj) and getattr(obj, "__module__", "").startswith("memfabric"):
            yield f"compat.{name}", obj


# Classes the library makes and hands out (their constructors' arguments are its own).
MADE_BY_THE_LIBRARY = {"ArrayMapping", "BigMemory", "Mapping", "RemoteMapping", "Namespace", "Plog"}


def test_every_public_call_has_a_docstring_naming_its_arguments():
    missing, unnamed = [], []
    for name, obj in _public_callables():
        doc = inspect.getdoc(obj.fget if isinstance(obj, property) else obj) or ""
        if len(doc) < 20:
            missing.append(name)
            continue
        if isinstance(obj, property) or inspect.isclass(obj) and issubclass(obj, enum.Enum) \
                or name in MADE_BY_THE_LIBRARY:
            continue
        try:
            params = inspect.signature(obj).parameters
        except (TypeError, ValueError):
            continue
        for param in params:
            if param not in ("self", "cls") and not re.search(rf"\b{param}\b", doc):
                unnamed.append(f"{name}({param})")
    assert missing == [], "no docstring"
    assert unnamed == [], "arguments the docstring does not name"


def test_every_error_class_says_when():
    for name in memfabric.__all__:
        obj = getattr(memfabric, name)
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            assert (vars(obj).get("__doc__") or "").strip(), f"{name} has no docstring of its own"


def test_internals_are_private():
    session_internals = {"cached_link", "forget", "forget_namespace", "link_for_object", "remember", "cached_handle"}
    assert not session_internals & set(dir(memfabric.Session))
    assert not {"home_link"} & set(dir(memfabric.BigMemory))
    assert not {"same_secret"} & set(dir(memfabric.Namespace))


def test_the_wheel_ships_py_typed(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), ROOT],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [wheel] = [name for name in os.listdir(tmp_path) if name.endswith(".whl")]
    with zipfile.ZipFile(tmp_path / wheel) as z:
        assert "memfabric/py.typed" in z.namelist()
