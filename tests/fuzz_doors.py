"""Structured fuzzing of a server's two front doors: IPC (raw SOCK_SEQPACKET messages) and RPC
(raw frames after a real token handshake).

Every operation the server has (`Server.handlers`, the peer operations and, over RPC, the span
transfers) is sent with fields drawn from valid values (a real namespace's pool, ns and secId,
real bm_ids, segments and extents made in setup) mixed with wrong types and edge values; plus
garbage bytes, non-map msgpack, missing or odd ids and oversized messages. Replies are counted
by error code. Bad input must get a precise error, never INTERNAL_ERROR; the server must stay
up and keep serving a normal client (checked every few hundred messages).

Every choice is a function of the seed (namespaces and secIds too; object ids are what the
server hands out), so a run on a fresh fabric repeats with the same seed; each finding is
also printed with the message that made it. Two uses:

    python -m tests.fuzz_doors --door ipc --messages 100000 --seed 1     # a long run: the figures
    tests/integration/test_fuzz_doors.py                                  # a bounded run in CI
"""

from __future__ import annotations

import argparse
import array
import json
import os
import random
import socket
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import msgpack

import memfabric
from memfabric.errors import BmError, MemfabricError
from memfabric.launcher import LocalFabric
from memfabric.limits import MAX_FDS_PER_MESSAGE, MAX_MESSAGE_BYTES
from memfabric.bigmemory.service import BigMemoryService
from memfabric.kv.service import KeyValueService
from memfabric.plog.service import PlogService
from memfabric.server.server import Server
from memfabric.transport import rpc

REPLY_TIMEOUT_S = 30.0          # far above the server's own request and peer timeouts
CHECK_EVERY = 250               # messages between two checks that a normal client is served
REFRESH_EVERY = 1500            # messages between two fresh targets (the fuzz eats memory)
RECONNECT_TRIES = 10            # a second apart
RPC_ONLY_OPS = ("seg_read", "seg_write", "kv_fill", "kv_read", "plog_append_payload", "plog_replica_payload")
# Every operation the server dispatches: its own and each semantic's.
SERVER_OPS = sorted({name[3:] for cls in (Server, BigMemoryService, KeyValueService, PlogService)
                     for name in dir(cls)
                     if name.startswith("op_")})

# ---- values ------------------------------------------------------------------------------------------


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


EDGE_VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 2, 4095, 4096, 4097, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1,
    2**63, 2**64 - 1, -2**63, 0.0, -0.0, 0.5, 1.0, 4096.0, float("nan"), float("inf"), -float("inf"),
    "", " ", "x", "0", "-1", "1-0-1", "0-0-0", "99-99-99", "1-0-01", "\x00", "é", "a" * 65, "a" * 300,
    "../../etc", "default", "local", "spread", "server", "peer", "client", b"", b"\x00", b"\xff" * 40,
    b"x" * 300, [], [0], [1, 2, 3], [None], [[0, 0, 4096]], [[]], ["a"], [-1], [2**63], {}, {"a": 1},
    {"pool": None}, {"bm_id": 5}, {"a": {"b": {"c": [1, {"d": None}]}}}, {b"bytes key": 1},
    {"names": ["a", "a"], "formats": ["u1", "u1"]},
    {"names": ["a", "b"], "formats": ["u1", "f8"], "offsets": [0, 1]}, {"names": ["a"], "formats": ["O"]},
    ["u1", "u1"], [["a", "u1"], ["a", "u1"]], [["a", "u1"], ["b", "i4"]], "V8", "O", "U4", "S3", "M8",
    "m8[s]", "float16", "complex64", "c16", ">u4", "<f8", "bool", "b1", "i", "f", "u8", "float128",
    "int", "object", "(2,)u1", "u1,u1", "a" * 10_000, b"\x01" * 10_000, _nested(50),
    # Quoted in an error message, these grow fourfold: past what one reply may carry.
    b"\xff" * 100_000, "\x00" * 70_000,
    msgpack.ExtType(5, b"ext"), msgpack.Timestamp(0, 1),
]


class Values:
    """Valid values of each field kind, for the namespace the fuzz targets right now."""

    def __init__(self) -> None:
        self.pool = "default"
        self.ns = ""
        self.sec = b""
        self.incarnation = 0
        self.bm_ids: list[str] = []
        self.segments: list[int] = []
        self.extents: list[list[int]] = []     # [segment, offset, length] held for objects homed elsewhere
        self.server_ids: list[int] = []
        self.sizes: list[int] = [1, 4096, 5000, 1 << 20]


