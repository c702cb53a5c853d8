"""RESP2, as Redis 7 reads and writes it. Pure: bytes in, commands out; replies in, bytes out.

The parser follows Redis's networking.c step for step (processInlineBuffer,
processMultibulkBuffer), because clients and test suites see its quirks: a line is found
by its '\\r' (multibulk) or '\\n' (inline) searched as C's strchr does, so a NUL before it
hides it; the two bytes after a bulk are skipped unread; a multibulk count <= 0 is an empty
request; an inline line is split as sdssplitargs splits it (quotes, \\xHH escapes). A
malformed request gets Redis's error text and ends the connection, after the replies to the
requests before it. Every buffer it keeps is bounded (limits.py: RESP_*).
"""

from __future__ import annotations

from ...limits import (RESP_BULK_MAX_BYTES, RESP_INLINE_MAX_BYTES, RESP_MAX_ARGS, RESP_QUERY_BUFFER_MAX_BYTES,
                       RESP_UNAUTH_BULK_MAX_BYTES, RESP_UNAUTH_MAX_ARGS)

INT_MAX = (1 << 31) - 1
LLONG_MAX = (1 << 63) - 1
LLONG_MIN = -(1 << 63)


class RespProtocolError(Exception):
    """A request Redis would not read: the message is Redis's (without "ERR "); the
    connection is closed after it is sent."""


class QueryBufferFull(Exception):
    """More unparsed bytes than a client may leave: Redis closes such a client without a word."""


def string2ll(raw: bytes) -> int | None:
    """Redis's string2ll: a base-10 signed 64-bit integer with nothing around it (no sign
    '+', no leading zero, no space); None otherwise."""
    n = len(raw)
    if n == 0 or n > 20:
        return None
    if n == 1 and raw == b"0":
        return 0
    digits = raw[1:] if raw[0] == 0x2D else raw
    if not digits or not digits.isdigit() or digits[0] == 0x30 or not digits.isascii():
        return None
    value = int(raw)
    if not LLONG_MIN <= value <= LLONG_MAX:
        return None
    return value


_SPACE = frozenset(b" \t\n\v\f\r")
_ENDS_TOKEN = frozenset(b" \n\r\t\0")
_ESCAPES = {ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("b"): 8, ord("a"): 7}
_HEX = frozenset(b"0123456789abcdefABCDEF")


def split_args(line: bytes) -> list[bytes] | None:
    """sdssplitargs: an inline request's arguments, or None for unbalanced quotes. The line
    is a C string: it ends at its first NUL."""
    nul = line.find(b"\0")
    if nul >= 0:
        line = line[:nul]
    args: list[bytes] = []
    n = len(line)
    p = 0
    while True:
        while p < n and line[p] in _SPACE:
            p += 1
        if p >= n:
            return args
        current = bytearray()
        in_double = in_single = False
        while True:
            c = line[p] if p < n else 0
            nxt = line[p + 1] if p + 1 < n else 0
            if in_double:
                if c == 0x5C and nxt == 0x78 and p + 3 < n and line[p + 2] in _HEX and line[p + 3] in _HEX:
                    current.append(int(line[p + 2:p + 4], 16))
                    p += 3
                elif c == 0x5C and nxt:
                    p += 1
                    current.append(_ESCAPES.get(nxt, nxt))
                elif c == 0x22:
                    if nxt and nxt not in _SPACE:      # a closing quote is followed by a space or the end
                        return None
                    p += 1
                    break
                elif c == 0:
                    return None
                else:
                    current.append(c)
            elif in_single:
                if c == 0x5C and nxt == 0x27:
                    p += 1
                    current.append(0x27)
                elif c == 0x27:
                    if nxt and nxt not in _SPACE:
                        return None
                    p += 1
                    break
                elif c == 0:
                    return None
                else:
                    current.append(c)
            else:
                if c in _ENDS_TOKEN:
                    if c:
                        p += 1
                    break
                if c == 0x22:
                    in_double = True
                elif c == 0x27:
                    in_single = True
                else:
                    current.append(c)
            p += 1
        args.append(bytes(current))


