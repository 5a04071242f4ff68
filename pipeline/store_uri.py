"""Where a run's MLflow records go, and whether a tracking server there answers, without
importing MLflow: `train` refuses an unreachable server before any training, while
MLflow itself is imported on a thread (`pipeline.pending_run`)."""

from __future__ import annotations

import os

from pipeline import extras
from pipeline.errors import PipelineError
from pipeline.redact import redact, split_credentials


def tracking_uri_exporting_credentials(configured: str | None) -> str:
    """The configured URI, else `$MLFLOW_TRACKING_URI`, else `sqlite:///<cwd>/mlflow.db`,
    with a tracking server's credentials moved into this process's environment.

    The credentials (`http://user:password@host`) move out of the URI into MLflow's
    `MLFLOW_TRACKING_USERNAME`/`MLFLOW_TRACKING_PASSWORD` (HTTP basic auth, inherited by
    sweep workers), and `$MLFLOW_TRACKING_URI`, if set, is rewritten without them, so
    that the URI MLflow keeps, records and prints (e.g. "View run ... at: <uri>") holds none.
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.abspath('mlflow.db')}"
    if uri.startswith(("http://", "https://")):
        uri, username, password = split_credentials(uri)
        if username is not None:
            os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = username, password
            if os.environ.get("MLFLOW_TRACKING_URI"):
                os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


def require_server(uri: str) -> None:
    """For a tracking server's `uri` (http, https), check that it answers: MLflow's own
    HTTP retries would take minutes to give up, so an unreachable server costs seconds,
    not a trained model. For a database server's (postgresql://), that its driver is
    installed. Other stores (sqlite, a directory) pass.

    Raises:
        PipelineError: the server does not answer.
        ConfigError: the database's driver is missing (`pip install -e '.[postgres]'`).
    """
    extras.require_driver(uri, "mlflow.tracking_uri")
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        username = os.environ.get("MLFLOW_TRACKING_USERNAME")
        auth = (username, os.environ.get("MLFLOW_TRACKING_PASSWORD", "")) if username else None
        requests.get(f"{uri.rstrip('/')}/health", timeout=10, auth=auth).raise_for_status()
    except requests.RequestException as error:
        raise PipelineError(
            f"mlflow.tracking_uri: cannot reach the tracking server at {redact(uri)} "
            f"({type(error).__name__}). Start it, or unset MLFLOW_TRACKING_URI to use "
            "the local sqlite store"
        ) from None
