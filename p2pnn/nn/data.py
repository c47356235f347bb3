"""Data sets: turn a normalised dataset spec (see ``p2pnn.tasks``) into train/test tensors.

Every loader is deterministic: the same spec gives the same tensors, in the
same order, on every machine of the same device type. Synthetic data is drawn
with torch on the target device from a generator seeded by the spec, so a GPU
never waits for the CPU to make (and copy) a large data set; CPU and CUDA
generators are different streams, so a synthetic set drawn on a GPU differs
from the one drawn on a CPU for the same seed.

Samples are in the data set's own units (digits: pixel intensities 0..16);
scaling them is the model's business (``p2pnn.nn.models.Standardize``), so a
trained model takes the same units at inference.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]

# Inline data is split by a fixed permutation so a re-run (or another Ki) sees the same split.
INLINE_SPLIT_SEED = 0
# The digits split uses the seed the plain-torch reference script uses, so the two compare.
DIGITS_SPLIT_SEED = 0
# Distance of a synthetic class centre from the origin along each informative axis
# (scikit-learn's make_classification calls it class_sep): classes overlap, but learnably.
CLASS_SEPARATION = 1.0
# Class centres are distinct vertices of a hypercube; a permutation of 2**20 vertices is
# cheap on any device, and past 20 informative axes the rest of each vertex is drawn at random.
MAX_ENUMERATED_AXES = 20
# Redundant features (linear mixes of informative ones) a synthetic classification set carries.
REDUNDANT_FEATURES = 2


def load_dataset(ds_spec: dict[str, Any], device: torch.device | str = "cpu") -> Split:
    """``(x_train, y_train, x_test, y_test)`` on ``device``: float32 samples shaped
    ``[N, *sample_shape]``; int64 labels for classification, float32 targets for regression.

    Error handling: raises ValueError when a synthetic spec cannot be generated
    (too many classes for its features); the message names the field.
    """
    device = torch.device(device)
    name = ds_spec["name"]
    if name == "digits":
        parts = _digits(ds_spec)
    elif name == "synthetic":
        parts = _synthetic(ds_spec, device)
    elif name == "inline":
        parts = _inline(ds_spec)
    else:
        raise ValueError(f"unknown dataset {name!r}")
    shape = [int(s) for s in ds_spec["sample_shape"]]
    label_dtype = torch.int64 if ds_spec["problem"] == "classification" else torch.float32
    x, y, x_test, y_test = (torch.as_tensor(p).to(device) for p in parts)
    return (
        x.to(torch.float32).reshape(-1, *shape),
        y.to(label_dtype),
        x_test.to(torch.float32).reshape(-1, *shape),
        y_test.to(label_dtype),
    )


def all_samples(ds_spec: dict[str, Any], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample of the data set, train and test together (train first)."""
    x, y, x_test, y_test = load_dataset(ds_spec, device)
    return torch.cat([x, x_test]), torch.cat([y, y_test])


def _digits(spec: dict[str, Any]) -> tuple[np.ndarray, ...]:
    x, y = load_digits(return_X_y=True)
    x, x_test, y, y_test = train_test_split(
        x, y, test_size=spec["test_fraction"], random_state=DIGITS_SPLIT_SEED, stratify=y
    )
    return x, y, x_test, y_test


def _synthetic(spec: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, ...]:
    samples, features, noise = spec["samples"], spec["features"], spec["noise"]
    gen = torch.Generator(device=device).manual_seed(spec["seed"])

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device)

    if spec["problem"] == "classification":
        classes = spec["classes"]
        # Distinct hypercube vertices need 2**informative >= classes.
        needed = max(1, math.ceil(math.log2(classes)))
        if needed > features:
            raise ValueError(
                f"spec.dataset.features: {classes} synthetic classes need at least {needed} features, got {features}"
            )
        informative = min(features, max(needed, 2, features // 2))
        centres = _vertices(classes, informative, gen, device) * CLASS_SEPARATION
        # Balanced classes in a random order, as make_classification draws them.
        y = torch.arange(samples, device=device) % classes
        y = y[torch.randperm(samples, generator=gen, device=device)]
        x_inf = centres[y] + normal(samples, informative)
        redundant = min(REDUNDANT_FEATURES, features - informative)
        rest = features - informative - redundant
        x = torch.cat([x_inf, x_inf @ normal(informative, redundant), normal(samples, rest)], dim=1)
        # noise is the fraction of labels assigned at random.
        flip = torch.rand(samples, generator=gen, device=device) < min(noise, 1.0)
        y = torch.where(flip, torch.randint(0, classes, (samples,), generator=gen, device=device), y)
    else:
        informative = max(1, features // 2)
        x = normal(samples, features)
        clean = x[:, :informative] @ normal(informative)
        # noise is relative to the signal's spread, so it means the same for any feature count.
        y = _standardised(_standardised(clean) + noise * normal(samples))
    order = torch.randperm(samples, generator=gen, device=device)
    tests = min(samples - 1, max(1, round(samples * spec["test_fraction"])))
    test, train = order[:tests], order[tests:]
    return x[train], y[train], x[test], y[test]


def _vertices(count: int, axes: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """``count`` distinct vertices of the ``{-1, 1}**axes`` hypercube, drawn from ``gen``."""
    enumerated = min(axes, MAX_ENUMERATED_AXES)
    codes = torch.randperm(2**enumerated, generator=gen, device=device)[:count]
    bits = (codes[:, None] >> torch.arange(enumerated, device=device)) & 1
    if axes > enumerated:
        extra = torch.randint(0, 2, (count, axes - enumerated), generator=gen, device=device)
        bits = torch.cat([bits, extra], dim=1)
    return bits.to(torch.float32) * 2 - 1


def _standardised(values: torch.Tensor) -> torch.Tensor:
    spread = values.std(unbiased=False)
    return (values - values.mean()) / torch.where(spread > 0, spread, torch.ones_like(spread))


def _inline(spec: dict[str, Any]) -> tuple[np.ndarray, ...]:
    x = np.asarray(spec["x"], dtype=np.float64)
    y = np.asarray(spec["y"], dtype=np.float64)
    if spec["problem"] == "classification":
        y = y.astype(np.int64)
    count = len(x)
    tests = min(count - 1, max(1, round(count * spec["test_fraction"])))
    order = np.random.RandomState(INLINE_SPLIT_SEED).permutation(count)
    train, test = order[tests:], order[:tests]
    return x[train], y[train], x[test], y[test]
