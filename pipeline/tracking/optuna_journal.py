"""Heartbeats for Optuna's journal file storage, which has none of its own.

A study in `journal:///shared/dir/study.log` (`hydra.sweeper.storage`) is shared by
processes on machines that see one filesystem, with no database server: what a SLURM
user on NFS has. Optuna fails the trials of a dead process only on storages that
implement `BaseHeartbeat` (its RDB storage); without it, a trial whose process died
stays RUNNING, and workers that count running trials toward `n_trials` would wait for it
forever. `HeartbeatJournalStorage` records each running trial's heartbeat as a system
attribute of the trial (one journal line per `heartbeat_interval`), so Optuna's own
`fail_stale_trials` and heartbeat thread work on it unchanged.

The heartbeats are the launching machines' wall clocks (the RDB storage uses the
database server's): the machines' clocks must agree to well within `grace_period`, as
NTP keeps them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from optuna.storages import JournalStorage
from optuna.storages._heartbeat import BaseHeartbeat  # private: canary in tests/test_private_api_canaries.py
from optuna.trial import TrialState

HEARTBEAT_ATTR = "pipeline.heartbeat"  # trial system attribute: time.time() of the last heartbeat


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """A `JournalStorage` whose trials' heartbeats are system attributes.

    Args:
        backend: the journal, e.g. `JournalFileBackend(path)`.
        heartbeat_interval: seconds between two heartbeats of a running trial.
        grace_period: seconds without a heartbeat after which a RUNNING trial is stale.
        stale_trial_callback: called with each trial failed as stale (Optuna's retry callback).
    """

    def __init__(self, backend, heartbeat_interval: int, grace_period: int,
                 stale_trial_callback: Callable | None = None) -> None:
        super().__init__(backend)
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.stale_trial_callback = stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        return [trial._trial_id for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
                if now - trial.system_attrs.get(HEARTBEAT_ATTR, trial.datetime_start.timestamp()) > self.grace_period]

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Callable | None:
        return self.stale_trial_callback

    get_failed_trial_callback = get_heartbeat_stale_trial_callback  # its name before Optuna 4.9
