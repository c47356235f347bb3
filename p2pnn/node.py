"""One node: its services wired together in one trio nursery.

Start-up order is the order of ``nursery.start`` calls below: the store
first (migrations), then the bus, the worker pool, the runner that feeds it,
the sweeper, the API, and -- in a swarm -- the swarm membership last (its
record advertises the API's address), so a node that has written its ready
file is ready to work.

Alone, a node holds every role for its whole life. In a swarm it starts with
none and holds what the principal assigns: every change goes through
:func:`on_assignment`, the one place where roles and the An a Ki belongs to
are applied.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import hypercorn.config
import hypercorn.trio
import trio

from p2pnn import identity, logs
from p2pnn.api.app import ApiContext, create_app
from p2pnn.api.auth import Authenticator
from p2pnn.bus import LocalBus
from p2pnn.compute.pool import KiPool
from p2pnn.config import Config
from p2pnn.control.swarm import OnAssignment, SwarmNode
from p2pnn.credential import SwarmCredential
from p2pnn.dispatch import KiRunner, Sweeper
from p2pnn.membership.records import capabilities
from p2pnn.metrics import Metrics
from p2pnn.roles import RoleHost
from p2pnn.service import TaskService
from p2pnn.store import StoreError, TaskStore, open_store
from p2pnn.tasks import Limits

log = logs.get(__name__)

GRACEFUL_HTTP_SECONDS = 2.0  # requests in flight at shutdown get this long to finish
READY_FILE = "node.json"  # pid, node id and API address of the running node, for launchers and scripts


@dataclass(frozen=True)
class NodeHandle:
    node_id: str
    api_url: str


@dataclass
class AnAttachment:
    """The An this node belongs to as a Ki (None: none, or this node is not a Ki).

    Written by on_assignment; the task transport reads it to know whose queue to consume.
    """

    an_id: str | None = None
    changed: trio.Event = field(default_factory=trio.Event)

    def set(self, an_id: str | None) -> None:
        if an_id != self.an_id:
            self.an_id = an_id
            self.changed.set()
            self.changed = trio.Event()


def make_on_assignment(roles: RoleHost, attachment: AnAttachment) -> OnAssignment:
    """The one callback through which a node applies a role assignment."""

    async def on_assignment(assigned: frozenset[str], an_id: str | None) -> None:
        await roles.assume(assigned)
        attachment.set(an_id)

    return on_assignment


def swarm_credential(config: Config) -> SwarmCredential:
    """The swarm's name and join secret. Error handling: IdentityError when the secret file is missing or short."""
    return SwarmCredential(config.swarm.name, identity.read_secret(Path(config.swarm.secret_file).expanduser()))


def lone_cluster(node_id: str, api_url: str, roles: RoleHost, load: dict[str, int]) -> tuple[dict, list[dict]]:
    """/cluster and /nodes of a node that is not in a swarm: it is its own principal, in no term."""
    mine = sorted(roles.roles)
    cluster = {"swarm": None, "node_id": node_id, "principal": node_id, "term": 0, "lease_expires_at": None,
               "leading": True, "roles": {node_id: {"roles": mine, "an": None}}}
    node = {"id": node_id, "addresses": {"api": api_url}, "roles": mine, "an": None, "prefers": "auto", "priority": 0,
            "capabilities": capabilities(), "load": load, "term": 0, "last_seen": time.time(), "healthy": True}
    return cluster, [node]


def limits_of(config: Config) -> Limits:
    c = config.compute
    return Limits(
        max_epochs=c.max_epochs, max_wall_seconds=c.max_wall_seconds,
        max_tensor_elements=c.max_tensor_elements, max_samples=c.max_samples,
    )


def store_of(config: Config) -> TaskStore:
    s = config.store
    return open_store(
        s.backend,
        sqlite_path=Path(s.path).expanduser() if s.path else config.data_dir / "p2pnn.sqlite3",
        url=s.url or None, schema=s.schema, pool_size=s.pool_size, sqlite_synchronous=s.sqlite_synchronous,
    )


def _write_ready_file(data_dir: Path, info: dict[str, Any]) -> None:
    # Written whole and renamed into place, so a reader never sees half a file.
    tmp = data_dir / f".{READY_FILE}.tmp"
    tmp.write_text(json.dumps(info))
    tmp.replace(data_dir / READY_FILE)


def _public_url(bound: str) -> str:
    # hypercorn reports the wildcard address it bound; a client reaches it through loopback.
    return bound.replace("://0.0.0.0:", "://127.0.0.1:").replace("://[::]:", "://[::1]:")


