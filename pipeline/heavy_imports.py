"""Import TensorFlow, Keras and MLflow without Python's garbage collector scanning them.

Their imports create about half a million objects that live as long as the process
(modules, functions, classes, op registrations). CPython's cyclic collector sees the
heap grow and runs full collections through all of it: 7 during TensorFlow's import
alone, each longer than the last (26 ms to 290 ms), which freed next to nothing. With
MLflow's store and the summary after it, full collections took ~1.5 s of a 13.7 s
`debug=smoke` run on 2 cores (measured 2026-12-02).

`first_import` pauses the collector for such an import and then moves everything
alive into the permanent generation (`gc.freeze`), which later collections skip. What
the imports leave is kept for the process's life anyway; what training creates
afterwards is collected as usual. Cyclic garbage that other threads make during the
block (the first step's tracing, beside MLflow's imports) is frozen with it, once a
process: a smoke run's peak memory grew by 3 MB of its 950 MB.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_paused = 0  # blocks open (imports on two threads may overlap)
_was_enabled = True


@contextlib.contextmanager
def first_import(*modules: str) -> Iterator[None]:
    """Around a block that imports `modules`: if any is not imported yet, no garbage
    collection inside the block, and on leaving it (the last such block, where they overlap
    on several threads) everything alive is frozen and collection resumes as before.
    Where all are imported already, nothing changes: garbage that an earlier run in this
    process left (a sweep's previous job, a test) is never frozen with them."""
    global _paused, _was_enabled
    if all(module in sys.modules for module in modules):
        yield
        return
    with _lock:
        if _paused == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _paused += 1
    try:
        yield
    finally:
        with _lock:
            _paused -= 1
            if _paused == 0:
                gc.freeze()
                if _was_enabled:
                    gc.enable()
