"""Python that feels native: numpy integers wherever an int is expected, the library's own
errors for every wrong argument, `exist_ok`, listing a namespace's objects, errors that say
what to do (issue 8, items 6 to 8)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import memfabric
from memfabric import (Affinity, BmError, InvalidArgument, MemfabricError, NamespaceExists, OperatorCode,
                       OutOfMemory, PermissionDenied)
from memfabric import compat as C
from memfabric.transport import wire

from ..conftest import run_client
from ..helpers import MiB, ns_name

INT_TYPES = [np.int64, np.uint32, np.intp]


@pytest.fixture
def wire_messages(monkeypatch):
    """Every message this process encodes for a server, as it was handed to the encoder."""
    seen: list[dict] = []
    encode = wire.encode

    def recording(message):
        seen.append(message)
        return encode(message)
    monkeypatch.setattr(wire, "encode", recording)
    return seen


def _plain(value, where="message"):
    """Fail on anything in an outgoing message that is not a plain Python value."""
    if isinstance(value, dict):
        for k, v in value.items():
            _plain(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _plain(v, f"{where}[{i}]")
    else:
        assert type(value) in (int, float, str, bytes, bool, type(None)), \
            f"{where} carries a {type(value).__name__}: {value!r}"


# ---- item 6: numpy integers ----------------------------------------------------------------


@pytest.mark.parametrize("T", INT_TYPES, ids=lambda t: t.__name__)
def test_numpy_integers_are_ints_everywhere_and_the_wire_carries_plain_ints(fabric, wire_messages, T, request,
                                                                             tmp_path):
    name = ns_name(request)
    with memfabric.init(fabric.directory, server=T(0), timeout_s=T(30), busy_poll_us=T(0)) as s:
        ns = s.create_namespace(name, sec_id="k", attribute=T(7))
        assert s.create_namespace(name, sec_id="k", attribute=T(7), exist_ok=True).name == name
        assert [n.attribute for n in s.namespaces() if n.ns == name] == [7]
        bm = ns.alloc(T(8192))
        there = ns.alloc(T(4096), Affinity("server", server_id=T(2)))
        assert there.bm_id.startswith("2-")
        spread = ns.alloc(T(3 * MiB), Affinity("spread"))
        bm.write(b"abcdefgh", T(8))
        bm.write(np.arange(4, dtype=np.uint8), offset=T(0))
        assert bm.read(T(8), T(4)) == b"abcd"
        out = bytearray(6)
        assert bm.read(T(6), T(4), into=out) is None and out[:4] == b"\x00\x00ab"
        bm.expand(T(16384))
        assert bm.size == 16384
        bm.copy_to(there, src_offset=T(8), dst_offset=T(100), length=T(8))
        assert there.read(100, 8) == b"abcdefgh"
        bm.copy_to(spread, src_offset=T(0), dst_offset=T(MiB))
        path = tmp_path / "file"
        path.write_bytes(b"0123456789")
        assert bm.swap_in(str(path), file_offset=T(2), offset=T(16), length=T(4)) == 4
        assert bm.read(16, 4) == b"2345"
        dst, length = ns.gather([(bm, T(8), T(4)), (there, T(100), T(4))], T(0))
        assert length == 8 and dst.read(0, 8) == b"abcdabcd"
        total, length = ns.gather([(bm, T(8), T(2)), (there, T(100), T(2))], OperatorCode.SUM, dtype=np.uint8)
        assert length == 2 and total.read(0, 2) == bytes([ord("a") * 2 % 256, ord("b") * 2 % 256])
        arr = bm.ndarray(np.uint8, shape=(T(2), T(4)), offset=T(8))
        assert arr.tobytes() == b"abcdefgh"
        del arr
        assert ns.batch_free([dst.bm_id, total.bm_id]) == [0, 0]
        assert {o.bm_id for o in ns.objects()} == {bm.bm_id, there.bm_id, spread.bm_id}
        s.destroy_namespace(name, "k")
    assert wire_messages, "the calls went to the servers"
    for message in wire_messages:
        _plain(message)


@pytest.mark.parametrize("T", INT_TYPES, ids=lambda t: t.__name__)
def test_numpy_integers_through_compat(fabric, wire_messages, T, request, tmp_path):
    name = ns_name(request)
    assert C.BM_InitWithExtAttr(fabric.directory, T(0), {"server": T(0), "timeout_s": T(30),
                                                          "busy_poll_us": T(0)}) == 0
    try:
        assert C.BM_CreateNSSec("default", name, T(3), "k") == 0
        info = C.BmInfo(ns=name, sec_id="k")
        assert C.BM_AllocSec(info, T(8192), T(0), None) == 0
        other = C.BmInfo(ns=name, sec_id="k")
        assert C.BM_AllocSec(other, T(4096), T(0), Affinity("server", server_id=T(2))) == 0
        assert C.BM_WriteSec(info, T(8), T(4), b"wxyz", T(0)) == 0
        buf = bytearray(4)
        assert C.BM_ReadSec(info, T(8), T(4), buf, T(0)) == 0 and buf == b"wxyz"
        assert C.BM_ExpandSec(info, T(16384), T(0)) == 0 and info.size == 16384
        assert C.BM_CopySec(info, T(8), other, T(0), T(4), T(0)) == 0
        path = tmp_path / "f"
        path.write_bytes(b"0123456789")
        assert C.BM_SpecificObjSwapInSec(C.DiskFileDesc(str(path), T(3)), info, T(0), T(0), T(2)) == 0
        rc, view = C.BM_MapSec(info, T(C.PROT_READ | C.PROT_WRITE), T(0))
        assert rc == 0 and bytes(view[:2]) == b"34"
        assert C.BM_Unmap(info.bm_id, view) == 0
        dst = C.BmInfo(ns=name, sec_id="k")
        rc, length = C.BM_GatherSec([(info, T(8), T(4)), (other, T(0), T(4))], T(0), T(0), dst)
        assert (rc, length) == (0, 8)
        assert C.BM_BatchFreeSec([dst.bm_id, other.bm_id], T(2), T(0), name, "k") == 0
        assert C.BM_FreeSec(info, T(0)) == 0
        assert C.BM_DestroyNSSec("default", name, "k") == 0
    finally:
        assert C.BM_Exit() == 0
    for message in wire_messages:
        _plain(message)


def test_a_bool_is_not_a_size_or_an_offset(ns):
    for call in (lambda: ns.alloc(True), lambda: ns.alloc(4096).read(True, 1),
                 lambda: Affinity("server", server_id=True), lambda: ns.alloc(8).expand(True)):
        with pytest.raises(InvalidArgument):
            call()


# ---- item 7: the library's errors, never raw Python ones --------------------------------------


def test_the_reported_raw_errors_are_the_librarys(fabric, session, ns):
    with pytest.raises(InvalidArgument):
        memfabric.init(fabric.directory, timeout_s=-1)
    with pytest.raises(InvalidArgument):
        ns.alloc(1 << 70)
    with pytest.raises(InvalidArgument):
        ns.alloc(4096).expand(1 << 70)
    bm = ns.alloc(4096, "spread")              # a policy's name is shorthand for its Affinity
    assert ns.alloc(4096, "local").bm_id.startswith("1-")
    with pytest.raises(InvalidArgument):
        ns.alloc(4096, "server")               # names no server
    with pytest.raises(InvalidArgument):
        ns.alloc(4096, "everywhere")
    with pytest.raises(InvalidArgument):
        bm.copy_to("x")
    with pytest.raises(InvalidArgument):
        ns.batch_free(bm.bm_id)                # one id is not a list of ids
    assert bm.read(0, 1) == b"\0", "nothing was freed"
    with pytest.raises(memfabric.OutOfRange):
        bm.copy_to(bm, src_offset=0, dst_offset=1 << 70, length=1)
    with pytest.raises(InvalidArgument):
        ns.gather([(bm, 0, 8)], OperatorCode.SUM, dtype=np.dtype(object))
    result, length = ns.gather([(bm, 0, 8)], OperatorCode.SUM, dtype=np.dtype("int32"))
    assert length == 8


def test_memfabric_ioerror_has_a_name_without_an_underscore(ns, tmp_path):
    assert memfabric.IOError_ is memfabric.MemfabricIOError
    assert memfabric.MemfabricIOError.code == BmError.IO_ERROR
    with pytest.raises(memfabric.MemfabricIOError) as err:
        ns.alloc(4096).swap_in(str(tmp_path / "missing"))
    assert type(err.value).__name__ == "MemfabricIOError"


# Values no argument of the API takes as they are, or only some do: each public call gets each
# in each argument in turn, the others valid.
BAD_VALUES = [None, "x", "", 1.5, float("nan"), -1, 0, 1 << 70, -(1 << 70), True, [], ["x"], {}, object(),
              b"\0", np.float64(2.5), np.dtype(object), np.int64(-1), (1, 2), "1-0-1", np.bool_(True)]


def _every_failure_is_ours(name, call, valid, cleanup=lambda result: None):
    for arg in valid:
        for bad in BAD_VALUES:
            args = {**valid, arg: bad}
            try:
                result = call(**args)
            except MemfabricError:
                continue
            except Exception as exc:         # noqa: BLE001 - the point of the test
                pytest.fail(f"{name}({arg}={bad!r}) raised {type(exc).__name__}: {exc}")
            cleanup(result)


def test_every_public_call_with_wrong_arguments_raises_a_memfabric_error(fabric, session, ns, tmp_path):
    bm = ns.alloc(16384)
    other = ns.alloc(16384)
    path = str(tmp_path / "f")
    with open(path, "wb") as f:
        f.write(b"x" * 64)

    def close(value):
        if isinstance(value, memfabric.Session):
            value.close()

    def free(value):
        if isinstance(value, memfabric.BigMemory) and value.bm_id not in (bm.bm_id, other.bm_id):
            value.free()
        if isinstance(value, tuple) and value and isinstance(value[0], memfabric.BigMemory):
            free(value[0])

    def unmap(value):
        value.close()

    def destroy(value):
        if value.name != ns.name:        # a bad value that is a valid name made one
            value.destroy()

    cases = [
        ("init", memfabric.init, dict(ock_path=fabric.directory, server=0, timeout_s=5, busy_poll_us=0), close),
        ("create_namespace", session.create_namespace,
         dict(ns=ns.name, sec_id=f"sec-{ns.name}", pool="default", attribute=0, exist_ok=True), destroy),
        ("namespace", session.namespace, dict(ns=ns.name, sec_id="k", pool="default"), None),
        ("destroy_namespace", session.destroy_namespace, dict(ns=ns.name + "-no", sec_id="k", pool="default"),
         None),
        ("Affinity", Affinity, dict(policy="server", server_id=1), None),
        ("alloc", ns.alloc, dict(size=4096, affinity=None), free),
        ("open", ns.open, dict(bm_id=bm.bm_id), None),
        ("batch_free", ns.batch_free, dict(bm_ids=[]), None),
        ("gather", ns.gather, dict(inputs=[(bm, 0, 8)], op=OperatorCode.CONCAT, dst=None, dtype="uint8"), free),
        ("read", bm.read, dict(offset=0, length=4, into=None), None),
        ("write", bm.write, dict(data=b"abcd", offset=0), None),
        ("map", bm.map, dict(writable=True), unmap),
        ("expand", bm.expand, dict(new_size=16384), None),
        ("copy_to", bm.copy_to, dict(dst=other, src_offset=0, dst_offset=0, length=8), None),
        ("swap_in", bm.swap_in, dict(path=path, file_offset=0, offset=0, length=4), None),
        ("ndarray", bm.ndarray, dict(dtype="uint8", shape=None, offset=0, writable=True), None),
    ]
    for name, call, valid, cleanup in cases:
        _every_failure_is_ours(name, call, valid, cleanup or (lambda result: None))
    for name, call in [("gather inputs", lambda item: ns.gather([item])),
                       ("gather inputs", lambda item: ns.gather([(bm, 0, 8), item]))]:
        for bad in BAD_VALUES + [(bm, 0), (bm, 0, 8, 9), ("x", 0, 8), (bm, "0", 8), (bm, 0, 1 << 70)]:
            try:
                free(call(bad))
            except MemfabricError:
                pass
    assert bm.size >= 16384 and other.read(0, 4) is not None


def test_every_compat_call_with_wrong_arguments_returns_a_code(fabric, ns, compat_session, tmp_path):
    info = C.BmInfo(ns=ns.name, sec_id=f"sec-{ns.name}")
    assert C.BM_AllocSec(info, 16384, 0, None) == 0
    other = C.BmInfo(ns=ns.name, sec_id=f"sec-{ns.name}")
    assert C.BM_AllocSec(other, 16384, 0, None) == 0
    path = str(tmp_path / "f")
    with open(path, "wb") as f:
        f.write(b"x" * 64)
    rc, view = C.BM_MapSec(info, C.PROT_READ, 0)
    assert rc == 0
    calls = [
        (C.BM_CreateNSSec, dict(pool_name="default", ns=ns.name, attribute=0, sec_id="k")),
        (C.BM_DestroyNSSec, dict(pool_name="default", ns=ns.name + "-no", sec_id="k")),
        (C.BM_AllocSec, dict(info=C.BmInfo(ns=ns.name, sec_id=f"sec-{ns.name}"), size=4096, flags=0,
                             affinity=None)),
        (C.BM_FreeSec, dict(info=C.BmInfo(ns=ns.name, sec_id=f"sec-{ns.name}", bm_id="1-0-1"), flags=0)),
        (C.BM_BatchFreeSec, dict(bm_ids=[], num=0, flags=0, ns=ns.name, sec_id=f"sec-{ns.name}")),
        (C.BM_ExpandSec, dict(info=info, new_size=16384, flags=0)),
        (C.BM_MapSec, dict(info=info, prot=C.PROT_READ, flags=0)),
        (C.BM_Unmap, dict(bm_id=info.bm_id, view=memoryview(b"other"))),
        (C.BM_CopySec, dict(src=info, src_offset=0, dst=other, dst_offset=0, length=8, flags=0)),
        (C.BM_SpecificObjSwapInSec, dict(file=C.DiskFileDesc(path), info=info, flags=0, offset=0, length=4)),
        (C.BM_ReadSec, dict(info=info, offset=0, length=4, buffer=bytearray(4), flags=0)),
        (C.BM_WriteSec, dict(info=info, offset=0, length=4, buffer=b"abcd", flags=0)),
        (C.BM_GatherSec, dict(inputs=[(info, 0, 8)], op=OperatorCode.CONCAT, flags=0,
                              info=C.BmInfo(ns=ns.name, sec_id=f"sec-{ns.name}"))),
    ]
    for call, valid in calls:
        for arg in valid:
            for bad in BAD_VALUES:
                try:
                    result = call(**{**valid, arg: bad})
                except Exception as exc:   # noqa: BLE001 - the point of the test
                    pytest.fail(f"{call.__name__}({arg}={bad!r}) raised {type(exc).__name__}: {exc}")
                code = result[0] if isinstance(result, tuple) else result
                assert type(code) is int and code <= 0, (call.__name__, arg, bad, result)
                if call is C.BM_MapSec and code == 0:
                    assert C.BM_Unmap(info.bm_id, result[1]) == 0
    assert C.BM_Unmap(info.bm_id, view) == 0


def test_compat_init_with_wrong_arguments_returns_a_code(fabric):
    attrs = [bad for bad in BAD_VALUES] + [{key: bad} for key in ("server", "timeout_s", "busy_poll_us")
                                           for bad in BAD_VALUES]
    for path, attr in [(bad, None) for bad in BAD_VALUES] + [(fabric.directory, a) for a in attrs]:
        try:
            rc = C.BM_InitWithExtAttr(path, 0, attr)
        except Exception as exc:   # noqa: BLE001 - the point of the test
            pytest.fail(f"BM_InitWithExtAttr({path!r}, 0, {attr!r}) raised {type(exc).__name__}: {exc}")
        if rc == 0:
            assert C.BM_Exit() == 0
        assert type(rc) is int and rc <= 0


# ---- item 8: exist_ok, listing objects, errors that say what to do -------------------------------


def test_create_namespace_exist_ok(session, request):
    name = ns_name(request)
    first = session.create_namespace(name, sec_id="k", exist_ok=True)
    bm = first.alloc(4096)
    again = session.create_namespace(name, sec_id="k", exist_ok=True)
    assert again.open(bm.bm_id).size == 4096
    with pytest.raises(NamespaceExists):
        session.create_namespace(name, sec_id="k")
    with pytest.raises(PermissionDenied) as err:
        session.create_namespace(name, sec_id="not the one", exist_ok=True)
    assert "secId" in str(err.value)
    with pytest.raises(NamespaceExists) as err:
        session.create_namespace(name, sec_id="k", attribute=5, exist_ok=True)
    assert "attribute 0" in str(err.value)
    with pytest.raises(InvalidArgument):
        session.create_namespace(name, sec_id="k", exist_ok="yes")
    session.destroy_namespace(name, "k")


def test_exist_ok_from_many_processes_at_once(fabric, request):
    name = ns_name(request)
    code = ("import sys, memfabric\n"
            "with memfabric.init(sys.argv[1]) as s:\n"
            "    ns = s.create_namespace(sys.argv[2], sec_id='k', exist_ok=True)\n"
            "    ns.alloc(4096)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, fabric.directory, name], stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    with memfabric.init(fabric.directory) as s:
        assert len(s.namespace(name, "k").objects()) == 4
        s.destroy_namespace(name, "k")


def test_namespace_objects_lists_every_object_with_its_home_size_and_age(session, ns):
    first = ns.alloc(4096)
    there = ns.alloc(3 * 4096, Affinity("server", server_id=2))
    spread = ns.alloc(3 * MiB, Affinity("spread"))
    gone = ns.alloc(4096)
    gone.free()
    listed = {o.bm_id: o for o in ns.objects()}
    assert set(listed) == {first.bm_id, there.bm_id, spread.bm_id}
    assert (listed[first.bm_id].size, listed[first.bm_id].home) == (4096, 1)
    assert (listed[there.bm_id].size, listed[there.bm_id].home) == (3 * 4096, 2)
    assert listed[spread.bm_id].size == 3 * MiB
    assert all(o.age_s >= 0 for o in listed.values())
    assert listed[first.bm_id].age_s >= listed[spread.bm_id].age_s, "older objects are older"
    with pytest.raises(PermissionDenied):
        session.namespace(ns.name, "wrong").objects()


def test_objects_are_listed_page_by_page(session, ns):
    from memfabric.limits import MAX_OBJECTS_PER_LISTING
    made = [ns.alloc(64).bm_id for _ in range(MAX_OBJECTS_PER_LISTING + 5)]
    listed = [o.bm_id for o in ns.objects()]
    assert sorted(listed) == sorted(made) and len(set(listed)) == len(listed)
    assert ns.batch_free(made) == [0] * len(made)
    assert ns.objects() == []


def test_memfabric_ls(fabric, session, ns):
    bm = ns.alloc(8192)
    there = ns.alloc(4096, Affinity("server", server_id=2))
    mf = [sys.executable, "-m", "memfabric", "ls", "--dir", fabric.directory, "--ns", ns.name]
    proc = subprocess.run(mf + ["--sec", f"sec-{ns.name}", "--json"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = {row["bm_id"]: row for row in json.loads(proc.stdout)}
    assert rows[bm.bm_id]["size"] == 8192 and rows[bm.bm_id]["home"] == 1
    assert rows[there.bm_id]["home"] == 2 and rows[there.bm_id]["age_s"] >= 0
    table = subprocess.run(mf + ["--sec", f"sec-{ns.name}"], capture_output=True, text=True, timeout=60)
    assert table.returncode == 0 and bm.bm_id in table.stdout and there.bm_id in table.stdout
    wrong = subprocess.run(mf + ["--sec", "wrong"], capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 1 and wrong.stderr.count("\n") == 1 and "secId" in wrong.stderr


def test_errors_say_what_to_do(fabric, session, ns, tmp_path):
    nowhere = str(tmp_path / "no-fabric")
    with pytest.raises(InvalidArgument) as err:
        memfabric.init(nowhere)
    assert f"memfabric up --dir {nowhere}" in str(err.value)
    # A fabric's files without its servers: stopped.
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "fabric.toml").write_text(f'[[servers]]\nipc_socket = "{stopped}/server-1/ipc.sock"\n')
    with pytest.raises(memfabric.ServerUnavailable) as err:
        memfabric.init(str(stopped))
    assert f"memfabric up --dir {stopped}" in str(err.value)
    with pytest.raises(OutOfMemory) as err:
        ns.alloc(80 * MiB)           # more than one server has, less than all: spread fits
    assert 'Affinity("spread")' in str(err.value)
    with pytest.raises(PermissionDenied) as err:
        session.namespace(ns.name, "wrong").alloc(10)
    assert "the secId it was created with" in str(err.value)
    with memfabric.init(fabric.directory) as closed:
        pass
    with pytest.raises(memfabric.NotInitialized) as err:
        closed.namespace(ns.name, f"sec-{ns.name}").alloc(10)
    assert "memfabric.init" in str(err.value)


def test_status_on_a_client_file_is_one_line_not_a_traceback(fabric):
    proc = subprocess.run([sys.executable, "-m", "memfabric", "status", "--config",
                           os.path.join(fabric.directory, "remote.toml")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode in (0, 2), proc.stderr
    if proc.returncode == 2:
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_the_readme_example_runs_twice(fresh_fabric):
    """The README's Python example, as a script, against the fabric it says to start."""
    fab = fresh_fabric(servers=2, capacity="256MiB", segment_size="4MiB")
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")) as f:
        readme = f.read()
    start = readme.index("```python\nimport numpy as np\nimport memfabric\n")
    example = readme[start + len("```python\n"):readme.index("```", start + 3)]
    script = example.replace('"run/fabric"', repr(fab.directory))
    assert script != example
    for run in range(2):
        proc = run_client(script)
        assert proc.returncode == 0, f"run {run + 1}:\n{proc.stderr}"


def test_an_objects_age_survives_its_servers_restart():
    import time
    from .test_persistence import PersistentServer
    server = PersistentServer("pmem").start()
    try:
        with memfabric.init(server.config) as s:
            ns = s.create_namespace("aged", sec_id="k", pool="keep")
            bm_id = ns.alloc(4096).bm_id
            allocated_by = time.time()
        server.stop()
        server.start()
        with memfabric.init(server.config) as s:
            listed_from = time.time()
            [listed] = s.namespace("aged", "k", pool="keep").objects()
        assert listed.bm_id == bm_id
        # Its age counts from its allocation, not from the restart that brought it back.
        assert listed.age_s >= listed_from - allocated_by
    finally:
        server.cleanup()
