"""Start `p2pnn-node` processes and wait until they serve: for the local swarm script, benchmarks and tests.

A node started here logs JSON events to a file; it is ready once it has
written ``<data_dir>/node.json`` with its pid and the API address it bound
(so port 0 works, whatever the log level).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from p2pnn.node import READY_FILE

READY_TIMEOUT = 60.0  # a cold start imports the stack and spawns the worker processes
POLL_SECONDS = 0.05


@dataclass
class NodeProcess:
    proc: subprocess.Popen
    log_path: Path
    url: str = ""
    node_id: str = ""
    info: dict = field(default_factory=dict)  # the ready file: pid, node_id, api and, in a swarm, dht and peer

    def events(self) -> list[dict]:
        """Every JSON event the node has logged so far (other lines are skipped)."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                out.append(event)
        return out

    def worker_pids(self) -> list[int]:
        """The node's child processes: its task workers."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            return [int(p) for p in children.read_text().split()]
        except FileNotFoundError:
            return []

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` (if still running) and wait; SIGKILL if it outlives ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def start_node(
    data_dir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    command: str = "run",
    timeout: float = READY_TIMEOUT,
) -> NodeProcess:
    """Start `p2pnn-node <command> --data-dir DIR ARGS` and return once its API answers.

    ``env`` is added to this process's environment without its P2PNN_*
    variables, so a caller's shell cannot leak configuration in.

    Error handling: raises RuntimeError (with the node's log) when the node
    exits during start-up, TimeoutError when it is not ready in ``timeout``.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / f"node-{time.time_ns()}.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("P2PNN_")}
    full_env.update({"P2PNN_LOG__FORMAT": "json", **(env or {})})
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "p2pnn.cli", command, "--data-dir", str(data_dir), *args],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full_env, start_new_session=True,
        )
    node = NodeProcess(proc, log_path)
    ready_file = data_dir / READY_FILE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            info = json.loads(ready_file.read_text())
        except (FileNotFoundError, ValueError):
            info = {}
        if info.get("pid") == proc.pid:  # not a file left by an earlier, killed node
            node.url, node.node_id, node.info = info["api"], info["node_id"], info
            return node
        if proc.poll() is not None:
            raise RuntimeError(f"node exited with {proc.returncode}:\n{log_path.read_text(errors='replace')}")
        time.sleep(POLL_SECONDS)
    proc.kill()
    proc.wait()
    raise TimeoutError(f"node not ready after {timeout} s:\n{log_path.read_text(errors='replace')}")
