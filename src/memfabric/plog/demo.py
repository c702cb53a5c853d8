"""MemPlog's part of `memfabric demo`: a write-ahead log on the fabric's pmem pool, each call
with its result and time (cli/demo.py prints them)."""

from __future__ import annotations

import time
from typing import Any, Callable

from ..client.session import init
from ..errors import BmError, MemfabricError

POOL = "logs"                  # the demo fabric's pmem pool (cli/demo.py starts it)

Step = Callable[[str, str, Callable[[], Any], int], Any]


def _code(fn: Callable[[], Any]) -> Callable[[], tuple[int, Any]]:
    """The call as a (code, result) step: 0 and its result, or its error's code."""
    def run() -> tuple[int, Any]:
        try:
            return 0, fn()
        except MemfabricError as exc:
            return int(exc.code), None
    return run


def run(directory: str, step: Step, note: Callable[[str], None]) -> None:
    with init(directory) as session:
        ns = session.create_namespace("demo-logs", sec_id="demo-secret", pool=POOL)
        _, log = step("ns.create_plog", f"a 16 MiB plog 'wal' on pool '{POOL}' (pmem: a file, fdatasync'ed)",
                      _code(lambda: ns.create_plog("wal", 16 << 20)), 0)
        if log is None:
            return
        _, offset = step("log.append", "one 4 KiB record, durable when it returns",
                         _code(lambda: log.append(b"r" * 4096)), 0)
        n = 1000
        t0 = time.perf_counter()
        for i in range(n):
            log.append(b"%08d" % i + b"." * 4088)
        note(f"  {n} more appends of 4 KiB: {(time.perf_counter() - t0) / n * 1e6:,.0f} us each "
             "(one round trip and one fdatasync each)")
        step("log.append_many", "100 records of 4 KiB: one request, one flush",
             _code(lambda: log.append_many([b"b" * 4096] * 100)), 0)
        _, record = step("log.record", "record 500 by index", _code(lambda: log.record(500)), 0)
        if record is not None and not record.startswith(b"%08d" % 499):
            raise SystemExit("demo: check failed: record 500 is the 500th append")
        step("log.read", "4 KiB of raw log bytes at the first record's offset",
             _code(lambda: log.read(offset, 4096)), 0)
        step("log.seal", "no append from anyone succeeds after this", _code(log.seal), 0)
        step("log.append", "to the sealed plog: refused", _code(lambda: log.append(b"late")), BmError.SEALED)
        _, infos = step("ns.plogs", "the namespace's plogs", _code(ns.plogs), 0)
        for info in infos or []:
            note(f"  {info['name']}: {info['records']} records, {info['length']:,} of {info['capacity']:,} bytes, "
                 f"{info['state']}")
        small = ns.create_plog("tiny", 4096)
        step("log.append_many", "more than a 4 KiB plog holds: nothing written",
             _code(lambda: small.append_many([b"x" * 1000] * 5)), BmError.OUT_OF_SPACE)
        step("log.delete", "both plogs; their memory goes back", _code(lambda: (log.delete(), small.delete())), 0)
        ns.destroy()
