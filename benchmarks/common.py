"""Shared pieces of the benchmarks: epoch timing, interleaved pairs, the README table.

Every benchmark measures its candidate and its baseline in the same process,
interleaved A B A B ..., and reports the median of the per-pair ratios: this machine's
run-to-run noise (about ±15% for a 4-epoch run) mostly cancels within a pair.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import keras

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


class EpochTimer(keras.callbacks.Callback):
    """Wall time of each epoch, from one epoch's start to the next one's (so per-epoch
    work of every other callback, validation included, is inside), and the last
    epoch's start to the end of training."""

    starts: list[float] = []  # class-level: the pipeline instantiates it from config

    def on_train_begin(self, logs=None) -> None:
        EpochTimer.starts = []

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        EpochTimer.starts.append(time.perf_counter())

    def on_train_end(self, logs=None) -> None:
        EpochTimer.starts.append(time.perf_counter())

    @classmethod
    def steady_epoch_seconds(cls) -> float:
        """Median epoch time, without the first epoch (it traces and compiles)."""
        durations = [b - a for a, b in zip(cls.starts, cls.starts[1:])][1:]
        return statistics.median(durations)


def interleaved(pairs: int, candidate: Callable[[], float], baseline: Callable[[], float]) -> list[float]:
    """Run baseline, candidate, baseline, candidate, ...; return candidate/baseline
    throughput ratios, one per pair (each callable returns a throughput)."""
    ratios = []
    for index in range(pairs):
        base, cand = baseline(), candidate()
        ratios.append(cand / base)
        print(f"  pair {index + 1}: candidate {cand:,.0f}/s, baseline {base:,.0f}/s, ratio {cand / base:.3f}",
              flush=True)
    return ratios


def machine() -> str:
    """The CPU, core count and versions, for the README's tables."""
    import mlflow
    import tensorflow as tf

    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return (f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, TensorFlow {tf.__version__}, "
            f"Keras {keras.__version__}, MLflow {mlflow.__version__}")


def update_readme(marker: str, text: str) -> None:
    """Replace the README's text between `<!-- {marker}:start -->` and `<!-- {marker}:end -->`."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    readme = README.read_text()
    if start not in readme:
        readme = readme.rstrip() + f"\n\n{start}\n{end}\n"
    README.write_text(re.sub(f"{re.escape(start)}.*?{re.escape(end)}", f"{start}\n{text}\n{end}", readme,
                             flags=re.DOTALL))
