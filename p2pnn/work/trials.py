"""Sweeps: a Ki runs a ``sweep`` task as the coordinator of its trials.

SweepRunner  creates the sweep's trials as train tasks of their own (``parent``
             is the sweep), keeps ``parallelism`` of them queued or running,
             stops the bad ones early by their per-epoch progress (median
             stopping rule), and ends with the trial table and the best trial.

The trials are ordinary tasks: the An places them, Ki run them, they retry
and resume from checkpoints like any train task. The coordinator holds only
the sweep's lease and keeps no state of its own: a coordinator that dies is
replaced by the next attempt of the sweep, which finds the trials already made
(by their specs) in the store and carries on.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import trio

from p2pnn import logs
from p2pnn.bus import CANCEL, BusError, TaskBus
from p2pnn.compute.pool import Outcome
from p2pnn.store import NewTask, StoreError, TaskStore
from p2pnn.tasks import Limits, State, Task, needs_of, sweep_trials, validate_spec

log = logs.get(__name__)

POLL_SECONDS = 0.25  # how often the coordinator looks at its trials: a small model's epoch can take well under a second
LIST_PAGE = 500  # trials read per page


@dataclass
class _Trial:
    index: int
    params: dict[str, Any]
    spec: dict[str, Any]
    task: Task | None = None
    series: list[dict[str, Any]] | None = None
    stopped_at: int | None = None


class SweepRunner:
    """Coordinates one attempt of one sweep task.

    Resource handling: creates and cancels trial tasks through the store and
    the bus; holds nothing across attempts.
    Error handling: store and bus failures are logged and the next poll tries
    again; the attempt ends ``crashed`` (retryable) when it no longer holds the
    sweep's lease, ``cancelled`` when the sweep is cancelled (its unfinished
    trials are cancelled first), ``failed`` when no trial succeeded.
    """

    def __init__(
        self, *, sweep: Task, attempt: int, node_id: str, store: TaskStore, bus: TaskBus,
        clock: Callable[[], float] = time.time, poll_seconds: float = POLL_SECONDS,
    ) -> None:
        self.sweep = sweep
        self.attempt = attempt
        self.node_id = node_id
        self.store = store
        self.bus = bus
        self._clock = clock
        self._poll = poll_seconds
        spec = sweep.spec
        # Validation already passed at submission; normalising again gives each trial's stored spec.
        no_caps = Limits(max_epochs=1 << 30, max_wall_seconds=float(1 << 30), max_tensor_elements=1 << 62, max_samples=1 << 62)
        self.trials = [
            _Trial(i, params, validate_spec({"kind": "train", **raw}, no_caps))
            for i, (params, raw) in enumerate(zip(spec["trials"], sweep_trials(spec)))
        ]
        for trial in self.trials:
            trial.spec.pop("max_attempts", None)
        self.metric, self.mode = spec["metric"], spec["mode"]
        self.rule = spec["early_stopping"]

    async def run(self) -> Outcome:
        while True:
            try:
                current = await self.store.get(self.sweep.id)
                if current is None or current.state is not State.RUNNING or current.attempts != self.attempt \
                        or current.lease_owner != self.node_id:
                    return Outcome("crashed", error="the sweep's coordinator lost its lease", retryable=True)
                await self._refresh()
                if current.cancel_requested:
                    await self._cancel_unfinished()
                    return Outcome("cancelled", error="cancelled")
                if self.rule["rule"] == "median":
                    await self._stop_bad_trials()
                await self._launch()
                if all(t.task is not None and t.task.state.terminal for t in self.trials):
                    return self._outcome()
            except (StoreError, BusError) as exc:
                log.warning("sweep.poll_failed", task_id=self.sweep.id, error=str(exc))
            await trio.sleep(self._poll)

    # --- one poll ------------------------------------------------------------

    async def _refresh(self) -> None:
        """Read the trials from the store and match each task to its trial by spec."""
        tasks: list[Task] = []
        cursor = None
        while True:
            page = await self.store.list(parent=self.sweep.id, limit=LIST_PAGE, cursor=cursor)
            tasks += page.tasks
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        tasks.sort(key=lambda t: (t.created_at, t.id))
        unmatched = {t.index for t in self.trials}
        for task in tasks:
            for trial in self.trials:
                if trial.index in unmatched and trial.spec == task.spec:
                    trial.task = task
                    unmatched.discard(trial.index)
                    break
        for trial in self.trials:
            if trial.task is not None and trial.task.state is State.RUNNING or (
                trial.task is not None and trial.task.state.terminal and trial.series is None
            ):
                series = await self.store.progress_series(trial.task.id)
                trial.series = series.points if series is not None else []

    async def _launch(self) -> None:
        active = sum(1 for t in self.trials if t.task is not None and not t.task.state.terminal)
        waiting = [t for t in self.trials if t.task is None]
        for trial in waiting[: max(0, self.sweep.spec["parallelism"] - active)]:
            new = NewTask(kind="train", spec=trial.spec, owner=self.sweep.owner,
                          max_attempts=self.sweep.max_attempts, parent=self.sweep.id)
            (task,), _ = await self.store.create([new], now=self._clock())
            trial.task = task
            log.info("sweep.trial_started", task_id=self.sweep.id, trial=trial.index, trial_task=task.id,
                     params=trial.params)
            try:
                await self.bus.publish([task.id], headers={task.id: {"needs": needs_of(task.spec)}})
            except BusError as exc:  # pending: the sweeper publishes it again
                log.warning("bus.publish_failed", task_id=task.id, error=str(exc))
                continue
            await self.store.mark_queued([task.id], now=self._clock())

    async def _stop_bad_trials(self) -> None:
        """Median stopping rule: a running trial past the grace epochs whose best value so far is
        worse than the median of the other trials' best values up to the same epoch is stopped.

        Trials run at different speeds: the comparison is made at the latest epoch that this
        trial and at least ``min_trials`` others have all reached."""
        for trial in self.trials:
            if trial.task is None or trial.task.state is not State.RUNNING or not trial.series or trial.stopped_at:
                continue
            epoch = self._reached(trial)
            if epoch >= int(trial.spec["epochs"]):
                continue
            reached = sorted((self._reached(o) for o in self.trials if o is not trial), reverse=True)
            if len(reached) < self.rule["min_trials"]:
                continue
            at = min(epoch, reached[self.rule["min_trials"] - 1])
            if at < self.rule["grace_epochs"]:
                continue
            others = [b for o in self.trials if o is not trial and (b := self._best(o, at)) is not None]
            mine = self._best(trial, at)
            median = statistics.median(others)
            if mine is not None and self._worse(mine, median):
                trial.stopped_at = epoch
                log.info("sweep.trial_stopped", task_id=self.sweep.id, trial=trial.index, epoch=epoch,
                         compared_at=at, value=mine, median=median)
                await self._cancel(trial.task)

    @staticmethod
    def _reached(trial: _Trial) -> int:
        return max((int(p.get("epoch", 0)) for p in trial.series or []), default=0)

    async def _cancel_unfinished(self) -> None:
        for trial in self.trials:
            if trial.task is not None and not trial.task.state.terminal:
                await self._cancel(trial.task)

    async def _cancel(self, task: Task) -> None:
        cancelled = await self.store.request_cancel(task.id, now=self._clock())
        if cancelled is not None and cancelled.state is State.RUNNING:
            await self.bus.broadcast(CANCEL, {"id": task.id})  # its Ki stops it now, not at its next renewal

    # --- ranking -------------------------------------------------------------

    def _best(self, trial: _Trial, epoch: int) -> float | None:
        """The trial's best metric value over its epochs up to ``epoch``; None if it has not got there."""
        values = [float(p[self.metric]) for p in trial.series or []
                  if int(p.get("epoch", 0)) <= epoch and p.get(self.metric) is not None]
        reached = any(int(p.get("epoch", 0)) >= epoch for p in trial.series or [])
        if not values or not reached:
            return None
        return max(values) if self.mode == "max" else min(values)

    def _worse(self, value: float, than: float) -> bool:
        return value < than if self.mode == "max" else value > than

    def _final(self, trial: _Trial) -> float | None:
        if trial.task is None or trial.task.state is not State.SUCCEEDED or not trial.task.result:
            return None
        epochs = trial.task.result.get("epochs") or []
        value = epochs[-1].get(self.metric) if epochs else None
        return None if value is None else float(value)

    def _outcome(self) -> Outcome:
        budget = sum(int(t.spec["epochs"]) for t in self.trials)
        table, ran = [], 0
        for t in self.trials:
            assert t.task is not None
            epochs = max((int(p.get("epoch", 0)) for p in t.series or []), default=0)
            if t.task.state is State.SUCCEEDED and t.task.result:
                epochs = len(t.task.result.get("epochs") or [])
            ran += epochs
            # A trial that finished before its stop reached it was not stopped: it has its model.
            stopped = t.stopped_at if t.task.state is State.CANCELLED else None
            table.append({
                "trial": t.index, "task_id": t.task.id, "params": t.params, "state": t.task.state.value,
                "metric": self._final(t), "epochs": epochs, "stopped_at_epoch": stopped,
            })
        finished = [row for row in table if row["metric"] is not None]
        if not finished:
            return Outcome("failed", error="no trial of the sweep succeeded", result=None)
        best = (max if self.mode == "max" else min)(finished, key=lambda row: row["metric"])
        result = {
            "metric": self.metric, "mode": self.mode, "trials": table,
            "best": {**best, "artifact": "model.safetensors"},
            "epochs_run": ran, "epochs_budget": budget,
            "epochs_saved_fraction": round(1 - ran / budget, 6) if budget else 0.0,
            "stopped_early": sum(1 for row in table if row["stopped_at_epoch"] is not None),
        }
        return Outcome("succeeded", result=result)
