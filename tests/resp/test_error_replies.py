"""What a door client reads of a fabric error names no path, address or internal id (the
failures of a stopped or killed server, through a real door, are in test_races.py); the
texts of input errors, which are Redis's, are kept byte for byte."""

from __future__ import annotations

import pytest

from memfabric.errors import (InvalidArgument, LimitExceeded, MemfabricIOError, NoSuchObject, OutOfMemory,
                              PermissionDenied, ServerUnavailable, Timeout)
from memfabric.kv.resp.failures import error_reply, scrub

from .test_races import reveals_nothing

# The shapes of the messages the links and servers raise (datapath/link.py, rpc_link.py, ...).
FABRIC_FAILURES = [
    Timeout("server at /tmp/mf-x/server-2/ipc.sock did not answer 'kv_get' within 3s"),
    Timeout("server at 10.213.77.2:7000 took no request for 3.0s ('kv_get_many')"),
    Timeout("connecting to [fe80::1%eth0]:7000 took longer than 5s"),
    ServerUnavailable("server 2 at /tmp/mf-x/server-2/ipc.sock is gone ('hello': ConnectionResetError)"),
    ServerUnavailable("cannot reach db-7.internal:7001: Connection refused"),
    ServerUnavailable("object 1234 lost the bytes it had on server(s) 2, 3"),
    MemfabricIOError("/var/lib/memfabric/pools/cache-server-1: No space left on device"),
]


@pytest.mark.parametrize("exc", FABRIC_FAILURES, ids=lambda e: e.code.name)
def test_a_fabric_failure_reads_as_its_code_and_nothing_internal(exc):
    reply = error_reply(exc).decode()
    assert reply.startswith(f"-ERR {exc.code.name} ") and reply.endswith("\r\n"), reply
    assert reveals_nothing(reply), reply


def test_input_errors_keep_redis_texts_and_lose_internal_details():
    assert error_reply(InvalidArgument("value is not an integer or out of range")) == \
        b"-ERR value is not an integer or out of range\r\n"
    assert error_reply(NoSuchObject("no such key")) == b"-ERR no such key\r\n"
    assert error_reply(OutOfMemory("pool default: 12 bytes free on server 1")) == \
        b"-OOM command not allowed when used memory > 'maxmemory'.\r\n"
    assert error_reply(LimitExceeded("MGET's values are 600 bytes or more, at most 512 in one reply")) == \
        b"-ERR LIMIT_EXCEEDED MGET's values are 600 bytes or more, at most 512 in one reply\r\n"
    leaky = PermissionDenied("kv_move from server 2 at 192.0.2.7:7001 (hold 0123456789abcdef0123) via /run/x.sock")
    reply = error_reply(leaky).decode()
    assert reply.startswith("-ERR PERMISSION_DENIED ") and reveals_nothing(reply), reply
    assert scrub("key 'a/b' of 3 bytes") == "key 'a/b' of 3 bytes"
