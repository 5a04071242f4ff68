"""Checkpoints that a crash, kill -9, SIGTERM or divergence cannot take away.

`Checkpointing` saves, every `every_n_steps` steps and at each epoch's end, everything
a resume needs to continue as if nothing happened: the model's variables (BatchNorm
statistics and dropout seed state included), the optimizer (with its step counter),
the data position (`pipeline.training.train_state.TrainState`), the epoch's metric accumulators,
and the state of callbacks that have one (early stopping, the gradient-norm guard's
learning-rate backoff).

A save costs the training loop only a copy of those variables into CPU-side shadow
variables (a few milliseconds); a background thread writes the shadows to disk while
training goes on, and the next save, a rollback and the end of training wait for it.
The write is one compiled call too: written eagerly, as `tf.train.CheckpointManager`
does, its ~60 variable reads and save ops cost ~60 ms of CPU a save on 2 cores, taken
from training. TensorFlow writes a checkpoint's files under a temporary name; then the
`checkpoint` index file moves to it with an atomic rename, so a kill mid-write leaves
the previous checkpoint as the latest. A checkpoint that is nonetheless unreadable (e.g. a
truncated file) is skipped, with a warning, in favour of the one before it. The files on
disk and their index are `pipeline.training.checkpoint_store`'s.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import keras
import tensorflow as tf

from pipeline.errors import PipelineError, TrainingInterrupted, one_line
from pipeline.training.checkpoint_store import NumberedCheckpoints, by_path, hold, latest_readable, read_all
from pipeline.training.guarded import compiled_after_first_call

log = logging.getLogger(__name__)

# What to do when another process is training into the checkpoint directory
# (`checkpoint_store.hold`): a resume of a run still training, or a new run given its directory.
RESUME_REMEDY = "Let that process end, or stop it (its checkpoints stay), then resume"
NEW_RUN_REMEDY = ("Give this run a callbacks.checkpoint.directory of its own, or leave it unset: each job then "
                  "checkpoints into its own output directory")


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
        self._manager: NumberedCheckpoints | None = None
        self._last_saved = -1
        self._resume_from: str | None = None
        self._metric_snapshot: list | None = None
        self._requested_signal: int | None = None
        self._previous_handlers: dict[int, object] = {}
        self._scratch_directory: str | None = None
        self._snapshot = None  # copies everything saved into the shadows (`_shadow_root`)
        self._writer: threading.Thread | None = None
        self._write_error: BaseException | None = None
        self._restore_metrics = True
        # Called by the writer before each write, e.g. the epoch logger's `flush`: a
        # checkpoint past an epoch whose metrics never reached the store would lose them.
        self.before_write: Callable[[], None] | None = None
        # The id of the run these checkpoints belong to (the pipeline's, opened if it is
        # still opening: before any save of trained steps, and to name the run a stop by
        # signal can resume); None: MLflow's active run, if any.
        self.open_run: Callable[[], str] | None = None
        self._held = None  # the lock on `directory` (`open` takes it, `release` lets go)

    # -- set up by the pipeline, before fit ----------------------------------------
    def open(self, directory: Path, model, callbacks: list[keras.callbacks.Callback],
             scratch_directory: Path | None = None, resuming: bool = False) -> None:
        """Use `directory` (created, and checked writable) for `model`, a built
        `GuardedModel` with its optimizer, and save the state of `callbacks` that have any.

        With `scratch_directory` (a non-chief worker of a multi-worker cluster), restore
        from `directory` but write each save to `scratch_directory` and delete it right
        after: every worker must save (a save may involve collectives), only the chief's
        copy is kept (TensorFlow's multi-worker checkpointing guidance).

        The chief holds `directory` (`checkpoint_store.hold`) until `release`: a second
        process training into it is refused before it changes anything, with advice
        for a resume (`resuming`) or for a new run."""
        self._scratch_directory = None if scratch_directory is None else str(scratch_directory)
        writes_to = directory if scratch_directory is None else scratch_directory
        try:
            writes_to.mkdir(parents=True, exist_ok=True)
            probe = writes_to / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as error:
            raise PipelineError(f"callbacks.checkpoint.directory: cannot write checkpoints to {writes_to}: "
                                f"{error.strerror or error}") from None
        if scratch_directory is None:
            self.release()
            self._held = hold(directory, RESUME_REMEDY if resuming else NEW_RUN_REMEDY)
        self.directory = str(directory)
        self.set_model(model)
        self.stateful_callbacks = [c for c in callbacks if callable(getattr(c, "checkpoint_state", None))]
        for callback in self.stateful_callbacks:
            callback.set_model(model)
        model.optimizer.build(model.model.trainable_variables)  # its slots must exist to be restored into

    # Everything saved is a variable in nested dicts and lists, so the same structure of
    # shadow variables writes a checkpoint that reads back into the live ones.
    def _core(self) -> dict:
        return {"model": by_path(self.model.model.variables), "optimizer": by_path(self.model.optimizer.variables),
                "train_state": list(self.model.build_train_state().variables)}

    def _rest(self) -> dict:
        return {
            "metrics": [v for metric in self.model.metrics for v in metric.variables],
            "callbacks": {type(c).__name__: list(c.checkpoint_state().variables) for c in self.stateful_callbacks},
        }

    def _shadow_root(self) -> tf.train.Checkpoint:
        """A checkpoint of CPU-side copies of everything saved; `_snapshot` fills them."""
        live = {**self._core(), **self._rest()}
        with tf.device("/cpu:0"):
            shadow = tf.nest.map_structure(
                lambda v: tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False, name="shadow"), live)
        pairs = list(zip(tf.nest.flatten(shadow), tf.nest.flatten(live)))

        def snapshot():  # one graph call from the second save on: copying ~100 variables eagerly costs ~30 ms
            for copy, variable in pairs:
                copy.assign(variable)

        self._snapshot = compiled_after_first_call(snapshot)  # the first, initial save is before the first step
        return tf.train.Checkpoint(**shadow)

    def restore_latest(self) -> tuple[int, int] | None:
        """Restore the model, optimizer and data position from the newest readable
        checkpoint (the rest follows in `on_train_begin`); return (epoch, batch) to
        continue from, or None if there is no checkpoint."""
        path = latest_readable(self.directory)
        if path is None:
            return None
        state = self.model.build_train_state()
        state.forget_observed()
        read_all(tf.train.Checkpoint(**self._core()), path)
        self._resume_from = path
        epoch, batch = int(state.epoch.numpy()), int(state.batch.numpy())
        self._last_saved = int(state.global_batch.numpy())
        log.info("resuming from %s: epoch %d, batch %d (step %d)", path, epoch, batch, self._last_saved)
        return epoch, batch

    def resume_at_next_epoch(self) -> None:
        """The restored checkpoint was saved at an epoch's end: the next epoch starts with
        fresh metric accumulators, not the ones the checkpoint holds (by then Keras has
        used them for the epoch's validation)."""
        self._restore_metrics = False

    def restore_for_rollback(self) -> int:
        """Put the model and optimizer back to the newest readable checkpoint; the data
        position moves on. Returns the step the checkpoint was saved at."""
        self.wait()
        path = latest_readable(self.directory)
        if path is None:
            raise PipelineError(f"no readable checkpoint in {self.directory} to roll back to")
        core = self._core()
        read_all(tf.train.Checkpoint(model=core["model"], optimizer=core["optimizer"]), path)
        return int(path.rpartition("-")[2])

    # -- Keras hooks ---------------------------------------------------------------
    def on_train_begin(self, logs=None) -> None:
        self._install_signal_handlers()  # first: a signal during the initial save must still be caught
        # Created now: Keras builds the compiled metrics' variables when `fit` starts.
        self._manager = NumberedCheckpoints(self._shadow_root(), self._scratch_directory or self.directory, self.keep)
        if self._resume_from is not None:
            rest = self._rest()
            tf.train.Checkpoint(**rest).read(self._resume_from).expect_partial()
            for callback in self.stateful_callbacks:
                if callable(getattr(callback, "after_restore", None)):
                    callback.after_restore()
            # Keras zeroes the metrics at each epoch's start; a resumed epoch's
            # accumulators go back in at `on_epoch_begin`.
            if self._restore_metrics:
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
            done = self.model.build_train_state().steps_done()
            if self.every_n_steps and done // self.every_n_steps > self._last_saved // self.every_n_steps:
                self.save()
            self._stop_if_signalled()

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        self.save()
        self._stop_if_signalled()

    def on_train_end(self, logs=None) -> None:
        self.wait()  # the last checkpoint is on disk before anything reads it
        self.close()

    # -- saving and signals --------------------------------------------------------
    def save(self) -> str | None:
        """Snapshot now (at most once per step) and write it in the background; returns
        the path it will have. `wait` blocks until it is on disk."""
        done = self.model.build_train_state().steps_done()
        if done == self._last_saved:
            return None
        if done > 0 and self.open_run is not None:
            self.open_run()  # trained steps are never on disk before the run that resumes them is in the store
        self.wait()  # one write at a time: the shadows are about to change
        for callback in self.stateful_callbacks:
            if callable(getattr(callback, "before_save", None)):
                callback.before_save()
        self._snapshot()
        self._last_saved = done
        self._writer = threading.Thread(target=self._write, args=(done,), name="checkpoint-writer", daemon=True)
        self._writer.start()
        return f"{self._manager.directory}/ckpt-{done}"

    def _write(self, number: int) -> None:
        try:
            if self.before_write is not None:
                self.before_write()
            path = self._manager.save(number)
            if self._scratch_directory is not None:  # a non-chief worker's copy: written, then dropped
                tf.io.gfile.rmtree(self._scratch_directory)
            log.debug("checkpoint %s", path)
        except BaseException as error:  # re-raised in the training thread by `wait`
            self._write_error = error

    def wait(self) -> None:
        """Block until the last save is on disk.

        Raises:
            PipelineError: it could not be written.
        """
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        error, self._write_error = self._write_error, None
        if error is not None:
            raise PipelineError(f"cannot write a checkpoint to {self.directory}: "
                                f"{one_line(error)}") from None

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers (e.g. not in a joblib thread)
        for number in (signal.SIGINT, signal.SIGTERM):
            self._previous_handlers[number] = signal.signal(number, self._on_signal)

    def close(self) -> None:
        """Let a write in progress finish, and put the previous signal handlers back
        (after training, or when it failed: a write error is logged, not raised, so it
        cannot hide the error training failed with)."""
        try:
            self.wait()
        except PipelineError as error:
            log.error("%s", error)
        for number, handler in self._previous_handlers.items():
            signal.signal(number, handler)
        self._previous_handlers = {}

    def release(self) -> None:
        """Let another process train into the directory: once the run is closed."""
        if self._held is not None:
            self._held.close()
            self._held = None

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
        self.save()
        self.wait()
        path = self._manager.latest_checkpoint
        state = self.model.build_train_state()
        run_id = self._run_id()
        resume = f"; continue with: python -m pipeline.train resume={run_id}" if run_id else ""
        raise TrainingInterrupted(
            f"stopped by {signal.Signals(self._requested_signal).name} at step {int(state.global_batch.numpy())} "
            f"(epoch {int(state.epoch.numpy())}); checkpoint {path}{resume}",
            self._requested_signal,
        )

    def _run_id(self) -> str | None:
        if self.open_run is not None:
            return self.open_run()
        import mlflow

        run = mlflow.active_run()
        return run.info.run_id if run is not None else None
