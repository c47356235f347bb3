"""Spec validation: defaults filled in, every wrong field named, no torch needed."""

import pytest

from p2pnn.tasks import Limits, SpecError, State, Task, check_against_model, sweep_trials, validate_spec

LIMITS = Limits()


def test_defaults_make_the_demo_training():
    spec = validate_spec({"kind": "train"}, LIMITS)
    assert spec["model"]["name"] == "mlp" and spec["dataset"]["name"] == "digits"
    assert (spec["optimizer"], spec["lr"], spec["epochs"], spec["batch_size"], spec["seed"]) == ("adam", 3e-3, 40, 64, 0)
    assert (spec["lr_schedule"], spec["normalize"], spec["deterministic"], spec["amp"]) == ("cosine", "standardize", "auto", "none")
    assert (spec["workers"], spec["min_workers"], spec["backend"], spec["checkpoint_every"]) == (1, 1, "auto", 5)
    assert spec["dataset"]["sample_shape"] == [8, 8]


@pytest.mark.parametrize(
    "raw, path",
    [
        (None, "spec"),
        ({"kind": 3}, "spec.kind"),
        ({"kind": "train", "epochs": 1.5}, "spec.epochs"),
        ({"kind": "train", "epochs": True}, "spec.epochs"),
        ({"kind": "train", "lr": float("nan")}, "spec.lr"),
        ({"kind": "train", "model": {"name": "mlp", "hidden": []}}, "spec.model.hidden"),
        ({"kind": "train", "model": {"name": "transformer", "d_model": 30, "heads": 4},
          "dataset": {"name": "digits"}}, "spec.model.heads"),
        ({"kind": "train", "model": {"name": "transformer"}, "dataset": {"name": "synthetic"}}, "spec.model.name"),
        ({"kind": "train", "dataset": {"name": "synthetic", "features": 1, "classes": 3}}, "spec.dataset.classes"),
        ({"kind": "train", "dataset": {"name": "synthetic", "features": 6, "shape": [4, 2]}}, "spec.dataset.shape"),
        ({"kind": "train", "dataset": {"name": "inline", "x": [[1.0]] * 4, "y": [0, 1]}}, "spec.dataset.y"),
        ({"kind": "train", "dataset": {"name": "inline", "x": [[1.0]] * 4, "y": [0, 1, 0, -1]}}, "spec.dataset.y"),
        ({"kind": "train", "dataset": {"name": "inline", "x": [[[[[1.0]]]]] * 4, "y": [0] * 4}}, "spec.dataset.x"),
        ({"kind": "infer", "model_task": "t", "inputs": [1.0, 2.0]}, "spec.inputs"),
        ({"kind": "infer", "model_task": "", "inputs": [[1.0]]}, "spec.model_task"),
        ({"kind": "echo", "max_attempts": 0}, "spec.max_attempts"),
        ({"kind": "train", "deterministic": "yes"}, "spec.deterministic"),
        ({"kind": "train", "amp": "fp16"}, "spec.amp"),
        ({"kind": "train", "lr_schedule": "step"}, "spec.lr_schedule"),
        ({"kind": "train", "workers": 0}, "spec.workers"),
        ({"kind": "train", "workers": 2, "min_workers": 3}, "spec.min_workers"),
        ({"kind": "train", "workers": 4, "batch_size": 2}, "spec.batch_size"),
        ({"kind": "train", "backend": "mpi"}, "spec.backend"),
        ({"kind": "train", "checkpoint_every": -1}, "spec.checkpoint_every"),
        ({"kind": "sweep", "space": {}}, "spec.space"),
        ({"kind": "sweep", "space": {"lr": {"log_uniform": [0, 1]}}}, "spec.space.lr.log_uniform[0]"),
        ({"kind": "sweep", "space": {"lr": {"normal": [0, 1]}}}, "spec.space.lr"),
        ({"kind": "sweep", "space": {"kind": ["echo"]}}, "spec.space.kind"),
        ({"kind": "sweep", "space": {"lr": [0.1]}, "metric": "f1"}, "spec.metric"),
        ({"kind": "sweep", "space": {"epochs": [5, 5000]}}, "spec.trials[1].epochs"),
        ({"kind": "sweep", "base": {"lr": -1}, "space": {"epochs": [5]}}, "spec.lr"),
    ],
)
def test_invalid_fields_are_named(raw, path):
    with pytest.raises(SpecError) as err:
        validate_spec(raw, LIMITS)
    assert err.value.path == path


