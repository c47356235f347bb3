"""NodeRecord: what a node publishes about itself in the DHT, signed and expiring.

The record travels as a signed envelope (:mod:`p2pnn.credential`) in JSON
text, because kademlia values are plain str/bytes/int/float. It is stored
under the key ``p2pnn:<swarm>:node:<node id>``; the kademlia node id of the
publishing node is the same 160-bit id, so the ids found in a routing table
name the keys to read.

Liveness without re-signing: a record carries the anchor (``chain``) of a
hash chain of ``links`` links, one per ``beat`` seconds, whose seed only its
owner knows. To say "still alive" at beat *i* the owner reveals the *i*-th
link back from the anchor (a :class:`Beat`); anyone checks it with *i*
SHA-256 hashes (fewer from a beat already checked), no signature. So a
record is signed and verified once per content change (and once per chain,
CHAIN_SECONDS), while its beats travel in bulk, and still only the owner can
keep itself alive: a beat cannot be made from older ones.
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
CHAIN_BYTES = 16  # a link of the liveness hash chain: SHA-256 cut to 128 bits, still beyond any preimage search
CHAIN_SECONDS = 1800.0  # a record's chain covers this long; the owner signs a new record (new chain) before it ends
MAX_LINKS = 4096  # bounds the hashes a reader spends on one beat (a tiny beat interval cannot make a chain huge)
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
    chain: str = ""  # hex anchor of the liveness hash chain (empty: the record lives until expires_at only)
    beat: float = 0.0  # seconds between two links of the chain
    links: int = 0  # links in the chain

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
            public_key=str(body["pub"]), chain=str(body.get("chain", "")), beat=float(body.get("beat", 0.0)),
            links=int(body.get("links", 0)),
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
    if record.chain and (len(record.chain) != 2 * CHAIN_BYTES or not 0 < record.links <= MAX_LINKS
                         or not record.beat > 0):
        raise RecordError("malformed liveness chain")
    return record


@dataclass(frozen=True)
class Beat:
    """A member's proof of life at beat ``index`` of its record ``version`` (the record's timestamp)."""

    version: float
    index: int
    reveal: bytes


def chain_step(link: bytes) -> bytes:
    return hashlib.sha256(link).digest()[:CHAIN_BYTES]


def make_chain(links: int) -> list[bytes]:
    """A fresh hash chain: element 0 is the secret seed, element ``links`` the anchor put in the record."""
    chain = [os.urandom(CHAIN_BYTES)]
    for _ in range(links):
        chain.append(chain_step(chain[-1]))
    return chain


def beat_time(record: NodeRecord, index: int) -> float:
    """When the owner of ``record`` may reveal beat ``index`` at the earliest."""
    return record.timestamp + index * record.beat


def check_beat(record: NodeRecord, beat: Beat, known: Beat | None, *, now: float) -> bool:
    """True when ``beat`` is a link of ``record``'s chain, not from the future; ``known``: a beat already checked.

    Costs ``beat.index`` hashes at most, ``beat.index - known.index`` from a known earlier beat.
    """
    if (not record.chain or beat.version != record.timestamp or not 0 < beat.index <= record.links
            or len(beat.reveal) != CHAIN_BYTES or beat_time(record, beat.index) > now + CLOCK_SKEW):
        return False
    if known is not None and known.version == beat.version and 0 < known.index < beat.index:
        target, steps = known.reveal, beat.index - known.index
    else:
        target, steps = bytes.fromhex(record.chain), beat.index
    link = beat.reveal
    for _ in range(steps):
        link = chain_step(link)
    return link == target


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
