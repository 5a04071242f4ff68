"""Shared pieces of the benchmarks: epoch timing, interleaved pairs, the tables of docs/performance.md.

Every benchmark measures its candidate and its baseline in the same process,
interleaved, the order turning each round (A B, B A, A B, ...: neither always runs
first, e.g. right after a slow patch or a fresh `clear_session`), and reports the
median of the per-pair ratios.

This VM's speed is not steady: its host runs it at full speed or at about half, for a
few seconds at a time (`host_steadiness` measures it: a fixed pure-Python loop's
chunks take either ~1x or ~2x their fastest time). A slow patch only ever adds time, so
a run's throughput is taken from its fastest steady epoch (`EpochTimer.best_epoch_seconds`),
and the median epoch is printed beside it.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "performance.md"
TRAIN_EXAMPLES = round(12000 * 0.9)  # synthetic_mnist's train split less the 10% that validates


class EpochTimer(keras.callbacks.Callback):
    """Wall time of each epoch, from one epoch's start to the next one's (so per-epoch
    work of every other callback, validation included, is inside), and the last
    epoch's start to the end of training; and the optimizer steps each epoch took."""

    starts: list[float] = []  # class-level: the pipeline instantiates it from config
    steps: list[int] = []

    def on_train_begin(self, logs=None) -> None:
        EpochTimer.starts, EpochTimer.steps = [], []

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        self._mark()

    def on_train_end(self, logs=None) -> None:
        self._mark()

    def _mark(self) -> None:
        EpochTimer.starts.append(time.perf_counter())
        EpochTimer.steps.append(int(self.model.optimizer.iterations.numpy()))

    @classmethod
    def steady_epochs(cls) -> list[float]:
        """Epoch times without the first epoch (it traces and compiles)."""
        return [b - a for a, b in zip(cls.starts, cls.starts[1:])][1:]

    @classmethod
    def steady_steps(cls) -> list[int]:
        """Optimizer steps of each steady epoch."""
        return [b - a for a, b in zip(cls.steps, cls.steps[1:])][1:]

    @classmethod
    def steady_epoch_seconds(cls) -> float:
        """The median steady epoch time."""
        return statistics.median(cls.steady_epochs())

    @classmethod
    def best_epoch_seconds(cls) -> float:
        """The fastest steady epoch: the one least slowed by the host (see the module docstring)."""
        return min(cls.steady_epochs())


def host_steadiness(seconds: float = 3.0) -> str:
    """How unsteady this machine is right now: a fixed pure-Python loop, timed in
    ~10 ms chunks on one core; the median and 90th-percentile chunk time against the
    fastest. A steady machine prints about 1.0x and 1.1x."""
    chunks, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        total = 0
        for i in range(200_000):
            total += i
        chunks.append(time.perf_counter() - start)
    chunks.sort()
    fastest = chunks[0]
    return (f"host steadiness: a fixed loop's chunks took {statistics.median(chunks) / fastest:.2f}x (median) and "
            f"{chunks[int(len(chunks) * 0.9)] / fastest:.2f}x (90th percentile) of the fastest")


@dataclass(frozen=True)
class Throughput:
    """Examples per second of one run: in its fastest steady epoch, and in its median one."""

    best: float
    median: float

    @classmethod
    def of_epochs(cls, examples: int) -> Throughput:
        """From the epochs `EpochTimer` timed, `examples` per epoch."""
        return cls(examples / EpochTimer.best_epoch_seconds(), examples / EpochTimer.steady_epoch_seconds())

    @classmethod
    def of_steps(cls, examples_per_step: float) -> Throughput:
        """From the epochs `EpochTimer` timed and the optimizer steps each took: for a
        `fit` whose epochs are not the data's (Keras's own train function runs whole
        executions, e.g. 6 x 16 = 96 steps for an 85-batch `steps_per_epoch`)."""
        rates = [steps * examples_per_step / seconds
                 for steps, seconds in zip(EpochTimer.steady_steps(), EpochTimer.steady_epochs())]
        return cls(max(rates), statistics.median(rates))


