"""Cluster service backends behind one interface (see base.py)."""

from __future__ import annotations

from typing import Any

from ..errors import InvalidArgument
from .base import ClusterService, ServerRecord

BACKENDS = ("embedded", "etcd")


def open_cluster(backend: str, **settings: Any) -> ClusterService:
    """The one place that turns configuration into a cluster service."""
    if backend == "embedded":
        from .embedded import EmbeddedCluster
        return EmbeddedCluster(settings["path"], settings.get("liveness_timeout_s", 3.0))
    if backend == "etcd":
        from .etcd import EtcdCluster
        return EtcdCluster(settings["endpoints"], settings.get("liveness_timeout_s", 3.0),
                           settings.get("prefix") or "/memfabric")
    raise InvalidArgument(f"cluster backend {backend!r} is not available; choose one of {BACKENDS}")


__all__ = ["BACKENDS", "ClusterService", "ServerRecord", "open_cluster"]
