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
        storage: the study's storage URL (any SQLAlchemy URL, or `journal:///path/study.log`).
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


JOURNAL_SCHEME = "journal://"  # journal:///shared/dir/study.log: Optuna's journal file, no database server


def journal_path(url: str) -> str | None:
    """The file of a journal storage (`journal:///dir/study.log`, or a bare path), else None."""
    if url.startswith(JOURNAL_SCHEME):
        return url.removeprefix(JOURNAL_SCHEME)
    return None if "://" in url else url


def storage_for(url: str, heartbeat_interval: int | None = None, grace_period: int | None = None):
    """Optuna's storage for `url`: a SQLAlchemy URL (sqlite, PostgreSQL, ...) is an RDB
    storage; `journal:///path` (or a bare path) a journal file (`JournalFileBackend`,
    whose default lock is a symlink, which NFS honours). With `heartbeat_interval`, the
    storage fails trials whose heartbeat stopped and enqueues them again (a new storage
    each call); without, one storage per URL serves the whole process."""
    if heartbeat_interval is None:
        # Opening one costs ~0.2 s (an engine, a schema check), and each trial of a search
        # opens it twice (its pruning callback, `best_so_far`): once per process instead.
        key = (os.getpid(), url)
        if key not in _opened:
            _opened[key] = _storage(url)
        return _opened[key]
    return _storage(url, heartbeat_interval, grace_period)


_opened: dict[tuple[int, str], Any] = {}  # (pid, url) -> storage without heartbeats


def _storage(url: str, heartbeat_interval: int | None = None, grace_period: int | None = None):
    import optuna

    retry = None
    if heartbeat_interval is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # heartbeats and retries are "experimental" in Optuna
            retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)  # Optuna >= 4.9
            retry = retry(max_retry=3) if retry is not None else optuna.storages.RetryFailedTrialCallback(max_retry=3)
    path = journal_path(url)
    if path is not None:
        from optuna.storages.journal import JournalFileBackend

        if heartbeat_interval is None:
            return optuna.storages.JournalStorage(JournalFileBackend(path))
        from pipeline.tracking.optuna_journal import HeartbeatJournalStorage

        return HeartbeatJournalStorage(JournalFileBackend(path), heartbeat_interval, grace_period or 60, retry)
    # sqlite waits for another process's write lock instead of failing after 5 s.
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    if heartbeat_interval is None:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    new_name = hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback")  # Optuna >= 4.9
    callback = {"heartbeat_stale_trial_callback" if new_name else "failed_trial_callback": retry}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                                          grace_period=grace_period, **callback)


def best_so_far(trial: OptunaTrial) -> tuple[float, int, str] | None:
    """(value, number, direction) of the best COMPLETE trial of `trial`'s study so far,
    or None before the first; `trial` itself is not told until its job returns."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=trial.study_name, storage=storage_for(trial.storage))
    try:
        best = study.best_trial
    except ValueError:  # no complete trial yet
        return None
    return float(best.value), best.number, study.direction.name.lower()


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
