"""Keras' EarlyStopping, with its progress saved in the run's checkpoints.

A resumed run must stop where the uninterrupted one would have, and restore the same
best weights, so patience, the best value, the best epoch and the best weights travel
with the checkpoint (`checkpoint_state`, read back by `after_restore`).
"""

from __future__ import annotations

import logging

import keras
import numpy as np
import tensorflow as tf

log = logging.getLogger(__name__)


def _print(message: str) -> None:
    """What Keras's own callbacks print (`keras.src.utils.io_utils.print_msg`, not public):
    to stdout in interactive logging, else to the log."""
    if keras.config.is_interactive_logging_enabled():
        print(message, flush=True)
    else:
        log.info(message)


class EarlyStopping(keras.callbacks.EarlyStopping):
    """`keras.callbacks.EarlyStopping`, same arguments, resumable from a checkpoint.

    The best epoch's weights are kept in variables (`checkpoint_state().best_weights`),
    copied in one compiled call, rather than in NumPy arrays from `get_weights()`: an
    improving epoch then costs no copy to the host, and a checkpoint saves them as they are.
    Everything else an epoch's end decides in Python, with no TensorFlow op: between two
    executions each eager op costs 0.5-1 ms on 2 busy cores.
    """

    _saved: tf.Module | None = None
    _copy_to_best = None  # compiled: the model's weights -> saved.best_weights
    _copy_from_best = None  # compiled: saved.best_weights -> the model's weights
    _has_best = False  # mirrors saved.has_best_weights
    _in_variables: tuple | None = None  # (wait, best, best_epoch) as the variables hold them

    def checkpoint_state(self) -> tf.Module:
        """Variables holding the state: the best weights themselves, and the Python
        counters, which `before_save` copies in."""
        if self._saved is None:
            saved = tf.Module(name="early_stopping")
            saved.wait = tf.Variable(0, dtype=tf.int64, trainable=False)
            saved.best = tf.Variable(np.nan, dtype=tf.float64, trainable=False)  # nan: none yet
            saved.best_epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
            saved.has_best_weights = tf.Variable(False, trainable=False)
            weights = self.model.weights
            saved.best_weights = [tf.Variable(tf.zeros(w.shape, w.dtype), trainable=False) for w in weights]
            pairs = list(zip(saved.best_weights, weights))
            self._copy_to_best = tf.function(
                lambda: [*(best.assign(w) for best, w in pairs), saved.has_best_weights.assign(True)], autograph=False)
            self._copy_from_best = tf.function(lambda: [w.assign(best) for best, w in pairs], autograph=False)
            self._saved = saved
        return self._saved

    def on_train_begin(self, logs=None) -> None:
        super().on_train_begin(logs)
        self.checkpoint_state().has_best_weights.assign(False)
        self._has_best, self._in_variables = False, None

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        # Keras 3.15's, with `_keep_best_weights()` for `best_weights = model.get_weights()`
        # and `improves` for `_is_improvement` (tests/test_keras_canary.py: revisit on change).
        if self.monitor_op is None:
            self._set_monitor_op()  # once the model's metrics are built (Keras's own, private: canary)
        current = self.get_monitor_value(logs)
        if current is None or epoch < self.start_from_epoch:
            return
        if self.restore_best_weights and not self.has_best_weights:
            self._keep_best_weights()  # never set: the current weights are the best
            self.best_epoch = epoch
        self.wait += 1
        if self.improves(current, self.best):
            self.best = current
            self.best_epoch = epoch
            if self.restore_best_weights:
                self._keep_best_weights()
            if self.baseline is None or self.improves(current, self.baseline):
                self.wait = 0  # beat both the baseline and the previous best
            return
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            self.model.stop_training = True

    def on_train_end(self, logs=None) -> None:
        if self.stopped_epoch > 0 and self.verbose > 0:
            _print(f"Epoch {self.stopped_epoch + 1}: early stopping")
        if self.restore_best_weights and self.has_best_weights:
            if self.verbose > 0:
                _print(f"Restoring model weights from the end of the best epoch: {self.best_epoch + 1}.")
            self.checkpoint_state()
            self._copy_from_best()
        if self.stopped_epoch > 0:  # the last "Epoch N/M" line is not the model the run exports
            restored = f"restored the weights of epoch {self.best_epoch + 1}" if self.restored else "kept its weights"
            log.info("early stopping: stopped at epoch %d (%s did not improve for %d epochs), %s",
                     self.stopped_epoch + 1, self.monitor, self.patience, restored)

    @property
    def restored(self) -> bool:
        """Whether `on_train_end` put the best epoch's weights back."""
        return bool(self.restore_best_weights and self._saved is not None and self.has_best_weights)

    def run_tags(self) -> dict[str, str]:
        """What it did, as run tags (epochs counted from 1, as Keras prints them):
        the best epoch, the epoch it stopped at (if it did), the epoch restored (if any)."""
        tags = {"early_stopping.best_epoch": str(self.best_epoch + 1)}
        if self.stopped_epoch > 0:
            tags["early_stopping.stopped_epoch"] = str(self.stopped_epoch + 1)
        if self.restored:
            tags["early_stopping.restored_epoch"] = str(self.best_epoch + 1)
        return tags

    @property
    def has_best_weights(self) -> bool:
        return self._has_best

    def improves(self, monitor_value, reference_value) -> bool:
        """Whether `monitor_value` beats `reference_value` (None: nothing to beat) by more
        than `min_delta`: Keras's `_is_improvement`, which compares with an eager op
        (`ops.less` / `ops.greater`), in Python. `min_delta` is negative for `ops.less`, as
        Keras's `_set_monitor_op` leaves it."""
        if reference_value is None:
            return True
        value = float(monitor_value) - self.min_delta
        return value < reference_value if self.monitor_op is keras.ops.less else value > reference_value

    def _keep_best_weights(self) -> None:
        self.checkpoint_state()
        self._copy_to_best()  # and sets has_best_weights
        self._has_best = True

    def before_save(self) -> None:
        """Copy the counters into their variables: only those that changed since the
        last save (each assignment is an eager op)."""
        saved = self.checkpoint_state()
        values = (int(self.wait), np.nan if self.best is None else float(self.best), int(self.best_epoch))
        held = self._in_variables or (None, None, None)
        for variable, value, old in zip((saved.wait, saved.best, saved.best_epoch), values, held):
            if value != old:  # nan (no best yet) is always written
                variable.assign(value)
        self._in_variables = values

    def after_restore(self) -> None:
        saved = self.checkpoint_state()
        self.wait = int(saved.wait.numpy())
        best = float(saved.best.numpy())
        self.best = None if np.isnan(best) else best
        self.best_epoch = int(saved.best_epoch.numpy())
        self._has_best = bool(saved.has_best_weights.numpy())
        self._in_variables = (self.wait, best, self.best_epoch)
