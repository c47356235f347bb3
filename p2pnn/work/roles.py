"""RoleHost: starts and stops the services of the roles a node holds.

A node holds any of the roles ``principal`` (lease sweeper, and later role
assignment), ``an`` (dispatcher) and ``ki`` (worker). The embedded default
holds all three for its whole life; in a swarm the principal's assignments
move a node between roles while it runs, so each role's service runs in a
cancel scope of its own and can be stopped without touching the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping

import trio

from p2pnn import logs

log = logs.get(__name__)

ROLES = ("principal", "an", "ki")

# A role's service: started with nursery.start semantics, runs until cancelled.
RoleService = Callable[..., Awaitable[Any]]


@dataclass
class _Running:
    scope: trio.CancelScope
    done: trio.Event = field(default_factory=trio.Event)


class RoleHost:
    """Resource handling: services run in the nursery given to ``run``; ``assume``
    returns once added roles have started and removed roles have fully stopped
    (a Ki hands its running tasks back before that)."""

    def __init__(self, services: Mapping[str, RoleService]) -> None:
        unknown = set(services) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown roles: {', '.join(sorted(unknown))}")
        self._services = dict(services)
        self._running: dict[str, _Running] = {}
        self._nursery: trio.Nursery | None = None
        self._lock = trio.Lock()

    @property
    def roles(self) -> frozenset[str]:
        return frozenset(self._running)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def assume(self, roles: set[str] | frozenset[str]) -> None:
        """Hold exactly ``roles`` from now on."""
        unknown = set(roles) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown roles: {', '.join(sorted(unknown))}")
        assert self._nursery is not None, "RoleHost.run must be started first"
        async with self._lock:
            for role in sorted(self.roles - set(roles)):
                running = self._running.pop(role)
                running.scope.cancel()
                await running.done.wait()
                log.info("role.stopped", role=role)
            for role in sorted(set(roles) - self.roles):
                if role in self._services:
                    self._running[role] = await self._nursery.start(self._supervise, role)
                else:  # a role with nothing to run on this node's transport (e.g. an on the local queue)
                    self._running[role] = _Running(trio.CancelScope())
                    self._running[role].done.set()
                log.info("role.started", role=role)

    async def _supervise(self, role: str, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        running = _Running(trio.CancelScope())
        try:
            with running.scope:
                async with trio.open_nursery() as nursery:
                    await nursery.start(self._services[role])
                    task_status.started(running)
        finally:
            running.done.set()
