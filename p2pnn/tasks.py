"""Tasks: the record that travels, its states, and the validation of task specs.

Nothing here imports torch: the daemon validates every spec before it is
stored, so a worker process only ever sees specs that passed these checks.
A spec that fails raises :class:`SpecError`, whose ``path`` names the field.
"""

from __future__ import annotations

import enum
import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any


class State(str, enum.Enum):
    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({State.SUCCEEDED, State.FAILED, State.CANCELLED})

KINDS = ("train", "evaluate", "infer", "echo", "sweep")
MODELS = ("mlp", "cnn", "transformer")
DATASETS = ("digits", "synthetic", "inline")
OPTIMIZERS = ("adam", "adamw", "sgd")
DEVICES = ("cpu", "cuda", "auto")
LR_SCHEDULES = ("constant", "cosine")
NORMALIZATIONS = ("standardize", "none")
AMP_MODES = ("none", "bf16")
BACKENDS = ("auto", "gloo", "nccl")
# Ranks one data-parallel train task may ask for: a group is placed all at once, so it must fit a swarm.
MAX_WORKERS = 64
PROBLEMS = ("classification", "regression")

# scikit-learn's bundled digits: 1,797 images of 8x8 pixels, ten classes.
DIGITS_SHAPE = (8, 8)
DIGITS_CLASSES = 10


