"""KiPool: a Ki's worker processes, seen from the daemon's trio loop.

One ``python -m p2pnn.compute.worker`` process per slot, started once and
reused, so torch is imported once per slot rather than once per task. This
module imports neither torch nor numpy: the daemon stays light and its event
loop never runs a training step.
"""

from __future__ import annotations

import contextvars
import dataclasses
import json
import math
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import trio

from p2pnn import logs
from p2pnn.tasks import Limits

log = logs.get(__name__)

WORKER_MODULE = "p2pnn.compute.worker"
# The worker imports torch lazily, so it is ready in well under a second; the
# margin covers a machine busy with other workers importing torch.
READY_TIMEOUT = 60.0
# How long a worker gets to exit on SIGTERM before SIGKILL: it holds nothing that needs flushing.
TERM_GRACE = 2.0
# Pause between failed worker starts, so a broken environment does not spin the CPU.
RESTART_BACKOFF = 1.0
# Failed starts in a row before the pool gives up and raises: the environment is broken.
MAX_START_FAILURES = 5
# A protocol line longer than this is a broken or hostile worker, not a result.
MAX_LINE_BYTES = 64 * 1024 * 1024
_READ_CHUNK = 65536
# Passed to the worker, which arms PR_SET_PDEATHSIG and checks it still has this parent.
PARENT_PID_ENV = "P2PNN_PARENT_PID"
# Set when workers should import torch in the background as soon as they start.
PRELOAD_TORCH_ENV = "P2PNN_PRELOAD_TORCH"
# How often to check for exit where pidfd_open is missing (not Linux, or old kernels).
_EXIT_POLL = 0.05
# A worker's stderr output is one log event once the pipe has been quiet this long (seconds):
# long enough to join the pieces of one traceback, short enough that the log stays current.
STDERR_QUIET = 0.2
# At most this many bytes of stderr in one event; more becomes several events.
MAX_STDERR_EVENT = 64 * 1024
# Where torch's native stack trace starts in an exception's text.
_NATIVE_FRAMES = re.compile(r"\s*(Exception raised from \S|C\+\+ CapturedTraceback:|frame #\d+:)")

# Where a lone node's data-parallel groups meet when no address or ports are configured.
DEFAULT_RENDEZVOUS_HOST = "127.0.0.1"
DEFAULT_RENDEZVOUS_PORTS = range(29400, 29500)
# How long ranks wait for each other (at rendezvous and in a collective) before the attempt fails.
DEFAULT_RENDEZVOUS_TIMEOUT = 120.0

Status = Literal["succeeded", "failed", "crashed", "cancelled", "timeout"]
OnProgress = Callable[[dict[str, Any]], Awaitable[None]]
# Awaited with the epoch and the bytes of each checkpoint a train job writes.
OnCheckpoint = Callable[[int, bytes], Awaitable[None]]
# Awaited with the address and port a group's rank 0 will listen on, before any rank starts.
OnRendezvous = Callable[[str, int], Awaitable[None]]


