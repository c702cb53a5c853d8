"""Small value types of the public API."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from ..bigmemory.placement import POLICIES
from ..errors import InvalidArgument
from .arguments import as_int


class OperatorCode(IntEnum):
    """What a gather does with its inputs: CONCAT appends them; the others reduce them
    element-wise over a dtype (all inputs of one length)."""
    CONCAT = 0
    SUM = 1
    MIN = 2
    MAX = 3
    PROD = 4


@dataclass(frozen=True)
class Affinity:
    """Where an allocation's bytes go.

    `policy`: "local" (this client's server, else the whole object on the roomiest other
    one), "server" (on `server_id` or OUT_OF_MEMORY: a requirement, not a preference), or
    "spread" (striped over every live server of the pool: objects larger than one server).
    `server_id`: an integer (numpy's too), with policy "server" and only with it.
    Raises INVALID_ARGUMENT for any other policy or a server_id that does not fit it.
    """
    policy: str = "local"
    server_id: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.policy, str) or self.policy not in POLICIES:
            raise InvalidArgument(f"affinity policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.server_id is not None:
            # Frozen: the plain int replaces whatever integer type it came as.
            object.__setattr__(self, "server_id", as_int(self.server_id, "server_id"))
        if (self.policy == "server") != (self.server_id is not None):
            raise InvalidArgument("server_id goes with policy 'server', and only with it")


def affinity_of(value: object) -> Affinity:
    """An alloc's affinity argument: None (local), an Affinity, or a policy's name as
    shorthand for Affinity(name) ("spread", "local"; "server" needs its server_id)."""
    if value is None:
        return _LOCAL
    if isinstance(value, Affinity):
        return value
    if isinstance(value, str):
        return Affinity(value)
    raise InvalidArgument(f"affinity must be an Affinity, a policy name ({', '.join(POLICIES)}) or None, "
                          f"got {type(value).__name__}")


_LOCAL = Affinity()


@dataclass(frozen=True)
class NamespaceInfo:
    """One namespace as `Session.namespaces()` lists it: its `pool` and name (`ns`), its
    `attribute`, and its objects' count (`object_count`) and bytes (`used_bytes`) over every
    live server; and its keyspace's (MemKV) figures, 0 without one: `kv_keys`, `kv_bytes`,
    `kv_hits`, `kv_misses`, `kv_evictions`, `kv_expired`; and its plogs' (MemPlog), 0 without:
    `plogs`, `plogs_sealed`, `plog_records`, `plog_bytes` (committed)."""
    pool: str
    ns: str
    attribute: int
    object_count: int
    used_bytes: int
    kv_keys: int = 0
    kv_bytes: int = 0
    kv_hits: int = 0
    kv_misses: int = 0
    kv_evictions: int = 0
    kv_expired: int = 0
    plogs: int = 0
    plogs_sealed: int = 0
    plog_records: int = 0
    plog_bytes: int = 0


@dataclass(frozen=True)
class ObjectInfo:
    """One object as `Namespace.objects()` lists it: its id (`bm_id`), its `size` in bytes,
    its `home` server's id (the home keeps its metadata; its bytes may be elsewhere too) and
    its age in seconds (`age_s`: since it was allocated, by its home server's clock)."""
    bm_id: str
    size: int
    home: int
    age_s: float
