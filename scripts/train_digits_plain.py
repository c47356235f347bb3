"""The default p2pnn train task written as a plain torch script: the reference for benchmarks.

Same data, split, model, initialisation order, shuffling, optimiser and seed
as ``validate_spec({"kind": "train"}, Limits())`` run by ``p2pnn.nn.jobs``:
an MLP 64 -> 128 -> 10 (ReLU), Adam lr 1e-3, 20 epochs, batches of 64, seed 0,
scikit-learn's digits scaled by 1/16 with a stratified 20 % test split
(random_state 0). It imports nothing from p2pnn, so the gap between the two
is p2pnn's overhead.

Prints one JSON object on its last line: test accuracy, test loss, wall seconds
(data loading plus training plus the test pass, imports excluded).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

SEED = 0
EPOCHS = 20
BATCH_SIZE = 64
LR = 1e-3
HIDDEN = 128
TEST_FRACTION = 0.2
# Digits pixels are 0..16; the p2pnn data loader scales them the same way.
MAX_PIXEL = 16.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x / MAX_PIXEL, y, test_size=TEST_FRACTION, random_state=SEED, stratify=y
    )
    x_train = torch.as_tensor(x_train, dtype=torch.float32).reshape(-1, 8, 8)
    x_test = torch.as_tensor(x_test, dtype=torch.float32).reshape(-1, 8, 8)
    y_train = torch.as_tensor(y_train, dtype=torch.int64)
    y_test = torch.as_tensor(y_test, dtype=torch.int64)

    torch.use_deterministic_algorithms(True)
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    shuffler = torch.Generator().manual_seed(SEED)

    for _ in range(EPOCHS):
        model.train()
        order = torch.randperm(len(x_train), generator=shuffler)
        for start in range(0, len(x_train), BATCH_SIZE):
            idx = order[start : start + BATCH_SIZE]
            loss = loss_fn(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    model.eval()
    with torch.inference_mode():
        logits = model(x_test)
        test_loss = float(nn.functional.cross_entropy(logits, y_test))
        accuracy = float((logits.argmax(dim=1) == y_test).float().mean())
    seconds = time.perf_counter() - started
    print(json.dumps({
        "test_accuracy": round(accuracy, 6),
        "test_loss": round(test_loss, 6),
        "seconds": round(seconds, 3),
        "epochs": EPOCHS,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
