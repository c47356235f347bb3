"""Prometheus metrics of one node, in a registry of its own (several nodes may share a process in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from p2pnn.tasks import State

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Tasks range from a millisecond echo to hour-long training runs.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, float("inf"))


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.tasks = Gauge("p2pnn_tasks", "Tasks in the store by state and kind", ["state", "kind"], registry=r)
        self.task_duration = Histogram(
            "p2pnn_task_duration_seconds", "Run time of finished attempts on this node",
            ["kind", "state"], buckets=DURATION_BUCKETS, registry=r,
        )
        self.http_requests = Counter(
            "p2pnn_http_requests_total", "HTTP requests by route and status", ["method", "route", "status"], registry=r,
        )
        self.duplicates_dropped = Counter(
            "p2pnn_duplicate_results_total", "Terminal results refused because another attempt finished first", registry=r,
        )
        self.lease_expiries = Counter("p2pnn_lease_expiries_total", "Running tasks whose lease lapsed", registry=r)
        self.worker_crashes = Counter("p2pnn_worker_crashes_total", "Worker processes that died mid-task", registry=r)
        self.republished = Counter("p2pnn_tasks_republished_total", "Tasks re-published by the sweeper", registry=r)
        self.dispatched = Counter("p2pnn_tasks_dispatched_total", "Tasks started on this node's workers", ["kind"], registry=r)
        self.queue_depth = Gauge("p2pnn_queue_depth", "Messages waiting on this node's task queue", registry=r)
        self.free_slots = Gauge("p2pnn_free_slots", "Idle worker slots on this node", registry=r)
        # Fan-out over the bus (swarm).
        self.an_queue_depth = Gauge(
            "p2pnn_an_queue_depth", "Tasks waiting for this An: on the shared queue plus held unplaced", ["an"], registry=r,
        )
        self.forwarded = Counter("p2pnn_an_forwarded_total", "Tasks this An forwarded, by Ki", ["ki"], registry=r)
        self.redeliveries = Counter(
            "p2pnn_bus_redeliveries_total", "Messages the broker delivered again (a consumer died or gave them back)",
            ["queue"], registry=r,
        )
        self.stale_deliveries = Counter(
            "p2pnn_stale_deliveries_total", "Deliveries whose task was already taken, finished or cancelled", registry=r,
        )
        # Reliability: what went wrong and was survived.
        self.transient_faults = Counter(
            "p2pnn_transient_faults_total", "Store or broker calls that failed and were retried or deferred",
            ["component", "operation"], registry=r,
        )
        self.handed_back = Counter(
            "p2pnn_tasks_handed_back_total", "Running tasks this node gave back (role change, shutdown)", registry=r,
        )
        self.stranded = Counter(
            "p2pnn_tasks_stranded_total", "Queued tasks with no message on its way that the sweeper published again",
            registry=r,
        )
        self.malformed_messages = Counter(
            "p2pnn_malformed_messages_total", "Messages dropped because their body or headers made no sense",
            ["source"], registry=r,
        )
        self.parked = Gauge("p2pnn_an_parked_tasks", "Tasks this An holds because no live Ki can run them", registry=r)
        self.unplaceable = Counter(
            "p2pnn_an_unplaceable_total", "Tasks failed because no live Ki could run them for an_park_fail_seconds",
            registry=r,
        )
        self.kis_seen = Gauge("p2pnn_an_kis", "Ki whose beats this An currently receives", registry=r)

    def set_task_counts(self, counts: dict[tuple[str, str], int]) -> None:
        self.tasks.clear()
        for (state, kind), n in counts.items():
            self.tasks.labels(state=state, kind=kind).set(n)
        # Zero rows keep every state visible to a dashboard from the first scrape.
        for state in State:
            for kind in {k for _, k in counts} or {"echo"}:
                self.tasks.labels(state=state.value, kind=kind).inc(0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