@dataclass
class Message:
    kind: str                      # structured | garbage | non_map | odd_id | oversized | unknown_op
    op: str
    data: bytes                    # the encoded message (IPC packet, RPC frame header)
    payload: bytes = b""           # RPC only: what follows the header
    shown: str = ""                # a readable form, for reports


class Maker:
    """The seeded stream of fuzzed messages for one door."""

    def __init__(self, seed: int, door: str, values: Values, malformed_only: bool = False) -> None:
        self.rng = random.Random(seed)
        self.malformed_only = malformed_only     # garbage, non-maps and bad ids only: a log flood
        self.door = door
        self.v = values
        self.ops = SERVER_OPS + (list(RPC_ONLY_OPS) if door == "rpc" else [])
        self.next_id = 1

    # field kinds --------------------------------------------------------------------------------------

    def valid(self, kind: str) -> Any:
        r, v = self.rng, self.v
        if kind == "pool":
            return v.pool
        if kind == "ns":
            return v.ns
        if kind == "sec":
            return v.sec
        if kind == "bm_id":
            return r.choice(v.bm_ids) if v.bm_ids else "1-0-1"
        if kind == "size":
            return r.choice(v.sizes)
        if kind in ("offset", "src_offset", "dst_offset"):
            return r.choice([0, 0, 1, 4095, 4096, 1 << 20])
        if kind == "length":
            return r.choice([0, 1, 8, 16, 4096, 5000, 1 << 20])
        if kind == "segment":
            return r.choice(v.segments) if v.segments else 0
        if kind == "segments":
            return r.sample(v.segments, r.randint(1, len(v.segments))) if v.segments else [0]
        if kind in ("server_id", "home"):
            return r.choice(v.server_ids) if v.server_ids else 1
        if kind == "policy":
            return r.choice(["local", "spread", "server"])
        if kind == "role":
            return r.choice(["client", "peer"])
        if kind == "pid":
            return os.getpid()
        if kind == "attribute":
            return r.choice([0, 1])
        if kind == "exist_ok":
            return r.choice([False, True])
        if kind == "after":
            return r.choice([-1, -1, 0, 3, 999, 65535])
        if kind == "incarnation":
            return v.incarnation
        if kind == "operator":
            return r.choice(["concat", "sum", "min", "max", "prod"])
        if kind == "dtype":
            return r.choice(["uint8", "int32", "float32", "float64", "<i8", "f4", "u2"])
        if kind == "inputs":
            length = self.valid("length")
            return [self.obj(extra={"offset": self.valid("offset"), "length": length})
                    for _ in range(r.randint(1, 3))]
        if kind in ("src", "dst"):
            return self.obj()
        if kind in ("bm_ids", "ids"):
            return [self.valid("bm_id") for _ in range(r.randint(0, 4))]
        if kind == "source":        # where a same-host home's forward lies in its files
            return [[r.choice(v.segments) if v.segments else 0, r.choice([0, 8, 4096]), r.choice([1, 16, 4096, 1 << 20])]
                    for _ in range(r.randint(1, 3))]
        if kind == "extents":
            return r.sample(v.extents, r.randint(1, len(v.extents))) if v.extents else [[0, 0, 4096]]
        # MemKV's fields
        if kind in ("key", "prefix"):
            return r.choice([b"k", b"key-1", b"key-2", b"n", "text", b"x" * 70_000, b"", b"k" * 65536])
        if kind == "keys":
            return [self.valid("key") for _ in range(r.randint(0, 5))]
        if kind == "value":
            return r.choice([b"", b"v", b"12", r.randbytes(5000), b"x" * (200 << 10)])
        if kind == "values":
            return [self.valid("value") for _ in range(r.randint(0, 5))]
        if kind in ("ttl_ms", "expiry", "expire"):
            return r.choice([None, 1, 50, 10_000, 10 ** 15, 0, -1])
        if kind in ("nx", "xx", "keepttl", "get"):
            return r.random() < 0.2
        if kind in ("token", "hold"):
            return r.choice([1, 2, 3, r.randint(1, 1000)])
        if kind in ("at", "cursor"):
            return r.choice([0, 0, 1, 4096, 1 << 20])
        if kind == "batch":
            return r.choice([1, 10, 1000, 10_000, 0])
        if kind == "servers":
            return r.choice([[], v.server_ids or [1], [1, 2, 3]])
        if kind == "memory_limit":
            return r.choice([None, "1MiB", "64KiB", 1 << 20, "lots"])
        if kind == "eviction":
            return r.choice(["lru", "refuse", "random"])
        if kind == "replicas":
            return r.choice([None, 1, 2, 3, 0, 9])
        if kind == "by":
            return r.choice([1, -1, 2 ** 62, -(2 ** 63)])
        if kind == "version":
            return r.choice([1, 2 ** 40, 0])
        # MemPlog's fields
        if kind == "name":
            return r.choice(["fuzz", "wal", "fuzz", "x" * 65])
        if kind == "capacity":
            return r.choice([16, 4096, 1 << 20, 0, 15])
        if kind == "records":
            return [r.choice([b"", b"r", r.randbytes(100)]) for _ in range(r.randint(0, 4))]
        if kind == "lengths":
            return [r.choice([0, 1, 100, 4096]) for _ in range(r.randint(0, 4))]
        if kind == "stage":
            return r.choice([None, 1, 2])
        if kind == "data":
            return r.choice([b"", b"d", r.randbytes(5000)])
        if kind in ("start", "count"):
            return r.choice([0, 1, 5, 4096, 4097])
        return self.wrong()

    def wrong(self) -> Any:
        r = self.rng
        roll = r.random()
        if roll < 0.7:
            return r.choice(EDGE_VALUES)
        if roll < 0.8:
            return r.randint(-2**63, 2**64 - 1)
        if roll < 0.9:
            return r.randbytes(r.randint(0, 64))
        return [r.choice(EDGE_VALUES) for _ in range(r.randint(1, 4))]

    def field(self, kind: str, mutation: float) -> Any:
        if self.rng.random() < mutation:
            return self.wrong()
        value = self.valid(kind)
        if isinstance(value, (list, dict)) and self.rng.random() < mutation:
            value = self.mutate_inside(value, mutation)
        return value

    def mutate_inside(self, value: Any, mutation: float) -> Any:
        """Wrong values one level down: in an input map, an extent, a list of ids."""
        r = self.rng
        if isinstance(value, dict) and value:
            value = dict(value)
            key = r.choice(sorted(value))
            if r.random() < 0.2:
                del value[key]
            else:
                value[key] = self.wrong()
        elif isinstance(value, list) and value:
            value = list(value)
            i = r.randrange(len(value))
            value[i] = self.mutate_inside(value[i], mutation) if r.random() < 0.5 else self.wrong()
        return value

    def obj(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"pool": self.valid("pool"), "ns": self.valid("ns"), "sec": self.valid("sec"),
                "bm_id": self.valid("bm_id"), **(extra or {})}

    # messages -------------------------------------------------------------------------------------------

    def structured(self, op: str, mutation: float) -> dict[str, Any]:
        r = self.rng
        kinds = FIELDS.get(op) or r.sample(ALL_FIELDS, r.randint(0, 6))
        message: dict[str, Any] = {"op": op, "id": self.take_id()}
        for kind in kinds:
            message[kind] = self.field(kind, mutation)
        if op == "plog_replica_append" and r.random() < 0.5:
            message.pop("data", None)         # the bytes' place in the home's files instead
            message["source"] = self.field("source", mutation)
        if kinds and r.random() < mutation / 2:
            message.pop(r.choice(kinds), None)
        if r.random() < mutation / 4:
            message[r.choice(ALL_FIELDS + ["x", "op2", ""])] = self.wrong()
        return message

    def take_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def next(self) -> Message:
        r = self.rng
        roll = r.random() * (0.12 if self.malformed_only else 1.0)
        if roll < 0.04:
            data = r.randbytes(r.choice([0, 1, 2, 7, 64, 1000]))
            return Message("garbage", "-", data, shown=f"bytes {data[:40]!r}")
        if roll < 0.07:
            if r.random() < 0.2:             # deeper than msgpack's own packer goes
                depth = r.choice([100, 1000, 100_000])
                return Message("non_map", "-", b"\x91" * depth + b"\x01", shown=f"a list nested {depth} deep")
            value = r.choice([None, 1, -1, "op", b"x", [1, 2], [{"op": "hello", "id": 1}], 1.5, True])
            return self.packed("non_map", "-", value)
        if roll < 0.11:
            message = self.structured(r.choice(self.ops), 0.1)
            odd = r.choice(["missing", None, "1", 1.5, True, False, -1, 2**64 - 1, -2**63, b"\x01", [1]])
            if odd == "missing":
                del message["id"]
            else:
                message["id"] = odd
            if isinstance(odd, int) and self.malformed_only:
                message["id"] = "1"
            # An int is an id (bools are ints to msgpack's reader too): that request deserves an answer.
            return self.packed("structured" if isinstance(message.get("id"), int) else "odd_id",
                               message["op"], message)
        if roll < 0.12:
            message = {"op": r.choice(self.ops), "id": self.take_id(), "pool": "x" * (MAX_MESSAGE_BYTES + 100)}
            return self.packed("oversized", message["op"], message)
        if roll < 0.15:
            op = r.choice(["", "op_hello", "HELLO", "__init__", "handlers", "dispatch", "serve", "span",
                           None, 1, True, b"hello", ["hello"], {"x": 1}, "x" * 300, "\x01" * 70_000])
            return self.packed("unknown_op", repr(op)[:40], {"op": op, "id": self.take_id()})
        op = r.choices(self.ops, [OP_WEIGHTS.get(o, 1.0) for o in self.ops])[0]
        message = self.structured(op, r.choice([0.0, 0.05, 0.2, 0.5]))
        payload = b""
        if self.door == "rpc" and (op in ("seg_write", "kv_fill", "plog_append_payload") or r.random() < 0.02):
            want = message.get("length")
            n = want if type(want) is int and 0 <= want <= (1 << 20) and r.random() < 0.8 \
                else r.choice([0, 1, 4096, 70_000])
            payload = r.randbytes(n)
        return self.packed("structured", op, message, payload)

    def packed(self, kind: str, op: str, value: Any, payload: bytes = b"") -> Message:
        data = msgpack.packb(value, use_bin_type=True)
        if len(data) > MAX_MESSAGE_BYTES:
            kind = "oversized"
        return Message(kind, op, data, payload, shown=_show(value))


