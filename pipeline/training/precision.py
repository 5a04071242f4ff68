"""Resolve the `precision` config group to a Keras dtype policy."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


def resolve(policy: str) -> str:
    """`mixed` -> `mixed_float16` when a GPU is visible, else `mixed_bfloat16`.

    float16 needs a GPU's tensor cores to pay off and loss scaling to stay finite (Keras
    wraps the optimizer in a `LossScaleOptimizer` under that policy). bfloat16 keeps
    float32's exponent range, so it needs no loss scaling; on the CPU it is the only
    reduced precision with native kernels, though it is not always faster there.
    Any other policy name is returned unchanged.
    """
    if policy != "mixed":
        return policy
    import tensorflow as tf

    return "mixed_float16" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16"


@contextlib.contextmanager
def applied(policy: str) -> Iterator[str]:
    """Make `resolve(policy)` Keras' global dtype policy inside the block, then restore
    the previous one, so a run leaves no precision behind for the next."""
    import keras

    previous = keras.mixed_precision.global_policy()
    resolved = resolve(policy)
    keras.mixed_precision.set_global_policy(resolved)
    try:
        yield resolved
    finally:
        keras.mixed_precision.set_global_policy(previous)
