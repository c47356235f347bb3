"""Specification of the torch side: models, data sets and job runners, with real torch."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from p2pnn.nn import jobs
from p2pnn.nn.data import load_dataset
from p2pnn.nn.jobs import JobError
from p2pnn.nn.models import build_model
from p2pnn.nn.parallel import Group
from p2pnn.tasks import Limits, validate_spec

LIMITS = Limits()


def train(raw: dict[str, Any], workdir: Path, limits: Limits = LIMITS) -> tuple[dict[str, Any], str, list[dict[str, Any]]]:
    progress: list[dict[str, Any]] = []
    result, artifacts = jobs.run_train(validate_spec({"kind": "train", **raw}, LIMITS), progress.append, workdir, limits=limits)
    return result, artifacts["model.safetensors"], progress


@pytest.mark.slow
def test_default_digits_training_reaches_95_percent_and_its_weights_reload(tmp_path: Path) -> None:
    source = validate_spec({"kind": "train"}, LIMITS)
    result, weights, progress = train({}, tmp_path)

    assert result["test_accuracy"] >= 0.97
    assert result["problem"] == "classification" and result["classes"] == 10
    assert result["sample_shape"] == [8, 8] and result["device"] == "cpu"
    assert [p["epoch"] for p in progress] == list(range(1, 41)) and result["epochs"] == progress
    assert set(progress[-1]) == {"epoch", "epochs", "loss", "accuracy", "test_loss", "test_accuracy"}
    assert progress[-1]["loss"] < progress[0]["loss"]

    evaluated, _ = jobs.run_evaluate(validate_spec({"kind": "evaluate", "model_task": "t"}, LIMITS), weights, source)
    assert evaluated["accuracy"] == result["test_accuracy"]
    assert evaluated["loss"] == pytest.approx(result["test_loss"], abs=1e-5)
    assert evaluated["samples"] == 360 and evaluated["split"] == "test"

    _, _, x_test, y_test = load_dataset(source["dataset"])
    infer = validate_spec({"kind": "infer", "model_task": "t", "inputs": x_test[:3].tolist()}, LIMITS)
    answer, _ = jobs.run_infer(infer, weights, source)
    assert len(answer["classes"]) == 3
    assert sum(c == y for c, y in zip(answer["classes"], y_test[:3].tolist())) >= 2
    assert all(abs(sum(row) - 1.0) < 1e-4 and len(row) == 10 for row in answer["probabilities"])


def test_weights_are_safetensors_carrying_the_recipe_to_rebuild_the_model(tmp_path: Path) -> None:
    _, weights, _ = train({"epochs": 1}, tmp_path)
    with safe_open(weights, framework="pt") as handle:
        recipe = json.loads(handle.metadata()["p2pnn.model"])
    assert recipe["model"]["name"] == "mlp" and recipe["sample_shape"] == [8, 8] and recipe["out_features"] == 10


def test_same_spec_and_seed_give_identical_metrics(tmp_path: Path) -> None:
    spec = {"epochs": 3, "model": {"name": "mlp", "hidden": [32], "dropout": 0.2}}
    first, _, _ = train(spec, tmp_path / "a")
    second, _, _ = train(spec, tmp_path / "b")
    other_seed, _, _ = train({**spec, "seed": 1}, tmp_path / "c")
    assert first["epochs"] == second["epochs"]
    assert first["test_loss"] == second["test_loss"]
    assert other_seed["epochs"] != first["epochs"]


def test_cnn_on_digits_beats_chance(tmp_path: Path) -> None:
    result, _, _ = train({"model": {"name": "cnn", "channels": [8, 16]}, "epochs": 3, "lr": 3e-3}, tmp_path)
    assert result["test_accuracy"] > 0.5


def test_transformer_on_digits_beats_chance(tmp_path: Path) -> None:
    result, _, _ = train({"model": {"name": "transformer", "layers": 1}, "epochs": 3, "lr": 3e-3}, tmp_path)
    assert result["test_accuracy"] > 0.3


@pytest.mark.parametrize(
    ("model", "shape"),
    [
        ({"name": "cnn", "channels": [4], "kernel_size": 3, "hidden": 8, "dropout": 0.0}, [16]),
        ({"name": "cnn", "channels": [4, 4], "kernel_size": 2, "hidden": 8, "dropout": 0.1}, [3, 5, 7]),
        ({"name": "mlp", "hidden": [4, 4], "dropout": 0.0, "activation": "gelu"}, [2, 3, 4]),
    ],
)
def test_models_accept_every_sample_shape_the_spec_allows(model: dict[str, Any], shape: list[int]) -> None:
    net = build_model(model, shape, 3)
    assert net(torch.zeros(5, *shape)).shape == (5, 3)


def test_regression_on_synthetic_data_learns_and_reports_mse_and_r2(tmp_path: Path) -> None:
    raw = {"dataset": {"name": "synthetic", "problem": "regression", "samples": 400, "features": 8}, "epochs": 15, "lr": 3e-3}
    result, weights, progress = train(raw, tmp_path)
    assert result["problem"] == "regression" and result["classes"] is None
    assert result["test_r2"] > 0.8 and result["test_mse"] == result["test_loss"]
    assert "accuracy" not in progress[0]
    source = validate_spec({"kind": "train", **raw}, LIMITS)
    evaluated, _ = jobs.run_evaluate(validate_spec({"kind": "evaluate", "model_task": "t"}, LIMITS), weights, source)
    assert evaluated["mse"] == pytest.approx(result["test_mse"], abs=1e-5)
    infer = validate_spec({"kind": "infer", "model_task": "t", "inputs": [[0.0] * 8, [1.0] * 8]}, LIMITS)
    assert len(jobs.run_infer(infer, weights, source)[0]["outputs"]) == 2


def test_synthetic_classification_is_seeded_and_shaped() -> None:
    spec = validate_spec({"kind": "train", "dataset": {"name": "synthetic", "classes": 4, "features": 12, "shape": [3, 4], "seed": 7}}, LIMITS)["dataset"]
    x, y, x_test, y_test = load_dataset(spec)
    again = load_dataset(spec)
    assert x.shape[1:] == (3, 4) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(x) + len(x_test) == 1000 and set(y.tolist()) == {0, 1, 2, 3}
    assert torch.equal(x, again[0]) and torch.equal(y_test, again[3])


def test_inline_dataset_trains_and_an_explicit_one_is_evaluated_whole(tmp_path: Path) -> None:
    xs = [[float(i % 2), float(i % 3)] for i in range(40)]
    ys = [i % 2 for i in range(40)]
    raw = {"dataset": {"name": "inline", "x": xs, "y": ys}, "epochs": 30, "lr": 1e-2, "batch_size": 8}
    result, weights, _ = train(raw, tmp_path)
    assert result["train_samples"] == 30 and result["test_samples"] == 10
    assert result["test_accuracy"] == 1.0
    source = validate_spec({"kind": "train", **raw}, LIMITS)
    spec = validate_spec({"kind": "evaluate", "model_task": "t", "dataset": {"name": "inline", "x": xs, "y": ys}}, LIMITS)
    evaluated, _ = jobs.run_evaluate(spec, weights, source)
    assert evaluated == {**evaluated, "samples": 40, "split": "all", "accuracy": 1.0}


def test_worker_side_limits_refuse_what_the_caps_forbid(tmp_path: Path) -> None:
    with pytest.raises(JobError, match=r"spec.epochs: 5 is more than the limit of 2"):
        train({"epochs": 5}, tmp_path, limits=Limits(max_epochs=2))
    with pytest.raises(JobError, match=r"spec.dataset: 115008 elements, more than the limit of 1000"):
        train({"epochs": 1}, tmp_path, limits=Limits(max_tensor_elements=1000))


def test_infer_and_evaluate_refuse_what_does_not_fit_the_model(tmp_path: Path) -> None:
    source = validate_spec({"kind": "train", "epochs": 1}, LIMITS)
    _, weights, _ = train({"epochs": 1}, tmp_path)
    infer = validate_spec({"kind": "infer", "model_task": "t", "inputs": [[1.0, 2.0]]}, LIMITS)
    with pytest.raises(JobError, match=r"each sample must have shape \[8, 8\], got \[2\]"):
        jobs.run_infer(infer, weights, source)
    other = validate_spec({"kind": "train", "model": {"name": "mlp", "hidden": [64]}}, LIMITS)
    evaluate = validate_spec({"kind": "evaluate", "model_task": "t"}, LIMITS)
    with pytest.raises(JobError, match="does not match the train spec"):
        jobs.run_evaluate(evaluate, weights, other)
    (tmp_path / "junk.safetensors").write_bytes(b"not a weights file")
    with pytest.raises(JobError, match="not a readable safetensors file"):
        jobs.run_evaluate(evaluate, tmp_path / "junk.safetensors", source)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_a_clear_retryable_error(tmp_path: Path) -> None:
    with pytest.raises(JobError, match="no usable CUDA device") as info:
        train({"epochs": 1, "device": "cuda"}, tmp_path)
    assert info.value.retryable
    result, _, _ = train({"epochs": 1, "device": "auto"}, tmp_path)
    assert result["device"] == "cpu"


def test_echo_hands_the_payload_back() -> None:
    assert jobs.run_echo({"kind": "echo", "payload": {"a": [1]}, "sleep": 0.0}) == ({"payload": {"a": [1]}}, {})


# --- preprocessing, determinism, checkpoints, data-parallel groups ---------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_models_carry_their_input_scaling_so_inference_takes_raw_pixels(tmp_path: Path) -> None:
    raw = {"epochs": 2}
    source = validate_spec({"kind": "train", **raw}, LIMITS)
    result, weights, _ = train(raw, tmp_path)
    with safe_open(weights, framework="pt") as handle:
        names = set(handle.keys())
        recipe = json.loads(handle.metadata()["p2pnn.model"])
    assert {"p2pnn.input.mean", "p2pnn.input.spread"} <= names and recipe["normalize"] == "standardize"
    _, _, x_test, y_test = load_dataset(source["dataset"])
    assert float(x_test.max()) == 16.0  # the data set's own units: pixel intensities 0..16
    evaluated, _ = jobs.run_evaluate(validate_spec({"kind": "evaluate", "model_task": "t"}, LIMITS), weights, source)
    assert evaluated["accuracy"] == result["test_accuracy"]
    answer, _ = jobs.run_infer(validate_spec({"kind": "infer", "model_task": "t", "inputs": x_test[:40].tolist()}, LIMITS), weights, source)
    hits = sum(c == y for c, y in zip(answer["classes"], y_test[:40].tolist()))
    assert hits / 40 == pytest.approx(result["test_accuracy"], abs=0.15) and hits >= 20


def test_a_format_1_digits_model_still_takes_pixels_as_they_are(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = build_model({"name": "mlp", "hidden": [8]}, [8, 8], 10)
    recipe = {"format": 1, "model": {"name": "mlp", "hidden": [8], "dropout": 0.0, "activation": "relu"},
              "sample_shape": [8, 8], "out_features": 10, "problem": "classification", "classes": 10}
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "old.safetensors"),
              metadata={"p2pnn.model": json.dumps(recipe)})
    source = validate_spec({"kind": "train", "model": {"name": "mlp", "hidden": [8]}}, LIMITS)
    pixels = torch.full((1, 8, 8), 16.0)
    answer, _ = jobs.run_infer(validate_spec({"kind": "infer", "model_task": "t", "inputs": pixels.tolist()}, LIMITS),
                               tmp_path / "old.safetensors", source)
    expected = torch.softmax(net(pixels / 16.0), dim=1)[0].tolist()
    assert answer["probabilities"][0] == [round(p, 6) for p in expected]


def test_deterministic_defaults_to_on_for_cpu_and_is_reported(tmp_path: Path) -> None:
    on, _, _ = train({"epochs": 1}, tmp_path / "a")
    off, _, _ = train({"epochs": 1, "deterministic": False}, tmp_path / "b")
    assert on["deterministic"] is True and off["deterministic"] is False
    assert on["amp"] == "none" and on["resumed_at_epoch"] is None and on["workers"] == 1
    assert not torch.are_deterministic_algorithms_enabled()  # the last job's choice, not the first's


def test_a_run_resumed_from_its_checkpoint_ends_exactly_as_an_uninterrupted_one(tmp_path: Path) -> None:
    raw = {"epochs": 4, "checkpoint_every": 2, "model": {"name": "mlp", "hidden": [32], "dropout": 0.2}}
    spec = validate_spec({"kind": "train", **raw}, LIMITS)
    saved: list[tuple[int, str]] = []
    whole, _ = jobs.run_train(spec, lambda p: None, tmp_path / "a", on_checkpoint=lambda e, p: saved.append((e, p)))
    assert [e for e, _ in saved] == [2]  # not after the last epoch: the model file is that state
    with safe_open(saved[0][1], framework="pt") as handle:
        names = set(handle.keys())
    assert {"rng.torch", "rng.shuffle"} <= names and any(n.startswith("optim.") for n in names)

    resumed, _ = jobs.run_train(spec, lambda p: None, tmp_path / "b", resume_file=saved[0][1])
    assert resumed["resumed_at_epoch"] == 2
    assert resumed["epochs"] == whole["epochs"] and resumed["test_loss"] == whole["test_loss"]

    other = validate_spec({"kind": "train", **raw, "lr": 0.01}, LIMITS)
    with pytest.raises(JobError, match="another model, data set or schedule"):
        jobs.run_train(other, lambda p: None, tmp_path / "c", resume_file=saved[0][1])


def test_a_group_of_one_gives_bit_identical_metrics_to_the_plain_path(tmp_path: Path) -> None:
    spec = validate_spec({"kind": "train", "epochs": 2, "model": {"name": "mlp", "hidden": [32], "dropout": 0.1}}, LIMITS)
    plain, _ = jobs.run_train(spec, lambda p: None, tmp_path / "a")
    group = Group(rank=0, world=1, address="127.0.0.1", port=free_port())
    grouped, _ = jobs.run_train(spec, lambda p: None, tmp_path / "b", group=group)
    assert grouped["backend"] == "gloo" and grouped["workers"] == 1
    assert grouped["epochs"] == plain["epochs"] and grouped["test_loss"] == plain["test_loss"]


def test_synthetic_data_is_drawn_on_the_device_with_balanced_classes_and_flipped_labels() -> None:
    spec = validate_spec({"kind": "train", "dataset": {"name": "synthetic", "samples": 2000, "features": 16,
                                                        "classes": 5, "noise": 0.0}}, LIMITS)["dataset"]
    x, y, _, _ = load_dataset(spec, "cpu")
    assert x.device.type == "cpu" and torch.bincount(y, minlength=5).min() > 250
    noisy = load_dataset({**spec, "noise": 0.5}, "cpu")[1]
    assert 0.3 < float((noisy != y).float().mean()) < 0.5  # half relabelled at random, 4 in 5 of those change


def test_groups_meet_on_a_literal_address_and_its_interface() -> None:
    from p2pnn.nn.parallel import interface_of

    assert interface_of("127.0.0.1") == "lo" and interface_of("127.0.0.5") == "lo"
    with pytest.raises(ValueError):
        Group.from_json({"rank": 0, "world": 1, "address": "localhost", "port": 1})  # never resolved by name
    with pytest.raises(ValueError, match="group.rank"):
        Group.from_json({"rank": 2, "world": 2, "address": "127.0.0.1", "port": 1})
