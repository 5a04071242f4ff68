"""Resolve the `precision` config group to a Keras dtype policy that is fast on the
hardware at hand, and say why.

`precision=mixed` picks:
- a GPU of compute capability >= 8.0 (bfloat16 tensor cores): `mixed_bfloat16`;
- any other GPU: `mixed_float16` (Keras adds loss scaling);
- a CPU with AMX (`amx_bf16` in /proc/cpuinfo): `mixed_bfloat16`;
- any other CPU: `float32`, with one warning. Without AMX, bfloat16 matmuls and
  convolutions are emulated (even with AVX512-BF16, which only converts and dots
  vectors): a resnet on such a CPU ran at 0.15x of float32.

`mixed_bf16` and `mixed_fp16` (policies `mixed_bfloat16`, `mixed_float16`) force a policy,
with a warning when the hardware will emulate it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)


class Resolved(NamedTuple):
    """The Keras dtype policy a run trains with, and why it was chosen."""

    policy: str
    reason: str


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (`avx2`, `amx_bf16`, ...); empty where /proc/cpuinfo is not."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def gpu_compute_capabilities() -> list[tuple[int, int]]:
    """(major, minor) of every visible GPU; (0, 0) where TensorFlow does not say."""
    import tensorflow as tf

    return [tuple(tf.config.experimental.get_device_details(gpu).get("compute_capability") or (0, 0))
            for gpu in tf.config.list_physical_devices("GPU")]


def resolve(policy: str, gpus: Sequence[tuple[int, int]] | None = None, flags: set[str] | None = None) -> Resolved:
    """The policy to train with for the configured `policy` (`float32`, `mixed`,
    `mixed_bfloat16`, `mixed_float16`), given the GPUs' compute capabilities and the CPU
    flags (read from this machine when None)."""
    if policy == "float32":
        return Resolved("float32", "configured")
    gpus = gpu_compute_capabilities() if gpus is None else list(gpus)
    flags = cpu_flags() if flags is None else flags
    amx = "amx_bf16" in flags
    if policy == "mixed":
        if gpus and min(gpus) >= (8, 0):
            return Resolved("mixed_bfloat16", f"GPU compute capability {min(gpus)[0]}.{min(gpus)[1]} >= 8.0: "
                                              "bfloat16 tensor cores, no loss scaling needed")
        if gpus:
            return Resolved("mixed_float16", "GPU without bfloat16 tensor cores: float16 with loss scaling")
        if amx:
            return Resolved("mixed_bfloat16", "CPU with AMX (amx_bf16): native bfloat16 matrix units")
        return Resolved("float32", "this CPU has no AMX and no GPU is visible, so bfloat16 and float16 would be "
                                   "emulated and slower than float32; force bfloat16 with precision=mixed_bf16")
    emulated = not gpus and not (policy == "mixed_bfloat16" and amx)
    return Resolved(policy, "configured" + (" (emulated on this CPU: expect it slower than float32)"
                                            if emulated else ""))


@contextlib.contextmanager
def applied(policy: str) -> Iterator[Resolved]:
    """Make `resolve(policy)` Keras' global dtype policy inside the block, then restore
    the previous one, so a run leaves no precision behind for the next."""
    import keras

    previous = keras.mixed_precision.global_policy()
    resolved = resolve(policy)
    if "slower than float32" in resolved.reason:
        log.warning("precision=%s trains in %s: %s", policy, resolved.policy, resolved.reason)
    keras.mixed_precision.set_global_policy(resolved.policy)
    try:
        yield resolved
    finally:
        keras.mixed_precision.set_global_policy(previous)
