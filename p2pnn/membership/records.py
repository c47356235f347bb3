"""NodeRecord: what a node publishes about itself in the DHT, signed and expiring.

The record travels as a signed envelope (:mod:`p2pnn.credential`) in JSON
text, because kademlia values are plain str/bytes/int/float. It is stored
under the key ``p2pnn:<swarm>:node:<node id>``; the kademlia node id of the
publishing node is the same 160-bit id, so the ids found in a routing table
name the keys to read.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Any

from p2pnn.credential import EnvelopeError, SwarmCredential, open_envelope, seal
from p2pnn.identity import Identity

CLOCK_SKEW = 30.0  # seconds a record may claim to come from the future (clocks of machines differ)
MAX_TTL = 86400.0  # a record may not claim to live longer than this, so a leaked one cannot be replayed for long
NVIDIA_SMI_TIMEOUT = 5.0  # seconds; a wedged driver must not hold up a node's start


class RecordError(ValueError):
    """A record that is forged, from another swarm, stale, or stored under the wrong key."""


@dataclass(frozen=True)
class NodeRecord:
    node_id: str
    dht: tuple[str, int]  # IP address and UDP port
    peer: str  # ws://IP:PORT of the peer link
    api: str  # http://IP:PORT of the REST API
    capabilities: dict[str, Any]
    prefers: str  # auto | principal | an | ki: the role the node was started for
    priority: int
    roles: tuple[str, ...]
    an_id: str | None
    load: dict[str, int]  # slots, free_slots
    term: int  # highest term the node has seen
    timestamp: float
    expires_at: float
    public_key: str = field(default="", compare=False)

    @property
    def has_gpu(self) -> bool:
        return bool(self.capabilities.get("gpus"))

    def body(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("node_id"), out.pop("public_key")
        out["dht"] = list(self.dht)
        out["roles"] = list(self.roles)
        return {"kind": "node-record", **out}


def record_key(swarm: str, node_id: str) -> str:
    return f"p2pnn:{swarm}:node:{node_id}"


def dht_digest(key: str) -> bytes:
    """The 160-bit DHT address kademlia files ``key`` under (its own ``digest``)."""
    return hashlib.sha1(key.encode()).digest()


def sign_record(record: NodeRecord, ident: Identity, cred: SwarmCredential) -> str:
    assert record.node_id == ident.node_id, "a node signs its own record only"
    return seal(record.body(), ident, cred)


def read_record(
    text: Any, cred: SwarmCredential, *, now: float, key_digest: bytes | None = None, expired_ok: bool = False
) -> NodeRecord:
    """The record in ``text`` if it is valid now; ``key_digest``: the DHT key it was found under.

    ``expired_ok``: accept a record past its end (to learn how new a stored copy is, never to use it).

    Error handling: raises RecordError naming the problem; readers drop such data.
    """
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    if not isinstance(text, str):
        raise RecordError(f"not a record: a {type(text).__name__}")
    try:
        body = open_envelope(text, cred)
    except EnvelopeError as exc:
        raise RecordError(str(exc)) from None
    try:
        if body["kind"] != "node-record":
            raise RecordError("not a node record")
        record = NodeRecord(
            node_id=body["id"], dht=(str(body["dht"][0]), int(body["dht"][1])), peer=str(body["peer"]),
            api=str(body["api"]), capabilities=dict(body["capabilities"]), prefers=str(body["prefers"]),
            priority=int(body["priority"]), roles=tuple(str(r) for r in body["roles"]),
            an_id=None if body["an_id"] is None else str(body["an_id"]), load=dict(body["load"]),
            term=int(body["term"]), timestamp=float(body["timestamp"]), expires_at=float(body["expires_at"]),
            public_key=str(body["pub"]),
        )
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise RecordError(f"malformed record: {exc!r}") from None
    if key_digest is not None and dht_digest(record_key(cred.name, record.node_id)) != key_digest:
        raise RecordError("record stored under another node's key")
    if record.timestamp > now + CLOCK_SKEW:
        raise RecordError("record from the future")
    if record.expires_at <= now and not expired_ok:
        raise RecordError("record expired")
    if record.expires_at - record.timestamp > MAX_TTL:
        raise RecordError("record claims too long a life")
    return record


@functools.lru_cache(maxsize=1)  # asked once per process: nvidia-smi takes a while, and a machine does not change
def capabilities() -> dict[str, Any]:
    """CPU cores, memory, GPUs (through nvidia-smi, when present) and torch's version: without importing torch."""
    memory = 0
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    memory = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = None
    return {"cpu_cores": os.cpu_count() or 1, "memory_bytes": memory, "gpus": _gpus(), "torch": torch_version}


def _gpus() -> list[dict[str, Any]]:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        name, _, mib = line.rpartition(",")
        try:
            gpus.append({"name": name.strip(), "memory_bytes": int(float(mib)) * 1024 * 1024})
        except ValueError:
            continue
    return gpus
