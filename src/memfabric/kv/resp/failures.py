"""What a door client hears of a memfabric error: a Redis-style error line that names no path,
address or internal id. Every MemKV error a command meets (here, or forwarded from another
server) becomes its reply here, and only here.

A door client is not a fabric client: it may be anyone who can reach the door, and must not
learn where the fabric's sockets, servers and objects are. Errors about the fabric itself
(a server that timed out, is gone, failed to read a file) get a fixed text per code; errors
about the client's own input keep their text (MemKV's are Redis's, byte for byte), scrubbed of
anything internal that might still be in it. The server's log keeps the whole text.
"""

from __future__ import annotations

import re
from typing import Any

from ...errors import BmError, MemfabricError, OutOfMemory
from . import protocol as p

# Errors about the fabric, not the command: what the client hears instead of their text.
FABRIC_ERRORS = {
    BmError.TIMEOUT: "a server of the pool did not answer in time; try again",
    BmError.SERVER_UNAVAILABLE: "a server of the pool is unavailable; its keys are served again once the "
                                "cluster sees it gone",
    BmError.IO_ERROR: "a server of the pool failed to read or write its memory",
    BmError.PROTOCOL_ERROR: "a server of the pool sent an unreadable reply",
    BmError.INTERNAL_ERROR: "a server of the pool failed (its log says why)",
    BmError.BUSY: "a server of the pool is busy; try again",
    BmError.NOT_INITIALIZED: "a server of the pool is not ready; try again",
    BmError.OUT_OF_SPACE: "a server of the pool is out of file space",
}

# What may still hide in an input error's text (each replaced by a word saying what was there).
_INTERNAL = [
    (re.compile(r"(?<![\w.])/(?:[\w.+@-]+/?)+"), "(a path)"),                       # /tmp/x/ipc.sock
    (re.compile(r"\[[0-9a-fA-F:.%\w]*:[0-9a-fA-F:.%\w]*\](?::\d+)?"), "(an address)"),  # [::1]:6390
    (re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b"), "(an address)"),            # 10.0.0.1:7000
    (re.compile(r"\b[\w.-]+:\d{2,5}\b"), "(an address)"),                             # host:7000
    (re.compile(r"\bserver(?:s|\(s\))? \d+(?:(?:,\s*|\s+and\s+)\d+)*"), "a server"),  # server 2, servers 1, 2
    (re.compile(r"\bhost '[^']*'"), "a host"),
    (re.compile(r"\bobject \d+"), "an object"),
    (re.compile(r"\b[0-9a-fA-F]{16,}\b"), "(an id)"),                                 # tokens, hashes
    (re.compile(r"'kv_\w+'|\bkv_\w+"), "a request"),                                  # internal operations
]


def scrub(text: str) -> str:
    for pattern, word in _INTERNAL:
        text = pattern.sub(word, text)
    return text


def error_reply(exc: MemfabricError, limited_log: Any = None) -> bytes:
    """The reply for a MemKV error: Redis's OOM text for a full pool, the text of an input
    error as MemKV gives it (Redis's), "CODE text" for the rest. An error about the fabric
    goes to `limited_log` (the server's rate-limited log) whole."""
    if isinstance(exc, OutOfMemory):
        return p.error("-OOM command not allowed when used memory > 'maxmemory'.")
    fixed = FABRIC_ERRORS.get(exc.code)
    if fixed is not None:
        if limited_log is not None:
            limited_log.warning("resp fabric error", "RESP door answered %s for: %s", exc.code.name, exc)
        return p.error(f"{exc.code.name} {fixed}")
    if exc.code in (BmError.NO_SUCH_OBJECT, BmError.INVALID_ARGUMENT):
        return p.error(scrub(str(exc)))
    return p.error(f"{exc.code.name} {scrub(str(exc))}")


def internal_error_reply() -> bytes:
    """A bug's reply: that it happened, not what it said (the server's log has that)."""
    return p.error("internal error in the Redis-protocol door (the server's log has it)")
