"""Attack on the refusal of a signal's handler's call on a connection its own thread is part way
through a request on (datapath/reentry.py): ways in that do not go through the refusal.

Real signals (SIGALRM every 1-2 ms), real servers, in a child process (pytest-timeout has
SIGALRM here); a hang shows as the child's faulthandler dump and exit, well within its bound.
The handler keeps out of itself (a flag), as a real one would: a handler re-entered by its own
signal is not what is under test.
"""

from __future__ import annotations

import json
import os

import pytest

import memfabric
from memfabric.launcher import LocalFabric

from ..conftest import run_client, short_tmp_dir

CHILD = r"""
import collections, faulthandler, json, os, signal, sys, time
import memfabric
from memfabric import Affinity
faulthandler.dump_traceback_later(25, exit=True)          # a hang: the child fails, loudly
path, main_call, handler_call, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
SIZE = 64 << 10
with memfabric.init(path, timeout_s=3.0) as s:
    ns = s.create_namespace(f"sigatk-{os.getpid()}", sec_id="k")
    try:
        a = ns.alloc(SIZE, Affinity("server", server_id=2))
        b = ns.alloc(SIZE, Affinity("server", server_id=2))
        a.write(b"A" * SIZE)
        b.write(b"B" * SIZE)
        handler_errors, main_errors, wrong, calls, inside = (collections.Counter(), collections.Counter(),
                                                             collections.Counter(), [0], [False])

        def handler(sig, frame):
            if inside[0]:
                return
            inside[0] = True
            try:
                if handler_call == "read bytes":       # InFlight: RpcLink._send, wait
                    if a.read(0, 4096) != b"A" * 4096:
                        wrong["handler's read"] += 1
                elif handler_call == "read into":
                    buf = bytearray(4096)
                    a.read(0, into=buf)
                    if buf != b"A" * 4096:
                        wrong["handler's read"] += 1
                calls[0] += 1
            except memfabric.MemfabricError as exc:
                handler_errors[exc.code.name] += 1
            finally:
                inside[0] = False

        signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
        buf = bytearray(SIZE)
        made, end = 0, time.monotonic() + seconds
        while time.monotonic() < end and made < 20000:
            made += 1
            try:
                if main_call == "reconnect":       # the session connects again under its lock
                    s.link(2).close()
                b.read(into=buf)
                if buf != b"B" * SIZE:
                    wrong["main's read"] += 1
            except Exception as exc:
                main_errors[type(exc).__name__ + ": " + str(exc)[:80]] += 1
        signal.setitimer(signal.ITIMER_REAL, 0)
        print(json.dumps({"made": made, "calls": calls[0], "handler_errors": handler_errors,
                          "main_errors": main_errors, "wrong": wrong}))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        ns.destroy()
"""


@pytest.fixture(scope="module")
def two_servers():
    fab = LocalFabric(short_tmp_dir("mf-sigatk-"), servers=2, capacity="32MiB", segment_size="1MiB",
                      liveness_timeout_s=60.0, extra_args=["--pool", "logs:ramdisk:48MiB"]).start()
    yield fab
    assert fab.stop() == 0, "memfabric up did not stop cleanly:\n" + "".join(fab.output[-30:])


def run(fab: LocalFabric, main_call: str, handler_call: str, seconds: str = "3") -> dict:
    done = run_client(CHILD, os.path.join(fab.directory, "remote.toml"), main_call, handler_call, seconds,
                      timeout_s=60)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_handlers_read_that_returns_bytes_over_rpc_is_refused_not_sent_inside_its_threads_request(two_servers):
    """A remote read that returns bytes (read_bytes) goes through InFlight, whose submit and
    wait call RpcLink._send and RpcLink.wait directly, past request()'s and submit()'s
    _refuse_reentry: the handler's request went out inside its thread's, or its reader took
    up the stream part way through its thread's reply (seen: the main thread's read failed
    with 'server 2 ... is gone (ProtocolError)', the link shut; then a hang)."""
    out = run(two_servers, "read", "read bytes")
    assert out["main_errors"] == {} and out["wrong"] == {}, out
    assert set(out["handler_errors"]) <= {"BUSY"} and out["calls"] > 0, out


