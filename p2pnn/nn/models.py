"""Models: build an ``nn.Module`` from a normalised model spec (see ``p2pnn.tasks``).

Every model takes a batch of samples shaped ``[N, *sample_shape]`` and returns
``[N, out_features]``: class logits for classification, one column for
regression. :class:`Standardize` puts a trained model's input scaling in front
of it, so it takes samples in the data set's own units.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}

# Pooling halves the image; below this side length another halving would leave
# too little spatial extent for the next convolution to see any structure.
_MIN_SIDE_TO_POOL = 4


def build_model(model_spec: dict[str, Any], sample_shape: list[int] | tuple[int, ...], out_features: int) -> nn.Module:
    """A freshly initialised model for ``model_spec`` (uses torch's global RNG: seed it first).

    Error handling: raises ValueError when the sample shape does not suit the
    model (spec validation already refuses those, so this guards direct use).
    """
    shape = [int(s) for s in sample_shape]
    name = model_spec["name"]
    if name == "mlp":
        return _mlp(model_spec, shape, out_features)
    if name == "cnn":
        return _Cnn(model_spec, shape, out_features)
    if name == "transformer":
        return _Transformer(model_spec, shape, out_features)
    raise ValueError(f"unknown model {name!r}")


# A feature whose spread in the train split is below this is constant there: it is
# centred but not divided, so it cannot blow up at inference.
MIN_SPREAD = 1e-6


def input_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element mean and spread of the samples ``x`` (``[N, *sample_shape]``), for :class:`Standardize`."""
    mean = x.mean(dim=0)
    spread = x.std(dim=0, unbiased=False)
    return mean, torch.where(spread < MIN_SPREAD, torch.ones_like(spread), spread)


class Standardize(nn.Module):
    """``net((x - mean) / spread)``: a model that carries the scaling it was trained with.

    The statistics are separate from ``net``'s state dict, so the weights file
    keeps ``net``'s own parameter names and stores them beside the weights.
    """

    def __init__(self, net: nn.Module, mean: torch.Tensor, spread: torch.Tensor) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", mean)
        self.register_buffer("spread", spread)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.spread)


def _mlp(spec: dict[str, Any], shape: list[int], out_features: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(shape)
    for hidden in spec.get("hidden", [128]):
        layers += [nn.Linear(width, hidden), _ACTIVATIONS[spec.get("activation", "relu")]()]
        if spec.get("dropout", 0.0) > 0:
            layers.append(nn.Dropout(spec["dropout"]))
        width = hidden
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


def _image_shape(shape: list[int]) -> tuple[int, int, int]:
    if len(shape) == 3:
        return shape[0], shape[1], shape[2]
    if len(shape) == 2:
        return 1, shape[0], shape[1]
    side = math.isqrt(shape[0]) if len(shape) == 1 else 0
    if side * side != (shape[0] if len(shape) == 1 else -1):
        raise ValueError(f"cnn needs [H, W], [C, H, W] or a square number of features, got {shape}")
    return 1, side, side


def _same_padding(kernel: int) -> list[nn.Module]:
    # Explicit padding keeps H x W for even kernels too, where padding="same" warns and copies.
    before, after = (kernel - 1) // 2, kernel // 2
    return [nn.ZeroPad2d((before, after, before, after))] if kernel > 1 else []


class _Cnn(nn.Module):
    def __init__(self, spec: dict[str, Any], shape: list[int], out_features: int) -> None:
        super().__init__()
        self.image_shape = _image_shape(shape)
        channels, height, width = self.image_shape
        kernel = spec.get("kernel_size", 3)
        layers: list[nn.Module] = []
        for out_channels in spec.get("channels", [16, 32]):
            layers += [*_same_padding(kernel), nn.Conv2d(channels, out_channels, kernel), nn.ReLU()]
            if height >= _MIN_SIDE_TO_POOL and width >= _MIN_SIDE_TO_POOL:
                layers.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
            channels = out_channels
        self.features = nn.Sequential(*layers)
        head: list[nn.Module] = [nn.Flatten(), nn.Linear(channels * height * width, spec.get("hidden", 64)), nn.ReLU()]
        if spec.get("dropout", 0.0) > 0:
            head.append(nn.Dropout(spec["dropout"]))
        head.append(nn.Linear(spec.get("hidden", 64), out_features))
        self.head = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.reshape(x.shape[0], *self.image_shape)))


class _Transformer(nn.Module):
    def __init__(self, spec: dict[str, Any], shape: list[int], out_features: int) -> None:
        super().__init__()
        if len(shape) != 2:
            raise ValueError(f"transformer needs sequence samples [T, F], got {shape}")
        steps, features = shape
        d_model = spec.get("d_model", 32)
        self.project = nn.Linear(features, d_model)
        # Small init keeps the positions from drowning the projected features at the start.
        self.position = nn.Parameter(torch.randn(1, steps, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, spec.get("heads", 4), spec.get("ff", 64), spec.get("dropout", 0.0), batch_first=True
        )
        # No padding masks ever reach the encoder, so nested tensors would only add a warning.
        self.encoder = nn.TransformerEncoder(layer, spec.get("layers", 2), enable_nested_tensor=False)
        self.head = nn.Linear(d_model, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(self.project(x) + self.position)
        return self.head(hidden.mean(dim=1))