# The fields each operation reads (kinds of Maker.valid). An operation added later without an
# entry here still gets fuzzed, with fields drawn from all of these.
CREDS = ["pool", "ns", "sec"]
FIELDS: dict[str, list[str]] = {
    "hello": ["role", "pid"],
    "stats": [], "cluster_view": [], "ns_query": [], "ns_usage": [],
    "ns_create": CREDS + ["attribute", "exist_ok"],
    "ns_destroy": CREDS,
    "ns_drop": CREDS + ["incarnation"],
    "ns_open": CREDS,
    "segments": CREDS + ["segments"],
    "segments_release": ["pool", "segments"],
    "alloc": CREDS + ["size", "policy", "server_id"],
    "describe": CREDS + ["bm_id"],
    "free": CREDS + ["bm_id"],
    "batch_free": CREDS + ["bm_ids"],
    "expand": CREDS + ["bm_id", "size"],
    "map_pin": CREDS + ["bm_id"],
    "map_unpin": CREDS + ["bm_id"],
    "extent_alloc": CREDS + ["bm_id", "size"],
    "extent_free": CREDS + ["bm_id", "extents"],
    "copy": ["src", "dst", "src_offset", "dst_offset", "length"],
    "gather": ["operator", "dtype", "inputs", "dst"],
    "reduce_part": ["operator", "dtype", "inputs"],
    "home_restarted": ["home"],
    "objects_alive": ["ids"],
    "objects": CREDS + ["after"],
    "seg_read": CREDS + ["bm_id", "segment", "offset", "length"],
    "seg_write": CREDS + ["bm_id", "segment", "offset", "length"],
    "kv_open": CREDS,
    "kv_put": CREDS + ["key", "value", "ttl_ms", "nx", "xx", "keepttl", "get", "replicas"],
    "kv_put_many": CREDS + ["keys", "values", "ttl_ms", "replicas"],
    "kv_get": CREDS + ["key"],
    "kv_get_many": CREDS + ["keys"],
    "kv_exists": CREDS + ["keys"],
    "kv_delete": CREDS + ["key"],
    "kv_delete_many": CREDS + ["keys"],
    "kv_expire": CREDS + ["key", "ttl_ms"],
    "kv_ttl": CREDS + ["key"],
    "kv_incr": CREDS + ["key", "by"],
    "kv_scan": CREDS + ["cursor", "batch", "prefix", "servers", "generation", "restart"],
    "kv_stats": CREDS,
    "kv_flush": CREDS,
    "kv_configure": CREDS + ["memory_limit", "eviction", "replicas"],
    "kv_settings_changed": CREDS,
    "kv_replicate": CREDS + ["key", "value", "expiry", "version", "replicas"],
    "kv_reserve": CREDS + ["length"],
    "kv_fill": CREDS + ["token", "at", "length"],
    "kv_commit": CREDS + ["token", "key", "ttl_ms", "nx", "xx", "keepttl", "get", "replicas", "version", "expiry"],
    "kv_abort": CREDS + ["token"],
    "kv_read": CREDS + ["hold", "at", "length"],
    "kv_let_go": CREDS + ["hold"],
    "plog_create": CREDS + ["name", "capacity", "replicas"],
    "plog_info": CREDS + ["name"],
    "plog_list": CREDS,
    "plog_append": CREDS + ["name", "records", "shared", "lengths"],
    "plog_append_payload": CREDS + ["name", "lengths"],
    "plog_share_stage": CREDS + ["length", "replaces"],
    "plog_drop_stage": CREDS + ["stage"],
    "plog_read": CREDS + ["name", "offset", "length"],
    "plog_records": CREDS + ["name", "start", "count", "data"],
    "plog_seal": CREDS + ["name"],
    "plog_delete": CREDS + ["name"],
    "plog_replica_create": CREDS + ["name", "capacity", "nonce", "plog_id", "home", "replica_servers", "replicas"],
    "plog_replica_append": CREDS + ["name", "plog_id", "at", "data", "last"],
    "plog_replica_stale": CREDS + ["name", "plog_id"],
    "plog_replica_payload": CREDS + ["name", "plog_id", "at", "last"],     # (RPC: its bytes as the payload)
}
ALL_FIELDS = sorted({k for kinds in FIELDS.values() for k in kinds})
# Operations that end the target namespace are drawn less often, so most messages reach deep.
OP_WEIGHTS = {"ns_destroy": 0.3, "ns_drop": 0.3, "home_restarted": 0.5, "kv_flush": 0.3, "plog_delete": 0.3}


