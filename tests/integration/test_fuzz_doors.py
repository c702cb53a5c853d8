"""Bad input at either front door gets a precise error, never INTERNAL_ERROR, and never floods
the log. A bounded run of tests/fuzz_doors.py (fixed seeds, seconds), the inputs it found,
and a burst of garbage against the log.

Long runs: `python -m tests.fuzz_doors --messages 100000 --door ipc` (see that module).
"""

from __future__ import annotations

import random
import socket

import msgpack
import pytest

from memfabric.datapath.rpc_link import RpcLink
from memfabric.errors import BmError, PermissionDenied
from memfabric.transport import rpc

from .. import fuzz_doors
from ..conftest import short_tmp_dir
from ..helpers import wait_until

MESSAGES_PER_DOOR = 3000


@pytest.fixture(scope="module")
def fuzz():
    fab = fuzz_doors.start_fabric(short_tmp_dir("mf-fuzz-"))
    try:
        target = fuzz_doors.Fuzz(fab)
        yield target
        target.close()
    finally:
        assert fab.stop() == 0, "memfabric up did not stop cleanly:\n" + "".join(fab.output[-30:])


@pytest.mark.parametrize("door, seed", [("ipc", 7), ("rpc", 8)])
def test_fuzzed_messages_get_precise_errors_and_the_server_keeps_serving(fuzz, door, seed):
    report = fuzz_doors.Fuzz.run(fuzz, door, MESSAGES_PER_DOOR, seed)
    summary = fuzz_doors.describe(report)
    assert report.findings == 0, summary
    assert report.check_failures == [] and report.checks_passed >= MESSAGES_PER_DOOR // fuzz_doors.CHECK_EVERY, summary
    assert report.servers_alive, summary
    # The fuzz reached past the checks: real objects were made, read and freed.
    assert report.outcomes["ok"] > MESSAGES_PER_DOOR // 10, summary


# ---- what the fuzzer found, as plain requests ----------------------------------------------------


def found_inputs(v: fuzz_doors.Values) -> list[tuple[str, dict]]:
    creds = {"pool": v.pool, "ns": v.ns, "sec": v.sec}
    some = {**creds, "bm_id": v.bm_ids[0], "offset": 0, "length": 8}
    cases = []
    for dtype in ({"names": ["a", "a"], "formats": ["u1", "u1"]}, ["u1", "u1"], [["a", "u1"], ["a", "u1"]],
                  "0-0-0", "u1,u1", "(2,)u1", "O", "float128", "m8[s]", None, b"u1", "a" * 10_000, 1.5):
        cases.append(("gather", {"operator": "sum", "dtype": dtype, "inputs": [some], "dst": {**creds, "bm_id": ""}}))
    # Refused with a quote of a large input: the error reply must still fit in one message.
    cases.append(("alloc", {**creds, "size": b"\xff" * 100_000}))
    cases.append(("describe", {**creds, "ns": "\x00" * 70_000}))
    cases.append(("\x01" * 70_000, {}))
    return cases


def exchange_ipc(fuzz: fuzz_doors.Fuzz, message: dict) -> dict:
    door = fuzz.door("ipc")
    door.connect(random.Random(0))
    try:
        return door.exchange(fuzz_doors.Message("structured", "-", msgpack.packb(message)))
    finally:
        door.close()


def exchange_rpc(fuzz: fuzz_doors.Fuzz, message: dict) -> dict:
    door = fuzz.door("rpc")
    door.connect(random.Random(0))
    try:
        return door.exchange(fuzz_doors.Message("structured", "-", msgpack.packb(message)))
    finally:
        door.close()


@pytest.mark.parametrize("exchange", [exchange_ipc, exchange_rpc], ids=["ipc", "rpc"])
def test_inputs_the_fuzzer_found_are_invalid_arguments(fuzz, exchange):
    for op, fields in found_inputs(fuzz.values):
        reply = exchange(fuzz, {"op": op, "id": 9, **fields})
        assert reply["id"] == 9, reply
        assert reply.get("error") == BmError.INVALID_ARGUMENT, (op, str(fields)[:200], str(reply)[:300])
        assert len(reply["msg"]) < 20_000


def test_a_valid_gather_still_reduces(fuzz):
    """The strict dtype check lets every integer and float spelling through that clients use."""
    v = fuzz.values
    creds = {"pool": v.pool, "ns": v.ns, "sec": v.sec}
    # An object of its own: the fuzz runs before may have freed any of its objects.
    made = exchange_ipc(fuzz, {"op": "alloc", "id": 2, **creds, "size": 64})
    assert "error" not in made, made
    for dtype in ("uint8", "int32", "float32", "float64", "<f4", ">i8", "|u1", "f8", "double", "int_"):
        reply = exchange_ipc(fuzz, {"op": "gather", "id": 3, "operator": "max", "dtype": dtype,
                                    "inputs": [{**creds, "bm_id": made["bm_id"], "offset": 0, "length": 16}] * 2,
                                    "dst": {**creds, "bm_id": ""}})
        assert "error" not in reply, (dtype, reply)
        assert reply["length"] == 16


# ---- a burst of garbage and the log ---------------------------------------------------------------


def test_a_burst_of_garbage_writes_a_bounded_number_of_log_lines(fuzz):
    fab = fuzz.fab
    me = fuzz_doors.Fuzz.door(fuzz, "rpc")
    with open(f"{fab.directory}/token", "rb") as f:
        token = f.read().strip()
    ipc_path = fuzz.door("ipc").path
    start = len(fab.output)
    burst = 1000
    for i in range(burst):
        # IPC: undecodable; the server closes the connection.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.settimeout(10)
        sock.connect(ipc_path)
        sock.send(b"\xc1garbage")
        assert sock.recv(16) == b""
        sock.close()
        # RPC, a token holder: a frame whose header is not msgpack.
        frames = rpc.connect(me.address, None, 10)
        rpc.client_handshake(frames, token)
        head = b"\xc1" * 10
        frames.sock.sendall(rpc.PREFIX.pack(len(head), 0) + head + bytes(rpc.FIRST_BLOCK - rpc.PREFIX.size - len(head)))
        with pytest.raises((ConnectionError, OSError)):
            frames.recv_header(deadline=None, frame_timeout_s=10)
        frames.close()
    fuzz.check_normal_client(report := fuzz_doors.Report("log", 0))
    assert report.checks_passed == 1
    # A marker: the line for a wrong token comes after every line of the burst.
    with pytest.raises(PermissionDenied):
        RpcLink(me.address, b"not the token of this cluster", timeout_s=10)
    marker = wait_until(lambda: next((i for i in range(start, len(fab.output))
                                      if "token challenge" in fab.output[i]), None),
                        "the server to log the wrong token")
    lines = fab.output[start:marker]
    # Each door logs a few lines per key and interval, then one that says how many it held back.
    assert len(lines) <= 40, f"{len(lines)} log lines for {2 * burst} garbage messages:\n" + "".join(lines[-10:])