def test_a_handler_calling_while_its_thread_connects_again_is_refused_not_left_waiting_for_ever(two_servers):
    """Session.link connects (again) under the session's lock, a plain Lock: a handler that
    needs the same link while its thread holds that lock waited for it for ever (seen: the
    child's faulthandler dump, the handler in session.py link, its thread in RpcLink's
    handshake under link()). It must get BUSY (or its call done), at once."""
    out = run(two_servers, "reconnect", "read into")
    assert out["main_errors"] == {} and out["wrong"] == {}, out
    assert set(out["handler_errors"]) <= {"BUSY"} and out["calls"] > 0, out


KV_CHILD = r"""
import collections, faulthandler, json, os, signal, sys, time
import memfabric
faulthandler.dump_traceback_later(25, exit=True)          # a hang: the child fails, loudly
path, seconds = sys.argv[1], float(sys.argv[2])
with memfabric.init(path, server=0, timeout_s=3.0) as s:
    ns = s.create_namespace(f"sigkv-{os.getpid()}", sec_id="k")
    try:
        kv = ns.kv()
        keys = [b"key-%d" % i for i in range(64)]
        kv.put_many([(k, b"v" * 100) for k in keys])
        links = [s.link(i) for i in (1, 2)]
        handler_errors, main_errors, wrong, calls, inside = (collections.Counter(), collections.Counter(),
                                                             collections.Counter(), [0], [False])

        def handler(sig, frame):
            if inside[0]:
                return
            inside[0] = True
            try:
                if kv.get(keys[0]) != b"v" * 100:
                    wrong["handler's get"] += 1
                calls[0] += 1
            except memfabric.MemfabricError as exc:
                handler_errors[exc.code.name] += 1
            finally:
                inside[0] = False

        signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
        made, end = 0, time.monotonic() + seconds
        while time.monotonic() < end and made < 20000:
            made += 1
            try:
                # As when the server's table has grown (stale): the index is mapped again,
                # with a kv_open, under the KV's lock.
                for link in links:
                    index = link.attached.pop(kv._index_key, None)
                    if index is not None:
                        index.close()
                if kv.get_many(keys) != [b"v" * 100] * len(keys):
                    wrong["main's gets"] += 1
            except Exception as exc:
                main_errors[type(exc).__name__ + ": " + str(exc)[:80]] += 1
        signal.setitimer(signal.ITIMER_REAL, 0)
        print(json.dumps({"made": made, "calls": calls[0], "handler_errors": handler_errors,
                          "main_errors": main_errors, "wrong": wrong}))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        ns.destroy()
"""


def test_a_handlers_kv_get_while_its_thread_maps_the_kv_index_again_is_refused_not_left_waiting_for_ever(two_servers):
    """KV._index maps a same-host server's index (a kv_open) under the KV's lock, a plain Lock:
    a handler's get on the same KV while its thread was there waited for that lock for ever
    (seen: the child's faulthandler dump, the handler in kv/client.py _index, its thread in
    _LocalIndex's kv_open under _index). It must get BUSY (or its value), at once."""
    done = run_client(KV_CHILD, two_servers.directory, "3", timeout_s=60)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["main_errors"] == {} and out["wrong"] == {}, out
    assert set(out["handler_errors"]) <= {"BUSY"} and out["calls"] > 0, out


