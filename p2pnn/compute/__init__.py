"""Compute plane: run tasks in worker processes so torch never touches the daemon's event loop.

- KiPool (pool.py): daemon side, trio, no torch. Keeps one worker process per
  slot alive, hands it jobs, relays progress, enforces the wall-time limit,
  cancels by killing, replaces workers that die. Exports :class:`KiPool`,
  :class:`Job`, :class:`Outcome`.
- worker (worker.py): the process itself, ``python -m p2pnn.compute.worker``.
  Reads one JSON job per line on stdin, writes JSON lines (ready, progress,
  result or error) on its protocol stream, runs the job with ``p2pnn.nn``.

worker.py is an entry point, never imported by the daemon. The re-exports
below load pool.py (and trio) on first use, so ``python -m
p2pnn.compute.worker`` does not pay for trio at every worker start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from p2pnn.compute.pool import Job, KiPool, Outcome

__all__ = ["Job", "KiPool", "Outcome"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from p2pnn.compute import pool

        return getattr(pool, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
