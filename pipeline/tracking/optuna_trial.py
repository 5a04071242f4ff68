"""Which Optuna trial a training job runs, and what it needs to reach it from any process.

The sweeper (`hydra_plugins/pipeline_optuna_sweeper`) hands each job an `OptunaTrial`
through `$PIPELINE_OPTUNA_TRIAL` (set with `hydra.job.env_set`, so it reaches joblib,
submitit and Ray workers alike); the entry point reads it into the run's plan
(`current_trial`), and the pruning callback (`callbacks/optuna_pruning.py`) opens the
study's storage with `storage_for` and its pruner with `make_pruner`.
"""

from __future__ import annotations

import base64
import json
import os
import warnings
from dataclasses import asdict, dataclass
from typing import Any

TRIAL_ENV = "PIPELINE_OPTUNA_TRIAL"  # the job's trial: `OptunaTrial` as JSON, base64 (no quoting in an override)

PRUNERS = ("median", "hyperband", "successive_halving", "none")


@dataclass(frozen=True)
class OptunaTrial:
    """Where a trial lives and how its study prunes: all a job needs to report to it.

    Args:
        storage: the study's storage URL (any SQLAlchemy URL, or a journal file path).
        study_name: the study's name in that storage.
        trial_id: the trial's id in the storage (unique across studies).
        number: the trial's number in its study (0, 1, ...).
        pruner: one of `PRUNERS`.
        startup_trials: trials that run to the end before any is pruned.
        warmup_epochs: the first epochs, on which no trial is judged.
    """

    storage: str
    study_name: str
    trial_id: int
    number: int
    pruner: str = "median"
    startup_trials: int = 5
    warmup_epochs: int = 2

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def storage_for(url: str, heartbeat_interval: int | None = None, grace_period: int | None = None):
    """Optuna's storage for `url`: a SQLAlchemy URL (sqlite, PostgreSQL, ...) is an RDB
    storage, anything else the path of a journal file. With `heartbeat_interval`, the RDB
    storage fails trials whose heartbeat stopped and enqueues them again."""
    import optuna

    if "://" not in url:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(url))
    # sqlite waits for another process's write lock instead of failing after 5 s.
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    if heartbeat_interval is None:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # heartbeats and retries are "experimental" in Optuna
        retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)  # Optuna >= 4.9
        callback = ({"heartbeat_stale_trial_callback": retry(max_retry=3)} if retry is not None else
                    {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=3)})
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                                          grace_period=grace_period, **callback)


def make_pruner(name: str, startup_trials: int = 5, warmup_epochs: int = 2):
    """The Optuna pruner named `name` (`median`, `hyperband`, `successive_halving`, `none`)."""
    import optuna

    if name == "median":
        # A trial is stopped when its epoch's value is worse than the median of earlier
        # trials at the same epoch, once `startup_trials` trials finished and after the warm-up.
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, warmup_epochs))
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, warmup_epochs))
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"hydra.sweeper.pruner must be one of {', '.join(PRUNERS)}. Received: {name!r}")


def monitored_metric(optimized_metric: str) -> str | None:
    """The per-epoch Keras log that tracks `optimized_metric`: `final_val_accuracy` and
    `val_accuracy` -> `val_accuracy`; None when no per-epoch value tracks it (e.g. test_*)."""
    name = optimized_metric.removeprefix("final_")
    return name if name.startswith("val_") else None


def encoded(trial: OptunaTrial) -> str:
    """`trial` as the value of `$PIPELINE_OPTUNA_TRIAL`."""
    # No `=` padding: Hydra's override grammar takes only one `=`.
    return base64.urlsafe_b64encode(json.dumps(trial.as_dict()).encode()).decode().rstrip("=")


def current_trial() -> OptunaTrial | None:
    """The Optuna trial this process runs (set by the sweeper for its job), or None."""
    raw = os.environ.get(TRIAL_ENV)
    if not raw:
        return None
    return OptunaTrial(**json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))))
