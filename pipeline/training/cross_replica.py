"""Synchronizing replicas inside the compiled train step (`pipeline.training.guarded`), under a
tf.distribute strategy with more than one replica; elsewhere each function is the plain
single-device operation.

The train step all-reduces the gradients once (`all_reduce_gradients`), computes the
global gradient norm and the apply/skip decision from them (the same on every replica),
takes that decision with `cond` (whose branches may synchronize replicas, which a
replica's own control flow may not), and the optimizer applies the gradients without
all-reducing them again (`skip_optimizer_all_reduce`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import keras


def in_replica_step() -> bool:
    """True inside `strategy.run` with more than one replica in sync."""
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    return context is not None and context.num_replicas_in_sync > 1


def cond(pred, true_fn, false_fn, args: tuple = ()):
    """`tf.cond(pred, true_fn(*args), false_fn(*args))`, also where a branch synchronizes
    replicas (an all-reduce, `optimizer.apply`), which tf.distribute forbids inside a
    replica's control flow. Under a strategy with more than one replica, the cond runs
    in cross-replica context on the first replica's `pred` (every replica computes the
    same one, from all-reduced values) and each branch runs on every replica with its
    own `args`, as Keras' LossScaleOptimizer does. Branches must not capture
    replica-local tensors: pass them in `args`. Returns the branch's value on one device,
    None under a strategy."""
    import tensorflow as tf

    if not in_replica_step():
        return tf.cond(pred, lambda: true_fn(*args), lambda: false_fn(*args))

    def across_replicas(strategy, pred, *args):
        def on_every_replica(fn):
            def branch():
                strategy.extended.call_for_each_replica(fn, args=args)
                return tf.constant(True)
            return branch

        tf.cond(strategy.experimental_local_results(pred)[0], on_every_replica(true_fn), on_every_replica(false_fn))

    tf.distribute.get_replica_context().merge_call(across_replicas, args=(pred, *args))
    return None


def all_reduce_gradients(gradients: list, loss, optimizer: keras.optimizers.Optimizer):
    """In a replica step: the gradients and the loss summed over every replica (Keras
    divides each replica's loss by the number of replicas, so the sums are the global
    batch's mean loss and its gradient, as on one device), and `optimizer` set to apply
    gradients without summing them again. Elsewhere: unchanged.

    One all-reduce of the gradients per step, as stock Keras does; the optimizer's
    clipping (`global_clipnorm`) then sees the global gradient, as on one device.
    """
    if not in_replica_step():
        return gradients, loss
    import tensorflow as tf

    skip_optimizer_all_reduce(optimizer)  # at trace time; the same for every replica

    context = tf.distribute.get_replica_context()
    present = [g for g in gradients if g is not None]
    reduced = iter(context.all_reduce(tf.distribute.ReduceOp.SUM, [*present, tf.cast(loss, tf.float32)]))
    gradients = [None if g is None else next(reduced) for g in gradients]
    return gradients, next(reduced)


def skip_optimizer_all_reduce(optimizer: keras.optimizers.Optimizer) -> None:
    """Make `optimizer` apply gradients as given, without summing them over replicas:
    the train step has already done so (`all_reduce_gradients`). Keras 3.15's TensorFlow
    optimizer has no public switch (Keras 2's `experimental_aggregate_gradients`), so
    the per-instance override replaces `TFOptimizer._all_reduce_sum_gradients`."""
    for target in (optimizer, getattr(optimizer, "inner_optimizer", None)):
        if target is None:
            continue
        if not hasattr(target, "_all_reduce_sum_gradients"):
            raise RuntimeError(f"keras {__import__('keras').__version__}: {type(target).__name__} has no "
                               "_all_reduce_sum_gradients to skip; pipeline/training/cross_replica.py needs updating")
        target._all_reduce_sum_gradients = list  # (gradient, variable) pairs, unchanged
