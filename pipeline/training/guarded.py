"""The pipeline's train step: Keras's own, plus gradient-norm and finite-value checks in
the same compiled graph.

`GuardedModel` wraps any Keras model (Sequential, Functional, subclassed, nested) and
trains it with `fit`. Its `train_step` is Keras 3.15's `TensorFlowTrainer.train_step`
with three additions, all inside the compiled step, so no step waits for Python:

- the gradient norm, global and per layer, from the same tape as the update, divided by
  the loss scale under `LossScaleOptimizer` so it is the true norm;
- one `is_finite(loss + norm)` per step and, when a `StepGuard` says so, the update
  dropped in the graph (as `LossScaleOptimizer` drops one with non-finite gradients);
- the data position (epoch, batch) and a countdown of batches to pass over, which a
  resume (fast-forward) and a rollback (skip M batches) both use.

State lives in tf.Variables (`TrainState`, in `pipeline.training.train_state` with `StepGuard`)
that callbacks read between executions and checkpoints save. With
`steps_per_execution > 1`, the statistics aggregate across the steps of one execution
(max norm, any non-finite, count of dropped steps) and the first bad step is recorded,
so no bad step goes unseen.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import keras
import tensorflow as tf
from keras.src.backend.tensorflow import trainer as keras_tf_trainer
from keras.src.losses import loss as keras_loss  # Keras' own train step uses it: same semantics

from pipeline.training import cross_replica
from pipeline.training.train_state import TrainState

if TYPE_CHECKING:
    from pipeline.training.train_state import StepGuard


class GuardedModel(keras.Model):
    """Train `model` with the per-step checks of `guard` (None: no checks, only the
    data position is tracked: the plain Keras step).

    Compile, fit and evaluate this wrapper; export and save `model` itself.

    Args:
        model: the model to train.
        guard: what to do with a bad step.
        epoch: the variable that orders the training data (`pipeline.data.Splits.epoch`).
        steps_per_epoch: the epoch length, when `fit` reads all epochs from one iterator
            (`pipeline.data.consecutive_epochs`): then no execution of several steps runs
            past an epoch's last batch, so each epoch trains on exactly its own batches.
            None: Keras's own train function, for data that ends with each epoch.
    """

    def __init__(self, model: keras.Model, guard: StepGuard | None = None, epoch: tf.Variable | None = None,
                 steps_per_epoch: int | None = None) -> None:
        super().__init__(name=f"guarded_{model.name}")
        self.model = model
        self.guard = guard
        self._epoch = epoch
        self._steps_per_epoch = steps_per_epoch
        self._layer_groups: list[tuple[str, list[int]]] | None = None
        self.train_state: TrainState | None = None
        # Set once the train step's Python has run, i.e. it is traced: the rest of the
        # first execution (graph optimization, the steps) is TensorFlow's C++, which
        # leaves Python free for other threads (`pipeline.pending_run` waits for it).
        self.step_traced = threading.Event()

    def call(self, inputs, training=None):
        return self.model(inputs, training=training)

    @property
    def layer_names(self) -> list[str]:
        """The layers whose gradient norms are reported, in the order of `TrainState.last_layer_norms`."""
        return [name for name, _ in self._groups()]

    def _groups(self) -> list[tuple[str, list[int]]]:
        """Trainable variables grouped by the layer that owns them (by variable path,
        so nested models' layers keep their parents' names: `member_0/dense`)."""
        if self._layer_groups is None:
            groups: dict[str, list[int]] = {}
            for index, variable in enumerate(self.model.trainable_variables):
                groups.setdefault(layer_path(variable, self.model), []).append(index)
            self._layer_groups = list(groups.items())
        return self._layer_groups

    def build_metrics(self, batch: tuple) -> None:
        """Create the compiled loss's and metrics' variables from one batch (Keras
        otherwise creates them while tracing the first step, after checkpoints have
        been restored). Inference only: no weight, state or random seed changes."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
        y_pred = self(x, training=False)
        self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=False)
        self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        self.reset_metrics()

    def build_train_state(self) -> TrainState:
        """Create the train state (once the model is built): callbacks and checkpoints need it before `fit`."""
        if self.train_state is None:
            self.train_state = TrainState(self.layer_names, epoch=self._epoch)
        return self.train_state

    def make_train_function(self, force=False):
        """Keras 3.15's train function (`TensorFlowTrainer._make_function`), except that
        an execution of `steps_per_execution` steps stops at the epoch's last batch.

        Keras's own runs `steps_per_execution` steps while its iterator has data. Over a
        single iterator of consecutive epochs that would carry an epoch's last execution
        into the next epoch whenever `steps_per_execution` does not divide the epoch.
        Here the execution's length is the epoch's remaining batches, capped, read from
        the train state in the same graph. Each execution also returns the state it
        leaves (`TrainState.observe`), which the callbacks between executions read.
        """
        if self._steps_per_epoch is None:
            return super().make_train_function(force)
        if self.train_function is not None and not force:
            return self.train_function
        strategy = self.distribute_strategy
        steps_per_execution, steps_per_epoch = self.steps_per_execution, self._steps_per_epoch
        state = self.build_train_state()

        def one_step(data):
            outputs = strategy.run(self.train_step, args=(data,))
            # Looked up when traced: `pipeline.training.keras_multiworker_fix` may have replaced it.
            return keras_tf_trainer.reduce_per_replica(outputs, strategy, reduction="auto")

        def execution(iterator):
            remaining = tf.cast(steps_per_epoch, tf.int64) - state.batch.read_value()
            steps = tf.clip_by_value(remaining, 1, steps_per_execution)
            outputs = one_step(next(iterator))
            if steps_per_execution > 1:
                _, outputs = tf.while_loop(lambda i, _: i < steps, lambda i, _: (i + 1, one_step(next(iterator))),
                                           (tf.constant(1, tf.int64), outputs))
            return outputs, state.observed_values()

        if not self.run_eagerly:
            # As Keras's: the step itself is not converted by AutoGraph.
            one_step = tf.function(one_step, reduce_retracing=True, jit_compile=self.jit_compile, autograph=False)
            execution = tf.function(execution, reduce_retracing=True, autograph=False)

        def train_function(iterator):
            outputs, observed = execution(iterator)
            state.observe(observed)  # what callbacks read until the next execution: no eager reads
            return outputs

        self.train_function = train_function
        return train_function

    def train_step(self, data):
        state = self.build_train_state()

        def pass_over(data) -> tf.Tensor:
            state.skip_batches.assign_sub(1)
            return tf.constant(False)

        # tf.cond; under a strategy, taken across replicas, since the step all-reduces.
        cross_replica.cond(state.skip_batches > 0, pass_over, lambda data: self._guarded_step(data, state),
                           args=(data,))
        state.batch.assign_add(1)
        state.global_batch.assign_add(1)
        self.step_traced.set()
        return self.get_metrics_result()

    def _guarded_step(self, data, state: TrainState) -> tf.Tensor:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
            scaled_loss = self.optimizer.scale_loss(loss)
        variables = self.model.trainable_variables
        gradients = tape.gradient(scaled_loss, variables)
        # Under a strategy: summed over replicas once, here, so the norm is the global
        # one and every replica takes the same apply/skip branch; the optimizer is told
        # to apply them as they are, without summing them again.
        gradients, global_loss = cross_replica.all_reduce_gradients(gradients, loss, self.optimizer)

        guard = self.guard
        if guard is None:  # the plain Keras step: nothing measured, every update applied
            ok = tf.constant(True)
        else:
            loss32 = tf.cast(global_loss, tf.float32)
            layer_norms, norm = self._norms(gradients)
            loss_scaled = isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer)
            # Under loss scaling, overflowing gradients are routine: LossScaleOptimizer
            # drops that update and lowers the scale. Only a non-finite loss is divergence.
            non_finite = ~tf.math.is_finite(loss32 if loss_scaled else loss32 + norm)
            above = None if guard.threshold is None else tf.math.is_finite(norm) & (norm > guard.threshold)
            ok = state.record_step(loss32, norm, layer_norms, non_finite, above, guard)

        # Replica-local values are arguments, not captured: under a strategy each replica's
        # own are passed in (pipeline.training.cross_replica.cond).
        def apply(x, y, y_pred, sample_weight, loss, gradients) -> tf.Tensor:
            batch_size = tf.shape(next(t for t in tf.nest.flatten(x) if t is not None))[0]
            self._loss_tracker.update_state(keras_loss.unscale_loss_for_distribution(loss), sample_weight=batch_size)
            self.optimizer.apply(gradients, variables)
            self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
            return tf.constant(True)

        return cross_replica.cond(ok, apply, lambda *_: tf.constant(False),
                                  args=(x, y, y_pred, sample_weight, loss, gradients))

    def _norms(self, gradients) -> tuple[tf.Tensor, tf.Tensor]:
        """(per-layer norms, global norm) of the true (unscaled) gradients: one fused
        sum of squares per gradient (`l2_loss`), summed per layer in one op."""
        present = [(layer, i) for layer, (_, indices) in enumerate(self._groups()) for i in indices
                   if gradients[i] is not None]
        if not present:
            return tf.zeros([len(self._groups())]), tf.constant(0.0)
        halves = tf.stack([tf.nn.l2_loss(_float32(_values(gradients[i]))) for _, i in present])  # sum(g**2) / 2
        per_layer = tf.math.unsorted_segment_sum(halves, [layer for layer, _ in present], len(self._groups()))
        scale = 1.0
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            scale = tf.cast(self.optimizer.dynamic_scale, tf.float32)
        return tf.sqrt(2.0 * per_layer) / scale, tf.sqrt(2.0 * tf.reduce_sum(halves)) / scale


