"""Worker process: ``python -m p2pnn.compute.worker``, one per pool slot, JSON lines in and out.

Protocol (one JSON object per line):

- out, once at start: ``{"type": "ready", "pid": int}``
- in, one per job: ``{"task_id", "attempt", "spec", "limits", "workdir",
  "model_file", "source_spec", "torch_threads", "group", "resume_file"}``
  (``group``: this rank's place in a data-parallel group, see
  ``p2pnn.nn.parallel.Group``; ``resume_file``: a checkpoint to resume from)
- out, per epoch: ``{"type": "progress", "task_id", "progress": {...}}``
- out, per checkpoint: ``{"type": "checkpoint", "task_id", "epoch", "file"}``
  (the file is the reader's to take; the worker never touches it again)
- out, exactly one per job: ``{"type": "result", "task_id", "result", "artifacts"}``
  or ``{"type": "error", "task_id", "error": "one line", "retryable": bool}``

The protocol stream is a duplicate of the original stdout; fd 1 and
``sys.stdout`` point at stderr, so whatever a library prints lands in the log,
never in the middle of a message. The process ends at end of input, or with
the pool that started it.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import fields
from typing import IO, Any

from p2pnn.nn.jobs import JobError, run_echo
from p2pnn.tasks import Limits, SpecError

# Set by the pool: the pid the worker must die with (checked once prctl is armed, to close the race).
PARENT_PID_ENV = "P2PNN_PARENT_PID"
# Set by the pool: import torch in the background right after start-up, so the
# first training job does not wait for it while echo jobs are served at once.
PRELOAD_TORCH_ENV = "P2PNN_PRELOAD_TORCH"
# Linux prctl option: deliver a signal to this process when the thread that forked it exits.
PR_SET_PDEATHSIG = 1
# An error message is one line a user reads in an API answer, not a log dump.
MAX_ERROR_CHARS = 500


def main() -> None:
    protocol = _claim_protocol_stream()
    _die_with_parent()
    # Ctrl-C in a terminal reaches the whole process group; the pool decides when a worker ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _write(protocol, {"type": "ready", "pid": os.getpid()})
    if os.environ.get(PRELOAD_TORCH_ENV) == "1":
        # A job that needs torch meanwhile waits for the preload to finish, never imports twice.
        threading.Thread(target=_preload, name="preload-torch", daemon=True).start()
    else:
        _preloaded.set()
    runner = _Runner(protocol)
    for raw in sys.stdin.buffer:
        if raw.strip():
            runner.handle(raw)


# Seconds the background preload took to import torch; None until it has (or without preload).
# The first job's own ``import torch`` then returns at once, so it cannot time the import itself.
_preload_seconds: float | None = None
# Set once the preload is over (or was never started): a job waits for it, because the preload's
# last step flips the process-wide determinism flag, which the job sets for itself afterwards.
_preloaded = threading.Event()


def _preload() -> None:
    global _preload_seconds
    try:
        started = time.perf_counter()
        import safetensors.torch  # noqa: F401
        import torch

        _preload_seconds = time.perf_counter() - started

        import p2pnn.nn.checkpoint  # noqa: F401
        import p2pnn.nn.data  # noqa: F401  (scikit-learn)
        import p2pnn.nn.models  # noqa: F401
        import p2pnn.nn.parallel  # noqa: F401  (torch.distributed)

        # The first call imports torch._dynamo and friends (over a second): pay it here,
        # not inside the first training job. Each job sets the flag it needs anyway.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.use_deterministic_algorithms(False)
    except Exception:  # the job that needs it reports the failure
        traceback.print_exc(file=sys.stderr)
    finally:
        _preloaded.set()


def _claim_protocol_stream() -> IO[bytes]:
    """Keep the original stdout for the protocol; send fd 1 and ``sys.stdout`` to stderr."""
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    return protocol


def _die_with_parent() -> None:
    """Have the kernel SIGKILL this process when the pool's process dies, even by SIGKILL.

    Armed here rather than in a ``preexec_fn``: ``preexec_fn`` is unsafe in a
    threaded parent, and the daemon has threads (psycopg, pika).
    """
    expected = os.environ.get(PARENT_PID_ENV)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # The parent may have died between fork and prctl: then nobody would ever signal us.
    if expected is not None and os.getppid() != int(expected):
        os._exit(1)


def _write(protocol: IO[bytes], message: dict[str, Any]) -> None:
    protocol.write(json.dumps(_finite(message), allow_nan=False).encode() + b"\n")
    protocol.flush()


def _finite(value: Any) -> Any:
    """NaN and infinities (a diverged training run) become null: JSON and the store refuse them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class _Runner:
    """Runs jobs one at a time; imports torch on the first job that needs it."""

    def __init__(self, protocol: IO[bytes]) -> None:
        self._protocol = protocol
        self._torch_threads: int | None = None

    def handle(self, raw: bytes) -> None:
        task_id = None
        try:
            job = json.loads(raw)
            task_id = job.get("task_id") if isinstance(job, dict) else None
            result, artifacts = self._run(job)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an error message; the worker lives on
            message, retryable = _describe(exc)
            print(f"p2pnn worker {os.getpid()}: task {task_id} failed", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
            _write(self._protocol, {"type": "error", "task_id": task_id, "error": message, "retryable": retryable})
            return
        _write(self._protocol, {"type": "result", "task_id": task_id, "result": result, "artifacts": artifacts})

    def _run(self, job: Any) -> tuple[dict[str, Any], dict[str, str]]:
        if not isinstance(job, dict) or not isinstance(job.get("spec"), dict):
            raise JobError("bad job: expected an object with a spec")
        spec, task_id = job["spec"], job.get("task_id")
        kind = spec.get("kind")
        if kind == "echo":
            return run_echo(spec)
        limits = _limits(job.get("limits"))
        self._prepare_torch(job.get("torch_threads"))
        from p2pnn.nn import jobs

        if kind == "train":
            if not job.get("workdir"):
                raise JobError("bad job: a train job needs a workdir")

            from p2pnn.nn.parallel import Group

            def report(progress: dict[str, Any]) -> None:
                _write(self._protocol, {"type": "progress", "task_id": task_id, "progress": progress})

            def checkpoint(epoch: int, path: str) -> None:
                _write(self._protocol, {"type": "checkpoint", "task_id": task_id, "epoch": epoch, "file": path})

            group = Group.from_json(job["group"]) if job.get("group") is not None else None
            return jobs.run_train(
                spec, report, job["workdir"], limits=limits, group=group,
                resume_file=job.get("resume_file"), on_checkpoint=checkpoint,
            )
        if kind in ("evaluate", "infer"):
            if not job.get("model_file"):
                raise JobError(f"bad job: an {kind} job needs the model file of its model task")
            run = jobs.run_evaluate if kind == "evaluate" else jobs.run_infer
            return run(spec, job["model_file"], job.get("source_spec"), limits=limits)
        raise JobError(f"spec.kind: unknown kind {kind!r}")

    def _prepare_torch(self, threads: Any) -> None:
        started = time.perf_counter()
        _preloaded.wait()
        import torch

        if self._torch_threads is None:
            waited = time.perf_counter() - started
            how = f"imported in {_preload_seconds:.2f} s in the background" if _preload_seconds else f"ready in {waited:.2f} s"
            print(f"p2pnn worker {os.getpid()}: torch {torch.__version__} {how}", file=sys.stderr)
        if isinstance(threads, int) and threads > 0 and threads != self._torch_threads:
            torch.set_num_threads(threads)
            self._torch_threads = threads
        elif self._torch_threads is None:
            self._torch_threads = torch.get_num_threads()


def _limits(raw: Any) -> Limits:
    known = {f.name for f in fields(Limits)}
    return Limits(**{k: v for k, v in (raw or {}).items() if k in known})


def _describe(exc: Exception) -> tuple[str, bool]:
    """One line for the user, and whether another attempt could succeed."""
    if isinstance(exc, JobError):
        return _one_line(str(exc)), exc.retryable
    if isinstance(exc, SpecError):
        return _one_line(str(exc)), False
    if isinstance(exc, json.JSONDecodeError):
        return _one_line(f"bad job: not JSON ({exc})"), False
    if isinstance(exc, KeyError):
        return _one_line(f"bad job: missing field {exc}"), False
    if isinstance(exc, (TypeError, ValueError)):
        return _one_line(f"bad job: {exc}"), False
    # Memory is a property of the machine at the moment, not of the spec: another try may fit.
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return _one_line(f"out of memory: {exc}"), True
    return _one_line(f"{type(exc).__name__}: {exc}"), False


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


if __name__ == "__main__":
    main()