class SpecError(ValueError):
    """A task spec is invalid; ``path`` names the offending field (``spec.lr``)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


@dataclass(frozen=True)
class Limits:
    """Resource caps enforced at submission and again in the worker."""

    max_epochs: int = 200
    max_wall_seconds: float = 3600.0
    max_tensor_elements: int = 1_000_000
    max_samples: int = 100_000


@dataclass(frozen=True)
class Task:
    id: str
    kind: str
    spec: dict[str, Any]
    state: State
    owner: str
    attempts: int
    max_attempts: int
    created_at: float
    updated_at: float
    started_at: float | None = None
    finished_at: float | None = None
    lease_owner: str | None = None
    lease_expires_at: float | None = None
    cancel_requested: bool = False
    progress: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    idempotency_key: str | None = None
    artifacts: list[str] = field(default_factory=list)
    # The sweep this task is a trial of (None: submitted on its own).
    parent: str | None = None

    def to_json(self) -> dict[str, Any]:
        # Shallow on purpose: asdict() deep-copies spec, progress and result recursively,
        # which costs a copy of every inline dataset and fails on deeply nested payloads.
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["state"] = self.state.value
        out["artifacts"] = list(self.artifacts)
        return out


# --- spec validation -------------------------------------------------------


def _finite_real(value: Any) -> bool:
    """A finite int or float (not a bool). An int too large for a float counts as not finite."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _shown(value: Any) -> str:
    """A value for an error message: a huge number or string is cut, not echoed whole."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**50 else f"an integer of {len(str(abs(value)))} digits"
    return text if len(text) <= 80 else text[:77] + "..."


def _number(value: Any, path: str, *, lo: float, hi: float) -> float:
    if not _finite_real(value):
        raise SpecError(path, f"must be a finite number, got {_shown(value)}")
    if not lo <= value <= hi:
        raise SpecError(path, f"must be between {lo} and {hi}, got {_shown(value)}")
    return float(value)


def _integer(value: Any, path: str, *, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(path, f"must be an integer, got {_shown(value)}")
    if not lo <= value <= hi:
        raise SpecError(path, f"must be between {lo} and {hi}, got {_shown(value)}")
    return value


def _choice(value: Any, path: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise SpecError(path, f"must be one of {', '.join(choices)}, got {_shown(value)}")
    return value


def _object(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SpecError(path, f"must be an object, got {type(value).__name__}")
    return value


def _no_extra(obj: dict[str, Any], path: str, allowed: set[str]) -> None:
    extra = sorted(set(obj) - allowed)
    if extra:
        raise SpecError(f"{path}.{extra[0]}", f"unknown field (allowed: {', '.join(sorted(allowed))})")


def _int_list(value: Any, path: str, *, lo: int, hi: int, max_len: int) -> list[int]:
    if not isinstance(value, list) or not value or len(value) > max_len:
        raise SpecError(path, f"must be a list of 1 to {max_len} integers")
    return [_integer(v, f"{path}[{i}]", lo=lo, hi=hi) for i, v in enumerate(value)]


def tensor_shape(value: Any, path: str, limits: Limits) -> tuple[int, ...]:
    """The shape of a nested list of numbers; refuses ragged, empty, non-numeric or oversized data.

    Error handling: raises SpecError naming the first offending element.
    """
    shape: list[int] = []
    probe = value
    while isinstance(probe, list):
        if not probe:
            raise SpecError(path, "must not contain empty lists")
        shape.append(len(probe))
        probe = probe[0]
    if not shape:
        raise SpecError(path, "must be a (nested) list of numbers")
    elements = math.prod(shape)
    if elements > limits.max_tensor_elements:
        raise SpecError(
            path, f"has {elements} elements, more than the limit of {limits.max_tensor_elements}"
        )

    def walk(node: Any, depth: int, where: str) -> None:
        if depth == len(shape):
            if not _finite_real(node):
                raise SpecError(where, f"must be a finite number, got {_shown(node)}")
            return
        if not isinstance(node, list) or len(node) != shape[depth]:
            raise SpecError(where, f"is ragged: expected a list of {shape[depth]} at depth {depth}")
        for i, child in enumerate(node):
            walk(child, depth + 1, f"{where}[{i}]")

    walk(value, 0, path)
    return tuple(shape)


def _dataset(raw: Any, path: str, limits: Limits) -> dict[str, Any]:
    ds = _object(raw, path)
    name = _choice(ds.get("name"), f"{path}.name", DATASETS)
    if name == "digits":
        _no_extra(ds, path, {"name", "test_fraction"})
        return {
            "name": "digits",
            "problem": "classification",
            "test_fraction": _number(ds.get("test_fraction", 0.2), f"{path}.test_fraction", lo=0.05, hi=0.5),
            "sample_shape": list(DIGITS_SHAPE),
            "classes": DIGITS_CLASSES,
        }
    if name == "synthetic":
        _no_extra(ds, path, {"name", "problem", "samples", "features", "classes", "shape", "noise", "seed", "test_fraction"})
        problem = _choice(ds.get("problem", "classification"), f"{path}.problem", PROBLEMS)
        samples = _integer(ds.get("samples", 1000), f"{path}.samples", lo=10, hi=limits.max_samples)
        features = _integer(ds.get("features", 20), f"{path}.features", lo=1, hi=4096)
        if samples * features > limits.max_tensor_elements:
            raise SpecError(f"{path}.samples", f"samples x features exceeds the limit of {limits.max_tensor_elements} elements")
        shape = [features]
        if "shape" in ds:
            shape = _int_list(ds["shape"], f"{path}.shape", lo=1, hi=4096, max_len=3)
            if math.prod(shape) != features:
                raise SpecError(f"{path}.shape", f"product {math.prod(shape)} must equal features {features}")
        out = {
            "name": "synthetic",
            "problem": problem,
            "samples": samples,
            "features": features,
            "sample_shape": shape,
            "noise": _number(ds.get("noise", 0.1), f"{path}.noise", lo=0.0, hi=10.0),
            "seed": _integer(ds.get("seed", 0), f"{path}.seed", lo=0, hi=2**31 - 1),
            "test_fraction": _number(ds.get("test_fraction", 0.2), f"{path}.test_fraction", lo=0.05, hi=0.5),
        }
        if problem == "classification":
            out["classes"] = _integer(ds.get("classes", 2), f"{path}.classes", lo=2, hi=1000)
            if out["classes"] > 2 ** features:  # the generator needs 2**informative >= classes
                raise SpecError(f"{path}.classes", f"at most {2 ** features} classes with {features} features")
        return out
    # inline
    _no_extra(ds, path, {"name", "problem", "x", "y", "test_fraction"})
    problem = _choice(ds.get("problem", "classification"), f"{path}.problem", PROBLEMS)
    if "x" not in ds or "y" not in ds:
        raise SpecError(path, "an inline dataset needs both x and y")
    x_shape = tensor_shape(ds["x"], f"{path}.x", limits)
    if len(x_shape) < 2:
        raise SpecError(f"{path}.x", "must be a list of samples (at least two dimensions)")
    if len(x_shape) > 4:
        raise SpecError(f"{path}.x", "must have at most four dimensions (samples x up to three)")
    y_shape = tensor_shape(ds["y"], f"{path}.y", limits)
    if len(y_shape) != 1 or y_shape[0] != x_shape[0]:
        raise SpecError(f"{path}.y", f"must be a flat list of {x_shape[0]} targets, one per sample of x")
    if x_shape[0] < 4:
        raise SpecError(f"{path}.x", "needs at least 4 samples")
    out = {
        "name": "inline",
        "problem": problem,
        "x": ds["x"],
        "y": ds["y"],
        "sample_shape": list(x_shape[1:]),
        "test_fraction": _number(ds.get("test_fraction", 0.25), f"{path}.test_fraction", lo=0.05, hi=0.5),
    }
    if problem == "classification":
        labels = ds["y"]
        if any(float(v) != int(v) or v < 0 for v in labels):
            raise SpecError(f"{path}.y", "classification targets must be non-negative integers")
        out["classes"] = max(2, int(max(labels)) + 1)
    return out


DEFAULT_MLP_HIDDEN = [256]  # see DEFAULT_LR


def _model(raw: Any, path: str, sample_shape: list[int]) -> dict[str, Any]:
    m = _object(raw, path)
    name = _choice(m.get("name"), f"{path}.name", MODELS)
    dropout = _number(m.get("dropout", 0.0), f"{path}.dropout", lo=0.0, hi=0.9)
    if name == "mlp":
        _no_extra(m, path, {"name", "hidden", "dropout", "activation"})
        return {
            "name": "mlp",
            "hidden": _int_list(m.get("hidden", DEFAULT_MLP_HIDDEN), f"{path}.hidden", lo=1, hi=8192, max_len=8),
            "dropout": dropout,
            "activation": _choice(m.get("activation", "relu"), f"{path}.activation", ("relu", "gelu", "tanh")),
        }
    if name == "cnn":
        _no_extra(m, path, {"name", "channels", "kernel_size", "hidden", "dropout"})
        side = math.isqrt(sample_shape[0]) if len(sample_shape) == 1 else 0
        if not (len(sample_shape) in (2, 3) or (len(sample_shape) == 1 and side * side == sample_shape[0])):
            raise SpecError(
                f"{path}.name",
                f"cnn needs image-shaped samples ([H, W], [C, H, W] or a square number of features), got {sample_shape}",
            )
        return {
            "name": "cnn",
            "channels": _int_list(m.get("channels", [16, 32]), f"{path}.channels", lo=1, hi=512, max_len=4),
            "kernel_size": _integer(m.get("kernel_size", 3), f"{path}.kernel_size", lo=1, hi=7),
            "hidden": _integer(m.get("hidden", 64), f"{path}.hidden", lo=1, hi=8192),
            "dropout": dropout,
        }
    _no_extra(m, path, {"name", "d_model", "heads", "layers", "ff", "dropout"})
    if len(sample_shape) != 2:
        raise SpecError(f"{path}.name", f"transformer needs sequence samples [T, F], got {sample_shape}")
    d_model = _integer(m.get("d_model", 32), f"{path}.d_model", lo=4, hi=1024)
    heads = _integer(m.get("heads", 4), f"{path}.heads", lo=1, hi=32)
    if d_model % heads:
        raise SpecError(f"{path}.heads", f"must divide d_model ({d_model})")
    return {
        "name": "transformer",
        "d_model": d_model,
        "heads": heads,
        "layers": _integer(m.get("layers", 2), f"{path}.layers", lo=1, hi=12),
        "ff": _integer(m.get("ff", 64), f"{path}.ff", lo=4, hi=8192),
        "dropout": dropout,
    }


TRAIN_FIELDS = {
    "kind", "model", "dataset", "optimizer", "lr", "epochs", "batch_size", "seed", "weight_decay", "device",
    "max_attempts", "lr_schedule", "normalize", "deterministic", "amp", "checkpoint_every", "workers",
    "min_workers", "backend",
}
# With standardised inputs, a cosine decay of the rate per step and one hidden layer of 256,
# the default MLP on digits reaches scikit-learn's MLPClassifier(128) on every seed,
# seed 0 (the demo's) included (scripts/bench_training.py measures both).
DEFAULT_LR = 3e-3
DEFAULT_EPOCHS = 40
# Every few epochs a train task's state is saved, so a dead Ki costs at most this many epochs.
DEFAULT_CHECKPOINT_EVERY = 5


def _train(spec: dict[str, Any], limits: Limits) -> dict[str, Any]:
    _no_extra(spec, "spec", TRAIN_FIELDS)
    dataset = _dataset(spec.get("dataset", {"name": "digits"}), "spec.dataset", limits)
    model = _model(spec.get("model", {"name": "mlp"}), "spec.model", dataset["sample_shape"])
    epochs = _integer(spec.get("epochs", DEFAULT_EPOCHS), "spec.epochs", lo=1, hi=limits.max_epochs)
    deterministic = spec.get("deterministic", "auto")
    if deterministic != "auto" and not isinstance(deterministic, bool):
        raise SpecError("spec.deterministic", f"must be true, false or \"auto\" (on CPU only), got {deterministic!r}")
    workers = _integer(spec.get("workers", 1), "spec.workers", lo=1, hi=MAX_WORKERS)
    min_workers = _integer(spec.get("min_workers", workers), "spec.min_workers", lo=1, hi=workers)
    batch_size = _integer(spec.get("batch_size", 64), "spec.batch_size", lo=1, hi=65536)
    if batch_size < workers:
        raise SpecError("spec.batch_size", f"must be at least workers ({workers}): each rank takes a slice of a batch")
    return {
        "kind": "train",
        "model": model,
        "dataset": dataset,
        "optimizer": _choice(spec.get("optimizer", "adam"), "spec.optimizer", OPTIMIZERS),
        "lr": _number(spec.get("lr", DEFAULT_LR), "spec.lr", lo=1e-7, hi=10.0),
        "weight_decay": _number(spec.get("weight_decay", 0.0), "spec.weight_decay", lo=0.0, hi=1.0),
        "epochs": epochs,
        "batch_size": batch_size,
        "seed": _integer(spec.get("seed", 0), "spec.seed", lo=0, hi=2**31 - 1),
        "device": _choice(spec.get("device", "cpu"), "spec.device", DEVICES),
        "lr_schedule": _choice(spec.get("lr_schedule", "cosine"), "spec.lr_schedule", LR_SCHEDULES),
        "normalize": _choice(spec.get("normalize", "standardize"), "spec.normalize", NORMALIZATIONS),
        "deterministic": deterministic,
        "amp": _choice(spec.get("amp", "none"), "spec.amp", AMP_MODES),
        "checkpoint_every": _integer(
            spec.get("checkpoint_every", DEFAULT_CHECKPOINT_EVERY), "spec.checkpoint_every", lo=0, hi=limits.max_epochs
        ),
        "workers": workers,
        "min_workers": min_workers,
        "backend": _choice(spec.get("backend", "auto"), "spec.backend", BACKENDS),
    }


# --- sweeps ---------------------------------------------------------------------

# Trials one sweep may run: each is a task of its own.
MAX_TRIALS = 200
# Trials a sweep runs at once when the spec does not say.
DEFAULT_PARALLELISM = 2
# Per-epoch metrics a sweep can rank trials by (what every train progress report carries).
SWEEP_METRICS = ("test_accuracy", "test_loss", "accuracy", "loss")
DISTRIBUTIONS = ("log_uniform", "uniform", "int_uniform")
STOPPING_RULES = ("median", "none")


def sweep_trials(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The raw train spec of every trial of a normalised sweep spec, in trial order."""
    out = []
    for params in spec["trials"]:
        raw = json_copy(spec["base"])
        for path, value in params.items():
            _set_path(raw, path.split("."), value)
        out.append(raw)
    return out


