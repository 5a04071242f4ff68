"""Debug modes (`debug=smoke|overfit|limit|profile`, `conf/debug/`): shrink the data of any run,
or profile it.

    python -m pipeline.train debug=smoke                  # 1 epoch on a few batches: does it all run?
    python -m pipeline.train debug=overfit                # one batch, repeated, until the loss is ~0
    python -m pipeline.train debug=limit                  # 10% of every split
    python -m pipeline.train debug=profile                # trace a few steady steps (callbacks/profile.py)
    python -m pipeline.train -m 'experiment=glob(*)' debug=smoke

`apply(cfg, splits)` returns the shrunk pipelines; the `conf/debug/` files also turn
model registration off (`mlflow.log_model: false`) and `tags(cfg)` tags the run `debug`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import keras
import tensorflow as tf
from omegaconf import DictConfig

from pipeline import data
from pipeline.data import Splits

log = logging.getLogger(__name__)


def apply(cfg: DictConfig, splits: Splits) -> Splits:
    """`splits` shrunk as `cfg.debug` asks; unchanged when `cfg.debug` is null or shrinks
    nothing (`debug=profile` profiles the real data).

    - `overfit_steps`: train on batch 0 of epoch 0 only, `overfit_steps` times per epoch,
      and validate on that same batch (the test split stays whole: it shows what memorising
      one batch is worth);
    - `limit_batches`: at most this many batches of every split;
    - `limit_fraction`: this fraction of every split's batches (at least one).

    `steps_per_epoch` and `sizes` follow, so schedules, checkpoints and the logged split
    sizes describe what really ran.
    """
    debug = cfg.get("debug")
    if debug is None or not any(debug.get(key) for key in ("overfit_steps", "limit_batches", "limit_fraction")):
        return splits
    batch_size = cfg.dataset.batch_size
    if debug.get("overfit_steps"):
        batch = splits.train_batch(0, 0)
        one = tf.data.Dataset.from_tensors(batch)
        examples = int(tf.nest.flatten(batch[1])[0].shape[0])
        splits = dataclasses.replace(
            splits,
            train=one.repeat(),
            val=one,
            steps_per_epoch=int(debug.overfit_steps),
            sizes={**splits.sizes, "train": examples, "val": examples},
            epoch_batches=lambda epoch: one.repeat(debug.overfit_steps),
            train_batch=lambda epoch, index: batch,
        )
    else:
        batches = {role: math.ceil(size / batch_size) for role, size in splits.sizes.items()}
        if debug.get("limit_batches"):
            keep = {role: min(n, int(debug.limit_batches)) for role, n in batches.items()}
        elif debug.get("limit_fraction"):
            keep = {role: max(1, math.ceil(n * float(debug.limit_fraction))) for role, n in batches.items()}
        else:
            keep = batches
        epoch_batches = splits.epoch_batches

        def first_batches(epoch: tf.Tensor) -> tf.data.Dataset:
            return epoch_batches(epoch).take(keep["train"])

        splits = dataclasses.replace(
            splits,
            train=data.consecutive_epochs(first_batches, splits.epoch),
            epoch_batches=first_batches,
            val=_first(splits.val, keep["val"]) if splits.val is not None else None,
            test=_first(splits.test, keep["test"]),
            steps_per_epoch=keep["train"],
            sizes={role: min(size, keep[role] * batch_size) for role, size in splits.sizes.items()},
        )
    log.info("debug=%s: %d train steps per epoch, splits %s", debug.mode, splits.steps_per_epoch, splits.sizes)
    return splits


def _first(ds: tf.data.Dataset, n: int) -> tf.data.Dataset:
    """The first `n` batches of an evaluation pipeline, read to its end: `take` would
    stop inside its `cache()`, which TensorFlow then discards with a warning every pass."""
    return (ds.enumerate().filter(lambda index, _: index < n).map(lambda _, batch: batch)
            .apply(tf.data.experimental.assert_cardinality(n)))


def tags(cfg: DictConfig) -> dict[str, str]:
    """`{"debug": mode}` for a debug run, so it stands out from real runs in MLflow; else {}."""
    debug = cfg.get("debug")
    return {} if debug is None else {"debug": str(debug.mode)}


class StopAtLoss(keras.callbacks.Callback):
    """Stop training once the epoch's `monitor` falls below `threshold` (`debug=overfit`:
    memorising one batch is done when its loss is near zero).

    Args:
        threshold: stop when the monitored value is below this.
        monitor: a key of the epoch logs, e.g. `loss` (training loss) or `val_loss`.
    """

    def __init__(self, threshold: float = 0.01, monitor: str = "loss") -> None:
        super().__init__()
        if not threshold > 0:
            raise ValueError(f"threshold must be > 0. Received: {threshold}")
        self.threshold = threshold
        self.monitor = monitor

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        value = (logs or {}).get(self.monitor)
        if value is not None and value < self.threshold:
            log.info("%s %.4g < %g after epoch %d: stopping", self.monitor, value, self.threshold, epoch)
            self.model.stop_training = True
