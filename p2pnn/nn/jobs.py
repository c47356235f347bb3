"""Jobs: execute one normalised task spec (see ``p2pnn.tasks``) and return its result.

Each ``run_*`` returns ``(result, artifacts)``: a JSON-ready dict and a map of
artifact name to the path of a file written under the job's work directory.
Torch is imported on the first non-echo job, not with this module, so a worker
that only ever echoes starts in a fraction of a second.

Weights travel as safetensors with the recipe to rebuild the model in the
file's metadata; nothing is ever pickled or unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2pnn.tasks import Limits

if TYPE_CHECKING:
    import torch
    from torch import nn

    from p2pnn.nn.parallel import Comm, Group

Report = Callable[[dict[str, Any]], None]
# Called by rank 0 with the epoch and the path of the checkpoint file it just wrote.
OnCheckpoint = Callable[[int, str], None]
Artifacts = dict[str, str]

MODEL_FILE = "model.safetensors"
# The safetensors metadata key that holds the JSON recipe to rebuild the model.
META_KEY = "p2pnn.model"
# Bumped when the recipe's fields change, so an old file is refused by name, not by a KeyError.
# Format 1 files hold no input scaling (their digits models expect pixels / 16); format 2 adds it.
META_FORMAT = 2
# The tensors beside a model's weights that hold its input scaling (see models.Standardize).
INPUT_MEAN, INPUT_SPREAD = "p2pnn.input.mean", "p2pnn.input.spread"
# What a format-1 digits model divided its pixels by.
LEGACY_DIGITS_SCALE = 16.0
# Ranks other than 0 seed dropout with seed + stride * rank (+ epochs done): far apart, reproducible.
RANK_SEED_STRIDE = 1_000_003
# Test-set and inference passes run in chunks this large: big enough to be quick,
# small enough that a 1M-element data set never needs a second copy of itself in activations.
EVAL_CHUNK = 1024
# Metrics and probabilities are rounded so results read cleanly and compare across runs.
DIGITS = 6
# cuBLAS is deterministic only with a fixed workspace; it reads this before its first handle.
CUBLAS_WORKSPACE = ":4096:8"
# Plain SGD at the default learning rate barely moves in 20 epochs; momentum makes "sgd" useful.
SGD_MOMENTUM = 0.9


class JobError(Exception):
    """A job cannot run as specified; the message is one line meant for the user."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class ModelRecipe:
    """What it takes to rebuild a trained model: stored in the weights file's metadata."""

    model: dict[str, Any]
    sample_shape: list[int]
    out_features: int
    problem: str
    classes: int | None
    # "standardize": the file carries the train split's per-element mean and spread.
    normalize: str = "none"
    dataset: str | None = None

    def to_json(self) -> str:
        return json.dumps({"format": META_FORMAT, **self.__dict__}, sort_keys=True)

    @classmethod
    def from_train_spec(cls, spec: dict[str, Any]) -> ModelRecipe:
        ds = spec["dataset"]
        classes = ds.get("classes") if ds["problem"] == "classification" else None
        return cls(
            model=spec["model"],
            sample_shape=[int(s) for s in ds["sample_shape"]],
            out_features=classes if classes else 1,
            problem=ds["problem"],
            classes=classes,
            normalize=spec.get("normalize", "none"),
            dataset=ds["name"],
        )


# --- echo ----------------------------------------------------------------------


def run_echo(spec: dict[str, Any]) -> tuple[dict[str, Any], Artifacts]:
    """Sleep ``spec['sleep']`` seconds, then hand the payload back: a probe of the whole pipeline."""
    time.sleep(float(spec.get("sleep", 0.0)))
    return {"payload": spec.get("payload")}, {}


# --- train ---------------------------------------------------------------------