def layer_path(variable, model: keras.Model) -> str:
    """The path of the layer that owns `variable`, relative to `model`: `dense_1`, or
    `member_0/dense` inside a nested model."""
    path = variable.path.rpartition("/")[0] or variable.path
    return path.removeprefix(f"{model.name}/")


def _float32(tensor: tf.Tensor) -> tf.Tensor:
    return tensor if tensor.dtype == tf.float32 else tf.cast(tensor, tf.float32)


def _values(gradient):
    """The dense values of a gradient (an Embedding's gradient is IndexedSlices)."""
    return gradient.values if isinstance(gradient, tf.IndexedSlices) else gradient


def compiled_after_first_call(fn):
    """`fn` (no arguments, or tensors), run eagerly on its first call and as a compiled
    graph from its second on: for per-epoch or per-save work whose first call comes before
    the first train step, where tracing it (0.1-0.3 s) costs more than running it once."""
    compiled = tf.function(fn, autograph=False)
    calls = 0

    def call(*args):
        nonlocal calls
        calls += 1
        return fn(*args) if calls == 1 else compiled(*args)

    return call


class TrainProgress(keras.callbacks.Callback):
    """Keeps `TrainState` in step with `fit`'s epochs; added to every run by the pipeline.

    At each epoch's start: the epoch number (which also says where the data iterator,
    opened at the first epoch, starts), batch 0 and fresh gradient statistics, unless
    this is the epoch a resume re-enters (whose position and statistics were restored).
    One compiled call from the second epoch on: eagerly, its dozen variable reads and
    writes cost ~5-10 ms an epoch (the first runs eagerly, rather than trace before the first step).
    """

    _begin_epoch = None

    def on_train_begin(self, logs=None) -> None:
        state = self.model.build_train_state()

        def begin_epoch(epoch: tf.Tensor) -> tf.Tensor:
            re_entered = tf.equal(state.epoch, epoch) & ((state.batch > 0) | (state.skip_batches > 0))

            def start() -> tf.Tensor:
                state.epoch.assign(epoch)
                state.batch.assign(0)
                state.reset_epoch_statistics()
                return tf.constant(True)

            tf.cond(re_entered, lambda: tf.constant(False), start)
            return state.observed_values()

        self._begin_epoch = compiled_after_first_call(begin_epoch)

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        self.model.build_train_state().observe(self._begin_epoch(tf.constant(epoch, tf.int64)))


class EpochProgbar(keras.callbacks.ProgbarLogger):
    """Keras's progress bar (`trainer.verbose=1`), counting no further than the epoch's
    steps. Keras numbers an epoch's executions in whole `steps_per_execution`, so with 16
    steps per execution a 41-step epoch's bar would pass through 48/41; `GuardedModel`'s
    last execution of an epoch stops at the epoch's end, at step 41."""

    def on_train_batch_end(self, batch: int, logs=None) -> None:
        steps = self.target  # the epoch's steps (`set_params`), None where fit does not know them
        super().on_train_batch_end(batch if steps is None else min(batch, steps - 1), logs)
