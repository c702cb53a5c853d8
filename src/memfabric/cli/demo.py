"""`memfabric demo`: start a local fabric (embedded cluster service, two servers), run every
BigMemory operation of the seed's API against it as a client would, print each with its
result and time, and stop the fabric.
"""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import ExitStack
from typing import Any, Callable

import numpy as np
from rich.console import Console
from rich.table import Table

from .. import compat as bm
from ..compat import BmAffinity, BmInfo, BmOperatorCode, DiskFileDesc
from ..errors import BmError
from ..launcher import LocalFabric
from ..plog import demo as plog_demo

console = Console(width=None if os.isatty(1) else 120)


def run_demo(directory: str | None = None) -> int:
    table = Table(title="memfabric demo: the seed's BigMemory API against a local two-server fabric")
    for column in ("call", "what it did", "result", "time"):
        table.add_column(column, justify="right" if column == "time" else "left")
    failures = 0

    def step(call: str, what: str, fn: Callable[[], Any], expect: int = 0) -> Any:
        nonlocal failures
        t0 = time.perf_counter()
        out = fn()
        elapsed_us = (time.perf_counter() - t0) * 1e6
        rc = out[0] if isinstance(out, tuple) else out
        ok = rc == expect
        failures += not ok
        shown = "0 (ok)" if rc == 0 else f"{rc} ({BmError(rc).name})"
        style = "green" if ok else "bold red"
        table.add_row(call, what, f"[{style}]{shown}[/]", f"{elapsed_us:,.0f} us")
        return out

    with ExitStack() as stack:
        if directory is None:
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="mf-demo-", dir="/tmp"))
        console.print(f"starting a local fabric in {directory} (embedded cluster service, 2 servers x 256MiB, "
                      f"and {plog_demo.POOL}:pmem:64MiB for MemPlog) ...")
        t0 = time.perf_counter()
        stack.enter_context(LocalFabric(directory, servers=2, capacity="256MiB",
                                        extra_args=["--pool", f"{plog_demo.POOL}:pmem:64MiB"]))
        console.print(f"fabric ready in {time.perf_counter() - t0:.2f} s")
        scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="mf-demo-files-"))

        step("BM_Init", f"client session on ockPath {directory}", lambda: bm.BM_Init(directory))
        stack.callback(bm.BM_Exit)
        step("BM_CreateNSSec", "namespace 'demo' in pool 'default'",
             lambda: bm.BM_CreateNSSec("default", "demo", 0, "demo-secret"))
        info = BmInfo(ns="demo", sec_id="demo-secret")
        step("BM_AllocSec", "8 MiB object, local placement", lambda: bm.BM_AllocSec(info, 8 << 20, 0, None))
        payload = np.random.default_rng(7).integers(0, 256, 8 << 20, dtype=np.uint8)
        step("BM_WriteSec", "8 MiB of random bytes (memcpy into the mapped pool)",
             lambda: bm.BM_WriteSec(info, 0, payload.nbytes, payload, 0))
        # Faulted in before the clock starts: the first touch of a fresh 8 MiB array took 25
        # to 54 ms here, against ~1 ms for the copy, so the time shown is the fabric's, as
        # for the write (whose source was touched when it was made).
        back = np.ones_like(payload)
        step("BM_ReadSec", "8 MiB back into a numpy array, in place (array touched beforehand)",
             lambda: bm.BM_ReadSec(info, 0, back.nbytes, back, 0))
        _check(np.array_equal(back, payload), "read back what was written")

        spread = BmInfo(ns="demo", sec_id="demo-secret")
        step("BM_AllocSec", "12 MiB object striped over both servers",
             lambda: bm.BM_AllocSec(spread, 12 << 20, 0, BmAffinity("spread")))
        rc, view = step("BM_MapSec", "the striped object as one contiguous buffer",
                        lambda: bm.BM_MapSec(spread, bm.PROT_READ | bm.PROT_WRITE, 0))
        if rc == 0:
            view[:5] = b"hello"
            view[-5:] = b"world"
            step("BM_Unmap", "unmap (writes were made in place)", lambda: bm.BM_Unmap(spread.bm_id, view))
        step("BM_CopySec", "1 MiB from the local object into the striped one (server side)",
             lambda: bm.BM_CopySec(info, 0, spread, 1 << 20, 1 << 20, 0))
        probe = bytearray(1 << 20)
        bm.BM_ReadSec(spread, 1 << 20, len(probe), probe, 0)
        _check(bytes(probe) == payload[: 1 << 20].tobytes(), "copy landed")

        step("BM_ExpandSec", "grow the local object from 8 MiB to 16 MiB, contents kept",
             lambda: bm.BM_ExpandSec(info, 16 << 20, 0))
        path = os.path.join(scratch, "weights.bin")
        file_bytes = np.arange(1 << 20, dtype=np.uint32).tobytes()
        with open(path, "wb") as f:
            f.write(file_bytes)
        step("BM_SpecificObjSwapInSec", "a 4 MiB file read straight into the object at 8 MiB",
             lambda: bm.BM_SpecificObjSwapInSec(DiskFileDesc(path), info, 0, 8 << 20, len(file_bytes)))
        check = bytearray(len(file_bytes))
        bm.BM_ReadSec(info, 8 << 20, len(check), check, 0)
        _check(bytes(check) == file_bytes, "file swapped in")

        parts = []
        for value in (1, 2, 3):
            part = BmInfo(ns="demo", sec_id="demo-secret")
            bm.BM_AllocSec(part, 4096, 0, None)
            bm.BM_WriteSec(part, 0, 4096, np.full(1024, value, dtype=np.int32), 0)
            parts.append(part)
        total = BmInfo(ns="demo", sec_id="demo-secret")
        rc, length = step("BM_GatherSec", "SUM of three int32 vectors, reduced by the server",
                          lambda: bm.BM_GatherSec([(p, 0, 4096) for p in parts], BmOperatorCode.SUM, 0, total,
                                                  dtype="int32"))
        sums = np.empty(1024, dtype=np.int32)
        bm.BM_ReadSec(total, 0, 4096, sums, 0)
        _check(bool((sums == 6).all()), "1 + 2 + 3 = 6 everywhere")
        joined = BmInfo(ns="demo", sec_id="demo-secret")
        step("BM_GatherSec", "CONCAT of the same three into a new object",
             lambda: bm.BM_GatherSec([(p, 0, 4096) for p in parts], BmOperatorCode.CONCAT, 0, joined))

        rc, namespaces = step("BM_QueryNSCache", "namespaces with object counts", bm.BM_QueryNSCache)
        for n in namespaces or []:
            table.add_row("", f"  {n.pool}/{n.ns}: {n.object_count} objects, {n.used_bytes:,} bytes", "", "")
        wrong = BmInfo(ns="demo", sec_id="not-the-secret", bm_id=info.bm_id)
        step("BM_ReadSec", "with a wrong secId: refused", lambda: bm.BM_ReadSec(wrong, 0, 16, bytearray(16), 0),
             expect=BmError.PERMISSION_DENIED)
        step("BM_ReadSec", "past the end of the object: refused",
             lambda: bm.BM_ReadSec(info, (16 << 20) - 8, 16, bytearray(16), 0), expect=BmError.OUT_OF_RANGE)
        step("BM_BatchFreeSec", "free the three gather inputs at once",
             lambda: bm.BM_BatchFreeSec([p.bm_id for p in parts], 3, 0, "demo", "demo-secret"))
        step("BM_FreeSec", "free the striped object", lambda: bm.BM_FreeSec(spread, 0))
        step("BM_ReadSec", "through the freed handle: refused",
             lambda: bm.BM_ReadSec(spread, 0, 16, bytearray(16), 0), expect=BmError.NO_SUCH_OBJECT)
        step("BM_DestroyNSSec", "namespace and all it holds", lambda: bm.BM_DestroyNSSec("default", "demo", "demo-secret"))
        step("BM_Exit", "end the session", bm.BM_Exit)
        table.add_row("[bold]MemPlog[/]", "persistent append-only logs (the Pythonic API)", "", "")
        plog_demo.run(directory, step, lambda line: table.add_row("", line, "", ""))
        stack.pop_all().close()   # also stops the fabric: servers deregister, memory is released
    console.print(table)
    if failures:
        console.print(f"[bold red]{failures} step(s) did not give the expected result[/]")
        return 1
    console.print("[green]every step gave the expected result; the fabric stopped cleanly[/]")
    return 0


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise SystemExit(f"demo: check failed: {what}")
