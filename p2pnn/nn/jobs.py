"""Jobs: execute one normalised task spec (see ``p2pnn.tasks``) and return its result.

Each ``run_*`` returns ``(result, artifacts)``: a JSON-ready dict and a map of
artifact name to the path of a file written under the job's work directory.
Torch is imported on the first non-echo job, not with this module, so a worker
that only ever echoes starts in a fraction of a second.

Weights travel as safetensors with the recipe to rebuild the model in the
file's metadata; nothing is ever pickled or unpickled.
"""

from __future__ import annotations

import json
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

Report = Callable[[dict[str, Any]], None]
Artifacts = dict[str, str]

MODEL_FILE = "model.safetensors"
# The safetensors metadata key that holds the JSON recipe to rebuild the model.
META_KEY = "p2pnn.model"
# Bumped when the recipe's fields change, so an old file is refused by name, not by a KeyError.
META_FORMAT = 1
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
        )


# --- echo ----------------------------------------------------------------------


def run_echo(spec: dict[str, Any]) -> tuple[dict[str, Any], Artifacts]:
    """Sleep ``spec['sleep']`` seconds, then hand the payload back: a probe of the whole pipeline."""
    time.sleep(float(spec.get("sleep", 0.0)))
    return {"payload": spec.get("payload")}, {}


# --- train ---------------------------------------------------------------------


def run_train(
    spec: dict[str, Any], report: Report, workdir: Path | str, *, limits: Limits = Limits()
) -> tuple[dict[str, Any], Artifacts]:
    """Train the model of a normalised train spec and save its weights under ``workdir``.

    ``report`` gets one progress dict per epoch. The same spec gives the same
    metrics on CPU: the seed drives initialisation, dropout and shuffling.

    Resource handling: writes ``workdir/model.safetensors`` (the caller owns
    and removes it); holds the whole data set in memory on the device.
    Error handling: raises JobError for a spec the limits or this machine
    refuse (``retryable`` when another machine could run it, e.g. no GPU here).
    """
    import torch

    from p2pnn.nn.data import load_dataset
    from p2pnn.nn.models import build_model

    # Imports are the worker's start-up cost, not the task's: the clock starts after them.
    started = time.perf_counter()
    if spec["epochs"] > limits.max_epochs:
        raise JobError(f"spec.epochs: {spec['epochs']} is more than the limit of {limits.max_epochs}")
    device = _device(spec["device"])
    x, y, x_test, y_test = _checked(load_dataset(spec["dataset"]), limits)
    recipe = ModelRecipe.from_train_spec(spec)
    _deterministic(device)
    torch.manual_seed(spec["seed"])
    model = build_model(recipe.model, recipe.sample_shape, recipe.out_features).to(device)
    optimizer = _optimizer(spec, model)
    classify = recipe.problem == "classification"
    loss_fn = torch.nn.CrossEntropyLoss() if classify else torch.nn.MSELoss()
    # Shuffling has its own generator so it does not shift with how many numbers init drew.
    shuffler = torch.Generator().manual_seed(spec["seed"])
    x, y, x_test, y_test = (t.to(device) for t in (x, y, x_test, y_test))
    batch, samples = spec["batch_size"], len(x)

    epochs: list[dict[str, Any]] = []
    for epoch in range(1, spec["epochs"] + 1):
        model.train()
        order = torch.randperm(samples, generator=shuffler).to(device)
        loss_sum, correct = 0.0, 0
        for start in range(0, samples, batch):
            idx = order[start : start + batch]
            out = _shaped(model(x[idx]), classify)
            loss = loss_fn(out, y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(idx)
            if classify:
                correct += int((out.argmax(dim=1) == y[idx]).sum())
        progress: dict[str, Any] = {"epoch": epoch, "epochs": spec["epochs"], "loss": round(loss_sum / samples, DIGITS)}
        if classify:
            progress["accuracy"] = round(correct / samples, DIGITS)
        test = _measure(model, x_test, y_test, classify, EVAL_CHUNK)
        progress["test_loss"] = test["loss"]
        if classify:
            progress["test_accuracy"] = test["accuracy"]
        epochs.append(progress)
        report(progress)

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    weights = workdir / MODEL_FILE
    _save(model, recipe, weights)
    result: dict[str, Any] = {
        "problem": recipe.problem,
        "epochs": epochs,
        "test_loss": test["loss"],
        "sample_shape": recipe.sample_shape,
        "classes": recipe.classes,
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": device.type,
        "train_samples": samples,
        "test_samples": len(x_test),
    }
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
        x, y = all_samples(ds)
        split = "all"
    else:
        _, _, x, y = load_dataset(ds)
        split = "test"
    _checked((x, y, x[:0], y[:0]), limits)
    classify = recipe.problem == "classification"
    if classify and int(y.max()) >= recipe.out_features:
        raise JobError(f"spec.dataset: label {int(y.max())} is outside the model's {recipe.out_features} classes")
    measured = _measure(model, x.to(device), y.to(device), classify, spec.get("batch_size", EVAL_CHUNK))
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


def _deterministic(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    # warn_only: an op without a deterministic kernel should slow nothing down or fail a task.
    torch.use_deterministic_algorithms(True, warn_only=True)


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
    """Loss (mean over samples) plus accuracy, or MSE and R², in eval mode."""
    import torch

    model.eval()
    loss_sum, correct = 0.0, 0
    with torch.inference_mode():
        outs = [_shaped(model(xc), classify) for xc in x.split(chunk)]
        for out, yc in zip(outs, y.split(chunk)):
            if classify:
                loss_sum += float(torch.nn.functional.cross_entropy(out, yc, reduction="sum"))
                correct += int((out.argmax(dim=1) == yc).sum())
            else:
                loss_sum += float(((out - yc) ** 2).sum())
    count = max(1, len(x))
    loss = loss_sum / count
    if classify:
        return {"loss": round(loss, DIGITS), "accuracy": round(correct / count, DIGITS)}
    spread = float(((y - y.mean()) ** 2).sum()) if len(y) > 1 else 0.0
    r2 = 1.0 - loss_sum / spread if spread > 0 else 0.0
    return {"loss": round(loss, DIGITS), "mse": round(loss, DIGITS), "r2": round(r2, DIGITS)}


def _save(model: nn.Module, recipe: ModelRecipe, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, str(path), metadata={META_KEY: recipe.to_json()})


def _load(model_file: Path | str, source_spec: dict[str, Any] | None, device: torch.device) -> tuple[nn.Module, ModelRecipe]:
    """Rebuild the trained model from its weights file (recipe in the metadata) on ``device``."""
    from safetensors import SafetensorError
    from safetensors import safe_open

    from p2pnn.nn.models import build_model

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
            if raw.pop("format", None) != META_FORMAT:
                raise ValueError("unknown format")
            recipe = ModelRecipe(**raw)
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
    model = build_model(recipe.model, recipe.sample_shape, recipe.out_features)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise JobError(f"model file: weights do not fit the model ({_one_line(exc)})") from None
    return model.to(device).eval(), recipe


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."