async def run_node(config: Config, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Run one node until cancelled.

    Resource handling: on cancellation, running tasks are handed back to the
    store, worker processes are killed, the API stops and the store closes;
    nothing is left running. ``task_status.started`` gets a NodeHandle once
    the API accepts requests.

    Error handling: a key or store problem at start raises (IdentityError,
    StoreError) before anything listens.
    """
    made = identity.init_data_dir(config.data_dir)
    ident = identity.load_identity(config.data_dir)
    logs.bind(node=ident.node_id[:12])
    if made:
        log.info("node.initialised", data_dir=str(config.data_dir), created=",".join(made))
    authenticator = None if config.api.insecure else Authenticator.from_config(config)
    host = config.api.host
    if config.api.insecure:
        host = "127.0.0.1"
        log.warning("api.insecure", detail="authentication is OFF; the API listens on 127.0.0.1 only")

    cred = swarm_credential(config) if config.swarm_mode else None
    store = store_of(config)
    await store.open()
    try:
        metrics = Metrics()
        bus = LocalBus()
        workdir = config.data_dir / "work"
        workdir.mkdir(parents=True, exist_ok=True)
        pool = KiPool(
            slots=config.compute.slots, torch_threads=config.compute.torch_threads,
            limits=limits_of(config), workdir=workdir, preload_torch=config.compute.preload_torch,
        )
        runner = KiRunner(
            node_id=ident.node_id, store=store, bus=bus, pool=pool, metrics=metrics,
            lease_seconds=config.compute.lease_seconds,
        )
        service = TaskService(
            store, bus, limits=limits_of(config), max_attempts=config.compute.max_attempts,
            cancel_local=runner.cancel_local,
        )
        swarm: SwarmNode | None = None
        sweeper = Sweeper(
            store=store, publish=service.publish, metrics=metrics,
            interval=config.sweeper.interval_seconds, pending_after=config.sweeper.pending_after_seconds,
            republish_queued=True,
            fence=(lambda: swarm.election.current_fence() if swarm is not None else None) if cred else None,
        )
        roles = RoleHost({"principal": sweeper.run, "ki": runner.run})
        attachment = AnAttachment()
        api_url = ""

        def load() -> dict[str, int]:
            return {"slots": pool.slots, "free_slots": pool.free_slots}

        def cluster_view() -> tuple[dict, list[dict]]:
            if swarm is not None:
                return swarm.cluster(), swarm.nodes()
            return lone_cluster(ident.node_id, api_url, roles, load())

        async def ready() -> tuple[bool, dict[str, Any]]:
            try:
                version = await store.schema_version()
            except StoreError as exc:
                return False, {"store": f"unreachable: {exc}"}
            metrics.free_slots.set(pool.free_slots)
            metrics.queue_depth.set(bus.depth())
            return True, {"store": "ok", "schema_version": version, "slots": pool.slots, "free_slots": pool.free_slots}

        app = create_app(ApiContext(
            service=service, metrics=metrics, authenticator=authenticator, node_id=ident.node_id,
            max_body_bytes=config.api.max_body_bytes, ready=ready, cluster=cluster_view,
        ))
        hconf = hypercorn.config.Config()
        hconf.bind = [f"[{host}]:{config.api.port}" if ":" in host else f"{host}:{config.api.port}"]
        hconf.graceful_timeout = GRACEFUL_HTTP_SECONDS
        hconf.accesslog = None
        hconf.loglevel = "WARNING"  # hypercorn's start-up banner would bypass our event format
        hconf.max_app_queue_size = 100

        async with trio.open_nursery() as nursery:
            await nursery.start(bus.run)
            await nursery.start(pool.run)
            await nursery.start(roles.run)
            if cred is None:
                # Alone, a node holds every role: it sweeps, dispatches (trivially) and works.
                await roles.assume({"principal", "an", "ki"})
            bound = await nursery.start(partial(hypercorn.trio.serve, app, hconf, shutdown_trigger=trio.sleep_forever))
            url = api_url = _public_url(bound[0]) if bound else f"http://{host}:{config.api.port}"
            if cred is not None:
                swarm = SwarmNode(
                    config=config, ident=ident, cred=cred, store=store,
                    on_assignment=make_on_assignment(roles, attachment), load=load, api_url=url,
                )
                await nursery.start(swarm.run)
            log.info("node.ready", api=url, node_id=ident.node_id, store=config.store.backend, slots=pool.slots,
                     roles=",".join(sorted(roles.roles)), insecure=config.api.insecure)
            info: dict[str, Any] = {"pid": os.getpid(), "node_id": ident.node_id, "api": url}
            if swarm is not None:
                info.update(dht=f"{swarm.host}:{swarm.view.dht_port}", peer=f"ws://{swarm.host}:{swarm.peer_port}")
            _write_ready_file(config.data_dir, info)
            task_status.started(NodeHandle(node_id=ident.node_id, api_url=url))
    finally:
        (config.data_dir / READY_FILE).unlink(missing_ok=True)
        with trio.CancelScope(shield=True):
            await store.close()
        log.info("node.stopped")
