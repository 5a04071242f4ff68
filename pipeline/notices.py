"""Say a lasting condition once per MLflow store, not on every run.

Some conditions last until the user acts, e.g. Graphviz not installed: a warning on
every run of every sweep job would bury the warnings that are news. `level` gives the
logging level to say such a notice at: WARNING the first time for a store, INFO the
first time in a process after that, DEBUG after that.

A local store (`sqlite:///path/mlflow.db`, `file:` URIs, plain paths) remembers a
notice in a marker file beside it (`.mlflow.db.<notice>`, holding the message; delete
it to be told again). A remote store (`http://...`, `postgresql://...`) is told once
per process.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

_said: set[tuple[str, str]] = set()  # (notice, store) said in this process


def level(notice: str, store: str | None, message: str = "") -> int:
    """The level to log `notice` at for the MLflow tracking URI `store`, and remember it.

    Args:
        notice: a file-name-safe key, e.g. "graphviz-missing".
        store: the tracking URI; None: no store, once per process.
        message: written into the marker file, for whoever finds it.
    """
    key = (notice, str(store or ""))
    if key in _said:
        return logging.DEBUG
    _said.add(key)
    marker = marker_path(notice, store)
    if marker is None:
        return logging.WARNING
    try:
        with open(marker, "x", encoding="utf-8") as file:  # exclusive: one of concurrent jobs wins
            file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} said once for this MLflow store: {message}\n"
                       "Delete this file to be told again.\n")
    except FileExistsError:
        return logging.INFO
    except OSError:  # a read-only directory: cannot remember, so say it
        pass
    return logging.WARNING


def marker_path(notice: str, store: str | None) -> Path | None:
    """`.<store file name>.<notice>` beside a local store; None for remote stores."""
    if not store:
        return None
    parsed = urlparse(store)
    if parsed.scheme == "sqlite":
        path = store[len("sqlite:///"):].split("?")[0] if store.startswith("sqlite:///") else ""
    elif parsed.scheme == "file":
        path = unquote(parsed.path)
    elif not parsed.scheme or len(parsed.scheme) == 1:  # a path (C:\ included)
        path = store
    else:
        return None
    if not path or path == ":memory:":
        return None
    path = Path(path).absolute()
    return path.with_name(f".{path.name}.{notice}")
