"""Checkpoints that a crash, kill -9, SIGTERM or divergence cannot take away.

`tf.train.CheckpointManager` saves, every `every_n_steps` steps and at each epoch's
end, everything a resume needs to continue as if nothing happened: the model's
variables (BatchNorm statistics and dropout seed state included), the optimizer (with
its step counter), the data position (`pipeline.guarded.TrainState`), the epoch's
metric accumulators, and the state of callbacks that have one (early stopping, the
gradient-norm guard's learning-rate backoff).

TensorFlow writes a checkpoint's files under a temporary name and then records it in
the `checkpoint` index file with an atomic rename, so a kill mid-save leaves the
previous checkpoint as the latest. A checkpoint that is nonetheless unreadable (e.g. a
truncated file) is skipped, with a warning, in favour of the one before it.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import keras
import tensorflow as tf

from pipeline.errors import PipelineError, TrainingInterrupted

log = logging.getLogger(__name__)


class Checkpointing(keras.callbacks.Callback):
    """Save the training state every `every_n_steps` steps and at every epoch's end,
    keep the newest `keep`, and stop cleanly on SIGINT/SIGTERM.

    With `trainer.steps_per_execution > 1`, a save happens at the first execution
    boundary at or after each multiple of `every_n_steps`.

    Args:
        every_n_steps: steps between saves within an epoch; null: only at epoch ends.
        keep: checkpoints kept (older ones are deleted).
        directory: where; null: `checkpoints/` in the job's output directory.
    """

    def __init__(self, every_n_steps: int | None = 100, keep: int = 3, directory: str | None = None) -> None:
        super().__init__()
        if every_n_steps is not None and not (isinstance(every_n_steps, int) and every_n_steps >= 1):
            raise ValueError(f"callbacks.checkpoint.every_n_steps must be >= 1 or null. Received: {every_n_steps!r}")
        if not (isinstance(keep, int) and keep >= 1):
            raise ValueError(f"callbacks.checkpoint.keep must be >= 1. Received: {keep!r}")
        self.every_n_steps = every_n_steps
        self.keep = keep
        self.directory = directory
        self.stateful_callbacks: list[keras.callbacks.Callback] = []
        self._manager: tf.train.CheckpointManager | None = None
        self._last_saved = -1
        self._resume_from: str | None = None
        self._metric_snapshot: list | None = None
        self._requested_signal: int | None = None
        self._previous_handlers: dict[int, object] = {}

    # -- set up by the pipeline, before fit ----------------------------------------
    def open(self, directory: Path, model, callbacks: list[keras.callbacks.Callback]) -> None:
        """Use `directory` (created, and checked writable) for `model`, a built
        `GuardedModel` with its optimizer, and save the state of `callbacks` that have any."""
        try:
            directory.mkdir(parents=True, exist_ok=True)
            probe = directory / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as error:
            raise PipelineError(f"callbacks.checkpoint.directory: cannot write checkpoints to {directory}: "
                                f"{error.strerror or error}") from None
        self.directory = str(directory)
        self.set_model(model)
        self.stateful_callbacks = [c for c in callbacks if callable(getattr(c, "checkpoint_state", None))]
        for callback in self.stateful_callbacks:
            callback.set_model(model)
        model.optimizer.build(model.model.trainable_variables)  # its slots must exist to be restored into

    def _core(self) -> dict:
        model = self.model
        variables = {}
        for index, variable in enumerate(model.model.variables):
            key = variable.path if variable.path not in variables else f"{variable.path}#{index}"
            variables[key] = variable
        return {"model": variables, "optimizer": model.optimizer, "train_state": model.build_train_state()}

    def _rest(self) -> dict:
        return {
            "metrics": [v for metric in self.model.metrics for v in metric.variables],
            "callbacks": {type(c).__name__: c.checkpoint_state() for c in self.stateful_callbacks},
        }

    def _root(self) -> tf.train.Checkpoint:
        return tf.train.Checkpoint(**self._core(), **self._rest())

    def restore_latest(self) -> tuple[int, int] | None:
        """Restore the model, optimizer and data position from the newest readable
        checkpoint (the rest follows in `on_train_begin`); return (epoch, batch) to
        continue from, or None if there is no checkpoint."""
        path = self._latest_readable()
        if path is None:
            return None
        tf.train.Checkpoint(**self._core()).read(path).expect_partial()
        self._resume_from = path
        state = self.model.build_train_state()
        epoch, batch = int(state.epoch.numpy()), int(state.batch.numpy())
        self._last_saved = int(state.global_batch.numpy())
        log.info("resuming from %s: epoch %d, batch %d (step %d)", path, epoch, batch, self._last_saved)
        return epoch, batch

    def restore_for_rollback(self) -> int:
        """Put the model and optimizer back to the newest readable checkpoint; the data
        position moves on. Returns the step the checkpoint was saved at."""
        path = self._latest_readable()
        if path is None:
            raise PipelineError(f"no readable checkpoint in {self.directory} to roll back to")
        tf.train.Checkpoint(model=self._core()["model"], optimizer=self.model.optimizer).read(path).expect_partial()
        return int(path.rpartition("-")[2])

    def _latest_readable(self) -> str | None:
        """The newest checkpoint whose every tensor reads back; older ones are tried
        after a warning. None if there are none at all."""
        state = tf.train.get_checkpoint_state(self.directory)
        candidates = list(reversed(state.all_model_checkpoint_paths)) if state else []
        for path in candidates:
            try:
                reader = tf.train.load_checkpoint(path)
                for name in reader.get_variable_to_shape_map():
                    reader.get_tensor(name)
                return path
            except Exception as error:  # OpError, or IndexError/ValueError from a truncated file
                log.warning("checkpoint %s is unreadable (%s); falling back to the one before it", path,
                            " ".join(str(error).split())[:200])
        if candidates:
            raise PipelineError(f"every checkpoint in {self.directory} is unreadable "
                                f"({', '.join(Path(p).name for p in candidates)}); cannot resume")
        return None

    # -- Keras hooks ---------------------------------------------------------------
    def on_train_begin(self, logs=None) -> None:
        self._install_signal_handlers()  # first: a signal during the initial save must still be caught
        # Created now: Keras builds the compiled metrics' variables when `fit` starts.
        self._manager = tf.train.CheckpointManager(self._root(), self.directory, max_to_keep=self.keep,
                                                   checkpoint_name="ckpt")
        if self._resume_from is not None:
            rest = self._rest()
            tf.train.Checkpoint(**rest).read(self._resume_from).expect_partial()
            for callback in self.stateful_callbacks:
                if callable(getattr(callback, "after_restore", None)):
                    callback.after_restore()
            # Keras zeroes the metrics at each epoch's start; the resumed epoch's
            # accumulators go back in at `on_epoch_begin`.
            self._metric_snapshot = [v.numpy() for v in rest["metrics"]]
        elif self._manager.latest_checkpoint is None:
            self.save()  # the initial state: a rollback at the very first steps needs somewhere to go

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        if self._metric_snapshot is not None:
            for variable, value in zip(self._rest()["metrics"], self._metric_snapshot):
                variable.assign(value)
            self._metric_snapshot = None

    def on_train_batch_begin(self, batch: int, logs=None) -> None:
        if self.every_n_steps or self._requested_signal is not None:
            done = int(self.model.build_train_state().global_batch.numpy())
            if self.every_n_steps and done // self.every_n_steps > self._last_saved // self.every_n_steps:
                self.save()
            self._stop_if_signalled()

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        self.save()
        self._stop_if_signalled()

    def on_train_end(self, logs=None) -> None:
        self.close()

    # -- saving and signals --------------------------------------------------------
    def save(self) -> str | None:
        """Save now (at most once per step); returns the path."""
        done = int(self.model.build_train_state().global_batch.numpy())
        if done == self._last_saved:
            return None
        for callback in self.stateful_callbacks:
            if callable(getattr(callback, "before_save", None)):
                callback.before_save()
        try:
            path = self._manager.save(checkpoint_number=done)
        except (tf.errors.OpError, OSError) as error:
            raise PipelineError(f"cannot write a checkpoint to {self.directory}: "
                                f"{' '.join(str(error).split())[:300]}") from None
        self._last_saved = done
        log.debug("checkpoint %s", path)
        return path

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers (e.g. not in a joblib thread)
        for number in (signal.SIGINT, signal.SIGTERM):
            self._previous_handlers[number] = signal.signal(number, self._on_signal)

    def close(self) -> None:
        """Put the previous signal handlers back (after training, or when it failed)."""
        for number, handler in self._previous_handlers.items():
            signal.signal(number, handler)
        self._previous_handlers = {}

    def _on_signal(self, number: int, frame) -> None:
        name = signal.Signals(number).name
        if self._requested_signal is not None:  # asked twice: do not wait for the step
            raise TrainingInterrupted(f"{name} received twice: stopped without a final checkpoint", number)
        self._requested_signal = number
        log.warning("%s received: saving a checkpoint and stopping after this step (send it again to stop now)",
                    name)

    def _stop_if_signalled(self) -> None:
        if self._requested_signal is None:
            return
        import mlflow

        path = self.save() or self._manager.latest_checkpoint
        state = self.model.build_train_state()
        run = mlflow.active_run()
        resume = f"; continue with: python -m pipeline.train resume={run.info.run_id}" if run else ""
        raise TrainingInterrupted(
            f"stopped by {signal.Signals(self._requested_signal).name} at step {int(state.global_batch.numpy())} "
            f"(epoch {int(state.epoch.numpy())}); checkpoint {path}{resume}",
            self._requested_signal,
        )