def _show(value: Any, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


# ---- the doors ---------------------------------------------------------------------------------------


MALFORMED = ("garbage", "non_map", "odd_id", "oversized")     # the server may close on these


class Closed(Exception):
    """The server closed the connection (its answer to a malformed message)."""


class NoReply(Exception):
    """No reply within REPLY_TIMEOUT_S."""


class DoorShut(Exception):
    """The door took no new connection, RECONNECT_TRIES times over."""


class IpcDoor:
    def __init__(self, path: str) -> None:
        self.path = path
        self.sock: socket.socket | None = None

    def connect(self, rng: random.Random) -> None:
        self.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MAX_MESSAGE_BYTES)
        sock.settimeout(REPLY_TIMEOUT_S)
        sock.connect(self.path)
        self.sock = sock

    def exchange(self, message: Message) -> dict[str, Any]:
        assert self.sock is not None
        try:
            self.sock.send(message.data)
        except OSError as exc:
            raise Closed(str(exc)) from None
        ancillary = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * 4)
        try:
            data, anc, _, _ = self.sock.recvmsg(MAX_MESSAGE_BYTES, ancillary)
        except socket.timeout:
            raise NoReply() from None
        except OSError as exc:
            raise Closed(str(exc)) from None
        for level, kind, raw in anc:        # ns_open and segments hand over fds: ours to close
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(raw[: len(raw) - len(raw) % fds.itemsize])
                for fd in fds:
                    os.close(fd)
        if not data:
            raise Closed("EOF")
        return msgpack.unpackb(data, raw=False, strict_map_key=False)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class RpcDoor:
    def __init__(self, address: str, token: bytes) -> None:
        self.address = address
        self.token = token
        self.frames: rpc.FrameSocket | None = None

    def connect(self, rng: random.Random) -> None:
        """A token holder's connection; half of them say hello as a peer (peer operations open)."""
        self.close()
        frames = rpc.connect(self.address, None, REPLY_TIMEOUT_S)
        rpc.client_handshake(frames, self.token)
        self.frames = frames
        reply = self.exchange(Message("structured", "hello", msgpack.packb(
            {"op": "hello", "id": 1, "role": rng.choice(["client", "peer"])})))
        assert "error" not in reply, reply

    def exchange(self, message: Message) -> dict[str, Any]:
        frames = self.frames
        assert frames is not None
        head = message.data
        first = rpc.PREFIX.pack(len(head), len(message.payload)) + head
        if len(first) < rpc.FIRST_BLOCK:
            first += bytes(rpc.FIRST_BLOCK - len(first))
        try:
            frames.sock.sendall(first + message.payload)
        except OSError as exc:
            raise Closed(str(exc)) from None
        try:
            reply, n = frames.recv_header(time.monotonic() + REPLY_TIMEOUT_S)
            frames.discard(n, time.monotonic() + REPLY_TIMEOUT_S)
        except socket.timeout:
            raise NoReply() from None
        except (OSError, MemfabricError) as exc:
            raise Closed(str(exc)) from None
        return reply

    def close(self) -> None:
        if self.frames is not None:
            self.frames.close()
            self.frames = None


