"""Beyond one process: engine replicas on Ray behind a router (``loom serve --replicas N``).

``ClusterClient`` (in ``loom.cluster.client``, which imports Ray) is an ``EngineClient``; the
router and its policies (``loom.cluster.router``) know nothing of Ray."""

from loom.cluster.config import ClusterConfig
from loom.cluster.router import ROUTERS, Router, RouterPolicy, make_router

__all__ = ["ROUTERS", "ClusterConfig", "Router", "RouterPolicy", "make_router"]
