"""The stop `memfabric server` and `memfabric up` wait for: a signal may land anywhere in the wait."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

from memfabric.stop_request import StopRequest

# The handler the process installs runs between every two lines of the wait, in the waiting
# thread, as a SIGTERM may. A threading.Event deadlocked here: its set() waited for the lock
# its own interrupted wait() held (seen: a server that ignored every SIGTERM after one).
SIGNAL_AT_EVERY_LINE = textwrap.dedent("""
    import signal, sys
    from memfabric.stop_request import StopRequest
    stop = StopRequest()
    stop.on_signals([signal.SIGTERM, signal.SIGINT])
    handler = signal.getsignal(signal.SIGTERM)

    def tracer(frame, event, arg):
        if event == "line":
            handler(signal.SIGTERM, frame)
        return tracer

    sys.settrace(tracer)
    asked = stop.wait(10)
    sys.settrace(None)
    print("asked" if asked and stop.is_set() else "not asked", flush=True)
""")


def test_a_signal_landing_anywhere_in_the_wait_ends_it():
    proc = subprocess.run([sys.executable, "-c", SIGNAL_AT_EVERY_LINE], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout.strip() == "asked", proc.stdout + proc.stderr


def test_a_stop_asked_from_another_thread_ends_the_wait_and_none_times_out():
    stop = StopRequest()
    assert stop.wait(0.05) is False and not stop.is_set()
    threading.Timer(0.2, stop.request).start()
    started = time.monotonic()
    assert stop.wait(30) is True
    assert time.monotonic() - started < 29       # ended by the request, not the timeout
    assert stop.wait(0) is True                  # and stays asked