def run_train(
    spec: dict[str, Any],
    report: Report,
    workdir: Path | str,
    *,
    limits: Limits = Limits(),
    group: Group | None = None,
    resume_file: Path | str | None = None,
    on_checkpoint: OnCheckpoint | None = None,
) -> tuple[dict[str, Any], Artifacts]:
    """Train the model of a normalised train spec and save its weights under ``workdir``.

    ``report`` gets one progress dict per epoch. The same spec gives the same
    metrics on CPU: the seed drives initialisation, dropout and shuffling.

    With ``group`` this process is one rank of a data-parallel group (see
    ``p2pnn.nn.parallel``): every rank walks the same shuffled order and takes
    its slice of each global batch of ``batch_size``; gradients are averaged
    by DistributedDataParallel; rank 0 measures, reports, checkpoints and
    saves. A group of one gives the same metrics as no group at all.

    With ``resume_file`` (a checkpoint of this run) training continues after
    the checkpoint's epoch. Every ``checkpoint_every`` epochs (not after the
    last) rank 0 writes ``workdir/checkpoint-<epoch>.safetensors`` and calls
    ``on_checkpoint(epoch, path)``; the caller takes the file away.

    Resource handling: writes ``workdir/model.safetensors`` (the caller owns
    and removes it); holds the whole data set in memory on the device.
    Error handling: raises JobError for a spec the limits or this machine
    refuse (``retryable`` when another machine could run it, e.g. no GPU here)
    and for a checkpoint that does not belong to this run.
    """
    import torch

    from p2pnn.nn import parallel

    # Imports are the worker's start-up cost, not the task's: the clock starts after them.
    started = time.perf_counter()
    if spec["epochs"] > limits.max_epochs:
        raise JobError(f"spec.epochs: {spec['epochs']} is more than the limit of {limits.max_epochs}")
    device = _device(spec["device"])
    if group is None:
        return _train(spec, report, Path(workdir), limits, device, None, resume_file, on_checkpoint, started)
    try:
        with parallel.joined(group, device) as comm:
            return _train(spec, report, Path(workdir), limits, device, comm, resume_file, on_checkpoint, started)
    except RuntimeError as exc:
        # A peer vanished or never came (gloo reports a closed connection as a plain
        # RuntimeError, a timeout as DistError): the placer may form the group again.
        raise JobError(f"data-parallel group: {_one_line(exc)}", retryable=True) from None


