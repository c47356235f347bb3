"""Data sets: turn a normalised dataset spec (see ``p2pnn.tasks``) into train/test tensors.

Every loader is deterministic: the same spec gives the same tensors, in the
same order, on every machine, so a task's metrics do not depend on which Ki
ran it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits, make_classification, make_regression
from sklearn.model_selection import train_test_split

Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]

# The digits images hold pixel intensities 0..16; dividing maps them onto [0, 1].
DIGITS_MAX_PIXEL = 16.0
# Inline data is split by a fixed permutation so a re-run (or another Ki) sees the same split.
INLINE_SPLIT_SEED = 0
# The digits split uses the seed the plain-torch reference script uses, so the two compare.
DIGITS_SPLIT_SEED = 0


def load_dataset(ds_spec: dict[str, Any]) -> Split:
    """``(x_train, y_train, x_test, y_test)``: float32 samples shaped ``[N, *sample_shape]``;
    int64 labels for classification, float32 targets for regression.

    Error handling: raises ValueError when a synthetic spec cannot be generated
    (too many classes for its features); the message names the field.
    """
    name = ds_spec["name"]
    if name == "digits":
        x, y, x_test, y_test = _digits(ds_spec)
    elif name == "synthetic":
        x, y, x_test, y_test = _synthetic(ds_spec)
    elif name == "inline":
        x, y, x_test, y_test = _inline(ds_spec)
    else:
        raise ValueError(f"unknown dataset {name!r}")
    shape = [int(s) for s in ds_spec["sample_shape"]]
    label_dtype = torch.int64 if ds_spec["problem"] == "classification" else torch.float32
    return (
        torch.as_tensor(x, dtype=torch.float32).reshape(-1, *shape),
        torch.as_tensor(y, dtype=label_dtype),
        torch.as_tensor(x_test, dtype=torch.float32).reshape(-1, *shape),
        torch.as_tensor(y_test, dtype=label_dtype),
    )


def all_samples(ds_spec: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample of the data set, train and test together (train first)."""
    x, y, x_test, y_test = load_dataset(ds_spec)
    return torch.cat([x, x_test]), torch.cat([y, y_test])


def _digits(spec: dict[str, Any]) -> tuple[np.ndarray, ...]:
    x, y = load_digits(return_X_y=True)
    x, x_test, y, y_test = train_test_split(
        x / DIGITS_MAX_PIXEL, y, test_size=spec["test_fraction"], random_state=DIGITS_SPLIT_SEED, stratify=y
    )
    return x, y, x_test, y_test


def _synthetic(spec: dict[str, Any]) -> tuple[np.ndarray, ...]:
    samples, features, seed, noise = spec["samples"], spec["features"], spec["seed"], spec["noise"]
    if spec["problem"] == "classification":
        classes = spec["classes"]
        # make_classification places each class on a vertex of a hypercube in the
        # informative subspace: it needs 2**informative >= classes.
        needed = max(1, math.ceil(math.log2(classes)))
        if needed > features:
            raise ValueError(
                f"spec.dataset.features: {classes} synthetic classes need at least {needed} features, got {features}"
            )
        informative = min(features, max(needed, 2, features // 2))
        x, y = make_classification(
            n_samples=samples,
            n_features=features,
            n_informative=informative,
            n_redundant=min(2, features - informative),
            n_repeated=0,
            n_classes=classes,
            n_clusters_per_class=1,
            # noise is the fraction of labels assigned at random.
            flip_y=min(noise, 1.0),
            random_state=seed,
        )
        stratify = y if min(np.bincount(y, minlength=classes)) >= 2 else None
    else:
        x, clean = make_regression(
            n_samples=samples,
            n_features=features,
            n_informative=max(1, features // 2),
            noise=0.0,
            random_state=seed,
        )
        # noise is relative to the signal's spread, so it means the same for any feature count.
        rng = np.random.RandomState(seed)
        y = _standardised(_standardised(clean) + noise * rng.standard_normal(samples))
        stratify = None
    x, x_test, y, y_test = train_test_split(x, y, test_size=spec["test_fraction"], random_state=seed, stratify=stratify)
    return x, y, x_test, y_test


def _standardised(values: np.ndarray) -> np.ndarray:
    spread = values.std()
    return (values - values.mean()) / (spread if spread > 0 else 1.0)


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
