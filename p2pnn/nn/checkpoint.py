"""Training checkpoints: model, optimizer, epoch and RNG state in one safetensors file.

Tensors go in as tensors (``model.*``, ``optim.<param>.<key>``, ``rng.*``);
everything else (the epoch, the progress of the epochs done, the optimizer's
hyper-parameters) is JSON in the file's metadata. Nothing is pickled, so a
checkpoint that comes back from the store is read without trusting it with
code execution.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

# The safetensors metadata key that holds the checkpoint's JSON header.
META_KEY = "p2pnn.checkpoint"
# Bumped when the layout changes, so an old file is refused by name.
FORMAT = 1
# The spec fields that shape a training run: a checkpoint resumes only the run it came from.
# workers, device, amp, determinism and the checkpoint interval may change between attempts.
RUN_FIELDS = ("model", "dataset", "optimizer", "lr", "weight_decay", "epochs", "batch_size", "seed",
              "lr_schedule", "normalize")


class CheckpointError(ValueError):
    """A checkpoint file is unreadable or belongs to another run; the message is one line."""


@dataclass(frozen=True)
class Checkpoint:
    """What a resumed run needs: the epoch done, the progress so far, and the tensors."""

    epoch: int
    history: list[dict[str, Any]]
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, torch.Tensor]


def run_key(spec: dict[str, Any]) -> str:
    """A digest of the fields of ``spec`` that shape its training run."""
    fields = {name: spec.get(name) for name in RUN_FIELDS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def save(
    path: Path, *, spec: dict[str, Any], epoch: int, history: list[dict[str, Any]], net: nn.Module,
    optimizer: torch.optim.Optimizer, rng: dict[str, torch.Tensor],
) -> None:
    """Write the state after ``epoch`` to ``path`` (a fresh file the caller owns)."""
    from safetensors.torch import save_file

    tensors = {f"model.{name}": t.detach().cpu().contiguous() for name, t in net.state_dict().items()}
    state = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    tensors.update({f"rng.{name}": t.cpu().contiguous() for name, t in rng.items()})
    header = {
        "format": FORMAT, "run": run_key(spec), "epoch": epoch, "history": history,
        "param_groups": state["param_groups"], "optim_scalars": scalars,
    }
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(header)})


def load(path: Path | str, spec: dict[str, Any]) -> Checkpoint:
    """Read a checkpoint of the run ``spec`` describes.

    Error handling: raises CheckpointError when the file is not a readable
    checkpoint or was written by a run with other ``RUN_FIELDS``.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        header = json.loads(metadata[META_KEY])
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint: not a readable checkpoint file ({type(exc).__name__})") from None
    if header.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint: unknown format {header.get('format')!r}")
    if header.get("run") != run_key(spec):
        raise CheckpointError("checkpoint: written by a run with another model, data set or schedule")
    model = {name[len("model."):]: t for name, t in tensors.items() if name.startswith("model.")}
    rng = {name[len("rng."):]: t for name, t in tensors.items() if name.startswith("rng.")}
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = t
    for index, values in header["optim_scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = header["param_groups"]
    for group in groups:
        # JSON has no tuples; optimizers unpack betas either way, but keep their own type.
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    return Checkpoint(
        epoch=int(header["epoch"]), history=list(header["history"]), model=model,
        optimizer={"state": state, "param_groups": groups}, rng=rng,
    )