STAGED_CHILD = r"""
import collections, faulthandler, json, os, signal, sys, time
import memfabric
faulthandler.dump_traceback_later(25, exit=True)          # a hang: the child fails, loudly
path, seconds = sys.argv[1], float(sys.argv[2])
RECORD = 100 << 10            # three a batch: past what rides in a message, so staged (shared memory)
with memfabric.init(path, server=0, timeout_s=3.0) as s:
    ns = s.create_namespace(f"sigstage-{os.getpid()}", sec_id="k", pool="logs")
    try:
        log = ns.create_plog("wal", 40 << 20)
        handler_errors, main_errors, calls, inside = collections.Counter(), collections.Counter(), [0], [False]
        appended = collections.Counter()

        def handler(sig, frame):
            if inside[0]:
                return
            inside[0] = True
            try:
                log.append_many([b"H" * RECORD] * 3)
                appended["H"] += 3
                calls[0] += 1
            except memfabric.MemfabricError as exc:
                handler_errors[exc.code.name] += 1
            finally:
                inside[0] = False

        signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
        made, end = 0, time.monotonic() + seconds
        while time.monotonic() < end and made < 60 and log.info()["length"] < (30 << 20):
            made += 1
            try:
                log.append_many([b"M" * RECORD] * 3)
                appended["M"] += 3
            except Exception as exc:
                main_errors[type(exc).__name__ + ": " + str(exc)[:80]] += 1
        signal.setitimer(signal.ITIMER_REAL, 0)
        found = collections.Counter()
        for record in log.records():
            found[chr(record[0]) if record == record[:1] * len(record) else "mixed"] += 1
        print(json.dumps({"made": made, "calls": calls[0], "handler_errors": handler_errors,
                          "main_errors": main_errors, "appended": appended, "found": found}))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        ns.destroy()
"""


def test_a_handlers_staged_append_many_never_writes_over_its_threads_batch_in_the_shared_stage(two_servers):
    """A large append_many is written into the link's shared stage under the stage's lock, an
    RLock, and the server reads it from there when the request comes: a handler's batch, on a
    link whose batch its own thread had written (or sent and was waiting on), took that lock
    again and wrote its records over its thread's in the stage; then its own request was
    refused (BUSY), or went. Its thread's records were stored with the handler's bytes. Each
    record appended must be found as it was, as many of each as were acknowledged."""
    done = run_client(STAGED_CHILD, two_servers.directory, "3", timeout_s=60)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["main_errors"] == {}, out
    assert set(out["handler_errors"]) <= {"BUSY"}, out
    assert out["found"] == out["appended"], out


OPEN_CHILD = r"""
import collections, faulthandler, json, os, signal, sys, time
import memfabric
faulthandler.dump_traceback_later(25, exit=True)          # a hang: the child fails, loudly
path, seconds = sys.argv[1], float(sys.argv[2])
with memfabric.init(path, server=0, timeout_s=3.0) as s:
    ns = s.create_namespace(f"sigopen-{os.getpid()}", sec_id="k")
    try:
        kept = ns.alloc(4096)
        handler_errors, main_errors, wrong, calls, inside = (collections.Counter(), collections.Counter(),
                                                             collections.Counter(), [0], [False])
        made_ids = []

        def handler(sig, frame):
            if inside[0]:
                return
            inside[0] = True
            try:
                if ns.open(kept.bm_id).size != 4096:
                    wrong["handler's open"] += 1
                calls[0] += 1
            except memfabric.MemfabricError as exc:
                handler_errors[exc.code.name] += 1
            finally:
                inside[0] = False

        signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
        made, end = 0, time.monotonic() + seconds
        while time.monotonic() < end and made < 200000:
            made += 1
            try:
                if ns.open(kept.bm_id) is not kept:
                    wrong["main's open"] += 1
                if made % 50 == 0:          # a handle remembered, then forgotten
                    bm = ns.alloc(4096)
                    ns.batch_free([bm.bm_id])
                    try:
                        ns.open(bm.bm_id)
                        wrong["a freed object opened"] += 1
                    except memfabric.NoSuchObject:
                        pass
            except Exception as exc:
                main_errors[type(exc).__name__ + ": " + str(exc)[:80]] += 1
        signal.setitimer(signal.ITIMER_REAL, 0)
        print(json.dumps({"made": made, "calls": calls[0], "handler_errors": handler_errors,
                          "main_errors": main_errors, "wrong": wrong}))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        ns.destroy()
"""


