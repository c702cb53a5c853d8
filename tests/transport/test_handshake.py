"""The client's side of the RPC token challenge against a peer that goes away during it."""

from __future__ import annotations

import socket
import threading

import pytest

from memfabric.datapath.rpc_link import RpcLink
from memfabric.errors import ServerUnavailable
from memfabric.transport import rpc


def test_a_server_that_closes_the_connection_during_the_challenge_is_unavailable_not_a_wrong_token():
    """A server that goes away while it challenges us (killed just then: the connection was
    taken, then reset) is SERVER_UNAVAILABLE, which a session fails over from; it was
    PERMISSION_DENIED, as if our token were wrong (a seal right after its plog's home was
    SIGKILLed failed so, then worked when tried again)."""
    listener = socket.create_server(("127.0.0.1", 0))
    address = "127.0.0.1:%d" % listener.getsockname()[1]

    def greet_then_go():          # the server's greeting, then gone before the verdict
        conn, _ = listener.accept()
        with conn:
            frames = rpc.FrameSocket(conn)
            frames.send({"id": 0, "hello": rpc.PROTOCOL, "nonce": bytes(32), "server_id": 1})
            frames.recv_header(frame_timeout_s=10)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")    # a reset, as a kill gives

    server = threading.Thread(target=greet_then_go, daemon=True)
    server.start()
    try:
        with pytest.raises(ServerUnavailable, match="closed the connection during the token challenge"):
            RpcLink(address, b"t" * 32, timeout_s=10)
    finally:
        server.join(10)
        listener.close()
    assert not server.is_alive()
