"""React to the train step's gradient-norm and finite-value checks, and report them.

The checks themselves run inside the compiled train step (`pipeline.training.guarded`); this
callback only reads their result between executions: one scalar read per execution,
never a per-step sync. It overrides `on_train_batch_begin` only, which Keras calls
synchronously without turning off its asynchronous batch-end path.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from pipeline.errors import DivergenceError
from pipeline.training import diagnose
from pipeline.training.train_state import NON_FINITE, Snapshot, StepGuard, TrainState

log = logging.getLogger(__name__)

ACTIONS = ("warn", "skip", "stop", "rollback")


class GradNormGuard(keras.callbacks.Callback):
    """What to do when a step's loss or gradient norm is non-finite, or the norm is
    above `threshold`, and the logging of gradient norms.

    Actions on a bad step:
        warn: apply steps above the threshold and warn at the epoch's end.
        skip: drop bad steps in the graph and count them (`train_skipped_steps`).
        stop: drop the step, find the first layer with a non-finite value and fail the
            run with it, e.g. `non-finite output in layer 'dense_1' at step 57 (epoch 2)`.
        rollback: restore the last checkpoint, pass over the next `rollback_skip_batches`
            batches, multiply the learning rate by `rollback_lr_backoff` and go on;
            fail after `max_rollbacks` rollbacks within `rollback_window` steps.
    A non-finite step is never applied, whatever the action.

    Logged: `grad_norm` and `grad_norm/<layer>` every `log_every_n_steps` steps (at the
    step), and per epoch `train_grad_norm_max`, `train_grad_norm_mean` and
    `train_skipped_steps`.

    Args:
        threshold: gradient norm above which a finite step is bad; null: none is.
        action: warn, skip, stop or rollback.
        log_every_n_steps: how often per-step norms are logged; 0 turns that off.
        rollback_skip_batches: batches passed over after a rollback (PaLM skipped 200-500).
        rollback_lr_backoff: factor on the learning rate after each rollback, in (0, 1].
        max_rollbacks: rollbacks allowed within `rollback_window` steps.
        rollback_window: steps over which rollbacks are counted.
    """

    def __init__(
        self,
        threshold: float | None = None,
        action: str = "stop",
        log_every_n_steps: int = 50,
        rollback_skip_batches: int = 200,
        rollback_lr_backoff: float = 0.5,
        max_rollbacks: int = 3,
        rollback_window: int = 1000,
    ) -> None:
        super().__init__()
        _require(action in ACTIONS, "action", f"must be one of {ACTIONS}", action)
        _require(threshold is None or (isinstance(threshold, (int, float)) and threshold > 0), "threshold",
                 "must be > 0 or null", threshold)
        _require(isinstance(log_every_n_steps, int) and log_every_n_steps >= 0, "log_every_n_steps",
                 "must be >= 0", log_every_n_steps)
        _require(isinstance(rollback_skip_batches, int) and rollback_skip_batches >= 0, "rollback_skip_batches",
                 "must be >= 0", rollback_skip_batches)
        _require(0 < rollback_lr_backoff <= 1, "rollback_lr_backoff", "must be in (0, 1]", rollback_lr_backoff)
        _require(isinstance(max_rollbacks, int) and max_rollbacks >= 1, "max_rollbacks", "must be >= 1",
                 max_rollbacks)
        _require(isinstance(rollback_window, int) and rollback_window >= 1, "rollback_window", "must be >= 1",
                 rollback_window)
        self.threshold = None if threshold is None else float(threshold)
        self.action = action
        self.log_every_n_steps = log_every_n_steps
        self.rollback_skip_batches = rollback_skip_batches
        self.rollback_lr_backoff = rollback_lr_backoff
        self.max_rollbacks = max_rollbacks
        self.rollback_window = rollback_window
        self.step_guard = StepGuard(threshold=self.threshold, drop_bad_steps=action != "warn",
                                    halt_on_bad_step=action in ("stop", "rollback"))
        # Multiplies the learning rate; the optimizer is built with it (pipeline.training.optim).
        self.lr_scale = tf.Variable(1.0, trainable=False, dtype=tf.float32, name="lr_scale")
        self.rollback_count = tf.Variable(0, trainable=False, dtype=tf.int64, name="rollbacks")
        # Wired by the pipeline: rebuilds a training batch for the diagnosis, restores
        # the last checkpoint for a rollback, opens its MLflow run if it is still opening
        # (`pipeline.pending_run`) before an event is logged, and takes the per-step values
        # to log with the epoch's metrics (`MLflowEpochLogger.log_later`; without it, they
        # go to MLflow's active run directly).
        self.batch_at: Callable[[int, int], tuple] | None = None
        self.restore_last_checkpoint: Callable[[], int] | None = None
        self.open_run: Callable[[], str] | None = None
        self.log_values: Callable[[list[tuple[str, float, int]]], None] | None = None
        self.events: list[dict] = []
        self._rollback_steps: list[int] = []
        self._pending: list[tuple[str, float, int]] = []
        self._logged_up_to = 0
        self._weights_finite: Callable[[], tf.Tensor] | None = None  # compiled at `on_train_begin`

    # -- hooks ---------------------------------------------------------------------
    def checkpoint_state(self) -> tf.Module:
        state = tf.Module(name="grad_norm_guard")
        state.lr_scale, state.rollback_count = self.lr_scale, self.rollback_count
        return state

    def on_train_begin(self, logs=None) -> None:
        self._logged_up_to = int(self._state.global_batch.numpy())
        self._weights_finite = _all_finite(self.model.model)

    def on_train_batch_begin(self, batch: int, logs=None) -> None:
        self._poll()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._poll()
        state = self._state
        snapshot = state.snapshot()
        statistics = snapshot.epoch_statistics()
        if logs is not None:
            logs.update(statistics)
        if snapshot.bad_step >= 0:  # warn and skip: report, then go on
            self._report_epoch(epoch, state, snapshot)
        if self.action in ("warn", "skip") and statistics["skipped_steps"] and math.isnan(statistics["grad_norm_max"]):
            raise DivergenceError(f"every step of epoch {epoch} had a non-finite loss or gradient norm and was "
                                  "skipped: training is not progressing")
        layer = None if self._weights_finite() else diagnose.first_non_finite_weights(self.model.model)
        if layer is not None:
            raise DivergenceError(f"non-finite weights in layer '{layer}' after epoch {epoch}")
        self._flush()

    def on_train_end(self, logs=None) -> None:
        self._flush()

    # -- internals -----------------------------------------------------------------
    @property
    def _state(self) -> TrainState:
        return self.model.build_train_state()

    def _poll(self) -> None:
        """Between executions: record the norms every N steps and act on a halt, from
        what the execution returned (`TrainState.observe`): no eager op."""
        state = self._state
        snapshot = None
        if self.log_every_n_steps:
            done = state.steps_done()
            if done // self.log_every_n_steps > self._logged_up_to // self.log_every_n_steps:
                step = done - 1  # the last step of the execution that just ran
                snapshot = state.snapshot()
                self._pending.append(("grad_norm", snapshot.last_norm, step))
                for name, value in zip(self.model.layer_names, snapshot.last_layer_norms):
                    self._pending.append((f"grad_norm/{name}", float(value), step))
            self._logged_up_to = done
        if self.step_guard.halt_on_bad_step:
            snapshot = snapshot or state.snapshot()
            if snapshot.halted:
                self._on_halt(state, snapshot)

    def _on_halt(self, state: TrainState, snapshot: Snapshot) -> None:
        step, epoch = snapshot.bad_step, snapshot.bad_epoch
        message = f"{self._diagnosis(snapshot)}"
        if self.action == "stop":
            self._event("stop", step, epoch, message)
            self._flush()
            raise DivergenceError(message)
        recent = [s for s in self._rollback_steps if step - s < self.rollback_window]
        if len(recent) >= self.max_rollbacks:
            self._event("stop", step, epoch, message)
            self._flush()
            raise DivergenceError(f"{message}; gave up after {len(recent)} rollbacks within "
                                  f"{self.rollback_window} steps (callbacks.grad_norm.max_rollbacks)")
        if self.restore_last_checkpoint is None:
            raise DivergenceError(f"{message}; cannot roll back: no checkpoints (callbacks.checkpoint is off)")
        restored = self.restore_last_checkpoint()
        self.lr_scale.assign(self.lr_scale * self.rollback_lr_backoff)
        self.rollback_count.assign_add(1)
        state.skip_batches.assign(self.rollback_skip_batches)
        state.clear_bad_step()
        self._rollback_steps.append(step)
        self._pending.append(("rollbacks", float(self.rollback_count.numpy()), step))
        self._event("rollback", step, epoch, message, restored_step=restored,
                    skip_batches=self.rollback_skip_batches, lr_scale=float(self.lr_scale.numpy()))
        log.warning("%s: rolled back to the checkpoint at step %d, passing over the next %d batches, learning "
                    "rate x%g", message, restored, self.rollback_skip_batches, float(self.lr_scale.numpy()))

    def _diagnosis(self, bad: Snapshot) -> str:
        """`<what> at step S (epoch E)`, naming the first layer with a non-finite value."""
        step, epoch, batch = bad.bad_step, bad.bad_epoch, bad.bad_batch
        where = f"at step {step} (epoch {epoch})"
        if bad.bad_reason != NON_FINITE:
            norms = dict(zip(self.model.layer_names, bad.bad_layer_norms))
            largest = max(norms, key=norms.get) if norms else "?"
            return (f"gradient norm {bad.bad_norm:.3g} above callbacks.grad_norm.threshold="
                    f"{self.threshold:g} {where}; largest in layer '{largest}' ({norms.get(largest, math.nan):.3g})")
        if self.batch_at is None:
            return f"non-finite loss or gradient norm {where}"
        inputs, labels = self.batch_at(epoch, batch)
        guarded = self.model

        def loss_fn(y, y_pred):
            return guarded.compute_loss(x=inputs, y=y, y_pred=y_pred, training=False)

        what, detail = diagnose.describe(guarded.model, inputs, labels, loss_fn)
        return f"{what} {where}" + (f": {detail}" if detail else "")

    def _report_epoch(self, epoch: int, state: TrainState, bad: Snapshot) -> None:
        step, dropped, above = bad.bad_step, bad.dropped_steps, bad.above_threshold_steps
        reason = ("non-finite" if bad.bad_reason == NON_FINITE
                  else f"gradient norm {bad.bad_norm:.3g} > {self.threshold:g}")
        message = (f"epoch {epoch}: {dropped} step(s) skipped, {above} above the threshold; first at step {step} "
                   f"({reason})")
        self._event(self.action, step, epoch, message)
        log.warning("%s", message)
        state.clear_bad_step()

    def _event(self, kind: str, step: int, epoch: int, message: str, **details) -> None:
        self.events.append({"time": time.time(), "event": kind, "step": step, "epoch": epoch, "message": message,
                            **details})
        import mlflow

        if self._run_to_log_to() is not None:
            try:
                mlflow.log_text("\n".join(json.dumps(e) for e in self.events) + "\n", "events.jsonl")
            except Exception as error:  # the store is gone; the event is in the log and the error
                log.warning("could not log events.jsonl to MLflow: %s", error)

    def _flush(self) -> None:
        """Hand the recorded per-step values over to be logged (non-finite norms are not)."""
        values, self._pending = [(key, value, step) for key, value, step in self._pending if math.isfinite(value)], []
        if not values:
            return
        if self.log_values is not None:
            self.log_values(values)
            return
        import mlflow
        from mlflow.entities import Metric

        run = self._run_to_log_to()
        if run is not None:
            now = int(time.time() * 1000)
            metrics = [Metric(key, value, now, step) for key, value, step in values]
            client = mlflow.MlflowClient()
            for start in range(0, len(metrics), 1000):  # MLflow's per-call limit
                # In the background: nothing waits on these, and MLflow flushes them when the run ends.
                client.log_batch(run.info.run_id, metrics=metrics[start:start + 1000], synchronous=False)

    def _run_to_log_to(self):
        """MLflow's active run, once the pipeline's run (if it is still opening) is open."""
        import mlflow

        if self.open_run is not None:
            self.open_run()
        return mlflow.active_run()


def _all_finite(model: keras.Model):
    """A compiled check, for after each epoch: one fused is-finite over every float
    weight of `model` (only if it fails does the diagnosis look for the layer)."""
    weights = [w for w in model.weights if np.issubdtype(np.dtype(w.dtype), np.floating)]

    def all_finite() -> tf.Tensor:
        return tf.reduce_all([tf.reduce_all(tf.math.is_finite(w.value)) for w in weights]) if weights \
            else tf.constant(True)

    return tf.function(all_finite, autograph=False)


def _require(ok: bool, key: str, rule: str, value) -> None:
    if not ok:
        raise ValueError(f"callbacks.grad_norm.{key} {rule}. Received: {value!r}")