def test_a_handlers_open_while_its_thread_looks_up_a_handle_is_not_left_waiting_for_ever(two_servers):
    """Session's handles by id are looked up and kept under a plain Lock, and a lookup runs
    Python (WeakValueDictionary.get), where a signal's handler may run: a handler's
    ns.open() while its thread was in there waited for that lock for ever (seen at once: the
    handler in session.py _cached_handle under its thread's, in weakref.py get). No request
    is under way: the handler's open must be done."""
    done = run_client(OPEN_CHILD, two_servers.directory, "3", timeout_s=60)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["main_errors"] == {} and out["wrong"] == {}, out
    assert out["handler_errors"] == {} and out["calls"] > 0, out


COMPAT_CHILD = r"""
import collections, faulthandler, json, os, signal, sys, time
from memfabric import compat as C
faulthandler.dump_traceback_later(25, exit=True)          # a hang: the child fails, loudly
path, seconds = sys.argv[1], float(sys.argv[2])
assert C.BM_Init(path) == 0
ns = f"sigcompat-{os.getpid()}"
assert C.BM_CreateNSSec("default", ns, 0, "sec") == 0
try:
    info = C.BmInfo(ns=ns, sec_id="sec")
    assert C.BM_AllocSec(info, 4096, 0, None) == 0
    assert C.BM_WriteSec(info, 0, 4096, b"c" * 4096, 0) == 0
    handler_codes, main_codes, wrong, inside = collections.Counter(), collections.Counter(), [0], [False]

    def handler(sig, frame):
        if inside[0]:
            return
        inside[0] = True
        try:
            buf = bytearray(16)
            code = C.BM_ReadSec(info, 0, 16, buf, 0)
            handler_codes[code] += 1
            wrong[0] += code == 0 and buf != b"c" * 16
        finally:
            inside[0] = False

    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
    made, end, buf = 0, time.monotonic() + seconds, bytearray(4096)
    while time.monotonic() < end and made < 500000:
        made += 1
        main_codes[C.BM_ReadSec(info, 0, 4096, buf, 0)] += 1
    signal.setitimer(signal.ITIMER_REAL, 0)
    print(json.dumps({"made": made, "handler_codes": handler_codes, "main_codes": main_codes, "wrong": wrong[0]}))
finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    C.BM_DestroyNSSec("default", ns, "sec")
    C.BM_Exit()
"""


@pytest.mark.parametrize("where", ["same host", "remote"])
def test_a_handlers_compat_call_while_its_thread_looks_up_a_known_handle_is_not_left_waiting_for_ever(
        two_servers, where):
    """compat's known handles are looked up under a plain Lock, and a signal's handler may run
    between the lookup's two calls (get, move_to_end): a handler's BM_ReadSec while its thread
    was in there waited for that lock for ever (seen at once: the handler in compat.py
    _KnownHandles.get under its thread's). No request is under way: the handler's read must
    be done (or, over RPC, refused with BUSY when its thread is part way through a request)."""
    path = two_servers.directory if where == "same host" else os.path.join(two_servers.directory, "remote.toml")
    done = run_client(COMPAT_CHILD, path, "3", timeout_s=60)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(out["main_codes"]) == {"0"} and out["wrong"] == 0, out
    assert "0" in out["handler_codes"] and set(out["handler_codes"]) <= {"0", str(int(memfabric.BmError.BUSY))}, out