# ---- a run -------------------------------------------------------------------------------------------


@dataclass
class Report:
    door: str
    seed: int
    messages: int = 0
    outcomes: Counter = field(default_factory=Counter)     # error code name, "ok", "closed", "no_reply"
    examples: list[dict[str, str]] = field(default_factory=list)   # the first few findings, to reproduce
    findings_by_op: Counter = field(default_factory=Counter)
    checks_passed: int = 0
    check_failures: list[str] = field(default_factory=list)
    log_lines: int = 0
    log_lines_by_level: Counter = field(default_factory=Counter)
    tracebacks: int = 0
    servers_alive: bool = True
    elapsed_s: float = 0.0

    @property
    def internal_errors(self) -> int:
        return self.outcomes["INTERNAL_ERROR"]

    @property
    def findings(self) -> int:
        """Bad input answered as a bug: INTERNAL_ERROR, or no answer at all to a well-formed request."""
        return self.internal_errors + self.outcomes["CLOSED_ON_WELL_FORMED"] + self.outcomes["no_reply"]

    def note(self, index: int, message: Message, what: str, keep: int = 20) -> None:
        self.findings_by_op[message.op] += 1
        if len(self.examples) < keep:
            self.examples.append({"index": str(index), "op": message.op, "message": message.shown,
                                  "payload_bytes": str(len(message.payload)), "reply": what[:300]})

    def as_dict(self) -> dict[str, Any]:
        return {"door": self.door, "seed": self.seed, "messages": self.messages,
                "internal_errors": self.internal_errors, "findings": self.findings,
                "findings_by_op": dict(self.findings_by_op),
                "outcomes": dict(self.outcomes.most_common()), "normal_client_checks": self.checks_passed,
                "normal_client_failures": self.check_failures, "servers_alive": self.servers_alive,
                "log_lines": self.log_lines, "log_lines_by_level": dict(self.log_lines_by_level),
                "tracebacks": self.tracebacks, "elapsed_s": round(self.elapsed_s, 1),
                "examples": self.examples}


