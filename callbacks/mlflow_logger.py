"""Log every epoch's Keras metrics to an MLflow run, in one batched call per epoch.

Only `on_epoch_end` is overridden: a callback that defines `on_train_batch_end` makes
Keras 3 synchronise with the device after every step.
"""

from __future__ import annotations

import time

import keras
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from pipeline.optim import current_learning_rate


def nested_layers(model: keras.layers.Layer):
    """Every layer of `model`, descending into nested models (e.g. ensemble members)."""
    for layer in getattr(model, "layers", []):
        yield layer
        yield from nested_layers(layer)


def metric_key(keras_name: str) -> str:
    """Keras `loss` / `accuracy` -> `train_loss` / `train_accuracy`; `val_*` stays."""
    if keras_name == "learning_rate":
        return "lr"
    return keras_name if keras_name.startswith("val_") else f"train_{keras_name}"


class MLflowEpochLogger(keras.callbacks.Callback):
    """Log `train_*`, `val_*` and `lr` at step = epoch (0-based) to one MLflow run.

    Also logged, when present: `loss_scale` under float16 loss scaling, and whatever
    any layer reports through a `logged_values() -> dict[str, float]` method (e.g. a
    weighted ensemble's learned member weights).

    A resumed run may re-train an epoch it had already logged (when it was killed
    between logging the epoch and checkpointing it): values already in the run are
    not logged twice, so every epoch appears exactly once.

    Args:
        run_id: the run to log into.
        client: the `MlflowClient` to log with; by default one for the current
            tracking URI.
    """

    def __init__(self, run_id: str, client: MlflowClient | None = None) -> None:
        super().__init__()
        self.run_id = run_id
        self.client = client or MlflowClient()
        self._logged: set[tuple[str, int]] = set()

    def on_train_begin(self, logs=None) -> None:
        run = self.client.get_run(self.run_id)
        self._logged = {(key, metric.step) for key in run.data.metrics
                        for metric in self.client.get_metric_history(self.run_id, key)}

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        timestamp = int(time.time() * 1000)
        values = {metric_key(name): float(value) for name, value in (logs or {}).items()}
        # The rate the next step will use: the schedule evaluated at the current step.
        values["lr"] = current_learning_rate(self.model.optimizer)
        if isinstance(self.model.optimizer, keras.optimizers.LossScaleOptimizer):
            values["loss_scale"] = float(keras.ops.convert_to_numpy(self.model.optimizer.dynamic_scale))
        for layer in nested_layers(self.model):
            if callable(getattr(layer, "logged_values", None)):
                values.update(layer.logged_values())
        self.client.log_batch(
            self.run_id,
            metrics=[Metric(key, value, timestamp, epoch) for key, value in values.items()
                     if (key, epoch) not in self._logged],
        )
