"""The door's commands: what each Redis command means on MemKV, with Redis 7's replies and
errors (argument checks in Redis's order, its texts). The keys' operations run at their
first homes (keys.py); this file only reads arguments and writes replies.

Not here: data types other than strings, transactions, pub/sub, scripting, databases
other than 0 (a namespace is one keyspace).
"""

from __future__ import annotations

import itertools
import os
import platform
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from ... import __version__
from ...errors import MemfabricError, NoSuchObject
from ...limits import RESP_BULK_MAX_BYTES, RESP_QUERY_BUFFER_MAX_BYTES
from ..space import now_ms
from . import protocol as p
from .failures import error_reply
from .glob import matches
from .held import HeldValue, take_piece
from .keys import Keyspace
from .mget import MgetReply
from .protocol import LLONG_MAX, LLONG_MIN, string2ll

if TYPE_CHECKING:
    from .front import RespFront

REDIS_VERSION = "7.0.15"     # what the door answers as (clients pick features by it)
SYNTAX = "syntax error"
NOT_INTEGER = "value is not an integer or out of range"
SCAN_CALLS = 64             # table reads one SCAN makes at most
# A SCAN cursor: slot << 20 | the server's table generation (8 bits) << 12 | the server's place
# in the pool's list, and bit 62 once that server's table was read again. A table replaced
# since (grown: keys moved) is read on where its keys are now (the server's Store.resume);
# one gone altogether (replaced twice between two calls) is read again from its start, once
# per pass: keys may come twice, as Redis's SCAN allows, and none present all along is
# missed (a keyspace that doubles between every two calls must still end). Before, a table
# replaced twice in one pass (600 keys scanned 50 at a time, 60 added a call) lost keys. As
# with Redis, a pass ends if the keyspace stops growing: one that grows faster than the scan
# reads it is read on and on.
SCAN_SERVER_BITS = 12
SCAN_GENERATION_BITS = 8
SCAN_REREAD = 1 << 62


class RedisError(Exception):
    """A command's error reply (Redis's text; "-CODE ..." for another code than ERR)."""


class Quit(Exception):
    """QUIT: the reply is sent, then the connection closed."""


@dataclass
class Client:
    """One door connection as its commands see it."""
    id: int
    address: str
    front: "RespFront"
    keys: Keyspace | None          # its namespace; None until AUTH where AUTH is required
    name: bytes | None = None
    lib_name: bytes = b""
    lib_ver: bytes = b""
    since_s: float = field(default_factory=time.monotonic)
    resp: int = 2                  # the protocol's version (HELLO 3: RESP3)
    conn: Any = None               # its server.requests.Connection
    sock: Any = None
    buffer: Any = None             # the compiled GET and SET's (front.py), made with its first use

    def keyspace(self) -> Keyspace:
        assert self.keys is not None, "a command needing keys ran before AUTH"
        return self.keys


Handler = Callable[[Client, list[bytes]], Any]     # bytes, or an MgetReply or HeldValue to stream


@dataclass(frozen=True)
class Command:
    name: str
    arity: int                     # as Redis's: n exactly, -n at least n
    handler: Handler | None        # None: a container (subcommands)
    flags: tuple[str, ...] = ()
    first_key: int = 0
    last_key: int = 0
    key_step: int = 0
    subcommands: dict[str, "Command"] = field(default_factory=dict)


# ---- arguments ------------------------------------------------------------------------------------

def _int(raw: bytes, message: str = NOT_INTEGER) -> int:
    value = string2ll(raw)
    if value is None:
        raise RedisError(message)
    return value


