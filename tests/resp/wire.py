"""Raw RESP over a socket, for the door's tests: requests encoded by hand, replies read back
byte for byte (never parsed into values: the tests compare Redis's bytes with the door's)."""

from __future__ import annotations

import socket

from memfabric.kv.resp.protocol import split_args

from ..helpers import wait_until

READ_S = 10.0          # the bound on every read


def encode(*args: bytes | str) -> bytes:
    parts = [a.encode() if isinstance(a, str) else a for a in args]
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in parts)


def command(line: str | bytes) -> bytes:
    """A command written as redis-cli takes it (quotes, \\x escapes), as a multibulk request."""
    args = split_args(line.encode() if isinstance(line, str) else line)
    assert args, f"no command in {line!r}"
    return encode(*args)


class Raw:
    """One connection, its replies read whole."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=READ_S)
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("closed")
        self.buffer += data

    def _line_end(self, at: int) -> int:
        while True:
            end = self.buffer.find(b"\r\n", at)
            if end >= 0:
                return end
            self._fill()

    def _skip_reply(self, at: int) -> int:
        """The position after the reply that starts at `at`."""
        end = self._line_end(at)
        kind, head = self.buffer[at:at + 1], self.buffer[at + 1:end]
        at = end + 2
        if kind in (b"+", b"-", b":", b"_", b",", b"#", b"("):
            return at
        n = int(head)
        if kind in (b"$", b"=", b"!"):
            if n < 0:
                return at
            while len(self.buffer) < at + n + 2:
                self._fill()
            return at + n + 2
        assert kind in (b"*", b"%", b"~", b">"), f"not a reply: {self.buffer[at - 40:at + 40]!r}"
        for _ in range(n * (2 if kind == b"%" else 1) if n > 0 else 0):
            at = self._skip_reply(at)
        return at

    def reply(self) -> bytes:
        while not self.buffer:
            self._fill()
        end = self._skip_reply(0)
        out, self.buffer = self.buffer[:end], self.buffer[end:]
        return out

    def run(self, lines: list[str | bytes]) -> list[bytes]:
        """Send the commands pipelined, then read one reply each."""
        self.send(b"".join(command(line) for line in lines))
        return [self.reply() for _ in lines]

    def until_closed(self) -> tuple[bytes, bool]:
        """Everything sent until the server closes (or READ_S passes: then not closed)."""
        out = self.buffer
        try:
            while True:
                data = self.sock.recv(1 << 20)
                if not data:
                    return out, True
                out += data
        except socket.timeout:
            return out, False
        except ConnectionResetError:
            return out, True


def stall_reply_budget(port: int, r, readers: int = 2, values: int = 24, value_bytes: int = 1 << 20) -> list[Raw]:
    """Readers that read nothing, each with an MGET of `values` values of `value_bytes` whose
    first batch (8 MiB) the door holds of its reply budget while it waits to send it; returns
    them (close them to let the budget go) once `r` (a redis-py client) sees it all held."""
    keys = [f"fill:{i}" for i in range(values)]
    for k in keys:
        r.set(k, b"v" * value_bytes)
    stalled = []
    for _ in range(readers):
        raw = Raw(port)
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.send(encode("MGET", *keys))
        stalled.append(raw)
    held = readers * 8 * value_bytes
    wait_until(lambda: r.info("memory")["mem_clients_normal"] == held, "the stalled replies to hold the budget")
    return stalled
