"""Start-up work that overlaps TensorFlow's import.

Importing TensorFlow takes 6-10 s on 2 cores, much of it reading and linking shared
libraries with the GIL released. Importing MLflow and opening its store (SQLAlchemy,
and the sqlite schema's check) takes another 1.5-2.5 s and needs no TensorFlow, so a
run's entry point does it on a thread meanwhile (`pipeline.plan`; `python -m
benchmarks.startup` measures start-up). `pipeline.tracking.connect` waits for it, so
nothing else touches MLflow in between, and anything that failed here fails again
there, in the main thread, with the message it always had.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

_running: list[threading.Thread] = []


def in_background(work: Callable[[], None], name: str) -> None:
    """Run `work()` on a thread; its failure is only logged (at DEBUG): whoever needs its
    result does it again after `wait()`, and reports what fails then."""

    def quietly() -> None:
        try:
            work()
        except BaseException as error:
            log.debug("%s failed in the background (it is done again, and reported, when needed): %r", name, error)

    thread = threading.Thread(target=quietly, name=name)
    thread.start()
    _running.append(thread)


def wait() -> None:
    """Until the background work is done; at once when there is none."""
    while _running:
        _running.pop().join()
