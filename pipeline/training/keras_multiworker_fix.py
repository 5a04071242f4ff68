"""Work around Keras 3's `fit` failing under `tf.distribute.MultiWorkerMirroredStrategy`.

keras-team/keras#20585 (also tensorflow/tensorflow#72388): with the TensorFlow backend,
stock Keras (3.15.1 and earlier 3.x) cannot `fit` under MultiWorkerMirroredStrategy:

1. `TensorFlowTrainer._maybe_symbolic_build` looks for distributed values with Keras'
   own `tree.map_structure`, which expands a `PerReplica` into its components, so it
   never finds one and hands the `PerReplica` batch to `_symbolic_build`:
   `ValueError: Attempt to convert a value (PerReplica:{...})`.
2. `reduce_per_replica` reduces every output (scalar metrics included) with
   `strategy.reduce("MEAN", v, axis=0)`: `Invalid reduction dimension 0` for a scalar.

`apply()` patches exactly these two functions, only for the Keras versions listed in
`AFFECTED`, and only when the pipeline runs `distribution=multi_worker`. The canary test
`tests/test_distribution.py::test_stock_keras_still_fails_multi_worker` runs stock
Keras under the strategy and fails once upstream fixes it: then delete this module.
"""

from __future__ import annotations

import logging

import keras

log = logging.getLogger(__name__)

# Keras 3 versions up to this one need the fix (checked: 3.15.1). A newer Keras is left
# alone: the canary test says whether the fix is still needed.
CHECKED_UP_TO = (3, 15, 1)

_applied = False


def needed(version: str = keras.__version__) -> bool:
    """Whether this Keras version is one the fix is for (3.x up to `CHECKED_UP_TO`)."""
    parts = tuple(int(p) for p in version.split("+")[0].split(".")[:3] if p.isdigit())
    return (3,) <= parts <= CHECKED_UP_TO


def apply() -> bool:
    """Patch Keras' TensorFlow trainer (idempotent). Returns whether the fix is active."""
    global _applied
    if _applied:
        return True
    if not needed():
        log.info("keras %s: not patching keras#20585 (checked up to %s)", keras.__version__,
                 ".".join(map(str, CHECKED_UP_TO)))
        return False
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer as tf_trainer

    stock_reduce = tf_trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        # Scalars (the metrics every step returns) have no axis 0 to reduce over.
        if reduction in ("auto", "mean") and tf_trainer._collective_all_reduce_multi_worker(strategy):
            return tf.nest.map_structure(
                lambda v: strategy.reduce("MEAN", v, axis=0 if v.shape.rank else None), values)
        return stock_reduce(values, strategy, reduction)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if self._distribute_strategy is None:
            return
        if iterator is not None:
            for _, _, it in iterator:
                # The first replica's slice has the shapes and dtypes the build needs.
                # `tf.nest` (unlike Keras' tree) keeps a PerReplica whole.
                data_batch = tf.nest.map_structure(
                    lambda v: self.distribute_strategy.experimental_local_results(v)[0]
                    if isinstance(v, tf.distribute.DistributedValues) else v,
                    next(it))
                break
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    tf_trainer.reduce_per_replica = reduce_per_replica  # looked up by name in `_make_function`
    tf_trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
    _applied = True
    log.info("keras %s: patched for keras#20585 (MultiWorkerMirroredStrategy fit)", keras.__version__)
    return True
