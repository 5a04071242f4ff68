"""Start-up work that overlaps TensorFlow's import.

Importing TensorFlow takes 6-10 s on 2 cores, much of it reading and linking shared
libraries with the GIL released. Importing MLflow and opening its store (SQLAlchemy,
and the sqlite schema's check or creation) takes another 1.5-2.5 s and needs no
TensorFlow, so a run's entry point does it on a thread meanwhile
(`open_store_meanwhile`, `python -m benchmarks.startup` measures what it saves).
`pipeline.tracking.connect` waits for it, then finds the store open and MLflow imported:
nothing else touches MLflow in between, and anything that fails here fails again
there, in the main thread, with the message it always had.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)

_opening: list[threading.Thread] = []


def open_store_meanwhile(configured_uri: str | None) -> None:
    """Import MLflow and open the store `mlflow.tracking_uri` names, on a thread."""
    thread = threading.Thread(target=_open_store, args=(configured_uri,), name="open-mlflow-store")
    thread.start()
    _opening.append(thread)


def wait() -> None:
    """Until the store is open (or failed to open); at once when nothing was started."""
    while _opening:
        _opening.pop().join()


def _open_store(configured_uri: str | None) -> None:
    try:
        from pipeline import tracking

        tracking.open_store(configured_uri)
    except BaseException as error:  # connect() reports it, in the main thread
        log.debug("opening the MLflow store ahead failed (connect will say why): %r", error)
