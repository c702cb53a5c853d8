"""What a key, a value and a TTL may be, and where a key lives. Pure: no I/O, no clock (the
caller passes the time).

A key's homes are chosen by rendezvous (highest-random-weight) hashing over the live servers
of its namespace's pool: every server gets a score from the key and its id, the highest R
hold the key. Adding or losing a server moves only that server's share of the keys, and any
client that sees the same servers computes the same homes, with no table to share.
"""

from __future__ import annotations

import math
import operator

import numpy as np
import xxhash

from ..errors import InvalidArgument
from ..limits import MAX_KV_KEY_BYTES, MAX_KV_VALUE_BYTES, MAX_KV_REPLICAS
from .index import fix_hash

NO_EXPIRY = 0
# A kv_get_many reply's length for a key it carries no bytes for: missing; too large to ride
# along (get it alone); no room left in this reply (ask again).
MANY_MISSING, MANY_ALONE, MANY_AGAIN = -1, -2, -3


def check_key(key: object) -> bytes:
    """A key as bytes: bytes-like, or str (UTF-8); 1 to MAX_KV_KEY_BYTES bytes."""
    if isinstance(key, str):
        key = utf8(key, "a key")
    elif isinstance(key, (bytearray, memoryview)):
        key = bytes(key)
    if not isinstance(key, bytes):
        raise InvalidArgument(f"a key is bytes or str, got {type(key).__name__}")
    if not 0 < len(key) <= MAX_KV_KEY_BYTES:
        raise InvalidArgument(f"a key is 1 to {MAX_KV_KEY_BYTES} bytes, got {len(key)}")
    return key


def utf8(text: str, what: str) -> bytes:
    """A str as UTF-8; INVALID_ARGUMENT for one that has none (lone surrogates)."""
    try:
        return text.encode()
    except UnicodeEncodeError as exc:
        raise InvalidArgument(f"{what} given as str is stored as UTF-8, and {text[:20]!r} cannot be: "
                              f"{exc.reason}") from None


def check_value_length(length: int) -> int:
    if not 0 <= length <= MAX_KV_VALUE_BYTES:
        raise InvalidArgument(f"a value is 0 to {MAX_KV_VALUE_BYTES} bytes, got {length}")
    return length


def key_hash(key: bytes) -> int:
    """The key's hash in the index (never an empty or deleted slot's mark)."""
    return fix_hash(xxhash.xxh3_64_intdigest(key))


def homes(key: bytes, servers: list[int], replicas: int) -> list[int]:
    """The servers that hold `key`, best first: the `replicas` highest rendezvous scores."""
    scored = sorted(servers, key=lambda s: (xxhash.xxh3_64_intdigest(key, s), s), reverse=True)
    return scored[:replicas]


def check_replicas(replicas: object) -> int:
    if isinstance(replicas, (bool, np.bool_)):
        raise InvalidArgument(f"replicas is a whole number, not a bool ({replicas!r})")
    try:
        r = operator.index(replicas)
    except TypeError:
        raise InvalidArgument(f"replicas is a whole number, got {replicas!r}") from None
    if not 1 <= r <= MAX_KV_REPLICAS:
        raise InvalidArgument(f"replicas is 1 to {MAX_KV_REPLICAS}, got {r}")
    return r


MAX_TTL_S = 10 ** 12          # 31,000 years: within the wire's 64-bit ms, and clearly "no expiry" meant


def ttl_ms(ttl_s: object) -> int:
    """A TTL in seconds (any real number: int, float, numpy's, Fraction...) as whole ms, at
    least 1; INVALID_ARGUMENT for anything else (bools, NaN, infinities, <= 0, huge)."""
    if isinstance(ttl_s, (bool, np.bool_)) or not isinstance(ttl_s, (int, float)) and not hasattr(ttl_s, "__float__"):
        raise InvalidArgument(f"ttl_s is a number of seconds, got {ttl_s!r:.40}")
    try:
        ttl = float(ttl_s)       # an int past a float's range, a Decimal sNaN, an array: no number
    except (TypeError, ValueError, OverflowError, ArithmeticError):
        raise InvalidArgument(f"ttl_s is a number of seconds, got {ttl_s!r:.40}") from None
    if not (math.isfinite(ttl) and 0 < ttl <= MAX_TTL_S):
        raise InvalidArgument(f"ttl_s is a positive number of seconds, at most {MAX_TTL_S}, got {ttl_s!r:.40}")
    return max(1, round(ttl * 1000))


def expiry_ms(ttl_s: object, now_ms: int) -> int:
    """The absolute expiry (ms of the wall clock) of a TTL in seconds; None: never."""
    if ttl_s is None:
        return NO_EXPIRY
    return now_ms + ttl_ms(ttl_s)


def expired(expiry: int, now_ms: int) -> bool:
    return expiry != NO_EXPIRY and expiry <= now_ms


def ttl_left_s(expiry: int, now_ms: int) -> float:
    """As Redis's TTL, in seconds: -1.0 when the key never expires."""
    if expiry == NO_EXPIRY:
        return -1.0
    return max(0.0, (expiry - now_ms) / 1000)
