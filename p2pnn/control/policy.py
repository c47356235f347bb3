"""Role policy: who is An, who is Ki, and which An each Ki belongs to. A pure function, tested alone.

The policy, in order:

1. The principal holds ``principal``. Alone, it also holds ``an`` and ``ki``
   (a swarm of one must still run tasks); otherwise it does no task work, so
   a long training run can never delay its heartbeats or its lease.
2. With one other node, that node holds ``an`` and ``ki`` (it dispatches to itself).
3. With k >= 2 other nodes, ceil(k / (ki_per_an + 1)) of them are An (at
   least one, and at least one Ki is left); the rest are Ki.
4. An are chosen, in this order of preference: nodes started as
   ``p2pnn-node an``; nodes not started as ``ki``; nodes without a GPU (GPU
   nodes are kept as Ki); nodes that already were An (no churn); node id.
5. Each Ki keeps its An when that An still is one and has room (at most
   ceil(Ki / An) each); the others go to the An with the fewest Ki.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from p2pnn.store import Assignment


@dataclass(frozen=True)
class Candidate:
    node_id: str
    prefers: str  # auto | principal | an | ki
    has_gpu: bool


def assign_roles(
    principal: str, members: list[Candidate], *, ki_per_an: int, previous: dict[str, Assignment] | None = None
) -> dict[str, Assignment]:
    previous = previous or {}
    others = sorted((m for m in members if m.node_id != principal), key=lambda m: m.node_id)
    if not others:
        return {principal: Assignment(("an", "ki", "principal"), principal)}
    out = {principal: Assignment(("principal",), None)}
    if len(others) == 1:
        out[others[0].node_id] = Assignment(("an", "ki"), others[0].node_id)
        return out

    def was_an(m: Candidate) -> bool:
        return "an" in previous.get(m.node_id, Assignment((), None)).roles

    n_an = min(len(others) - 1, max(1, math.ceil(len(others) / (ki_per_an + 1))))
    ranked = sorted(others, key=lambda m: (m.prefers != "an", m.prefers == "ki", m.has_gpu, not was_an(m), m.node_id))
    ans = sorted(m.node_id for m in ranked[:n_an])
    kis = [m.node_id for m in others if m.node_id not in ans]
    cap = math.ceil(len(kis) / len(ans))
    load = {an: 0 for an in ans}
    attach: dict[str, str] = {}
    for ki in kis:  # keep what still fits first
        before = previous.get(ki)
        if before is not None and before.an_id in load and load[before.an_id] < cap:
            attach[ki] = before.an_id
            load[before.an_id] += 1
    for ki in kis:
        if ki not in attach:
            an = min(ans, key=lambda a: (load[a], a))
            attach[ki] = an
            load[an] += 1
    for an in ans:
        out[an] = Assignment(("an",), None)
    for ki in kis:
        out[ki] = Assignment(("ki",), attach[ki])
    return out