@dataclass(frozen=True)
class Job:
    """One attempt at one task, as the pool receives it."""

    task_id: str
    attempt: int
    spec: dict[str, Any]
    # Bytes of the model task's weights artifact (evaluate, infer); written to a file for the worker.
    model_file: bytes | None = None
    # The normalised train spec of the model task (evaluate, infer).
    source_spec: dict[str, Any] | None = None
    # Bytes of a checkpoint of this task (train): the attempt resumes after its epoch.
    resume_file: bytes | None = None
    # This rank's place in a data-parallel group (p2pnn.nn.parallel.Group as JSON), or None.
    group: dict[str, Any] | None = None


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended. ``artifacts`` maps name to content; the files are gone from disk."""

    status: Status
    result: dict[str, Any] | None = None
    error: str | None = None
    retryable: bool = False
    artifacts: dict[str, bytes] = field(default_factory=dict)


class KiPool:
    """A fixed number of worker processes that run jobs one at a time each.

    ``async with trio.open_nursery() as n: await n.start(pool.run)`` returns
    once every worker is ready; then :meth:`execute` from any task.

    Resource handling: owns its worker processes and ``workdir`` (one
    sub-directory per attempt, removed when the attempt ends). When ``run`` is
    cancelled every worker gets SIGTERM, then SIGKILL after ``TERM_GRACE``;
    each worker also asks the kernel to SIGKILL it when this process dies, so
    no worker outlives the daemon. A pool runs once.
    Error handling: a worker that dies is replaced; a job it was running ends
    ``crashed`` (retryable). ``run`` raises RuntimeError if workers fail to
    start ``MAX_START_FAILURES`` times in a row.
    """

    def __init__(
        self,
        slots: int,
        torch_threads: int,
        limits: Limits,
        workdir: Path,
        python: str = sys.executable,
        env: dict[str, str] | None = None,
        preload_torch: bool = False,
        rendezvous_host: str = DEFAULT_RENDEZVOUS_HOST,
        rendezvous_ports: range = DEFAULT_RENDEZVOUS_PORTS,
        rendezvous_timeout: float = DEFAULT_RENDEZVOUS_TIMEOUT,
    ) -> None:
        if slots < 0:
            raise ValueError(f"slots must not be negative, got {slots}")
        self._rendezvous_host = rendezvous_host
        self._rendezvous_ports = rendezvous_ports
        self._rendezvous_timeout = rendezvous_timeout
        # Held while a group's ranks are handed to workers, so two groups never each hold
        # part of the slots while waiting for the rest (gang placement: all ranks or none).
        self._gang_lock = trio.Lock()
        # Unparked whenever a worker becomes idle: a group waits there for all its workers.
        self._idle_lot = trio.lowlevel.ParkingLot()
        self._ports_in_use: set[int] = set()
        self._port_lock = trio.Lock()
        self._preload_torch = preload_torch
        self._slots = slots
        self._torch_threads = torch_threads
        self._limits = limits
        self._limits_message = dataclasses.asdict(limits)  # the same for every job
        self._workdir = Path(workdir)
        self._python = python
        self._env = env
        # Unbuffered: execute() blocks until a slot with an idle worker takes the job.
        self._send_request, self._receive_request = trio.open_memory_channel[_Request](0)
        self._workers: list[_Worker | None] = [None] * slots
        self._nursery: trio.Nursery | None = None
        self._idle = 0
        self._requests: dict[str, list[_Request]] = {}

    @property
    def slots(self) -> int:
        return self._slots

    @property
    def rendezvous_timeout(self) -> float:
        return self._rendezvous_timeout

    @property
    def free_slots(self) -> int:
        """Slots whose worker is alive and waiting for a job."""
        return self._idle

    def worker_pids(self) -> list[int]:
        return [w.pid for w in self._workers if w is not None and w.returncode is None]

    def pid_of(self, task_id: str, rank: int = 0) -> int | None:
        requests = self._requests.get(task_id) or []
        request = requests[rank] if rank < len(requests) else None
        return request.worker.pid if request is not None and request.worker is not None else None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the workers, report started when all are ready, keep them alive until cancelled.

        Resource handling: every worker is stopped before this returns or raises.
        Error handling: raises RuntimeError when workers cannot be started.
        """
        self._workdir.mkdir(parents=True, exist_ok=True)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery  # where each worker's exit watcher runs
                for index in range(self._slots):
                    await nursery.start(self._serve_slot, index)
                log.info("pool.ready", slots=self._slots, pids=self.worker_pids())
                task_status.started()
        finally:
            # Jobs still waiting for a slot now get an answer instead of hanging.
            self._receive_request.close()

    async def execute(self, job: Job, on_progress: OnProgress, on_checkpoint: OnCheckpoint | None = None) -> Outcome:
        """Run ``job`` on the next free worker, awaiting ``on_progress`` for each progress report
        and ``on_checkpoint`` for each checkpoint it writes.

        Resource handling: if the caller is cancelled, or a callback raises,
        the job's worker is killed (and replaced) before this returns.
        Error handling: every way a job can end is an Outcome; raises
        ValueError if ``job.task_id`` is already executing in this pool.
        """
        if job.task_id in self._requests:
            raise ValueError(f"task {job.task_id} is already executing in this pool")
        request = _Request(job)
        self._requests[job.task_id] = [request]
        try:
            with trio.CancelScope() as request.wait_scope:
                try:
                    # Behind a group waiting for its workers, so that group cannot starve.
                    async with self._gang_lock:
                        await self._send_request.send(request)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return Outcome("crashed", error="the worker pool is not running", retryable=True)
            if request.wait_scope.cancelled_caught:
                return Outcome("cancelled", error="cancelled before it started")
            request.wait_scope = None
            return await self._follow(request, on_progress, on_checkpoint)
        finally:
            self._forget(job.task_id, [request])

    async def execute_group(
        self,
        job: Job,
        workers: int,
        on_progress: OnProgress,
        on_checkpoint: OnCheckpoint | None = None,
        *,
        ranks: range | None = None,
        rendezvous: tuple[str, int] | None = None,
        on_rendezvous: OnRendezvous | None = None,
    ) -> Outcome:
        """Run ``ranks`` (default: all) of a data-parallel group of ``workers`` ranks on this
        pool's slots; the outcome is that of the lowest rank here (rank 0's when it is here).

        The group meets at ``rendezvous`` (rank 0's address and port, for the
        ranks of a group whose rank 0 runs on another node); without it this
        pool opens the rendezvous on its own address at a free port of its
        range and awaits ``on_rendezvous(address, port)`` before any rank
        starts, so the caller can tell the other nodes where to meet.

        Ranks are handed to workers all together, once enough workers are
        idle; meanwhile no other job is handed out, so two groups never each
        hold part of the slots and wait for the rest, and single jobs cannot
        starve a group. A rank that fails ends the group here: the other
        ranks' workers are killed and the first failure is the outcome
        (``crashed`` ranks are retryable).

        Error handling: ``failed`` at once when the ranks do not fit the pool;
        otherwise as :meth:`execute`.
        """
        if job.task_id in self._requests:
            raise ValueError(f"task {job.task_id} is already executing in this pool")
        ranks = range(workers) if ranks is None else ranks
        if not 1 <= len(ranks) <= self._slots or not 0 <= ranks.start < ranks.stop <= workers:
            return Outcome("failed", error=f"spec.workers: {len(ranks)} ranks do not fit this node's {self._slots} slots")
        port = None
        if rendezvous is None:
            # Chosen under a lock and remembered: two groups starting together never pick the same port.
            async with self._port_lock:
                port = await trio.to_thread.run_sync(
                    _free_port, self._rendezvous_host, [p for p in self._rendezvous_ports if p not in self._ports_in_use]
                )
                if port is None:
                    return Outcome("crashed", error="no free rendezvous port in the configured range", retryable=True)
                self._ports_in_use.add(port)
            rendezvous = (self._rendezvous_host, port)
        requests = [
            _Request(dataclasses.replace(job, group={
                "rank": rank, "world": workers, "address": rendezvous[0], "port": rendezvous[1],
                "backend": job.spec.get("backend", "auto"), "timeout": self._rendezvous_timeout,
            }))
            for rank in ranks
        ]
        self._requests[job.task_id] = requests
        outcomes: list[Outcome | None] = [None] * len(requests)
        first_failure: list[Outcome] = []
        try:
            if port is not None and on_rendezvous is not None:
                await on_rendezvous(*rendezvous)
            with trio.CancelScope() as waiting:
                for request in requests:
                    request.wait_scope = waiting
                async with self._gang_lock:
                    # All ranks start together or none does: a rank handed out early would
                    # sit at the rendezvous while a later one waited behind another task.
                    while self._idle < len(requests):
                        await self._idle_lot.park()
                    for request in requests:
                        try:
                            await self._send_request.send(request)
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            return Outcome("crashed", error="the worker pool is not running", retryable=True)
            for request in requests:
                request.wait_scope = None
            if waiting.cancelled_caught:
                return Outcome("cancelled", error="cancelled before it started")

            async def follow(index: int) -> None:
                outcome = await self._follow(requests[index], on_progress, on_checkpoint)
                outcomes[index] = outcome
                if outcome.status != "succeeded" and not first_failure:
                    first_failure.append(outcome)
                    log.warning("pool.rank_failed", task_id=job.task_id, rank=ranks[index], status=outcome.status,
                                error=outcome.error)
                    for other in requests:
                        if other is not requests[index] and not other.done:
                            self._kill(other)  # peers would otherwise wait in a collective until it times out

            async with trio.open_nursery() as nursery:
                for index in range(len(requests)):
                    nursery.start_soon(follow, index)
            if first_failure:
                return first_failure[0]
            assert outcomes[0] is not None
            return outcomes[0]
        finally:
            if port is not None:
                self._ports_in_use.discard(port)
            self._forget(job.task_id, requests)

    async def _follow(self, request: _Request, on_progress: OnProgress, on_checkpoint: OnCheckpoint | None) -> Outcome:
        async for kind, payload in request.receive_events:
            if kind == "outcome":
                return payload
            if kind == "progress":
                await on_progress(payload)
            elif kind == "checkpoint" and on_checkpoint is not None:
                await on_checkpoint(*payload)
        return Outcome("crashed", error="the worker pool stopped before the task finished", retryable=True)

    def _forget(self, task_id: str, requests: list[_Request]) -> None:
        for request in requests:
            if not request.done:
                # The caller is gone: the job must not run (or keep running) for nobody.
                request.cancelled = True
                self._kill(request)
            request.receive_events.close()
        del self._requests[task_id]

    def cancel(self, task_id: str) -> bool:
        """Stop ``task_id`` (every rank of a group): its ``execute`` returns ``cancelled``.
        False if it is not here."""
        requests = [r for r in self._requests.get(task_id) or [] if not r.done]
        for request in requests:
            request.cancelled = True
            self._kill(request)
        return bool(requests)

    # --- slots -------------------------------------------------------------

    def _kill(self, request: _Request) -> None:
        if request.wait_scope is not None:
            request.wait_scope.cancel()
        if request.worker is not None:
            request.worker.kill()

    async def _serve_slot(self, index: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        worker = await self._start_worker()
        self._workers[index] = worker
        task_status.started()
        request: _Request | None = None
        try:
            while True:
                request = await self._next_request(worker)
                if request is not None and not worker.gone():
                    outcome = await self._attempt(worker, request)
                    request.finish(outcome)
                    request = None
                if worker.gone():
                    log.warning("pool.worker_replaced", slot=index, pid=worker.pid, reason=worker.describe_exit())
                    worker.close()
                    self._workers[index] = None
                    worker = await self._start_worker()
                    self._workers[index] = worker
                    if request is not None:
                        # Died while idle, just as this job arrived: run it on the replacement.
                        request.finish(await self._attempt(worker, request))
                        request = None
        finally:
            with trio.CancelScope(shield=True):
                if request is not None and not request.done:
                    request.finish(Outcome("crashed", error="the worker pool stopped", retryable=True))
                await worker.stop(TERM_GRACE)
                worker.close()
                self._workers[index] = None

    async def _next_request(self, worker: _Worker) -> _Request | None:
        """The next job, or None if the idle worker died first (its watcher cancels the wait)."""
        request = None
        self._idle += 1
        self._idle_lot.unpark_all()
        try:
            with trio.CancelScope() as worker.idle_scope:
                if not worker.gone():  # else it died before the scope was there to cancel
                    request = await self._receive_request.receive()
        finally:
            worker.idle_scope = None
            self._idle -= 1
        return request

    @staticmethod
    async def _watch(worker: _Worker) -> None:
        """For the worker's life: when it exits while idle, stop its slot's wait for a job.
        One per worker rather than one per job (a task spawned and cancelled for every task)."""
        try:
            await worker.wait()
        except trio.ClosedResourceError:  # closed by its slot, which saw the exit first
            return
        worker.exited = True
        if worker.idle_scope is not None:
            worker.idle_scope.cancel()

    async def _start_worker(self) -> _Worker:
        failures = 0
        while True:
            try:
                return await self._spawn()
            except (OSError, RuntimeError, trio.TooSlowError) as exc:
                failures += 1
                log.error("pool.worker_start_failed", error=str(exc), failures=failures)
                if failures >= MAX_START_FAILURES:
                    raise RuntimeError(f"worker processes fail to start: {exc}") from exc
                await trio.sleep(RESTART_BACKOFF)

    async def _spawn(self) -> _Worker:
        env = dict(os.environ if self._env is None else self._env)
        env[PARENT_PID_ENV] = str(os.getpid())
        if self._preload_torch:
            env[PRELOAD_TORCH_ENV] = "1"
        worker = _Worker.start([self._python, "-m", WORKER_MODULE], env)
        try:
            with trio.fail_after(READY_TIMEOUT):
                ready = await worker.receive()
            if ready is None or ready.get("type") != "ready":
                raise RuntimeError(f"worker {worker.describe_exit()} before it was ready")
        except BaseException:
            with trio.CancelScope(shield=True):
                await worker.stop(0)
            worker.close()
            raise
        assert self._nursery is not None
        self._nursery.start_soon(self._watch, worker)
        return worker

    # --- one attempt -------------------------------------------------------

    async def _attempt(self, worker: _Worker, request: _Request) -> Outcome:
        job = request.job
        if request.cancelled:
            return Outcome("cancelled", error="cancelled before it started")
        # Set before the first checkpoint, so a cancel from now on kills this worker.
        request.worker = worker
        jobdir = self._workdir / f"{_safe_name(job.task_id)}-{job.attempt}-{os.urandom(4).hex()}"
        # The directory is made only where a file goes in (here, or by a train job's
        # worker): an echo job then costs no filesystem work at all.
        model_path = resume_path = None
        try:
            if job.model_file is not None:
                model_path = jobdir / "source.safetensors"
                await trio.to_thread.run_sync(_write_file, model_path, job.model_file)
            if job.resume_file is not None:
                resume_path = jobdir / "resume.safetensors"
                await trio.to_thread.run_sync(_write_file, resume_path, job.resume_file)
            message = {
                "task_id": job.task_id,
                "attempt": job.attempt,
                "spec": job.spec,
                "limits": self._limits_message,
                "workdir": str(jobdir),
                "model_file": None if model_path is None else str(model_path),
                "source_spec": job.source_spec,
                "torch_threads": self._torch_threads,
                "group": job.group,
                "resume_file": None if resume_path is None else str(resume_path),
            }
            reply = None
            with trio.move_on_after(self._limits.max_wall_seconds) as deadline:
                reply = await self._converse(worker, request, message, jobdir)
            if deadline.cancelled_caught:
                worker.kill()
                await worker.wait()
                return Outcome(
                    "timeout",
                    error=f"exceeded the limit of max_wall_seconds={self._limits.max_wall_seconds:g}; its worker was killed",
                )
            if reply is None:
                await worker.wait()
                if request.cancelled:
                    return Outcome("cancelled", error="cancelled while running")
                return Outcome("crashed", error=f"worker {worker.describe_exit()}", retryable=True)
            if reply["type"] == "error":
                return Outcome(
                    "failed", error=user_error(str(reply.get("error"))), retryable=bool(reply.get("retryable", False))
                )
            named = reply.get("artifacts") or {}
            try:
                # No thread hand-off for a job that wrote no files (echo): its reply names none.
                artifacts = await trio.to_thread.run_sync(_collect, jobdir, named) if named else {}
            except (OSError, ValueError) as exc:
                return Outcome("failed", error=f"could not read the task's artifacts: {exc}", retryable=True)
            return Outcome("succeeded", result=reply.get("result"), artifacts=artifacts)
        finally:
            request.worker = None
            # Only a file written here or a job that writes files (anything but an echo) can have
            # made the directory: an echo's attempt costs no filesystem call at all.
            wrote = model_path is not None or resume_path is not None or job.spec.get("kind") != "echo"
            if wrote and os.path.exists(jobdir):
                await trio.to_thread.run_sync(shutil.rmtree, jobdir, True)

    async def _converse(
        self, worker: _Worker, request: _Request, message: dict[str, Any], jobdir: Path
    ) -> dict[str, Any] | None:
        """Send the job, relay progress; the final result/error message, or None if the worker died."""
        try:
            await worker.send(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return None
        while True:
            reply = await worker.receive()
            if reply is None:
                return None
            if reply.get("task_id") != request.job.task_id:
                log.warning("pool.stray_message", pid=worker.pid, type=reply.get("type"))
            elif reply.get("type") == "progress":
                request.event("progress", reply.get("progress") or {})
            elif reply.get("type") == "checkpoint":
                try:
                    data = await trio.to_thread.run_sync(_take, jobdir, str(reply.get("file")))
                except (OSError, ValueError) as exc:  # the next checkpoint may do better
                    log.warning("pool.checkpoint_unreadable", task_id=request.job.task_id, error=str(exc))
                else:
                    request.event("checkpoint", (int(reply.get("epoch") or 0), data))
            elif reply.get("type") in ("result", "error"):
                return reply


def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _collect(jobdir: Path, named: dict[str, str]) -> dict[str, bytes]:
    """Read each artifact into memory; only files inside the job's directory are accepted."""
    return {name: _take(jobdir, path) for name, path in named.items()}


def _take(jobdir: Path, path: str) -> bytes:
    """Read and remove a file the worker wrote; only files inside the job's directory are accepted."""
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(jobdir.resolve()):
        raise ValueError(f"{path} is outside the job directory")
    data = resolved.read_bytes()
    resolved.unlink()
    return data


def _free_port(host: str, ports: list[int]) -> int | None:
    """A port of ``ports`` nobody listens on at ``host`` now (rank 0 binds it moments later)."""
    for port in ports:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return port
    return None


def user_error(text: str) -> str:
    """A worker's error message as a user reads it: the native stack frames torch may append cut off.

    With TORCH_SHOW_CPP_STACKTRACES (and in some builds always) a torch error's
    text goes on with "Exception raised from ..." and a list of C++ frames;
    they help a developer reading the node's log, not a user reading an answer.
    """
    match = _NATIVE_FRAMES.search(text)
    if match is not None:
        text = text[: match.start()].rstrip(" :") or "the task failed inside a native library"
    return text


def _relay_stderr(pid: int, fd: int) -> None:
    """Thread: a worker's stderr into the log, one ``worker.stderr`` event per burst of output.

    A traceback is written in a few quick pieces: what arrives before the pipe
    has been quiet for STDERR_QUIET is one event, so a traceback is one event
    and one line of a JSON log. Ends when the worker (and any child holding
    its stderr) is gone.
    """
    pending = bytearray()
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        while True:
            ready, _, _ = select.select([pipe], [], [], STDERR_QUIET if pending else None)
            if ready:
                chunk = pipe.read(_READ_CHUNK)
                if not chunk:
                    break
                pending += chunk
                if len(pending) < MAX_STDERR_EVENT:
                    continue
            _log_stderr(pid, pending)
            pending.clear()
    if pending:
        _log_stderr(pid, pending)


def _log_stderr(pid: int, data: bytearray) -> None:
    text = data[:MAX_STDERR_EVENT].decode(errors="replace").rstrip()
    own = f"p2pnn worker {pid}: "
    if text.startswith(own) and "\n" not in text:
        # The worker's own one-line notice (which torch it loaded, how long it took): news, not trouble.
        log.info("worker.notice", pid=pid, text=text[len(own):])
    elif text:
        log.warning("worker.stderr", pid=pid, text=text, truncated=len(data) > MAX_STDERR_EVENT)


def _safe_name(task_id: str) -> str:
    if len(task_id) <= 64 and task_id.isascii() and task_id.replace("-", "").isalnum():
        return task_id  # a task id as the store makes them (a UUID): nothing to replace
    return re.sub(r"[^A-Za-z0-9_.-]", "_", task_id)[:64] or "task"


class _Request:
    """A job from ``execute`` to the slot that runs it, and its events back."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.send_events, self.receive_events = trio.open_memory_channel[tuple[str, Any]](math.inf)
        self.wait_scope: trio.CancelScope | None = None
        self.worker: _Worker | None = None
        self.cancelled = False
        self.done = False

    def event(self, kind: str, payload: Any) -> None:
        try:
            self.send_events.send_nowait((kind, payload))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # execute() has already returned: nobody is listening any more

    def finish(self, outcome: Outcome) -> None:
        self.done = True
        self.event("outcome", outcome)
        self.send_events.close()


class _Worker:
    """One worker process: its pipes, its JSON lines, and its exit.

    Started with ``subprocess.Popen`` on the trio thread rather than
    ``trio.lowlevel.open_process``, which forks in a cached helper thread: the
    kernel's parent-death signal follows the forking *thread*, so a worker
    forked there was SIGKILLed ten seconds later, when the idle thread exited.
    """

    def __init__(self, popen: subprocess.Popen[bytes], stdin: trio.lowlevel.FdStream, stdout: trio.lowlevel.FdStream) -> None:
        self._popen = popen
        self.idle_scope: trio.CancelScope | None = None  # set while its slot waits for a job
        self.exited = False  # set by its watcher once the process is gone
        self._stdin = stdin
        self._stdout = stdout
        self._buffer = bytearray()
        self._scanned = 0
        self._wait_lock = trio.Lock()
        self._pidfd: int | None = None
        try:
            self._pidfd = os.pidfd_open(popen.pid)
        except (AttributeError, OSError):
            pass  # no pidfd here: wait() polls instead

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    @classmethod
    def start(cls, command: list[str], env: dict[str, str]) -> _Worker:
        child_in, parent_out = os.pipe()
        parent_in, child_out = os.pipe()
        err_in, child_err = os.pipe()
        try:
            # stderr is a pipe of ours, not the daemon's own: raw traceback lines would break a
            # JSON log; _relay_stderr turns each burst of them into one event.
            popen = subprocess.Popen(command, stdin=child_in, stdout=child_out, stderr=child_err, env=env, close_fds=True)
        except BaseException:
            for fd in (parent_out, parent_in, err_in):
                os.close(fd)
            raise
        finally:
            os.close(child_in)
            os.close(child_out)
            os.close(child_err)
        # Run in a copy of this context, so the events carry the fields bound here (the node id).
        relay = contextvars.copy_context()
        threading.Thread(
            target=relay.run, args=(_relay_stderr, popen.pid, err_in), name=f"worker-{popen.pid}-stderr", daemon=True
        ).start()
        return cls(popen, trio.lowlevel.FdStream(parent_out), trio.lowlevel.FdStream(parent_in))

    def poll(self) -> int | None:
        return self._popen.poll()

    def gone(self) -> bool:
        """Whether the process is known to have exited (its watcher saw it, or it was reaped):
        no system call, unlike ``poll``, for the checks a slot makes around every job."""
        return self.exited or self._popen.returncode is not None

    def kill(self) -> None:
        if self._popen.poll() is None:
            self._popen.kill()

    def describe_exit(self) -> str:
        code = self._popen.returncode
        if code is None:
            return f"process {self.pid} is still running"
        if code < 0:
            try:
                return f"process {self.pid} exited with signal {signal.Signals(-code).name}"
            except ValueError:
                return f"process {self.pid} exited with signal {-code}"
        return f"process {self.pid} exited with code {code}"

    async def send(self, message: dict[str, Any]) -> None:
        await self._stdin.send_all(json.dumps(message).encode() + b"\n")

    async def receive(self) -> dict[str, Any] | None:
        """The next JSON object the worker wrote, or None at end of stream (the worker is gone).

        Error handling: a line that is not a JSON object is logged and skipped;
        a line over MAX_LINE_BYTES gets the worker killed (then None).
        """
        while True:
            line = await self._line()
            if line is None:
                return None
            try:
                message = json.loads(line)
            except ValueError:
                message = None
            if isinstance(message, dict):
                return message
            log.warning("pool.bad_worker_line", pid=self.pid, line=line[:200].decode(errors="replace"))

    async def _line(self) -> bytes | None:
        while True:
            end = self._buffer.find(b"\n", self._scanned)
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                self._scanned = 0
                return line
            self._scanned = len(self._buffer)
            if len(self._buffer) > MAX_LINE_BYTES:
                log.error("pool.worker_line_too_long", pid=self.pid, limit=MAX_LINE_BYTES)
                self.kill()
                return None
            chunk = await self._stdout.receive_some(_READ_CHUNK)
            if not chunk:
                return None
            self._buffer += chunk

    async def wait(self) -> int:
        async with self._wait_lock:
            while self._popen.poll() is None:
                if self._pidfd is not None:
                    await trio.lowlevel.wait_readable(self._pidfd)
                else:
                    await trio.sleep(_EXIT_POLL)
        return self._popen.returncode

    async def stop(self, grace: float) -> None:
        """End the process: close its input, SIGTERM, SIGKILL after ``grace`` seconds; reap it."""
        await self._stdin.aclose()
        if self._popen.poll() is None:
            self._popen.terminate()
            with trio.move_on_after(grace):
                await self.wait()
        self.kill()
        await self.wait()

    def close(self) -> None:
        """Release the pipes and the pidfd; the process must already be reaped."""
        if self._pidfd is not None:
            trio.lowlevel.notify_closing(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        for stream in (self._stdin, self._stdout):
            try:
                stream.close()
            except OSError:
                pass
