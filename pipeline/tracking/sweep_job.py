"""A job of a Hydra sweep, as `pipeline.tracking.sweep.SweepRecorder` sees it: how the job's
process learns its place in the sweep (`current_job`, read by the job's plan), how a job
failed, which config keys the sweep varies, and the child runs a sweep left in the store.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hydra.core.utils import JobReturn, JobStatus

# How a sweep job's process learns its parent run and its name: JSON
# {"parent_run_id", "run_name", "tags", "register"}, set by `SweepRecorder.on_job_start`,
# read by `current_job` (the job's plan).
SWEEP_JOB_ENV = "PIPELINE_SWEEP_JOB"


@dataclass(frozen=True)
class SweepJob:
    """This job's place in a Hydra sweep: its run is a child of `parent_run_id`, named
    by the job's swept overrides (e.g. `architecture=mlp optimizer.lr=0.001`); it registers
    its model itself only if `register` is `all` (with `best`, the sweep does at its end).
    `finished` is the optimized metric of its FINISHED child in the sweep it resumes
    (`+sweep.resume`, `pipeline.tracking.sweep_resume`): then the job is not run again."""

    parent_run_id: str
    run_name: str
    tags: Mapping[str, str]
    register: str = "best"
    finished: float | None = None


def current_job() -> SweepJob | None:
    """The sweep job this process runs (set by `SweepRecorder.on_job_start`),
    or None outside a sweep."""
    raw = os.environ.get(SWEEP_JOB_ENV)
    if not raw:
        return None
    job = json.loads(raw)
    return SweepJob(job["parent_run_id"], job["run_name"], job["tags"], job.get("register", "best"),
                    job.get("finished"))


def failure_of(job_return: JobReturn) -> str | None:
    """Why a job failed, or None if it succeeded: an error `pipeline.cli.task` turned into
    a `JobFailure` (or a non-finite optimized metric), or an exception that reached Hydra."""
    from pipeline.cli import JobFailure

    if job_return.status == JobStatus.FAILED:
        error = job_return._return_value  # `return_value` would re-raise it
        return f"{type(error).__name__}: {error}"
    value = job_return.return_value
    return value.reason if isinstance(value, JobFailure) else None


def swept_keys(overrides: Sequence[str], search_space: Mapping[str, Any] | None) -> list[str]:
    """Config keys a sweep varies: its sweep overrides (`a=1,2`, `glob(*)`, `interval(..)`)
    and the sweeper's search space (`hydra.sweeper.params`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    keys = [o.key_or_group for o in parsed if o.is_sweep_override()]
    return keys + [str(k) for k in (search_space or {}) if str(k) not in keys]


def find_children(client, parent_run_id: str, extra_filter: str = "") -> list:
    """Every run nested under `parent_run_id`, in any experiment (jobs may log to their own)."""
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    query = f"tags.mlflow.parentRunId = '{parent_run_id}'" + (f" and {extra_filter}" if extra_filter else "")
    return client.search_runs(experiment_ids, query, max_results=10_000)


def optuna_tags() -> dict[str, str]:
    """`optuna.trial_number` for the job of an Optuna trial (the sweeper sets its env)."""
    from pipeline.tracking.optuna_trial import current_trial

    trial = current_trial()
    return {} if trial is None else {"optuna.trial_number": str(trial.number)}
