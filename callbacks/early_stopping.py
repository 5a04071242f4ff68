"""Keras' EarlyStopping, with its progress saved in the run's checkpoints.

A resumed run must stop where the uninterrupted one would have, and restore the same
best weights, so patience, the best value, the best epoch and the best weights travel
with the checkpoint (`checkpoint_state`, read back by `after_restore`).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf


class EarlyStopping(keras.callbacks.EarlyStopping):
    """`keras.callbacks.EarlyStopping`, same arguments, resumable from a checkpoint."""

    _saved: tf.Module | None = None
    _saved_weights: list | None = None  # the best weights already copied into `_saved`

    def checkpoint_state(self) -> tf.Module:
        """Variables mirroring the Python state; `before_save` fills them."""
        if self._saved is None:
            saved = tf.Module(name="early_stopping")
            saved.wait = tf.Variable(0, dtype=tf.int64, trainable=False)
            saved.best = tf.Variable(np.nan, dtype=tf.float64, trainable=False)  # nan: none yet
            saved.best_epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
            saved.has_best_weights = tf.Variable(False, trainable=False)
            saved.best_weights = [tf.Variable(np.zeros(w.shape, dtype=w.dtype), trainable=False)
                                  for w in self.model.get_weights()]
            self._saved = saved
        return self._saved

    def before_save(self) -> None:
        saved = self.checkpoint_state()
        saved.wait.assign(self.wait)
        saved.best.assign(np.nan if self.best is None else float(self.best))
        saved.best_epoch.assign(self.best_epoch)
        saved.has_best_weights.assign(self.best_weights is not None)
        if self.best_weights is not None and self.best_weights is not self._saved_weights:
            for variable, value in zip(saved.best_weights, self.best_weights):
                variable.assign(value)
            self._saved_weights = self.best_weights  # Keras replaces the list on every improvement

    def after_restore(self) -> None:
        saved = self.checkpoint_state()
        self.wait = int(saved.wait.numpy())
        best = float(saved.best.numpy())
        self.best = None if np.isnan(best) else best
        self.best_epoch = int(saved.best_epoch.numpy())
        self.best_weights = [v.numpy() for v in saved.best_weights] if bool(saved.has_best_weights.numpy()) else None
        self._saved_weights = self.best_weights
