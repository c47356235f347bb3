"""Torch code: the models, data sets and job runners that a worker process executes.

- models (models.py): :func:`build_model` turns a normalised model spec into an
  ``nn.Module`` (mlp, cnn, transformer); :class:`Standardize` puts a model's
  input scaling in front of it.
- data (data.py): :func:`load_dataset` turns a normalised dataset spec into
  train/test tensors (digits, synthetic, inline).
- jobs (jobs.py): :func:`run_train`, :func:`run_evaluate`, :func:`run_infer`,
  :func:`run_echo` execute one normalised task spec and return its result and
  artifacts.
- checkpoint (checkpoint.py): a training run's state (model, optimizer, epoch,
  RNG) as one safetensors file, and reading it back.
- parallel (parallel.py): :class:`Group` (one rank's place in a data-parallel
  group) and :func:`joined`, which makes the process a member through
  torch.distributed.

Only ``p2pnn.compute.worker`` imports this package; the daemon never does, so
torch never loads into the daemon's event loop. This ``__init__`` imports
nothing, so ``p2pnn.nn.jobs.run_echo`` works without loading torch.
"""
