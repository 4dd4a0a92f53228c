"""``/admin`` routes of a cluster server: replicas, drain and resume (migration moves the requests)."""

from __future__ import annotations

import dataclasses
from typing import Any

from fastapi import APIRouter

from loom.cluster.client import ClusterClient
from loom.server.errors import APIError


def admin_routes(client: ClusterClient) -> APIRouter:
    router = APIRouter(prefix="/admin")

    def _check(replica: int) -> None:
        if not 0 <= replica < len(client.replica_snapshots()):
            raise APIError(404, f"no replica {replica} (there are {len(client.replica_snapshots())}: 0.."
                                f"{len(client.replica_snapshots()) - 1})", param="replica")

    @router.get("/replicas")
    async def replicas() -> dict[str, Any]:
        roles = client.cluster
        return {"replicas": [{"replica": s.index, "up": s.up, "draining": s.draining, "restarts": s.restarts,
                              "role": "prefill" if s.index in range(roles.prefill_replicas) else
                              ("decode" if roles.disaggregated else "both"),
                              "requests_routed": s.routed, "requests_in_flight": s.in_flight}
                             for s in client.replica_snapshots()]}

    @router.post("/drain/{replica}")
    async def drain(replica: int) -> dict[str, Any]:
        """Stop routing to the replica and migrate its running requests to the others."""
        _check(replica)
        records = await client.drain(replica)
        return {"replica": replica, "migrated": [dataclasses.asdict(r) for r in records]}

    @router.post("/resume/{replica}")
    async def resume(replica: int) -> dict[str, Any]:
        _check(replica)
        await client.resume(replica)
        return {"replica": replica, "draining": False}

    return router