def _expire_ms(raw: bytes, command: str, seconds: bool, relative: bool) -> int:
    """getExpireMillisecondsOrReply: an absolute expiry in ms from an EX/PX/EXAT/PXAT argument."""
    value = _int(raw)
    if value <= 0 or (seconds and value > LLONG_MAX // 1000):
        raise RedisError(f"invalid expire time in '{command}' command")
    if seconds:
        value *= 1000
    if relative:
        now = now_ms()
        if value > LLONG_MAX - now:
            raise RedisError(f"invalid expire time in '{command}' command")
        value += now
    return value


def _set_options(args: list[bytes], command: str, getex: bool) -> dict[str, Any]:
    """parseExtendedStringArgumentsOrReply, for SET (args from 3) and GETEX (from 2)."""
    nx = xx = get = keepttl = persist = False
    unit: str | None = None
    expire: bytes | None = None
    j = 2 if getex else 3
    while j < len(args):
        opt = args[j].lower()
        more = j + 1 < len(args)
        if opt == b"nx" and not xx and not getex:
            nx = True
        elif opt == b"xx" and not nx and not getex:
            xx = True
        elif opt == b"get" and not getex:
            get = True
        elif opt == b"keepttl" and not persist and unit is None and not getex:
            keepttl = True
        elif opt == b"persist" and getex and unit is None and not keepttl:
            persist = True
        elif opt in (b"ex", b"px", b"exat", b"pxat") and not keepttl and not persist and \
                unit in (None, opt.decode()) and more:
            unit = opt.decode()
            expire = args[j + 1]
            j += 1
        else:
            raise RedisError(SYNTAX)
        j += 1
    expire_at = None
    if expire is not None:
        expire_at = _expire_ms(expire, command, unit in ("ex", "exat"), unit in ("ex", "px"))
    return {"nx": nx, "xx": xx, "get": get, "keepttl": keepttl, "persist": persist, "expire_at": expire_at}


# ---- connection ------------------------------------------------------------------------------------

def cmd_ping(c: Client, a: list[bytes]) -> bytes:
    if len(a) > 2:
        raise RedisError("wrong number of arguments for 'ping' command")
    return p.PONG if len(a) == 1 else p.bulk(a[1])


def cmd_echo(c: Client, a: list[bytes]) -> bytes:
    return p.bulk(a[1])


def cmd_quit(c: Client, a: list[bytes]) -> bytes:
    raise Quit()


def cmd_select(c: Client, a: list[bytes]) -> bytes:
    db = _int(a[1])
    if not -(1 << 31) <= db < 1 << 31:
        raise RedisError(NOT_INTEGER)
    if db != 0:
        raise RedisError("DB index is out of range")     # a namespace is one keyspace: database 0
    return p.OK


def cmd_auth(c: Client, a: list[bytes]) -> bytes:
    if len(a) > 3:
        raise RedisError(SYNTAX)
    ns, sec = (a[1], a[2]) if len(a) == 3 else (None, a[1])
    c.front.authenticate(c, ns, sec)
    return p.OK


def cmd_hello(c: Client, a: list[bytes]) -> bytes:
    version = c.resp
    j = 1
    if len(a) >= 2:
        version = _int(a[1], "Protocol version is not an integer or out of range")
        j = 2
        if not 2 <= version <= 3:
            raise RedisError("-NOPROTO unsupported protocol version")
    auth: tuple[bytes, bytes] | None = None
    name: bytes | None = None
    while j < len(a):
        more = len(a) - 1 - j
        opt = a[j].lower()
        if opt == b"auth" and more >= 2:
            auth = (a[j + 1], a[j + 2])
            j += 2
        elif opt == b"setname" and more:
            name = a[j + 1]
            j += 1
        else:
            raise RedisError(f"Syntax error in HELLO option '{_text(a[j])}'")
        j += 1
    if auth is not None:
        c.front.authenticate(c, None if auth[0] == b"default" else auth[0], auth[1])
    if c.keys is None:
        raise RedisError("-NOAUTH HELLO must be called with the client already authenticated, otherwise the "
                         "HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and "
                         "select the RESP protocol version at the same time")
    if name is not None:
        _set_name(c, name)
    c.resp = version
    return p.mapping([(p.bulk(b"server"), p.bulk(b"redis")), (p.bulk(b"version"), p.bulk(REDIS_VERSION.encode())),
                      (p.bulk(b"proto"), p.integer(version)), (p.bulk(b"id"), p.integer(c.id)),
                      (p.bulk(b"mode"), p.bulk(b"standalone")), (p.bulk(b"role"), p.bulk(b"master")),
                      (p.bulk(b"modules"), p.EMPTY_ARRAY)], version)


def _valid_attribute(value: bytes) -> bool:
    return all(33 <= b <= 126 for b in value)


def _set_name(c: Client, name: bytes) -> None:
    if not _valid_attribute(name):
        raise RedisError("Client names cannot contain spaces, newlines or special characters.")
    c.name = name or None


def client_id(c: Client, a: list[bytes]) -> bytes:
    return p.integer(c.id)


def client_getname(c: Client, a: list[bytes]) -> bytes:
    return p.value(c.name, c.resp)


def client_setname(c: Client, a: list[bytes]) -> bytes:
    _set_name(c, a[2])
    return p.OK


def client_setinfo(c: Client, a: list[bytes]) -> bytes:
    """Redis 7.2's CLIENT SETINFO LIB-NAME|LIB-VER value (clients send it on connecting)."""
    attribute = a[2].lower()
    if attribute not in (b"lib-name", b"lib-ver"):
        raise RedisError(f"Unrecognized option '{_text(a[2])}'")
    if not _valid_attribute(a[3]):
        raise RedisError(f"{attribute.decode().upper()} cannot contain spaces, newlines or special characters.")
    if attribute == b"lib-name":
        c.lib_name = a[3]
    else:
        c.lib_ver = a[3]
    return p.OK


def client_info(c: Client, a: list[bytes]) -> bytes:
    return p.verbatim(c.front.client_line(c) + b"\n", c.resp)


def client_list(c: Client, a: list[bytes]) -> bytes:
    return p.verbatim(b"".join(line + b"\n" for line in c.front.client_lines()), c.resp)


# ---- server ---------------------------------------------------------------------------------------

def _config_values(c: Client) -> dict[bytes, bytes]:
    front = c.front
    return {b"maxmemory": b"0", b"maxmemory-policy": b"noeviction", b"save": b"", b"appendonly": b"no",
            b"databases": b"1", b"maxclients": str(front.max_clients).encode(),
            b"proto-max-bulk-len": str(RESP_BULK_MAX_BYTES).encode(),
            b"client-query-buffer-limit": str(RESP_QUERY_BUFFER_MAX_BYTES).encode(),
            b"timeout": b"0", b"port": str(front.port).encode(), b"bind": front.host.encode(),
            b"protected-mode": b"no" if front.require_auth else b"yes", b"requirepass": b"",
            b"cluster-enabled": b"no"}


def config_get(c: Client, a: list[bytes]) -> bytes:
    values = _config_values(c)
    out: list[tuple[bytes, bytes]] = []
    seen: set[bytes] = set()
    for pattern in a[2:]:
        for name, value in values.items():
            if name not in seen and matches(pattern.lower(), name):
                seen.add(name)
                out.append((p.bulk(name), p.bulk(value)))
    return p.mapping(out, c.resp)


def config_resetstat(c: Client, a: list[bytes]) -> bytes:
    return p.OK


def cmd_dbsize(c: Client, a: list[bytes]) -> bytes:
    return p.integer(sum(r["stats"]["keys"] for r in c.keyspace().everywhere("kv_stats")))


def _flush(c: Client, a: list[bytes]) -> bytes:
    if len(a) > 2 or (len(a) == 2 and a[1].lower() not in (b"async", b"sync")):
        raise RedisError(SYNTAX)
    c.keyspace().everywhere("kv_flush")
    return p.OK


INFO_DEFAULT = ("server", "clients", "memory", "stats", "keyspace")


def cmd_info(c: Client, a: list[bytes]) -> bytes:
    wanted = [s.decode("latin-1").lower() for s in a[1:]] or ["default"]
    if any(w in ("all", "everything", "default") for w in wanted):
        sections = list(INFO_DEFAULT)
    else:
        sections = [s for s in INFO_DEFAULT if s in wanted]
    parts = [c.front.info_section(c, s) for s in sections]
    return p.verbatim(b"\r\n".join(parts), c.resp)


def server_info(c: Client) -> list[tuple[str, Any]]:
    front = c.front
    return [("redis_version", REDIS_VERSION), ("redis_mode", "standalone"), ("os", f"{platform.system()} "
            f"{platform.release()} {platform.machine()}"), ("arch_bits", 64), ("process_id", os.getpid()),
            ("memfabric_version", __version__), ("memfabric_server_id", front.server.server_id),
            ("tcp_port", front.port), ("uptime_in_seconds", int(time.monotonic() - front.started_s))]


# ---- COMMAND ---------------------------------------------------------------------------------------

def _command_info(cmd: Command, resp: int, name: str | None = None) -> bytes:
    flags = p.set_of([p.simple(f) for f in cmd.flags], resp)
    subs = p.array([_command_info(s, resp, f"{cmd.name}|{n}") for n, s in cmd.subcommands.items()])
    return p.array([p.bulk((name or cmd.name).encode()), p.integer(cmd.arity), flags, p.integer(cmd.first_key),
                    p.integer(cmd.last_key), p.integer(cmd.key_step), p.EMPTY_ARRAY, p.EMPTY_ARRAY, p.EMPTY_ARRAY,
                    subs])


def cmd_command(c: Client, a: list[bytes]) -> bytes:
    """COMMAND alone (with a subcommand, lookup() ran the subcommand's handler instead)."""
    assert len(a) == 1, "COMMAND's subcommands dispatch in lookup()"
    return p.array([_command_info(cmd, c.resp) for cmd in COMMANDS.values()])


def command_count(c: Client, a: list[bytes]) -> bytes:
    return p.integer(len(COMMANDS))


def command_info(c: Client, a: list[bytes]) -> bytes:
    names = a[2:] or [n.encode() for n in COMMANDS]
    return p.array([_command_info(COMMANDS[n.lower().decode("latin-1")], c.resp)
                    if n.lower().decode("latin-1") in COMMANDS else p.nil(c.resp) for n in names])


# ---- strings ----------------------------------------------------------------------------------------

def _put(c: Client, key: bytes, value: bytes, options: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    args: dict[str, Any] = {"nx": options["nx"], "xx": options["xx"], "keepttl": options["keepttl"],
                            "get": options["get"]}
    if options["expire_at"] is not None:
        args["expire_at_ms"] = options["expire_at"]
    return c.keyspace().put_where(key, value, **args)


# A value a command hands back: {"value": bytes} when small, else a hold on it at the server
# that answered, streamed from there (held.py).
Handed = tuple[int, "dict[str, Any] | None"]


def _found(answer: tuple[int, dict[str, Any]]) -> Handed:
    server_id, reply = answer
    return server_id, reply if reply["found"] else None


def _old(answer: tuple[int, dict[str, Any]]) -> Handed:
    server_id, reply = answer
    return server_id, reply.get("old")


def _value_reply(c: Client, handed: Handed, command: str, charge: int = 0) -> bytes | HeldValue:
    """The value as a bulk (None: the protocol's null); a held one streamed, with a piece of
    the reply budget: `charge`, taken already, or taken now (the hold let go if none comes)."""
    server_id, value = handed
    if value is None or "hold" not in value:
        c.front.reply_budget.give_back(charge)
        return p.value(None if value is None else value["value"], c.resp)
    return _held(c, server_id, value, 0, value["length"], command, charge)


def _held(c: Client, server_id: int, value: dict[str, Any], start: int, length: int, command: str,
          charge: int) -> HeldValue:
    ks = c.keyspace()
    if not charge:
        try:
            charge = take_piece(c.front.reply_budget, command, length)
        except BaseException:
            ks.let_go(server_id, value["hold"])
            raise
    return HeldValue(ks, server_id, value, start, length, c.front.reply_budget, charge, command)


def _taking(c: Client, command: str, run: Callable[[], Handed]) -> bytes | HeldValue:
    """A command that takes a value away or replaces it (GETDEL, GETSET, SET ... GET): its
    reply memory is taken before it runs, so that a reply short of memory is refused before
    the value is gone, never after."""
    budget = c.front.reply_budget
    charge = take_piece(budget, command)
    try:
        handed = run()
    except BaseException:
        budget.give_back(charge)
        raise
    return _value_reply(c, handed, command, charge)


def cmd_set(c: Client, a: list[bytes]) -> bytes | HeldValue:
    options = _set_options(a, "set", getex=False)
    if options["get"]:
        return _taking(c, "set", lambda: _old(_put(c, a[1], a[2], options)))
    return p.OK if _put(c, a[1], a[2], options)[1]["stored"] else p.nil(c.resp)


def cmd_setnx(c: Client, a: list[bytes]) -> bytes:
    return p.integer(1 if c.keyspace().put(a[1], a[2], nx=True)["stored"] else 0)


def _setex(c: Client, a: list[bytes], command: str, seconds: bool) -> bytes:
    at = _expire_ms(a[2], command, seconds, relative=True)
    c.keyspace().put(a[1], a[3], expire_at_ms=at)
    return p.OK


def cmd_setex(c: Client, a: list[bytes]) -> bytes:
    return _setex(c, a, "setex", True)


def cmd_psetex(c: Client, a: list[bytes]) -> bytes:
    return _setex(c, a, "psetex", False)


def cmd_getset(c: Client, a: list[bytes]) -> bytes | HeldValue:
    return _taking(c, "getset", lambda: _old(c.keyspace().put_where(a[1], a[2], get=True)))


def cmd_get(c: Client, a: list[bytes], command: str = "get") -> bytes | HeldValue:
    return _value_reply(c, _found(c.keyspace().call_where(a[1], "kv_get", as_hold=True)), command)


def cmd_getdel(c: Client, a: list[bytes]) -> bytes | HeldValue:
    return _taking(c, "getdel", lambda: _found(c.keyspace().call_where(a[1], "kv_take")))


def cmd_getex(c: Client, a: list[bytes]) -> bytes | HeldValue:
    options = _set_options(a, "getex", getex=True)
    if options["expire_at"] is None and not options["persist"]:
        return cmd_get(c, a, "getex")
    at = 0 if options["persist"] else options["expire_at"]
    return _value_reply(c, _found(c.keyspace().call_where(a[1], "kv_get_expire", expire_at_ms=at)), "getex")


def cmd_mget(c: Client, a: list[bytes]) -> bytes | MgetReply:
    # The values are sent as they are fetched, their bytes taken from the door's reply budget
    # (mget.py): one reply holding them all at once made the server hold about three times it.
    reply = MgetReply(c, a[1:])
    whole = reply.prepare()
    return whole if whole is not None else reply


def _pairs(a: list[bytes], command: str) -> list[tuple[bytes, bytes]]:
    if len(a) % 2 == 0:
        raise RedisError(f"wrong number of arguments for '{command}' command")
    return list(zip(a[1::2], a[2::2]))


def cmd_mset(c: Client, a: list[bytes]) -> bytes:
    c.keyspace().put_pairs(_pairs(a, "mset"))
    return p.OK


def cmd_msetnx(c: Client, a: list[bytes]) -> bytes:
    pairs = _pairs(a, "msetnx")
    ks = c.keyspace()
    if _exists(ks, [k for k, _ in pairs]):
        return p.integer(0)
    ks.put_pairs(pairs)
    return p.integer(1)


def cmd_append(c: Client, a: list[bytes]) -> bytes:
    return p.integer(c.keyspace().call(a[1], "kv_append", value=a[2])["length"])


def cmd_strlen(c: Client, a: list[bytes]) -> bytes:
    reply = c.keyspace().call(a[1], "kv_describe")
    return p.integer(reply["length"] if reply["found"] else 0)


def cmd_setrange(c: Client, a: list[bytes]) -> bytes:
    offset = _int(a[2])
    if offset < 0:
        raise RedisError("offset is out of range")
    if a[3] and offset + len(a[3]) > RESP_BULK_MAX_BYTES:
        raise RedisError("string exceeds maximum allowed size (proto-max-bulk-len)")
    return p.integer(c.keyspace().call(a[1], "kv_setrange", offset=offset, value=a[3])["length"])


def cmd_getrange(c: Client, a: list[bytes]) -> bytes | HeldValue:
    start, end = _int(a[2]), _int(a[3])
    server_id, value = _found(c.keyspace().call_where(a[1], "kv_get", as_hold=True))
    if value is None:
        return p.bulk(b"")
    held = "hold" in value
    span = _range(value["length"] if held else len(value["value"]), start, end)
    if not held:
        return p.bulk(b"" if span is None else value["value"][span[0]:span[1]])
    if span is None:
        c.keyspace().let_go(server_id, value["hold"])
        return p.bulk(b"")
    return _held(c, server_id, value, span[0], span[1] - span[0], "getrange", 0)


def _range(n: int, start: int, end: int) -> tuple[int, int] | None:
    """GETRANGE's [start, end] of a value of n bytes, as Redis reads it: [begin, stop), or None
    (empty)."""
    if start < 0 and end < 0 and start > end:
        return None
    if start < 0:
        start = n + start
    if end < 0:
        end = n + end
    start, end = max(start, 0), max(end, 0)
    if end >= n:
        end = n - 1
    if start > end or n == 0:
        return None
    return start, end + 1


def _incr(c: Client, key: bytes, by: int) -> bytes:
    return p.integer(c.keyspace().call(key, "kv_incr", by=by)["value"])


def cmd_incr(c: Client, a: list[bytes]) -> bytes:
    return _incr(c, a[1], 1)


def cmd_decr(c: Client, a: list[bytes]) -> bytes:
    return _incr(c, a[1], -1)


def cmd_incrby(c: Client, a: list[bytes]) -> bytes:
    return _incr(c, a[1], _int(a[2]))


def cmd_decrby(c: Client, a: list[bytes]) -> bytes:
    by = _int(a[2])
    if by == LLONG_MIN:
        raise RedisError("decrement would overflow")
    return _incr(c, a[1], -by)


def cmd_incrbyfloat(c: Client, a: list[bytes]) -> bytes:
    return p.bulk(c.keyspace().call(a[1], "kv_incr_float", by=a[2])["value"])


# ---- keys -------------------------------------------------------------------------------------------

def _exists(ks: Keyspace, keys: list[bytes]) -> int:
    count = 0
    for server_id, positions in ks.by_home(keys):
        count += sum(ks.call_at(server_id, "kv_exists", keys=[keys[i] for i in positions])["exists"])
    return count


def cmd_exists(c: Client, a: list[bytes]) -> bytes:
    return p.integer(_exists(c.keyspace(), a[1:]))


def cmd_del(c: Client, a: list[bytes]) -> bytes:
    ks = c.keyspace()
    keys = a[1:]
    deleted = 0
    for server_id, positions in ks.by_home(keys):
        deleted += ks.call_at(server_id, "kv_delete_many", keys=[keys[i] for i in positions])["deleted"]
    return p.integer(deleted)


def cmd_type(c: Client, a: list[bytes]) -> bytes:
    return p.simple("string" if _exists(c.keyspace(), [a[1]]) else "none")


def _scan_server(ks: Keyspace, server_id: int, servers: list[int], cursor: int, count: int,
                 pattern: bytes | None, generation: int | None, reread: bool) -> tuple[list[bytes], int, int, bool]:
    """Keys from slot `cursor` of a server's table (of `generation`, None: the current one;
    the server goes on where its keys are now, or from the start if it is gone unless the
    table was read again once already): the keys, the next slot (0: the end), the generation
    read, whether the table is being read again."""
    reply = ks.call_at(server_id, "kv_scan", cursor=cursor, batch=count, servers=servers, generation=generation,
                       restart=not reread)
    read = reply["generation"] & ((1 << SCAN_GENERATION_BITS) - 1)
    reread = reread or reply.get("restarted", False)
    keys = reply["keys"]
    if pattern is not None:
        keys = [k for k in keys if matches(pattern, k)]
    return keys, reply["cursor"], read, reread


def cmd_keys(c: Client, a: list[bytes]) -> bytes:
    ks = c.keyspace()
    servers = ks.servers()
    pattern = None if a[1] == b"*" else a[1]
    found: dict[bytes, None] = {}          # ordered, and a key read twice (a table replaced) once
    for server_id in servers:
        cursor, generation = 0, None
        while True:
            keys, cursor, generation, _ = _scan_server(ks, server_id, servers, cursor, 10_000, pattern,
                                                       generation, False)
            found.update(dict.fromkeys(keys))
            if cursor == 0:
                break
    return p.bulks(list(found))


def _scan_cursor(raw: bytes) -> int:
    """parseScanCursorOrReply: strtoul's reading, nothing around it."""
    text = raw.decode("latin-1")
    body = text[1:] if text[:1] in "+-" else text
    if not body.isdigit() or not body.isascii():
        raise RedisError("invalid cursor")
    value = int(body)
    if value >= 1 << 64:
        raise RedisError("invalid cursor")
    return (-value) % (1 << 64) if text.startswith("-") else value


def cmd_scan(c: Client, a: list[bytes]) -> bytes:
    cursor = _scan_cursor(a[1])
    count, pattern, only_strings = 10, None, True
    i = 2
    while i < len(a):
        opt, more = a[i].lower(), len(a) - i
        if opt == b"count" and more >= 2:
            count = _int(a[i + 1])
            if count < 1:
                raise RedisError(SYNTAX)
            i += 2
        elif opt == b"match" and more >= 2:
            pattern = None if a[i + 1] == b"*" else a[i + 1]
            i += 2
        elif opt == b"type" and more >= 2:
            only_strings = a[i + 1].lower() == b"string"
            i += 2
        else:
            raise RedisError(SYNTAX)
    ks = c.keyspace()
    servers = ks.servers()
    reread = bool(cursor & SCAN_REREAD)
    cursor &= SCAN_REREAD - 1
    place = cursor & ((1 << SCAN_SERVER_BITS) - 1)
    generation: int | None = (cursor >> SCAN_SERVER_BITS) & ((1 << SCAN_GENERATION_BITS) - 1)
    slot = cursor >> (SCAN_SERVER_BITS + SCAN_GENERATION_BITS)
    if place >= len(servers) or len(servers) >= 1 << SCAN_SERVER_BITS:
        return p.array([p.bulk(b"0"), p.EMPTY_ARRAY])
    # Like Redis's, a call returns about `count` keys; it goes on past empty stretches of the
    # tables (bounded), so that a small keyspace is done in one call, as with Redis.
    keys: list[bytes] = []
    for _ in range(SCAN_CALLS):
        if slot == 0 and not ks.call_at(servers[place], "kv_stats")["stats"]["keys"]:
            # No key is first at home there: nothing to walk (its table may be large and empty,
            # after a FLUSHDB, where Redis's would have shrunk).
            place, generation, reread = place + 1, None, False
            if place >= len(servers):
                break
            continue
        got, slot, generation, reread = _scan_server(ks, servers[place], servers, slot, min(count, 10_000),
                                                     pattern, generation, reread)
        keys += got
        if slot == 0:
            place, generation, reread = place + 1, None, False
            if place >= len(servers):
                break
        if len(keys) >= count:
            break
    next_cursor = 0 if place >= len(servers) else \
        (slot << SCAN_GENERATION_BITS | (generation or 0)) << SCAN_SERVER_BITS | place | (SCAN_REREAD if reread else 0)
    return p.array([p.bulk(str(next_cursor).encode()), p.bulks(keys if only_strings else [])])


def cmd_randomkey(c: Client, a: list[bytes]) -> bytes:
    return p.value(c.keyspace().random_key(), c.resp)


def _move(c: Client, a: list[bytes], nx: bool, keep: bool) -> dict[str, Any]:
    try:
        return c.keyspace().call(a[1], "kv_move", to=a[2], nx=nx, keep=keep)
    except NoSuchObject:
        raise RedisError("no such key") from None


def cmd_rename(c: Client, a: list[bytes]) -> bytes:
    _move(c, a, nx=False, keep=False)
    return p.OK


def cmd_renamenx(c: Client, a: list[bytes]) -> bytes:
    return p.integer(1 if _move(c, a, nx=True, keep=False)["moved"] else 0)


def cmd_copy(c: Client, a: list[bytes]) -> bytes:
    replace = False
    db = 0
    j = 3
    while j < len(a):
        opt = a[j].lower()
        if opt == b"replace":
            replace = True
        elif opt == b"db" and j + 1 < len(a):
            db = _int(a[j + 1])
            if not -(1 << 31) <= db < 1 << 31:
                raise RedisError(NOT_INTEGER)
            j += 1
        else:
            raise RedisError(SYNTAX)
        j += 1
    if a[1] == a[2] and db == 0:
        raise RedisError("source and destination objects are the same")
    if db != 0:
        raise RedisError("DB index is out of range")
    ks = c.keyspace()
    try:
        moved = ks.call(a[1], "kv_move", to=a[2], nx=not replace, keep=True)["moved"]
    except NoSuchObject:
        return p.integer(0)
    return p.integer(1 if moved else 0)


# ---- expiry ------------------------------------------------------------------------------------------

def _expire(c: Client, a: list[bytes], command: str, seconds: bool, relative: bool) -> bytes:
    when: list[str] = []
    for opt in a[3:]:
        low = opt.lower()
        if low not in (b"nx", b"xx", b"gt", b"lt"):
            raise RedisError(f"Unsupported option {_text(opt)}")
        when.append(low.decode())
    if "nx" in when and ({"xx", "gt", "lt"} & set(when)):
        raise RedisError("NX and XX, GT or LT options at the same time are not compatible")
    if "gt" in when and "lt" in when:
        raise RedisError("GT and LT options at the same time are not compatible")
    at = _int(a[2])
    if seconds:
        if at > LLONG_MAX // 1000 or at < LLONG_MIN // 1000:
            raise RedisError(f"invalid expire time in '{command}' command")
        at *= 1000
    base = now_ms() if relative else 0
    if at > LLONG_MAX - base:
        raise RedisError(f"invalid expire time in '{command}' command")
    at += base
    # MemKV keeps expiries as ms since 1970 (0: none); one before that has passed already.
    reply = c.keyspace().call(a[1], "kv_expire_at", expire_at_ms=max(at, 1), when=sorted(set(when)))
    return p.integer(1 if reply["set"] else 0)


def cmd_expire(c: Client, a: list[bytes]) -> bytes:
    return _expire(c, a, "expire", True, True)


def cmd_pexpire(c: Client, a: list[bytes]) -> bytes:
    return _expire(c, a, "pexpire", False, True)


def cmd_expireat(c: Client, a: list[bytes]) -> bytes:
    return _expire(c, a, "expireat", True, False)


def cmd_pexpireat(c: Client, a: list[bytes]) -> bytes:
    return _expire(c, a, "pexpireat", False, False)


def _expiry(c: Client, key: bytes) -> int | None:
    """The key's absolute expiry in ms, -1: none, None: no key."""
    reply = c.keyspace().call(key, "kv_describe")
    return reply["expire_at_ms"] if reply["found"] else None


def _ttl(c: Client, a: list[bytes], ms: bool) -> bytes:
    at = _expiry(c, a[1])
    if at is None:
        return p.integer(-2)
    if at == -1:
        return p.integer(-1)
    ttl = max(0, at - now_ms())
    return p.integer(ttl if ms else (ttl + 500) // 1000)


def cmd_ttl(c: Client, a: list[bytes]) -> bytes:
    return _ttl(c, a, False)


def cmd_pttl(c: Client, a: list[bytes]) -> bytes:
    return _ttl(c, a, True)


def _expiretime(c: Client, a: list[bytes], ms: bool) -> bytes:
    at = _expiry(c, a[1])
    if at is None:
        return p.integer(-2)
    if at == -1:
        return p.integer(-1)
    return p.integer(at if ms else at // 1000)


def cmd_expiretime(c: Client, a: list[bytes]) -> bytes:
    return _expiretime(c, a, False)


def cmd_pexpiretime(c: Client, a: list[bytes]) -> bytes:
    return _expiretime(c, a, True)


def cmd_persist(c: Client, a: list[bytes]) -> bytes:
    return p.integer(1 if c.keyspace().call(a[1], "kv_persist")["persisted"] else 0)


# ---- the table -------------------------------------------------------------------------------------

def _text(raw: bytes) -> str:
    """An argument in an error message, as C's %s prints it: up to its first NUL."""
    return raw.split(b"\0", 1)[0].decode("latin-1")


def _cmd(name: str, arity: int, handler: Handler | None, flags: tuple[str, ...] = (), keys: tuple[int, int, int]
         = (0, 0, 0), subcommands: dict[str, Command] | None = None) -> Command:
    return Command(name, arity, handler, flags, keys[0], keys[1], keys[2], subcommands or {})


_W, _R, _F = ("write",), ("readonly", "fast"), ("fast",)
_K1, _KALL, _K2 = (1, 1, 1), (1, -1, 1), (1, 2, 1)

COMMANDS: dict[str, Command] = {c.name: c for c in [
    _cmd("ping", -1, cmd_ping, _F), _cmd("echo", 2, cmd_echo, _F), _cmd("quit", -1, cmd_quit, ("no-auth",)),
    _cmd("select", 2, cmd_select, _F), _cmd("auth", -2, cmd_auth, ("no-auth", "fast")),
    _cmd("hello", -1, cmd_hello, ("no-auth", "fast")),
    _cmd("client", -2, None, subcommands={
        "id": _cmd("id", 2, client_id), "getname": _cmd("getname", 2, client_getname),
        "setname": _cmd("setname", 3, client_setname), "setinfo": _cmd("setinfo", 4, client_setinfo),
        "info": _cmd("info", 2, client_info), "list": _cmd("list", -2, client_list)}),
    _cmd("command", -1, cmd_command, subcommands={
        "count": _cmd("count", 2, command_count), "info": _cmd("info", -2, command_info)}),   # no DOCS: as with Redis 6, redis-cli then helps from its own table
    _cmd("config", -2, None, subcommands={
        "get": _cmd("get", -3, config_get), "resetstat": _cmd("resetstat", 2, config_resetstat)}),
    _cmd("info", -1, cmd_info), _cmd("dbsize", 1, cmd_dbsize, _R),
    _cmd("flushdb", -1, _flush, _W), _cmd("flushall", -1, _flush, _W),
    _cmd("get", 2, cmd_get, _R, _K1), _cmd("set", -3, cmd_set, _W, _K1), _cmd("getex", -2, cmd_getex, _W, _K1),
    _cmd("getdel", 2, cmd_getdel, _W, _K1), _cmd("getset", 3, cmd_getset, _W, _K1),
    _cmd("setnx", 3, cmd_setnx, _W, _K1), _cmd("setex", 4, cmd_setex, _W, _K1),
    _cmd("psetex", 4, cmd_psetex, _W, _K1), _cmd("mget", -2, cmd_mget, _R, _KALL),
    _cmd("mset", -3, cmd_mset, _W, (1, -1, 2)), _cmd("msetnx", -3, cmd_msetnx, _W, (1, -1, 2)),
    _cmd("append", 3, cmd_append, _W, _K1), _cmd("strlen", 2, cmd_strlen, _R, _K1),
    _cmd("setrange", 4, cmd_setrange, _W, _K1), _cmd("getrange", 4, cmd_getrange, ("readonly",), _K1),
    _cmd("incr", 2, cmd_incr, _W, _K1), _cmd("decr", 2, cmd_decr, _W, _K1),
    _cmd("incrby", 3, cmd_incrby, _W, _K1), _cmd("decrby", 3, cmd_decrby, _W, _K1),
    _cmd("incrbyfloat", 3, cmd_incrbyfloat, _W, _K1),
    _cmd("del", -2, cmd_del, _W, _KALL), _cmd("unlink", -2, cmd_del, _W, _KALL),
    _cmd("exists", -2, cmd_exists, _R, _KALL), _cmd("type", 2, cmd_type, _R, _K1),
    _cmd("keys", 2, cmd_keys, ("readonly",)), _cmd("scan", -2, cmd_scan, ("readonly",)),
    _cmd("randomkey", 1, cmd_randomkey, ("readonly",)),
    _cmd("rename", 3, cmd_rename, _W, _K2), _cmd("renamenx", 3, cmd_renamenx, _W, _K2),
    _cmd("copy", -3, cmd_copy, _W, _K2),
    _cmd("expire", -3, cmd_expire, _W, _K1), _cmd("pexpire", -3, cmd_pexpire, _W, _K1),
    _cmd("expireat", -3, cmd_expireat, _W, _K1), _cmd("pexpireat", -3, cmd_pexpireat, _W, _K1),
    _cmd("expiretime", 2, cmd_expiretime, _R, _K1), _cmd("pexpiretime", 2, cmd_pexpiretime, _R, _K1),
    _cmd("ttl", 2, cmd_ttl, _R, _K1), _cmd("pttl", 2, cmd_pttl, _R, _K1),
    _cmd("persist", 2, cmd_persist, _W, _K1),
]}


def unknown_command(args: list[bytes]) -> str:
    """Redis's text for a command it does not know: its name and its first arguments, 128
    characters of them at most."""
    listed = ""
    for arg in args[1:]:
        if len(listed) >= 128:
            break
        listed += f"'{_text(arg)[:128 - len(listed)]}' "
    return f"unknown command '{_text(args[0])[:128]}', with args beginning with: {listed}"


def _arity_ok(arity: int, argc: int) -> bool:
    return argc == arity if arity > 0 else argc >= -arity


def lookup(args: list[bytes]) -> tuple[Command | None, str | None]:
    """The command to run, or the error Redis gives before running any (unknown command,
    unknown subcommand, wrong number of arguments)."""
    name = args[0].lower().decode("latin-1")
    cmd = COMMANDS.get(name)
    if cmd is None:
        return None, unknown_command(args)
    if cmd.subcommands and len(args) >= 2:
        sub = cmd.subcommands.get(args[1].lower().decode("latin-1"))
        if sub is None:
            return None, f"unknown subcommand '{_text(args[1])[:128]}'. Try {cmd.name.upper()} HELP."
        if not _arity_ok(sub.arity, len(args)):
            return None, f"wrong number of arguments for '{cmd.name}|{sub.name}' command"
        return Command(f"{cmd.name}|{sub.name}", sub.arity, sub.handler, sub.flags), None
    if not _arity_ok(cmd.arity, len(args)):
        return None, f"wrong number of arguments for '{cmd.name}' command"
    return cmd, None


_client_ids = itertools.count(1)


def next_client_id() -> int:
    return next(_client_ids)


def execute(c: Client, args: list[bytes]) -> tuple[bytes | MgetReply | HeldValue, str]:
    """A command's reply (or an MGET's to stream), and the name it is counted under
    ("unknown": no such command)."""
    cmd, problem = lookup(args)
    if cmd is None:
        assert problem is not None
        return p.error(problem), ("unknown" if problem.startswith("unknown command") else
                                  args[0].lower().decode("latin-1", "replace")[:32])
    label = cmd.name
    if c.keys is None and "no-auth" not in cmd.flags:
        return p.error("-NOAUTH Authentication required."), label
    try:
        assert cmd.handler is not None
        return cmd.handler(c, args), label
    except RedisError as exc:
        return p.error(str(exc)), label
    except MemfabricError as exc:
        return error_reply(exc, c.front.server.limited_log), label