THREADS_CHILD = r"""
import collections, faulthandler, json, os, signal, sys, threading, time
import memfabric
from memfabric import Affinity
faulthandler.dump_traceback_later(40, exit=True)          # a hang: the child fails, loudly
path, seconds = sys.argv[1], float(sys.argv[2])
with memfabric.init(path, timeout_s=3.0) as s:
    ns = s.create_namespace(f"sigthreads-{os.getpid()}", sec_id="k")
    try:
        kv = ns.kv()
        keys = [b"key-%d" % i for i in range(8)]
        kv.put_many([(k, b"v" * 100) for k in keys])
        handler_errors, main_errors, thread_errors, wrong, calls, inside = (
            collections.Counter(), collections.Counter(), collections.Counter(), collections.Counter(), [0], [False])
        stop = threading.Event()
        objects = [ns.alloc(64 << 10, Affinity("server", server_id=i)) for i in (1, 2)]
        for bm in objects:
            bm.write(b"o" * (64 << 10))

        def other(tag):
            buf = bytearray(64 << 10)
            while not stop.is_set():
                try:
                    kv.put(tag, b"t" * 100)
                    if kv.get(tag) != b"t" * 100:
                        wrong["a thread's get"] += 1
                    for bm in objects:
                        bm.read(into=buf)
                        if buf != b"o" * len(buf):
                            wrong["a thread's read"] += 1
                except Exception as exc:
                    thread_errors[type(exc).__name__ + ": " + str(exc)[:80]] += 1

        def handler(sig, frame):
            if inside[0]:
                return
            inside[0] = True
            try:
                if kv.get_many(keys) != [b"v" * 100] * len(keys):
                    wrong["handler's get_many"] += 1
                calls[0] += 1
            except memfabric.MemfabricError as exc:
                handler_errors[exc.code.name + ": " + str(exc)[:60]] += 1
            finally:
                inside[0] = False

        threads = [threading.Thread(target=other, args=(b"thread-%d" % i,)) for i in range(2)]
        for t in threads:
            t.start()
        signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
        made, end = 0, time.monotonic() + seconds
        while time.monotonic() < end and made < 50000:
            made += 1
            try:
                kv.put(b"main", b"m" * 100)
                if kv.get(b"main") != b"m" * 100:
                    wrong["main's get"] += 1
            except Exception as exc:
                main_errors[type(exc).__name__ + ": " + str(exc)[:80]] += 1
        signal.setitimer(signal.ITIMER_REAL, 0)
        stop.set()
        for t in threads:
            t.join(10)
        print(json.dumps({"made": made, "calls": calls[0], "handler_errors": handler_errors,
                          "main_errors": main_errors, "thread_errors": thread_errors, "wrong": wrong,
                          "stuck": sum(t.is_alive() for t in threads)}))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        ns.destroy()
"""


def test_a_handler_waiting_for_another_threads_reader_never_stalls_the_link(two_servers):
    """Over RPC a caller whose reply another thread is reading sleeps on its Pending's waker
    (an Event), and a signal's handler may run in that wait holding the Event's own lock. No
    link lock is held, so the handler's request goes; its reply comes through the other
    thread's reader, which first hands the main thread its reply: waker.set(), which waits
    for the Event's lock the suspended main thread holds. The reader stalled, with it every
    request on the link, until the handler's TIMEOUT (seen: the handler's kv_get_many, and
    other threads' kv_put and seg_read, TIMEOUT after 3 s). No call may time out here."""
    for _ in range(2):
        done = run_client(THREADS_CHILD, os.path.join(two_servers.directory, "remote.toml"), "3", timeout_s=90)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
        out = json.loads(done.stdout.strip().splitlines()[-1])
        assert out["main_errors"] == {} and out["thread_errors"] == {} and out["wrong"] == {}, out
        assert all(e.startswith("BUSY") for e in out["handler_errors"]) and out["stuck"] == 0, out


