"""A grid sweep resumed into its parent run: only the jobs without a FINISHED child run again.

    python -m pipeline.train -m architecture=mlp,functional optimizer.lr=1e-3,1e-2 +sweep.resume=PARENT_RUN_ID

`SweepRecorder.on_multirun_start` calls `reopen` instead of creating a parent: the parent is
reopened RUNNING, and the children that did not finish (FAILED, KILLED, or RUNNING when
their sweep died) are tagged `sweep.superseded` (the summary leaves them out; a RUNNING
one ends FAILED). Each job whose name (its swept overrides) has a FINISHED child returns
that child's optimized metric without training (`SweepJob.finished`); the others run and
add their children to the same parent. An Optuna search needs none of this: the same
command continues its study.
"""

from __future__ import annotations

import logging
import math

from pipeline import cli
from pipeline.errors import ConfigError, PipelineError
from pipeline.tracking.sweep_job import find_children

log = logging.getLogger(__name__)

SUPERSEDED_TAG = "sweep.superseded"  # a child the resumed sweep ran again; not in the summary


def reopened(tracking_uri: str, parent_run_id: str, optimized_metric: str) -> dict[str, float]:
    """`reopen`, for `SweepRecorder`: a bad run id ends the command in one line."""
    from mlflow.tracking import MlflowClient

    try:
        return reopen(MlflowClient(tracking_uri), parent_run_id, optimized_metric)
    except PipelineError as error:
        cli.fail(error, error.exit_code)
        raise  # unreachable: cli.fail exits


def reopen(client, parent_run_id: str, optimized_metric: str) -> dict[str, float]:
    """Reopen the sweep parent `parent_run_id`; return {job name: optimized metric} of its
    FINISHED children, whose jobs are not run again.

    Raises:
        ConfigError: no such run, or it is not a sweep's parent.
    """
    try:
        parent = client.get_run(parent_run_id)
    except Exception:
        raise ConfigError(f"+sweep.resume: no run {parent_run_id} in the tracking store") from None
    if "mlflow.parentRunId" in parent.data.tags or "sweep.dir" not in parent.data.tags:
        raise ConfigError(f"+sweep.resume={parent_run_id} is not a sweep's parent run: pass the parent's run id")
    finished = {}
    for child in find_children(client, parent_run_id):
        if child.data.tags.get(SUPERSEDED_TAG):
            continue
        value = child.data.metrics.get(optimized_metric, math.nan)
        if child.info.status == "FINISHED" and math.isfinite(value):
            finished[child.info.run_name] = value
            continue
        client.set_tag(child.info.run_id, SUPERSEDED_TAG, "true")
        if child.info.status == "RUNNING":  # its sweep died with it
            client.set_tag(child.info.run_id, "failure_reason", "its sweep stopped before it ended")
            client.set_terminated(child.info.run_id, "FAILED")
    client.update_run(parent_run_id, status="RUNNING")
    log.info("sweep: resuming parent run %s; %d jobs finished before and are not run again", parent_run_id,
             len(finished))
    return finished
