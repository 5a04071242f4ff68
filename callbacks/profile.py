"""Trace a few steady-state train steps with TensorFlow's profiler (`debug=profile`) and
log the trace to the run as artifact `profile/`, with `profile/top_ops.txt`: the ops
ranked by self time (`pipeline.training.top_ops`), readable in the MLflow UI.

    python -m pipeline.train debug=profile
    mlflow artifacts download -r RUN_ID -a profile -d /tmp/trace
    tensorboard --logdir /tmp/trace/profile        # pip install -e '.[profile]'

The first executions of `fit` trace and compile the train function, so they are skipped.
The callback overrides `on_train_batch_begin`, never `on_train_batch_end`: Keras calls
the former between executions without turning off its asynchronous batch-end path,
which a profile of the real loop must keep.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from pipeline.errors import one_line
from pipeline.training import top_ops

log = logging.getLogger(__name__)


class ProfileSteps(keras.callbacks.Callback):
    """Profile train steps `skip_steps` to `skip_steps + trace_steps`, then log the trace.

    Keras calls back once per execution (`trainer.steps_per_execution` steps), so the
    trace starts at the first execution at or after step `skip_steps` (counted over all
    epochs) and stops at the first execution at or after `trace_steps` more, or at the
    epoch's validation, whichever is first: validation is not a train step.

    Args:
        skip_steps: train steps left out first (the train function's tracing and
            compilation, the input pipeline filling its buffers).
        trace_steps: train steps to trace; a few executions are plenty, and the trace
            grows with them (about 1 MB per 100 small steps).
        top: rows of each table in `top_ops.txt`.
        stop_after: end `fit` once the trace is logged (after the execution under way,
            and the epoch's validation): a profile run is for its trace.
        directory: where the trace is written before it is logged; null: `profile/RUN_ID`
            in the job's output dir (set by `pipeline.fit_callbacks`).
    """

    def __init__(self, skip_steps: int = 48, trace_steps: int = 48, top: int = 25, stop_after: bool = True,
                 directory: str | None = None) -> None:
        super().__init__()
        if skip_steps < 0:
            raise ValueError(f"callbacks.profile.skip_steps must be >= 0. Received: {skip_steps}")
        if trace_steps < 1:
            raise ValueError(f"callbacks.profile.trace_steps must be >= 1. Received: {trace_steps}")
        self.skip_steps, self.trace_steps, self.top, self.stop_after = skip_steps, trace_steps, top, stop_after
        self.directory = Path(directory) if directory is not None else None
        self._epoch = 0
        self._started_at: int | None = None  # the global step the trace starts at
        self._clock = 0.0
        self.traced: tuple[int, int] | None = None  # [first, last) global steps traced, once done

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch = epoch

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        step = self._global_step(batch)
        if self.traced is not None:
            return
        if self._started_at is None and step >= self.skip_steps:
            self._start(step)
        elif self._started_at is not None and step >= self._started_at + self.trace_steps:
            self._stop(step)

    def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
        if self._started_at is not None and self.traced is None:  # the epoch's train steps are done
            self._stop(self._global_step(self.params["steps"]))

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self._started_at is not None and self.traced is None:
            self._stop(self._global_step(self.params["steps"]))
        elif self._started_at is None:
            log.warning("debug=profile traced nothing: training ended before step %d (callbacks.profile.skip_steps)",
                        self.skip_steps)

    def _global_step(self, batch: int) -> int:
        return self._epoch * self.params["steps"] + batch

    def _start(self, step: int) -> None:
        if self.directory is None:
            raise ValueError("ProfileSteps.directory is not set: pass directory=, or attach it through "
                             "pipeline.fit_callbacks")
        try:
            tf.profiler.experimental.start(str(self.directory))
        except Exception as error:  # e.g. another profiler is running: the run goes on untraced
            log.warning("debug=profile: the profiler did not start (%s); nothing is traced", one_line(error))
            self.traced = (step, step)
            return
        self._started_at, self._clock = step, time.perf_counter()

    def _stop(self, step: int) -> None:
        seconds = time.perf_counter() - self._clock
        tf.profiler.experimental.stop()
        self.traced = (self._started_at, step)
        steps = step - self._started_at
        per_execution = getattr(self.model, "steps_per_execution", None)
        header = [
            f"debug=profile: train steps {self._started_at}-{step - 1} ({steps} steps, epoch {self._epoch + 1}), "
            f"the first execution from step {self.skip_steps} on (callbacks.profile.skip_steps); "
            f"executions of {per_execution} steps.",
            f"Wall time: {1000 * seconds:.1f} ms ({1000 * seconds / max(steps, 1):.2f} ms per step, "
            "profiler overhead included).",
            "Full trace: this artifact's plugins/profile/*/*.xplane.pb; view it with tensorboard --logdir "
            "(pip install -e '.[profile]'). Ops on the host CPU, by self time.",
        ]
        try:
            text = top_ops.report(self.directory, header, steps, self.top)
            (self.directory / "top_ops.txt").write_text(text)
        except Exception as error:  # the trace is still worth logging
            log.warning("debug=profile: could not rank the trace's ops (%s)", one_line(error))
        try:
            import mlflow

            mlflow.log_artifacts(str(self.directory), "profile")
            mlflow.set_tag("profile_dir", str(self.directory))  # the closing block's tensorboard command
            log.info("debug=profile: trace of steps %d-%d logged to the run as artifact profile/ (kept in %s)",
                     self._started_at, step - 1, self.directory)
        except Exception as error:  # a profile never fails the run it profiles
            log.warning("debug=profile: the trace could not be logged (%s); it is in %s", one_line(error),
                        self.directory)
        if self.stop_after:
            self.model.stop_training = True