def json_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: json_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_copy(v) for v in value]
    return value


def _set_path(target: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        nxt = target.get(key)
        if not isinstance(nxt, dict):
            # model.hidden on a base without a model: start from the train spec's default object.
            nxt = {"name": "mlp"} if key == "model" else {"name": "digits"} if key == "dataset" else {}
            target[key] = nxt
        target = nxt
    target[keys[-1]] = json_copy(value)


def _space(raw: Any) -> tuple[dict[str, list[Any]], dict[str, tuple[str, float, float]]]:
    space = _object(raw, "spec.space")
    if not space:
        raise SpecError("spec.space", "needs at least one dimension")
    grid: dict[str, list[Any]] = {}
    drawn: dict[str, tuple[str, float, float]] = {}
    for path, dim in space.items():
        where = f"spec.space.{path}"
        if not isinstance(path, str) or not path or any(not k for k in path.split(".")) or path.split(".")[0] == "kind":
            raise SpecError(where, "must be a dotted path into the train spec (lr, model.hidden, ...)")
        if isinstance(dim, list):
            if not dim or len(dim) > MAX_TRIALS:
                raise SpecError(where, f"a list of 1 to {MAX_TRIALS} values")
            grid[path] = dim
        elif isinstance(dim, dict) and len(dim) == 1 and next(iter(dim)) in DISTRIBUTIONS:
            name, bounds = next(iter(dim.items()))
            if not isinstance(bounds, list) or len(bounds) != 2:
                raise SpecError(f"{where}.{name}", "must be [low, high]")
            lo = _number(bounds[0], f"{where}.{name}[0]", lo=-1e12, hi=1e12)
            hi = _number(bounds[1], f"{where}.{name}[1]", lo=lo, hi=1e12)
            if name == "log_uniform" and lo <= 0:
                raise SpecError(f"{where}.{name}[0]", "must be above 0 for a log-uniform draw")
            drawn[path] = (name, lo, hi)
        else:
            raise SpecError(where, f"must be a list of values or one of {{{', '.join(DISTRIBUTIONS)}: [low, high]}}")
    return grid, drawn


def _sweep(spec: dict[str, Any], limits: Limits) -> dict[str, Any]:
    import itertools
    import random

    _no_extra(spec, "spec", {"kind", "base", "space", "trials", "parallelism", "metric", "mode", "early_stopping",
                             "seed", "max_attempts"})
    base = dict(_object(spec.get("base", {}), "spec.base"))
    base.pop("kind", None)
    base_spec = _train(base, limits)  # the base alone must be a valid train spec
    grid, drawn = _space(spec.get("space"))
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] or [{}]
    seed = _integer(spec.get("seed", 0), "spec.seed", lo=0, hi=2**31 - 1)
    rng = random.Random(seed)
    default_trials = len(points) if not drawn else max(len(points), 10)
    trials = _integer(spec.get("trials", min(default_trials, MAX_TRIALS)), "spec.trials", lo=1, hi=MAX_TRIALS)
    if trials < len(points):
        points = rng.sample(points, trials)  # a budget below the grid: a random part of it
    chosen = []
    for i in range(trials):
        params = dict(points[i % len(points)])
        for path, (name, lo, hi) in drawn.items():
            if name == "log_uniform":
                params[path] = round(math.exp(rng.uniform(math.log(lo), math.log(hi))), 10)
            elif name == "uniform":
                params[path] = round(rng.uniform(lo, hi), 10)
            else:
                params[path] = rng.randint(math.ceil(lo), math.floor(hi))
        chosen.append(params)
    problem = base_spec["dataset"]["problem"]
    metric = _choice(spec.get("metric", "test_accuracy" if problem == "classification" else "test_loss"),
                     "spec.metric", SWEEP_METRICS)
    if problem != "classification" and "accuracy" in metric:
        raise SpecError("spec.metric", f"a {problem} base has no {metric}")
    stopping = _object(spec.get("early_stopping", {}), "spec.early_stopping")
    _no_extra(stopping, "spec.early_stopping", {"rule", "grace_epochs", "min_trials"})
    out = {
        "kind": "sweep",
        "base": base,
        "trials": chosen,
        "parallelism": _integer(spec.get("parallelism", DEFAULT_PARALLELISM), "spec.parallelism", lo=1, hi=64),
        "metric": metric,
        "mode": _choice(spec.get("mode", "min" if metric.endswith("loss") else "max"), "spec.mode", ("min", "max")),
        "early_stopping": {
            "rule": _choice(stopping.get("rule", "median"), "spec.early_stopping.rule", STOPPING_RULES),
            "grace_epochs": _integer(stopping.get("grace_epochs", 3), "spec.early_stopping.grace_epochs",
                                     lo=1, hi=limits.max_epochs),
            "min_trials": _integer(stopping.get("min_trials", 3), "spec.early_stopping.min_trials", lo=1, hi=MAX_TRIALS),
        },
        "seed": seed,
    }
    for i, raw in enumerate(sweep_trials(out)):
        try:
            _train(raw, limits)
        except SpecError as exc:
            raise SpecError(f"spec.trials[{i}]{exc.path[4:]}", f"{exc.message} (params {chosen[i]})") from None
    return out


