"""One node: its services wired together in one trio nursery.

Start-up order is the order of ``nursery.start`` calls below: the store
first (migrations), then the bus, the worker pool, the roles' services
(sweeper, An dispatcher, Ki runner), the API, and -- in a swarm -- the
swarm membership last (its record advertises the API's address), so a node
that has written its ready file is ready to work.

Where roles come from:
- alone (no swarm configured, in-process queue): every role, for its whole life;
- ``bus.backend = "amqp"`` without a swarm: the role ``node.role`` names
  (every role on ``auto``), for its whole life;
- in a swarm (``swarm.name``): none at first, then what the principal
  assigns. Every change goes through the callback of
  :func:`make_on_assignment`, the one place where roles and the An a Ki
  belongs to are applied.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from collections.abc import Awaitable
from typing import Any, Callable

import hypercorn.config
import hypercorn.trio
import trio

from p2pnn import identity, logs
from p2pnn.api.app import ApiContext, create_app
from p2pnn.api.auth import Authenticator
from p2pnn.bus import SHORT, TASKS, LocalBus, TaskBus, ki_queue
from p2pnn.compute.pool import DEFAULT_RENDEZVOUS_HOST, KiPool
from p2pnn.config import Config, ConfigError
from p2pnn.control.swarm import OnAssignment, SwarmNode
from p2pnn.credential import SwarmCredential
from p2pnn.membership.records import capabilities
from p2pnn.metrics import Metrics
from p2pnn.service import TaskService
from p2pnn.store import Fence, StoreError, StoreUnreachable, TaskStore, open_store
from p2pnn.tasks import Limits
from p2pnn.work import ROLES, Dispatcher, KiAgent, KiRunner, RoleHost, Sweeper

log = logs.get(__name__)

GRACEFUL_HTTP_SECONDS = 2.0  # requests in flight at shutdown get this long to finish
READY_FILE = "node.json"  # pid, node id and API address of the running node, for launchers and scripts
STANDBY_FACTOR = 5  # a standby sweeper runs this many times less often than the principal's
READY_STORE_SECONDS = 2.0  # /ready waits this long for the store before answering 503
OPEN_RETRY_FIRST = 0.5  # seconds before the first new try to reach the store at start; doubles
OPEN_RETRY_MAX = 15.0  # no pause between tries longer than this


@dataclass(frozen=True)
class NodeHandle:
    node_id: str
    api_url: str


def make_on_assignment(roles: RoleHost, attach: Callable[[str | None], None]) -> OnAssignment:
    """The one callback through which a node applies a role assignment.

    ``attach`` tells the Ki side which An it works for (KiAgent.attach on
    RabbitMQ; on the in-process queue there is no An to attach to).
    """

    async def on_assignment(assigned: frozenset[str], an_id: str | None) -> None:
        await roles.assume(assigned)
        attach(an_id if "ki" in assigned else None)

    return on_assignment


def swarm_credential(config: Config) -> SwarmCredential:
    """The swarm's name and join secret. Error handling: IdentityError when the secret file is missing or short."""
    return SwarmCredential(config.swarm.name, identity.read_swarm_secret(config.swarm.secret_file))


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
        connect_timeout=s.connect_timeout_seconds, statement_timeout=s.statement_timeout_seconds,
    )


def bus_of(config: Config, metrics: Metrics, node_id: str) -> TaskBus:
    b = config.bus
    if b.backend == "local":
        return LocalBus()
    from urllib.parse import quote

    from p2pnn.bus.amqp import AmqpBus, AmqpSettings

    url = b.url
    if not url:
        password = _read_password(b.password_file) if b.password_file else "guest"
        scheme = "amqps" if b.tls_ca_file else "amqp"
        url = f"{scheme}://{quote(b.user, safe='')}:{quote(password, safe='')}@{b.host}:{b.port}/{quote(b.vhost, safe='')}"
    settings = AmqpSettings(
        url=url, prefix=b.prefix, heartbeat=b.heartbeat_seconds, blocked_timeout=b.blocked_timeout_seconds,
        tls_ca_file=b.tls_ca_file, queue_type=b.queue_type, short_queue_type=b.short_queue_type,
        ki_message_ttl=b.ki_message_ttl_seconds,
        ki_queue_expires=b.ki_queue_expires_seconds, delivery_limit=b.delivery_limit,
        connect_name=f"p2pnn-node {node_id[:12]}",
    )
    return AmqpBus(
        settings,
        on_redelivery=lambda queue: metrics.redeliveries.labels(queue=queue).inc(),
        on_malformed=lambda source: metrics.malformed_messages.labels(source=source).inc(),
    )