COMBINE_CHILD = r"""
import collections, faulthandler, json, os, signal, sys, threading, time
import memfabric
faulthandler.dump_traceback_later(40, exit=True)          # a hang: the child fails, loudly
path, seconds = sys.argv[1], float(sys.argv[2])
with memfabric.init(path, timeout_s=3.0) as s:
    ns = s.create_namespace(f"sigcombine-{os.getpid()}", sec_id="k", pool="logs")
    try:
        log = ns.create_plog("wal", 40 << 20)
        handler_errors, main_errors, thread_errors, calls, inside = (
            collections.Counter(), collections.Counter(), collections.Counter(), [0], [False])
        appended = collections.Counter()
        stop = threading.Event()

        def other():
            while not stop.is_set() and log.info()["length"] < (30 << 20):
                try:
                    log.append(b"T" * 80)
                    appended["T"] += 1
                except Exception as exc:
                    thread_errors[type(exc).__name__ + ": " + str(exc)[:80]] += 1

        def handler(sig, frame):
            if inside[0]:
                return
            inside[0] = True
            try:
                log.append(b"H" * 50)
                appended["H"] += 1
                calls[0] += 1
            except memfabric.MemfabricError as exc:
                handler_errors[exc.code.name + ": " + str(exc)[:60]] += 1
            finally:
                inside[0] = False

        threads = [threading.Thread(target=other) for _ in range(2)]
        for t in threads:
            t.start()
        signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
        made, end = 0, time.monotonic() + seconds
        while time.monotonic() < end and made < 20000:
            made += 1
            try:
                log.append_many([b"M" * 100] * 5)
                appended["M"] += 5
            except Exception as exc:
                main_errors[type(exc).__name__ + ": " + str(exc)[:80]] += 1
        signal.setitimer(signal.ITIMER_REAL, 0)
        stop.set()
        for t in threads:
            t.join(10)
        found = collections.Counter(chr(r[0]) for r in log.records())
        print(json.dumps({"made": made, "calls": calls[0], "handler_errors": handler_errors,
                          "main_errors": main_errors, "thread_errors": thread_errors, "appended": appended,
                          "found": found, "stuck": sum(t.is_alive() for t in threads)}))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        ns.destroy()
"""


@pytest.mark.parametrize("where", ["same host", "remote"])
def test_a_handlers_append_while_its_thread_holds_the_link_neither_stalls_nor_fails_other_threads(two_servers, where):
    """Threads' appends through one handle combine (plog/combine.py): one sends a batch for
    all. A signal's handler's append, its thread part way through a request on the same link
    (an append_many), joined them: waiting for a sender that waits for the link its own
    thread holds (every append of the batch TIMEOUT after 3 s), or sending the batch itself
    and refused with BUSY, which other threads' appends in it got too. It must get BUSY
    alone, at once, and no other thread's append fail."""
    path = two_servers.directory if where == "same host" else os.path.join(two_servers.directory, "remote.toml")
    done = run_client(COMBINE_CHILD, path, "3", timeout_s=90)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["main_errors"] == {} and out["thread_errors"] == {} and out["stuck"] == 0, out
    assert all(e.startswith("BUSY") for e in out["handler_errors"]), out
    assert out["found"] == out["appended"], out


@pytest.mark.parametrize("which", ["session", "kv"])
def test_a_lock_a_ctrl_c_left_held_lets_the_threads_next_calls_go_on(two_servers, which):
    """A Ctrl-C between a `with`'s acquire and its block leaves the lock held with no call of
    its owner's further up the stack: the thread's next call is not re-entered, and must go
    on (the rule of datapath/reentry.py), not get BUSY for ever. Here the state is made
    directly: the lock taken with nothing under way."""
    with memfabric.init(two_servers.directory) as s:
        ns = s.create_namespace(f"left-held-{which}", sec_id="k")
        kv = ns.kv()
        kv.put(b"k", b"v")
        for link in [s.link(1), s.link(2)]:
            link.close()                                   # the next call connects (the session's lock)
            link.attached.pop(kv._index_key, None)         # and maps the index again (the KV's lock)
        lock = s._lock if which == "session" else kv._lock
        lock.acquire()                                     # left held: nothing of the owner's under way
        assert kv.get(b"k") == b"v"
        assert not lock._is_owned()
