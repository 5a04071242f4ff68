"""What the train step (`pipeline.training.guarded.GuardedModel`) shares with the callbacks and
checkpoints around it: the policy it applies to a bad step (`StepGuard`, set by the
gradient-norm callback) and the variables it keeps (`TrainState`: data position,
per-epoch gradient statistics and the first bad step), which callbacks read between
executions and checkpoints save.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import tensorflow as tf

# Why a step was bad, as recorded in `TrainState.bad_reason`.
NON_FINITE = 1
ABOVE_THRESHOLD = 2


@dataclass(frozen=True)
class StepGuard:
    """What the train step does with a bad step.

    Args:
        threshold: a finite gradient norm above this is bad too; None: only non-finite
            loss or gradient norm is.
        drop_bad_steps: drop bad steps' updates. Always true for non-finite steps.
        halt_on_bad_step: after the first bad step, drop every update until a callback
            resumes the step (`TrainState.halted`), so the weights stay as they were
            before it: for `stop` (then diagnose) and `rollback`.
    """

    threshold: float | None = None
    drop_bad_steps: bool = True
    halt_on_bad_step: bool = True


class TrainState(tf.Module):
    """The train step's variables: data position, per-epoch gradient statistics and the
    first bad step. Read between executions; saved in checkpoints."""

    def __init__(self, layer_names: list[str], epoch: tf.Variable | None = None) -> None:
        super().__init__(name="train_state")

        # Under a tf.distribute strategy every replica computes the same values (from
        # all-reduced gradients and loss), so each keeps its own copy, updated without
        # cross-replica traffic, and reads and checkpoints use the first replica's.
        def variable(value, dtype=None):
            return tf.Variable(value, dtype=dtype, trainable=False, synchronization=tf.VariableSynchronization.ON_READ,
                               aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

        def scalar(dtype, value=0):
            return variable(value, dtype)

        # Data position. `epoch` also seeds the epoch's shuffle order (pipeline.data), so
        # (epoch, batch) reproduces exactly which batch comes next.
        self.epoch = scalar(tf.int64) if epoch is None else epoch
        self.batch = scalar(tf.int64)  # batches consumed this epoch, dropped ones included
        self.global_batch = scalar(tf.int64)  # batches consumed in the run
        self.skip_batches = scalar(tf.int64)  # batches still to pass over without training
        # This epoch's gradient statistics over the steps that ran.
        self.norm_max = scalar(tf.float32)
        self.norm_sum = scalar(tf.float32)
        self.norm_count = scalar(tf.int64)
        self.dropped_steps = scalar(tf.int64)
        self.above_threshold_steps = scalar(tf.int64)
        # The most recent step's norms, for logging every N steps.
        self.last_norm = scalar(tf.float32)
        self.last_layer_norms = variable(tf.zeros([len(layer_names)]))
        # The first bad step since the last `clear_bad_step`.
        self.halted = scalar(tf.bool, False)
        self.bad_reason = scalar(tf.int64)
        self.bad_global_batch = scalar(tf.int64, -1)
        self.bad_epoch = scalar(tf.int64, -1)
        self.bad_batch = scalar(tf.int64, -1)
        self.bad_loss = scalar(tf.float32)
        self.bad_norm = scalar(tf.float32)
        self.bad_layer_norms = variable(tf.zeros([len(layer_names)]))

    def reset_epoch_statistics(self) -> None:
        for variable in (self.norm_max, self.norm_sum, self.norm_count, self.dropped_steps,
                         self.above_threshold_steps):
            variable.assign(tf.zeros_like(variable))

    def clear_bad_step(self) -> None:
        self.halted.assign(False)
        self.bad_reason.assign(0)
        for variable in (self.bad_global_batch, self.bad_epoch, self.bad_batch):
            variable.assign(-1)

    def re_enter_epoch(self) -> None:
        """Continue mid-epoch after a restore: the epoch's data iterator starts from its
        first batch, so pass over the `batch` batches already trained on."""
        done = self.batch.read_value()
        self.skip_batches.assign(done)
        self.global_batch.assign_sub(done)
        self.batch.assign(0)

    def epoch_statistics(self) -> dict[str, float]:
        count = int(self.norm_count.numpy())
        return {
            "grad_norm_max": float(self.norm_max.numpy()) if count else math.nan,
            "grad_norm_mean": float(self.norm_sum.numpy()) / count if count else math.nan,
            "skipped_steps": float(self.dropped_steps.numpy()),
        }