def interleaved_runs(rounds: int, runs: dict[str, Callable[[], Throughput]]) -> list[dict[str, Throughput]]:
    """Run each of `runs` once a round, `rounds` times, the order turning by one each
    round (A B C, B C A, C A B, ...); each round's throughputs, keyed as `runs`."""
    results, names = [], list(runs)
    for index in range(rounds):
        order = names[index % len(names):] + names[:index % len(names)]
        measured = {name: runs[name]() for name in order}
        results.append({name: measured[name] for name in names})
        print(f"  round {index + 1}: " + ", ".join(f"{name} {t.best:,.0f}/s (median epoch {t.median:,.0f}/s)"
                                                   for name, t in results[-1].items()), flush=True)
    return results


@dataclass(frozen=True)
class Ratio:
    """A candidate/baseline throughput ratio over interleaved rounds: the median of the
    rounds' fastest-epoch ratios (the figure), their lowest and highest, and the median
    of the rounds' median-epoch ratios."""

    median: float
    low: float
    high: float
    by_median_epochs: float

    @classmethod
    def of(cls, rounds: list[dict[str, Throughput]], candidate: str, baseline: str) -> Ratio:
        best = [r[candidate].best / r[baseline].best for r in rounds]
        return cls(statistics.median(best), min(best), max(best),
                   statistics.median(r[candidate].median / r[baseline].median for r in rounds))

    def cell(self, unit: str) -> str:
        """For a table: `0.93× (pairs 0.75–1.11)`."""
        return f"{self.median:.2f}× ({unit} {self.low:.2f}–{self.high:.2f})"


def interleaved(pairs: int, candidate: Callable[[], Throughput], baseline: Callable[[], Throughput]) -> Ratio:
    """Run baseline and candidate `pairs` times, in turning order: their throughput ratio."""
    rounds = interleaved_runs(pairs, {"baseline": baseline, "candidate": candidate})
    return Ratio.of(rounds, "candidate", "baseline")


# The CPU flags that decide what is fast here: AVX2/AVX-512 kernels, and whether bfloat16 is
# native (AMX) or emulated (AVX512-BF16 converts, it does not multiply).
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def measured_on() -> str:
    """One line for under a table: the date, the CPU (model and the flags of `CPU_FLAGS`
    it has and lacks, from /proc/cpuinfo), the core count and the versions."""
    import mlflow
    import tensorflow as tf

    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
        flags = set(next(line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")))
        has = " ".join(flag for flag in CPU_FLAGS if flag in flags) or "none"
        lacks = " ".join(flag for flag in CPU_FLAGS if flag not in flags)
        # e.g. AMD EPYC (avx2; no avx512f avx512_bf16 amx_bf16)
        cpu += f" ({has}; no {lacks})" if lacks else f" ({has})"
    except (OSError, StopIteration):
        cpu = f"{platform.processor() or platform.machine()} (CPU flags unknown)"
    return (f"Measured {time.strftime('%Y-%m-%d')} on {cpu}, {os.cpu_count()} cores; Python "
            f"{platform.python_version()}, TensorFlow {tf.__version__}, Keras {keras.__version__}, "
            f"MLflow {mlflow.__version__}.")


def update_docs(marker: str, text: str, path: Path = DOCS) -> None:
    """Replace the text between `<!-- {marker}:start -->` and `<!-- {marker}:end -->` in
    `path` (docs/performance.md), or append the markers with `text` if they are missing."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    document = path.read_text()
    if start not in document:
        document = document.rstrip() + f"\n\n{start}\n{end}\n"
    path.write_text(re.sub(f"{re.escape(start)}.*?{re.escape(end)}", lambda _: f"{start}\n{text}\n{end}", document,
                           flags=re.DOTALL))
    print(f"updated {path} ({marker})")