class Fuzz:
    """One fabric under fuzz: its targets (refreshed as the fuzz eats them) and a normal client."""

    def __init__(self, fab: LocalFabric) -> None:
        self.fab = fab
        self.setup = memfabric.init(fab.directory, server=0)
        # A client of another server: its objects homed there may hold extents here.
        self.elsewhere = memfabric.init(fab.directory, server=1) if len(fab.server_pids()) > 1 else None
        self.values = Values()
        self.target_ns: str | None = None
        self.targets_made = 0
        self.secrets = random.Random(0)
        self.server_id = self.setup.local.server_id
        self.others = [s["server_id"] for s in self.setup.servers() if s["server_id"] != self.server_id]
        # The normal client: a namespace whose secId the fuzz never sees.
        self.guard_ns = self.setup.create_namespace(f"guard-{uuid.uuid4().hex[:8]}", sec_id=os.urandom(16))
        self.guard = self.guard_ns.alloc(4096)
        self.refresh()

    def refresh(self) -> None:
        """A fresh namespace with objects here, on another server and spread; the old one goes."""
        old = self.target_ns
        if old is not None:
            try:
                self.setup.destroy_namespace(old, self.values.sec)
            except MemfabricError:
                pass                          # the fuzz destroyed it already
        v = self.values
        self.targets_made += 1
        v.ns, v.sec = f"fz-{self.targets_made}", self.secrets.randbytes(12)
        self.target_ns = v.ns
        self.setup.create_namespace(v.ns, sec_id=v.sec)
        creds = {"pool": v.pool, "ns": v.ns, "sec": v.sec}

        def alloc(session: memfabric.Session, size: int, policy: str = "local", server_id: int | None = None):
            # Raw: the home is the server asked, wherever the bytes go.
            return session.local.call("alloc", **creds, size=size, policy=policy, server_id=server_id)

        described = [alloc(self.setup, 4096), alloc(self.setup, 5000), alloc(self.setup, 3 << 19)]
        if self.others:
            described.append(alloc(self.setup, 8192, "server", self.others[0]))
            described.append(alloc(self.setup, 3 << 20, "spread"))
        v.incarnation = described[0]["incarnation"]
        v.extents = []
        if self.elsewhere is not None:
            # Homed on the other server, its bytes here: what extent_free and spans of held
            # extents name.
            held = alloc(self.elsewhere, 8192, "server", self.server_id)
            v.extents = [e[1:] for e in held["extents"] if e[0] == self.server_id]
            described.append(held)
        extents = [e for d in described for e in d["extents"]]
        v.segments = sorted({e[1] for e in extents if e[0] == self.server_id}) or [0]
        v.bm_ids = [d["bm_id"] for d in described] + [described[0]["bm_id"].rsplit("-", 1)[0] + "-999"]
        self.setup.local.call("free", **creds, bm_id=described[1]["bm_id"])   # a freed id too
        v.server_ids = [self.server_id] + self.others + [99]

    def check_normal_client(self, report: Report) -> None:
        try:
            data = os.urandom(64)
            self.guard.write(data, 100)
            assert self.guard.read(100, 64) == data
            report.checks_passed += 1
        except Exception as exc:   # noqa: BLE001 -- reported
            report.check_failures.append(f"after {report.messages} messages: {exc!r}")

    def close(self) -> None:
        for session in (self.setup, self.elsewhere):
            try:
                if session is not None:
                    session.close()
            except MemfabricError:
                pass

    def door(self, name: str) -> IpcDoor | RpcDoor:
        me = next(s for s in self.setup.servers() if s["server_id"] == self.server_id)
        if name == "ipc":
            return IpcDoor(me["ipc_socket"])
        with open(os.path.join(self.fab.directory, "token"), "rb") as f:
            token = f.read().strip()
        return RpcDoor(me["rpc_address"], token)

    def run(self, door_name: str, messages: int, seed: int,
            progress: Callable[[Report], None] | None = None, malformed_only: bool = False) -> Report:
        self.secrets = random.Random(seed + 2)
        self.refresh()
        report = Report(door_name, seed)
        maker = Maker(seed, door_name, self.values, malformed_only)
        conn_rng = random.Random(seed + 1)
        door = self.door(door_name)
        log_start = len(self.fab.output)
        started = time.monotonic()

        def reconnect() -> None:
            for attempt in range(RECONNECT_TRIES):
                try:
                    door.connect(conn_rng)
                    return
                except (OSError, MemfabricError) as exc:
                    failure = exc
                    time.sleep(1.0)
            raise DoorShut(f"no connection after {RECONNECT_TRIES} tries: {failure!r}")

        try:
            reconnect()
            for i in range(messages):
                if i and i % REFRESH_EVERY == 0:
                    self.refresh()
                if i and i % CHECK_EVERY == 0:
                    self.check_normal_client(report)
                    if progress:
                        progress(report)
                message = maker.next()
                report.messages += 1
                try:
                    reply = door.exchange(message)
                except Closed as exc:
                    if message.kind in MALFORMED:
                        report.outcomes["closed"] += 1
                    else:                    # a well-formed request deserves an answer
                        report.outcomes["CLOSED_ON_WELL_FORMED"] += 1
                        report.note(i, message, f"connection closed: {exc}")
                    reconnect()
                    continue
                except NoReply:
                    report.outcomes["no_reply"] += 1
                    report.note(i, message, f"no reply within {REPLY_TIMEOUT_S} s")
                    reconnect()
                    continue
                code = reply.get("error")
                name = "ok" if code is None else _code_name(code)
                report.outcomes[name] += 1
                if name == "INTERNAL_ERROR":
                    report.note(i, message, str(reply.get("msg")))
                if name in ("ok", "NO_SUCH_NAMESPACE") and message.op in ("ns_destroy", "ns_drop") \
                        or name == "NO_SUCH_NAMESPACE" and conn_rng.random() < 0.05:
                    self.refresh()           # the fuzz ended the target: a new one keeps it deep
                if conn_rng.random() < 0.002:
                    reconnect()              # now and then a new connection (and hello)
        except DoorShut as exc:
            report.check_failures.append(f"after {report.messages} messages the door took no connection: {exc}")
        finally:
            door.close()
        self.check_normal_client(report)
        report.elapsed_s = time.monotonic() - started
        time.sleep(0.5)                      # let the last log lines through the pipes
        lines = self.fab.output[log_start:]
        report.log_lines = len(lines)
        for line in lines:
            parts = line.split()
            level = parts[3] if len(parts) > 3 and parts[2] == "server" else "other"
            report.log_lines_by_level[level] += 1
            report.tracebacks += line.startswith("Traceback")
        report.servers_alive = all(_alive(pid) for pid in self.fab.server_pids().values())
        return report


