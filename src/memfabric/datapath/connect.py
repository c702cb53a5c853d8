"""How to reach a server the cluster view names: IPC on this host, RPC across hosts."""

from __future__ import annotations

import os
import ssl

from ..errors import ServerUnavailable
from ..limits import BUSY_POLL_US
from .link import ServerLink
from .rpc_link import RpcLink


def connect_to(server_id: int, host: str, ipc_socket: str, rpc_address: str, *, local_host: str | None,
               token: bytes | None, tls: ssl.SSLContext | None, timeout_s: float,
               role: str = "client", busy_poll_s: float = BUSY_POLL_US / 1e6) -> ServerLink | RpcLink:
    """A link to that server, checked to be the server it claims to be.

    `local_host` is this process's host label when it can use IPC (None when it cannot):
    servers with the same label and a socket file here are reached by IPC, the rest by RPC.
    """
    if local_host is not None and host == local_host and ipc_socket and os.path.exists(ipc_socket):
        link: ServerLink | RpcLink = ServerLink(ipc_socket, timeout_s, role=role, busy_poll_s=busy_poll_s)
    elif rpc_address and token is not None:
        link = RpcLink(rpc_address, token, tls, timeout_s, role=role, busy_poll_s=busy_poll_s)
    else:
        raise ServerUnavailable(f"server {server_id} is on host {host!r}, and no RPC (cluster.token_file) "
                                "is configured here to reach it")
    if link.server_id != server_id:
        link.close()
        raise ServerUnavailable(f"the address of server {server_id} answers as server {link.server_id}")
    return link