def _c_find(buffer: bytearray, char: int, start: int) -> int:
    """strchr from `start`: the char's position, or -1 when absent or after a NUL."""
    at = buffer.find(char, start)
    if at < 0:
        return -1
    nul = buffer.find(0, start, at)
    return -1 if nul >= 0 else at


class RequestParser:
    """Commands out of a connection's bytes. feed() what was read, then take commands with
    next() until it returns None (wanting more bytes). It raises RespProtocolError as Redis
    answers a malformed request, QueryBufferFull when more is left unparsed than a client may
    leave. `auth_required`: not yet authenticated where AUTH is required (smaller bounds)."""

    __slots__ = ("_buffer", "_pos", "_args", "_count", "_bulk", "auth_required")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._pos = 0
        self._args: list[bytes] = []
        self._count = 0         # arguments of the multibulk request being read still to come
        self._bulk = -1         # the length of the bulk being read, -1: its length line is next
        self.auth_required = False

    def buffered_bytes(self) -> int:
        return len(self._buffer) - self._pos

    def idle(self) -> bool:
        """Nothing buffered, no request half read: the next bytes may be read by someone else."""
        return self._pos >= len(self._buffer) and self._count == 0 and self._bulk == -1

    def take_rest(self) -> bytes:
        """Between two requests: the bytes not parsed yet, no longer the parser's (b"" in the
        middle of one)."""
        if self._count or self._bulk != -1 or self._pos >= len(self._buffer):
            return b""
        rest = bytes(self._buffer[self._pos:])
        del self._buffer[:]
        self._pos = 0
        return rest

    def feed(self, data: bytes) -> None:
        if self._pos:
            del self._buffer[:self._pos]
            self._pos = 0
        self._buffer += data
        if len(self._buffer) > RESP_QUERY_BUFFER_MAX_BYTES:
            raise QueryBufferFull(f"a client left more than {RESP_QUERY_BUFFER_MAX_BYTES} bytes unparsed")

    def next(self) -> list[bytes] | None:
        """The next whole command (its arguments, at least one), or None."""
        while True:
            buffer = self._buffer
            if self._count == 0:
                if self._pos >= len(buffer):
                    return None
                if buffer[self._pos] == 0x2A:      # '*'
                    got = self._multibulk_header()
                    if got is None:
                        return None
                    if self._count == 0:
                        continue                  # *0, *-1: an empty request
                else:
                    args = self._inline()
                    if args is None:
                        return None
                    if args:
                        return args
                    continue
            args = self._multibulk_body()
            if args is None:
                return None
            return args

    def _inline(self) -> list[bytes] | None:
        buffer, start = self._buffer, self._pos
        newline = _c_find(buffer, 0x0A, start)
        if newline < 0:
            if len(buffer) - start > RESP_INLINE_MAX_BYTES:
                raise RespProtocolError("Protocol error: too big inline request")
            return None
        end = newline - 1 if newline != start and buffer[newline - 1] == 0x0D else newline
        args = split_args(bytes(buffer[start:end]))
        if args is None:
            raise RespProtocolError("Protocol error: unbalanced quotes in request")
        self._pos = newline + 1
        return args

    def _line(self, too_big: str) -> int:
        """The position of the '\\r' ending the length line at _pos; -1: not all here yet."""
        buffer, start = self._buffer, self._pos
        cr = _c_find(buffer, 0x0D, start)
        if cr < 0:
            if len(buffer) - start > RESP_INLINE_MAX_BYTES:
                raise RespProtocolError(too_big)
            return -1
        if cr - start > len(buffer) - start - 2:       # the '\n' after it is not here yet
            return -1
        return cr

    def _multibulk_header(self) -> bool | None:
        cr = self._line("Protocol error: too big mbulk count string")
        if cr < 0:
            return None
        count = string2ll(bytes(self._buffer[self._pos + 1:cr]))
        if count is None or count > INT_MAX:
            raise RespProtocolError("Protocol error: invalid multibulk length")
        if count > RESP_UNAUTH_MAX_ARGS and self.auth_required:
            raise RespProtocolError("Protocol error: unauthenticated multibulk length")
        if count > RESP_MAX_ARGS:
            # Redis takes up to INT_MAX; we bound what one command may make us keep.
            raise RespProtocolError("Protocol error: invalid multibulk length")
        self._pos = cr + 2
        self._count = max(0, count)
        self._args = []
        return True

    def _multibulk_body(self) -> list[bytes] | None:
        buffer = self._buffer
        args = self._args
        while self._count:
            if self._bulk < 0:
                cr = self._line("Protocol error: too big bulk count string")
                if cr < 0:
                    return None
                start = self._pos
                if buffer[start] != 0x24:          # '$'
                    raise RespProtocolError(f"Protocol error: expected '$', got '{chr(buffer[start])}'")
                length = string2ll(bytes(buffer[start + 1:cr]))
                if length is None or length < 0 or length > RESP_BULK_MAX_BYTES:
                    raise RespProtocolError("Protocol error: invalid bulk length")
                if length > RESP_UNAUTH_BULK_MAX_BYTES and self.auth_required:
                    raise RespProtocolError("Protocol error: unauthenticated bulk length")
                self._pos = cr + 2
                self._bulk = length
            if len(buffer) - self._pos < self._bulk + 2:
                return None
            args.append(bytes(buffer[self._pos:self._pos + self._bulk]))
            self._pos += self._bulk + 2         # the two bytes after a bulk are not looked at
            self._bulk = -1
            self._count -= 1
        self._args = []
        return args