def _model_task(spec: dict[str, Any]) -> str:
    ref = spec.get("model_task")
    if not isinstance(ref, str) or not ref:
        raise SpecError("spec.model_task", "must be the id of a succeeded train task")
    return ref


def validate_spec(raw: Any, limits: Limits) -> dict[str, Any]:
    """Check a submitted spec and return it normalised, with every default filled in.

    Shapes that depend on another task (``infer`` inputs against the model's
    input shape) are checked by :func:`check_against_model`, once the model
    task has been read from the store.

    Error handling: raises SpecError; never anything else for any JSON value.
    """
    spec = _object(raw, "spec")
    kind = _choice(spec.get("kind"), "spec.kind", KINDS)
    if kind == "echo":
        _no_extra(spec, "spec", {"kind", "payload", "sleep", "max_attempts"})
        out: dict[str, Any] = {
            "kind": "echo",
            "payload": spec.get("payload"),
            "sleep": _number(spec.get("sleep", 0.0), "spec.sleep", lo=0.0, hi=limits.max_wall_seconds),
        }
    elif kind == "train":
        out = _train(spec, limits)
    elif kind == "sweep":
        out = _sweep(spec, limits)
    elif kind == "evaluate":
        _no_extra(spec, "spec", {"kind", "model_task", "dataset", "batch_size", "device", "max_attempts"})
        out = {
            "kind": "evaluate",
            "model_task": _model_task(spec),
            "dataset": _dataset(spec["dataset"], "spec.dataset", limits) if "dataset" in spec else None,
            "batch_size": _integer(spec.get("batch_size", 256), "spec.batch_size", lo=1, hi=65536),
            "device": _choice(spec.get("device", "cpu"), "spec.device", DEVICES),
        }
    else:
        _no_extra(spec, "spec", {"kind", "model_task", "inputs", "device", "max_attempts"})
        if "inputs" not in spec:
            raise SpecError("spec.inputs", "is required: a list of samples")
        shape = tensor_shape(spec["inputs"], "spec.inputs", limits)
        if len(shape) < 2:
            raise SpecError("spec.inputs", "must be a list of samples (at least two dimensions)")
        out = {
            "kind": "infer",
            "model_task": _model_task(spec),
            "inputs": spec["inputs"],
            "device": _choice(spec.get("device", "cpu"), "spec.device", DEVICES),
        }
    if "max_attempts" in spec:
        out["max_attempts"] = _integer(spec["max_attempts"], "spec.max_attempts", lo=1, hi=20)
    return out