def _train(
    spec: dict[str, Any], report: Report, workdir: Path, limits: Limits, device: torch.device,
    comm: Comm | None, resume_file: Path | str | None, on_checkpoint: OnCheckpoint | None, started: float,
) -> tuple[dict[str, Any], Artifacts]:
    import torch

    from p2pnn.nn import checkpoint
    from p2pnn.nn.data import load_dataset
    from p2pnn.nn.models import build_model, input_statistics

    rank, world = (comm.rank, comm.world) if comm is not None else (0, 1)
    deterministic = _set_determinism(spec.get("deterministic", "auto"), device)
    x, y, x_test, y_test = _checked(load_dataset(spec["dataset"], device), limits)
    recipe = ModelRecipe.from_train_spec(spec)
    stats = None
    if recipe.normalize == "standardize":
        # Train on scaled samples once, rather than scaling every batch; the model file keeps the scale.
        stats = input_statistics(x)
        x, x_test = (x - stats[0]) / stats[1], (x_test - stats[0]) / stats[1]
    torch.manual_seed(spec["seed"])
    net = build_model(recipe.model, recipe.sample_shape, recipe.out_features).to(device)
    optimizer = _optimizer(spec, net)
    classify = recipe.problem == "classification"
    loss_fn = torch.nn.CrossEntropyLoss() if classify else torch.nn.MSELoss()
    # Shuffling has its own generator so it does not shift with how many numbers init drew;
    # every rank draws the same order, so the slices of a global batch never overlap.
    shuffler = torch.Generator().manual_seed(spec["seed"])
    epochs, done = spec["epochs"], 0
    history: list[dict[str, Any]] = []
    if resume_file is not None:
        try:
            saved = checkpoint.load(resume_file, spec)
        except checkpoint.CheckpointError as exc:
            raise JobError(str(exc)) from None
        net.load_state_dict(saved.model, strict=True)
        optimizer.load_state_dict(saved.optimizer)
        _set_rng(saved.rng, shuffler, device)
        done, history = saved.epoch, saved.history
    if rank > 0:
        # Dropout differs across ranks, as it would across the samples of one big batch.
        torch.manual_seed(spec["seed"] + RANK_SEED_STRIDE * rank + done)
    model: torch.nn.Module = net
    if comm is not None:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(
            net, device_ids=[device.index or 0] if comm.backend == "nccl" else None, process_group=comm.group
        )
    batch, samples = spec["batch_size"], len(x)
    starts = list(range(0, samples, batch))
    if world > 1 and samples - starts[-1] < world:
        starts.pop()  # a last batch smaller than the group would leave a rank without samples
    total_steps = max(1, epochs * len(starts))
    cosine = spec.get("lr_schedule", "constant") == "cosine"
    base_lrs = [spec["lr"]] * len(optimizer.param_groups)  # a resumed optimizer holds the scaled rate
    amp = _amp(spec.get("amp", "none"), device)
    step = done * len(starts)
    test: dict[str, float] = {}

    for epoch in range(done + 1, epochs + 1):
        model.train()
        order = torch.randperm(samples, generator=shuffler).to(device, non_blocking=True)
        # Loss sum, correct count and sample count stay on the device: read once per epoch.
        totals = torch.zeros(3, dtype=torch.float64, device=device)
        for start in starts:
            idx = order[start : start + batch]
            if world > 1:
                idx = idx.tensor_split(world)[rank]
            if cosine:
                scale = 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
                for g, base in zip(optimizer.param_groups, base_lrs):
                    g["lr"] = base * scale
            xb, yb = x[idx], y[idx]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = _shaped(model(xb), classify)
                loss = loss_fn(out.float(), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            totals[0] += loss.detach() * len(idx)
            if classify:
                totals[1] += (out.argmax(dim=1) == yb).sum()
            totals[2] += len(idx)
        if comm is not None:
            if comm.backend != "nccl":
                totals = totals.cpu()
            comm.all_sum(totals)
        if rank > 0:
            continue
        loss_sum, correct, count = totals.tolist()
        progress: dict[str, Any] = {"epoch": epoch, "epochs": epochs, "loss": round(loss_sum / count, DIGITS)}
        if classify:
            progress["accuracy"] = round(correct / count, DIGITS)
        test = _measure(net, x_test, y_test, classify, EVAL_CHUNK)
        progress["test_loss"] = test["loss"]
        if classify:
            progress["test_accuracy"] = test["accuracy"]
        if world > 1:
            progress["workers"] = world
        history.append(progress)
        report(progress)
        every = spec.get("checkpoint_every", 0)
        if on_checkpoint is not None and every and epoch % every == 0 and epoch < epochs:
            workdir.mkdir(parents=True, exist_ok=True)
            path = workdir / f"checkpoint-{epoch}.safetensors"
            checkpoint.save(path, spec=spec, epoch=epoch, history=history, net=net, optimizer=optimizer,
                            rng=_get_rng(shuffler, device))
            on_checkpoint(epoch, str(path.resolve()))

    if rank > 0:
        return {"rank": rank, "workers": world}, {}
    if not test:  # resumed from a checkpoint of the last epoch: measure what it holds
        test = _measure(net, x_test, y_test, classify, EVAL_CHUNK)
    workdir.mkdir(parents=True, exist_ok=True)
    weights = workdir / MODEL_FILE
    _save(net, recipe, stats, weights)
    result: dict[str, Any] = {
        "problem": recipe.problem,
        "epochs": history,
        "test_loss": test["loss"],
        "sample_shape": recipe.sample_shape,
        "classes": recipe.classes,
        "parameters": sum(p.numel() for p in net.parameters()),
        "device": device.type,
        "train_samples": samples,
        "test_samples": len(x_test),
        "workers": world,
        "deterministic": deterministic,
        "amp": "bf16" if amp else "none",
        "resumed_at_epoch": done if resume_file is not None else None,
    }
    if comm is not None:
        result["backend"] = comm.backend
    if classify:
        result["test_accuracy"] = test["accuracy"]
    else:
        result["test_mse"], result["test_r2"] = test["mse"], test["r2"]
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result, {MODEL_FILE: str(weights.resolve())}


# --- evaluate / infer ----------------------------------------------------------


def run_evaluate(
    spec: dict[str, Any],
    model_file: Path | str,
    source_spec: dict[str, Any] | None,
    *,
    limits: Limits = Limits(),
) -> tuple[dict[str, Any], Artifacts]:
    """Measure a trained model on a data set.

    Without ``spec['dataset']`` the model is measured on the test split of the
    data set it was trained on. A given inline data set is measured whole (it is
    the user's evaluation data); a given digits or synthetic one by its test
    split (its train split is what a model trained on it has seen).

    Error handling: raises JobError when the weights file is unreadable, does
    not match ``source_spec``, or the data set does not fit the model.
    """
    from p2pnn.nn.data import all_samples, load_dataset

    started = time.perf_counter()
    device = _device(spec["device"])
    model, recipe = _load(model_file, source_spec, device)
    ds = spec.get("dataset") or (source_spec or {}).get("dataset")
    if ds is None:
        raise JobError("spec.dataset: none given and no source train spec to take it from")
    if list(ds["sample_shape"]) != recipe.sample_shape:
        raise JobError(f"spec.dataset: samples must have shape {recipe.sample_shape}, got {list(ds['sample_shape'])}")
    if ds["problem"] != recipe.problem:
        raise JobError(f"spec.dataset: a {ds['problem']} data set cannot measure a {recipe.problem} model")
    if spec.get("dataset") is not None and ds["name"] == "inline":
        x, y = all_samples(ds, device)
        split = "all"
    else:
        _, _, x, y = load_dataset(ds, device)
        split = "test"
    _checked((x, y, x[:0], y[:0]), limits)
    classify = recipe.problem == "classification"
    if classify and int(y.max()) >= recipe.out_features:
        raise JobError(f"spec.dataset: label {int(y.max())} is outside the model's {recipe.out_features} classes")
    measured = _measure(model, x, y, classify, spec.get("batch_size", EVAL_CHUNK))
    result: dict[str, Any] = {"loss": measured["loss"], "samples": len(x), "split": split}
    if classify:
        result["accuracy"] = measured["accuracy"]
    else:
        result["mse"], result["r2"] = measured["mse"], measured["r2"]
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result, {}


def run_infer(
    spec: dict[str, Any],
    model_file: Path | str,
    source_spec: dict[str, Any] | None,
    *,
    limits: Limits = Limits(),
) -> tuple[dict[str, Any], Artifacts]:
    """Run a trained model on ``spec['inputs']``.

    Classifiers give ``{"classes": [...], "probabilities": [[...]]}``;
    regressors give ``{"outputs": [...]}``; numbers rounded to 6 decimals.

    Error handling: raises JobError when the inputs do not have the model's
    sample shape or exceed ``limits.max_tensor_elements``.
    """
    import torch

    device = _device(spec["device"])
    model, recipe = _load(model_file, source_spec, device)
    try:
        inputs = torch.tensor(spec["inputs"], dtype=torch.float32)
    except (TypeError, ValueError) as exc:
        raise JobError(f"spec.inputs: not a rectangular list of numbers ({exc})") from None
    if inputs.numel() > limits.max_tensor_elements:
        raise JobError(
            f"spec.inputs: {inputs.numel()} elements, more than the limit of {limits.max_tensor_elements}"
        )
    if inputs.dim() < 2 or list(inputs.shape[1:]) != recipe.sample_shape:
        raise JobError(f"spec.inputs: each sample must have shape {recipe.sample_shape}, got {list(inputs.shape[1:])}")
    model.eval()
    with torch.inference_mode():
        out = torch.cat([model(chunk.to(device)) for chunk in inputs.split(EVAL_CHUNK)]).cpu()
    if recipe.problem == "classification":
        probabilities = torch.softmax(out, dim=1)
        return {
            "classes": out.argmax(dim=1).tolist(),
            "probabilities": [[round(p, DIGITS) for p in row] for row in probabilities.tolist()],
        }, {}
    return {"outputs": [round(v, DIGITS) for v in out[:, 0].tolist()]}, {}


# --- helpers -------------------------------------------------------------------


def _device(name: str) -> torch.device:
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        # Another Ki may have a GPU, so a retry elsewhere can succeed.
        raise JobError("spec.device: cuda was asked for but this worker has no usable CUDA device", retryable=True)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _set_determinism(option: bool | str, device: torch.device) -> bool:
    """Apply the spec's ``deterministic`` (``"auto"``: on CPU only); returns what was applied.

    Set on every job, both ways: the flag is process-wide and workers are reused.
    """
    import torch

    on = device.type == "cpu" if option == "auto" else bool(option)
    if on and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    # warn_only: an op without a deterministic kernel should slow nothing down or fail a task.
    torch.use_deterministic_algorithms(on, warn_only=True)
    return on


def _amp(option: str, device: torch.device) -> bool:
    """Whether to train under bf16 autocast: asked for, on a GPU whose kernels support it."""
    import torch

    return option == "bf16" and device.type == "cuda" and torch.cuda.is_bf16_supported()


def _get_rng(shuffler: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    import torch

    states = {"torch": torch.get_rng_state(), "shuffle": shuffler.get_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _set_rng(states: dict[str, torch.Tensor], shuffler: torch.Generator, device: torch.device) -> None:
    import torch

    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "shuffle" in states:
        shuffler.set_state(states["shuffle"])
    if "cuda" in states and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)


def _checked(split: tuple[torch.Tensor, ...], limits: Limits) -> tuple[torch.Tensor, ...]:
    x, _, x_test, _ = split
    elements = x.numel() + x_test.numel()
    if elements > limits.max_tensor_elements:
        raise JobError(f"spec.dataset: {elements} elements, more than the limit of {limits.max_tensor_elements}")
    if len(x) + len(x_test) > limits.max_samples:
        raise JobError(f"spec.dataset: {len(x) + len(x_test)} samples, more than the limit of {limits.max_samples}")
    if len(x) == 0:
        raise JobError("spec.dataset: no samples to train on")
    return split


def _optimizer(spec: dict[str, Any], model: nn.Module) -> torch.optim.Optimizer:
    import torch

    lr, decay = spec["lr"], spec.get("weight_decay", 0.0)
    if spec["optimizer"] == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=decay)
    if spec["optimizer"] == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=decay)
    if spec["optimizer"] == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, weight_decay=decay, momentum=SGD_MOMENTUM)
    raise JobError(f"spec.optimizer: unknown optimizer {spec['optimizer']!r}")


