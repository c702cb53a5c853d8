"""Small helpers the test modules share."""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import time
import uuid
from typing import Iterator

import numpy as np
import pytest

import memfabric
from memfabric import Affinity, OutOfMemory

KiB = 1 << 10
MiB = 1 << 20
WAIT_S = 10.0       # the bound on every wait for something the servers do asynchronously
CHILD_WAIT_S = 15.0  # the bound on every wait for another process


def random_bytes(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def wait_until(condition, what: str, timeout_s: float = WAIT_S):
    """Poll `condition` until it returns something true (returned), failing after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


def stop_process(pid: int) -> None:
    """SIGSTOP `pid` and return once every thread of it has stopped. kill() returns before
    that: a thread running on another CPU (a server polling for its next request) goes on
    for a moment, long enough to take and answer one more request on a loaded machine."""
    os.kill(pid, signal.SIGSTOP)

    def all_stopped() -> bool:
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    # The state follows the ")" that ends the command name; T: stopped.
                    if f.read().rpartition(")")[2].split()[0] != "T":
                        return False
        except FileNotFoundError:     # a thread that just ended
            return False
        return True
    try:
        wait_until(all_stopped, f"process {pid} to stop")
    except BaseException:
        os.kill(pid, signal.SIGCONT)     # never leave a server stopped behind a failed test
        raise



@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """`pid` SIGSTOPped (stop_process) for the block, and SIGCONTed after it however it ends."""
    stop_process(pid)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)

def interrupt_at(function, line: int):
    """(tracer, fired): a sys.settrace tracer that raises KeyboardInterrupt (as SIGINT's handler
    would) the first time `function` reaches `line`; `fired` holds the line once it did."""
    code = function.__code__
    fired: list[int] = []

    def local(frame, event, arg):
        if event == "line" and frame.f_lineno == line and not fired:
            fired.append(line)
            raise KeyboardInterrupt
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code is code else None
    return tracer, fired


def resident_bytes(shared) -> int:
    """Rss of the kernel mappings inside `shared` (pieces at non-adjacent file offsets are
    mappings of their own), from /proc/self/smaps."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = shared.base <= start and end <= shared.base + shared.length
            elif inside and head == "Rss:":
                total += int(line.split()[1]) * 1024
    return total


def alloc_when_possible(ns: memfabric.Namespace, size: int, affinity: Affinity | None = None,
                        timeout_s: float = WAIT_S) -> memfabric.BigMemory:
    """Allocate, retrying OUT_OF_MEMORY for a bounded time: freed memory rests before reuse,
    and released segments and published figures come back asynchronously."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ns.alloc(size, affinity)
        except OutOfMemory:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def ns_name(request: pytest.FixtureRequest) -> str:
    """A namespace name of the test's own: unique, and telling where it came from."""
    base = re.sub(r"[^A-Za-z0-9_.:-]", "_", request.node.name)[:40]
    return f"{base}-{uuid.uuid4().hex[:8]}"


class Child:
    """A client process spoken to line by line over its stdin/stdout, every read bounded."""

    def __init__(self, code: str, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._buf = b""

    def send(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def expect(self, timeout_s: float = CHILD_WAIT_S) -> str:
        deadline = time.monotonic() + timeout_s
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.kill()
                pytest.fail(f"child said nothing for {timeout_s}s; stderr:\n{self.stderr()}")
            chunk = os.read(fd, 65536)
            if not chunk:
                self.proc.wait(timeout_s)
                pytest.fail(f"child exited with {self.proc.returncode}; stderr:\n{self.stderr()}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def ask(self, line: str) -> str:
        self.send(line)
        return self.expect()

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        return self.proc.stderr.read().decode(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(WAIT_S)

    def close(self) -> int:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(WAIT_S)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode


def free_ports(count: int) -> int:
    """A first port P such that P .. P + count - 1 are free on 127.0.0.1 now (`up` gives server i
    port P + i - 1). Another process may take one before it is used: a test that starts with a
    taken port fails saying so, it does not hang."""
    import random
    import socket
    rng = random.Random()
    for _ in range(200):
        first = rng.randrange(20000, 60000 - count)
        held = []
        try:
            for port in range(first, first + count):
                sock = socket.socket()
                held.append(sock)
                sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    pytest.fail(f"found no {count} free ports in a row")