def check_against_model(spec: dict[str, Any], model_task: Task | None) -> None:
    """Refuse an evaluate/infer spec whose model task is missing, unfinished or of the wrong shape."""
    if model_task is None:
        raise SpecError("spec.model_task", f"no task {spec['model_task']}")
    if model_task.kind != "train" or model_task.state is not State.SUCCEEDED:
        raise SpecError("spec.model_task", f"task {model_task.id} is not a succeeded train task")
    expected = list(model_task.spec["dataset"]["sample_shape"])
    if spec["kind"] == "infer":
        got = list(tensor_shape(spec["inputs"], "spec.inputs", Limits(max_tensor_elements=2**62))[1:])
        if got != expected:
            raise SpecError("spec.inputs", f"each sample must have shape {expected}, got {got}")
    elif spec.get("dataset") is not None:
        ds, trained_on = spec["dataset"], model_task.spec["dataset"]
        if list(ds["sample_shape"]) != expected:
            raise SpecError("spec.dataset", f"samples must have shape {expected}, got {list(ds['sample_shape'])}")
        if ds["problem"] != trained_on["problem"]:
            raise SpecError("spec.dataset.problem", f"the model was trained for {trained_on['problem']}")
        if ds.get("classes", 0) > trained_on.get("classes", 0):
            raise SpecError("spec.dataset", f"has {ds['classes']} classes; the model knows {trained_on['classes']}")


# An echo task sleeping no longer than this is known to be short. Only such tasks are sent
# ahead of a free slot: for a task of unknown length the few milliseconds saved are nothing,
# and it could hold up the tasks queued behind it at its Ki.
SHORT_SECONDS = 0.1


def needs_of(spec: dict[str, Any]) -> dict[str, Any]:
    """What a Ki must offer to run a task (an An matches it against Ki beats), whether the task is
    known to be short (``short``: only those are forwarded ahead of a free slot), and for a
    data-parallel task how many ranks it needs."""
    short = spec.get("kind") == "echo" and float(spec.get("sleep") or 0) <= SHORT_SECONDS
    needs: dict[str, Any] = {"gpu": spec.get("device") == "cuda", "short": short}
    if spec.get("workers", 1) > 1:
        needs["workers"], needs["min_workers"] = spec["workers"], spec.get("min_workers", spec["workers"])
    return needs
