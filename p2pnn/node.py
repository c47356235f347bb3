"""One node: its services wired together in one trio nursery.

Start-up order is the order of ``nursery.start`` calls below: the store
first (migrations), then the bus, the worker pool, the roles' services
(sweeper, An dispatcher, Ki runner), and last the API, so a node that
answers HTTP is ready to work.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import hypercorn.config
import hypercorn.trio
import trio

from p2pnn import identity, logs
from p2pnn.api.app import ApiContext, create_app
from p2pnn.api.auth import Authenticator
from p2pnn.bus import TASKS, LocalBus, TaskBus, ki_queue
from p2pnn.compute.pool import KiPool
from p2pnn.config import Config, ConfigError
from p2pnn.dispatch import KiRunner, Sweeper
from p2pnn.metrics import Metrics
from p2pnn.roles import ROLES, RoleHost
from p2pnn.scheduling import Dispatcher, KiAgent
from p2pnn.service import TaskService
from p2pnn.store import StoreError, TaskStore, open_store
from p2pnn.tasks import Limits

log = logs.get(__name__)

GRACEFUL_HTTP_SECONDS = 2.0  # requests in flight at shutdown get this long to finish
READY_FILE = "node.json"  # pid, node id and API address of the running node, for launchers and scripts
STANDBY_FACTOR = 5  # a standby sweeper runs this many times less often than the principal's


@dataclass(frozen=True)
class NodeHandle:
    node_id: str
    api_url: str


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
        tls_ca_file=b.tls_ca_file, queue_type=b.queue_type, ki_message_ttl=b.ki_message_ttl_seconds,
        ki_queue_expires=b.ki_queue_expires_seconds, delivery_limit=b.delivery_limit,
        connect_name=f"p2pnn-node {node_id[:12]}",
    )
    return AmqpBus(settings, on_redelivery=lambda queue: metrics.redeliveries.labels(queue=queue).inc())


def _read_password(path: str) -> str:
    try:
        lines = Path(path).expanduser().read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"bus.password_file: cannot read {path}: {exc.strerror}") from None
    if not lines or not lines[0]:
        raise ConfigError(f"bus.password_file: {path} is empty")
    return lines[0]


def roles_of(config: Config) -> set[str]:
    """The roles a node starts with: every role alone or on ``auto``, else the configured one."""
    if config.bus.backend == "local" or config.node.role == "auto":
        return set(ROLES)
    return {config.node.role}


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

    store = store_of(config)
    await store.open()
    try:
        metrics = Metrics()
        bus = bus_of(config, metrics, ident.node_id)
        swarm = config.bus.backend != "local"
        initial_roles = roles_of(config)
        workdir = config.data_dir / "work"
        workdir.mkdir(parents=True, exist_ok=True)
        pool = KiPool(
            slots=config.compute.slots if "ki" in initial_roles else 0, torch_threads=config.compute.torch_threads,
            limits=limits_of(config), workdir=workdir, preload_torch=config.compute.preload_torch,
        )
        runner = KiRunner(
            node_id=ident.node_id, store=store, bus=bus, pool=pool, metrics=metrics,
            lease_seconds=config.compute.lease_seconds, queue=ki_queue(ident.node_id) if swarm else TASKS,
        )
        service = TaskService(
            store, bus, limits=limits_of(config), max_attempts=config.compute.max_attempts,
            cancel_local=runner.cancel_local,
        )
        sweeping = dict(
            store=store, publish=service.publish, metrics=metrics, pending_after=config.sweeper.pending_after_seconds,
            queued_after=config.sweeper.queued_after_seconds if swarm else 0.0,
        )
        # A lone node's queue forgets on restart, so it re-publishes every queued task at start.
        sweeper = Sweeper(interval=config.sweeper.interval_seconds, republish_queued=not swarm, **sweeping)
        services: dict[str, Any] = {"principal": sweeper.run, "ki": runner.run}
        if swarm:
            agent = KiAgent(runner=runner, bus=bus, beat_interval=config.bus.beat_interval_seconds)
            dispatcher = Dispatcher(
                node_id=ident.node_id, store=store, bus=bus, metrics=metrics, prefetch=config.bus.prefetch,
                beat_timeout=config.bus.beat_timeout_seconds, ki_message_ttl=config.bus.ki_message_ttl_seconds,
            )
            services.update(ki=agent.run, an=dispatcher.run)
            # For role assignment (the control plane): roles.assume({...}) and agent.attach(an_id).

        async def ready() -> tuple[bool, dict[str, Any]]:
            try:
                version = await store.schema_version()
            except StoreError as exc:
                return False, {"store": f"unreachable: {exc}"}
            metrics.free_slots.set(pool.free_slots)
            metrics.queue_depth.set(bus.depth(runner.queue))
            return True, {"store": "ok", "schema_version": version, "slots": pool.slots, "free_slots": pool.free_slots}

        app = create_app(ApiContext(
            service=service, metrics=metrics, authenticator=authenticator, node_id=ident.node_id,
            max_body_bytes=config.api.max_body_bytes, ready=ready,
        ))
        hconf = hypercorn.config.Config()
        hconf.bind = [f"[{host}]:{config.api.port}" if ":" in host else f"{host}:{config.api.port}"]
        hconf.graceful_timeout = GRACEFUL_HTTP_SECONDS
        hconf.accesslog = None
        hconf.loglevel = "WARNING"  # hypercorn's start-up banner would bypass our event format
        hconf.max_app_queue_size = 100

        roles = RoleHost(services)
        async with trio.open_nursery() as nursery:
            await nursery.start(bus.run)
            await nursery.start(pool.run)
            await nursery.start(roles.run)
            # Alone, a node holds every role: it sweeps, dispatches (trivially) and works. In a swarm
            # the roles come from configuration until role assignment calls roles.assume().
            await roles.assume(initial_roles)
            if swarm and config.sweeper.standby:
                standby = Sweeper(
                    interval=config.sweeper.interval_seconds * STANDBY_FACTOR, republish_queued=False,
                    active=lambda: "principal" not in roles.roles, **sweeping,
                )
                nursery.start_soon(standby.run)
            bound = await nursery.start(partial(hypercorn.trio.serve, app, hconf, shutdown_trigger=trio.sleep_forever))
            url = _public_url(bound[0]) if bound else f"http://{host}:{config.api.port}"
            log.info("node.ready", api=url, node_id=ident.node_id, store=config.store.backend, bus=config.bus.backend,
                     slots=pool.slots,
                     roles=",".join(sorted(roles.roles)), insecure=config.api.insecure)
            _write_ready_file(config.data_dir, {"pid": os.getpid(), "node_id": ident.node_id, "api": url})
            task_status.started(NodeHandle(node_id=ident.node_id, api_url=url))
    finally:
        (config.data_dir / READY_FILE).unlink(missing_ok=True)
        with trio.CancelScope(shield=True):
            await store.close()
        log.info("node.stopped")
