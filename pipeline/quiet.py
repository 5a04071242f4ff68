"""Load TensorFlow without its CUDA-probing lines on a machine with no GPU; hide nothing else.

Importing TensorFlow and listing its devices writes straight to file descriptor 2, from
C++ and before absl's logging starts, so neither TF_CPP_MIN_LOG_LEVEL nor
CUDA_VISIBLE_DEVICES hides it (as seen with TensorFlow 2.21 on a CPU-only machine):

    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
    I0000 00:00:1796161741.274464   19237 cudart_stub.cc:31] Could not find cuda drivers on your machine, ...
    E0000 00:00:1796161746.319079   19237 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: ...

(the first two once per TensorFlow library loaded at import, the last at the first
device listing). Nothing is wrong, yet it reads like a failure. `import_tensorflow()`
imports TensorFlow and lists its devices once per process with fd 2 going through
`filtered_stderr`, which drops these lines (with TF_CPP_MIN_LOG_LEVEL >= 1, as `pipeline.cli`
sets it, every C++ INFO line too) and forwards every other byte unchanged.
Where a GPU is expected (an NVIDIA driver, and CUDA_VISIBLE_DEVICES not "" or "-1"), or
with PIPELINE_SHOW_TF_INIT=1, nothing is filtered: there a CUDA failure is news.

The filter itself is `pipeline/stderr_filter.py`, run as a process.

TensorFlow's Python warnings that say nothing in the situation at hand are dropped from
then on with `drop_tensorflow_warnings`:
- from a process's second run on (`count_run`), "5 out of the last 5 calls to
  <function ...> triggered tf.function retracing". Each run builds a new model, so Keras
  and the pipeline compile new functions from the same code, which TensorFlow counts as
  one function retracing: a sweep of seven jobs in one process printed 70 of these
  paragraphs, about nothing. A real retracing problem (a function retraced within one
  run) shows in the first run;
- after a checkpoint read that failed with a clear error
  (`pipeline.training.checkpoint_store.read_all`), one warning per value it left unrestored.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

from pipeline import stderr_filter
from pipeline.heavy_imports import first_import

_tensorflow_loaded = False
_runs = 0  # runs started in this process (`count_run`)
RETRACING = "triggered tf.function retracing"


def import_tensorflow() -> None:
    """Import TensorFlow and list its physical devices, once per process, without the
    CUDA-probing lines where no GPU is expected.

    Listing physical devices does not initialise TensorFlow's runtime: logical devices
    and multi-worker collectives can still be configured afterwards.
    """
    global _tensorflow_loaded
    if _tensorflow_loaded:
        return
    filtering = filtered_stderr(drop_info=_min_log_level() >= 1) if filtering_wanted() else contextlib.nullcontext()

    with filtering, first_import("tensorflow"):  # without garbage collections through its objects
        import tensorflow as tf

        tf.config.list_physical_devices()
    _tensorflow_loaded = True


class _DroppedTensorFlowWarnings(logging.Filter):
    """Drops TensorFlow's Python log records that contain any of `fragments`."""

    def __init__(self) -> None:
        super().__init__()
        self.fragments: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


_dropped = _DroppedTensorFlowWarnings()


def drop_tensorflow_warnings(*fragments: str) -> None:
    """From now on in this process, drop TensorFlow's Python warnings containing any of `fragments`."""
    _dropped.fragments.update(fragments)
    tensorflow_logger = logging.getLogger("tensorflow")  # TensorFlow's Python warnings
    if _dropped not in tensorflow_logger.filters:
        tensorflow_logger.addFilter(_dropped)


def count_run() -> int:
    """Count a run starting in this process: from the second on, TensorFlow's retracing
    warning, which every later run would trigger (see the module docstring), is dropped.

    Returns:
        the runs this process has started, this one included.
    """
    global _runs
    _runs += 1
    if _runs > 1:
        drop_tensorflow_warnings(RETRACING)
    return _runs


def filtering_wanted(environ: Mapping[str, str] | None = None, nvidia_driver: bool | None = None) -> bool:
    """False with PIPELINE_SHOW_TF_INIT=1, or where a GPU is expected: an NVIDIA driver is
    loaded and CUDA_VISIBLE_DEVICES does not hide every device ("" or "-1").

    Args:
        environ: the environment (default: this process's).
        nvidia_driver: whether an NVIDIA driver is loaded (default: /proc/driver/nvidia exists).
    """
    environ = os.environ if environ is None else environ
    nvidia_driver = Path("/proc/driver/nvidia").exists() if nvidia_driver is None else nvidia_driver
    if environ.get("PIPELINE_SHOW_TF_INIT") == "1":
        return False
    return not (nvidia_driver and environ.get("CUDA_VISIBLE_DEVICES") not in ("", "-1"))


def _min_log_level() -> int:
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


def image_decoding() -> contextlib.AbstractContextManager[None]:
    """A block that decodes the user's image files: without what the decoders print about
    a bad file (the pipeline names it in one line), and without TensorFlow's probing."""
    return filtered_stderr(drop_info=_min_log_level() >= 1, drop_decoders=True)


@contextlib.contextmanager
def filtered_stderr(*, drop_info: bool, drop_decoders: bool = False) -> Iterator[None]:
    """Inside the block, file descriptor 2 (C++, Python, child processes) writes into a
    pipe read by a filter process (`pipeline/stderr_filter.py`), which forwards to the
    real stderr every line that `stderr_filter.dropped` keeps. fd 2 is restored on the way out, an
    exception included, once the filter has forwarded all it read.

    A process rather than a thread: if the block aborts the whole process (a fatal
    TensorFlow check), the filter still forwards what was written before.

    Args:
        drop_info: also drop glog INFO lines (for TF_CPP_MIN_LOG_LEVEL >= 1).
        drop_decoders: also drop what libjpeg and libpng say about the files they decode.
    """
    if sys.stderr is not None:
        sys.stderr.flush()
    filter_process, real_stderr = _start_filter(drop_info, drop_decoders)
    if filter_process is None:  # filtering is a nicety, never a failure
        yield
        return
    os.dup2(filter_process.stdin.fileno(), 2)
    filter_process.stdin.close()  # fd 2 now holds the pipe's only write end in this process
    try:
        yield
    finally:
        if sys.stderr is not None:
            sys.stderr.flush()
        os.dup2(real_stderr, 2)  # closes that write end: the filter reads to the end and exits
        os.close(real_stderr)
        with contextlib.suppress(subprocess.TimeoutExpired):
            # A process started inside the block may still hold the pipe: the filter
            # keeps forwarding its lines, and this process goes on.
            filter_process.wait(timeout=10)


def _start_filter(drop_info: bool, drop_decoders: bool = False) -> tuple[subprocess.Popen | None, int]:
    """The filter process, writing to a duplicate of fd 2 (also returned); (None, -1)
    when fd 2 is closed or no interpreter can start."""
    if not sys.executable:  # an embedded interpreter: nothing to start the filter with
        return None, -1
    try:
        real_stderr = os.dup(2)
    except OSError:
        return None, -1
    command = [sys.executable, "-I", "-S", os.path.abspath(stderr_filter.__file__),
               *(["--drop-info"] if drop_info else []),
               *(["--drop-decoders"] if drop_decoders else [])]
    try:
        return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=real_stderr, stderr=real_stderr), real_stderr
    except OSError:
        os.close(real_stderr)
        return None, -1