# ---- replies ------------------------------------------------------------------------------------

OK = b"+OK\r\n"
PONG = b"+PONG\r\n"
NIL = b"$-1\r\n"
NIL_ARRAY = b"*-1\r\n"
EMPTY_ARRAY = b"*0\r\n"
QUEUED = b"+QUEUED\r\n"


def simple(text: str | bytes) -> bytes:
    if isinstance(text, str):
        text = text.encode()
    return b"+" + text + b"\r\n"


def error(text: str) -> bytes:
    """An error reply, as Redis's addReplyError: "ERR " before it unless it starts with "-"
    and its own code ("-WRONGTYPE ..."); no line break may break the line."""
    line = (text[1:] if text.startswith("-") else "ERR " + text).replace("\r", " ").replace("\n", " ")
    try:        # a client's bytes in it (commands.py _text decodes them as latin-1) go back as sent
        raw = line.encode("latin-1")
    except UnicodeEncodeError:
        raw = line.encode()
    return b"-" + raw + b"\r\n"


def integer(value: int) -> bytes:
    return b":%d\r\n" % value


def bulk(value: bytes | None) -> bytes:
    if value is None:
        return NIL
    return b"$%d\r\n%s\r\n" % (len(value), value)


def array(items: list[bytes]) -> bytes:
    """An array of already encoded replies."""
    return b"*%d\r\n" % len(items) + b"".join(items)


def bulks(values: list[bytes | None]) -> bytes:
    return array([bulk(v) for v in values])


# RESP3 (after HELLO 3) differs for the replies the door gives only in these: a null, a map,
# a set and a verbatim string (INFO, CLIENT INFO) have types of their own.

NULL3 = b"_\r\n"


def nil(resp: int) -> bytes:
    return NULL3 if resp == 3 else NIL


def value(v: bytes | None, resp: int) -> bytes:
    """A bulk, or the protocol's null."""
    return nil(resp) if v is None else bulk(v)


def values(vs: list[bytes | None], resp: int) -> bytes:
    return array([value(v, resp) for v in vs])


def mapping(pairs: list[tuple[bytes, bytes]], resp: int) -> bytes:
    """A map of already encoded keys and values (RESP2: a flat array)."""
    if resp == 3:
        return b"%%%d\r\n" % len(pairs) + b"".join(k + v for k, v in pairs)
    return array([x for pair in pairs for x in pair])


def set_of(items: list[bytes], resp: int) -> bytes:
    return (b"~%d\r\n" % len(items) + b"".join(items)) if resp == 3 else array(items)


def verbatim(text: bytes, resp: int) -> bytes:
    return b"=%d\r\ntxt:%s\r\n" % (len(text) + 4, text) if resp == 3 else bulk(text)