def _code_name(code: Any) -> str:
    try:
        return BmError(code).name
    except ValueError:
        return f"code {code!r}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def start_fabric(directory: str) -> LocalFabric:
    return LocalFabric(directory, servers=2, capacity="64MiB", segment_size="1MiB",
                       liveness_timeout_s=2.0).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz_doors", description=__doc__.split("\n\n")[0])
    parser.add_argument("--door", choices=["ipc", "rpc", "both"], default="both")
    parser.add_argument("--messages", type=int, default=100_000, help="per door")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="one JSON report per door")
    parser.add_argument("--malformed-only", action="store_true",
                        help="only garbage, non-map messages and bad ids (what may flood the log)")
    args = parser.parse_args(argv)
    directory = tempfile.mkdtemp(prefix="mf-fuzz-", dir="/tmp")
    fab = start_fabric(directory)
    failed = False
    try:
        fuzz = Fuzz(fab)
        try:
            for door in (["ipc", "rpc"] if args.door == "both" else [args.door]):
                def progress(r: Report) -> None:
                    if r.messages % 10_000 < CHECK_EVERY:
                        print(f"  {door}: {r.messages} messages, {r.internal_errors} INTERNAL_ERROR",
                              file=sys.stderr, flush=True)
                report = fuzz.run(door, args.messages, args.seed, progress=progress,
                                  malformed_only=args.malformed_only)
                failed |= bool(report.findings or report.check_failures or not report.servers_alive)
                if args.json:
                    print(json.dumps(report.as_dict()), flush=True)
                else:
                    print(describe(report), flush=True)
        finally:
            fuzz.close()
    finally:
        fab.stop()
        import shutil
        shutil.rmtree(directory, ignore_errors=True)
    return 1 if failed else 0


def describe(r: Report) -> str:
    """The report as a person reads it: figures, then each finding with the message that made it."""
    lines = [
        f"door {r.door}, seed {r.seed}: {r.messages} messages in {r.elapsed_s:.1f} s",
        f"  INTERNAL_ERROR: {r.internal_errors}; all findings (with closed or unanswered well-formed "
        f"requests): {r.findings} {dict(r.findings_by_op.most_common())}",
        f"  outcomes: {dict(r.outcomes.most_common())}",
        f"  normal client: {r.checks_passed} checks passed, {len(r.check_failures)} failed {r.check_failures[:3]}",
        f"  servers alive after: {r.servers_alive}",
        f"  server log: {r.log_lines} lines {dict(r.log_lines_by_level.most_common())}, {r.tracebacks} tracebacks",
    ]
    for example in r.examples:
        payload = f" + {example['payload_bytes']} payload bytes" if example["payload_bytes"] != "0" else ""
        lines.append(f"  finding #{example['index']} {example['op']}: {example['message']}{payload}\n"
                     f"      -> {example['reply']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
