"""Log every epoch's Keras metrics to an MLflow run, in one batched call per epoch,
together with the per-step values other callbacks hand it (`log_later`).

Only `on_epoch_end` is overridden: a callback that defines `on_train_batch_end` makes
Keras 3 synchronise with the device after every step. The call to the store runs on a
background thread, in epoch order, so training never waits for it; the end of
training waits for the last one.

If the tracking store stops answering (MLflow's client has already retried), training
goes on: the epoch's metrics go to a local JSON-lines file instead, every later epoch
tries the store again and replays what it missed once the store is back.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import keras

from architectures.common import nested_layers
from pipeline.errors import one_line
from pipeline.training.optim import current_learning_rate

if TYPE_CHECKING:  # MLflow is imported on first use: a run imports it on a thread while it starts
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)


def metric_key(keras_name: str) -> str:
    """Keras `loss` / `accuracy` -> `train_loss` / `train_accuracy`; `val_*` stays."""
    if keras_name == "learning_rate":
        return "lr"
    return keras_name if keras_name.startswith("val_") else f"train_{keras_name}"


class MLflowEpochLogger(keras.callbacks.Callback):
    """Log `train_*`, `val_*` and `lr` at step = epoch (0-based) to one MLflow run.

    Also logged, when present: `loss_scale` under float16 loss scaling, whatever any
    layer reports through a `logged_values() -> dict[str, float]` method (e.g. a weighted
    ensemble's learned member weights), and the per-step values handed to `log_later`
    (the guard's gradient norms), which go out with the next epoch's call: one call to
    the store per epoch, and the same fallback to the local file.

    A resumed run may re-train an epoch it had already logged (when it was killed
    between logging the epoch and checkpointing it): values already in the run are
    not logged twice, so every epoch appears exactly once.

    Args:
        run_id: the run to log into; None: the one `use_run` names before the first
            epoch ends (the pipeline's run, which opens while the first steps train).
        client: the `MlflowClient` to log with; by default one for the current
            tracking URI.
        offline_file: where epochs go while the store does not answer; by default
            `offline-metrics-RUN_ID.jsonl`.
    """

    def __init__(self, run_id: str | None = None, client: MlflowClient | None = None,
                 offline_file: Path | None = None) -> None:
        super().__init__()
        self.run_id = run_id
        self._client = client
        self.offline_file = offline_file or (Path(f"offline-metrics-{run_id}.jsonl") if run_id else None)
        self.unlogged: list[Metric] = []  # epochs the store has not got yet
        self.first_failure: str | None = None
        self._logged: set[tuple[str, int]] = set()
        self._later: list[Metric] = []  # per-step values for the next call
        self._epoch = -1
        self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-epoch-logger")
        self._pending: Future | None = None

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient()
        return self._client

    def use_run(self, run_id: str) -> None:
        """Log into run `run_id` from now on, except the epochs it already holds."""
        self.run_id = run_id
        self.offline_file = self.offline_file or Path(f"offline-metrics-{run_id}.jsonl")
        run = self.client.get_run(run_id)
        self._logged = {(key, metric.step) for key in run.data.metrics
                        for metric in self.client.get_metric_history(run_id, key)}

    def on_train_begin(self, logs=None) -> None:
        if self.run_id is not None:
            self.use_run(self.run_id)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        from mlflow.entities import Metric

        if self.run_id is None:
            raise RuntimeError("MLflowEpochLogger has no run to log into: pass run_id=, or call use_run first")
        timestamp = int(time.time() * 1000)
        values = {metric_key(name): float(value) for name, value in (logs or {}).items()}
        # The rate the next step will use: the schedule evaluated at the current step.
        values["lr"] = current_learning_rate(self.model.optimizer)
        if isinstance(self.model.optimizer, keras.optimizers.LossScaleOptimizer):
            values["loss_scale"] = float(keras.ops.convert_to_numpy(self.model.optimizer.dynamic_scale))
        for layer in nested_layers(self.model):
            if callable(getattr(layer, "logged_values", None)):
                values.update(layer.logged_values())
        metrics = [Metric(key, value, timestamp, epoch) for key, value in values.items()]
        self._epoch = epoch
        self._submit(metrics)

    def log_later(self, values: Iterable[tuple[str, float, int]]) -> None:
        """Log (key, value, step) triples with the next epoch's metrics, or at `wait`
        if no epoch ends first. Call it from the training thread, as the hooks are."""
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        self._later.extend(Metric(key, float(value), timestamp, step) for key, value, step in values)

    def _submit(self, metrics: list[Metric]) -> None:
        metrics, self._later = [m for m in [*metrics, *self._later] if (m.key, m.step) not in self._logged], []
        self._pending = self._sender.submit(self._send, self._epoch, metrics)

    def on_train_end(self, logs=None) -> None:
        self.wait()

    def flush(self) -> None:
        """Block until every epoch submitted so far is in the store (or in the offline
        file). Safe from any thread: a checkpoint writer calls it, so that no checkpoint
        is ever on disk ahead of the epochs it covers."""
        self._sender.submit(lambda: None).result()  # one sender thread: behind every epoch before it

    def wait(self) -> None:
        """Block until every epoch so far, and every value handed to `log_later`, is in
        the store (or in the offline file)."""
        if self._later and self.run_id is not None:
            self._submit([])
        if self._pending is not None:
            # A store that fails sends the epoch to the offline file instead; only an
            # offline file that cannot be written raises (OSError), here.
            self._pending.result()
            self._pending = None

    def _send(self, epoch: int, metrics: list[Metric]) -> None:
        self.unlogged.extend(metrics)
        try:
            for start in range(0, len(self.unlogged), 1000):  # MLflow's per-call limit
                self.client.log_batch(self.run_id, metrics=self.unlogged[start:start + 1000])
        except Exception as error:  # the store is gone (its client has retried): keep training
            self._write_offline(epoch, metrics, error)
        else:
            if self.first_failure is not None:
                log.warning("the MLflow store answers again: epochs logged to %s are now in run %s too",
                            self.offline_file, self.run_id)
            self.unlogged, self.first_failure = [], None

    def _write_offline(self, epoch: int, metrics: list[Metric], error: Exception) -> None:
        if self.first_failure is None:
            where = f"epoch {epoch}" if epoch >= 0 else "before the first epoch's end"
            self.first_failure = f"{where}: {type(error).__name__}: {one_line(error, 200)}"
            log.warning("cannot log to MLflow (%s); training goes on, metrics go to %s", self.first_failure,
                        self.offline_file)
        with self.offline_file.open("a") as file:
            for metric in metrics:
                file.write(json.dumps({"run_id": self.run_id, "key": metric.key, "value": metric.value,
                                       "step": metric.step, "timestamp": metric.timestamp}) + "\n")
