"""Small value types of the public API."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from ..bigmemory.placement import POLICIES
from ..errors import InvalidArgument


class OperatorCode(IntEnum):
    """What BM_GatherSec does with its inputs. Reductions are element-wise over a dtype."""
    CONCAT = 0
    SUM = 1
    MIN = 2
    MAX = 3
    PROD = 4


@dataclass(frozen=True)
class Affinity:
    """Placement: `local` (this client's server first), `server` (server_id), `spread` (all servers)."""
    policy: str = "local"
    server_id: int | None = None

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise InvalidArgument(f"affinity policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if (self.policy == "server") != (self.server_id is not None):
            raise InvalidArgument("server_id goes with policy 'server', and only with it")


@dataclass(frozen=True)
class NamespaceInfo:
    pool: str
    ns: str
    attribute: int
    object_count: int
    used_bytes: int
