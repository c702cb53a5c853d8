"""`memfabric down --dir D`: stop the fabric that `memfabric up --dir D` runs.

The pid comes from D/up.pid, and is believed only while D/up.lock is held (the kernel drops
`up`'s flock when it dies, so a pid file without a held lock is a dead `up`'s, whatever
process has that pid now). The signal goes through a pidfd opened before that check, so it
reaches that very process even if it exits and its pid is reused meanwhile.

An `up` of D still starting (its imports and checks, before it takes the lock) is waited for,
up to the timeout: `up --dir D &` then `down --dir D` left, saying no fabric was running, and
the fabric started a moment later.

Exit status: 0 when the fabric stopped or none was running; 1 when it still runs after the
wait, or a server of D still runs without its `up`.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time

from .up import UP_LOCK_FILE, UP_PID_FILE, locked


def run_down(directory: str, timeout_s: float) -> int:
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        print(f"memfabric down: no fabric directory {directory}", file=sys.stderr)
        return 1
    pid_path = os.path.join(directory, UP_PID_FILE)
    lock_path = os.path.join(directory, UP_LOCK_FILE)
    running = _locked_once_started(directory, lock_path, timeout_s)
    pid = _read_pid(pid_path)
    if not running:
        if os.path.exists(pid_path):
            _unlink(pid_path)
            named = f"pid {pid}" if pid is not None else "unreadable"
            print(f"memfabric down: no fabric is running in {directory}; removed a stale {UP_PID_FILE} "
                  f"({named}: its up did not stop cleanly)")
        else:
            print(f"memfabric down: no fabric is running in {directory}")
        return _servers_left(directory)
    if pid is None:       # an up of an earlier version, or one that is just starting: its lock says
        pid = _read_pid(lock_path)
    if pid is None:
        print(f"memfabric down: a fabric runs in {directory} but neither {UP_PID_FILE} nor {UP_LOCK_FILE} "
              "names its pid; stop it where it runs", file=sys.stderr)
        return 1
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        pidfd = None
    try:
        # Checked again with the pidfd open: the process it names cannot change under us now.
        if pidfd is None or not locked(lock_path) or not _is_up(pid):
            print(f"memfabric down: the fabric in {directory} stopped meanwhile")
            return _servers_left(directory)
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        print(f"memfabric down: sent SIGTERM to memfabric up (pid {pid}) of {directory}; "
              f"waiting up to {timeout_s:g}s for it and its servers to stop", flush=True)
        started_s = time.monotonic()
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)     # readable once the process has exited
        if not poller.poll(int(timeout_s * 1000)):
            print(f"memfabric down: memfabric up (pid {pid}) still runs after {timeout_s:g}s; wait longer "
                  f"(--timeout), or kill -9 {pid} (its servers get SIGTERM when it dies)", file=sys.stderr)
            return 1
    finally:
        if pidfd is not None:
            os.close(pidfd)
    print(f"memfabric down: the fabric in {directory} stopped (pid {pid}, "
          f"{time.monotonic() - started_s:.1f}s)")
    if os.path.exists(pid_path) and _read_pid(pid_path) == pid:     # it died before it could tidy up
        _unlink(pid_path)
    return _servers_left(directory)


def _locked_once_started(directory: str, lock_path: str, timeout_s: float) -> bool:
    """Whether an `up` holds D's lock, once any `up` of D still starting has taken it or exited
    (waited for up to `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if os.path.exists(lock_path) and locked(lock_path):
            return True
        starting = _starting_ups(directory)
        if not starting or time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _starting_ups(directory: str) -> list[int]:
    """The pids of `memfabric up` processes whose --dir is `directory` (resolved from their own
    working directory), read from /proc: those that have not taken its lock yet are starting."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                args = [a.decode(errors="replace") for a in f.read().split(b"\0")]
            cwd = os.readlink(f"/proc/{name}/cwd")
        except OSError:           # gone meanwhile, or not ours to read
            continue
        if "up" not in args or not any("memfabric" in a for a in args[:args.index("up")]):
            continue
        given = next((a.split("=", 1)[1] for a in args if a.startswith("--dir=")), None)
        if given is None and "--dir" in args[:-1]:
            given = args[args.index("--dir") + 1]
        if given is not None and os.path.realpath(os.path.join(cwd, given)) == os.path.realpath(directory):
            found.append(int(name))
    return found


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read(32).strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and 0 < int(text) < 1 << 22 else None


def _is_up(pid: int) -> bool:
    """The process is a `memfabric up` (a belt to the lock's braces)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except OSError:
        return False
    return any(b"memfabric" in a for a in args) and b"up" in args


def _servers_left(directory: str) -> int:
    """Servers of D that still run (data directory locked) without an `up`: say so, status 1."""
    left = []
    for name in sorted(os.listdir(directory)):
        lock = os.path.join(directory, name, "server.lock")
        if name.startswith("server-") and os.path.exists(lock) and locked(lock):
            left.append(os.path.join(directory, name))
    if not left:
        return 0
    print(f"memfabric down: a server still runs on {', '.join(left)} (its data directory is locked): the "
          "servers of an up that was killed stop by themselves within seconds; one started by hand "
          "(memfabric server) needs a SIGTERM of its own", file=sys.stderr)
    return 1


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