def _shaped(out: torch.Tensor, classify: bool) -> torch.Tensor:
    return out if classify else out[:, 0]


def _measure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, classify: bool, chunk: int) -> dict[str, float]:
    """Loss (mean over samples) plus accuracy, or MSE and R², in eval mode; one host read."""
    import torch

    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=x.device)
    with torch.inference_mode():
        for xc, yc in zip(x.split(chunk), y.split(chunk)):
            out = _shaped(model(xc), classify)
            if classify:
                totals[0] += torch.nn.functional.cross_entropy(out, yc, reduction="sum")
                totals[1] += (out.argmax(dim=1) == yc).sum()
            else:
                totals[0] += ((out - yc) ** 2).sum()
        if not classify and len(y) > 1:
            totals[1] = ((y - y.mean()) ** 2).sum()
    loss_sum, second = totals.tolist()
    count = max(1, len(x))
    loss = loss_sum / count
    if classify:
        return {"loss": round(loss, DIGITS), "accuracy": round(second / count, DIGITS)}
    r2 = 1.0 - loss_sum / second if second > 0 else 0.0
    return {"loss": round(loss, DIGITS), "mse": round(loss, DIGITS), "r2": round(r2, DIGITS)}


def _save(net: nn.Module, recipe: ModelRecipe, stats: tuple[torch.Tensor, torch.Tensor] | None, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {name: t.detach().cpu().contiguous() for name, t in net.state_dict().items()}
    if stats is not None:
        tensors[INPUT_MEAN], tensors[INPUT_SPREAD] = (t.detach().cpu().contiguous() for t in stats)
    save_file(tensors, str(path), metadata={META_KEY: recipe.to_json()})


def _load(model_file: Path | str, source_spec: dict[str, Any] | None, device: torch.device) -> tuple[nn.Module, ModelRecipe]:
    """Rebuild the trained model from its weights file (recipe in the metadata) on ``device``."""
    import torch
    from safetensors import SafetensorError
    from safetensors import safe_open

    from p2pnn.nn.models import Standardize, build_model

    try:
        with safe_open(str(model_file), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise JobError(f"model file: not a readable safetensors file ({_one_line(exc)})") from None
    expected = ModelRecipe.from_train_spec(source_spec) if source_spec else None
    if META_KEY in metadata:
        try:
            raw = json.loads(metadata[META_KEY])
            fmt = raw.pop("format", None)
            if fmt not in (1, META_FORMAT):
                raise ValueError("unknown format")
            recipe = ModelRecipe(**raw)
            if fmt == 1 and source_spec is not None:
                recipe = dataclasses.replace(recipe, dataset=source_spec["dataset"]["name"])
        except (ValueError, TypeError) as exc:
            raise JobError(f"model file: unreadable model recipe in its metadata ({_one_line(exc)})") from None
        if expected is not None and (recipe.model, recipe.sample_shape, recipe.out_features) != (
            expected.model, expected.sample_shape, expected.out_features
        ):
            raise JobError("model file: its model does not match the train spec of its model task")
    elif expected is not None:
        recipe = expected
    else:
        raise JobError("model file: no model recipe in its metadata and no source train spec")
    mean, spread = tensors.pop(INPUT_MEAN, None), tensors.pop(INPUT_SPREAD, None)
    model = build_model(recipe.model, recipe.sample_shape, recipe.out_features)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise JobError(f"model file: weights do not fit the model ({_one_line(exc)})") from None
    if recipe.normalize == "standardize":
        if mean is None or spread is None or list(mean.shape) != recipe.sample_shape or mean.shape != spread.shape:
            raise JobError("model file: its input scaling is missing or does not fit the model")
        model = Standardize(model, mean, spread)
    elif recipe.dataset == "digits" and mean is None:
        # A format-1 digits model was trained on pixels / 16: keep taking pixels as they are.
        model = Standardize(model, torch.zeros(recipe.sample_shape), torch.full(recipe.sample_shape, LEGACY_DIGITS_SCALE))
    return model.to(device).eval(), recipe


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."