def _trained(**dataset) -> Task:
    spec = validate_spec({"kind": "train", "dataset": dataset or {"name": "digits"}}, LIMITS)
    return Task(id="m", kind="train", spec=spec, state=State.SUCCEEDED, owner="o", attempts=1, max_attempts=3,
                created_at=0, updated_at=0)


def test_infer_inputs_must_match_the_models_sample_shape():
    model = _trained()
    check_against_model(validate_spec({"kind": "infer", "model_task": "m", "inputs": [[[0.0] * 8] * 8]}, LIMITS), model)
    with pytest.raises(SpecError, match=r"shape \[8, 8\]"):
        check_against_model(validate_spec({"kind": "infer", "model_task": "m", "inputs": [[0.0] * 64]}, LIMITS), model)


def test_evaluate_dataset_must_suit_the_model():
    model = _trained(name="synthetic", features=4, classes=2)
    ok = validate_spec({"kind": "evaluate", "model_task": "m", "dataset": {"name": "synthetic", "features": 4}}, LIMITS)
    check_against_model(ok, model)
    for dataset, path in [
        ({"name": "synthetic", "features": 4, "problem": "regression"}, "spec.dataset.problem"),
        ({"name": "synthetic", "features": 4, "classes": 5}, "spec.dataset"),
        ({"name": "synthetic", "features": 5}, "spec.dataset"),
    ]:
        with pytest.raises(SpecError) as err:
            check_against_model(validate_spec({"kind": "evaluate", "model_task": "m", "dataset": dataset}, LIMITS), model)
        assert err.value.path == path


def test_unfinished_or_missing_model_task_is_refused():
    spec = validate_spec({"kind": "evaluate", "model_task": "m"}, LIMITS)
    with pytest.raises(SpecError, match="no task"):
        check_against_model(spec, None)
    running = Task(**{**_trained().__dict__, "state": State.RUNNING})
    with pytest.raises(SpecError, match="not a succeeded train task"):
        check_against_model(spec, running)


def test_a_sweep_expands_grid_and_random_dimensions_into_seeded_trials():
    raw = {"kind": "sweep", "base": {"epochs": 5}, "trials": 6,
           "space": {"lr": {"log_uniform": [1e-4, 1e-2]}, "model.hidden": [[64], [128, 64]]}}
    spec = validate_spec(raw, LIMITS)
    assert spec == validate_spec(raw, LIMITS)  # same seed, same trials
    assert len(spec["trials"]) == 6 and all(1e-4 <= t["lr"] <= 1e-2 for t in spec["trials"])
    assert [t["model.hidden"] for t in spec["trials"]] == [[64], [128, 64]] * 3  # the grid, cycled
    assert (spec["metric"], spec["mode"], spec["parallelism"]) == ("test_accuracy", "max", 2)
    assert spec["early_stopping"] == {"rule": "median", "grace_epochs": 3, "min_trials": 3}
    trial = sweep_trials(spec)[1]
    assert trial["model"] == {"name": "mlp", "hidden": [128, 64]} and trial["epochs"] == 5
    grid = validate_spec({"kind": "sweep", "space": {"lr": [1e-3, 3e-3], "batch_size": [32, 64, 128]}}, LIMITS)
    assert len(grid["trials"]) == 6 and len({tuple(t.values()) for t in grid["trials"]}) == 6
    part = validate_spec({"kind": "sweep", "trials": 4, "space": {"lr": [1e-3, 3e-3], "batch_size": [32, 64, 128]}}, LIMITS)
    assert len(part["trials"]) == 4 and len({tuple(t.values()) for t in part["trials"]}) == 4
    other_seed = validate_spec({**raw, "seed": 1}, LIMITS)
    assert other_seed["trials"] != spec["trials"]
