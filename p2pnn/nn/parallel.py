"""Data-parallel groups: one worker process per rank, joined through torch.distributed.

A :class:`Group` is what the placer hands each rank: its rank, the group's
size, and the rendezvous address and port (rank 0's node, a port from that
node's configured range). :func:`joined` makes the process a member:

- the rendezvous store (a ``TCPStore``) listens on a socket this module binds
  to the advertised address only, never the wildcard;
- gloo and NCCL open their peer connections on the network interface that
  holds that address (``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME``);
- ``backend: auto`` first joins a gloo group, sums one tensor saying whether
  each rank trains on a GPU, and adds an NCCL group when every rank does.

Only tensor collectives are used (``all_reduce``), never the object ones that
pickle their payload.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

BACKENDS = ("auto", "gloo", "nccl")
# Linux ioctl that reads an interface's IPv4 address.
_SIOCGIFADDR = 0x8915
# How long a rank waits for the others at rendezvous and in a collective before failing the attempt.
DEFAULT_TIMEOUT = 120.0


@dataclass(frozen=True)
class Group:
    """One rank's place in a data-parallel group, as it travels in a job."""

    rank: int
    world: int
    address: str
    port: int
    backend: str = "auto"
    timeout: float = DEFAULT_TIMEOUT

    @classmethod
    def from_json(cls, raw: Any) -> Group:
        """Error handling: raises ValueError naming the field that is missing or wrong."""
        if not isinstance(raw, dict):
            raise ValueError("group: must be an object")
        try:
            group = cls(
                rank=int(raw["rank"]), world=int(raw["world"]), address=str(raw["address"]),
                port=int(raw["port"]), backend=str(raw.get("backend", "auto")),
                timeout=float(raw.get("timeout", DEFAULT_TIMEOUT)),
            )
        except KeyError as exc:
            raise ValueError(f"group: missing field {exc}") from None
        if not 0 <= group.rank < group.world:
            raise ValueError(f"group.rank: {group.rank} is outside a group of {group.world}")
        if group.backend not in BACKENDS:
            raise ValueError(f"group.backend: must be one of {', '.join(BACKENDS)}")
        ipaddress.ip_address(group.address)  # a literal address: nothing is resolved by name
        return group


@dataclass(frozen=True)
class Comm:
    """A joined group: rank, size, the process group gradients and metrics travel on."""

    rank: int
    world: int
    backend: str
    group: Any  # torch.distributed.ProcessGroup

    def all_sum(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over every rank, in place (it must live where the backend wants it)."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)


def interface_of(address: str) -> str | None:
    """The name of the local network interface holding IPv4 ``address`` (``lo`` for 127.0.0.1)."""
    if ipaddress.ip_address(address).version != 4:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                reply = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, request)
            except OSError:
                continue  # no IPv4 address on this interface
            if socket.inet_ntoa(reply[20:24]) == address:
                return name
    if ipaddress.ip_address(address).is_loopback:
        return "lo"  # 127.0.0.0/8 beyond .1 lives on lo too
    return None


@contextlib.contextmanager
def joined(group: Group, device: torch.device) -> Iterator[Comm]:
    """Join ``group`` for the body of the ``with``; leave it (and free its sockets) afterwards.

    Resource handling: rank 0 binds ``group.address:group.port`` for the
    rendezvous store, which owns the socket until it is dropped; every rank's
    gloo/NCCL sockets are closed by ``destroy_process_group``.
    Error handling: raises RuntimeError (torch's DistBackendError) when the
    others do not arrive within ``group.timeout`` or a peer disappears; the
    attempt fails and the placer decides what happens next.
    """
    interface = interface_of(group.address)
    if interface is not None:
        # Read by gloo and NCCL when they create their device: peer traffic stays on this interface.
        os.environ["GLOO_SOCKET_IFNAME"] = interface
        os.environ["NCCL_SOCKET_IFNAME"] = interface
    timeout = timedelta(seconds=group.timeout)
    listen_fd = None
    if group.rank == 0:
        # Bound here, to the one address, and handed over: the store owns (and closes) the socket.
        with socket.create_server((group.address, group.port), backlog=max(16, group.world * 2)) as listener:
            listen_fd = listener.detach()
    try:
        store = dist.TCPStore(
            group.address, group.port, world_size=group.world, is_master=group.rank == 0, timeout=timeout,
            wait_for_workers=False, master_listen_fd=listen_fd,
        )
    except BaseException:
        if listen_fd is not None:
            os.close(listen_fd)  # never handed over
        raise
    dist.init_process_group("gloo", store=store, rank=group.rank, world_size=group.world, timeout=timeout)
    try:
        backend, process_group = "gloo", dist.group.WORLD
        if group.backend == "nccl" or (group.backend == "auto" and device.type == "cuda"):
            gpus = torch.tensor([1 if device.type == "cuda" else 0], dtype=torch.int64)
            dist.all_reduce(gpus)
            if int(gpus) == group.world:
                backend, process_group = "nccl", dist.new_group(backend="nccl", timeout=timeout)
            elif group.backend == "nccl":
                raise RuntimeError("backend nccl: not every rank of the group trains on a GPU")
        yield Comm(rank=group.rank, world=group.world, backend=backend, group=process_group)
    finally:
        dist.destroy_process_group()
