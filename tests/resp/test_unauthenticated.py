"""A door on an address other than loopback (AUTH required): connections that have not
authenticated are bounded (a share of maxclients; a newcomer past it closes the oldest of
them) and closed when they have not authenticated in time, so that anyone who can reach the
door cannot lock out the clients that can AUTH."""

from __future__ import annotations

import socket
import time

import redis

from memfabric.limits import RESP_UNAUTH_CLIENTS_SHARE

from .one_door import non_loopback_address, one_door
from .wire import READ_S, Raw, encode

MAX_CLIENTS = 16
UNAUTHENTICATED = int(MAX_CLIENTS * RESP_UNAUTH_CLIENTS_SHARE)


def _info_clients(client: redis.Redis) -> int:
    return int(client.info("clients")["connected_clients"])


def test_idle_unauthenticated_connections_do_not_lock_out_a_client_that_authenticates():
    """Before: 16 idle connections took all 16 slots, and redis-py with the right password got
    "max number of clients reached"."""
    listen, connect = non_loopback_address()
    with one_door(listen, connect, resp_max_clients=MAX_CLIENTS, resp_auth_timeout_s=600.0) as door:
        idle: list[Raw] = []
        for _ in range(MAX_CLIENTS):              # every slot's worth, each seen by the door
            raw = Raw(door.port, door.host)
            raw.send(encode("PING"))
            assert raw.reply() == b"-NOAUTH Authentication required.\r\n"
            idle.append(raw)
        client = redis.Redis(host=door.host, port=door.port, password=door.sec_id, socket_timeout=READ_S)
        assert client.set("in", "served") and client.get("in") == b"served"
        # Each newcomer past the share closed the oldest unauthenticated connection, with a
        # word; the newest stay (until their deadline), and every other slot is free for
        # clients that authenticate.
        assert _info_clients(client) == UNAUTHENTICATED      # client and UNAUTHENTICATED - 1 idle
        first_kept = MAX_CLIENTS - UNAUTHENTICATED + 1
        for raw in idle[:first_kept]:
            said, closed = raw.until_closed()
            assert closed and said.startswith(b"-ERR closed: too many connections are waiting to authenticate")
        more = [redis.Redis(host=door.host, port=door.port, password=door.sec_id, socket_timeout=READ_S)
                for _ in range(MAX_CLIENTS - UNAUTHENTICATED)]
        assert all(m.ping() for m in more)
        assert _info_clients(client) == MAX_CLIENTS
        # Full: a newcomer closes the oldest unauthenticated connection, never an authenticated one.
        newcomer = Raw(door.port, door.host)
        assert newcomer.run(["PING"]) == [b"-NOAUTH Authentication required.\r\n"]
        said, closed = idle[first_kept].until_closed()
        assert closed and said.startswith(b"-ERR closed: too many connections are waiting to authenticate")
        assert newcomer.run([f"AUTH {door.sec_id}"]) == [b"+OK\r\n"]
        assert _info_clients(client) == MAX_CLIENTS
        # Full of authenticated clients only: a newcomer is turned away as Redis turns it away.
        for raw in idle:
            raw.close()
        late = [redis.Redis(host=door.host, port=door.port, password=door.sec_id, socket_timeout=READ_S)
                for _ in range(MAX_CLIENTS - 2 - len(more))]
        assert all(m.ping() for m in late)
        turned_away = Raw(door.port, door.host)
        assert turned_away.until_closed() == (b"-ERR max number of clients reached\r\n", True)
        assert client.get("in") == b"served"
        for m in [*more, *late, client]:
            m.close()
        newcomer.close()


def test_a_connection_that_does_not_authenticate_in_time_is_closed():
    listen, connect = non_loopback_address()
    with one_door(listen, connect, resp_max_clients=MAX_CLIENTS, resp_auth_timeout_s=1.0) as door:
        silent = Raw(door.port, door.host)
        authenticated = Raw(door.port, door.host)
        assert authenticated.run([f"AUTH {door.sec_id}"]) == [b"+OK\r\n"]
        said, closed = silent.until_closed()
        assert closed and said == b"-ERR closed: no AUTH within 1 seconds\r\n"
        # Talking without authenticating does not keep a connection (bounded: the deadline
        # is READ_S / 10 away, and each PING is answered).
        chatty = Raw(door.port, door.host)
        replies = b""
        try:
            for _ in range(100):
                chatty.send(encode("PING"))
                replies += chatty.reply()
                time.sleep(READ_S / 100)
            raise AssertionError("an unauthenticated connection outlived its deadline")
        except (ConnectionError, OSError):
            pass
        said = (replies + chatty.buffer).split(b"\r\n")
        assert said[-2:] == [b"-ERR closed: no AUTH within 1 seconds", b""], said
        assert set(said[:-2]) <= {b"-NOAUTH Authentication required."}, said
        # An authenticated connection is not bound by it.
        time.sleep(1.5)
        assert authenticated.run(["PING"]) == [b"+PONG\r\n"]
        for raw in (silent, chatty, authenticated):
            raw.close()
        probe = socket.create_connection((door.host, door.port), timeout=READ_S)
        probe.close()
