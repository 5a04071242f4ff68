"""What the train step (`pipeline.training.guarded.GuardedModel`) shares with the callbacks and
checkpoints around it: the policy it applies to a bad step (`StepGuard`, set by the
gradient-norm callback) and the variables it keeps (`TrainState`: data position,
per-epoch gradient statistics and the first bad step), which callbacks read between
executions and checkpoints save.

The statistics and the first bad step are one packed vector (`TrainState.stats`): the
step reads and writes it once (`TrainState.record_step`), however many layers the model
has. Each execution returns it with the step counter (`TrainState.observe`), so the
callbacks between executions read it with no op of their own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

# Why a step was bad, as recorded in the packed `stats`.
NON_FINITE = 1
ABOVE_THRESHOLD = 2

# The layout of `TrainState.stats` (float64: step numbers stay exact up to 2**53), for L layers:
# [0, 5) this epoch's statistics; 5 halted; [6, 7 + L) the last counted step's norms;
# [7 + L, 13 + 2L) the first bad step since the last `clear_bad_step` (none: step -1).
NORM_MAX, NORM_SUM, NORM_COUNT, DROPPED, ABOVE = range(5)
EPOCH_STATISTICS = 5
HALTED = 5
LAST = 6  # last norm, then the per-layer norms
# The first bad step's fields, from where it starts; then its per-layer norms.
BAD_REASON, BAD_STEP, BAD_EPOCH, BAD_BATCH, BAD_LOSS, BAD_NORM = range(6)
NO_BAD_STEP = (0.0, -1.0, -1.0, -1.0, 0.0, 0.0)


@dataclass(frozen=True)
class StepGuard:
    """What the train step does with a bad step.

    Args:
        threshold: a finite gradient norm above this is bad too; None: only non-finite
            loss or gradient norm is.
        drop_bad_steps: drop bad steps' updates. Always true for non-finite steps.
        halt_on_bad_step: after the first bad step, drop every update until a callback
            resumes the step (`TrainState.clear_bad_step`), so the weights stay as they
            were before it: for `stop` (then diagnose) and `rollback`.
    """

    threshold: float | None = None
    drop_bad_steps: bool = True
    halt_on_bad_step: bool = True


class TrainState(tf.Module):
    """The train step's variables: data position, and the packed per-epoch gradient
    statistics and first bad step. Read between executions; saved in checkpoints."""

    def __init__(self, layer_names: list[str], epoch: tf.Variable | None = None) -> None:
        super().__init__(name="train_state")
        self.layers = len(layer_names)

        # Under a tf.distribute strategy every replica computes the same values (from
        # all-reduced gradients and loss), so each keeps its own copy, updated without
        # cross-replica traffic, and reads and checkpoints use the first replica's.
        def variable(value, dtype):
            return tf.Variable(value, dtype=dtype, trainable=False, synchronization=tf.VariableSynchronization.ON_READ,
                               aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

        # Data position. `epoch` also seeds the epoch's shuffle order (pipeline.data), so
        # (epoch, batch) reproduces exactly which batch comes next.
        self.epoch = variable(0, tf.int64) if epoch is None else epoch
        self.batch = variable(0, tf.int64)  # batches consumed this epoch, dropped ones included
        self.global_batch = variable(0, tf.int64)  # batches consumed in the run
        self.skip_batches = variable(0, tf.int64)  # batches still to pass over without training
        self.stats = variable(self._initial_stats(), tf.float64)
        # `[global_batch, *stats]` as the train function left them (`observe`); None: read the variables.
        self._observed: tf.Tensor | None = None

    def _initial_stats(self) -> np.ndarray:
        return np.concatenate([np.zeros(LAST + 1 + self.layers), NO_BAD_STEP, np.zeros(self.layers)])

    @property
    def _bad(self) -> int:
        """Where the first bad step starts in `stats`."""
        return LAST + 1 + self.layers

    def record_step(self, loss: tf.Tensor, norm: tf.Tensor, layer_norms: tf.Tensor, non_finite: tf.Tensor,
                    above: tf.Tensor | None, guard: StepGuard) -> tf.Tensor:
        """In the train step: fold one step's checks into `stats` (one read, one write),
        and return whether to apply its update. `above`: the norm is above the guard's
        threshold (None: there is none)."""
        f64 = tf.float64
        stats = self.stats.read_value()
        was_halted = stats[HALTED] > 0
        counted = ~was_halted  # steps after a halt are not this run's steps to judge
        above = tf.constant(False) if above is None else above
        bad = non_finite | above if guard.drop_bad_steps else non_finite
        finite_norm = tf.math.is_finite(norm) & counted
        norm64 = tf.cast(norm, f64)
        epoch = tf.concat([
            tf.where(finite_norm, tf.maximum(stats[NORM_MAX:NORM_MAX + 1], norm64), stats[NORM_MAX:NORM_MAX + 1]),
            stats[NORM_SUM:EPOCH_STATISTICS] + tf.cast(tf.stack([tf.where(finite_norm, norm, 0.0),
                                                                tf.cast(finite_norm, tf.float32),
                                                                tf.cast(bad & counted, tf.float32),
                                                                tf.cast(above & counted, tf.float32)]), f64),
        ], axis=0)
        halted = tf.cast(was_halted | bad, f64)[None] if guard.halt_on_bad_step else stats[HALTED:HALTED + 1]
        norms = tf.concat([norm64[None], tf.cast(layer_norms, f64)], axis=0)
        last = tf.where(counted, norms, stats[LAST:self._bad])
        first_bad = (bad | above) & counted & (stats[self._bad + BAD_STEP] < 0)
        record = tf.concat([tf.cast(tf.stack([tf.where(non_finite, NON_FINITE, ABOVE_THRESHOLD)]), f64),
                            tf.cast(tf.stack([self.global_batch, self.epoch, self.batch]), f64),
                            tf.cast(loss, f64)[None], norms], axis=0)
        bad_step = tf.where(first_bad, record, stats[self._bad:])
        self.stats.assign(tf.concat([epoch, halted, last, bad_step], axis=0))
        return ~bad & ~was_halted

    def observed_values(self) -> tf.Tensor:
        """In a compiled function that writes the state (the train function, after its
        steps): `[global_batch, *stats]`, for `observe`."""
        return tf.concat([tf.cast(self.global_batch.read_value(), tf.float64)[None], self.stats.read_value()], 0)

    def observe(self, values: tf.Tensor) -> None:
        """Take `values` (`observed_values`, returned by the compiled function that just
        wrote the state) as the state until `forget_observed`: callbacks between
        executions then read a tensor already on the host instead of the variables (each
        eager read of a variable is an op dispatch, 0.1-1 ms on 2 busy cores; the guard
        and the checkpoints would make three an execution)."""
        self._observed = values

    def forget_observed(self) -> None:
        """The state is being written outside the train function: read the variables again."""
        self._observed = None

    def steps_done(self) -> int:
        """`global_batch`, the batches consumed in the run, as `snapshot` reads it."""
        if self._observed is None:
            return int(self.global_batch.numpy())
        return int(self._observed.numpy()[0])

    def reset_epoch_statistics(self) -> None:
        self.stats.assign(tf.concat([tf.zeros([EPOCH_STATISTICS], tf.float64), self.stats[EPOCH_STATISTICS:]], 0))

    def clear_bad_step(self) -> None:
        """Forget the first bad step and resume updates after a halt."""
        self.forget_observed()
        stats = self.stats.read_value()
        self.stats.assign(tf.concat([stats[:HALTED], tf.zeros([1], tf.float64), stats[LAST:self._bad],
                                     tf.constant(NO_BAD_STEP, tf.float64), tf.zeros([self.layers], tf.float64)], 0))

    def re_enter_epoch(self) -> None:
        """Continue mid-epoch after a restore: the epoch's data iterator starts from its
        first batch, so pass over the `batch` batches already trained on."""
        self.forget_observed()
        done = self.batch.read_value()
        self.skip_batches.assign(done)
        self.global_batch.assign_sub(done)
        self.batch.assign(0)

    def snapshot(self) -> Snapshot:
        """The statistics and first bad step as Python values: one read of `stats`, or
        none where the train function's own read is at hand (`observe`)."""
        values = self.stats.numpy() if self._observed is None else self._observed.numpy()[1:]
        bad = self._bad
        count = values[NORM_COUNT]
        return Snapshot(
            halted=bool(values[HALTED] > 0),
            last_norm=float(values[LAST]),
            last_layer_norms=values[LAST + 1:bad],
            dropped_steps=int(values[DROPPED]),
            above_threshold_steps=int(values[ABOVE]),
            grad_norm_max=float(values[NORM_MAX]) if count else math.nan,
            grad_norm_mean=float(values[NORM_SUM] / count) if count else math.nan,
            bad_reason=int(values[bad + BAD_REASON]),
            bad_step=int(values[bad + BAD_STEP]),
            bad_epoch=int(values[bad + BAD_EPOCH]),
            bad_batch=int(values[bad + BAD_BATCH]),
            bad_loss=float(values[bad + BAD_LOSS]),
            bad_norm=float(values[bad + BAD_NORM]),
            bad_layer_norms=values[bad + len(NO_BAD_STEP):],
        )


@dataclass(frozen=True)
class Snapshot:
    """One read of `TrainState.stats`: this epoch's statistics, the last counted step's
    norms, and the first bad step since the last clear (`bad_step` -1: none)."""

    halted: bool
    last_norm: float
    last_layer_norms: np.ndarray
    dropped_steps: int
    above_threshold_steps: int
    grad_norm_max: float  # nan: no finite norm this epoch
    grad_norm_mean: float
    bad_reason: int  # NON_FINITE or ABOVE_THRESHOLD
    bad_step: int  # its global batch number
    bad_epoch: int
    bad_batch: int
    bad_loss: float
    bad_norm: float
    bad_layer_norms: np.ndarray

    def epoch_statistics(self) -> dict[str, float]:
        return {"grad_norm_max": self.grad_norm_max, "grad_norm_mean": self.grad_norm_mean,
                "skipped_steps": float(self.dropped_steps)}