def _read_password(path: str) -> str:
    try:
        lines = Path(path).expanduser().read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"bus.password_file: cannot read {path}: {exc.strerror}") from None
    if not lines or not lines[0]:
        raise ConfigError(f"bus.password_file: {path} is empty")
    return lines[0]


def roles_of(config: Config) -> set[str]:
    """The roles a node starts with: none in a swarm (the principal assigns them), every role
    alone or on ``auto``, else the configured one."""
    if config.swarm_mode:
        return set()
    if config.bus.backend == "local" or config.node.role == "auto":
        return set(ROLES)
    return {config.node.role}


async def open_store_patiently(store: TaskStore, *, give_up_after: float) -> None:
    """Open the store, trying again with back-off while it is unreachable.

    Error handling: a store still unreachable after ``give_up_after`` seconds
    raises StoreUnreachable (the CLI exits 75, which the systemd unit
    restarts); any other StoreError (a schema newer than this code, a SQLite
    file that cannot be opened) raises at once (exit 2).
    """
    deadline = trio.current_time() + give_up_after
    pause = OPEN_RETRY_FIRST
    while True:
        try:
            await store.open()
            return
        except StoreUnreachable as exc:
            left = deadline - trio.current_time()
            if left <= 0:
                raise StoreUnreachable(f"{exc} (still unreachable after {give_up_after:g} s)") from exc
            log.warning("store.unreachable", error=str(exc), retry_in=round(min(pause, left), 2))
            await trio.sleep(min(pause, left))
            pause = min(pause * 2, OPEN_RETRY_MAX)


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
    StoreError) before anything listens; an unreachable store is retried for
    ``store.unreachable_exit_seconds`` first (then StoreUnreachable). Once
    running, store and broker faults are retried by each service and never
    end the node.
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
    await open_store_patiently(store, give_up_after=config.store.unreachable_exit_seconds)
    try:
        metrics = Metrics()
        bus = bus_of(config, metrics, ident.node_id)
        fanout = config.bus.backend != "local"  # tasks travel between nodes over RabbitMQ
        direct_short = fanout and config.bus.direct_short  # short tasks skip the An: API -> short queue -> Ki
        initial_roles = roles_of(config)
        workdir = config.data_dir / "work"
        workdir.mkdir(parents=True, exist_ok=True)
        pool = KiPool(
            slots=config.compute.slots if "ki" in initial_roles or cred else 0, torch_threads=config.compute.torch_threads,
            limits=limits_of(config), workdir=workdir, preload_torch=config.compute.preload_torch,
            # Groups meet on the address other nodes reach this one at; a lone node keeps them on loopback.
            rendezvous_host=config.swarm.advertise_host or DEFAULT_RENDEZVOUS_HOST,
            rendezvous_ports=range(
                config.compute.rendezvous_port_first,
                min(65536, config.compute.rendezvous_port_first + config.compute.rendezvous_port_count),
            ),
            rendezvous_timeout=config.compute.rendezvous_timeout_seconds,
        )
        runner = KiRunner(
            node_id=ident.node_id, store=store, bus=bus, pool=pool, metrics=metrics,
            lease_seconds=config.compute.lease_seconds, queue=ki_queue(ident.node_id) if fanout else TASKS,
            # What an An may forward beyond free slots is taken and claimed ahead (a Ki's own queue only).
            take_ahead=math.ceil(pool.slots * config.bus.forward_ahead) if fanout else 0,
            short_queue=SHORT if direct_short else None,
        )
        service = TaskService(
            store, bus, limits=limits_of(config), max_attempts=config.compute.max_attempts,
            cancel_local=runner.cancel_local, direct_short=direct_short,
        )
        runner.on_finished = service.finished  # wakes long polls on this node at once
        swarm: SwarmNode | None = None
        sweeping = dict(
            store=store, publish=service.publish, metrics=metrics, pending_after=config.sweeper.pending_after_seconds,
            queued_after=config.sweeper.queued_after_seconds if fanout else 0.0,
            stranded_after=config.sweeper.stranded_after_seconds,
        )
        async def fenced(write: Callable[[Fence], Awaitable[Any]]) -> Any:
            return await swarm.election.fenced(write) if swarm is not None else None

        # A lone node's queue forgets on restart, so it re-publishes every queued task at start.
        # In a swarm, sweeping is a principal's action, fenced by its term.
        sweeper = Sweeper(
            interval=config.sweeper.interval_seconds, republish_queued=not fanout,
            fenced=fenced if cred else None, **sweeping,
        )
        services: dict[str, Any] = {"principal": sweeper.run, "ki": runner.run}
        attach: Callable[[str | None], None] = lambda an_id: None
        if fanout:
            agent = KiAgent(runner=runner, bus=bus, beat_interval=config.bus.beat_interval_seconds)
            dispatcher = Dispatcher(
                node_id=ident.node_id, store=store, bus=bus, metrics=metrics, prefetch=config.bus.prefetch,
                beat_timeout=config.bus.beat_timeout_seconds, ki_message_ttl=config.bus.ki_message_ttl_seconds,
                forward_ahead=config.bus.forward_ahead, forward_ahead_age=config.bus.forward_ahead_age_seconds,
                park_fail_seconds=config.bus.park_fail_seconds, direct_short=direct_short,
            )
            services.update(ki=agent.run, an=dispatcher.run)
            attach = agent.attach
        elif cred is not None:
            log.warning("swarm.local_queue", detail="bus.backend is local: a task runs only on the node that took it")
        roles = RoleHost(services)
        api_url = ""

        def load() -> dict[str, int]:
            return {"slots": pool.slots, "free_slots": pool.free_slots}

        def cluster_view() -> tuple[dict, list[dict]]:
            if swarm is not None:
                return swarm.cluster(), swarm.nodes()
            return lone_cluster(ident.node_id, api_url, roles, load())

        async def ready() -> tuple[bool, dict[str, Any]]:
            version = None
            with trio.move_on_after(READY_STORE_SECONDS):  # a silent store makes /ready say so, not hang
                try:
                    version = await store.schema_version()
                except StoreError as exc:
                    return False, {"store": f"unreachable: {exc}"}
            if version is None:
                return False, {"store": f"unreachable: no answer within {READY_STORE_SECONDS:g} s"}
            metrics.free_slots.set(pool.free_slots)
            metrics.queue_depth.set(bus.depth(runner.queue))
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

        # The bus outlives every other service: at shutdown a Ki hands its running tasks back and
        # publishes them again, which needs the bus. Its scope is shielded from the node's own
        # cancellation and cancelled once everything else has stopped.
        bus_scope = trio.CancelScope(shield=True)

        async def run_bus(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            with bus_scope:
                await bus.run(task_status=task_status)

        async with trio.open_nursery() as infra:
            await infra.start(run_bus)
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(pool.run)
                    await nursery.start(roles.run)
                    # Alone, a node holds every role: it sweeps, dispatches (trivially) and works. With roles
                    # from configuration it holds its configured one; in a swarm it waits for the principal.
                    await roles.assume(initial_roles)
                    # Results recorded by Ki on other nodes wake long polls here: the store announces them
                    # where it can, and Ki name them in their beats.
                    await nursery.start(service.follow)
                    if fanout and cred is None and config.sweeper.standby:
                        # Roles from configuration: nobody replaces a dead principal, so every node sweeps a little.
                        standby = Sweeper(
                            interval=config.sweeper.interval_seconds * STANDBY_FACTOR, republish_queued=False,
                            active=lambda: "principal" not in roles.roles, **sweeping,
                        )
                        nursery.start_soon(standby.run)
                    bound = await nursery.start(partial(hypercorn.trio.serve, app, hconf, shutdown_trigger=trio.sleep_forever))
                    url = api_url = _public_url(bound[0]) if bound else f"http://{host}:{config.api.port}"
                    if cred is not None:
                        swarm = SwarmNode(
                            config=config, ident=ident, cred=cred, store=store,
                            on_assignment=make_on_assignment(roles, attach), load=load, api_url=url,
                        )
                        await nursery.start(swarm.run)
                        if authenticator is not None:  # swarm tokens are revoked through the store's deny list
                            fetch = lambda now: store.revoked_tokens(now=now)  # noqa: E731
                            nursery.start_soon(authenticator.follow_revocations, fetch, config.auth.revocation_refresh_seconds)
                    log.info("node.ready", api=url, node_id=ident.node_id, store=config.store.backend, bus=config.bus.backend,
                             slots=pool.slots,
                             roles=",".join(sorted(roles.roles)), insecure=config.api.insecure)
                    info: dict[str, Any] = {"pid": os.getpid(), "node_id": ident.node_id, "api": url}
                    if swarm is not None:
                        info.update(dht=f"{swarm.host}:{swarm.view.dht_port}", peer=f"ws://{swarm.host}:{swarm.peer_port}")
                    _write_ready_file(config.data_dir, info)
                    task_status.started(NodeHandle(node_id=ident.node_id, api_url=url))
            finally:
                bus_scope.cancel()
    finally:
        (config.data_dir / READY_FILE).unlink(missing_ok=True)
        with trio.CancelScope(shield=True):
            await store.close()
        log.info("node.stopped")
