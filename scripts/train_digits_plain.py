#!/usr/bin/env python3
"""A p2pnn train task written as a plain torch loop: the reference for benchmarks.

It imports nothing from p2pnn, so the gap between the two is p2pnn's overhead.
With its defaults it is the default p2pnn train task (``validate_spec({"kind":
"train"})``): scikit-learn's digits with the same stratified 20 % test split
(random_state 0), inputs standardised with the train split's per-pixel mean
and spread, an MLP 64 -> 256 -> 10 (ReLU), Adam, the same learning rate with
the same per-step cosine decay, batches of 64, seed 0, the same initialisation
order and shuffling: on CPU it reaches the same test accuracy as the node.
Like a p2pnn train task it measures the test split after every epoch.

``--dataset synthetic`` draws the same amount of work (samples x features,
classes) with torch on the device, as p2pnn does, but not the same numbers:
use it for wall time, not accuracy. ``--model transformer`` trains p2pnn's
transformer shape (a linear projection, learned positions, an encoder, mean
pooling) on ``[T, F]`` samples.

Prints one JSON object on its last line: test accuracy, test loss, wall seconds
(data preparation plus training plus the test passes; imports excluded). With
``--repeat 2`` the figures are those of a second run in the same process (CUDA
context, kernels and allocator warm), which is what a p2pnn worker is after its
first task.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
EVAL_CHUNK = 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--dataset", choices=("digits", "synthetic"), default="digits")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--features", type=int, default=20, help="synthetic: features per sample (T x F for a transformer)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--steps", type=int, default=0, help="transformer: sequence length T (features = T x F)")
    parser.add_argument("--model", choices=("mlp", "transformer"), default="mlp")
    parser.add_argument("--hidden", default="256", help="mlp hidden widths, comma separated")
    parser.add_argument("--d-model", type=int, default=32)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--ff", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--schedule", choices=("constant", "cosine"), default="cosine")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=("none", "bf16"), default="none")
    parser.add_argument("--deterministic", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the whole training this many times in this process and report the last "
                             "(2: a warm process, as a p2pnn worker is after its first task)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    deterministic = device.type == "cpu" if args.deterministic == "auto" else args.deterministic == "on"
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    for _ in range(args.repeat):
        report = _run(args, device)
    print(json.dumps(report))


def _run(args: argparse.Namespace, device: torch.device) -> dict[str, object]:
    started = time.perf_counter()
    x, y, x_test, y_test, shape = _data(args, device)
    # Standardise with the train split's statistics, as p2pnn's default normalize does.
    mean, spread = x.mean(dim=0), x.std(dim=0, unbiased=False)
    spread = torch.where(spread < 1e-6, torch.ones_like(spread), spread)
    x, x_test = (x - mean) / spread, (x_test - mean) / spread

    torch.manual_seed(args.seed)
    model = _model(args, shape).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()
    shuffler = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = math.ceil(len(x) / args.batch_size)
    total, step = max(1, args.epochs * steps_per_epoch), 0
    amp = args.amp == "bf16" and device.type == "cuda"

    for _ in range(args.epochs):
        model.train()
        order = torch.randperm(len(x), generator=shuffler).to(device, non_blocking=True)
        for start in range(0, len(x), args.batch_size):
            idx = order[start : start + args.batch_size]
            if args.schedule == "cosine":
                optimizer.param_groups[0]["lr"] = args.lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = loss_fn(model(x[idx]).float(), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        # A p2pnn train task measures the test split after every epoch (its progress shows it).
        test_loss, accuracy = _test(model, x_test, y_test)
    seconds = time.perf_counter() - started
    return {
        "test_accuracy": round(accuracy, 6),
        "test_loss": round(test_loss, 6),
        "seconds": round(seconds, 3),
        "epochs": args.epochs,
        "device": device.type,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def _test(model: nn.Module, x_test: torch.Tensor, y_test: torch.Tensor) -> tuple[float, float]:
    model.eval()
    with torch.inference_mode():
        logits = torch.cat([model(chunk) for chunk in x_test.split(EVAL_CHUNK)])
        return float(nn.functional.cross_entropy(logits, y_test)), float((logits.argmax(dim=1) == y_test).float().mean())


def _data(args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, ...]:
    if args.dataset == "digits":
        x, y = load_digits(return_X_y=True)
        x, x_test, y, y_test = train_test_split(x, y, test_size=TEST_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=y)
        as_x = lambda a: torch.as_tensor(a, dtype=torch.float32).reshape(-1, 8, 8).to(device)  # noqa: E731
        as_y = lambda a: torch.as_tensor(a, dtype=torch.int64).to(device)  # noqa: E731
        return as_x(x), as_y(y), as_x(x_test), as_y(y_test), [8, 8]
    shape = [args.steps, args.features // args.steps] if args.steps else [args.features]
    gen = torch.Generator(device=device).manual_seed(args.seed)
    centres = torch.randn(args.classes, args.features, generator=gen, device=device)
    labels = torch.randint(0, args.classes, (args.samples,), generator=gen, device=device)
    samples = centres[labels] + torch.randn(args.samples, args.features, generator=gen, device=device)
    tests = round(args.samples * TEST_FRACTION)
    samples = samples.reshape(-1, *shape)
    return samples[tests:], labels[tests:], samples[:tests], labels[:tests], shape


def _model(args: argparse.Namespace, shape: list[int]) -> nn.Module:
    if args.model == "mlp":
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(shape)
        for hidden in (int(h) for h in args.hidden.split(",")):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        return nn.Sequential(*layers, nn.Linear(width, args.classes))
    return _Transformer(shape, args)


class _Transformer(nn.Module):
    def __init__(self, shape: list[int], args: argparse.Namespace) -> None:
        super().__init__()
        steps, features = shape
        self.project = nn.Linear(features, args.d_model)
        self.position = nn.Parameter(torch.randn(1, steps, args.d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(args.d_model, args.heads, args.ff, 0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, args.layers, enable_nested_tensor=False)
        self.head = nn.Linear(args.d_model, args.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.project(x) + self.position).mean(dim=1))


if __name__ == "__main__":
    main()
